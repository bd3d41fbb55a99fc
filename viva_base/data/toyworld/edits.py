"""Edit operations as data, their application to scenes, exact edit masks and instruction templates.

Operations (applied in order by :func:`apply`; an ``index`` refers to the scene as it is when the
operation is applied, so a compound edit is a sequence of simple ones):

* :class:`Add` ``(obj, where, motion)``: put ``obj`` on top of the z-order. Added objects start at one of
  nine named places (``"top left"`` ... ``"bottom right"``) and stand still or move 1 px/frame (at 32x32)
  in a named direction, so the instruction ("add a small red square in the top left corner moving
  right") determines the target video exactly.
* :class:`Remove` ``(index)``, :class:`Replace` ``(index, shape, colour)`` (new shape, optionally new
  colour; size and trajectory kept), :class:`Recolour` ``(index, colour)``.
* :class:`SetBackground` ``(style, colour, variant)``: fields left ``None`` are kept (a global change;
  objects are untouched).

**Open edits.** An :class:`Add` with ``free=("where",)`` is an instruction that leaves the place open ("add a small
red square moving right"): the example's target puts the object at one of the nine places, but every place is a
correct edit. :func:`admissible_ops` enumerates the correct edits of such an instruction and the oracle scores an
edited video against the best of them (:func:`viva_base.data.toyworld.oracle.best_oracle_scores`). A toy
instruction otherwise fixes its target exactly, so a flow model trained on it learns a point mass and the samples
of a prompt differ only in pixel noise; an open instruction has several correct answers, as real instructions do.

The edit mask is the set of pixels whose rendered colour changes: ``M[f, 0, i, j] = 1`` iff
``render(src)[f, i, j] != render(tgt)[f, i, j]`` in any channel.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Sequence, Union

import numpy as np
import torch

from .render import changed_pixels, footprints, render
from .scene import (BACKGROUND_COLOURS, OBJECT_COLOURS, SHAPES, SIZES, STYLES, VARIANTS, Background,
                    Obj, Scene, obj_from_json, obj_to_json, object_bounds, speed_unit, style_colour)

PLACES = {  # name -> (fraction of width, fraction of height)
    "top left": (0.25, 0.25), "top": (0.5, 0.25), "top right": (0.75, 0.25),
    "left": (0.25, 0.5), "centre": (0.5, 0.5), "right": (0.75, 0.5),
    "bottom left": (0.25, 0.75), "bottom": (0.5, 0.75), "bottom right": (0.75, 0.75),
}
PLACE_PHRASES = {
    "top left": "in the top left corner", "top": "at the top", "top right": "in the top right corner",
    "left": "on the left", "centre": "in the centre", "right": "on the right",
    "bottom left": "in the bottom left corner", "bottom": "at the bottom", "bottom right": "in the bottom right corner",
}
MOTIONS = {"still": (0, 0), "left": (-2, 0), "right": (2, 0), "up": (0, -2), "down": (0, 2)}  # in speed units
MOTION_PHRASES = {
    "still": ("", " that stays still", " that does not move"),
    "left": (" moving left", " that moves to the left"),
    "right": (" moving right", " that moves to the right"),
    "up": (" moving up", " that moves upwards"),
    "down": (" moving down", " that moves downwards"),
}
EDIT_TYPES = ("add", "remove", "replace", "recolour", "background")


FREE_FIELDS = ("where",)  # what an instruction may leave open (module docstring, "Open edits")


@dataclass(frozen=True)
class Add:
    obj: Obj
    where: str | None = None  # a PLACES name, used by the instruction
    motion: str | None = None  # a MOTIONS name
    free: tuple[str, ...] = ()  # fields of FREE_FIELDS the instruction leaves open (any value is a correct edit)

    def __post_init__(self):
        bad = [f for f in self.free if f not in FREE_FIELDS]
        if bad:
            raise ValueError(f"Add.free {bad}: an instruction can leave open only {list(FREE_FIELDS)}")
        if "where" in self.free and self.where is None:
            raise ValueError("Add.free has 'where' but no place: an open place still needs the example's place")

    @staticmethod
    def place(shape: str, colour: str, size: str, where: str, motion: str, height: int, width: int,
              free: tuple[str, ...] = ()) -> "Add":
        """The Add whose object sits at the named place and moves in the named direction."""
        if where not in PLACES:
            raise ValueError(f"unknown place {where!r}; choose one of {', '.join(PLACES)}")
        if motion not in MOTIONS:
            raise ValueError(f"unknown motion {motion!r}; choose one of {', '.join(MOTIONS)}")
        fx, fy = PLACES[where]
        x_lo, x_hi, y_lo, y_hi = object_bounds(size, height, width)
        x = min(max(math.floor(fx * width * 4) / 4, x_lo), x_hi)
        y = min(max(math.floor(fy * height * 4) / 4, y_lo), y_hi)
        u = speed_unit(height, width)
        mx, my = MOTIONS[motion]
        return Add(Obj(shape, colour, size, x, y, mx * u, my * u), where, motion, tuple(free))

    def moved_to(self, where: str, height: int, width: int) -> "Add":
        """The same Add (object, motion, ``free``) at another named place."""
        o = self.obj
        return Add.place(o.shape, o.colour, o.size, where, self.motion or "still", height, width, self.free)


@dataclass(frozen=True)
class Remove:
    index: int


@dataclass(frozen=True)
class Replace:
    index: int
    shape: str
    colour: str | None = None  # None: keep the colour


@dataclass(frozen=True)
class Recolour:
    index: int
    colour: str


@dataclass(frozen=True)
class SetBackground:
    style: str | None = None
    colour: str | None = None
    variant: str | None = None


Op = Union[Add, Remove, Replace, Recolour, SetBackground]
_TYPE_OF = {Add: "add", Remove: "remove", Replace: "replace", Recolour: "recolour", SetBackground: "background"}


def op_type(op: Op) -> str:
    return _TYPE_OF[type(op)]


def edit_type(ops: Sequence[Op]) -> str:
    """The manifest's ``edit_type``: the operation's type for one op, ``"compound"`` for several."""
    return op_type(ops[0]) if len(ops) == 1 else "compound"


class EditError(ValueError):
    """An operation that does not apply to the scene (bad index, no change, duplicate object)."""


def _target(scene: Scene, index: int, op: Op) -> Obj:
    if not 0 <= index < len(scene.objects):
        raise EditError(f"{op}: index {index} out of range for a scene with {len(scene.objects)} objects")
    return scene.objects[index]


def apply_op(scene: Scene, op: Op) -> Scene:
    """The scene after one operation; :class:`EditError` if it changes nothing or breaks key uniqueness."""
    objs = list(scene.objects)
    if isinstance(op, Add):
        objs.append(op.obj)
    elif isinstance(op, Remove):
        _target(scene, op.index, op)
        del objs[op.index]
    elif isinstance(op, Replace):
        o = _target(scene, op.index, op)
        if op.shape == o.shape:
            raise EditError(f"{op}: a replacement must change the shape (use Recolour for colour only)")
        objs[op.index] = dataclasses.replace(o, shape=op.shape, colour=op.colour or o.colour)
    elif isinstance(op, Recolour):
        o = _target(scene, op.index, op)
        if op.colour == o.colour:
            raise EditError(f"{op}: the object is already {op.colour}")
        objs[op.index] = dataclasses.replace(o, colour=op.colour)
    elif isinstance(op, SetBackground):
        old = scene.background
        new = Background(op.style or old.style, op.colour or old.colour, op.variant or old.variant)
        if new == old:
            raise EditError(f"{op}: the background is already {old}")
        return scene.replace(background=new)
    else:
        raise EditError(f"unknown operation {op!r}")
    try:
        return scene.replace(objects=tuple(objs))
    except ValueError as exc:
        raise EditError(f"{op}: {exc}") from None


def apply(scene: Scene, ops: Sequence[Op]) -> Scene:
    """Apply ``ops`` in order (each index refers to the scene left by the previous operations)."""
    for op in ops:
        scene = apply_op(scene, op)
    return scene


def edit_mask(src: Scene, tgt: Scene) -> torch.Tensor:
    """``(F, 1, H, W)`` float32 in {0, 1}: 1 exactly where ``render(src)`` and ``render(tgt)`` differ."""
    return mask_from_renders(render(src), render(tgt))


def mask_from_renders(a: np.ndarray, b: np.ndarray) -> torch.Tensor:
    """Edit mask of two uint8 ``(F, H, W, 3)`` renders as ``(F, 1, H, W)`` float32 in {0, 1}."""
    return torch.from_numpy(changed_pixels(a, b)).float()[:, None]


# ------------------------------------------------------------------------------------ JSON

def op_to_json(op: Op) -> dict:
    if isinstance(op, Add):
        d = {"op": "add", "object": obj_to_json(op.obj), "where": op.where, "motion": op.motion,
             "free": list(op.free) or None}
    else:
        d = {"op": op_type(op), **dataclasses.asdict(op)}
    return {k: v for k, v in d.items() if v is not None}


def op_from_json(d: dict) -> Op:
    d = dict(d)
    kind = d.pop("op", None)
    if kind == "add":
        return Add(obj_from_json(d["object"]), d.get("where"), d.get("motion"), tuple(d.get("free") or ()))
    cls = {"remove": Remove, "replace": Replace, "recolour": Recolour, "background": SetBackground}.get(kind)
    if cls is None:
        raise ValueError(f"unknown op {kind!r}; choose one of {', '.join(EDIT_TYPES)}")
    return cls(**d)


# ---------------------------------------------------------------------------- instructions

REMOVE_TEMPLATES = ("remove {ref}", "delete {ref}", "get rid of {ref}", "take {ref} out of the scene", "erase {ref}")
ADD_TEMPLATES = ("add {new}{where}{motion}", "put {new}{where}{motion}", "insert {new}{where}{motion}",
                 "place {new}{where}{motion}")
REPLACE_TEMPLATES = ("replace {ref} with {new}", "turn {ref} into {new}", "swap {ref} for {new}",
                     "change {ref} into {new}")
RECOLOUR_TEMPLATES = ("make {ref} {colour}", "paint {ref} {colour}", "change the colour of {ref} to {colour}",
                      "recolour {ref} {colour}", "turn {ref} {colour}")
VARIANT_TEMPLATES = {
    "night": ("make it night", "turn the scene into night", "make the background night", "set the scene at night"),
    "snow": ("make it snow", "add falling snow", "make it a snowy scene", "let it snow"),
    "day": ("make it daytime", "change the scene to day", "make the background daylight", "make it day"),
}
BACKGROUND_TEMPLATES = ("change the background to {bg}", "replace the background with {bg}", "use {bg} instead",
                        "switch the background to {bg}")
VARIANT_TAILS = {"night": " at night", "snow": " with falling snow", "day": " in daylight"}
JOIN_TEMPLATES = {
    2: ("{0} and {1}", "{0}, then {1}", "{0} and also {1}", "first {0}, then {1}"),
    3: ("{0}, {1} and {2}", "{0}, then {1}, then {2}", "first {0}, then {1} and finally {2}"),
}


NOOP_TEMPLATES = ("keep {ref} as it is", "leave {ref} unchanged", "do not touch {ref}", "keep {ref} the same")
BACKGROUND_NOOP_TEMPLATES = ("keep the background as it is", "leave the background unchanged",
                             "do not change the background", "keep the rest of the scene the same")


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def object_reference(obj: Obj, rng: np.random.Generator, *, relative: bool = True) -> str:
    """A phrase naming ``obj`` uniquely in its scene: 'the red square', 'the large red square', and with
    ``relative`` also 'the square that is red' (not before a colour word: 'paint the square that is red blue')."""
    options = [f"the {obj.colour} {obj.shape}", f"the {obj.size} {obj.colour} {obj.shape}", f"the {obj.colour} {obj.shape}"]
    if relative:
        options.append(f"the {obj.shape} that is {obj.colour}")
    return _pick(rng, options)


def describe_op(op: Op, scene: Scene, rng: np.random.Generator) -> str:
    """One phrase for ``op`` applied to ``scene`` (the scene just before the operation)."""
    if isinstance(op, Remove):
        return _pick(rng, REMOVE_TEMPLATES).format(ref=object_reference(_target(scene, op.index, op), rng))
    if isinstance(op, Add):
        o = op.obj
        where = " " + PLACE_PHRASES[op.where] if op.where and "where" not in op.free else ""
        motion = _pick(rng, MOTION_PHRASES[op.motion]) if op.motion else ""
        return _pick(rng, ADD_TEMPLATES).format(new=o.phrase(), where=where, motion=motion)
    if isinstance(op, Replace):
        o = _target(scene, op.index, op)
        ref = object_reference(o, rng)
        if op.colour and op.colour != o.colour:
            new = f"a {op.colour} {op.shape}"
        else:
            new = _pick(rng, (f"a {op.shape}", f"a {o.colour} {op.shape}"))
        return _pick(rng, REPLACE_TEMPLATES).format(ref=ref, new=new)
    if isinstance(op, Recolour):
        ref = object_reference(_target(scene, op.index, op), rng, relative=False)
        return _pick(rng, RECOLOUR_TEMPLATES).format(ref=ref, colour=op.colour)
    if isinstance(op, SetBackground):
        old = scene.background
        new = Background(op.style or old.style, op.colour or old.colour, op.variant or old.variant)
        look_changed = (new.style, new.colour) != (old.style, old.colour)
        if not look_changed:
            return _pick(rng, VARIANT_TEMPLATES[new.variant])
        if new.style == old.style and rng.random() < 0.5:
            text = f"make the background {new.colour}"
        else:
            text = _pick(rng, BACKGROUND_TEMPLATES).format(
                bg=f"a {style_colour(new.style, new.colour)} background")
        return text + (VARIANT_TAILS[new.variant] if new.variant != old.variant else "")
    raise EditError(f"unknown operation {op!r}")


def instruction(scene: Scene, ops: Sequence[Op], rng: np.random.Generator) -> str:
    """The instruction ``t_ins`` for ``ops`` on ``scene``: one phrase per operation (each described on the
    scene it applies to), joined by a template for 2 or 3 operations ('... and ...', 'first ..., then ...')."""
    if not ops:
        raise EditError("an instruction needs at least one operation")
    phrases = []
    for op in ops:
        phrases.append(describe_op(op, scene, rng))
        scene = apply_op(scene, op)
    if len(phrases) == 1:
        return phrases[0]
    if len(phrases) in JOIN_TEMPLATES:
        return _pick(rng, JOIN_TEMPLATES[len(phrases)]).format(*phrases)
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def noop_phrase(scene: Scene, ops: Sequence[Op], rng: np.random.Generator,
                changed: np.ndarray | None = None) -> str | None:
    """A phrase that asks for nothing: keep an object of ``scene`` that ``ops`` leave exactly as it was (no pixel
    it covers changes: not the object an operation acts on, nor one an added object overlaps or a removed one
    uncovers), or the background when no operation sets it ('leave the blue circle unchanged'); None when there is
    nothing to keep. ``changed``: the ``(F, H, W)`` changed-pixel map of ``ops`` on ``scene``
    (:func:`.render.changed_pixels` of the source and target renders) when the caller has it; else it is rendered."""
    if changed is None:
        changed = changed_pixels(render(scene), render(apply(scene, ops)))
    kept = ~(footprints(scene) & changed[None]).reshape(len(scene.objects), -1).any(axis=1)
    options = [("object", i) for i in range(len(scene.objects)) if kept[i]]
    if not any(isinstance(op, SetBackground) for op in ops):
        options.append(("background", None))
    if not options:
        return None
    kind, i = options[int(rng.integers(len(options)))]
    if kind == "background":
        return _pick(rng, BACKGROUND_NOOP_TEMPLATES)
    return _pick(rng, NOOP_TEMPLATES).format(ref=object_reference(scene.objects[i], rng, relative=False))


def pad_with_noop(text: str, scene: Scene, ops: Sequence[Op], rng: np.random.Generator,
                  changed: np.ndarray | None = None) -> str:
    """``text`` (the instruction of ``ops`` on ``scene``) with a :func:`noop_phrase` before or after it, joined like
    two operations ('leave the background unchanged and paint the red square blue'). The edit, and so the target,
    stay those of ``ops``. Why (docs/toy_world.md, "fifteenth pass"): an editor trained only on one-phrase
    instructions does the edit a phrase names first, so a leading 'keep ... as it is' cut its edits to a third.
    ``changed`` as for :func:`noop_phrase`."""
    phrase = noop_phrase(scene, ops, rng, changed)
    if phrase is None:
        return text
    pair = (phrase, text) if rng.random() < 0.5 else (text, phrase)
    return _pick(rng, JOIN_TEMPLATES[2]).format(*pair)


# --------------------------------------------------------------------------------- sampling

def sample_op(rng: np.random.Generator, scene: Scene, kind: str, *, protected: set = frozenset(),
              forbidden_keys: set = frozenset(), max_objects: int = 4, open_place: float = 0.0) -> Op | None:
    """A random operation of type ``kind`` valid on ``scene``, or None when none is possible.

    Objects whose key is in ``protected`` are not targeted; new (colour, shape) keys avoid
    ``forbidden_keys`` and the scene's own keys. An ``add`` leaves its place open (``free=("where",)``, module
    docstring) with probability ``open_place``; at 0 no extra random number is drawn, so datasets built before
    open edits existed are unchanged."""
    h, w = scene.height, scene.width
    taken = {o.key for o in scene.objects} | set(forbidden_keys)
    targets = [i for i, o in enumerate(scene.objects) if o.key not in protected]
    if kind == "add":
        if len(scene.objects) >= max_objects:
            return None
        free = [(c, s) for c in OBJECT_COLOURS for s in SHAPES if (c, s) not in taken]
        colour, shape = free[int(rng.integers(len(free)))]
        size, where = _pick(rng, SIZES), _pick(rng, list(PLACES))
        motion = _pick(rng, list(MOTIONS)) if scene.num_frames > 1 else "still"  # images: no motion words
        left_open = ("where",) if open_place > 0 and rng.random() < open_place else ()
        return Add.place(shape, colour, size, where, motion, h, w, left_open)
    if kind == "background":
        bg = scene.background
        if rng.random() < 0.5:
            return SetBackground(variant=_pick(rng, [v for v in VARIANTS if v != bg.variant]))
        change = int(rng.integers(3))  # 0: colour, 1: style, 2: both
        colour = _pick(rng, [c for c in BACKGROUND_COLOURS if c != bg.colour]) if change != 1 else None
        style = _pick(rng, [s for s in STYLES if s != bg.style]) if change != 0 else None
        return SetBackground(style=style, colour=colour)
    if not targets:
        return None
    i = targets[int(rng.integers(len(targets)))]
    o = scene.objects[i]
    if kind == "remove":
        return Remove(i)
    if kind == "recolour":
        options = [c for c in OBJECT_COLOURS if c != o.colour and (c, o.shape) not in taken]
        return Recolour(i, _pick(rng, options)) if options else None
    if kind == "replace":
        new_colour = rng.random() < 0.5
        options = [(c, s) for s in SHAPES if s != o.shape
                   for c in ([c for c in OBJECT_COLOURS if c != o.colour] if new_colour else [o.colour])
                   if (c, s) not in taken]
        if not options:
            return None
        c, s = options[int(rng.integers(len(options)))]
        return Replace(i, s, c if new_colour else None)
    raise ValueError(f"unknown edit type {kind!r}; choose one of {', '.join(EDIT_TYPES)}")


def admissible_ops(scene: Scene, ops: Sequence[Op]) -> list[tuple[Op, ...]]:
    """Every correct edit of the instruction behind ``ops`` on ``scene``: ``[tuple(ops)]`` when no operation leaves
    anything open, else each combination of the open fields' values (an open place: the nine :data:`PLACES`)
    under which every operation still applies (no :class:`EditError`). The first is ``ops`` itself (the example's
    target), the others follow in :data:`PLACES` order."""
    import itertools

    choices = []
    for op in ops:
        if isinstance(op, Add) and "where" in op.free:
            choices.append([op.moved_to(p, scene.height, scene.width) for p in PLACES])
        else:
            choices.append([op])
    out = [tuple(ops)]
    for combo in itertools.product(*choices):
        if combo != out[0]:
            try:
                apply(scene, combo)
            except EditError:
                continue
            out.append(combo)
    return out


def admissible_truths(scene: Scene, ops: Sequence[Op]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(target (F, 3, H, W) in [0, 1], mask (F, 1, H, W))`` of every correct edit (:func:`admissible_ops`), rendered;
    the first is the one of ``ops`` itself."""
    from .render import to_tensor

    a = render(scene)
    out = []
    for combo in admissible_ops(scene, ops):
        b = render(apply(scene, combo))
        out.append((to_tensor(b), mask_from_renders(a, b)))
    return out


def is_open(ops: Sequence[Op]) -> bool:
    """Whether the instruction behind ``ops`` leaves a field open (several correct edits)."""
    return any(getattr(op, "free", ()) for op in ops)


def new_keys(op: Op, before: Scene) -> set:
    """(colour, shape) keys an operation brings into the scene."""
    if isinstance(op, Add):
        return {op.obj.key}
    if isinstance(op, Replace):
        return {(op.colour or before.objects[op.index].colour, op.shape)}
    if isinstance(op, Recolour):
        return {(op.colour, before.objects[op.index].shape)}
    return set()


__all__ = ["Add", "Remove", "Replace", "Recolour", "SetBackground", "Op", "EditError", "EDIT_TYPES", "PLACES",
           "MOTIONS", "op_type", "edit_type", "apply_op", "apply", "edit_mask", "mask_from_renders", "op_to_json",
           "op_from_json", "object_reference", "describe_op", "instruction", "noop_phrase", "pad_with_noop",
           "sample_op", "new_keys", "admissible_ops", "admissible_truths", "is_open", "FREE_FIELDS"]


# ------------------------------------------------------------------------------- the parse of an edit

def parse_slots() -> list[tuple[str, tuple[str, ...]]]:
    """The slots of :func:`edit_parse`, in order: ``(slot, values)``."""
    return [("op", EDIT_TYPES), ("object_colour", tuple(OBJECT_COLOURS)), ("object_shape", SHAPES),
            ("object_size", SIZES), ("new_colour", tuple(OBJECT_COLOURS)), ("new_shape", SHAPES),
            ("place", tuple(PLACES)), ("motion", tuple(MOTIONS)), ("background_style", STYLES),
            ("background_colour", tuple(BACKGROUND_COLOURS)), ("background_variant", VARIANTS)]


def edit_parse(ops: Sequence[Op], scene: Scene) -> torch.Tensor:
    """The meaning of an instruction as a multi-hot vector over :func:`parse_slots` (float32, one block per slot):
    for each operation its type, the object it acts on (the added one, or the scene object it names, in the scene
    left by the operations before it), the new colour / shape, the place and motion of an added object and the
    background settings it sets; a compound instruction sets the union of its operations' values. It is what a
    toy "VLM" is taught to read from an instruction (``viva_base.toy_instructor``)."""
    slots = parse_slots()
    offset, start = 0, {}
    for name, values in slots:
        start[name] = (offset, values)
        offset += len(values)
    vec = torch.zeros(offset)

    def put(slot: str, value) -> None:
        if value is not None:
            base, values = start[slot]
            vec[base + values.index(value)] = 1.0

    for op in ops:
        put("op", op_type(op))
        if isinstance(op, Add):
            obj = op.obj
            put("place", None if "where" in op.free else op.where)
            put("motion", op.motion)
        elif isinstance(op, SetBackground):
            obj = None
            put("background_style", op.style)
            put("background_colour", op.colour)
            put("background_variant", op.variant)
        else:
            obj = _target(scene, op.index, op)
            if isinstance(op, Recolour):
                put("new_colour", op.colour)
            elif isinstance(op, Replace):
                put("new_shape", op.shape)
                put("new_colour", op.colour)
        if obj is not None:
            put("object_colour", obj.colour)
            put("object_shape", obj.shape)
            put("object_size", obj.size)
        scene = apply_op(scene, op)
    return vec
