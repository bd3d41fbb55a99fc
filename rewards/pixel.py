"""``pixel_sp``: source preservation measured on the pixels (no model).

CLIP-based preservation (``clip_sp``, eq. 5) compares image *embeddings*, which are built to ignore
much of what a viewer sees as damage: in the toy world a frame and a copy of it with heavy noise, blur
or faded colours still have a CLIP cosine of about 0.88, while a true edit lowers it to about 0.7, and
Edit-GRPO can raise ``clip_sp`` while the pixels drift further from the source (docs/toy_world.md).
``pixel_sp`` scores the pixels themselves::

    R_pix = 1 - 1/(F C H W) sum |V_edit - V_src|          (L1, "l1", the default)
    R_pix = 1 - sqrt(1/(F C H W) sum (V_edit - V_src)^2)  (root mean square, "rms")

in [0, 1] (1 = identical), over the sampled frames, with both videos in [0, 1]. It knows nothing about
where the edit should be, so it also charges the wanted change: it is a preservation term to be weighed
against an instruction-following reward (``clip_if``), never used alone. With
``train.reward_normalization: component`` its weight sets how much its ranking of a group counts,
whatever its spread. An edited video of another size than the source is resized to the source's size
(bilinear, antialiased) before comparing.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Reward, RewardOutput
from .registry import register_reward

__all__ = ["PixelSourcePreservation", "pixel_sp_score"]


def pixel_sp_score(edited: torch.Tensor, source: torch.Tensor, metric: str = "l1") -> torch.Tensor:
    """``1 - mean |E - S|`` (``l1``) or ``1 - sqrt(mean (E - S)^2)`` (``rms``) per sample of two ``(B, F, 3, H, W)``
    videos in [0, 1] of the same shape; returns ``(B,)`` float32."""
    if edited.shape != source.shape:
        raise ValueError(f"pixel_sp_score: edited {tuple(edited.shape)} and source {tuple(source.shape)} differ in shape")
    diff = (edited.double() - source.double()).flatten(1)
    if metric == "l1":
        err = diff.abs().mean(1)
    elif metric == "rms":
        err = diff.pow(2).mean(1).sqrt()
    else:
        raise ValueError(f"pixel_sp: unknown metric {metric!r}; use l1 or rms")
    return (1 - err).float()


@register_reward("pixel_sp")
class PixelSourcePreservation(Reward):
    """Pixel-level source preservation (module docstring). Options: ``metric`` (``l1`` or ``rms``), ``frames``."""

    checked_by_building = True

    def __init__(self, *, metric: str = "l1", frames="all", device=None):
        super().__init__(frames=frames, device=device)
        if metric not in ("l1", "rms"):
            raise ValueError(f"pixel_sp: unknown metric {metric!r}; use l1 or rms")
        self.metric = metric

    def score(self, edited, source, *, source_captions, target_captions, instructions, references):
        n = min(edited.shape[1], source.shape[1])
        e, s = self.sample_frames(edited[:, :n]), self.sample_frames(source[:, :n])
        if e.shape[-2:] != s.shape[-2:]:
            b, f = e.shape[:2]
            e = F.interpolate(e.flatten(0, 1), size=s.shape[-2:], mode="bilinear", antialias=True,
                              align_corners=False).clamp(0, 1).view(b, f, 3, *s.shape[-2:])
        return RewardOutput(scores=pixel_sp_score(e, s, self.metric))
