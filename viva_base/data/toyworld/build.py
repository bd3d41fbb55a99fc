"""Write the toy world's datasets: SFT pairs, Edit-GRPO prompts and held-out evaluation prompts.

The generalisation setting of the paper in miniature:

* ``sft.jsonl``: simple, single-operation pairs. Video pairs cover every edit type except
  ``image_only_types`` (default: ``replace``), which appear only in the 1-frame image pairs. Optionally
  (``n_sft_compound_video`` / ``n_sft_compound_image``, default 0) compound pairs of the *seen* combos too;
  the held-out combos never appear in training.
* ``grpo.jsonl``: compound instructions (2..``max_ops`` operations of distinct types), no targets. The
  combos of types are split (seeded) into *seen* ones, used here, and *held-out* ones.
* ``eval.jsonl``: ``split: "compound"`` prompts, alternating held-out combos (``novel_combo: true``) and
  seen combos, and ``split: "simple"`` prompts over all edit types; each with its true ``target`` video
  and ``mask``. Evaluation scenes are drawn first; training scenes equal to one of them are redrawn, so
  no evaluation scene appears in training.
* ``world.json``: every parameter, the vocabulary and the combo split.

Open edits (``open_place`` > 0, default 0): each ``add`` of every stream leaves its place open with that probability
(:mod:`.edits`, "Open edits"); the record's ``ops`` carry ``"free": ["where"]`` and ``open: true``, its ``target`` is
one correct edit among several and the oracle scores against the best of them. ``grpo_types`` (default: the compound
combos) makes the GRPO prompts simple ones of those types, and ``eval_simple_types`` (default: every type) picks the
types of the simple eval prompts: with ``open_place`` they give an RL setting whose samples can differ in what they
edit (docs/toy_world.md, "Open edits").

Everything is a pure function of the seed and the parameters (examples come from
:func:`.pairs.example_rng`), whatever the number of worker processes. Videos are lossless FFV1 ``.mkv``
(masks as grey videos), images ``.png``; manifest paths are relative to the manifest's folder.

Command line::

    python -m viva_base.data.toyworld.build --out data/toy --seed 0 --n-sft-video 2000
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from multiprocessing import get_context
from pathlib import Path
from typing import Sequence

from tqdm import tqdm

from ...errors import UserError
from ...video import write_video
from ..manifest import write_manifest
from .edits import EDIT_TYPES, MOTIONS, PLACES, is_open, mask_from_renders, pad_with_noop
from .pairs import example_rng, ordered_types, sample_example, scene_fingerprint, split_combos
from .render import render, to_tensor
from .scene import BACKGROUND_COLOURS, OBJECT_COLOURS, SHAPES, SIZE_PX_AT_32, STYLES, VARIANTS, scene_from_json

logger = logging.getLogger(__name__)
FORMAT_VERSION = 1
NOOP_STREAMS = {"sft_video": "sft_video_noop", "sft_image": "sft_image_noop"}  # simple SFT pairs only


def check_geometry(frames: int, size: int, prefix: str | None = None) -> None:
    """Frames ``4k + 1`` and sides a multiple of 16 (the Hunyuan VAE's constraints), else a UserError naming
    ``prefix + "frames"`` / ``prefix + "size"`` (a recipe's keys; without a prefix: "toy world frames")."""
    prefix = "toy world " if prefix is None else prefix
    if frames < 1 or (frames - 1) % 4:
        raise UserError(f"{prefix}frames={frames}: use 4k + 1 frames (5, 9, 13, 17, ...)")
    if size < 16 or size % 16:
        raise UserError(f"{prefix}size={size}: use a side that is a multiple of 16 (32, 48, 64)")


def check_open_edit_params(open_place: float, grpo_types, eval_simple_types, prefix: str = "") -> None:
    """A UserError naming ``prefix + key`` unless ``open_place`` is a probability and each type list is None or one
    or more edit types."""
    if not 0 <= open_place <= 1:
        raise UserError(f"{prefix}open_place={open_place!r}: the probability that an add leaves its place open is "
                        f"in [0, 1] (0: every add names its place)")
    for name, types in (("grpo_types", grpo_types), ("eval_simple_types", eval_simple_types)):
        if types is not None and (len(types) == 0 or any(t not in EDIT_TYPES for t in types)):
            raise UserError(f"{prefix}{name}={list(types)}: give one or more of {', '.join(EDIT_TYPES)} (or leave it unset)")


def _task(stream: str, index: int, ident: str, types: Sequence[str], frames: int, extra: dict | None = None) -> dict:
    return {"stream": stream, "index": index, "id": ident, "types": list(types), "frames": frames,
            "extra": extra or {}}


def _build_one(task: dict, *, seed: int, size: int, fps: float, out_dir: str, exclude: frozenset,
               open_place: float = 0.0, noop_clause: float = 0.0) -> dict:
    rng = example_rng(seed, task["stream"], task["index"])
    types = ordered_types(rng, task["types"]) if len(task["types"]) > 1 else task["types"]
    ex = sample_example(rng, types, num_frames=task["frames"], height=size, width=size, exclude_scenes=exclude,
                        open_place=open_place)
    a = render(ex.source)
    ext = ".png" if task["frames"] == 1 else ".mkv"
    stem = Path(out_dir) / "videos" / task["id"]
    rec = {"id": task["id"], "source": str(write_video(f"{stem}_src{ext}", to_tensor(a), fps))}
    changed = None
    if task["stream"] != "grpo":
        b = render(ex.target)
        rec["target"] = str(write_video(f"{stem}_tgt{ext}", to_tensor(b), fps))
        mask = mask_from_renders(a, b)
        changed = mask[:, 0].numpy() > 0  # the pixels the edit changes, for a no-op phrase (no second render)
        rec["mask"] = str(write_video(f"{stem}_mask{ext}", mask.expand(-1, 3, -1, -1), fps))
    rec["reference"] = None
    rec.update(ex.to_json())
    if noop_clause > 0 and task["stream"] in NOOP_STREAMS:  # its own stream: the example is the same as without
        pad_rng = example_rng(seed, NOOP_STREAMS[task["stream"]], task["index"])
        if pad_rng.random() < noop_clause:
            rec["instruction"] = pad_with_noop(ex.instruction, ex.source, ex.ops, pad_rng, changed)
    if open_place > 0:
        rec["open"] = is_open(ex.ops)
    rec.update(task["extra"])
    return rec


def instruction_records(seed: int, n: int, combos: Sequence[Sequence[str]], exclude_scenes: frozenset = frozenset(), *,
                        frames: int = 9, size: int = 32, open_place: float = 0.0) -> list[dict]:
    """``n`` compound instructions with their ``ops`` and source ``scene`` and no video, target or mask: text for the
    toy instructor to learn to read (``toy.instructor_compound``), the toy counterpart of the instructions a
    pretrained VLM has read. Instruction ``i`` uses ``combos[i % len(combos)]`` (the chain passes the *seen*
    combos, as its GRPO prompts) and is a pure function of ``(seed, i)`` (stream ``instructions``); scenes in
    ``exclude_scenes`` (the evaluation's) are redrawn."""
    recs = []
    for i in range(n):
        rng = example_rng(seed, "instructions", i)
        combo = list(combos[i % len(combos)])
        ex = sample_example(rng, ordered_types(rng, combo) if len(combo) > 1 else combo, num_frames=frames,
                            height=size, width=size, exclude_scenes=exclude_scenes, open_place=open_place)
        recs.append({"id": f"instr-{i:06d}", **ex.to_json()})
    return recs


def _build_chunk(tasks: list[dict], **kwargs) -> list[dict]:
    return [_build_one(t, **kwargs) for t in tasks]


def _one_torch_thread() -> None:
    """Worker-process initializer: one torch thread per worker (the workers already fill the cores). Never run
    in the calling process: the toy chain builds its data in-process and then trains in the same process."""
    import torch

    torch.set_num_threads(1)


def _run(tasks: list[dict], workers: int, desc: str, **kwargs) -> list[dict]:
    if not tasks:
        return []
    chunk = max(1, min(64, len(tasks) // (4 * workers) or 1))
    chunks = [tasks[i:i + chunk] for i in range(0, len(tasks), chunk)]
    fn = partial(_build_chunk, **kwargs)
    out: list[dict] = []
    with tqdm(total=len(tasks), desc=desc, unit="ex", disable=None) as bar:
        if workers <= 1:  # in this process: one torch thread while building (tiny tensors), then as before
            import torch

            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                for c in chunks:
                    out += fn(c)
                    bar.update(len(c))
            finally:
                torch.set_num_threads(threads)
        else:
            with ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_one_torch_thread) as pool:
                for res in pool.map(fn, chunks):  # map keeps the order: output independent of workers
                    out += res
                    bar.update(len(res))
    return out


def build_toy_dataset(
    out_dir: str | os.PathLike,
    *,
    seed: int = 0,
    n_sft_video: int = 2000,
    n_sft_image: int = 1000,
    n_sft_compound_video: int = 0,
    n_sft_compound_image: int = 0,
    n_grpo: int = 256,
    n_eval_compound: int = 64,
    n_eval_simple: int = 64,
    frames: int = 9,
    size: int = 32,
    fps: float = 8.0,
    image_only_types: Sequence[str] = ("replace",),
    heldout_combo_fraction: float = 0.3,
    max_ops: int = 3,
    open_place: float = 0.0,
    grpo_types: Sequence[str] | None = None,
    eval_simple_types: Sequence[str] | None = None,
    noop_clause: float = 0.0,
    workers: int = 1,
    overwrite: bool = False,
) -> dict[str, Path]:
    """Write ``sft.jsonl``, ``grpo.jsonl``, ``eval.jsonl``, ``world.json`` and ``videos/`` under ``out_dir``.

    Returns ``{"sft": path, "grpo": path, "eval": path, "world": path}``. ``workers`` > 1 writes files in
    that many spawned processes (the output does not depend on it); measured on 2 busy CPU cores, one
    process writes about 40 video pairs/s (FFV1 encoding dominates) and the default counts take ~40 s,
    while spawning workers (each imports torch) only pays off for much larger builds.
    """
    check_geometry(frames, size)
    bad = [t for t in image_only_types if t not in EDIT_TYPES]
    if bad:
        raise UserError(f"image_only_types {bad}: choose from {', '.join(EDIT_TYPES)}")
    video_types = [t for t in EDIT_TYPES if t not in image_only_types]
    if n_sft_video and not video_types:
        raise UserError("image_only_types leaves no edit type for SFT video pairs; reserve fewer types")
    if not 2 <= max_ops <= 3:
        raise UserError(f"max_ops={max_ops}: compound edits here have 2 or 3 operations")
    counts = {"n_sft_video": n_sft_video, "n_sft_image": n_sft_image, "n_sft_compound_video": n_sft_compound_video,
              "n_sft_compound_image": n_sft_compound_image, "n_grpo": n_grpo,
              "n_eval_compound": n_eval_compound, "n_eval_simple": n_eval_simple}
    negative = [k for k, v in counts.items() if v < 0]
    if negative:
        raise UserError(f"{', '.join(negative)} must be >= 0")
    if not 0 <= heldout_combo_fraction < 1:
        raise UserError(f"heldout_combo_fraction={heldout_combo_fraction}: use a value in [0, 1)")
    if workers < 1:
        raise UserError(f"workers={workers}: use 1 or more processes")
    check_open_edit_params(open_place, grpo_types, eval_simple_types)
    from ...recipe import check_fraction, check_output_dir

    check_fraction("noop_clause", noop_clause)

    check_output_dir("--out", out_dir)
    out = Path(out_dir)
    videos = out / "videos"
    if videos.exists():
        if not overwrite:
            raise UserError(f"{out} already holds a toy dataset; pass overwrite=True (--overwrite) or another folder")
        shutil.rmtree(videos)
    videos.mkdir(parents=True)
    seen, held = split_combos(seed, heldout_combo_fraction, max_ops)
    total = sum(counts.values())
    kwargs = {"seed": seed, "size": size, "fps": fps, "out_dir": str(out), "open_place": open_place,
              "noop_clause": noop_clause}
    simple_eval_types = list(eval_simple_types or EDIT_TYPES)
    t0 = time.perf_counter()

    eval_tasks = []
    for i in range(n_eval_compound):
        novel = bool(held) and i % 2 == 0
        pool = held if novel else seen
        combo = pool[(i // 2 if held else i) % len(pool)]
        eval_tasks.append(_task("eval_compound", i, f"eval-c{i:05d}", combo, frames,
                                {"split": "compound", "novel_combo": novel}))
    for i in range(n_eval_simple):
        eval_tasks.append(_task("eval_simple", i, f"eval-s{i:05d}", [simple_eval_types[i % len(simple_eval_types)]], frames,
                                {"split": "simple"}))
    eval_recs = _run(eval_tasks, workers, "toy eval", exclude=frozenset(), **kwargs)
    exclude = frozenset(scene_fingerprint(scene_from_json(r["scene"])) for r in eval_recs)

    train_tasks = [_task("sft_video", i, f"sft-v{i:06d}", [video_types[i % len(video_types)]], frames)
                   for i in range(n_sft_video)]
    train_tasks += [_task("sft_image", i, f"sft-i{i:06d}", [EDIT_TYPES[i % len(EDIT_TYPES)]], 1)
                    for i in range(n_sft_image)]
    train_tasks += [_task("sft_compound_video", i, f"sft-cv{i:06d}", seen[i % len(seen)], frames)
                    for i in range(n_sft_compound_video)]
    train_tasks += [_task("sft_compound_image", i, f"sft-ci{i:06d}", seen[i % len(seen)], 1)
                    for i in range(n_sft_compound_image)]
    grpo_pool = [[t] for t in grpo_types] if grpo_types else seen
    train_tasks += [_task("grpo", i, f"grpo-{i:06d}", grpo_pool[i % len(grpo_pool)], frames) for i in range(n_grpo)]
    train_recs = _run(train_tasks, workers, "toy train", exclude=exclude, **kwargs)
    elapsed = time.perf_counter() - t0

    sft = [r for r in train_recs if r["id"].startswith("sft-")]
    grpo = [{k: v for k, v in r.items() if k not in ("target", "mask")} for r in train_recs if r["id"].startswith("grpo-")]
    paths = {"sft": out / "sft.jsonl", "grpo": out / "grpo.jsonl", "eval": out / "eval.jsonl", "world": out / "world.json"}
    write_manifest(paths["sft"], sft)
    write_manifest(paths["grpo"], grpo)
    write_manifest(paths["eval"], eval_recs)
    world = {
        "format_version": FORMAT_VERSION, "generator": "viva_base.data.toyworld",
        "seed": seed, "frames": frames, "size": size, "fps": fps,
        "counts": {"sft_video": n_sft_video, "sft_image": n_sft_image, "sft_compound_video": n_sft_compound_video,
                   "sft_compound_image": n_sft_compound_image, "grpo": n_grpo,
                   "eval_compound": n_eval_compound, "eval_simple": n_eval_simple},
        "video_sft_types": video_types, "image_only_types": list(image_only_types), "max_ops": max_ops,
        "heldout_combo_fraction": heldout_combo_fraction, "open_place": open_place, "noop_clause": noop_clause,
        "grpo_types": list(grpo_types) if grpo_types else None,
        "eval_simple_types": list(eval_simple_types) if eval_simple_types else None,
        "grpo_combos": [list(c) for c in seen], "heldout_combos": [list(c) for c in held],
        "vocabulary": {"shapes": list(SHAPES), "object_colours": list(OBJECT_COLOURS),
                       "sizes_px_at_32": SIZE_PX_AT_32, "background_styles": list(STYLES),
                       "background_colours": list(BACKGROUND_COLOURS), "variants": list(VARIANTS),
                       "places": list(PLACES), "motions": list(MOTIONS)},
        "manifests": {k: p.name for k, p in paths.items() if k != "world"},
    }
    _write_json(paths["world"], world)
    logger.info("toy world: %d examples in %.1f s (%.1f examples/s, %d workers) -> %s",
                total, elapsed, total / max(elapsed, 1e-9), workers, out)
    return paths


def _write_json(path: Path, obj: dict) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m viva_base.data.toyworld.build",
                                description="Write the toy world's SFT, Edit-GRPO and evaluation manifests.")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-sft-video", type=int, default=2000)
    p.add_argument("--n-sft-image", type=int, default=1000)
    p.add_argument("--n-sft-compound-video", type=int, default=0, help="compound video pairs (seen combos)")
    p.add_argument("--n-sft-compound-image", type=int, default=0, help="compound 1-frame pairs (seen combos)")
    p.add_argument("--n-grpo", type=int, default=256)
    p.add_argument("--n-eval-compound", type=int, default=64)
    p.add_argument("--n-eval-simple", type=int, default=64)
    p.add_argument("--frames", type=int, default=9, help="frames per video (4k + 1)")
    p.add_argument("--size", type=int, default=32, help="frame side in pixels (multiple of 16)")
    p.add_argument("--fps", type=float, default=8.0)
    p.add_argument("--image-only-types", nargs="*", default=["replace"],
                   help=f"edit types only image pairs carry in SFT (of {', '.join(EDIT_TYPES)}); none: pass no value")
    p.add_argument("--heldout-combo-fraction", type=float, default=0.3)
    p.add_argument("--max-ops", type=int, default=3)
    p.add_argument("--open-place", type=float, default=0.0,
                   help="probability that an add leaves its place open (several correct edits); default 0")
    p.add_argument("--grpo-types", nargs="+", default=None,
                   help="make the GRPO prompts simple ones of these edit types (default: compound combos)")
    p.add_argument("--eval-simple-types", nargs="+", default=None,
                   help="edit types of the simple eval prompts (default: all)")
    p.add_argument("--noop-clause", type=float, default=0.0,
                   help="probability that a simple SFT pair's instruction gets a phrase asking for nothing ('leave the "
                        "background unchanged') before or after its edit; default 0")
    p.add_argument("--workers", type=int, default=1, help="writer processes (output is the same for any number)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset in --out")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        paths = build_toy_dataset(
            args.out, seed=args.seed, n_sft_video=args.n_sft_video, n_sft_image=args.n_sft_image,
            n_sft_compound_video=args.n_sft_compound_video, n_sft_compound_image=args.n_sft_compound_image,
            n_grpo=args.n_grpo, n_eval_compound=args.n_eval_compound, n_eval_simple=args.n_eval_simple,
            frames=args.frames, size=args.size, fps=args.fps, image_only_types=args.image_only_types,
            heldout_combo_fraction=args.heldout_combo_fraction, max_ops=args.max_ops, open_place=args.open_place,
            grpo_types=args.grpo_types, eval_simple_types=args.eval_simple_types, noop_clause=args.noop_clause,
            workers=args.workers,
            overwrite=args.overwrite)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    from viva_base.errors import exit_with

    exit_with(main)
