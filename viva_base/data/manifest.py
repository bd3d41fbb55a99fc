"""JSONL manifests: the one data format every recipe reads (docs/data.md).

One JSON object per line; file paths are relative to the manifest's folder (or absolute).

* **pairs** (SFT): ``id``, ``source`` (video, image or image folder), ``target``, ``instruction``;
  optional ``mask`` (a video/image whose non-zero pixels mark the edited region; any channel),
  ``reference`` (image), ``source_caption``, ``target_caption``, ``edit_type``.
* **prompts** (Edit-GRPO): ``id``, ``source``, ``instruction``, ``source_caption`` (t_src),
  ``target_caption`` (t_edit); optional ``reference``, ``edit_type``.
* **eval**: a prompts line, optionally with ``target`` and ``mask`` (ground truth, toy world), ``category``, ``task``.

Unknown extra keys are kept (``extra``) so tools can carry their own fields.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Iterable

from ..errors import UserError

PATH_KEYS = ("source", "target", "mask", "reference")
REQUIRED = {
    "pairs": ("id", "source", "target", "instruction"),
    "prompts": ("id", "source", "instruction", "source_caption", "target_caption"),
    "eval": ("id", "source", "instruction"),
}


class ManifestError(UserError):
    pass


def read_jsonl(path: str | os.PathLike) -> list[tuple[int, dict]]:
    """``(line number, object)`` for every non-blank line of a JSONL file; a line that is not a JSON object
    is a :class:`ManifestError` naming the file and line."""
    path = Path(path)
    rows = []
    try:
        with open(path, "rb") as f:
            lines = f.read().split(b"\n")
    except OSError as exc:  # a folder, no permission, an I/O error
        raise ManifestError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    for lineno, raw in enumerate(lines, 1):
        try:
            line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")  # (a byte-order mark some editors write)
        except UnicodeDecodeError:
            raise ManifestError(f"{path}:{lineno}: not UTF-8 text (a JSONL manifest is one JSON object per "
                                "line)") from None
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ManifestError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise ManifestError(f"{path}:{lineno}: each line must be a JSON object")
        rows.append((lineno, row))
    return rows


def read_manifest(path: str | os.PathLike, kind: str = "pairs", *, check_files: bool = True) -> list[dict]:
    """Read and validate a manifest; returns dicts with absolute paths. Errors name the file and line."""
    if kind not in REQUIRED:
        raise ValueError(f"unknown manifest kind {kind!r}")
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"manifest '{path}' not found")
    root = path.parent.resolve()
    records, seen = [], set()
    for lineno, rec in read_jsonl(path):
        missing = [k for k in REQUIRED[kind] if rec.get(k) in (None, "") and not (k == "instruction" and k in rec)]
        if missing:
            raise ManifestError(f"{path}:{lineno}: missing {', '.join(missing)} (a {kind} manifest needs "
                                f"{', '.join(REQUIRED[kind])})")
        rec["id"] = str(rec["id"])
        if rec["id"] in seen:
            raise ManifestError(f"{path}:{lineno}: duplicate id {rec['id']!r}")
        seen.add(rec["id"])
        for key in PATH_KEYS:
            if rec.get(key):
                p = Path(rec[key])
                p = p if p.is_absolute() else root / p
                if check_files and not p.exists():
                    raise ManifestError(f"{path}:{lineno}: {key} file '{p}' not found")
                rec[key] = str(p)
        rec.setdefault("source_caption", "")
        rec.setdefault("target_caption", "")
        rec.setdefault("reference", None)
        rec.setdefault("mask", None)
        records.append(rec)
    if not records:
        raise ManifestError(f"manifest '{path}' holds no records")
    return records


def check_manifest(key: str, path: str | os.PathLike, kind: str) -> list[dict]:
    """Config check: the manifest a recipe key names, read and validated as the run will read it (its files
    exist), before anything is built or written. Returns the records; a problem is one ``UserError`` naming
    ``key`` and the file and line."""
    try:
        return read_manifest(path, kind)
    except ManifestError as e:
        raise UserError(f"{key}: {e}") from None


def write_manifest(path: str | os.PathLike, records: Iterable[dict], *, relative_to: str | os.PathLike | None = None) -> Path:
    """Write records atomically; paths under the manifest's folder are stored relative to it."""
    path = Path(path)
    root = Path(relative_to or path.parent).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            for rec in records:
                rec = dict(rec)
                for key in PATH_KEYS:
                    if rec.get(key):
                        p = Path(rec[key]).resolve()
                        rec[key] = str(p.relative_to(root)) if p.is_relative_to(root) else str(p)
                f.write(json.dumps(rec) + "\n")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
