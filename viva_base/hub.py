"""Sharing what a training run makes: a model card (``README.md``) and the resolved recipe in every result folder,
and an optional upload to the Hugging Face Hub at the end of the run (the ``hub`` block of both recipes).

What a result folder holds besides its weights:

* ``README.md``: a model card (``huggingface_hub.ModelCard``; YAML metadata: ``library_name``, ``pipeline_tag``,
  ``tags``, ``base_model`` where it is a hub id, ``license`` when ``hub.license`` sets one), with how to load and
  run it, what it was trained from and with, and the run's measured numbers (final loss, held-out evaluation);
* ``training_config.yaml``: the resolved recipe (secrets redacted), the run's ``config.yaml``.

``hub.push_to_hub=true`` uploads SFT's ``final/`` or Edit-GRPO's ``lora/`` with them, as diffusers' training scripts
do with ``--push_to_hub``. Everything that can be checked is checked before the run builds anything: the hub is not
in offline mode, a token is there, the repo id is valid; then the main process creates the repo
(``exist_ok=True``), so a bad token or no network fails in seconds, not after training. A failed upload at the end
keeps the local folder and says how to upload it by hand (``hf upload``).
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from .errors import UserError

logger = logging.getLogger(__name__)

CARD = "README.md"
TRAINING_CONFIG = "training_config.yaml"
LIBRARY = "edit-grpo"


@dataclass
class HubConfig:
    push_to_hub: bool = False            # upload the result (SFT final/, Edit-GRPO lora/) and its model card at the end
    repo_id: Optional[str] = None        # user/name (or name: your account); None -> output_dir's folder name
    private: bool = True                 # create the repo private (an existing repo keeps its visibility)
    revision: Optional[str] = None       # branch to push to (created if missing); None -> main
    license: Optional[str] = None        # the model card's license (e.g. the base model's); None -> none stated


# ---------------------------------------------------------------------------- checks, before any expensive work
def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def check_hub(hub: HubConfig, output_dir: str | os.PathLike, *, create: bool = True) -> Optional[str]:
    """Check the ``hub`` block without building anything; with ``create`` (and on the main process only) create the
    repo, so that a bad token or no network stops the run now. Returns the repo id to push to (None: no push).
    Raises :class:`UserError` naming the key and the fix."""
    if not hub.push_to_hub:
        return None
    from huggingface_hub import constants, get_token
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    repo_id = hub.repo_id or Path(output_dir).resolve().name
    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        key = "hub.repo_id" if hub.repo_id else "hub.repo_id (unset: output_dir's folder name)"
        raise UserError(f"{key}={repo_id!r} is not a valid hub repo id ({str(exc).splitlines()[0][:160]}); "
                        "set hub.repo_id=user/name") from None
    if constants.is_offline_mode():
        raise UserError("hub.push_to_hub=true, but HF_HUB_OFFLINE is set: unset it, or set hub.push_to_hub=false "
                        "and upload the result later with `hf upload REPO FOLDER`")
    if not get_token():
        raise UserError("hub.push_to_hub=true needs a Hugging Face token with write access: run `hf auth login` or "
                        "set HF_TOKEN")
    if not (create and _is_main_process()):
        return repo_id
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        url = api.create_repo(repo_id, private=hub.private, exist_ok=True)
        repo_id = getattr(url, "repo_id", None) or repo_id
        if hub.revision:  # an upload to a branch that does not exist fails
            api.create_branch(repo_id, branch=hub.revision, exist_ok=True)
    except Exception as exc:  # auth, network, a name taken by someone else
        raise UserError(f"hub.push_to_hub=true: cannot create the hub repo {repo_id!r} ({_first_line(exc)}); check "
                        "the token (`hf auth whoami`), the network and hub.repo_id, or set hub.push_to_hub=false"
                        ) from None
    return repo_id


def push_folder(hub: HubConfig, repo_id: str, folder: str | os.PathLike, what: str, *,
                commit_message: str | None = None, kept: bool = True) -> str:
    """Upload ``folder`` to ``repo_id`` (the main process, at the end of a run); returns the commit's url. A failed
    upload raises :class:`UserError`; with ``kept`` (the folder stays) the message gives the command to upload it
    by hand."""
    from huggingface_hub import HfApi

    folder = Path(folder)
    try:
        info = HfApi().upload_folder(repo_id=repo_id, folder_path=str(folder), revision=hub.revision,
                                     commit_message=commit_message or f"Upload {what} ({folder.name}/) from Edit-GRPO",
                                     ignore_patterns=[".*"])
    except Exception as exc:
        if not kept:
            raise UserError(f"uploading the {what} to the hub repo {repo_id!r} failed ({_first_line(exc)})") from None
        branch = f" --revision {hub.revision}" if hub.revision else ""
        raise UserError(f"the {what} is saved in {folder}, but uploading it to the hub repo {repo_id!r} failed "
                        f"({_first_line(exc)}); upload it with `hf upload {repo_id} {folder}{branch}`") from None
    url = getattr(info, "commit_url", None) or f"https://huggingface.co/{repo_id}"
    logger.info("uploaded %s to %s", folder, url)
    print(f"pushed {folder} to the hub: {url}")
    return url


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200]}" if text else type(exc).__name__


# ---------------------------------------------------------------------------- model cards
def hub_ids(*names: Optional[str]) -> list[str]:
    """The names that are hub repo ids (``owner/name``, not an existing local path): a card's ``base_model``."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    ids = []
    for name in names:
        if not name or Path(name).exists() or str(name).count("/") != 1:
            continue
        try:
            validate_repo_id(str(name))
        except HFValidationError:
            continue
        ids.append(str(name))
    return ids


def started_from(model) -> str:
    """Where a recipe's ``model`` block starts the editor (for a card)."""
    if model.pretrained:
        return f"the editor `{model.pretrained}`"
    if model.t2v_base:
        return f"the text-to-video DiT `{model.t2v_base}` (widened) with the instructor `{model.instructor}`"
    return f"the tiny offline {getattr(model, 'tiny_kind', 'viva')} editor (random weights, seed {model.tiny_seed})"


def duration(seconds: float) -> str:
    """``3725`` -> ``1 h 02 min``; ``75`` -> ``1 min 15 s``."""
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"
    if seconds >= 60:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds} s"


def _number(value) -> str:
    """A float to 4 significant digits; anything else as it is."""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _table(rows: list[tuple[str, Any]]) -> str:
    lines = ["| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in rows if v is not None and v != ""]
    return "\n".join(lines)


def render_card(*, title: str, summary: str, usage: str, training: list[tuple[str, Any]] | None,
                results: str = "", base_model: list[str] | None = None, tags: list[str] | None = None,
                license: str | None = None) -> str:
    """A model card's text: YAML metadata (``huggingface_hub.ModelCardData``) and the markdown sections."""
    from huggingface_hub import ModelCardData

    data = ModelCardData(library_name=LIBRARY, pipeline_tag="video-to-video", license=license or None,
                         base_model=(base_model or None), tags=["video-editing", "edit-grpo", *(tags or [])])
    parts = [f"---\n{data.to_yaml()}\n---", f"# {title}", summary.strip(), "## Use", usage.strip()]
    if training:
        parts += ["## Training", _table(training), f"The resolved recipe is `{TRAINING_CONFIG}` in this folder."]
    if results:
        parts += ["## Evaluation", results.strip()]
    parts.append("Made with Edit-GRPO (the VIVA editor and its RL post-training).")
    return "\n\n".join(parts) + "\n"


def card_files(card: str, cfg: Any) -> dict[str, str]:
    """The text files every result folder gets: the card and the resolved, redacted recipe (the run's config.yaml)."""
    from .recipe import resolved_yaml

    return {CARD: card, TRAINING_CONFIG: resolved_yaml(cfg)}


def write_files(folder: str | os.PathLike, files: dict[str, str]) -> None:
    """Write ``files`` into ``folder``, each atomically."""
    from .recipe import atomic_write_text

    for name, text in files.items():
        atomic_write_text(Path(folder) / name, text)


def _wall_clock(seconds: float, resumed_at: int, unit: str) -> tuple[str, str]:
    if resumed_at:
        return f"wall-clock since the resume at {unit} {resumed_at}", duration(seconds)
    return "wall-clock", duration(seconds)


SUMMARIES = {
    "VivaEditor": "An instruction-based video editor in the VIVA design: a frozen LLaVA *instructor* reads the "
                  "instruction and the source video's first frame; a HunyuanVideo diffusion transformer denoises the "
                  "edited video from its noisy latent concatenated with the source latent (a widened patch "
                  "embedding).",
    "LucyEditor": "An instruction-based video editor on the Lucy-Edit design (a Wan 2.2 diffusion transformer that "
                  "reads the source latent next to the noisy one, and a T5 text encoder).",
}


def editor_usage(name: str, editor_class: str) -> str:
    """The card's "Use" section for an editor folder or repo ``name``."""
    return f"""An editor folder; load it by this repo's id or a local path.

```bash
python -m viva_base.edit --model {name} --video in.mp4 --instruction "make the car red" --out out.mp4 \\
    --num-steps 50 --guidance-scale 2.0 --seed 0
```

```python
from viva_base.pipeline import EditPipeline
from viva_base.training import load_editor

editor = load_editor("{name}")   # a {editor_class}
EditPipeline(editor).edit_file("in.mp4", "make the car red", "out.mp4", num_inference_steps=50, seed=0)
```"""


def sft_card(cfg, *, name: str, title: str, steps: int, loss: float, seconds: float, processes: int, pairs: int,
             editor_class: str = "VivaEditor", resumed_at: int = 0, validation: list[dict] | None = None) -> str:
    """The card of an SFT run's ``final/`` (an editor folder): ``cfg`` is the run's ``SFTConfig``; ``validation``:
    the run's validation summaries by step (``viva_base.validation.history``), whose first and last held-out loss
    the card shows."""
    tc, mc = cfg.train, cfg.model
    lora = (f", LoRA r{cfg.lora.rank} / alpha {cfg.lora.alpha} (merged into the weights)"
            if tc.trainable == "lora" else "")
    trained = {"full": "the whole DiT", "lora": "a LoRA on the DiT's attention", "projector_refiner":
               "the projector and the token refiner"}.get(tc.trainable, tc.trainable) + lora
    usage = editor_usage(name, editor_class)
    schedule = f"{tc.lr_scheduler}" + (f", {tc.warmup_steps} warmup steps" if tc.warmup_steps else "")
    training = [
        ("started from", started_from(mc)),
        ("data", f"`{cfg.data.manifest}`, {pairs} pairs" if cfg.data.manifest else f"toy-world pairs ({pairs})"),
        ("objective", "masked flow matching (VIVA eq. 3), mask weight "
                      f"{_number(tc.w_m)}, CFG dropout {_number(tc.cfg_dropout)}"),
        ("trained", trained),
        ("steps", f"{steps} x global batch {tc.batch_size} on {processes} process{'es' if processes > 1 else ''}"),
        ("optimizer", f"AdamW, lr {_number(tc.learning_rate)} ({schedule}), weight decay {_number(tc.weight_decay)}, "
                      f"gradient clipping {_number(tc.max_grad_norm)}"),
        ("EMA", f"decay {_number(tc.ema_decay)} (these are the averaged weights)" if tc.ema_decay else None),
        ("precision", f"frozen weights {mc.dtype}, trained weights float32, autocast {tc.mixed_precision}"),
        ("seed", tc.seed),
        ("last loss", _number(loss) if math.isfinite(loss) else None),
        ("held-out loss", _validation_row(cfg.validation, validation) if validation else None),
        _wall_clock(seconds, resumed_at, "step"),
    ]
    return render_card(
        title=f"{title}: a video editor (SFT)",
        summary=SUMMARIES.get(editor_class, f"An instruction-based video editor ({editor_class}).")
        + " This folder is the editor after masked flow-matching SFT on paired edits.",
        usage=usage, training=training, base_model=hub_ids(mc.pretrained, mc.t2v_base, mc.instructor),
        tags=["sft", *(["viva", "hunyuan-video"] if editor_class == "VivaEditor" else [])], license=cfg.hub.license)


def _validation_row(vc, summaries: list[dict]) -> str:
    first, last = summaries[0], summaries[-1]
    levels = ", ".join(_number(x) for x in first["sigmas"])
    return (f"{_number(first['loss'])} at step {first['step']} -> {_number(last['loss'])} at step {last['step']} "
            f"(eq. 3 at noise levels {levels}, {last['pairs']} pairs of `{vc.manifest}`)")


def eval_results(eval_dir: str | os.PathLike, report: dict | None = None) -> str:
    """The card's evaluation section from a run's ``eval/step-<n>/summary.json`` files (the first and the last
    step: before and after Edit-GRPO) and, for the toy chain, ``report.json``'s oracle delta."""
    import json

    eval_dir = Path(eval_dir)
    steps = sorted((int(p.name.split("-", 1)[1]), p) for p in eval_dir.glob("step-*")
                   if (p / "summary.json").exists() and p.name.split("-", 1)[1].isdigit())
    if not steps:
        return ""
    first, last = (json.loads((p / "summary.json").read_text()) for p in (steps[0][1], steps[-1][1]))
    a, b = first["groups"]["all"], last["groups"]["all"]
    keys = [k for k in ("oracle", "if_error", "sp_error", "if_progress") if k in b]
    keys += sorted(k for k in b if k == "reward" or k.startswith("reward/"))
    sampler = last.get("sampler", {})
    lines = [f"Held-out prompts: {b.get('n', '?')}, noise seeds {last.get('seeds')}; sampler: "
             + ", ".join(f"{k} {v}" for k, v in sampler.items() if v is not None) + ".", ""]
    if len(steps) > 1:
        lines += [f"| metric | step {steps[0][0]} (start) | step {steps[-1][0]} |", "|---|---|---|"]
        lines += [f"| {k} | {_number(a.get(k, float('nan')))} | {_number(b[k])} |" for k in keys]
    else:
        lines += [f"| metric | step {steps[-1][0]} |", "|---|---|"]
        lines += [f"| {k} | {_number(b[k])} |" for k in keys]
    if report and "delta_oracle" in report:
        d = report["delta_oracle"]
        lines += ["", f"Toy-world oracle (the score of each edit against its true target): "
                      f"{_number(report['sft']['oracle'])} "
                      f"-> {_number(report['grpo']['oracle'])}, delta {d['mean']:+.4f} "
                      f"(95% CI [{d['ci95'][0]:+.4f}, {d['ci95'][1]:+.4f}])."]
    return "\n".join(lines)


def lora_card(cfg, *, name: str, title: str, iterations: int, seconds: float, processes: int, last_row: dict | None,
              results: str = "", resumed_at: int = 0) -> str:
    """The card of an Edit-GRPO run's ``lora/``: ``cfg`` is the run's ``GRPOConfig`` (``model.pretrained`` is
    the editor the adapter belongs to)."""
    tc, sc, mc, ec = cfg.train, cfg.sampling, cfg.model, cfg.eval
    base = mc.pretrained or "EDITOR"
    sampler = f"--num-steps {ec.num_steps} --guidance-scale {_number(ec.guidance_scale)}"
    kwargs = f"num_inference_steps={ec.num_steps}, guidance_scale={float(ec.guidance_scale)!r}"
    if ec.guidance_interval:
        sampler += f" --guidance-interval {' '.join(_number(x) for x in ec.guidance_interval)}"
        kwargs += f", guidance_interval={tuple(float(x) for x in ec.guidance_interval)!r}"
    if ec.shift:
        sampler += f" --shift {_number(ec.shift)}"
        kwargs += f", shift={float(ec.shift)!r}"
    usage = f"""A LoRA on the DiT of the editor `{base}`, in two formats: diffusers
(`pytorch_lora_weights.safetensors`, keys `transformer.*`: `transformer.load_lora_adapter(folder, prefix="transformer")`
or a pipeline's `load_lora_weights`) and peft (`adapter_config.json` + `adapter_model.safetensors`).

```bash
python -m viva_base.edit --model {base} --lora {name} --video in.mp4 --instruction "make the car red" \\
    --out out.mp4 {sampler} --seed 0
```

```python
from viva_base.peft_utils import load_lora
from viva_base.pipeline import EditPipeline
from viva_base.training import load_editor

editor = load_editor("{base}")
load_lora(editor.transformer, "{name}")
EditPipeline(editor).edit_file("in.mp4", "make the car red", "out.mp4", {kwargs}, seed=0)
```"""
    rewards = ", ".join(f"{k} x {_number(float(v.get('weight', 1.0)))}" for k, v in dict(cfg.rewards).items()
                        if float(v.get("weight", 1.0)) != 0)
    algorithm = {"grpo": "Edit-GRPO: clipped-ratio policy gradient on Flow-SDE log-probs with a KL to the SFT editor",
                 "nft": "DiffusionNFT (forward-process, implicit positive/negative policies)",
                 "awm": "advantage-weighted flow matching"}.get(tc.algorithm, tc.algorithm)
    window = f", SDE on a window of {sc.sde_window_size} steps" if sc.sde_window_size else ""
    training = [
        ("adapter of", f"`{base}`" if mc.pretrained else started_from(mc)),
        ("prompts", f"`{cfg.data.manifest}`" if cfg.data.manifest else
                    ("toy-world compound instructions" if cfg.toy.enabled else "toy-world prompts")),
        ("algorithm", algorithm),
        ("rewards", rewards),
        ("rollouts", f"{sc.method}, {sc.num_steps} steps, eta {_number(sc.eta)}{window}, CFG "
                     f"{_number(sc.guidance_scale)}; {tc.prompts_per_iteration} prompts x G={tc.num_generations} "
                     "per iteration"),
        ("iterations", f"{iterations} on {processes} process{'es' if processes > 1 else ''}"),
        ("LoRA", f"r{cfg.lora.rank} / alpha {cfg.lora.alpha}, {cfg.lora.init} init"),
        ("optimizer", f"AdamW, lr {_number(tc.learning_rate)} ({tc.lr_scheduler}), clip epsilon "
                      f"{_number(tc.epsilon)}, KL beta {_number(tc.beta)} ({tc.kl_type})"),
        ("seed", tc.seed),
        ("last iteration's reward", _number(last_row["reward"]) if last_row and "reward" in last_row else None),
        _wall_clock(seconds, resumed_at, "iteration"),
    ]
    return render_card(
        title=f"{title}: a LoRA for a video editor (Edit-GRPO)",
        summary="A LoRA adapter for the diffusion transformer of an instruction-based video editor, post-trained "
                f"with reinforcement learning from reward models ({algorithm}).",
        usage=usage, training=training, results=results, base_model=hub_ids(mc.pretrained),
        tags=["lora", "peft", "diffusers", tc.algorithm], license=cfg.hub.license)


class PushToHubMixin:
    """``editor.push_to_hub("you/name")``: the editor written by ``save_pretrained`` with a model card, uploaded
    (diffusers' ``push_to_hub`` convention). Checks as the recipes' ``hub`` block does (offline mode, token, repo
    id), creates the repo, then uploads from a temporary folder; returns the commit's url."""

    def push_to_hub(self, repo_id: str, *, private: bool = True, revision: str | None = None,
                    license: str | None = None, commit_message: str | None = None) -> str:
        import tempfile

        from huggingface_hub.utils import HFValidationError, validate_repo_id

        try:
            validate_repo_id(repo_id)
        except HFValidationError as exc:
            raise UserError(f"push_to_hub({repo_id!r}): not a valid hub repo id ({_first_line(exc)}); give "
                            "owner/name") from None
        hub = HubConfig(push_to_hub=True, repo_id=repo_id, private=private, revision=revision, license=license)
        repo_id = check_hub(hub, repo_id)
        name = type(self).__name__
        card = render_card(title=f"{repo_id}: a video editor", summary=SUMMARIES.get(name, f"A video editor ({name})."),
                           usage=editor_usage(repo_id, name), training=None, license=license,
                           tags=["viva", "hunyuan-video"] if name == "VivaEditor" else [])
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / "editor"
            self.save_pretrained(folder, files={CARD: card})
            return push_folder(hub, repo_id, folder, "editor", commit_message=commit_message, kept=False)
