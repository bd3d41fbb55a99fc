"""VIE-Bench-style evaluation of instruction-based video editors (VIVA section 4.2, Table 1).

``python -m benchmarks.viebench --manifest M.jsonl (--model DIR [--lora DIR] | --results DIR) --out OUT [--judge URL]``

evaluates an editor checkpoint (edits every item with :class:`viva_base.pipeline.EditPipeline`), or the
videos another system already produced (``--results``, repeatable as ``NAME=DIR``: Lucy-Edit, Ditto,
ICVE, Runway outputs ... scored in the same table), on a benchmark manifest, and writes

* ``OUT/items.jsonl``  -- one JSON line per finished (system, item), appended as each finishes;
* ``OUT/summary.json`` -- per task / category means of every metric, judge-failure count, protocol;
* ``OUT/table.md``, ``OUT/table.csv`` -- the aggregate tables (Table 1 layout, see benchmarks.report);
* ``OUT/report.html``  -- one row per item, source and edited videos side by side, sortable scores;
* ``OUT/videos/``      -- the H.264 copies the report plays; ``OUT/edited/`` -- the edits of ``--model``;
* ``OUT/protocol.json`` -- metric models and versions, judge model and prompt, system settings.

Resumable: items already in ``items.jsonl`` are skipped (a killed run is simply started again with the
same command); a run refuses to continue in a folder written with a different protocol.

Sharded: ``--shard i/n`` evaluates the items whose id hashes to shard ``i`` of ``n`` (as the data build shards);
under ``torchrun`` / ``accelerate launch`` process ``r`` of ``w`` takes shard ``(i w + r) / (n w)`` and the GPU
``cuda:LOCAL_RANK``. The processes share ``--out`` and never wait for each other: each appends its items under a
file lock and, when its shard is done, rewrites the tables from every finished item, so the last one to finish
writes the complete tables.

The manifest (docs/evaluation.md) is the ``eval`` JSONL of :mod:`viva_base.data.manifest`: ``id``,
``source``, ``instruction``, and ``task`` (``instruction`` | ``reference``), ``category``,
``source_caption``, ``target_caption``, ``reference`` where present. :func:`prepare_viebench` converts a
local copy of VIE-Bench into one (``--prepare SRC``). Nothing is downloaded at run time.
"""
from __future__ import annotations

import argparse
import collections
import concurrent.futures
import csv
import hashlib
import json
import logging
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from viva_base.errors import UserError

from .report import TABLE1_LAYOUT, read_items, render_markdown, write_outputs, write_text_atomic

logger = logging.getLogger(__name__)

__all__ = [
    "VIEBENCH_SIZE",
    "BenchmarkError",
    "JudgeSettings",
    "ModelSystem",
    "ResultsSystem",
    "find_result",
    "load_benchmark",
    "main",
    "normalize_category",
    "prepare_viebench",
    "run_benchmark",
    "safe_name",
]

VIEBENCH_SIZE = 140


class BenchmarkError(UserError):
    """A problem with the command line, the manifest or the output folder; the message says the fix."""


VIDEO_EXTENSIONS = (".mp4", ".webm", ".mov", ".mkv", ".avi", ".m4v", ".gif")
RESULT_NAMES = ("edited", "generate", "output", "result")

# ------------------------------------------------------------------------------------------------
# Categories
# ------------------------------------------------------------------------------------------------
_CATEGORY_ALIASES = {
    "add": "add", "addition": "add", "insert": "add", "insertion": "add", "object_add": "add",
    "add_object": "add", "object_addition": "add",
    "replace": "replace", "replacement": "replace", "swap": "replace", "object_swap": "replace",
    "object_replace": "replace", "object_replacement": "replace", "subject_swap": "replace",
    "remove": "remove", "removal": "remove", "delete": "remove", "erase": "remove", "object_remove": "remove",
    "object_removal": "remove",
    "color": "color", "colour": "color", "color_change": "color", "recolor": "color", "color_edit": "color",
    "style": "style", "stylization": "style", "stylize": "style", "style_transfer": "style",
    "tone_weather": "tone_weather", "tone": "tone_weather", "weather": "tone_weather",
    "tone_and_weather": "tone_weather", "weather_tone": "tone_weather", "tone_weather_change": "tone_weather",
    "weather_and_tone": "tone_weather", "environment": "tone_weather",
    "hybrid": "hybrid", "hybrid_edit": "hybrid", "multi": "hybrid", "compound": "hybrid", "combined": "hybrid",
    "multiple": "hybrid",
}
_REFERENCE_PREFIXES = ("reference_based_", "reference_", "ref_based_", "ref_", "refer_")


def _slug(text: str) -> str:
    text = str(text).strip().lower().replace("&", "_and_")
    return re.sub(r"[^a-z0-9]+", "_", text).strip("_")


def normalize_category(category: str | None, task: str | None = None, has_reference: bool = False) -> tuple[str, str]:
    """``(task, category)`` in the VIE-Bench taxonomy (``benchmarks.report.TABLE1_LAYOUT``).

    Tasks: ``instruction`` (instruction-only: add, replace, remove, color, style, tone_weather, hybrid)
    and ``reference`` (reference-based: add, swap). Common spellings are accepted (``swap``/``replace``,
    ``Tone & Weather``, ``ref_add``, ``reference-based swap`` ...); the task defaults to ``reference``
    when the item has a reference image. Unknown categories are kept (as a slug) and listed after the
    known ones in tables.
    """
    raw = _slug(category or "")
    task_slug = _slug(task or "")
    if task_slug in ("reference", "reference_based", "ref", "ref_based", "reference_guided"):
        task = "reference"
    elif task_slug in ("instruction", "instruction_only", "text", "text_only", "instruction_based"):
        task = "instruction"
    elif task_slug:
        task = task_slug
    else:
        task = None
    for prefix in _REFERENCE_PREFIXES:
        if raw.startswith(prefix):
            raw, task = raw[len(prefix):], task or "reference"
            break
    for suffix in ("_reference", "_ref", "_with_reference"):
        if raw.endswith(suffix):
            raw, task = raw[: -len(suffix)], task or "reference"
            break
    if task is None:
        task = "reference" if has_reference else "instruction"
    cat = _CATEGORY_ALIASES.get(raw, raw or "other")
    if task == "reference" and cat == "replace":
        cat = "swap"
    if task == "instruction" and cat == "swap":
        cat = "replace"
    return task, cat


def safe_name(name: str) -> str:
    """A file-name-safe, unique stand-in for an id or system name (kept as is when already safe)."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", str(name)).strip("._") or "_"
    if safe != str(name):
        safe = f"{safe[:80]}-{hashlib.sha1(str(name).encode()).hexdigest()[:8]}"
    return safe


# ------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------
def load_benchmark(path: str | os.PathLike, *, check_files: bool = True) -> list[dict]:
    """Read a benchmark manifest (``eval`` kind of :func:`viva_base.data.manifest.read_manifest`) and put
    every item's ``task`` / ``category`` in the VIE-Bench taxonomy (:func:`normalize_category`)."""
    from viva_base.data.manifest import read_manifest

    items = read_manifest(path, kind="eval", check_files=check_files)
    for it in items:
        it["task"], it["category"] = normalize_category(it.get("category"), it.get("task"), bool(it.get("reference")))
        it["instruction"] = str(it.get("instruction") or "")
    return items


_FIELDS = {
    "id": ("id", "uid", "item_id", "video_id", "name", "index", "idx", "key"),
    "source": ("source", "source_video", "video", "video_path", "src_video", "input_video", "original_video",
               "src", "video1", "input", "source_path"),
    "instruction": ("instruction", "edit_instruction", "editing_instruction", "instruction_text", "prompt",
                    "edit_prompt", "editing_prompt", "text", "<text>"),
    "category": ("category", "type", "edit_type", "editing_type", "task_type", "class", "subcategory"),
    "task": ("task", "mode", "setting", "track"),
    "reference": ("reference", "reference_image", "ref_image", "ref", "ref_img", "image", "reference_path"),
    "source_caption": ("source_caption", "source_prompt", "src_caption", "original_caption", "caption",
                       "source_text"),
    "target_caption": ("target_caption", "target_prompt", "tgt_caption", "edited_caption", "target_text"),
}
_METADATA_NAMES = ("manifest.jsonl", "metadata.jsonl", "metadata.json", "meta.json", "test.json", "annotations.json",
                   "data.json", "benchmark.json", "metadata.csv", "annotations.csv", "data.csv")


def _records_from_file(path: Path) -> list[dict]:
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if path.suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))
    data = json.loads(path.read_text(encoding="utf-8"))
    if isinstance(data, dict):
        for key in ("items", "data", "samples", "annotations"):
            if isinstance(data.get(key), list):
                return data[key]
        # {id: {...}} (the EditVerseBench test.json layout)
        return [{"id": k, **v} for k, v in data.items() if isinstance(v, dict)]
    if isinstance(data, list):
        return data
    raise ValueError(f"{path}: expected a list of items or an {{id: item}} object")


def _pick(rec: dict, key: str, fields: dict[str, str]) -> Any:
    if key in fields:
        return rec.get(fields[key])
    lower = {str(k).strip().lower(): v for k, v in rec.items()}
    for alias in _FIELDS[key]:
        if alias in lower and lower[alias] not in (None, ""):
            return lower[alias]
    return None


def _find_media(root: Path, value: Any, kind: str, item_id: str) -> Path | None:
    if value in (None, ""):
        return None
    p = Path(str(value))
    candidates = [p] if p.is_absolute() else [root / p, root / "videos" / p, root / "images" / p, root / kind / p,
                                              root / "references" / p, root / "sources" / p]
    for c in candidates:
        if c.exists():
            return c
    for c in candidates:
        if not c.suffix:
            for ext in VIDEO_EXTENSIONS + (".png", ".jpg", ".jpeg", ".webp"):
                if c.with_suffix(ext).exists():
                    return c.with_suffix(ext)
    raise FileNotFoundError(f"item {item_id!r}: {kind} file {value!r} not found under {root}; check the copy "
                            f"is complete, or map the column with --field {kind}=<column>")


def prepare_viebench(src: str | os.PathLike, out_manifest: str | os.PathLike, *,
                     fields: dict[str, str] | None = None, expected: int | None = VIEBENCH_SIZE) -> Path:
    """Convert a local copy of VIE-Bench (or any benchmark folder with a metadata file) into a manifest.

    ``src`` is the metadata file itself (``.json`` list or ``{id: item}`` object, ``.jsonl``, ``.csv``) or a
    folder holding one (``manifest.jsonl``, ``metadata.json(l)``, ``test.json``, ``annotations.json``,
    ``*.csv`` ...). Columns are matched by the common names in ``_FIELDS`` (e.g. ``video``/``source_video``
    for the source, ``prompt``/``instruction``, ``type``/``category``, ``ref_image``/``reference``);
    ``fields`` maps any key to a column explicitly. Media paths are resolved against the metadata file's
    folder (and its ``videos/``, ``images/``, ``references/`` subfolders). Categories are normalised with
    :func:`normalize_category`. Writes ``out_manifest`` (paths relative to it) and returns it.
    """
    from viva_base.data.manifest import write_manifest

    fields = dict(fields or {})
    src = Path(src)
    if src.is_dir():
        meta = next((src / n for n in _METADATA_NAMES if (src / n).is_file()), None)
        if meta is None:
            found = sorted(list(src.glob("*.json")) + list(src.glob("*.jsonl")) + list(src.glob("*.csv")))
            if len(found) != 1:
                raise FileNotFoundError(f"{src}: no metadata file found (looked for {', '.join(_METADATA_NAMES)}"
                                        f"{'; several candidates: ' + ', '.join(p.name for p in found) if found else ''}"
                                        f"); pass the metadata file itself to --prepare")
            meta = found[0]
    elif src.is_file():
        meta = src
    else:
        raise FileNotFoundError(f"{src}: not found; give the folder of your VIE-Bench copy or its metadata file")
    root = meta.parent
    records = _records_from_file(meta)
    out, seen = [], set()
    for i, rec in enumerate(records):
        item_id = _pick(rec, "id", fields)
        item_id = str(item_id) if item_id not in (None, "") else f"{i:04d}"
        if item_id in seen:
            raise ValueError(f"{meta}: duplicate id {item_id!r}; map a unique column with --field id=<column>")
        seen.add(item_id)
        instruction = _pick(rec, "instruction", fields)
        if not instruction:
            raise ValueError(f"{meta}: item {item_id!r} has no instruction (looked for "
                             f"{', '.join(_FIELDS['instruction'])}); map it with --field instruction=<column>")
        source = _find_media(root, _pick(rec, "source", fields), "source", item_id)
        if source is None:
            raise ValueError(f"{meta}: item {item_id!r} has no source video (looked for "
                             f"{', '.join(_FIELDS['source'])}); map it with --field source=<column>")
        reference = _find_media(root, _pick(rec, "reference", fields), "reference", item_id)
        task, category = normalize_category(_pick(rec, "category", fields), _pick(rec, "task", fields),
                                            reference is not None)
        entry = {"id": item_id, "source": str(source), "instruction": str(instruction).strip(), "task": task,
                 "category": category}
        if reference is not None:
            entry["reference"] = str(reference)
        for key in ("source_caption", "target_caption"):
            value = _pick(rec, key, fields)
            if value:
                entry[key] = str(value).strip()
        out.append(entry)
    if not out:
        raise ValueError(f"{meta}: holds no items")
    if expected is not None and len(out) != expected:
        logger.warning("%s: %d items (VIE-Bench has %d); is the copy complete?", meta, len(out), expected)
    counts = collections.Counter(f"{e['task']}/{e['category']}" for e in out)
    logger.info("prepared %d items: %s", len(out), ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    known = {f"{t}/{c}" for t, cats in TABLE1_LAYOUT.items() for c, _ in cats}
    unknown = sorted(k for k in counts if k not in known)
    if unknown:
        logger.warning("categories outside the VIE-Bench taxonomy (kept as they are): %s", ", ".join(unknown))
    return write_manifest(out_manifest, out)


# ------------------------------------------------------------------------------------------------
# Systems
# ------------------------------------------------------------------------------------------------
def find_result(folder: str | os.PathLike, item_id: str) -> Path | None:
    """The edited video of ``item_id`` in a results folder: ``<id>.<ext>`` (or the :func:`safe_name` of the
    id), or a folder ``<id>/`` holding ``edited.*`` / ``generate.*`` / ``output.*`` / ``result.*``, a single
    video, or an image sequence. ``None`` when there is none."""
    folder = Path(folder)
    for stem in dict.fromkeys((str(item_id), safe_name(item_id))):
        for ext in VIDEO_EXTENSIONS:
            p = folder / f"{stem}{ext}"
            if p.is_file():
                return p
        d = folder / stem
        if d.is_dir():
            for name in RESULT_NAMES:
                for ext in VIDEO_EXTENSIONS:
                    if (d / f"{name}{ext}").is_file():
                        return d / f"{name}{ext}"
            videos = [p for p in d.iterdir() if p.suffix.lower() in VIDEO_EXTENSIONS]
            if len(videos) == 1:
                return videos[0]
            from viva_base.video import IMAGE_EXTENSIONS

            if not videos and any(p.suffix.lower() in IMAGE_EXTENSIONS for p in d.iterdir()):
                return d
    return None


@dataclass
class ResultsSystem:
    """Videos already edited by some system, one per item id (see :func:`find_result`)."""

    name: str
    folder: str

    def config(self) -> dict[str, Any]:
        return {"kind": "results", "folder": str(Path(self.folder).resolve())}

    def edited(self, item: dict, out_dir: Path) -> Path | None:
        return find_result(self.folder, item["id"])


@dataclass
class ModelSystem:
    """An editor checkpoint (``viva_base.training.load_editor``), optionally with a LoRA, that edits each
    item with :class:`viva_base.pipeline.EditPipeline` into ``OUT/edited/<system>/<id>.mp4`` (an edit that
    exists already, from an interrupted run, is reused)."""

    name: str
    model: str
    lora: str | None = None
    num_inference_steps: int = 50
    guidance_scale: float = 2.0
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"
    num_frames: int | None = None
    size: str | None = None
    shift: float | None = None                               # schedule shift (None: the editor's)
    guidance_interval: tuple[float, float] | None = None     # CFG only where lo < sigma <= hi (None: every step)
    _pipeline: Any = field(default=None, repr=False, compare=False)

    def config(self) -> dict[str, Any]:
        out = {"kind": "model", "model": str(self.model), "lora": self.lora,
               "num_inference_steps": self.num_inference_steps, "guidance_scale": self.guidance_scale,
               "seed": self.seed, "dtype": self.dtype, "num_frames": self.num_frames, "size": self.size}
        # recorded only when set, so a folder written before these options resumes with the default sampler
        if self.shift is not None:
            out["shift"] = self.shift
        if self.guidance_interval is not None:
            out["guidance_interval"] = list(self.guidance_interval)
        return out

    def item_seed(self, item_id: str) -> int:
        """``seed`` mixed with the item id: each item has its own, reproducible noise."""
        return int(hashlib.sha256(f"{self.seed}:{item_id}".encode()).hexdigest()[:8], 16)

    def pipeline(self):
        if self._pipeline is None:
            from viva_base.peft_utils import load_lora
            from viva_base.pipeline import EditPipeline
            from viva_base.training import DTYPES, load_editor

            logger.info("loading the editor %s%s", self.model, f" + LoRA {self.lora}" if self.lora else "")
            editor = load_editor(self.model, torch_dtype=DTYPES[self.dtype])
            editor.to(device=torch.device(self.device))
            if self.lora:
                load_lora(editor.transformer, self.lora)
            self._pipeline = EditPipeline(editor)
        return self._pipeline

    def edited(self, item: dict, out_dir: Path) -> Path | None:
        path = out_dir / "edited" / safe_name(self.name) / f"{safe_name(item['id'])}.mp4"
        if path.is_file():
            return path
        path.parent.mkdir(parents=True, exist_ok=True)
        self.pipeline().edit_file(item["source"], item["instruction"], path, item.get("reference") or None,
                                  num_inference_steps=self.num_inference_steps, guidance_scale=self.guidance_scale,
                                  seed=self.item_seed(item["id"]), num_frames=self.num_frames, size=self.size,
                                  progress=False, shift=self.shift, guidance_interval=self.guidance_interval)
        return path


# ------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------
@dataclass
class JudgeSettings:
    """The VLM judge of a run: a :class:`rewards.vlm_judge.JudgeClient` and how many frames it sees."""

    client: Any
    frames: int = 4

    def protocol(self) -> dict[str, Any]:
        from rewards.vlm_judge import CRITERIA, JUDGE_PROMPT, JUDGE_PROMPT_VERSION

        c = self.client
        return {"model": c.model, "base_url": c.base_url, "prompt_version": JUDGE_PROMPT_VERSION,
                "prompt": JUDGE_PROMPT, "criteria": list(CRITERIA), "frames": self.frames,
                "temperature": c.temperature, "max_tokens": c.max_tokens, "max_image_side": c.max_image_side,
                "json_mode": c.json_mode}


def _fit_even(frames: torch.Tensor, max_side: int | None) -> torch.Tensor:
    """Frames scaled down to ``max_side`` (long side) with even sides (H.264 yuv420p, what browsers play)."""
    import torch.nn.functional as F

    h, w = frames.shape[-2:]
    scale = min(1.0, max_side / max(h, w)) if max_side else 1.0
    nh, nw = max(2, int(h * scale) // 2 * 2), max(2, int(w * scale) // 2 * 2)
    if (nh, nw) == (h, w):
        return frames
    return F.interpolate(frames.float(), size=(nh, nw), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)


def _report_video(frames: torch.Tensor, fps: float, path: Path, max_side: int | None) -> None:
    from viva_base.video import write_video

    if path.is_file():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    write_video(path, _fit_even(frames, max_side), fps=fps)


def _report_image(image: torch.Tensor, path: Path, max_side: int | None) -> None:
    from viva_base.video import write_video

    if path.is_file():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    write_video(path, _fit_even(image[None], max_side), fps=1)


def _repair_tail(path: Path) -> None:
    """Cut a torn last line (a run killed mid-write) so appends start on a fresh line."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as f:
        data = f.read()
        if data.endswith(b"\n"):
            return
        cut = data.rfind(b"\n") + 1
        logger.warning("%s: dropping a torn last line (an interrupted run)", path)
        f.truncate(cut)


def _append_line(path: Path, record: dict) -> None:
    line = json.dumps(record, allow_nan=False) + "\n"
    with open(path, "a", encoding="utf-8") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


_VOLATILE = {"judge": ("base_url",), "metrics": ()}


def _comparable(protocol: dict) -> dict:
    out = {}
    for key in ("metrics", "judge"):
        value = protocol.get(key)
        if isinstance(value, dict):
            value = {k: v for k, v in value.items() if k not in _VOLATILE[key]}
        out[key] = value
    return out


def _check_protocol(out_dir: Path, protocol: dict, done_systems: set[str]) -> dict:
    """Merge with the stored protocol of ``out_dir``; refuse settings that would mix incomparable results."""
    path = out_dir / "protocol.json"
    if not path.is_file():
        return protocol
    old = json.loads(path.read_text())
    if done_systems:
        a, b = _comparable(old), _comparable(protocol)
        diffs = [k for k in ("metrics", "judge") if json.dumps(a[k], sort_keys=True) != json.dumps(b[k], sort_keys=True)]
        for name in done_systems:
            if name in old.get("systems", {}) and name in protocol["systems"] and \
                    old["systems"][name] != protocol["systems"][name]:
                diffs.append(f"systems.{name}")
        if diffs:
            raise BenchmarkError(f"{out_dir} holds results made with other settings ({', '.join(diffs)} differ from "
                             f"protocol.json); use a new --out, or the same settings to resume")
    merged = dict(protocol)
    merged["systems"] = {**old.get("systems", {}), **protocol["systems"]}
    return merged


def _judge_record(item: dict, result) -> tuple[dict[str, float | None], str | None]:
    from rewards.vlm_judge import BASE_CRITERIA, CRITERIA

    keys = CRITERIA if item.get("reference") else BASE_CRITERIA
    if result.error is not None:
        return {k: None for k in keys}, result.error
    scores = {k: float(result.scores[k]) for k in keys}
    return {k: (None if math.isnan(v) else v) for k, v in scores.items()}, None


def run_benchmark(
    items: Sequence[dict],
    systems: Sequence[ResultsSystem | ModelSystem],
    out_dir: str | os.PathLike,
    *,
    metrics=None,
    judge: JudgeSettings | None = None,
    max_frames: int | None = None,
    max_side: int | None = None,
    report_max_side: int | None = 384,
    command: Sequence[str] | None = None,
    on_item: Callable[[dict], None] | None = None,
    shard: tuple[int, int] = (0, 1),
) -> dict[str, Any]:
    """Evaluate ``systems`` on ``items`` into ``out_dir`` (see the module doc); returns the summary.

    ``metrics``: a :class:`benchmarks.metrics.VideoMetrics` (``None``: no automatic metrics); ``judge``:
    :class:`JudgeSettings` (``None``: no judge). ``max_frames`` / ``max_side`` bound the frames read for
    scoring (``None``: all frames at full resolution, as the published protocols). ``on_item`` is called
    with each record after it is written. ``shard``: ``(i, n)``, evaluate only the items of shard ``i`` of ``n``
    (``viva_base.data.build.records.in_shard``); the tables cover every item finished in ``out_dir``.
    """
    from filelock import FileLock

    from rewards.base import frame_indices
    from viva_base.data.build.records import in_shard
    from viva_base.video import VideoError, read_image, read_video

    out_dir = Path(out_dir)
    names = [s.name for s in systems]
    if len(set(names)) != len(names):
        raise BenchmarkError(f"system names repeat ({', '.join(names)}); name them with --results NAME=DIR / --name")
    protocol: dict[str, Any] = {  # (first: it loads the metric models, so a model that fails leaves no out_dir)
        "format": "viebench-protocol-v1",
        "metrics": metrics.protocol() if metrics is not None else None,
        "judge": judge.protocol() if judge is not None else None,
        "systems": {s.name: s.config() for s in systems},
        "reading": {"max_frames": max_frames, "max_side": max_side},
        "versions": _versions(),
        "command": list(command) if command is not None else None,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    items_path = out_dir / "items.jsonl"
    lock = FileLock(str(out_dir / "items.jsonl.lock"))  # shards sharing out_dir: one writer at a time
    with lock:
        _repair_tail(items_path)
        previous = read_items(items_path)
    done = {(str(r.get("system")), str(r.get("id"))) for r in previous}
    with lock:
        protocol = _check_protocol(out_dir, protocol, {s for s, _ in done} & set(names))
        write_text_atomic(out_dir / "protocol.json", json.dumps(protocol, indent=2) + "\n")

    not_computed = dict(metrics.not_computed) if metrics is not None else {}
    if judge is None:
        not_computed["judge"] = "not computed: no --judge given"
    missing: dict[str, list[str]] = {}
    todo = [(s, it) for s in systems for it in items if (s.name, it["id"]) not in done and in_shard(it["id"], *shard)]
    if done:
        logger.info("resuming: %d (system, item) pairs already in %s, %d to go", len(done), items_path, len(todo))

    pool = concurrent.futures.ThreadPoolExecutor(max_workers=judge.client.concurrency) if judge else None
    pending: collections.deque = collections.deque()

    def finish(record: dict, future) -> None:
        if future is not None:
            judged, error = _judge_record(record["_item"], future.result())
            record["scores"].update(judged)
            record["judge_error"] = error
        record.pop("_item")
        record["seconds"] = round(time.time() - record.pop("_t0"), 3)
        with lock:
            _append_line(items_path, record)
        if on_item is not None:
            on_item(record)

    from tqdm.auto import tqdm

    try:
        for system, item in tqdm(todo, desc="evaluating", unit="item", disable=not todo):
            t0 = time.time()
            edited_path = system.edited(item, out_dir)
            if edited_path is None:
                missing.setdefault(system.name, []).append(item["id"])
                logger.warning("%s: no edited video for item %r in %s", system.name, item["id"],
                               getattr(system, "folder", out_dir))
                continue
            try:
                edited = read_video(edited_path, max_frames=max_frames, max_side=max_side)
            except VideoError as e:  # a damaged result of one system must not stop the whole run
                missing.setdefault(system.name, []).append(item["id"])
                logger.error("%s: item %r: %s; counted as missing", system.name, item["id"], e)
                continue
            source = read_video(item["source"], max_frames=max_frames, max_side=max_side)
            reference = read_image(item["reference"], max_side=max_side) if item.get("reference") else None
            scores = metrics.compute(edited.frames, item.get("target_caption")) if metrics is not None else {}
            sid, sysdir = safe_name(item["id"]), safe_name(system.name)
            rep = {"source": f"videos/source/{sid}.mp4", "edited": f"videos/{sysdir}/{sid}.mp4", "reference": None}
            _report_video(source.frames, source.fps, out_dir / rep["source"], report_max_side)
            _report_video(edited.frames, edited.fps, out_dir / rep["edited"], report_max_side)
            if reference is not None:
                rep["reference"] = f"videos/reference/{sid}.png"
                _report_image(reference, out_dir / rep["reference"], report_max_side)
            record = {
                "system": system.name, "id": item["id"], "task": item["task"], "category": item["category"],
                "instruction": item["instruction"], "source_caption": item.get("source_caption") or "",
                "target_caption": item.get("target_caption") or "", "source": str(item["source"]),
                "reference": item.get("reference") or None, "edited": str(edited_path),
                "frames": edited.num_frames, "fps": edited.fps, "scores": scores, "judge_error": None,
                "report": rep, "_item": item, "_t0": t0,
            }
            if isinstance(system, ModelSystem):
                record["seed"] = system.item_seed(item["id"])
            future = None
            if judge is not None:
                n = judge.frames
                src_frames = source.frames[frame_indices(source.num_frames, {"num": n})]
                edit_frames = edited.frames[frame_indices(edited.num_frames, {"num": n})]
                future = pool.submit(judge.client.judge_result, src_frames, edit_frames, item["instruction"], reference)
                pending.append((record, future))
                while pending and (pending[0][1].done() or len(pending) > judge.client.concurrency):
                    finish(*pending.popleft())
            else:
                finish(record, None)
        while pending:
            finish(*pending.popleft())
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)

    with lock:  # every shard's finished items: the last shard to finish writes the complete tables
        all_items = read_items(items_path)
        keep = {(s.name, it["id"]) for s in systems for it in items}
        finished = {(str(r.get("system")), str(r.get("id"))) for r in all_items}
        others = [r for r in all_items if (str(r.get("system")), str(r.get("id"))) not in keep]
        if others:
            logger.info("%d record(s) in %s are not part of this manifest/system set; they stay in the tables",
                        len(others), items_path)
        if shard[1] > 1:  # the other shards' items: a system without a result for one is missing it too
            for system in systems:
                ids = set(missing.get(system.name, []))
                ids |= {it["id"] for it in items if (system.name, it["id"]) not in finished
                        and not in_shard(it["id"], *shard) and isinstance(system, ResultsSystem)
                        and system.edited(it, out_dir) is None}
                if ids:
                    missing[system.name] = [it["id"] for it in items if it["id"] in ids]
            unfinished = len(keep - finished) - sum(map(len, missing.values()))
            if unfinished:
                logger.info("shard %d/%d done; %d (system, item) pairs of other shards not finished yet: the last "
                            "shard to finish writes the complete tables", *shard, unfinished)
        summary = write_outputs(out_dir, all_items, protocol=protocol, missing=missing, not_computed=not_computed)
    if judge is not None:
        stats = judge.client.stats
        logger.info("judge: %d requests, %d retries, %d cache hits, %d failures this run", stats["requests"],
                    stats["retries"], stats["cache_hits"], stats["failures"])
    return summary


def _versions() -> dict[str, str]:
    import importlib.metadata

    out = {"python": sys.version.split()[0]}
    for dist in ("edit-grpo", "torch", "transformers", "open_clip_torch", "diffusers"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    from viva_base.cli_args import count, nonnegative, positive
    from viva_base.guidance import add_sampler_arguments

    from .metrics import ALL_METRICS, MetricConfig

    d = MetricConfig()
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.viebench",
        description="Evaluate an editor checkpoint (--model) or already-edited videos (--results) on a "
                    "VIE-Bench-style manifest: automatic metrics, VLM judge, tables and an HTML report. "
                    "See docs/evaluation.md.")
    g = p.add_argument_group("data and systems")
    g.add_argument("--manifest", required=True, help="benchmark manifest (JSONL; docs/evaluation.md)")
    g.add_argument("--prepare", metavar="SRC", help="convert a local VIE-Bench copy (folder or metadata file) into "
                   "--manifest and exit")
    g.add_argument("--field", action="append", default=[], metavar="KEY=COLUMN",
                   help="with --prepare: the metadata column holding KEY (id, source, instruction, category, task, "
                        "reference, source_caption, target_caption)")
    g.add_argument("--model", help="editor directory (save_pretrained) to edit every item with")
    g.add_argument("--lora", help="LoRA folder (viva_base.peft_utils format) or hub repo id loaded onto --model's DiT")
    g.add_argument("--name", help="system name of --model in the tables (default: the folder name)")
    g.add_argument("--results", action="append", default=[], metavar="[NAME=]DIR",
                   help="folder of videos edited by another system (<id>.mp4, or <id>/edited.mp4 ...); repeat to "
                        "compare several systems")
    g.add_argument("--out", help="output folder (resumable; required unless --prepare)")
    g.add_argument("--ids", help="comma-separated item ids to evaluate (default: all)")
    g.add_argument("--limit", type=count(1), help="evaluate only the first N items (smoke runs)")
    g.add_argument("--shard", metavar="I/N", help="evaluate only shard I of N of the items (by id), into the shared "
                   "--out; under torchrun / accelerate launch each process takes its own part of it")
    g = p.add_argument_group("editing (--model)")
    g.add_argument("--num-steps", "--steps", dest="num_steps", type=count(1), default=50,
                   help="sampling steps (paper: 50; --steps is its old name)")
    g.add_argument("--guidance-scale", type=positive, default=2.0, help="CFG on the instruction (paper: 2.0; 1: none)")
    add_sampler_arguments(g)
    g.add_argument("--seed", type=int, default=0, help="base seed; each item mixes in its id")
    g.add_argument("--dtype", default="bf16" if torch.cuda.is_available() else "float32",
                   help="editor weights dtype (float32 | bf16 | fp16)")
    g.add_argument("--frames", type=count(1), help="model clip frame count (default: adapted from the input)")
    g.add_argument("--size", help="model clip size WxH (default: adapted from the input)")
    g = p.add_argument_group("metrics")
    g.add_argument("--metrics", default=",".join(ALL_METRICS),
                   help=f"comma-separated automatic metrics, or 'none' (default: {','.join(ALL_METRICS)})")
    g.add_argument("--clip", default=d.clip, help=f"CLIP for clip_tc and clip_t (default {d.clip})")
    g.add_argument("--clip-features", default=d.clip_features, choices=("pooler", "projected"),
                   help="clip_tc features: vision pooler output (EditVerse) or projected embedding")
    g.add_argument("--dino", default=d.dino, help=f"DINO model for dino_tc (default {d.dino})")
    g.add_argument("--pickscore", default=d.pickscore, help=f"PickScore model (default {d.pickscore})")
    g.add_argument("--pickscore-processor", help="PickScore tokenizer/processor (default: LAION CLIP-ViT-H for the "
                   "default model, else the model's folder)")
    g.add_argument("--pickscore-max-side", type=count(0), default=d.pickscore_max_side,
                   help="scale frames down to this long side before PickScore (EditVerse: 672; 0 = off)")
    g.add_argument("--viclip", help="ViCLIP code as module:factory (factory(weights, device) -> model)")
    g.add_argument("--viclip-weights", help="ViCLIP weights (ViClip-InternVid-10M-FLT.pth)")
    g.add_argument("--tc-mode", default=d.tc_mode, choices=("editverse", "vbench"),
                   help="temporal consistency formula (default: editverse)")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="device of the editor and the metric models")
    g.add_argument("--metric-dtype", default="float32", help="metric models dtype (float32 | bf16 | fp16)")
    g.add_argument("--max-frames", type=count(1), help="read at most this many frames per video for scoring")
    g.add_argument("--max-side", type=count(1), help="scale frames read for scoring down to this long side")
    g = p.add_argument_group("VLM judge (OpenAI-compatible /chat/completions)")
    g.add_argument("--judge", metavar="BASE_URL", help="e.g. https://api.openai.com/v1 or http://127.0.0.1:8000/v1")
    g.add_argument("--judge-model", default="gpt-4o-2024-11-20", help="served model name (default gpt-4o-2024-11-20)")
    g.add_argument("--judge-api-key-env", default="OPENAI_API_KEY",
                   help="environment variable holding the API key (default OPENAI_API_KEY; unset: no key)")
    g.add_argument("--judge-frames", type=count(1), default=4, help="evenly spaced frames per video sent (default 4)")
    g.add_argument("--judge-concurrency", type=count(1), default=4, help="requests in flight (default 4)")
    g.add_argument("--judge-retries", type=count(0), default=3, help="retries per judgement (default 3)")
    g.add_argument("--judge-timeout", type=positive, default=120.0, help="seconds per request (default 120)")
    g.add_argument("--judge-backoff", type=nonnegative, default=1.0, help="first retry wait in seconds (default 1)")
    g.add_argument("--judge-max-image-side", type=count(1), default=512, help="downscale images sent (default 512)")
    g.add_argument("--judge-cache", help="answer cache folder (default OUT/judge_cache; 'none' disables it)")
    g = p.add_argument_group("report")
    g.add_argument("--report-max-side", type=count(0), default=384,
                   help="long side of the report's video copies (0: full size)")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    from viva_base.recipe import warn_deprecated_flags

    warn_deprecated_flags(argv, ("--steps",))
    try:
        if args.prepare:
            fields = {}
            for f in args.field:
                key, _, column = f.partition("=")
                if key not in _FIELDS or not column:
                    raise BenchmarkError(f"--field {f!r}: use KEY=COLUMN with KEY one of {', '.join(_FIELDS)}")
                fields[key] = column
            path = prepare_viebench(args.prepare, args.manifest, fields=fields)
            print(f"wrote {path}")
            return 0
        summary = _run_cli(args, argv)
    except (UserError, FileNotFoundError, OSError, ValueError, ImportError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print(render_markdown(summary))
    print(f"wrote {args.out}/items.jsonl, summary.json, table.md, table.csv, report.html")
    return 0


def _run_cli(args: argparse.Namespace, argv: Sequence[str]) -> dict[str, Any]:
    from .metrics import MetricConfig, VideoMetrics

    if not args.out:
        raise BenchmarkError("give --out OUT, the folder the results go to")
    from viva_base.recipe import check_output_dir

    check_output_dir("--out", args.out)  # before the metric models load, not at the first result
    if not args.model and not args.results:
        raise BenchmarkError("give --model DIR (an editor checkpoint) or --results DIR (videos edited by a system)")
    if args.lora and not args.model:
        raise BenchmarkError("--lora needs --model")
    if args.model:  # before the metric models load (minutes for CLIP-L, DINOv2 and PickScore)
        from viva_base.edit import check_lora_dirs
        from viva_base.training import check_editor_path

        check_editor_path(args.model)
        check_lora_dirs([args.lora] if args.lora else [])
    from viva_base.guidance import checked_sampler_arguments

    interval = checked_sampler_arguments(args)
    items = load_benchmark(args.manifest)
    if args.ids:
        wanted = [i.strip() for i in args.ids.split(",") if i.strip()]
        known = {it["id"] for it in items}
        unknown = [i for i in wanted if i not in known]
        if unknown:
            raise BenchmarkError(f"--ids: not in the manifest: {', '.join(unknown)}")
        items = [it for it in items if it["id"] in set(wanted)]
    if args.limit is not None:
        items = items[: args.limit]
    shard, device = launch_shard(args.shard, args.device)
    systems: list[ResultsSystem | ModelSystem] = []
    if args.model:
        name = args.name or Path(args.model).name + (f"+{Path(args.lora).name}" if args.lora else "")
        systems.append(ModelSystem(name, args.model, args.lora, args.num_steps, args.guidance_scale, args.seed,
                                   device, args.dtype, args.frames, args.size, args.shift, interval))
    for spec in args.results:
        name, sep, folder = spec.partition("=")
        if not sep:
            name, folder = Path(spec).name, spec
        if not Path(folder).is_dir():
            raise BenchmarkError(f"--results {spec!r}: folder {folder!r} not found")
        systems.append(ResultsSystem(name, folder))

    metrics = None
    if args.metrics.strip().lower() not in ("none", ""):
        names = tuple(m.strip() for m in args.metrics.split(",") if m.strip())
        metrics = VideoMetrics(MetricConfig(
            metrics=names, clip=args.clip, clip_features=args.clip_features, dino=args.dino,
            pickscore=args.pickscore, pickscore_processor=args.pickscore_processor,
            pickscore_max_side=args.pickscore_max_side or None, viclip=args.viclip,
            viclip_weights=args.viclip_weights, tc_mode=args.tc_mode, device=device, dtype=args.metric_dtype))
    judge = None
    if args.judge:
        from rewards.vlm_judge import JudgeClient

        cache = args.judge_cache or str(Path(args.out) / "judge_cache")
        client = JudgeClient(args.judge, args.judge_model, api_key_env=args.judge_api_key_env or None,
                             timeout=args.judge_timeout, max_retries=args.judge_retries,
                             concurrency=args.judge_concurrency, backoff=args.judge_backoff,
                             cache_dir=None if cache.lower() == "none" else cache,
                             max_image_side=args.judge_max_image_side)
        judge = JudgeSettings(client, args.judge_frames)
    return run_benchmark(items, systems, args.out, metrics=metrics, judge=judge, max_frames=args.max_frames,
                         max_side=args.max_side, report_max_side=args.report_max_side,
                         command=["python", "-m", "benchmarks.viebench", *argv], shard=shard)


def launch_shard(spec: str | None, device: str, env=None) -> tuple[tuple[int, int], str]:
    """``(shard, device)`` of this process: ``--shard i/n`` (default ``0/1``) combined with the process ``RANK`` of
    ``WORLD_SIZE`` that ``torchrun`` / ``accelerate launch`` set (global shard ``(i w + r) / (n w)``, as the data build
    combines them), and a bare ``cuda`` device pinned to ``cuda:LOCAL_RANK``. No process group is started: the
    processes never talk."""
    from viva_base.data.build.records import combine_shards, parse_shard

    env = os.environ if env is None else env
    rank, world = int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1))
    shard = combine_shards(parse_shard(spec), (rank, world))
    if world > 1 and device == "cuda":
        device = f"cuda:{int(env.get('LOCAL_RANK', 0))}"
    return shard, device


if __name__ == "__main__":
    from viva_base.errors import exit_with

    exit_with(main)
