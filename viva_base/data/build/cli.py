"""``python -m viva_base.data.build``: the paired-data pipeline as a resumable, sharded recipe.

    python -m viva_base.data.build recipe=recipes/data_build.yaml inputs=data/videos output_dir=data/pairs
    python -m viva_base.data.build recipe=recipes/data_build.yaml --shard 3/8      # machine 3 of 8
    accelerate launch --num_processes 4 -m viva_base.data.build recipe=...        # 4 GPUs, one shard each

For every input record of this shard that is not finished yet: cut and resize the clip, run the
generating stages (``stages``), then the filter stage, and write ``record.json`` last. A failing record
(an unreadable video, a VLM that never answered, any error) is written as ``{"status": "failed",
"reason": ...}`` and the run goes on. When its shard is done, each process rebuilds the manifests from every
finished record in ``output_dir`` (``pairs.jsonl``, ``failed.jsonl``, ``summary.json``; no barrier: the last shard
to finish writes the complete manifest). See docs/data_pipeline.md.
"""
from __future__ import annotations

import logging
import shutil
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from omegaconf import OmegaConf
from tqdm.auto import tqdm

from ...errors import UserError
from ...recipe import run_cli, save_resolved
from ...training import DTYPES, ModelConfig, process_state
from ...video import write_video
from .models import DATA_PROMPT_VERSION, masked_source, paste_back
from .records import RecordStore, combine_shards, fingerprint, in_shard, list_inputs, parse_shard, write_outputs
from .stages import GENERATING_STAGES, Work, filter_stage, load_clip
from .text import Language

logger = logging.getLogger("viva_base.data.build")


# ---------------------------------------------------------------------------------------------- schema
@dataclass
class ClipConfig:
    frames: int = 33                      # frames of the working clip (r k + 1 for the editor's VAE)
    size: list[int] = field(default_factory=lambda: [480, 848])   # [H, W]: scaled to cover, centre-cropped (the VIVA recipes' size)
    frame_step: int = 1                   # take every k-th frame of the input


@dataclass
class DetectorConfig:
    model: str = "IDEA-Research/grounding-dino-tiny"   # a folder, a hub id, or "tiny" (random, offline)
    box_threshold: float = 0.35           # Grounding DINO box score threshold
    text_threshold: float = 0.25          # Grounding DINO phrase score threshold
    dtype: str = "float32"                # float32 | bf16 | fp16


@dataclass
class TrackerConfig:
    model: str = "facebook/sam2.1-hiera-tiny"          # a folder, a hub id, or "tiny"
    mask_threshold: float = 0.0           # on SAM 2's mask logits
    dilate: int = 4                       # pixels added around the tracked mask before inpainting
    min_area: float = 0.005               # keep an object whose mask covers this much of the frame (mean) ...
    max_area: float = 0.6                 # ... and at most this much
    dtype: str = "float32"                # float32 | bf16 | fp16


@dataclass
class GeneratorConfig:
    model: ModelConfig = field(default_factory=ModelConfig)   # the editor (pretrained / t2v_base / tiny)
    num_inference_steps: int = 30         # denoising steps of each synthesised clip
    guidance_scale: float = 5.0           # CFG against the negative prompt (1.0: none)
    fill: float = 0.5                     # grey that replaces the masked region in the condition video
    paste_back: bool = True               # outside the mask, the synthesised clip is the real one exactly
    negative_prompt: str = "blurry, distorted, low quality"   # added to every stage's own negative


@dataclass
class ChatConfig:
    """An OpenAI-compatible chat endpoint; ``base_url: null`` -> the rule-based fallback."""

    base_url: Optional[str] = None        # e.g. http://127.0.0.1:8000/v1 (vLLM) or https://api.openai.com/v1
    model: str = "gpt-4o-mini"            # the served model name
    api_key_env: Optional[str] = "OPENAI_API_KEY"   # the NAME of the environment variable holding the key
    timeout: float = 60.0                 # seconds per request
    max_retries: int = 3                  # retries of a failed request (exponential backoff)
    concurrency: int = 4                  # requests in flight
    max_tokens: int = 400                 # answer length limit
    json_mode: bool = False               # ask for response_format json_object (servers that support it)
    max_image_side: int = 512             # frames sent are downscaled to this long side
    cache: bool = True                    # answers cached under output_dir/cache/<name>


@dataclass
class ReplaceConfig:
    max_objects: int = 3                  # main objects taken from a caption


@dataclass
class AddRemoveConfig:
    mask: str = "random"                  # random (moving ellipse) | object (the replace stage's tracked mask)
    min_area: float = 0.05                # the random mask covers at least this fraction of the frame ...
    max_area: float = 0.25                # ... and at most this much
    max_shift: float = 0.2                # the random mask's centre moves up to this fraction of a side


@dataclass
class GlobalEditConfig:
    edits: list[str] = field(default_factory=lambda: ["night", "sunset", "winter", "autumn", "rain", "fog"])  # styles drawn
    canny_sigma: float = 2.0              # Gaussian sigma of the Canny edges that keep the layout
    canny_low: Optional[float] = None     # skimage.feature.canny thresholds (None: its defaults)
    canny_high: Optional[float] = None    # (upper threshold)


@dataclass
class FilterConfig:
    num_frames: int = 4                   # frames of each clip shown to the VLM
    bidirectional: list[str] = field(default_factory=lambda: ["remove"])   # clean kinds also read backwards
    min_change: float = 0.005             # drop a candidate whose synthesised clip barely differs


@dataclass
class BuildConfig:
    output_dir: str = "outputs/data_build"   # records, pairs.jsonl, failed.jsonl and the clips
    inputs: Optional[str] = None          # a folder of videos (+ <stem>.txt captions) or a JSONL manifest
    shard: Optional[str] = None           # "i/n": this machine's share (combined with accelerate's processes)
    seed: int = 0                         # seeds every random choice (same seed and inputs, same pairs)
    stages: list[str] = field(default_factory=lambda: ["replace", "add_remove", "global_edit"])  # generating stages run
    video_ext: str = ".mp4"               # clips; masks are lossless .mkv
    retry_failed: bool = False            # redo records that failed (e.g. after the VLM server is back)
    manifest_only: bool = False           # only rebuild pairs.jsonl / failed.jsonl from finished records
    device: Optional[str] = None          # None: accelerate's device for this process
    clip: ClipConfig = field(default_factory=ClipConfig)
    detector: DetectorConfig = field(default_factory=DetectorConfig)
    tracker: TrackerConfig = field(default_factory=TrackerConfig)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    language: ChatConfig = field(default_factory=ChatConfig)   # objects + caption rewriting (LLM or rules)
    vlm: ChatConfig = field(default_factory=ChatConfig)        # filter labels + instructions (VLM or none)
    replace: ReplaceConfig = field(default_factory=ReplaceConfig)
    add_remove: AddRemoveConfig = field(default_factory=AddRemoveConfig)
    global_edit: GlobalEditConfig = field(default_factory=GlobalEditConfig)
    filter: FilterConfig = field(default_factory=FilterConfig)


def _plain(node) -> Any:
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else (
        asdict(node) if hasattr(node, "__dataclass_fields__") else node)


def stage_fingerprints(cfg: BuildConfig) -> dict[str, str]:
    """The fingerprint of each stage's result: a hash of exactly the settings it depends on.

    Run-level settings (output folder, shard, retries, endpoints' timeouts) are left out, so changing
    them never invalidates finished work; changing a stage's settings recomputes that stage and the
    filter, nothing else."""
    gen = _plain(cfg.generator)
    chat = lambda c: {"on": bool(c.base_url), "model": c.model if c.base_url else None,  # noqa: E731
                      "version": DATA_PROMPT_VERSION}
    common = {"clip": _plain(cfg.clip), "seed": cfg.seed, "video_ext": cfg.video_ext, "generator": gen,
              "language": chat(cfg.language)}
    perception = {"detector": _plain(cfg.detector), "tracker": _plain(cfg.tracker), "replace": _plain(cfg.replace)}
    fps = {
        "replace": fingerprint({**common, **perception}),
        "add_remove": fingerprint({**common, "add_remove": _plain(cfg.add_remove), "replace": _plain(cfg.replace),
                                   **(perception if cfg.add_remove.mask == "object" else {})}),
        "global_edit": fingerprint({**common, "global_edit": _plain(cfg.global_edit)}),
    }
    stages = list(cfg.stages)
    fps["filter"] = fingerprint({"stages": {s: fps[s] for s in stages}, "filter": _plain(cfg.filter),
                                 "vlm": chat(cfg.vlm)})
    fps["record"] = fingerprint({"stages": stages, "filter": fps["filter"]})
    return fps


def validate(cfg: BuildConfig) -> None:
    """Check the recipe before any work (one-line errors naming the key)."""
    parse_shard(cfg.shard)
    unknown = [s for s in cfg.stages if s not in GENERATING_STAGES]
    if unknown:
        raise UserError(f"stages: unknown {unknown}; choose from {', '.join(GENERATING_STAGES)} (the filter always runs)")
    if len(set(cfg.stages)) != len(cfg.stages):
        raise UserError(f"stages: {list(cfg.stages)} names a stage twice")
    if cfg.add_remove.mask == "object" and "replace" in cfg.stages and \
            list(cfg.stages).index("replace") > list(cfg.stages).index("add_remove"):
        raise UserError("add_remove.mask=object uses the replace stage's mask: put replace before add_remove in stages")
    if len(cfg.clip.size) != 2 or min(cfg.clip.size) < 1 or cfg.clip.frames < 1 or cfg.clip.frame_step < 1:
        raise UserError(f"clip: need size [H, W] and positive frames/frame_step, got {_plain(cfg.clip)}")
    a = cfg.add_remove
    if a.mask not in ("random", "object"):
        raise UserError(f"add_remove.mask={a.mask!r}: use random or object")
    if not 0 < a.min_area <= a.max_area < 1 or a.max_shift < 0:
        raise UserError(f"add_remove: need 0 < min_area <= max_area < 1 and max_shift >= 0, got {_plain(a)}")
    from .text import GLOBAL_EDITS

    bad = [e for e in cfg.global_edit.edits if e not in GLOBAL_EDITS]
    if bad or not cfg.global_edit.edits:
        raise UserError(f"global_edit.edits: unknown {bad or 'empty list'}; choose from {', '.join(GLOBAL_EDITS)}")
    if not cfg.video_ext.startswith("."):
        raise UserError(f"video_ext={cfg.video_ext!r}: give an extension such as .mp4")
    for name in ("detector", "tracker"):
        if getattr(cfg, name).dtype not in DTYPES:
            raise UserError(f"{name}.dtype={getattr(cfg, name).dtype!r}: use one of {', '.join(sorted(DTYPES))}")
    check_stage_values(cfg)
    from ...recipe import check_output_dir

    check_output_dir("output_dir", cfg.output_dir)


def check_stage_values(cfg: BuildConfig) -> None:
    """The numbers of the models and stages, each a one-line UserError naming its key: a value out of range stopped
    the run (or the record, silently, for every input) only once Grounding DINO, SAM 2 and the editor were loaded."""
    from ...recipe import check_fraction
    from ...recipe import check_positive as positive

    check_fraction("detector.box_threshold", cfg.detector.box_threshold, "a fraction")
    check_fraction("detector.text_threshold", cfg.detector.text_threshold, "a fraction")
    t = cfg.tracker
    positive("tracker.dilate", t.dilate, strict=False)
    if not 0 <= t.min_area <= t.max_area <= 1:
        raise UserError(f"tracker: need 0 <= min_area <= max_area <= 1 (fractions of the frame), got min_area="
                        f"{t.min_area}, max_area={t.max_area}")
    g = cfg.generator  # (its model: main checks it after the inputs, before any work)
    positive("generator.model.shift", g.model.shift)
    positive("generator.num_inference_steps", g.num_inference_steps)
    positive("generator.guidance_scale", g.guidance_scale)
    check_fraction("generator.fill", g.fill, "a fraction")
    for name in ("language", "vlm"):
        c = getattr(cfg, name)
        for key in ("timeout", "concurrency", "max_tokens", "max_image_side"):
            positive(f"{name}.{key}", getattr(c, key))
        positive(f"{name}.max_retries", c.max_retries, strict=False)
    positive("replace.max_objects", cfg.replace.max_objects)
    ge = cfg.global_edit
    positive("global_edit.canny_sigma", ge.canny_sigma)
    positive("global_edit.canny_low", ge.canny_low, strict=False)
    positive("global_edit.canny_high", ge.canny_high, strict=False)
    if ge.canny_low is not None and ge.canny_high is not None and ge.canny_low > ge.canny_high:
        raise UserError(f"global_edit: canny_low={ge.canny_low} is above canny_high={ge.canny_high}")
    positive("filter.num_frames", cfg.filter.num_frames)
    positive("filter.min_change", cfg.filter.min_change, strict=False)


# ---------------------------------------------------------------------------------------------- context
class SetupError(UserError):
    """A model of the recipe cannot be built: the run stops (a per-input problem only fails its record)."""


class Context:
    """What the stages use: the config and the models, each built on first use (a rerun with nothing
    left to do loads none)."""

    def __init__(self, cfg: BuildConfig, device: torch.device):
        self.cfg = cfg
        self.device = device
        self.out = Path(cfg.output_dir)
        self._models: dict[str, Any] = {}
        self.language = Language(self._chat("language", cfg.language))
        self.vlm = self._chat("vlm", cfg.vlm)
        self.counts = {"generate": 0}

    def _chat(self, name: str, c: ChatConfig):
        if not c.base_url:
            return None
        from .models import ChatClient

        return ChatClient(c.base_url, c.model, api_key_env=c.api_key_env, timeout=c.timeout, max_retries=c.max_retries,
                          concurrency=c.concurrency, max_tokens=c.max_tokens, json_mode=c.json_mode,
                          max_image_side=c.max_image_side, cache_dir=str(self.out / "cache" / name) if c.cache else None)

    def _model(self, key: str, build):
        if key not in self._models:
            t = time.time()
            try:
                self._models[key] = build()
            except Exception as exc:  # noqa: BLE001 - a model that cannot be built stops the run
                raise SetupError(f"{key}: {exc}") from exc
            logger.info("loaded %s in %.1f s", key, time.time() - t)
        return self._models[key]

    @property
    def detector(self):
        from .models import GroundingDetector

        c = self.cfg.detector
        return self._model("detector", lambda: GroundingDetector.load(
            c.model, device=self.device, dtype=DTYPES[c.dtype], seed=self.cfg.seed,
            box_threshold=c.box_threshold, text_threshold=c.text_threshold))

    @property
    def tracker(self):
        from .models import Sam2Tracker

        c = self.cfg.tracker
        return self._model("tracker", lambda: Sam2Tracker.load(c.model, device=self.device, dtype=DTYPES[c.dtype],
                                                               seed=self.cfg.seed, mask_threshold=c.mask_threshold))

    @property
    def editor(self):
        from ...training import build_editor
        from .models import check_clip_for_editor

        def build():
            editor = build_editor(self.cfg.generator.model, device=self.device, key="generator.model")
            check_clip_for_editor(editor, self.cfg.clip.frames, *self.cfg.clip.size)
            return editor

        return self._model("editor", build)

    def generate(self, video: torch.Tensor, mask: torch.Tensor | None, caption: str, *, negative: str, seed: int) -> torch.Tensor:
        """Inpaint ``video`` inside ``mask`` (or, with no mask, generate from ``video`` as structure) with the
        caption; the stage's negative prompt is joined with ``generator.negative_prompt``."""
        from .models import synthesize

        g = self.cfg.generator
        cond = masked_source(video, mask[:, None], g.fill) if mask is not None else video
        neg = ", ".join(t for t in (negative, g.negative_prompt) if t)
        out = synthesize(self.editor, cond, caption, neg, num_inference_steps=g.num_inference_steps,
                         guidance_scale=g.guidance_scale, seed=seed)
        self.counts["generate"] += 1
        return paste_back(out, video, mask[:, None]) if (mask is not None and g.paste_back) else out


# ---------------------------------------------------------------------------------------------- running
def build_record(ctx: Context, store: RecordStore, item, fps: dict[str, str]) -> dict:
    """Run (or resume) every stage of one record and return its ``record.json`` content (not yet written)."""
    cfg = ctx.cfg
    t0 = time.time()
    folder = store.folder(item.id)
    folder.mkdir(parents=True, exist_ok=True)
    base = {"id": item.id, "input": item.video, "caption": item.caption, "fingerprint": fps["record"]}
    if not item.caption:
        return {**base, "status": "failed", "reason": f"no caption (write one in {Path(item.video).with_suffix('.txt').name} "
                                                        "or the manifest's 'caption')"}
    for leftover in folder.glob(".*"):  # temporary files of a killed run
        leftover.unlink() if leftover.is_file() else shutil.rmtree(leftover, ignore_errors=True)
    clip, fps_in = load_clip(item.video, cfg.clip.frames, tuple(cfg.clip.size), cfg.clip.frame_step)
    real = write_video(folder / f"real{cfg.video_ext}", clip, fps=fps_in)  # same frames, same bytes
    work = Work(item=item, folder=folder, clip=clip, fps=fps_in, real=real)
    stages = [(s, GENERATING_STAGES[s]) for s in cfg.stages] + [("filter", filter_stage)]
    for name, fn in stages:
        cached = store.load_stage(item.id, name, fps[name])
        if cached is None:
            shutil.rmtree(folder / name, ignore_errors=True)   # a stale or half-written stage starts clean
            result = fn(ctx, work)
            result["fingerprint"] = fps[name]
            store.save_stage(item.id, name, result)
        else:
            result = cached
        work.results[name] = result
    summary = {n: {k: v for k, v in r.items() if k not in ("fingerprint", "pairs")} for n, r in work.results.items()}
    return {**base, "status": "done", "clip": list(clip.shape[:1]) + list(clip.shape[-2:]), "fps": fps_in,
            "stages": summary, "pairs": work.results["filter"]["pairs"], "seconds": round(time.time() - t0, 2)}


def main(cfg: BuildConfig) -> dict:
    """Build this shard's records, then rebuild the manifests; returns the counts of this run."""
    validate(cfg)
    out = Path(cfg.output_dir)
    fps = stage_fingerprints(cfg)
    if cfg.manifest_only:
        if not (out / "records").is_dir():
            raise UserError(f"manifest_only=true: {out} holds no records (records/) to rebuild pairs.jsonl from; "
                            "set output_dir to a build's folder, or build first (manifest_only=false)")
        counts = rebuild_manifests(out, fps["record"])
        print(f"manifest rebuilt: {counts['pairs']} pairs from {counts['records_done']} records "
              f"({counts['records_failed']} failed) in {out / 'pairs.jsonl'}")
        return counts
    if not cfg.inputs:
        raise UserError("inputs is not set: inputs=<folder of videos with .txt captions | JSONL manifest>")
    inputs = list_inputs(cfg.inputs)
    if cfg.stages:  # every generating stage synthesises with our editor: say so before any work
        from ...training import check_model_config

        check_model_config(cfg.generator.model, "generator.model")
    out.mkdir(parents=True, exist_ok=True)  # (after the checks: a refused command leaves no folder behind)
    state = process_state()  # on CPUs under torchrun too (gloo)
    index, count = combine_shards(parse_shard(cfg.shard), (state.process_index, state.num_processes))
    if state.is_main_process:
        save_resolved(cfg, out)
    items = [it for it in inputs if in_shard(it.id, index, count)]
    store = RecordStore(out)
    todo = [it for it in items if not store.is_finished(it.id, fps["record"], retry_failed=cfg.retry_failed)]
    logger.info("shard %d/%d: %d records, %d finished, %d to build", index, count, len(items), len(items) - len(todo), len(todo))
    device = torch.device(cfg.device) if cfg.device else state.device
    ctx = Context(cfg, device)
    run = {"shard": f"{index}/{count}", "records": len(items), "skipped": len(items) - len(todo), "built": 0, "failed": 0}
    for item in tqdm(todo, desc=f"build {index}/{count}", disable=not state.is_local_main_process):
        try:
            record = build_record(ctx, store, item, fps)
        except (KeyboardInterrupt, SystemExit):
            raise
        except SetupError:
            raise
        except UserError as exc:  # a problem of this input (unreadable video, too short): no traceback
            record = _failed(item, fps, exc)
        except Exception as exc:  # noqa: BLE001 - one bad record must not stop a dataset build
            logger.error("record %s failed:\n%s", item.id, traceback.format_exc())
            record = _failed(item, fps, exc)
        store.finish(item.id, record)
        run["built" if record["status"] == "done" else "failed"] += 1
        if record["status"] == "failed":
            logger.warning("record %s failed: %s", item.id, record["reason"])
    # No barrier: shards finish hours apart on real data, and a process waiting in one for more than the process
    # group's timeout (NCCL: 10 minutes) would stop the launch. Each process rebuilds the manifests from every finished
    # record when its own shard is done, one at a time, so the last one to finish writes the complete manifest.
    counts = rebuild_manifests(out, fps["record"])
    run.update(counts)
    print(f"data build {run['shard']}: {run['built']} built, {run['failed']} failed, {run['skipped']} already "
          f"finished; {counts['pairs']} pairs from every shard finished so far in {out / 'pairs.jsonl'}")
    return run


def rebuild_manifests(out: Path, fingerprint_now: str) -> dict:
    """:func:`write_outputs` under an exclusive file lock (``out/manifest.lock``; ``filelock``), so that shards
    finishing together never interleave their writes and the last to take it sees every record finished before."""
    from filelock import FileLock

    with FileLock(str(out / "manifest.lock")):
        return write_outputs(out, fingerprint_now=fingerprint_now)


def _failed(item, fps: dict[str, str], exc: Exception) -> dict:
    reason = f"{exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".strip()
    return {"id": item.id, "input": item.video, "caption": item.caption, "fingerprint": fps["record"],
            "status": "failed", "reason": reason[:500]}


def normalize_argv(argv: Sequence[str]) -> list[str]:
    """``--shard 3/8`` (two words) -> ``shard=3/8``; every other argument is left as it is."""
    out, it = [], iter(argv)
    for arg in it:
        if arg in ("--shard", "-shard"):
            value = next(it, None)
            if value is None:
                raise UserError("--shard needs a value i/n (e.g. --shard 0/4)")
            out.append(f"shard={value}")
        else:
            out.append(arg)
    return out


def cli(argv: Sequence[str] | None = None) -> int:
    import sys

    try:
        argv = normalize_argv(sys.argv[1:] if argv is None else argv)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return run_cli(main, BuildConfig, argv, interrupted=lambda cfg: (
        f"every finished record is kept in {cfg.output_dir}: run the same command again to build the rest"))
