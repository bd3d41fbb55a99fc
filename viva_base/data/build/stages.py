"""The stages of the paired-data pipeline (VIVA section 3.4, Appendix C) and their pure helpers.

Each stage is a function ``stage(ctx, work) -> result`` over one record: ``work`` holds the record's
working clip and the results of the stages before it; ``result`` is a JSON-able dict (``status``:
``ok`` | ``skipped``, ``reason``, ``decisions``, and for a generating stage one ``candidate`` pair of
clips on disk). The runner (:mod:`.cli`) caches each result in the record's folder.

1. :func:`replace_stage`: main objects from the caption -> Grounding DINO boxes on frame 0 -> SAM 2
   masks through the clip -> a new object and rewritten caption -> inpaint the masked clip.
2. :func:`add_remove_stage`: a random (or the tracked object's) mask -> inpaint with the object removed
   from the caption and named in the negative prompt -> read one way it removes, the other way it adds.
3. :func:`global_stage`: Canny edges of the clip (structure guidance) + a caption with a global change
   (time of day, season, weather) -> a new clip with the same structure.
4. :func:`filter_stage`: for every candidate, labels (a VLM: artifacts, whether the edit is there) and
   instructions; the direction rule (:func:`choose_directions`); the pairs of the manifest.
"""
from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from ...errors import UserError
from ...video import VideoError, probe_video, read_video, write_video
from .records import InputVideo, stable_hash
from .text import GLOBAL_EDITS, filter_prompt, rule_instructions, seeded_rng

logger = logging.getLogger(__name__)

REAL_TO_SYNTH = "real_to_synth"
SYNTH_TO_REAL = "synth_to_real"


# ---------------------------------------------------------------------------------------------- clips
def cover_side(height: int, width: int, target_h: int, target_w: int) -> int | None:
    """The longest side to decode a ``height x width`` video at so that it still covers
    ``target_h x target_w`` after scaling by ``s = max(target_h / height, target_w / width)``:
    ``ceil(s max(height, width))``, or ``None`` when ``s >= 1`` (decode at full size)."""
    s = max(target_h / height, target_w / width)
    return None if s >= 1 else math.ceil(s * max(height, width))


def fit_clip(frames: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``(F, 3, h, w)`` -> ``(F, 3, H, W)``: scale by ``s = max(H / h, W / w)`` (bicubic, antialiased; the
    frame covers the target), then crop the centre. The aspect ratio is kept; nothing is padded."""
    th, tw = size
    h, w = frames.shape[-2:]
    s = max(th / h, tw / w)
    nh, nw = max(th, round(h * s)), max(tw, round(w * s))
    if (nh, nw) != (h, w):
        frames = F.interpolate(frames.float(), size=(nh, nw), mode="bicubic", antialias=True, align_corners=False)
    top, left = (nh - th) // 2, (nw - tw) // 2
    return frames[..., top:top + th, left:left + tw].clamp(0, 1).contiguous()


def load_clip(path: str, frames: int, size: tuple[int, int], frame_step: int = 1) -> tuple[torch.Tensor, float]:
    """The working clip of an input: its first ``frames`` frames taken every ``frame_step``-th, fitted to
    ``size`` (:func:`fit_clip`). Decodes only what it needs; :class:`VideoError` names the problem."""
    _, h, w, _ = probe_video(path)
    video = read_video(path, max_frames=frames, frame_step=frame_step, max_side=cover_side(h, w, *size))
    if video.num_frames < frames:
        raise VideoError(f"{path}: has {video.num_frames} frames at frame_step={frame_step}, clip.frames={frames} "
                         "needs more (lower clip.frames or clip.frame_step)")
    return fit_clip(video.frames, size), video.fps


# ---------------------------------------------------------------------------------------------- masks
def dilate(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """Binary dilation of ``(F, H, W)`` masks by a ``(2r+1) x (2r+1)`` square: ``max_pool2d`` with stride 1."""
    if radius <= 0:
        return mask.bool()
    x = mask.float()[:, None]
    return F.max_pool2d(x, kernel_size=2 * radius + 1, stride=1, padding=radius)[:, 0] > 0.5


def random_mask(frames: int, height: int, width: int, rng: random.Random, *, min_area: float = 0.05,
                max_area: float = 0.25, max_shift: float = 0.2) -> torch.Tensor:
    """A moving elliptical mask ``(F, H, W)`` (bool).

    Area fraction ``a ~ U[min_area, max_area]`` and aspect ``r ~ U[1/2, 2]`` give the semi-axes
    ``a_x = sqrt(a H W r / pi)``, ``a_y = sqrt(a H W / (pi r))`` (clamped to half the frame). The centre
    moves linearly from ``c_0`` to ``c_1 = c_0 + d``, ``d`` uniform within ``max_shift`` of the frame's
    sides, both kept so the ellipse stays inside the frame. Pixel ``(i, j)`` (centre ``(j + 1/2, i + 1/2)``)
    is inside at frame ``t`` iff ``((x - c_x(t)) / a_x)^2 + ((y - c_y(t)) / a_y)^2 <= 1``.
    """
    if not 0 < min_area <= max_area < 1:
        raise UserError(f"add_remove mask areas: need 0 < min_area <= max_area < 1, got {min_area}, {max_area}")
    area = rng.uniform(min_area, max_area) * height * width
    ratio = math.exp(rng.uniform(math.log(0.5), math.log(2.0)))
    ax = min(math.sqrt(area * ratio / math.pi), width / 2)
    ay = min(math.sqrt(area / (math.pi * ratio)), height / 2)
    x0, y0 = rng.uniform(ax, width - ax), rng.uniform(ay, height - ay)
    x1 = min(max(x0 + rng.uniform(-max_shift, max_shift) * width, ax), width - ax)
    y1 = min(max(y0 + rng.uniform(-max_shift, max_shift) * height, ay), height - ay)
    t = torch.linspace(0, 1, frames)[:, None, None] if frames > 1 else torch.zeros(1, 1, 1)
    cx, cy = x0 + (x1 - x0) * t, y0 + (y1 - y0) * t
    ys = torch.arange(height, dtype=torch.float32)[None, :, None] + 0.5
    xs = torch.arange(width, dtype=torch.float32)[None, None, :] + 0.5
    return ((xs - cx) / ax) ** 2 + ((ys - cy) / ay) ** 2 <= 1.0


def mask_video(mask: torch.Tensor) -> torch.Tensor:
    """Bool ``(F, H, W)`` -> a white-on-black ``(F, 3, H, W)`` video (what ``PairDataset`` reads back)."""
    return mask.float()[:, None].expand(-1, 3, -1, -1).contiguous()


# ---------------------------------------------------------------------------------------------- structure
def canny_edges(frames: torch.Tensor, sigma: float = 2.0, low: float | None = None, high: float | None = None) -> torch.Tensor:
    """Canny edges of each frame's luma (``skimage.feature.canny``), as a white-on-black ``(F, 3, H, W)``
    video: the structure guidance of global edits."""
    try:
        from skimage.feature import canny
    except ImportError:
        raise UserError("global edits need scikit-image for Canny edges: pip install scikit-image") from None
    luma = (0.299 * frames[:, 0] + 0.587 * frames[:, 1] + 0.114 * frames[:, 2]).double().cpu().numpy()
    edges = [torch.from_numpy(canny(f, sigma=sigma, low_threshold=low, high_threshold=high)) for f in luma]
    return torch.stack(edges).float()[:, None].expand(-1, 3, -1, -1).contiguous()


# ---------------------------------------------------------------------------------------------- decisions
def choose_directions(kind: str, labels: dict | None, bidirectional: tuple[str, ...] | list[str] = ("remove",)) -> list[str]:
    """Which way(s) a candidate becomes a training pair (the paper's rule).

    * unlabelled (no VLM): synthesised -> real only (the real video is a clean target);
    * ``edit_applied`` false: none (the synthesised clip does not show the edit);
    * ``artifacts`` true: synthesised -> real only;
    * clean: real -> synthesised, and also synthesised -> real for kinds in ``bidirectional`` (a clean
      removal gives a remove pair and an add pair).
    """
    if labels is None:
        return [SYNTH_TO_REAL]
    if not labels.get("edit_applied", True):
        return []
    if labels.get("artifacts", True):
        return [SYNTH_TO_REAL]
    return [REAL_TO_SYNTH] + ([SYNTH_TO_REAL] if kind in bidirectional else [])


def edit_type(kind: str, direction: str) -> str:
    """The manifest's ``edit_type``: a removal read backwards is an addition."""
    if kind == "remove":
        return "remove" if direction == REAL_TO_SYNTH else "add"
    return kind


def change(real: torch.Tensor, synth: torch.Tensor, mask: torch.Tensor | None) -> float:
    """Mean absolute pixel difference, over the mask when there is one (``sum |R - S| M / (3 sum M)``)."""
    diff = (real - synth).abs()
    if mask is None:
        return float(diff.mean())
    m = mask.float()[:, None]
    return float((diff * m).sum() / (3 * m.sum()).clamp_min(1))


def as_bool(value) -> bool | None:
    """A VLM's yes/no (``true``, ``"yes"``, ``"false"``, 0/1) as a bool; ``None`` if it is neither."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "yes", "y", "1", "false", "no", "n", "0"):
        return value.strip().lower() in ("true", "yes", "y", "1")
    return None


def sample_frames(frames: torch.Tensor, num: int) -> torch.Tensor:
    """``num`` evenly spaced frames (first and last included)."""
    idx = torch.linspace(0, frames.shape[0] - 1, max(1, min(num, frames.shape[0]))).round().long().unique()
    return frames[idx]


# ---------------------------------------------------------------------------------------------- stages
@dataclass
class Work:
    """One record being built: the input, its folder, the working clip and the stage results so far."""

    item: InputVideo
    folder: Path
    clip: torch.Tensor            # (F, 3, H, W) in [0, 1]
    fps: float
    real: Path                    # the working clip on disk (real.<ext>)
    results: dict[str, dict] = field(default_factory=dict)


def _seed(ctx, work: Work, stage: str) -> int:
    return stable_hash(ctx.cfg.seed, work.item.id, stage, "torch") % (2**31)


def _write_candidate(ctx, work: Work, stage: str, synth: torch.Tensor, mask: torch.Tensor | None, **fields) -> dict:
    folder = work.folder / stage
    folder.mkdir(parents=True, exist_ok=True)
    synth_path = write_video(folder / f"synth{ctx.cfg.video_ext}", synth, fps=work.fps)
    cand = {"synth": str(synth_path.relative_to(work.folder)), "mask": None, **fields}
    if mask is not None:
        mask_path = write_video(folder / "mask.mkv", mask_video(mask), fps=work.fps)
        cand["mask"] = str(mask_path.relative_to(work.folder))
    return cand


def _skip(reason: str, **decisions) -> dict:
    return {"status": "skipped", "reason": reason, "decisions": decisions, "candidate": None}


def replace_stage(ctx, work: Work) -> dict:
    """Object replacement: detect, track, rewrite, inpaint (see the module docstring)."""
    cfg = ctx.cfg.replace
    caption = work.item.caption
    objects = ctx.language.objects(caption, cfg.max_objects)
    dec: dict[str, Any] = {"objects": objects, "objects_from": ctx.language.source}
    if not objects:
        return _skip("no object found in the caption", **dec)
    detections = ctx.detector.detect(work.clip[0], objects)
    dec["detections"] = [d.to_json() if d else {"name": n, "box": None} for n, d in zip(objects, detections)]
    found = [d for d in detections if d is not None]
    if not found:
        return _skip(f"no object detected above detector.box_threshold={ctx.cfg.detector.box_threshold}", **dec)
    masks = ctx.tracker.track(work.clip, [d.box for d in found])
    areas = [float(m.float().mean()) for m in masks]
    dec["mask_areas"] = {d.name: round(a, 4) for d, a in zip(found, areas)}
    lo, hi = ctx.cfg.tracker.min_area, ctx.cfg.tracker.max_area
    chosen = next((i for i, a in enumerate(areas) if lo <= a <= hi), None)
    if chosen is None:
        return _skip(f"no tracked mask with an area in [{lo}, {hi}] of the frame", **dec)
    obj = found[chosen].name
    mask = dilate(masks[chosen], ctx.cfg.tracker.dilate)
    new_obj, new_caption = ctx.language.replacement(caption, obj, seeded_rng(ctx.cfg.seed, work.item.id, "replace"))
    dec.update(object=obj, new_object=new_obj, mask_area=round(float(mask.float().mean()), 4))
    synth = ctx.generate(work.clip, mask, new_caption, negative=obj, seed=_seed(ctx, work, "replace"))
    cand = _write_candidate(ctx, work, "replace", synth, mask, kind="replace", real_caption=caption,
                            synth_caption=new_caption, info={"object": obj, "new_object": new_obj})
    return {"status": "ok", "reason": None, "decisions": dec, "candidate": cand}


def add_remove_stage(ctx, work: Work) -> dict:
    """Object removal (and, read backwards, addition) by inpainting a mask with the object left out."""
    cfg = ctx.cfg.add_remove
    caption = work.item.caption
    rng = seeded_rng(ctx.cfg.seed, work.item.id, "add_remove")
    f, _, h, w = work.clip.shape
    dec: dict[str, Any] = {"mask_from": cfg.mask}
    obj, mask = None, None
    if cfg.mask == "object":
        rep = work.results.get("replace")
        if rep and rep.get("status") == "ok":
            obj = rep["decisions"]["object"]
            mask = read_video(work.folder / rep["candidate"]["mask"]).frames.amax(dim=1) > 0.5
        else:
            dec["mask_from"] = "random"
            dec["note"] = "add_remove.mask=object but the replace stage tracked no object: used a random mask"
    elif cfg.mask != "random":
        raise UserError(f"add_remove.mask={cfg.mask!r}: use random or object")
    if obj is None:
        objects = ctx.language.objects(caption, ctx.cfg.replace.max_objects)
        dec.update(objects=objects, objects_from=ctx.language.source)
        if not objects:
            return _skip("no object found in the caption", **dec)
        obj = objects[rng.randrange(len(objects))]
        mask = random_mask(f, h, w, rng, min_area=cfg.min_area, max_area=cfg.max_area, max_shift=cfg.max_shift)
    without = ctx.language.without(caption, obj)
    dec.update(object=obj, mask_area=round(float(mask.float().mean()), 4))
    synth = ctx.generate(work.clip, mask, without, negative=obj, seed=_seed(ctx, work, "add_remove"))
    cand = _write_candidate(ctx, work, "add_remove", synth, mask, kind="remove", real_caption=caption,
                            synth_caption=without, info={"object": obj})
    return {"status": "ok", "reason": None, "decisions": dec, "candidate": cand}


def global_stage(ctx, work: Work) -> dict:
    """Global content editing: Canny edges + a globally changed caption."""
    cfg = ctx.cfg.global_edit
    unknown = [e for e in cfg.edits if e not in GLOBAL_EDITS]
    if unknown or not cfg.edits:
        raise UserError(f"global_edit.edits: unknown {unknown or 'empty list'}; choose from {', '.join(GLOBAL_EDITS)}")
    rng = seeded_rng(ctx.cfg.seed, work.item.id, "global_edit")
    edit = GLOBAL_EDITS[cfg.edits[rng.randrange(len(cfg.edits))]]
    caption = work.item.caption
    new_caption = ctx.language.global_rewrite(caption, edit)
    edges = canny_edges(work.clip, cfg.canny_sigma, cfg.canny_low, cfg.canny_high)
    dec = {"edit": edit.name, "edge_density": round(float(edges[:, 0].mean()), 4), "caption_from": ctx.language.source}
    synth = ctx.generate(edges, None, new_caption, negative=edit.negative, seed=_seed(ctx, work, "global_edit"))
    cand = _write_candidate(ctx, work, "global_edit", synth, None, kind="global", real_caption=caption,
                            synth_caption=new_caption, info={"edit": edit.name})
    return {"status": "ok", "reason": None, "decisions": dec, "candidate": cand}


GENERATING_STAGES: dict[str, Callable] = {"replace": replace_stage, "add_remove": add_remove_stage,
                                          "global_edit": global_stage}


def filter_stage(ctx, work: Work) -> dict:
    """Labels, instructions and directions for every candidate of the generating stages -> pairs."""
    cfg = ctx.cfg.filter
    real = read_video(work.real).frames
    pairs, decisions = [], []
    for stage in ctx.cfg.stages:
        res = work.results.get(stage)
        if not res or res.get("status") != "ok":
            continue
        cand = res["candidate"]
        kind, info = cand["kind"], cand["info"]
        synth = read_video(work.folder / cand["synth"]).frames
        mask = read_video(work.folder / cand["mask"]).frames.amax(dim=1) > 0.5 if cand["mask"] else None
        d: dict[str, Any] = {"stage": stage, "change": round(change(real, synth, mask), 5)}
        fwd, bwd = rule_instructions(kind, info)
        labels = None
        if d["change"] < cfg.min_change:
            d.update(directions=[], reason=f"the synthesised clip equals the real one (change < filter.min_change={cfg.min_change})")
            decisions.append(d)
            continue
        if ctx.vlm is not None:
            ans = ctx.vlm.chat_json(filter_prompt(kind, info), ["artifacts", "edit_applied", "a_to_b", "b_to_a"], images=[
                ("VIDEO A (real), frames in temporal order:", sample_frames(real, cfg.num_frames)),
                ("VIDEO B (synthesised), the same time steps:", sample_frames(synth, cfg.num_frames))])
            labels = {"artifacts": as_bool(ans["artifacts"]), "edit_applied": as_bool(ans["edit_applied"])}
            if None in labels.values():
                raise ValueError(f"the VLM's labels are not true/false: {ans}")
            fwd = str(ans["a_to_b"]).strip() or fwd
            bwd = str(ans["b_to_a"]).strip() or bwd
        directions = choose_directions(kind, labels, tuple(cfg.bidirectional))
        d.update(labels=labels, labeler=("vlm" if labels is not None else "none"), directions=directions,
                 instructions={REAL_TO_SYNTH: fwd, SYNTH_TO_REAL: bwd})
        if not directions:
            d["reason"] = "the VLM says the edit is not in the synthesised clip"
        decisions.append(d)
        used: set[str] = set()
        for direction in directions:
            et = edit_type(kind, direction)
            pid = f"{work.item.id}.{et}" + (".rev" if et in used else "")
            used.add(et)
            real_rel, synth_rel = str(work.real.relative_to(work.folder)), cand["synth"]
            src, tgt = (real_rel, synth_rel) if direction == REAL_TO_SYNTH else (synth_rel, real_rel)
            src_cap, tgt_cap = ((cand["real_caption"], cand["synth_caption"]) if direction == REAL_TO_SYNTH
                                else (cand["synth_caption"], cand["real_caption"]))
            pairs.append({"id": pid, "source": src, "target": tgt, "mask": cand["mask"],
                          "instruction": fwd if direction == REAL_TO_SYNTH else bwd, "source_caption": src_cap,
                          "target_caption": tgt_cap, "edit_type": et, "direction": direction, "origin": work.item.id,
                          "stage": stage, "labels": labels})
    return {"status": "ok", "reason": None, "decisions": decisions, "pairs": pairs}
