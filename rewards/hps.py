"""HPS v2 / v2.1 (Human Preference Score) computed with open_clip directly.

HPS is an open_clip ViT-H-14 fine-tuned on human preferences; its score for an image and a prompt
is the cosine of their embeddings (what the ``hpsv2`` package returns, about 0.2-0.35; the paper
tables print it x100). Here: ``R_HPS = 1/F sum_f cos(E_I(v_edit,f), E_T(t_edit))``.

We do not depend on the ``hpsv2`` package (it pins protobuf 3.20, downloads at call time and
reloads its checkpoint on every call). Download the checkpoint once (``HPS_v2_compressed.pt`` or
``HPS_v2.1_compressed.pt`` from the ``xswu/HPSv2`` hub repository) and give its path as
``checkpoint``; it is loaded with ``torch.load(weights_only=True)`` into ``open_clip:ViT-H-14``
once per process.
"""
from __future__ import annotations

import os

import torch

from .clip import ClipTextRewardBase, frame_text_similarity
from .registry import register_reward

__all__ = ["HPS", "hps_score"]


def hps_score(image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
    """HPS v2 of a video: ``1/F sum_f cos(E_I(v_f), E_T(t_edit))`` with the HPS-tuned ViT-H-14
    (``image_emb`` ``(B, F, D)``, ``text_emb`` ``(B, D)``, normalised). Returns ``(B,)``."""
    return frame_text_similarity(image_emb, text_emb)


@register_reward("hps")
class HPS(ClipTextRewardBase):
    """HPS v2/v2.1 against ``t_edit``, averaged over the sampled frames.

    Args:
        checkpoint: path of the HPS checkpoint (``.pt`` with ``state_dict``, or ``.safetensors``).
        model: the open_clip architecture, ``"open_clip:ViT-H-14"`` (any ``open_clip:`` name works,
            which is how the tests use a tiny model).
        dtype, max_batch, frames, device: see :class:`rewards.clip.ClipImageRewardBase`.
    """

    default_model = "open_clip:ViT-H-14"

    def __init__(self, *, checkpoint: str | None = None, model: str | None = None, **kwargs):
        model = model if model is not None else self.default_model
        if not model.startswith("open_clip:"):
            raise ValueError(f"hps runs through open_clip: model must be 'open_clip:<arch>', got {model!r}")
        if checkpoint is None:
            if model.startswith("open_clip:local-dir:") or os.path.isdir(model[len("open_clip:"):]):
                super().__init__(model=model, **kwargs)
                return
            raise ValueError("hps needs checkpoint=<path to HPS_v2.1_compressed.pt> (download it once from the "
                             "xswu/HPSv2 hub repository; nothing is downloaded at run time)")
        if not os.path.isfile(checkpoint):
            raise FileNotFoundError(f"HPS checkpoint not found: {checkpoint}")
        if "pretrained" in kwargs:
            raise ValueError("hps takes checkpoint=<file>, not pretrained=")
        super().__init__(model=model, pretrained=str(checkpoint), **kwargs)

    def combine(self, image_emb, text_emb, scorer):
        return hps_score(image_emb, text_emb)
