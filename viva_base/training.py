"""Pieces both training recipes (``viva_base.sft`` and ``editgrpo.train``) use: building the editor
from a recipe, the accelerator and trackers, metrics files, and atomic, resumable checkpoints.

A checkpoint folder ``output_dir/checkpoint-<step>/`` holds:

* ``trainable.safetensors``: every trainable parameter by name (full weights, or adapter weights);
* ``lora/`` (when the DiT carries a peft adapter): ``adapter_config.json`` + ``adapter_model.safetensors``,
  loadable with ``PeftModel.from_pretrained`` and by ``load_lora`` here;
* ``optimizer.pt``, ``scheduler.pt`` (tensors and numbers only; loaded with ``weights_only=True``);
* ``trainer_state.json``: the step and anything the recipe adds (data order is a function of
  ``(seed, step)``, so the step is the data state).

It is written under a temporary name and renamed, so a killed run never leaves a half checkpoint.
"""
from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import load_file, save_file

from .atomic import atomic_dir
from .errors import CheckpointError, UserError
from .recipe import atomic_write_text, redacted

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


@dataclass
class ModelConfig:
    """Which editor to start from (exactly one of ``pretrained``, ``t2v_base`` + ``instructor``, ``tiny``)."""

    pretrained: Optional[str] = None     # an editor directory (save_pretrained) or hub id
    t2v_base: Optional[str] = None       # a HunyuanVideo text-to-video checkpoint (widened on load) ...
    instructor: Optional[str] = None     # ... with this LLaVA checkpoint
    tiny: bool = False                   # the tiny offline editor (random weights; tests and smoke runs)
    tiny_seed: int = 0                   # seed of the tiny editor's random weights
    tiny_spec: Any = field(default_factory=dict)  # viva_base.tiny.TinySpec fields (sizes of the tiny editor)
    tiny_kind: str = "viva"              # which tiny editor: viva | lucy (TINY_EDITORS; tiny_spec is its spec)
    dtype: str = "float32"               # weights of the frozen parts: float32 | bf16 | fp16 (trained ones are float32)
    gradient_checkpointing: bool = False  # recompute each DiT block in backward (less memory, ~1/3 more time)
    shift: Optional[float] = None        # override the sampling schedule's shift
    vae_tiling: Optional[bool] = None    # the VAE in 256-pixel tiles (bounded memory); None: the editor's own (on)
    instructor_images: Optional[bool] = None  # false: the VLM instructor reads the instruction only, no first frame or reference (saved with the editor); None: the editor's own setting


def check_model_config(cfg: ModelConfig, key: str = "model") -> None:
    """The rules :func:`build_editor` applies, without building anything; errors name the recipe key ``key``."""
    if cfg.dtype not in DTYPES:
        raise UserError(f"{key}.dtype={cfg.dtype!r} is not one of {sorted(DTYPES)}")
    chosen = [bool(cfg.pretrained), bool(cfg.t2v_base or cfg.instructor), bool(cfg.tiny)]
    if sum(chosen) != 1:
        raise UserError(f"set exactly one of {key}.pretrained (an editor folder), {key}.t2v_base "
                        f"(+ {key}.instructor), or {key}.tiny=true")
    if cfg.tiny and cfg.tiny_kind not in TINY_EDITORS:
        raise UserError(f"{key}.tiny_kind={cfg.tiny_kind!r} is not one of {', '.join(TINY_EDITORS)}")


def build_editor(cfg: ModelConfig, device: torch.device | str | None = None, *, key: str = "model"):
    """The editor a recipe asks for; the class comes from the directory's ``editor_config.json``. ``key``: where
    the model block sits in the recipe (for error messages)."""
    from .model import VivaEditor

    check_model_config(cfg, key)
    dtype = DTYPES[cfg.dtype]
    if cfg.tiny:
        import importlib

        from omegaconf import OmegaConf

        module, make, spec_name = TINY_EDITORS[cfg.tiny_kind]
        module = importlib.import_module(module)
        TinySpec = getattr(module, spec_name)
        spec = OmegaConf.to_container(cfg.tiny_spec) if OmegaConf.is_config(cfg.tiny_spec) else dict(cfg.tiny_spec)
        try:
            spec = TinySpec(**spec)
        except TypeError as exc:
            raise UserError(f"model.tiny_spec: {exc} (fields: {', '.join(TinySpec.__dataclass_fields__)})") from None
        editor = getattr(module, make)(spec, seed=cfg.tiny_seed)
    elif cfg.pretrained:
        editor = load_editor(cfg.pretrained, torch_dtype=dtype)
    else:
        if not (cfg.t2v_base and cfg.instructor):
            raise UserError(f"{key}.t2v_base needs {key}.instructor (a LLaVA checkpoint) too")
        editor = VivaEditor.from_t2v(cfg.t2v_base, cfg.instructor, torch_dtype=dtype)
    editor.to(device=device, dtype=dtype)
    if cfg.shift is not None:
        editor.config.shift = float(cfg.shift)
    if cfg.instructor_images is not None:
        if not hasattr(editor.config, "instructor_images"):
            raise UserError(f"{key}.instructor_images: the {type(editor).__name__} has no VLM instructor that reads "
                            "images; leave it unset")
        editor.config.instructor_images = bool(cfg.instructor_images)
    if cfg.vae_tiling is not None:
        if not hasattr(editor.config, "vae_tiling"):
            raise UserError(f"{key}.vae_tiling: the {type(editor).__name__}'s VAE is not tiled (Wan's causal VAE "
                            "decodes in frame chunks); leave it unset")
        from .vae import configure_vae_memory

        editor.config.vae_tiling = bool(cfg.vae_tiling)
        configure_vae_memory(editor.vae, editor.config.vae_tiling)
    if cfg.gradient_checkpointing:
        editor.transformer.enable_gradient_checkpointing()
    return editor


def upcast_trainable(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Store every trainable parameter of ``module`` in float32 (the master weights) whatever the model dtype;
    the frozen ones keep theirs. Returns the trainable parameters.

    A bf16 weight cannot hold a small update: bf16 keeps 8 significant bits, so ``w + lr * u`` rounds back to
    ``w`` unless ``|lr * u| > |w| / 512`` -- AdamW at lr 2e-5 would lose almost every step. The forward of a
    model with bf16 frozen and fp32 trainable weights runs under :func:`compute_autocast` (peft's LoRA layers
    also cast their input to the adapter's dtype on their own)."""
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        if p.dtype != torch.float32:
            p.data = p.data.float()
    return params


def clip_norm(max_grad_norm: float) -> float:
    """The norm ``accelerator.clip_grad_norm_`` clips to for a recipe's ``train.max_grad_norm``: 0 means no clipping,
    as DeepSpeed reads its ``gradient_clipping`` (torch would scale every gradient to zero, so nothing trained)."""
    return max_grad_norm if max_grad_norm > 0 else float("inf")


def compute_autocast(device: torch.device | str, model_dtype: torch.dtype):
    """The context of a training forward whose frozen weights are ``model_dtype`` and trainable ones float32
    (:func:`upcast_trainable`): autocast to ``model_dtype`` (matmuls and convolutions in the model dtype, so
    mixed-dtype layers work); nothing for a float32 model."""
    from contextlib import nullcontext

    if model_dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=model_dtype)


EDITOR_CLASSES = {"VivaEditor": ("viva_base.model", "VivaEditor"), "LucyEditor": ("viva_base.lucy", "LucyEditor")}
# model_index.json ``_class_name`` of a diffusers pipeline directory (as downloaded) -> the editor class that loads it
PIPELINE_EDITORS = {"LucyEditPipeline": "LucyEditor"}
# model.tiny_kind -> (module, factory, spec dataclass) of the tiny offline editors
TINY_EDITORS = {"viva": ("viva_base.tiny", "make_tiny_editor", "TinySpec"),
                "lucy": ("viva_base.tiny_lucy", "make_tiny_lucy_editor", "TinyLucySpec")}


def editor_class_name(root: Path) -> str | None:
    """The editor class of a local folder: its ``editor_config.json``'s, or for a downloaded diffusers pipeline its
    ``model_index.json``'s (mapped by PIPELINE_EDITORS); None when it has neither."""
    from .model import EDITOR_CONFIG

    if (root / EDITOR_CONFIG).exists():
        return json.loads((root / EDITOR_CONFIG).read_text()).get("_class_name")
    if (root / "model_index.json").exists():
        name = json.loads((root / "model_index.json").read_text()).get("_class_name")
        return PIPELINE_EDITORS.get(name, name)
    return None


def load_editor(path: str | os.PathLike, **kwargs):
    """Load any editor directory; its ``editor_config.json`` names the class (see EDITOR_CLASSES), or, for a
    downloaded diffusers pipeline without one, its ``model_index.json`` (see PIPELINE_EDITORS)."""
    import importlib

    from .model import _resolve

    root = _resolve(path, ".")
    module, cls = EDITOR_CLASSES[_known_editor_class(root, path)]
    return getattr(importlib.import_module(module), cls).from_pretrained(root, **kwargs)


def _known_editor_class(root: Path, path) -> str:
    """``editor_class_name(root)``, which must be one of EDITOR_CLASSES; else a CheckpointError naming the folder."""
    from .model import EDITOR_CONFIG

    name = editor_class_name(root)
    if name is None:
        raise CheckpointError(f"{root}: missing {EDITOR_CONFIG} (or a model_index.json of "
                              f"{', '.join(PIPELINE_EDITORS)}); is this the right directory?")
    if name not in EDITOR_CLASSES:
        raise CheckpointError(f"{path}: unknown editor class {name!r} (known: {', '.join(EDITOR_CLASSES)})")
    return name


def check_editor_path(path: str | os.PathLike, option: str = "--model") -> None:
    """What ``load_editor(path)`` will need, checked before any model loads (commands that load other models first,
    such as a benchmark's metric models): a local editor folder of a known class, or a hub repo id (``owner/name``,
    resolved when it loads). Raises CheckpointError."""
    from .hub import hub_ids

    if hub_ids(str(path)):
        return
    if not Path(path).is_dir():
        raise CheckpointError(f"{option} {path}: editor folder not found (and not a hub repo id, owner/name)")
    _known_editor_class(Path(path), path)


# ---------------------------------------------------------------------------- accelerator, trackers
def _cpu_process_group() -> None:
    """Without GPUs, under ``torchrun`` or ``accelerate launch``: start accelerate's process state on gloo first.

    accelerate otherwise runs each of N CPU processes as a world of 1 (unless ACCELERATE_USE_CPU=1), and under
    DeepSpeed on CPU reports 1 process while DeepSpeed sees N.
    """
    if torch.cuda.is_available() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    from accelerate import PartialState

    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    PartialState(cpu=not deepspeed, backend="gloo")


def process_state():
    """accelerate's ``PartialState`` of this launch, for a command that needs only the process index, count and
    device (the data build): on CPUs under ``torchrun`` started on gloo first (:func:`_cpu_process_group`), else
    every process would see a world of 1 and take every shard."""
    from accelerate import PartialState

    _cpu_process_group()
    return PartialState()


@contextlib.contextmanager
def main_process_first_polled(accelerator, folder: str | os.PathLike, *, poll: float = 1.0):
    """accelerate's ``main_process_first`` for work that can outlast the process group's timeout (gloo: 30 minutes,
    NCCL: 10; the toy chain's SFT stage takes longer on CPUs): the main process runs the block first while the others
    wait for a marker file in ``folder`` (a shared file system), not in a barrier, then run the block themselves.
    If the main process's block raises, the others stop with a UserError; the main process waits (a minute at most)
    until each has read why, then removes the marker and raises. A no-op wrapper on one process."""
    if accelerator is None or accelerator.num_processes == 1:
        yield
        return
    import uuid

    from accelerate.utils import broadcast_object_list

    token = broadcast_object_list([uuid.uuid4().hex if accelerator.is_main_process else None])[0]  # quick
    marker = Path(folder) / f".main-process-done-{token}"
    if accelerator.is_main_process:
        try:
            yield
        except BaseException as exc:
            atomic_write_text(marker, f"failed: {exc.__class__.__name__}")
            if isinstance(exc, Exception):  # not on Ctrl-C: stop now
                _remove_when_read(marker, accelerator.num_processes - 1, timeout=max(60.0, 30 * poll), poll=poll)
            raise
        atomic_write_text(marker, "ok")
    else:
        while not marker.exists():
            time.sleep(poll)
        status = marker.read_text()
        if status != "ok":
            (marker.parent / f"{marker.name}.read-{accelerator.process_index}").touch()
            raise UserError(f"the main process stopped ({status}); its error is in its own output")
        yield
    accelerator.wait_for_everyone()  # every process has read the marker
    if accelerator.is_main_process:
        marker.unlink(missing_ok=True)


def _remove_when_read(marker: Path, readers: int, *, timeout: float, poll: float) -> None:
    """``main_process_first_polled``'s failure path: once ``readers`` processes have left their receipt next to the
    failure marker, remove it and the receipts. A process that never reads it (it died) leaves them after ``timeout``
    seconds, so the main process's error is never held up for long."""
    deadline = time.monotonic() + timeout
    receipts = lambda: list(marker.parent.glob(f"{marker.name}.read-*"))  # noqa: E731
    while len(receipts()) < readers:
        if time.monotonic() > deadline:
            return
        time.sleep(poll)
    for path in [marker, *receipts()]:
        path.unlink(missing_ok=True)


COMPILE_MODES = ("none", "full", "regional")


def compile_dit(dit: torch.nn.Module, mode: str) -> None:
    """``train.compile``: compile the DiT in place (``nn.Module.compile``: the same module, the same parameter
    names, so checkpoints, EMA and ``save_pretrained`` do not change), before ``accelerator.prepare`` wraps it.
    ``full`` compiles the whole forward with inductor (the fastest steps for a small model: the toy's);
    ``regional`` compiles each of the blocks diffusers lists in the class's ``_repeated_blocks``
    (``ModelMixin.compile_repeated_blocks``): one compile serves all 60 blocks of a 13B DiT, minutes less. Shapes that
    change between batches (text length, frames) become dynamic after their first change, so a run recompiles a
    few times, not at every batch.

    Not through accelerate's ``dynamo_plugin``: it lives in the process-wide ``AcceleratorState``, which the first
    ``Accelerator`` of a process fixes (the toy chain makes Edit-GRPO's first, so its SFT stage ran uncompiled)."""
    if mode == "none":
        return
    if mode == "full":
        dit.compile()
    elif mode == "regional":
        if not getattr(dit, "_repeated_blocks", None):
            raise UserError(f"train.compile=regional: {type(dit).__name__} names no repeated blocks "
                            "(diffusers' _repeated_blocks); use train.compile=full")
        dit.compile_repeated_blocks()
    else:
        raise UserError(f"train.compile={mode!r}: use one of {', '.join(COMPILE_MODES)}")


def check_compile(compile: str, key: str = "train.compile") -> None:
    """``torch.compile`` on a CPU builds C++ kernels: refuse, before any work, a machine without a C++ compiler
    (found as inductor finds it: ``$CXX``, else ``g++``; ``clang++`` on macOS).

    The common case (that compiler answers ``--version``) is settled with one subprocess; only when it does not is
    inductor asked (``get_cpp_compiler``, which may also install one through conda), so the check never refuses a
    machine inductor accepts. Importing inductor costs 1.5-3 s, most of a failing command's time before this."""
    if compile == "none" or torch.cuda.is_available() or _default_cxx_runs():
        return
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler
    except ImportError:  # a torch without this helper: inductor reports it at the first forward
        return
    try:
        get_cpp_compiler()
    except Exception:
        cxx = os.environ.get("CXX", "g++")
        raise UserError(f"{key}={compile!r} needs a C++ compiler on a CPU (torch.compile builds C++ kernels) and "
                        f"{cxx!r} does not run: install one (e.g. `apt-get install g++`), point $CXX at it, or set "
                        f"{key}=none") from None


def check_lr_scheduler(name: str, key: str = "train.lr_scheduler") -> None:
    """``name`` must be one diffusers' ``get_scheduler`` (the trainers' lr schedule) builds from a warmup and a step
    count: its own list (``SchedulerType``), not a copy, less ``piecewise_constant``, which needs ``step_rules`` that
    the recipes do not take (it stopped the SFT with an AttributeError after the editor was built). Imports diffusers
    (1-2 s on a CPU): validators call it after the cheap checks."""
    from diffusers.optimization import SchedulerType

    from .recipe import check_one_of

    check_one_of(key, name, [s.value for s in SchedulerType if s.value != "piecewise_constant"])


def _default_cxx_runs() -> bool:
    """Whether the compiler inductor tries first outside conda (``torch._inductor.config.cpp.cxx``: ``$CXX``, else
    ``clang++`` on macOS and ``g++`` elsewhere) answers ``<cxx> --version``. False on Windows (inductor's own rules
    there: ``cl`` and MSVC checks)."""
    import sys

    if sys.platform == "win32":
        return False
    return _cxx_runs(os.environ.get("CXX", "clang++" if sys.platform == "darwin" else "g++"))


@functools.cache
def _cxx_runs(cxx: str) -> bool:
    import shlex
    import subprocess

    try:
        subprocess.run([*shlex.split(cxx), "--version"], check=True, capture_output=True, timeout=30)
    except (OSError, ValueError, subprocess.SubprocessError):
        return False
    return True


def make_accelerator(output_dir: str, *, report_to: str = "tensorboard", mixed_precision: str = "no",
                     gradient_accumulation_steps: int = 1, seed: int | None = None):
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    _cpu_process_group()

    if report_to == "wandb" and not os.environ.get("WANDB_API_KEY"):
        os.environ.setdefault("WANDB_MODE", "offline")
    log_with = None if report_to in ("none", "", None) else report_to
    # step_scheduler_with_optimizer=False: the recipes call lr_scheduler.step() once per optimizer step themselves.
    # accelerate's default steps the schedule once per process per optimizer step (it assumes a per-process
    # batch), so a 500-step warmup would end after 63 optimizer steps on 8 processes; the lr at optimizer step k
    # is now the same on 1 or N processes, with or without DeepSpeed.
    acc = Accelerator(log_with=log_with, mixed_precision=mixed_precision, step_scheduler_with_optimizer=False,
                      gradient_accumulation_steps=gradient_accumulation_steps,
                      project_config=ProjectConfiguration(project_dir=output_dir, logging_dir=f"{output_dir}/logs"))
    return acc


def init_trackers(accelerator, name: str, cfg: Any) -> None:
    if accelerator.log_with:
        flat = {}

        def walk(prefix, node):
            for k, v in node.items():
                if isinstance(v, dict):
                    walk(f"{prefix}{k}.", v)
                else:
                    flat[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)

        walk("", redacted(cfg))
        accelerator.init_trackers(name, config=flat)


def log_videos(accelerator, videos: dict[str, torch.Tensor], step: int, *, fps: float = 8.0, upscale: int = 4,
               max_side: int = 256, strip_frames: int = 8) -> int:
    """Log clips ``{tag: (F, 3, H, W) in [0, 1]}`` to every tracker of ``accelerator`` (main process only).

    wandb gets a ``wandb.Video`` (a GIF); tensorboard a video where ``moviepy`` (which its ``add_video`` needs)
    is installed, else a film strip (at most ``strip_frames`` frames, evenly spaced, side by side) as an image.
    Small frames are enlarged ``upscale`` times (nearest) so a toy clip is visible; large ones are shrunk (area) to
    ``max_side`` on their longer side, so a real clip (33 x 480 x 848) logs a few hundred KB, not a 40-megapixel
    strip per clip and checkpoint. Returns the number of clips logged.
    """
    if not accelerator.is_main_process or not videos or not getattr(accelerator, "trackers", None):
        return 0
    import importlib.util

    import torch.nn.functional as F

    clips = {}
    for tag, v in videos.items():
        v = v.detach().float().cpu().clamp(0, 1)
        if upscale > 1 and max(v.shape[-2:]) < 128:
            v = F.interpolate(v, scale_factor=upscale, mode="nearest")
        elif max(v.shape[-2:]) > max_side:
            scale = max_side / max(v.shape[-2:])
            size = [max(1, round(n * scale)) for n in v.shape[-2:]]
            v = F.interpolate(v, size=size, mode="area")
        clips[tag] = v
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            writer = tracker.writer
            for tag, v in clips.items():
                if importlib.util.find_spec("moviepy") is not None:
                    writer.add_video(tag, v[None], step, fps=int(round(fps)))
                else:
                    keep = torch.linspace(0, len(v) - 1, min(len(v), strip_frames)).round().long().unique()
                    writer.add_image(tag, torch.cat(list(v[keep]), dim=-1), step)
            writer.flush()
        elif tracker.name == "wandb":
            import wandb

            tracker.log({tag: wandb.Video((v * 255).round().to(torch.uint8).numpy(), fps=int(round(fps)), format="gif")
                         for tag, v in clips.items()}, step=step)
    return len(clips)


class MetricsFile:
    """``metrics.jsonl``: one JSON object per step; on resume, lines past the resumed step are dropped
    so the file reads as if the run had never stopped. Written by the main process only."""

    def __init__(self, path: str | os.PathLike, resume_step: int = 0, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled
        if enabled and self.path.exists():
            keep = [ln for ln in self.path.read_text().splitlines()
                    if ln.strip() and json.loads(ln).get("step", 0) <= resume_step]
            self.path.write_text("".join(ln + "\n" for ln in keep))
        elif enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text("")

    def write(self, row: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")


# ---------------------------------------------------------------------------- checkpoints
CKPT_RE = re.compile(r"^checkpoint-(\d+)$")


def trainable_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().contiguous() for n, p in module.named_parameters() if p.requires_grad}


# Recipe keys a resumed run may change without becoming a different run (where and how long, logging, evaluation).
RESUME_FREE_KEYS = ("resume", "output_dir", "report_to", "train.num_iterations", "train.max_steps",
                    "train.checkpoint_every", "train.keep_checkpoints", "train.log_every", "eval.",
                    "validation.",  # the SFT's held-out loss and edits (viva_base/validation.py): not the training
                    "data.precompute",  # encodings once or per step: the same numbers to float rounding
                    "data.num_workers",  # where the clips are read: the same batches
                    "train.compile", "train.fused_optimizer",  # compiled or eager kernels: the same, to rounding
                    "hub.")  # where the result is shared (viva_base/hub.py)
# where a reward is computed and how its client connects (rewards/remote.py): a run may resume with the reward
# server restarted elsewhere, or the reward back in the process (the same numbers)
RESUME_FREE_PATTERN = re.compile(r"rewards\.[^.]+\.(server|timeout|max_retries|backoff|max_backoff|give_up_after|"
                                 r"token_env|max_samples_per_request)")


def resume_config(cfg: Any) -> dict:
    """The resolved recipe as ``{dotted key: value}``, less :data:`RESUME_FREE_KEYS`: what a checkpoint stores so
    that ``resume`` can refuse to continue a different run."""
    from omegaconf import OmegaConf

    flat: dict = {}

    def walk(prefix: str, node) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}{k}.", v)
        else:
            flat[prefix[:-1]] = node

    walk("", OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else dict(cfg))
    return {k: v for k, v in flat.items() if not resume_free(k)}


def resume_free(key: str) -> bool:
    """Whether a dotted recipe key may change between a checkpoint and the run that resumes it."""
    return bool(RESUME_FREE_PATTERN.fullmatch(key)) or any(key == f or (f.endswith(".") and key.startswith(f))
                                                            for f in RESUME_FREE_KEYS)


def added_since(stored: dict, now: dict) -> set[str]:
    """Keys of ``now`` that a newer schema added after ``stored`` was written, at the default ``None`` (each such key
    means "as before" at None, e.g. ``model.vae_tiling``: the editor's own setting): not a change of recipe."""
    return {k for k, v in now.items() if k not in stored and v is None}


def check_resume_config(ckpt: Path, cfg: Any) -> None:
    """Refuse to resume ``ckpt`` with a recipe that differs from the one that wrote it (beyond RESUME_FREE_KEYS)."""
    stored = json.loads((ckpt / "trainer_state.json").read_text()).get("config")
    if stored is None:  # written before checkpoints stored their config
        return
    # a key made free after the checkpoint was written (e.g. train.compile) is stored there: free now, so ignored
    stored = {k: v for k, v in stored.items() if not resume_free(k)}
    now = resume_config(cfg)
    now = {k: v for k, v in now.items() if k not in added_since(stored, now)}
    diff = sorted(k for k in set(stored) | set(now) if stored.get(k, "<unset>") != now.get(k, "<unset>"))
    if diff:
        shown = ", ".join(f"{k}: {stored.get(k, '<unset>')!r} -> {now.get(k, '<unset>')!r}" for k in diff[:3])
        more = f" (+{len(diff) - 3} more)" if len(diff) > 3 else ""
        raise UserError(f"{ckpt} was written by a different recipe ({shown}{more}): resume=null (or another "
                        f"output_dir) starts a fresh run; set those keys back to continue this one")


def save_checkpoint(output_dir: str | os.PathLike, step: int, *, model: torch.nn.Module, optimizer, lr_scheduler,
                    state: dict | None = None, keep: int | None = None, config: Any = None,
                    weights: dict[str, torch.Tensor] | None = None,
                    extra: dict[str, dict[str, torch.Tensor]] | None = None) -> Path:
    """Write ``checkpoint-<step>`` atomically (see the module docstring); keep the newest ``keep``. ``config``: the
    run's recipe, stored (less RESUME_FREE_KEYS) so that a resume with another recipe is refused. ``weights``: the
    trainable parameters by name when ``model`` does not hold them whole (DeepSpeed); default: read from ``model``.
    ``extra``: more tensors by file stem (e.g. the SFT's EMA weights, ``ema.safetensors``), written in the same
    atomic step."""
    if config is not None:
        state = {**(state or {}), "config": resume_config(config)}
    out = Path(output_dir)
    final = out / f"checkpoint-{step}"
    with atomic_dir(final) as tmp:
        save_file(trainable_state(model) if weights is None else weights, str(tmp / "trainable.safetensors"))
        if hasattr(model, "peft_config"):
            from .peft_utils import save_lora

            save_lora(model, tmp / "lora")  # diffusers + peft formats
        for stem, tensors in (extra or {}).items():
            save_file(tensors, str(tmp / f"{stem}.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(lr_scheduler.state_dict(), tmp / "scheduler.pt")
        (tmp / "trainer_state.json").write_text(json.dumps({"step": step, "time": time.time(), **(state or {})}))
    if keep:
        for old in list_checkpoints(out)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    out = Path(output_dir)
    if not out.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in out.iterdir() if (m := CKPT_RE.match(p.name)) and
             (p / "trainer_state.json").exists()]
    return [p for _, p in sorted(found)]


def resume_hint(cfg) -> str:
    """What an interrupted training run (``cfg``: its recipe, with ``output_dir`` and ``resume``) leaves to continue
    from: the line ``run_cli`` prints after Ctrl-C. Checkpoints are written whole or not at all (``atomic_dir``), so
    the newest complete one is a safe start."""
    ckpts = list_checkpoints(cfg.output_dir)
    if not ckpts:
        return f"no checkpoint was written yet in {cfg.output_dir} (the next run starts fresh)"
    again = "run the same command again" if cfg.resume == "latest" else "run the same command with resume=latest"
    return f"the last checkpoint is {ckpts[-1]}: {again} to continue from it"


def find_checkpoint(output_dir: str | os.PathLike, resume: str | None, config: Any = None) -> Path | None:
    """``resume``: None/"" (fresh run), "latest" (newest complete checkpoint, or fresh if none), or a path.
    With ``config`` (the run's recipe) a checkpoint written by a different recipe is refused (check_resume_config)."""
    if not resume:
        return None
    if resume == "latest":
        ckpts = list_checkpoints(output_dir)
        p = ckpts[-1] if ckpts else None
    else:
        p = Path(resume)
        if not (p / "trainer_state.json").exists():
            raise CheckpointError(f"resume={resume}: not a checkpoint folder (no trainer_state.json); "
                                  "use resume=latest or a checkpoint-<step> path")
    if p is not None and config is not None:
        check_resume_config(p, config)
    return p


def load_checkpoint(path: Path, *, model: torch.nn.Module, optimizer, lr_scheduler) -> dict:
    """Restore what :func:`save_checkpoint` wrote; returns ``trainer_state.json``."""
    weights = load_file(str(path / "trainable.safetensors"))
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in weights]
    unknown = [n for n in weights if n not in params]
    if missing or unknown:
        raise CheckpointError(f"{path}: checkpoint does not match the model (missing {missing[:3]}, unknown {unknown[:3]})")
    with torch.no_grad():
        for n, w in weights.items():
            params[n].copy_(w.to(params[n].device, params[n].dtype))
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu"))
    lr_scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True, map_location="cpu"))
    return json.loads((path / "trainer_state.json").read_text())


def step_generator(seed: int, step: int, stream: int = 0, rank: int = 0) -> torch.Generator:
    """A CPU generator that depends only on (seed, step, stream, rank): resumed runs draw the same numbers."""
    return torch.Generator().manual_seed((((seed * 1_000_003 + step) * 101 + stream) * 8191 + rank) % (2 ** 63 - 1))
