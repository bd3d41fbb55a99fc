"""PickScore (paper eq. 6): the frame-averaged PickScore of the edited video against ``t_edit``.

``R_PS = 1/F sum_f s * cos(E_I(v_edit,f), E_T(t_edit))`` with ``s = logit_scale.exp()`` of the
PickScore CLIP (about 100), exactly the quantity the PickScore authors compute per image.

Weights: ``model="hf:yuvalkirstain/PickScore_v1"`` with the processor (tokenizer + image
preprocessing) of ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` (the defaults), or any local folder
saved with ``save_pretrained`` (``model="hf:/path"``, ``processor`` defaulting to the same folder).
"""
from __future__ import annotations

import torch

from .clip import ClipTextRewardBase, frame_text_similarity
from .registry import register_reward

__all__ = ["PickScore", "pickscore_score"]


def pickscore_score(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: float) -> torch.Tensor:
    """Eq. 6: ``logit_scale.exp() * C(V_edit, t_edit)``; ``image_emb`` ``(B, F, D)``, ``text_emb``
    ``(B, D)`` normalised, ``logit_scale`` already exponentiated. Returns ``(B,)``."""
    return logit_scale * frame_text_similarity(image_emb, text_emb)


@register_reward("pickscore")
class PickScore(ClipTextRewardBase):
    """Frame-wise PickScore against ``t_edit``, averaged over the sampled frames (eq. 6).

    Kwargs: ``model``, ``processor``, ``pretrained``, ``dtype``, ``max_batch``, ``frames``,
    ``device`` (see :class:`rewards.clip.ClipImageRewardBase`).
    """

    default_model = "hf:yuvalkirstain/PickScore_v1"
    default_processor = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"

    def combine(self, image_emb, text_emb, scorer):
        return pickscore_score(image_emb, text_emb, scorer.logit_scale)
