"""A web demo: edit a video in the browser, and compare the SFT editor with its Edit-GRPO LoRA(s) side by side.

::

    pip install -e ".[app]"
    python -m viva_base.app --model outputs/toy/sft/final --lora outputs/toy/lora   # http://127.0.0.1:7860

The page takes a video upload (anything :mod:`viva_base.edit` reads: mp4, webm, mov, mkv, gif, or an image)
or one of a few bundled toy-world examples, the instruction, an optional reference image, the number of
steps, the guidance scale, the seed, the sampler (schedule shift and CFG interval, as the edit command's
``--shift`` / ``--guidance-interval``; ``--shift 6 --guidance-interval 0.5 1`` is the toy recipe's evaluation
sampler), and which variants to run: the editor alone ("SFT editor") and the
editor with each ``--lora``. Every variant edits the same clip with the same seed (the same initial noise), so
the panes differ only by the adapter. It shows the edited clips next to the source, the time each took, a
download of each edit at the input's frame count, size and fps, and a progress bar while sampling. A toy
example carries its true target and edit mask, so the page also shows the target and each edit's oracle score
(:mod:`viva_base.data.toyworld.oracle`; the row "source unchanged" is the score of not editing at all).

The edit runs through :class:`viva_base.pipeline.EditPipeline` with the checks of the edit command
(:func:`viva_base.edit.check_request`): a bad input shows the command's one-line message in the page, never a
traceback. Uploads are limited in size (``--max-upload-mb``), clips in length and side (``--max-input-frames``,
``--max-input-side``), and edits run one at a time (a queue; ``--queue-size`` waiting jobs at most). The server
listens on 127.0.0.1 only unless ``--host`` says otherwise (``--host 0.0.0.0`` serves the network: the demo has
no authentication).

The LoRAs are loaded once, as named adapters of the same DiT (no second model copy); a variant switches the
active adapter (``set_adapters``) or disables them all for the SFT editor. Gradio is an optional dependency
(the ``app`` extra); the rest of this module (:class:`EditDemo`) runs without it.
"""
from __future__ import annotations

import argparse
import html
import logging
import math
import os
import re
import shutil
import signal
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .edit import add_runtime_arguments, check_request, explain, guarded, load_model, resolve_device
from .errors import UserError
from .guidance import add_sampler_arguments, check_sampler_options, checked_sampler_arguments
from .pipeline import ClipInfo, EditPipeline, map_back, parse_size, probe_clip, resize_frames
from .video import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, read_video, write_video

logger = logging.getLogger("viva_base.app")

BASE_LABEL = "SFT editor"
DEMO_SEED = 2026            # toy examples are drawn with this seed, not the toy chain's training seed (0)
TOY_FRAMES, TOY_SIZE, TOY_FPS = 9, 32, 8.0   # the toy world's geometry (recipes/toy.yaml)
DISPLAY_MIN_SIDE, DISPLAY_MAX_SIDE = 256, 512
KEEP_JOBS = 8               # job folders kept on disk (older ones are deleted)


# ------------------------------------------------------------------------------------------ toy examples
@dataclass(frozen=True)
class ToyDemoExample:
    """A bundled example: a toy-world source clip with its instruction, true target and edit mask."""

    label: str
    instruction: str
    edit_type: str
    source: torch.Tensor   # (F, 3, H, W) in [0, 1]
    target: torch.Tensor   # (F, 3, H, W)
    mask: torch.Tensor     # (F, 1, H, W) in {0, 1}
    fps: float = TOY_FPS


def toy_examples(seed: int = DEMO_SEED) -> list[ToyDemoExample]:
    """One simple example per toy edit type, rendered in memory (exact pixels; no file, no codec)."""
    from .data.toyworld import EDIT_TYPES, example_rng, sample_example

    out = []
    for i, kind in enumerate(EDIT_TYPES):
        ex = sample_example(example_rng(seed, "fresh", i), [kind], num_frames=TOY_FRAMES, height=TOY_SIZE,
                            width=TOY_SIZE)
        r = ex.render()
        out.append(ToyDemoExample(f"{kind}: {ex.instruction}", ex.instruction, kind, r["source"], r["target"],
                                  r["mask"]))
    return out


# ------------------------------------------------------------------------------------------ display copies
def display_frames(frames: torch.Tensor) -> torch.Tensor:
    """Frames a browser shows well: tiny clips enlarged by an integer factor (nearest: the pixels stay sharp),
    large ones shrunk to ``DISPLAY_MAX_SIDE``, and even sides (H.264 4:2:0, which every browser plays)."""
    h, w = frames.shape[-2:]
    side = max(h, w)
    if side < DISPLAY_MIN_SIDE:
        k = math.ceil(DISPLAY_MIN_SIDE / side)
        frames = F.interpolate(frames, scale_factor=k, mode="nearest")
    elif side > DISPLAY_MAX_SIDE:
        s = DISPLAY_MAX_SIDE / side
        frames = resize_frames(frames, (max(2, round(h * s)), max(2, round(w * s))))
    h, w = frames.shape[-2:]
    if h % 2 or w % 2:
        frames = resize_frames(frames, (h + h % 2, w + w % 2))
    return frames


def write_display(path: Path, frames: torch.Tensor, fps: float) -> Path:
    return write_video(path, display_frames(frames), fps=fps)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_").lower() or "edit"


def lora_labels(paths) -> dict[str, str]:
    """A readable, unique label per LoRA folder -> the folder: ``SFT + LoRA toy/lora`` for ``outputs/toy/lora``
    (the folder and its parent: Edit-GRPO names every adapter folder ``lora``)."""
    labels: dict[str, str] = {}
    for p in paths:
        path = Path(p).resolve()
        base = f"SFT + LoRA {path.parent.name}/{path.name}" if path.parent.name else f"SFT + LoRA {path.name}"
        label, k = base, 2
        while label in labels:
            label, k = f"{base} ({k})", k + 1
        labels[label] = str(p)
    return labels


# ------------------------------------------------------------------------------------------ the demo's work
@dataclass
class EditResult:
    """What one press of "Edit" gives the page."""

    source_view: str | None
    edits: dict[str, torch.Tensor]  # variant label -> the edited clip (F, 3, H, W) in [0, 1], before encoding
    views: dict[str, str]          # variant label -> display copy (mp4)
    downloads: list[str]           # edits at the input's frame count, size and fps
    seconds: dict[str, float]
    scores: dict[str, dict[str, float]]  # toy examples: variant (and "source unchanged") -> oracle metrics
    target_view: str | None
    message: str                   # the summary, or the error


class EditDemo:
    """The demo without the web page: loads nothing itself; give it a loaded editor and its adapter labels.

    ``variants`` maps a label to an adapter name (``None``: the editor without adapters)."""

    def __init__(self, editor, variants: dict[str, str | None], workdir: str | os.PathLike, *,
                 max_upload_mb: float = 100.0, max_input_frames: int = 257, max_input_side: int = 1280,
                 examples: list[ToyDemoExample] | None = None):
        self.editor = editor
        self.pipe = EditPipeline(editor)
        self.variants = dict(variants)
        self.workdir = Path(workdir)
        self.max_upload_mb = float(max_upload_mb)
        self.max_input_frames = int(max_input_frames)
        self.max_input_side = int(max_input_side)
        self.examples = {ex.label: ex for ex in (examples if examples is not None else toy_examples())}
        self._example_views: dict[str, tuple[str, str]] = {}
        (self.workdir / "examples").mkdir(parents=True, exist_ok=True)
        for i, ex in enumerate(self.examples.values()):
            src = write_display(self.workdir / "examples" / f"{i}_source.mp4", ex.source, ex.fps)
            tgt = write_display(self.workdir / "examples" / f"{i}_target.mp4", ex.target, ex.fps)
            self._example_views[ex.label] = (str(src), str(tgt))

    # -- inputs ----------------------------------------------------------------------------------------
    def example_view(self, label: str | None) -> tuple[str | None, str | None, str]:
        """(source display, target display, instruction) of a bundled example."""
        if not label or label not in self.examples:
            return None, None, ""
        src, tgt = self._example_views[label]
        return src, tgt, self.examples[label].instruction

    def check_upload(self, path: str | os.PathLike) -> ClipInfo:
        """The demo's limits on an upload (type, size, length, side), probing it as the edit command does."""
        path = Path(path)
        ext = path.suffix.lower()
        if ext not in VIDEO_EXTENSIONS and ext not in IMAGE_EXTENSIONS:
            raise UserError(f"{path.name}: unsupported file type {ext or '(none)'!r}; upload a video "
                            f"({', '.join(VIDEO_EXTENSIONS)}) or an image")
        if path.is_file() and path.stat().st_size > self.max_upload_mb * 2**20:
            raise UserError(f"{path.name}: {path.stat().st_size / 2**20:.1f} MB is over this demo's upload limit "
                            f"of {self.max_upload_mb:g} MB")
        info = probe_clip(path)
        if info.num_frames > self.max_input_frames:
            raise UserError(f"{path.name}: {info.num_frames} frames; this demo edits clips of at most "
                            f"{self.max_input_frames} frames (trim it, or use python -m viva_base.edit)")
        if max(info.height, info.width) > self.max_input_side:
            raise UserError(f"{path.name}: {info.width}x{info.height}; this demo takes sides up to "
                            f"{self.max_input_side} pixels (shrink it, or use python -m viva_base.edit)")
        return info

    def preview_upload(self, path: str | os.PathLike) -> str:
        """A display copy of an uploaded clip (after the checks); a UserError names what is wrong with it."""
        info = self.check_upload(path)
        video = read_video(path, max_side=DISPLAY_MAX_SIDE)
        return str(write_display(self._job_dir() / "source.mp4", video.frames, info.fps))

    # -- the edit --------------------------------------------------------------------------------------
    def edit(self, *, example: str | None, upload: str | None, instruction: str, reference: str | None = None,
             num_steps=50, guidance_scale=2.0, seed=0, frames=None, size: str | None = None,
             variants: list[str] | None = None, progress=None, shift=None, guidance_interval=None) -> EditResult:
        """Edit the upload (or else the bundled ``example``) with each chosen variant, same seed for each.

        ``shift``: the schedule shift (None, empty or 0: the editor's); ``guidance_interval``: CFG only where
        ``lo < sigma <= hi``, as ``(lo, hi)`` or the page's text "LO HI" (None or empty: every step).
        ``progress(done, total, desc)`` is called after every denoising step. Raises a UserError for a bad
        input (the caller shows its message)."""
        num_steps = _whole(num_steps, "steps", minimum=1)
        seed = _whole(seed, "seed", minimum=0)
        frames = _whole(frames, "frames", minimum=0) or None
        try:
            guidance_scale = float(guidance_scale)
        except (TypeError, ValueError):
            raise UserError(f"guidance {guidance_scale!r} is not a number") from None
        if not math.isfinite(guidance_scale) or guidance_scale <= 0:
            raise UserError(f"guidance {guidance_scale:g}: give a number > 0 (1: no CFG)")
        shift, guidance_interval = _sampler(shift, guidance_interval)
        size = parse_size(size.strip()) if isinstance(size, str) and size.strip() else None
        chosen = [v for v in self.variants if v in (variants if variants is not None else list(self.variants))]
        if not chosen:
            raise UserError("no variant chosen; tick the SFT editor and/or a LoRA")
        ex = None
        if upload:
            video, fps = str(upload), self.check_upload(upload).fps
        elif example:
            if example not in self.examples:
                raise UserError(f"unknown example {example!r}")
            ex = self.examples[example]
            video, fps = ex.source, ex.fps
        else:
            raise UserError("no source video: upload one, or pick a bundled example")
        check_request(video, instruction, reference)  # the edit command's checks

        job = self._job_dir()
        ref = self.pipe.load_reference(reference)
        clip, n, hw = self.pipe.prepare(video, num_frames=frames, size=size)
        total = num_steps * len(chosen)
        edits, views, downloads, seconds, scores = {}, {}, [], {}, {}
        start = time.perf_counter()
        try:
            for k, label in enumerate(chosen):
                self._activate(self.variants[label])
                t0 = time.perf_counter()

                def on_step(i, steps, k=k, label=label):
                    if progress is not None:
                        progress(k * steps + i, total, f"{label}: step {i}/{steps}")

                edited = self.pipe.sample(clip, instruction.strip(), ref, num_inference_steps=num_steps,
                                          guidance_scale=guidance_scale, seed=seed, progress=False, on_step=on_step,
                                          guidance_interval=guidance_interval, shift=shift)
                full = edits[label] = map_back(edited, n, hw)
                seconds[label] = time.perf_counter() - t0
                slug = _slug(label)
                # the download keeps the upload's sound (the page's players stay silent)
                downloads.append(str(write_video(job / f"{slug}.mp4", full, fps=fps, audio=upload or None)))
                views[label] = str(write_display(job / f"{slug}_view.mp4", full, fps))
                if ex is not None:
                    scores[label] = _oracle(full, ex)
        finally:
            self._activate(None)
        if ex is not None:
            scores["source unchanged"] = _oracle(ex.source, ex)
            source_view, target_view = self._example_views[ex.label]
        else:
            shown = read_video(video, max_side=DISPLAY_MAX_SIDE).frames
            source_view = str(write_display(job / "source_view.mp4", shown, fps))
            target_view = None
        wall = time.perf_counter() - start
        return EditResult(source_view, edits, views, downloads, seconds, scores, target_view,
                          summary(seconds, scores, wall, num_steps, guidance_scale, seed, shift, guidance_interval))

    # -- helpers ---------------------------------------------------------------------------------------
    def _activate(self, adapter: str | None) -> None:
        dit = self.editor.transformer
        if not getattr(dit, "peft_config", None):
            return
        if adapter is None:
            dit.disable_adapters()
        else:
            dit.enable_adapters()
            dit.set_adapters([adapter])

    def _job_dir(self) -> Path:
        """A new folder for one edit's (or preview's) files; all but the newest ``KEEP_JOBS`` go once they are
        10 minutes old (the page has its own copies by then: gradio caches what it serves)."""
        jobs = self.workdir / "jobs"
        jobs.mkdir(parents=True, exist_ok=True)
        old = sorted(jobs.iterdir(), key=lambda p: p.stat().st_mtime)
        for p in old[:max(0, len(old) - KEEP_JOBS + 1)]:
            if time.time() - p.stat().st_mtime > 600:
                shutil.rmtree(p, ignore_errors=True)
        job = jobs / uuid.uuid4().hex[:12]
        job.mkdir()
        return job


def _whole(value, name: str, *, minimum: int) -> int | None:
    """A whole number ``>= minimum`` from a page field (which may hold a float); an empty field is ``None``
    where 0 is allowed (0 and empty: "the default"); anything else is a UserError."""
    if value in (None, "") and minimum == 0:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not (number.is_integer() and number >= minimum):
        raise UserError(f"{name} {value!r}: use a whole number >= {minimum}")
    return int(number)


def _sampler(shift, interval) -> tuple[float | None, tuple[float, float] | None]:
    """The page's sampler fields as ``(shift, (lo, hi))``: an empty field or a shift of 0 is None (the editor's
    shift; CFG on every step); the interval may be "LO HI" or "LO, HI". A UserError names a bad value."""
    if shift in (None, ""):
        shift = None
    else:
        try:
            shift = float(shift)
        except (TypeError, ValueError):
            raise UserError(f"shift {shift!r} is not a number (0 or empty: the editor's)") from None
        shift = shift or None
    if isinstance(interval, str):
        words = interval.replace(",", " ").split()
        try:
            interval = tuple(float(w) for w in words) or None
        except ValueError:
            interval = ()
        if interval is not None and len(interval) != 2:
            raise UserError(f"CFG interval {' '.join(words)!r}: give two numbers LO HI, e.g. 0.5 1 (empty: every step)")
    return shift, check_sampler_options(interval, shift, interval_name="CFG interval", shift_name="shift")


def _oracle(edited: torch.Tensor, ex: ToyDemoExample) -> dict[str, float]:
    from .data.toyworld.oracle import oracle_scores

    got = oracle_scores(edited[None], ex.source[None], ex.target[None], ex.mask[None])
    return {k: float(got[k][0]) for k in ("oracle", "if_progress", "if_error", "sp_error")}


def summary(seconds: dict[str, float], scores: dict[str, dict[str, float]], wall: float, steps: int,
            guidance: float, seed: int, shift: float | None = None,
            interval: tuple[float, float] | None = None) -> str:
    """The result table of an edit, as HTML: time per variant and, for toy examples, the oracle metrics."""
    cols = ["oracle", "if_progress", "sp_error"] if scores else []
    head = "".join(f"<th>{c}</th>" for c in ["variant", "time", *cols])
    rows = []
    for label in [*seconds, *(k for k in scores if k not in seconds)]:
        cells = [html.escape(label), f"{seconds[label]:.1f} s" if label in seconds else "&ndash;"]
        cells += [f"{scores[label][c]:.3f}" if label in scores else "" for c in cols]
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    where = f" where {interval[0]:g} < sigma <= {interval[1]:g}" if interval is not None else ""
    shifted = f"shift {shift:g}" if shift is not None else "the editor's shift"
    note = (f"{steps} steps, guidance {guidance:g}{where}, {shifted}, seed {seed}: the same initial noise for every "
            f"variant; {wall:.1f} s in all.")
    if scores:
        note += (" Oracle: 1 - (error inside the true edit region against the target + error outside it against "
                 "the source) / 2; if_progress: 1 = the exact target, 0 = no better than not editing.")
    return (f'<div class="viva-summary"><table>{"<tr>" + head + "</tr>"}{"".join(rows)}</table>'
            f"<p>{html.escape(note)}</p></div>")


def error_html(message: str) -> str:
    return f'<div class="viva-error" role="alert">error: {html.escape(message)}</div>'


def page_message(exc: BaseException, paths=()) -> str:
    """The one line a page shows for ``exc``: the edit command's message (upload folders on the server cut
    from it, the file name kept), or, for a bug, its class only (the traceback goes to the server log)."""
    message = explain(exc, smaller="the frames / size fields")
    if message is None:
        logger.exception("the edit failed")
        return f"internal error ({exc.__class__.__name__}); the server log has the details"
    for p in paths:
        if p:
            message = message.replace(str(Path(p).parent) + os.sep, "")
    return message


# ------------------------------------------------------------------------------------------ the web page
CSS = """
.viva-error { color: #b00020; background: #fdecea; border: 1px solid #f5c2c0; border-radius: 6px;
              padding: 8px 12px; font-weight: 600; }
.viva-summary table { border-collapse: collapse; margin: 4px 0; }
.viva-summary td, .viva-summary th { border: 1px solid #ccc; padding: 3px 10px; text-align: right; }
.viva-summary td:first-child, .viva-summary th:first-child { text-align: left; }
.viva-summary p { font-size: 0.85em; color: #555; margin: 4px 0; }
"""


def build_page(demo: EditDemo, *, num_steps: int = 50, guidance_scale: float = 2.0, seed: int = 0,
               model_name: str = "", shift: float | None = None, guidance_interval=None):
    """The Gradio page (a ``gr.Blocks``) around ``demo``; queue and launch it yourself."""
    import gradio as gr

    labels = list(demo.variants)
    upload_types = sorted({*VIDEO_EXTENSIONS, *IMAGE_EXTENSIONS})
    with gr.Blocks(title="VIVA video editing: SFT vs Edit-GRPO", delete_cache=(3600, 3600)) as page:
        gr.Markdown(f"### VIVA instruction-based video editing: the SFT editor and its Edit-GRPO LoRA side by side\n"
                    f"Editor `{model_name}`. Each variant edits the same clip with the same seed.")
        with gr.Row():
            with gr.Column(scale=1, min_width=300):
                example = gr.Radio(list(demo.examples), label="Bundled toy example (true target known)",
                                   elem_id="example")
                upload = gr.File(label=f"... or upload a video or image (up to {demo.max_upload_mb:g} MB)",
                                 file_types=upload_types, elem_id="upload",
                                 height=150)
                instruction = gr.Textbox(label="Instruction", placeholder="make the red square blue",
                                         elem_id="instruction")
                reference = gr.File(label="Reference image (optional)", file_types=sorted(IMAGE_EXTENSIONS),
                                    elem_id="reference", height=140)
                with gr.Row():
                    steps = gr.Number(num_steps, label="Steps", precision=0, minimum=1, elem_id="steps",
                                      min_width=80)
                    guidance = gr.Number(guidance_scale, label="Guidance", elem_id="guidance", min_width=80)
                    seed_box = gr.Number(seed, label="Seed", precision=0, minimum=0, elem_id="seed",
                                         min_width=80)
                with gr.Accordion("Sampler (default: the editor's shift, CFG on every step)",
                                  open=shift is not None or guidance_interval is not None):
                    with gr.Row():
                        shift_box = gr.Number(shift or 0, label="Shift (0 = the editor's)", minimum=0,
                                              elem_id="shift", min_width=80)
                        interval_box = gr.Textbox(" ".join(f"{v:g}" for v in guidance_interval or ()),
                                                  label="CFG only where LO < sigma <= HI (e.g. 0.5 1; blank = every "
                                                        "step)", elem_id="interval")
                with gr.Accordion("Clip the model edits (default: the input's, capped by the model)", open=False):
                    frames = gr.Number(0, label="Frames (0 = the input's)", precision=0, minimum=0)
                    size = gr.Textbox("", label="Size WxH (blank = the input's)")
                chosen = gr.CheckboxGroup(labels, value=labels, label="Compare", elem_id="variants")
                button = gr.Button("Edit", variant="primary", elem_id="edit")
            with gr.Column(scale=3):
                status = gr.HTML("", elem_id="status")
                with gr.Row():
                    source_view = gr.Video(label="Source", interactive=False, autoplay=True, loop=True,
                                           elem_id="source", height=300)
                    results = [gr.Video(label=label, interactive=False, autoplay=True, loop=True,
                                        elem_id=f"result-{i}", height=300) for i, label in enumerate(labels)]
                with gr.Row():
                    target_view = gr.Video(label="True target (toy examples)", interactive=False, autoplay=True,
                                           loop=True, elem_id="target", height=200)
                    downloads = gr.File(label="Download the edits (input size, frame count and fps)",
                                        file_count="multiple", interactive=False, elem_id="downloads")

        cleared = [None] * len(results)

        def pick_example(label):
            src, tgt, text = demo.example_view(label)
            return [src, tgt, text, None, "", *cleared, None]

        def pick_upload(path):
            if not path:
                return [None, None, gr.update(), "", *cleared, None]
            try:
                view = demo.preview_upload(path)
            except Exception as exc:  # shown in the page, never a traceback
                return [None, None, None, error_html(page_message(exc, [path])), *cleared, None]
            return [view, None, None, "", *cleared, None]

        def run_edit(example_label, upload_path, text, reference_path, n_steps, g, s, n_frames, wh, variants,
                     sh, gi, progress=gr.Progress()):
            def report(done, total, desc):
                progress((done, total), desc=desc)

            try:
                r = demo.edit(example=example_label, upload=upload_path, instruction=text, reference=reference_path,
                              num_steps=n_steps, guidance_scale=g, seed=s, frames=n_frames, size=wh,
                              variants=variants, progress=report, shift=sh, guidance_interval=gi)
            except Exception as exc:  # shown in the page, never a traceback
                return [error_html(page_message(exc, [upload_path, reference_path])), gr.update(), gr.update(),
                        *cleared, None]
            return [r.message, r.source_view, r.target_view, *[r.views.get(label) for label in labels], r.downloads]

        example.input(pick_example, example, [source_view, target_view, instruction, upload, status, *results,
                                               downloads], queue=False)
        upload.upload(pick_upload, upload, [source_view, target_view, example, status, *results, downloads])
        button.click(run_edit, [example, upload, instruction, reference, steps, guidance, seed_box, frames, size,
                                chosen, shift_box, interval_box],
                     [status, source_view, target_view, *results, downloads],
                     concurrency_limit=1, concurrency_id="edit")
    return page


# ------------------------------------------------------------------------------------------ command line
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m viva_base.app",
                                description="A web demo: edit a video in the browser; compare the editor with "
                                            "and without its LoRA(s), same seed, side by side.")
    p.add_argument("--model", required=True, help="editor directory (save_pretrained) or hub repo id")
    p.add_argument("--lora", action="append", default=[], metavar="DIR",
                   help="LoRA folder or hub repo id to compare with the editor alone (repeat for several)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 serves the network)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument("--num-steps", type=int, default=50, help="the page's default number of steps (default 50)")
    p.add_argument("--guidance-scale", type=float, default=2.0, help="the page's default guidance (default 2.0)")
    p.add_argument("--seed", type=int, default=0, help="the page's default seed (default 0)")
    add_sampler_arguments(p, page=True)
    p.add_argument("--max-upload-mb", type=float, default=100.0, help="largest upload accepted (default 100 MB)")
    # the edit comes back at the input's frame count and size, in memory (float32): 257 x 1280 x 720 x 3 is 2.8 GB
    p.add_argument("--max-input-frames", type=int, default=257, help="longest clip accepted (default 257 frames)")
    p.add_argument("--max-input-side", type=int, default=1280, help="largest side accepted (default 1280 pixels)")
    p.add_argument("--queue-size", type=int, default=16, help="edits waiting at most (one runs at a time; default 16)")
    add_runtime_arguments(p)
    return p


def _check_args(args) -> None:
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port {args.port}: use a port in 0..65535")
    for name in ("num_steps", "max_input_frames", "max_input_side", "queue_size"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be at least 1")
    if args.max_upload_mb <= 0:
        raise UserError(f"--max-upload-mb {args.max_upload_mb:g}: must be positive")
    if args.seed < 0:
        raise UserError(f"--seed {args.seed}: must be >= 0")
    if not math.isfinite(args.guidance_scale) or args.guidance_scale <= 0:
        raise UserError(f"--guidance-scale {args.guidance_scale:g}: must be > 0 (1: no CFG)")
    args.guidance_interval = checked_sampler_arguments(args)


def serve(args) -> None:
    import warnings

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    _check_args(args)
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise UserError("the web demo needs gradio: pip install 'edit-grpo[app]' (or pip install gradio)") from None
    from .edit import check_lora_dirs

    check_lora_dirs(args.lora)
    device, dtype = resolve_device(args.device, args.dtype)
    labels = lora_labels(args.lora)
    adapters = {f"lora{i}": path for i, path in enumerate(labels.values())}
    with warnings.catch_warnings():  # peft warns that a second adapter makes several: that is the point here
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        editor = load_model(args.model, adapters, device=device, dtype=dtype)
    variants = {BASE_LABEL: None, **{label: f"lora{i}" for i, label in enumerate(labels)}}
    workdir = Path(tempfile.mkdtemp(prefix="viva-app-"))
    try:
        demo = EditDemo(editor, variants, workdir, max_upload_mb=args.max_upload_mb,
                        max_input_frames=args.max_input_frames, max_input_side=args.max_input_side)
        page = build_page(demo, num_steps=args.num_steps, guidance_scale=args.guidance_scale, seed=args.seed,
                          model_name=str(args.model), shift=args.shift, guidance_interval=args.guidance_interval)
        page.queue(default_concurrency_limit=1, max_size=args.queue_size)
        try:
            page.launch(server_name=args.host, server_port=args.port, allowed_paths=[str(workdir)], show_error=False,
                        quiet=True, ssr_mode=False, css=CSS, footer_links=[], prevent_thread_lock=True,
                        max_file_size=int(args.max_upload_mb * 2**20))
        except OSError as exc:
            raise UserError(f"cannot serve on {args.host}:{args.port} ({str(exc).splitlines()[0][:160]})") from None
        print(f"serving the demo on {page.local_url} (Ctrl-C stops it)", flush=True)
        signal.signal(signal.SIGTERM, _interrupt)  # `kill` stops it as Ctrl-C does: the server closes, files go
        page.block_thread()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """Run the demo until interrupted; returns the exit status (0, 2 for a user error, 130 interrupted)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.INFO),
                        format="%(levelname)s: %(message)s")
    return guarded(serve, args, interrupted=None)[0]


if __name__ == "__main__":
    from viva_base.errors import exit_with

    exit_with(main)
