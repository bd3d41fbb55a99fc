"""Inputs, per-record folders, sharding and the merged manifest of the paired-data pipeline.

A *record* is one input video with its caption. Its work lives in one folder,
``output_dir/records/<xx>/<id>/`` (``xx``: two hex digits of a hash of the id, so no folder holds
millions of entries)::

    real.mp4                    the input, cut and resized to the working clip
    <stage>/stage.json          a stage's result, written last (atomically) after its files
    <stage>/synth.mp4 mask.mkv  the stage's files
    record.json                 written last of all: {"status": "done" | "failed", ...}

A killed run leaves no half record: a record without ``record.json`` is unfinished, a stage without
``stage.json`` is redone, and every file is written under a temporary name and renamed. Results carry
a *fingerprint* of the settings they depend on; a result whose fingerprint differs from the current
recipe's is stale and recomputed.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from ...errors import UserError
from ...recipe import atomic_write_text
from ..manifest import ManifestError, read_jsonl, write_manifest

logger = logging.getLogger(__name__)

VIDEO_EXTENSIONS = (".mp4", ".mov", ".m4v", ".mkv", ".webm", ".avi", ".gif")
RECORD_FILE = "record.json"
STAGE_FILE = "stage.json"


@dataclass(frozen=True)
class InputVideo:
    """One input: ``id`` (file-system safe), ``video`` (absolute path), ``caption`` (may be empty)."""

    id: str
    video: str
    caption: str


def safe_id(text: str) -> str:
    """A record id usable as a folder name: path separators become ``__``, other unsafe characters ``_``."""
    text = text.replace("\\", "/").strip("/").replace("/", "__")
    text = re.sub(r"[^A-Za-z0-9._\-]+", "_", text).strip("._") or "record"
    return text[:200]


def stable_hash(*parts: Any) -> int:
    """A 64-bit integer from SHA-256 of the parts' JSON: the same on every machine and Python run."""
    blob = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str).encode()
    return int.from_bytes(hashlib.sha256(blob).digest()[:8], "big")


def fingerprint(obj: Any) -> str:
    """Short SHA-256 of the canonical JSON of ``obj`` (the settings a result depends on)."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------- inputs
def list_inputs(inputs: str | os.PathLike) -> list[InputVideo]:
    """The input videos, sorted by id.

    * a **folder**: every video file under it (recursively; ``.mp4 .mov .m4v .mkv .webm .avi .gif``), its
      caption in a text file next to it with the same stem (``clip.mp4`` + ``clip.txt``); the id is the
      path relative to the folder without the extension (``a/clip`` -> ``a__clip``). A video without a
      caption file has an empty caption (its record fails with that reason).
    * a **JSONL manifest**: one object per line with ``video`` (or ``source``; relative to the manifest's
      folder or absolute), ``caption``, and an optional ``id`` (default: the file's stem).
    """
    path = Path(inputs)
    if path.is_dir():
        items = []
        for p in sorted(path.rglob("*")):
            if p.suffix.lower() in VIDEO_EXTENSIONS and p.is_file() and not p.name.startswith("."):
                txt = p.with_suffix(".txt")
                caption = txt.read_text(encoding="utf-8").strip() if txt.is_file() else ""
                items.append(InputVideo(safe_id(str(p.relative_to(path).with_suffix(""))), str(p.resolve()), caption))
    elif path.is_file():
        items = _read_input_manifest(path)
    else:
        raise UserError(f"inputs '{path}' not found: give a folder of videos (+ .txt captions) or a JSONL manifest")
    if not items:
        raise UserError(f"inputs '{path}' holds no videos ({', '.join(VIDEO_EXTENSIONS)})")
    seen: dict[str, str] = {}
    for it in items:
        if it.id in seen:
            raise UserError(f"inputs: two videos map to the record id {it.id!r} ({seen[it.id]} and {it.video}); "
                            "give them distinct ids")
        seen[it.id] = it.video
    return sorted(items, key=lambda it: it.id)


def _read_input_manifest(path: Path) -> list[InputVideo]:
    root = path.parent.resolve()
    items = []
    for lineno, row in read_jsonl(path):
        video = row.get("video") or row.get("source")
        if not video:
            raise ManifestError(f"{path}:{lineno}: needs 'video' (a path) and 'caption'")
        p = Path(video)
        p = p if p.is_absolute() else root / p
        items.append(InputVideo(safe_id(str(row.get("id") or p.stem)), str(p), str(row.get("caption") or "").strip()))
    return items


# ---------------------------------------------------------------------------------------------- sharding
def parse_shard(spec: str | None) -> tuple[int, int]:
    """``"i/n"`` -> ``(i, n)`` with ``0 <= i < n``; ``None`` or ``""`` -> ``(0, 1)``."""
    if spec in (None, ""):
        return 0, 1
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(spec))
    if not m or int(m.group(2)) < 1 or int(m.group(1)) >= int(m.group(2)):
        raise UserError(f"shard={spec!r}: write i/n with 0 <= i < n (e.g. shard=0/4 for the first of 4 machines)")
    return int(m.group(1)), int(m.group(2))


def in_shard(record_id: str, index: int, count: int) -> bool:
    """Record ``record_id`` belongs to shard ``index`` of ``count`` iff ``stable_hash(id) mod count == index``.

    A function of the id alone, so machines agree without talking and adding inputs never moves a
    record to another shard."""
    return count == 1 or stable_hash("shard", record_id) % count == index


def combine_shards(shard: tuple[int, int], process: tuple[int, int]) -> tuple[int, int]:
    """Shard ``i/n`` of machines x process ``r/w`` within a machine -> global shard ``(i w + r) / (n w)``."""
    (i, n), (r, w) = shard, process
    return i * w + r, n * w


# ---------------------------------------------------------------------------------------------- records
def _atomic_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=1, sort_keys=False) + "\n")


def _read_json(path: Path) -> Any | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


class RecordStore:
    """The folders of the records under ``output_dir/records``."""

    def __init__(self, output_dir: str | os.PathLike):
        self.root = Path(output_dir) / "records"

    def folder(self, record_id: str) -> Path:
        return self.root / f"{stable_hash('folder', record_id) % 256:02x}" / record_id

    # -- whole records ---------------------------------------------------------------------------
    def load(self, record_id: str) -> dict | None:
        """The finished record (``record.json``) or ``None`` if it is missing or unreadable."""
        data = _read_json(self.folder(record_id) / RECORD_FILE)
        return data if isinstance(data, dict) and data.get("status") in ("done", "failed") else None

    def is_finished(self, record_id: str, fp: str, *, retry_failed: bool = False) -> bool:
        """True if the record is done (or failed, unless ``retry_failed``) with the current fingerprint."""
        rec = self.load(record_id)
        if rec is None or rec.get("fingerprint") != fp:
            return False
        return rec["status"] == "done" or not retry_failed

    def finish(self, record_id: str, data: dict) -> Path:
        """Write ``record.json`` atomically: the last file of a record."""
        if data.get("status") not in ("done", "failed"):
            raise ValueError("a record's status is 'done' or 'failed'")
        folder = self.folder(record_id)
        folder.mkdir(parents=True, exist_ok=True)
        _atomic_json(folder / RECORD_FILE, data)
        return folder / RECORD_FILE

    # -- stages ----------------------------------------------------------------------------------
    def stage_dir(self, record_id: str, stage: str) -> Path:
        d = self.folder(record_id) / stage
        d.mkdir(parents=True, exist_ok=True)
        return d

    def load_stage(self, record_id: str, stage: str, fp: str) -> dict | None:
        """A stage's cached result if it was written with fingerprint ``fp``, else ``None``."""
        data = _read_json(self.folder(record_id) / stage / STAGE_FILE)
        if isinstance(data, dict) and data.get("fingerprint") == fp:
            return data
        return None

    def save_stage(self, record_id: str, stage: str, result: dict) -> None:
        """Write a stage's ``stage.json`` atomically, after the stage wrote its files."""
        _atomic_json(self.stage_dir(record_id, stage) / STAGE_FILE, result)

    # -- scanning ----------------------------------------------------------------------------------
    def finished(self) -> Iterator[tuple[Path, dict]]:
        """(folder, record) for every finished record on disk, in a stable order."""
        if not self.root.is_dir():
            return
        for path in sorted(self.root.glob(f"*/*/{RECORD_FILE}")):
            data = _read_json(path)
            if isinstance(data, dict) and data.get("status") in ("done", "failed"):
                yield path.parent, data


def write_outputs(output_dir: str | os.PathLike, *, fingerprint_now: str | None = None) -> dict:
    """Rebuild ``pairs.jsonl`` (the SFT pairs manifest) and ``failed.jsonl`` from the finished records.

    Every finished record under ``output_dir`` counts, whichever shard or machine wrote it (so the last
    shard to finish writes the complete manifest); ``fingerprint_now`` keeps only records built with the
    current settings. Pair paths in ``record.json`` are
    relative to the record's folder; in the manifest they are relative to ``output_dir``.
    Returns counts.
    """
    out = Path(output_dir)
    store = RecordStore(out)
    pairs, failed = [], []
    counts = {"records_done": 0, "records_failed": 0, "records_stale": 0, "pairs": 0}
    for folder, rec in store.finished():
        if fingerprint_now is not None and rec.get("fingerprint") != fingerprint_now:
            counts["records_stale"] += 1
            continue
        if rec["status"] == "failed":
            counts["records_failed"] += 1
            failed.append({"id": rec.get("id"), "input": rec.get("input"), "reason": rec.get("reason")})
            continue
        counts["records_done"] += 1
        for pair in rec.get("pairs", []):
            row = dict(pair)
            for key in ("source", "target", "mask"):
                if row.get(key):
                    row[key] = str((folder / row[key]).resolve())
            pairs.append(row)
    counts["pairs"] = len(pairs)
    if pairs:
        write_manifest(out / "pairs.jsonl", pairs)
    else:
        (out / "pairs.jsonl").unlink(missing_ok=True)
        logger.warning("no pairs yet: %s not written", out / "pairs.jsonl")
    atomic_write_text(out / "failed.jsonl", "".join(json.dumps(f) + "\n" for f in failed))
    atomic_write_text(out / "summary.json", json.dumps(counts, indent=1) + "\n")
    return counts
