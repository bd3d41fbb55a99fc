"""The toy world's scene graph: a scene is data, and its caption, its edits and its pixels all derive from it.

A :class:`Scene` holds a :class:`Background` (style x colour x variant) and a list of :class:`Obj`
(shape x colour x size, moving on a straight trajectory that bounces off the frame's borders). The list
order is the z-order: later objects are drawn on top. Within a scene every object has a distinct
``(colour, shape)`` key, so "the red square" names exactly one object.

Vocabulary (sizes in pixels are for 32x32 frames and scale with the shorter side):

* shapes: square, circle, triangle, diamond, cross; size classes: small (7 px), large (11 px)
* object colours: red, green, blue, yellow, purple, orange (all far from every background pixel)
* background styles: plain, gradient, stripes, checker; background colours: grey, sand, mint, sky
* variants: day (as is), night (dark blue tint), snow (white flakes falling 1-2 px per frame,
  placed deterministically from ``Scene.seed``); snow lies behind the objects.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

SHAPES = ("square", "circle", "triangle", "diamond", "cross")
SIZES = ("small", "large")
SIZE_PX_AT_32 = {"small": 7, "large": 11}
OBJECT_COLOURS = {
    "red": (230, 40, 40),
    "green": (40, 190, 60),
    "blue": (40, 80, 235),
    "yellow": (245, 215, 20),
    "purple": (150, 40, 190),
    "orange": (250, 130, 20),
}
STYLES = ("plain", "gradient", "stripes", "checker")
STYLE_WORDS = {"plain": "plain", "gradient": "gradient", "stripes": "striped", "checker": "checkered"}
BACKGROUND_COLOURS = {
    "grey": (128, 128, 128),
    "sand": (200, 180, 140),
    "mint": (150, 205, 175),
    "sky": (150, 185, 225),
}
VARIANTS = ("day", "night", "snow")
VARIANT_SUFFIX = {"day": "", "night": " at night", "snow": " in the snow"}
SNOW_RGB = (250, 250, 250)
SNOW_DENSITY = 0.03  # fraction of pixels holding a flake
NIGHT_SCALE, NIGHT_OFFSET = 0.3, (8, 8, 30)  # night pixel = round(day * scale + offset)


def style_colour(style: str, colour: str) -> str:
    """'plain grey', 'sand striped', 'mint gradient', 'sky checkered'."""
    return f"plain {colour}" if style == "plain" else f"{colour} {STYLE_WORDS[style]}"


def size_px(size: str, height: int, width: int) -> int:
    """Side (px) of an object of size class ``size`` in a ``height x width`` frame (7 / 11 px at 32)."""
    return max(3, round(SIZE_PX_AT_32[size] * min(height, width) / 32))


def speed_unit(height: int, width: int) -> float:
    """One "speed step" in px per frame: 0.5 px at 32x32, scaled with the shorter side."""
    return 0.5 * min(height, width) / 32


@dataclass(frozen=True)
class Background:
    style: str = "plain"
    colour: str = "grey"
    variant: str = "day"

    def __post_init__(self):
        _check(self.style, STYLES, "background style")
        _check(self.colour, BACKGROUND_COLOURS, "background colour")
        _check(self.variant, VARIANTS, "background variant")

    def phrase(self) -> str:
        """'a sand striped background at night', 'a plain grey background'."""
        return f"a {style_colour(self.style, self.colour)} background{VARIANT_SUFFIX[self.variant]}"


@dataclass(frozen=True)
class Obj:
    """An object: ``(x, y)`` is its centre at frame 0 in pixels (x right, y down), ``(vx, vy)`` its
    velocity in px per frame; it bounces off the borders so that it always lies fully inside the frame."""

    shape: str
    colour: str
    size: str
    x: float
    y: float
    vx: float = 0.0
    vy: float = 0.0

    def __post_init__(self):
        _check(self.shape, SHAPES, "shape")
        _check(self.colour, OBJECT_COLOURS, "object colour")
        _check(self.size, SIZES, "size")

    @property
    def key(self) -> tuple[str, str]:
        return (self.colour, self.shape)

    def phrase(self, article: str = "a") -> str:
        """'a large red square'."""
        return f"{article} {self.size} {self.colour} {self.shape}"


@dataclass(frozen=True)
class Scene:
    background: Background
    objects: tuple[Obj, ...] = ()
    num_frames: int = 9
    height: int = 32
    width: int = 32
    seed: int = 0  # drives the snow flakes only

    def __post_init__(self):
        object.__setattr__(self, "objects", tuple(self.objects))
        if self.num_frames < 1 or self.height < 8 or self.width < 8:
            raise ValueError(f"scene needs >= 1 frame and sides >= 8 px, got {self.num_frames}x{self.height}x{self.width}")
        keys = [o.key for o in self.objects]
        if len(set(keys)) != len(keys):
            raise ValueError(f"objects of a scene need distinct (colour, shape) keys, got {keys}")

    def replace(self, **changes) -> "Scene":
        return dataclasses.replace(self, **changes)

    def index_of(self, colour: str, shape: str) -> int:
        for i, o in enumerate(self.objects):
            if o.key == (colour, shape):
                return i
        raise KeyError(f"no {colour} {shape} in the scene")


def caption(scene: Scene) -> str:
    """'a large red square and a small blue circle on a grey striped background at night'.

    Objects are listed in z-order (bottom first); an object-free scene is 'an empty <background>'."""
    bg = scene.background.phrase()
    if not scene.objects:
        return "an empty " + bg[2:]
    names = [o.phrase() for o in scene.objects]
    listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    return f"{listed} on {bg}"


# ----------------------------------------------------------------------------------------- sampling

def object_bounds(size: str, height: int, width: int) -> tuple[float, float, float, float]:
    """``(x_lo, x_hi, y_lo, y_hi)``: the range of centres that keeps an object fully inside the frame."""
    r = size_px(size, height, width) / 2
    return r, width - r, r, height - r


def random_background(rng: np.random.Generator) -> Background:
    return Background(
        style=STYLES[rng.integers(len(STYLES))],
        colour=list(BACKGROUND_COLOURS)[rng.integers(len(BACKGROUND_COLOURS))],
        variant=VARIANTS[rng.choice(3, p=[0.5, 0.25, 0.25])],
    )


def random_object(rng: np.random.Generator, height: int, width: int, *, exclude_keys=(), moving: bool = True) -> Obj:
    """An object with a (colour, shape) key not in ``exclude_keys``, at a random position (quarter-pixel
    grid) and velocity (a multiple of :func:`speed_unit`, up to 3 units per axis)."""
    free = [(c, s) for c in OBJECT_COLOURS for s in SHAPES if (c, s) not in set(exclude_keys)]
    colour, shape = free[rng.integers(len(free))]
    size = SIZES[rng.integers(len(SIZES))]
    x_lo, x_hi, y_lo, y_hi = object_bounds(size, height, width)
    x = math.floor(rng.uniform(x_lo, x_hi) * 4) / 4
    y = math.floor(rng.uniform(y_lo, y_hi) * 4) / 4
    u = speed_unit(height, width)
    vx, vy = (float(rng.integers(-3, 4)) * u, float(rng.integers(-3, 4)) * u) if moving else (0.0, 0.0)
    return Obj(shape, colour, size, max(x, x_lo), max(y, y_lo), vx, vy)


# ------------------------------------------------------------------------------------------- JSON

def obj_to_json(o: Obj) -> dict:
    return dataclasses.asdict(o)


def obj_from_json(d: dict) -> Obj:
    return Obj(**d)


def scene_to_json(s: Scene) -> dict:
    return {"background": dataclasses.asdict(s.background), "objects": [obj_to_json(o) for o in s.objects],
            "num_frames": s.num_frames, "height": s.height, "width": s.width, "seed": s.seed}


def scene_from_json(d: dict) -> Scene:
    return Scene(background=Background(**d["background"]), objects=tuple(obj_from_json(o) for o in d["objects"]),
                 num_frames=d["num_frames"], height=d["height"], width=d["width"], seed=d["seed"])


def _check(value: str, allowed, what: str) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r}; choose one of {', '.join(allowed)}")


__all__ = [
    "SHAPES", "SIZES", "OBJECT_COLOURS", "STYLES", "BACKGROUND_COLOURS", "VARIANTS",
    "Background", "Obj", "Scene", "caption", "style_colour", "size_px", "speed_unit", "object_bounds",
    "random_background", "random_object", "obj_to_json", "obj_from_json", "scene_to_json", "scene_from_json",
]
