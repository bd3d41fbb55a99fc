"""Frozen encodings of every SFT pair, computed once before training (``data.precompute: true``).

In masked SFT (eq. 3) only the DiT (and projector) learn; the VLM instructor, the pooled text encoder and the
VAE are frozen, so their outputs for a pair never change. Encoding them at every step repeats the same work:
on the toy chain (2 CPU cores) the instructor and data loading are ~30% of a step. ``PrecomputedPairs`` runs
them once per pair, in fixed chunks in manifest order (so the numbers do not depend on the batch a pair first
appears in, the process, or a resume), and keeps per pair:

- the condition with the instruction and its unconditional twin (empty instruction, same images), the text
  tokens cropped to the pair's valid length (``Condition.cat`` pads a batch back to its longest, as the
  instructor pads a batch);
- the target latent and the edit mask on the latent grid.

A training step then gathers its batch from memory and runs the DiT only. The cost is host memory: per pair the
text tokens (tokens x hidden size) twice and three latents; the toy world's 9,500 pairs take ~0.7 GB, a real
13B-VIVA dataset (4096-wide LLaVA states of the first frame's 576 image tokens and ~100 instruction tokens: 11 MB for
the two conditions; 33x480x848 clips: 1.8 MB per latent) ~15 MB per pair in bf16, so it stays off in
``recipes/sft_viva.yaml``. Every process encodes the whole dataset (chunks are not split over processes).
"""
from __future__ import annotations

import logging
import time
from typing import Sequence

import torch
from tqdm.auto import tqdm

from .data.pairs import PairDataset, collate_pairs
from .losses import mask_to_latent
from .policy import Condition

logger = logging.getLogger("viva_base.precompute")

TEXT_KEYS = ("prompt_embeds", "prompt_mask")  # cropped to the valid tokens when the condition has a prompt_mask


def _crop_text(row: Condition) -> Condition:
    """One row's text tokens cut to its valid length (right padding; ``viva_base.instructor``)."""
    if "prompt_mask" not in row:
        return row
    n = max(int(row["prompt_mask"].sum()), 1)
    return Condition({k: (v[:, :n] if k in TEXT_KEYS else v) for k, v in row.items()})


class PrecomputedPairs:
    """Per pair of ``dataset``: (cond, uncond, target latent, latent mask), from one frozen pass each."""

    def __init__(self, editor, dataset: PairDataset, *, chunk_size: int = 16, progress: bool = True):
        t0 = time.time()
        self.device = editor.device
        n = len(dataset)
        self._common: list[Condition | None] = [None] * n   # keys cond and uncond share (source latents, ...)
        self._text: list[tuple[Condition, Condition] | None] = [None] * n
        self._target: list[torch.Tensor | None] = [None] * n
        self._mask: list[torch.Tensor | None] = [None] * n
        kinds = [[i for i in range(n) if dataset.is_image[i] == image] for image in (False, True)]
        chunks = [idx[s:s + chunk_size] for idx in kinds for s in range(0, len(idx), chunk_size)]
        for chunk in tqdm(chunks, desc="precompute", disable=not progress):
            self._encode(editor, dataset, chunk)
        logger.info("precomputed the frozen encodings of %d pairs in %.1f s (%.0f MB)", n, time.time() - t0,
                    self.nbytes() / 2**20)

    @torch.no_grad()
    def _encode(self, editor, dataset: PairDataset, chunk: Sequence[int]) -> None:
        batch = collate_pairs([dataset[i] for i in chunk])
        device = editor.device
        cond, uncond = editor.encode_condition(batch["source"].to(device), batch["instruction"], batch["reference"],
                                               with_uncond=True)
        z_tgt = editor.encode_video(batch["target"].to(device)).float()
        mask = mask_to_latent(batch["mask"].to(device), tuple(z_tgt.shape[2:]), editor.temporal_ratio)
        shared = [k for k in cond if cond[k] is uncond[k]]  # encode_condition hands both the same tensors
        for j, i in enumerate(chunk):
            self._common[i] = Condition({k: cond[k][j:j + 1].cpu().clone() for k in shared})
            self._text[i] = tuple(_crop_text(Condition({k: c[k][j:j + 1].cpu().clone() for k in c if k not in shared}))
                                  for c in (cond, uncond))
            self._target[i] = z_tgt[j:j + 1].cpu().clone()
            self._mask[i] = mask[j:j + 1].cpu().clone()

    def batch(self, indices: Sequence[int], drop: torch.Tensor) -> tuple[Condition, torch.Tensor, torch.Tensor]:
        """``(cond, z_target, latent_mask)`` of pairs ``indices``; ``drop[k]`` takes pair k's empty-instruction
        condition (CFG dropout), as ``viva_base.sft.sft_loss`` does on the fly."""
        rows = [Condition({**self._common[i], **self._text[i][int(bool(d))]}) for i, d in zip(indices, drop.tolist())]
        cond = Condition.cat(rows).to(self.device)
        z = torch.cat([self._target[i] for i in indices]).to(self.device)
        mask = torch.cat([self._mask[i] for i in indices]).to(self.device)
        return cond, z, mask

    def nbytes(self) -> int:
        total = 0
        for common, text, z, m in zip(self._common, self._text, self._target, self._mask):
            total += sum(v.nbytes for v in common.values()) + sum(v.nbytes for c in text for v in c.values())
            total += z.nbytes + m.nbytes
        return total
