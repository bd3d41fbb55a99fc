"""Edit examples in memory: a source scene, a sequence of operations, the target scene and an instruction,
rendered to tensors on demand (no files). The builder (:mod:`.build`) writes these to manifests; training
code may also sample fresh pairs directly with :func:`sample_example` or :class:`ToyPairs`.

Every random draw comes from a ``numpy.random.Generator``; :func:`example_rng` derives it from
``(seed, stream, index)`` with ``numpy.random.SeedSequence``, so example ``i`` of a stream is the same
whatever else is generated, in whatever order or process.
"""
from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from .edits import (EDIT_TYPES, Op, apply_op, edit_type, instruction, mask_from_renders, new_keys, op_to_json,
                    sample_op)
from .render import changed_pixels, footprints, render, to_tensor, visible_footprints
from .scene import Scene, caption, random_background, random_object, scene_to_json

STREAMS = {"sft_video": 1, "sft_image": 2, "grpo": 3, "eval_compound": 4, "eval_simple": 5, "fresh": 6, "combos": 7,
           "sft_compound_video": 8, "sft_compound_image": 9, "instructions": 10, "sft_video_noop": 11,
           "sft_image_noop": 12}
OBJECT_OPS = ("remove", "replace", "recolour")


def example_rng(seed: int, stream: str, index: int) -> np.random.Generator:
    """Independent generator for example ``index`` of ``stream`` (a key of ``STREAMS``) under ``seed``."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), STREAMS[stream], int(index)]))


@dataclass(frozen=True)
class ToyExample:
    source: Scene
    ops: tuple[Op, ...]
    target: Scene
    instruction: str

    @property
    def source_caption(self) -> str:
        return caption(self.source)

    @property
    def target_caption(self) -> str:
        return caption(self.target)

    @property
    def edit_type(self) -> str:
        return edit_type(self.ops)

    def render(self) -> dict[str, torch.Tensor]:
        """``source``/``target`` ``(F, 3, H, W)`` float32 in [0, 1] and ``mask`` ``(F, 1, H, W)`` in {0, 1}."""
        a, b = render(self.source), render(self.target)
        return {"source": to_tensor(a), "target": to_tensor(b), "mask": mask_from_renders(a, b)}

    def to_json(self) -> dict:
        """The text and op fields of a manifest line (no file paths)."""
        return {"instruction": self.instruction, "source_caption": self.source_caption,
                "target_caption": self.target_caption, "edit_type": self.edit_type,
                "ops": [op_to_json(op) for op in self.ops], "scene": scene_to_json(self.source)}


def scene_fingerprint(scene: Scene) -> str:
    return json.dumps(scene_to_json(scene), sort_keys=True)


def random_scene(rng: np.random.Generator, *, num_frames: int = 9, height: int = 32, width: int = 32,
                 min_objects: int = 1, max_objects: int = 3, min_visible: float = 0.6, max_tries: int = 200) -> Scene:
    """A random scene whose objects each show at least ``min_visible`` of their footprint over the video
    (summed over frames), so that every object can be seen and named. Objects move in videos, not in images."""
    n = int(rng.integers(min_objects, max_objects + 1))
    for _ in range(max_tries):
        objs: list = []
        for _ in range(n):
            objs.append(random_object(rng, height, width, exclude_keys=[o.key for o in objs], moving=num_frames > 1))
        scene = Scene(random_background(rng), tuple(objs), num_frames, height, width, int(rng.integers(2**31)))
        full = footprints(scene).sum(axis=(1, 2, 3))
        vis = visible_footprints(scene).sum(axis=(1, 2, 3))
        if np.all(vis >= min_visible * full):
            return scene
    raise RuntimeError(f"could not place {n} visible objects in {max_tries} tries at {height}x{width}; "
                       "use larger frames or fewer objects")


def sample_example(rng: np.random.Generator, op_types: Sequence[str], *, num_frames: int = 9, height: int = 32,
                   width: int = 32, max_objects: int = 3, exclude_scenes: frozenset | set = frozenset(),
                   max_tries: int = 100, open_place: float = 0.0) -> ToyExample:
    """A random example with one operation per entry of ``op_types``, in that order.

    Guarantees: each operation changes at least one pixel of the scene it applies to; operations touch
    distinct objects (none edits an object another one added or changed, so every reference names an
    object of the source); new (colour, shape) keys are new to the source; the source scene's
    fingerprint is not in ``exclude_scenes`` (used to keep training and evaluation scenes disjoint). An ``add``
    leaves its place open with probability ``open_place`` (:func:`.edits.sample_op`)."""
    for kind in op_types:
        if kind not in EDIT_TYPES:
            raise ValueError(f"unknown edit type {kind!r}; choose from {', '.join(EDIT_TYPES)}")
    n_targets = sum(k in OBJECT_OPS for k in op_types)
    if n_targets > max_objects:
        raise ValueError(f"{list(op_types)} edits {n_targets} objects but scenes hold at most {max_objects}")
    for _ in range(max_tries):
        src = random_scene(rng, num_frames=num_frames, height=height, width=width,
                           min_objects=max(1, n_targets), max_objects=max_objects)
        if exclude_scenes and scene_fingerprint(src) in exclude_scenes:
            continue
        ops = _sample_ops(rng, src, op_types, max_objects + 1, open_place)
        if ops is None:
            continue
        tgt = src
        for op in ops:
            tgt = apply_op(tgt, op)
        return ToyExample(src, tuple(ops), tgt, instruction(src, ops, rng))
    raise RuntimeError(f"could not sample a valid {list(op_types)} edit in {max_tries} tries")


def _sample_ops(rng: np.random.Generator, src: Scene, op_types: Sequence[str], max_objects: int,
                open_place: float = 0.0) -> list | None:
    protected: set = set()
    forbidden = {o.key for o in src.objects}
    scene, before, ops = src, render(src), []
    for kind in op_types:
        op = sample_op(rng, scene, kind, protected=protected, forbidden_keys=forbidden, max_objects=max_objects,
                       open_place=open_place)
        if op is None:
            return None
        keys = new_keys(op, scene)
        nxt = apply_op(scene, op)
        after = render(nxt)
        if not changed_pixels(before, after).any():
            return None
        protected |= keys
        forbidden |= keys
        ops.append(op)
        scene, before = nxt, after
    return ops


# ------------------------------------------------------------------------------ compound combos

def compound_combos(max_ops: int = 3) -> list[tuple[str, ...]]:
    """All sets of 2..``max_ops`` distinct edit types, as sorted tuples (10 pairs + 10 triples for 3)."""
    out = []
    for k in range(2, max_ops + 1):
        out += [tuple(c) for c in itertools.combinations(sorted(EDIT_TYPES), k)]
    return out


def split_combos(seed: int, heldout_fraction: float, max_ops: int = 3) -> tuple[list, list]:
    """``(seen, heldout)``: a seeded split of :func:`compound_combos`; held-out combos never appear in
    Edit-GRPO prompts, only in evaluation. At least one combo stays seen."""
    combos = compound_combos(max_ops)
    order = example_rng(seed, "combos", 0).permutation(len(combos))
    n_held = min(len(combos) - 1, round(heldout_fraction * len(combos)))
    held = sorted(combos[i] for i in order[:n_held])
    seen = sorted(combos[i] for i in order[n_held:])
    return seen, held


def ordered_types(rng: np.random.Generator, combo: Sequence[str]) -> list[str]:
    """The combo's edit types in a random order (the order of the phrases in the instruction)."""
    return [combo[i] for i in rng.permutation(len(combo))]


# ---------------------------------------------------------------------------- torch dataset

class ToyPairs(torch.utils.data.Dataset):
    """Fresh paired examples rendered in memory, item ``i`` a pure function of ``(seed, i)``.

    Items have the keys of :class:`viva_base.data.pairs.PairDataset` (``id``, ``source``, ``target``,
    ``mask``, ``instruction``, ``reference``, ``is_image``) plus ``source_caption``, ``target_caption``,
    ``edit_type`` and ``ops`` (JSON). ``compound=False`` draws one operation of ``edit_types``;
    ``compound=True`` draws a combo of 2..``max_ops`` distinct types from ``combos`` (default: all)."""

    def __init__(self, seed: int, length: int, *, edit_types: Sequence[str] = EDIT_TYPES, compound: bool = False,
                 combos: Sequence[Sequence[str]] | None = None, max_ops: int = 3, num_frames: int = 9,
                 height: int = 32, width: int = 32):
        self.seed, self.length = seed, length
        self.edit_types = tuple(edit_types)
        self.combos = [tuple(c) for c in (combos or compound_combos(max_ops))] if compound else None
        self.num_frames, self.height, self.width = num_frames, height, width

    def __len__(self) -> int:
        return self.length

    def example(self, i: int) -> ToyExample:
        if not 0 <= i < self.length:
            raise IndexError(i)
        rng = example_rng(self.seed, "fresh", i)
        if self.combos:
            types = ordered_types(rng, self.combos[int(rng.integers(len(self.combos)))])
        else:
            types = [self.edit_types[int(rng.integers(len(self.edit_types)))]]
        return sample_example(rng, types, num_frames=self.num_frames, height=self.height, width=self.width)

    def __getitem__(self, i: int) -> dict:
        ex = self.example(i)
        item = ex.render()
        item.update(id=f"fresh-{i:06d}", reference=None, is_image=self.num_frames == 1, **{
            k: v for k, v in ex.to_json().items() if k != "scene"})
        return item


__all__ = ["ToyExample", "ToyPairs", "example_rng", "random_scene", "sample_example", "scene_fingerprint",
           "compound_combos", "split_combos", "ordered_types", "STREAMS"]
