"""Exact, deterministic numpy rendering of toy scenes (no anti-aliasing: every pixel is one of a known
set of colours, so edit masks are exact).

Pixel ``(i, j)`` (row, column) has its centre at ``(x, y) = (j + 0.5, i + 0.5)``. An object of side
``s`` centred at ``(cx, cy)``, with ``dx = x - cx``, ``dy = y - cy`` and ``r = s / 2``, covers the pixels where

* square:   ``|dx| <= r  and  |dy| <= r``
* circle:   ``dx^2 + dy^2 <= r^2``
* diamond:  ``|dx| + |dy| <= r``
* triangle: ``-r <= dy <= r  and  |dx| <= (dy + r) / 2``   (apex up)
* cross:    ``(|dx| <= r/3 and |dy| <= r)  or  (|dy| <= r/3 and |dx| <= r)``

Objects are painted in list order (later on top) over the background. Only +, -, *, mod and
comparisons on float64 are used, so renders are bit-identical across runs and machines.
"""
from __future__ import annotations

import numpy as np
import torch

from .scene import (BACKGROUND_COLOURS, NIGHT_OFFSET, NIGHT_SCALE, OBJECT_COLOURS, SNOW_DENSITY, SNOW_RGB,
                    Background, Obj, Scene, object_bounds, size_px)


def bounce(p0: float, v: float, t: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Position at frames ``t`` of a point starting at ``p0`` with speed ``v`` that reflects off ``lo`` and
    ``hi``: ``u = (p0 - lo + v t) mod 2L``, ``p = lo + (u if u <= L else 2L - u)``, ``L = hi - lo``."""
    length = hi - lo
    if length <= 0:
        return np.full(t.shape, lo, dtype=np.float64)
    u = np.mod(p0 - lo + v * t.astype(np.float64), 2 * length)
    return lo + np.where(u <= length, u, 2 * length - u)


def trajectory(obj: Obj, num_frames: int, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Centres ``(cx, cy)``, each ``(F,)``, of ``obj`` over ``num_frames`` frames."""
    t = np.arange(num_frames)
    x_lo, x_hi, y_lo, y_hi = object_bounds(obj.size, height, width)
    return bounce(obj.x, obj.vx, t, x_lo, x_hi), bounce(obj.y, obj.vy, t, y_lo, y_hi)


def shape_mask(shape: str, cx: np.ndarray, cy: np.ndarray, side: float, height: int, width: int) -> np.ndarray:
    """``(F, H, W)`` bool: pixels covered by ``shape`` of side ``side`` centred at ``(cx[f], cy[f])``
    (the rules in the module docstring)."""
    xs = np.arange(width, dtype=np.float64) + 0.5
    ys = np.arange(height, dtype=np.float64) + 0.5
    dx = xs[None, None, :] - np.asarray(cx, dtype=np.float64)[:, None, None]
    dy = ys[None, :, None] - np.asarray(cy, dtype=np.float64)[:, None, None]
    adx, ady, r = np.abs(dx), np.abs(dy), side / 2
    if shape == "square":
        m = (adx <= r) & (ady <= r)
    elif shape == "circle":
        m = dx * dx + dy * dy <= r * r
    elif shape == "diamond":
        m = adx + ady <= r
    elif shape == "triangle":
        m = (dy >= -r) & (dy <= r) & (adx <= (dy + r) / 2)
    elif shape == "cross":
        m = ((adx <= r / 3) & (ady <= r)) | ((ady <= r / 3) & (adx <= r))
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return m


def object_footprint(obj: Obj, num_frames: int, height: int, width: int) -> np.ndarray:
    """``(F, H, W)`` bool: every pixel the object covers, occluded or not."""
    cx, cy = trajectory(obj, num_frames, height, width)
    return shape_mask(obj.shape, cx, cy, size_px(obj.size, height, width), height, width)


def footprints(scene: Scene) -> np.ndarray:
    """``(N, F, H, W)`` bool: full footprint of each object (ignoring occlusion)."""
    f, h, w = scene.num_frames, scene.height, scene.width
    if not scene.objects:
        return np.zeros((0, f, h, w), dtype=bool)
    return np.stack([object_footprint(o, f, h, w) for o in scene.objects])


def visible_footprints(scene: Scene) -> np.ndarray:
    """``(N, F, H, W)`` bool: pixels where object ``n`` is the one drawn (not covered by a later object)."""
    full = footprints(scene)
    vis = full.copy()
    above = np.zeros(full.shape[1:], dtype=bool)
    for n in range(len(full) - 1, -1, -1):
        vis[n] &= ~above
        above |= full[n]
    return vis


def _texture(bg: Background, height: int, width: int) -> np.ndarray:
    """Day-light background ``(H, W, 3)`` float64 before rounding."""
    c = np.asarray(BACKGROUND_COLOURS[bg.colour], dtype=np.float64)
    rows = np.arange(height)[:, None]
    cols = np.arange(width)[None, :]
    if bg.style == "plain":
        factor = np.ones((height, width))
    elif bg.style == "gradient":  # brighter at the top: 1.15 -> 0.75
        factor = np.broadcast_to(1.15 - 0.4 * rows / max(height - 1, 1), (height, width))
    elif bg.style == "stripes":  # horizontal bands, height/8 px thick
        band = max(2, height // 8)
        factor = np.broadcast_to(np.where((rows // band) % 2 == 0, 1.0, 0.8), (height, width))
    elif bg.style == "checker":  # cells of a quarter of the shorter side
        cell = max(2, min(height, width) // 4)
        factor = np.where(((rows // cell) + (cols // cell)) % 2 == 0, 1.0, 0.85)
    else:
        raise ValueError(f"unknown background style {bg.style!r}")
    return factor[..., None] * c


def snow_flakes(seed: int, num_frames: int, height: int, width: int) -> np.ndarray:
    """``(F, H, W)`` bool: white flakes (``SNOW_DENSITY`` of the pixels) falling 1 or 2 px per frame and
    wrapping around; positions and speeds come from ``np.random.default_rng(seed)`` only."""
    rng = np.random.default_rng(seed)
    n = max(1, round(SNOW_DENSITY * height * width))
    x0 = rng.integers(0, width, n)
    y0 = rng.integers(0, height, n)
    speed = rng.integers(1, 3, n)
    out = np.zeros((num_frames, height, width), dtype=bool)
    for t in range(num_frames):
        out[t, (y0 + speed * t) % height, x0] = True
    return out


def render_background(scene: Scene) -> np.ndarray:
    """``(F, H, W, 3)`` uint8 background of ``scene`` (with its variant: night tint or snow)."""
    bg, f, h, w = scene.background, scene.num_frames, scene.height, scene.width
    day = _texture(bg, h, w)
    if bg.variant == "night":
        day = day * NIGHT_SCALE + np.asarray(NIGHT_OFFSET, dtype=np.float64)
    img = np.clip(np.round(day), 0, 255).astype(np.uint8)
    frames = np.broadcast_to(img, (f, h, w, 3)).copy()
    if bg.variant == "snow":
        frames[snow_flakes(scene.seed, f, h, w)] = SNOW_RGB
    return frames


def render(scene: Scene) -> np.ndarray:
    """``(F, H, W, 3)`` uint8 frames of ``scene``: background, then objects in z-order."""
    frames = render_background(scene)
    for obj, fp in zip(scene.objects, footprints(scene)):
        frames[fp] = OBJECT_COLOURS[obj.colour]
    return frames


def to_tensor(frames: np.ndarray) -> torch.Tensor:
    """uint8 ``(F, H, W, 3)`` -> float32 ``(F, 3, H, W)`` in [0, 1] (exactly ``k / 255``)."""
    return torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float().div(255.0).contiguous()


def render_tensor(scene: Scene) -> torch.Tensor:
    """The project's pixel-video form of :func:`render`: ``(F, 3, H, W)`` float32 in [0, 1]."""
    return to_tensor(render(scene))


def changed_pixels(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``(F, H, W)`` bool: where two uint8 renders differ in any channel."""
    return np.any(a != b, axis=-1)


__all__ = ["bounce", "trajectory", "shape_mask", "object_footprint", "footprints", "visible_footprints",
           "snow_flakes", "render_background", "render", "render_tensor", "to_tensor", "changed_pixels"]
