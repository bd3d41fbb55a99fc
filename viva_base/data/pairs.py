"""Paired editing data for SFT: a map-style dataset over a pairs manifest, and a batch sampler that
mixes video and image pairs (paper: p_video = 0.4) deterministically from (seed, step).

Every batch holds one kind (all videos or all 1-frame image pairs) so tensors stack. The indices of
step ``s`` depend only on ``(seed, s)``: a resumed run sees exactly the batches it would have seen,
and with several processes each takes its slice of the same global batch.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import UserError
from ..video import probe_video, read_image, read_video

logger = logging.getLogger(__name__)


def _fit_clip(frames: torch.Tensor, num_frames: int | None, size: tuple[int, int] | None, what: str) -> torch.Tensor:
    if num_frames is not None and frames.shape[0] > 1:
        if frames.shape[0] < num_frames:
            raise UserError(f"{what}: has {frames.shape[0]} frames, the recipe asks for data.frames={num_frames}")
        frames = frames[:num_frames]
    if size is not None and tuple(frames.shape[-2:]) != tuple(size):
        frames = F.interpolate(frames, size=tuple(size), mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)
    return frames


def frames_after_cut(counts: list[int], frames: int | None) -> list[int]:
    """The frame counts the editor sees: ``_fit_clip`` cuts every video (not a 1-frame image) to ``frames``."""
    return [n if n == 1 or frames is None else frames for n in counts]


def warn_changed_aspect(records: list[dict], shapes: list[tuple[int, int]], size, what: str,
                        key: str = "data.size", tolerance: float = 1.1) -> int:
    """Say (one warning) how many clips ``size`` stretches: each is resized to ``size`` whole (source, target and
    mask alike, so a pair stays aligned), and a clip whose aspect ratio differs from ``size``'s by more than
    ``tolerance`` (a factor) is learned from squashed (a portrait phone clip in a 480 x 848 recipe: 3.2x). Returns
    how many."""
    if not size:
        return 0
    th, tw = size
    factors = [max(r, 1 / r) for r in ((w / h) / (tw / th) for h, w in shapes)]
    bad = [(f, rec, hw) for f, rec, hw in zip(factors, records, shapes) if f > tolerance]
    if bad:
        f, rec, (h, w) = max(bad, key=lambda b: b[0])
        logger.warning("%d of the %d %s are resized to %s=%dx%d (H x W) with their aspect ratio changed by more than "
                       "%.0f%%, so they are learned squashed (the most: %s, %dx%d, by %.2fx); give %s their shape or "
                       "use clips of one aspect ratio", len(bad), len(records), what, key, th, tw,
                       100 * (tolerance - 1), rec.get("id", rec.get("source")), h, w, f, key)
    return len(bad)


def check_frame_counts(records: list[dict], counts: list[int], editor, what: str,
                       setting: str | None = "data.frames") -> None:
    """Refuse clips whose frame count ``counts`` (as the editor will see them) the editor's causal video VAE cannot
    encode whole (``r k + 1`` frames for a temporal ratio ``r``): the latent would drop the last frames (SFT: the
    edit mask, pooled to the latent grid, no longer lines up with them, a quiet mistrain; Edit-GRPO: the rollouts
    decode fewer frames than the source has, and every reward comparing them stops after the first rollout). One
    line naming a record and the fix: the recipe ``setting`` that cuts clips, or trimming them."""
    bad = [(rec, n) for rec, n in zip(records, counts) if editor.valid_num_frames(n) != n]
    if bad:
        (rec, n), r = bad[0], editor.temporal_ratio
        ok = editor.valid_num_frames(n)
        fix = f"set {setting}={ok} (or another {r}k+1) or trim the clips" if setting else \
            f"trim the clips to {ok} frames (or another {r}k+1)"
        raise UserError(f"{len(bad)} of the {len(counts)} {what} have clips the editor's video VAE cannot encode whole "
                        f"(it takes {r}k+1 frames): {rec['id']} has {n}, of which the latent would drop the last "
                        f"{n - ok}; {fix}")


class PairDataset(torch.utils.data.Dataset):
    """Items: ``source``/``target`` (F, 3, H, W), ``mask`` (F, 1, H, W) in {0,1} (zeros when absent),
    ``instruction``, ``reference`` (3, H, W) or None, ``is_image``."""

    def __init__(self, records: list[dict], *, frames: int | None = None, size: tuple[int, int] | None = None):
        self.records = records
        self.frames = frames
        self.size = tuple(size) if size else None
        probes = [probe_video(r["source"]) for r in records]  # of the source file
        self.num_frames = [int(p[0]) for p in probes]
        self.shapes = [(int(p[1]), int(p[2])) for p in probes]  # (height, width), as shown
        self.is_image = [n == 1 for n in self.num_frames]

    def model_frames(self) -> list[int]:
        """Each pair's frame count as the editor sees it (after ``frames``)."""
        return frames_after_cut(self.num_frames, self.frames)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        rec = self.records[i]
        src = _fit_clip(read_video(rec["source"]).frames, self.frames, self.size, rec["source"])
        tgt = _fit_clip(read_video(rec["target"]).frames, self.frames, self.size, rec["target"])
        if src.shape != tgt.shape:
            raise UserError(f"pair {rec['id']}: source {tuple(src.shape)} and target {tuple(tgt.shape)} differ in shape")
        if rec.get("mask"):
            m = _fit_clip(read_video(rec["mask"]).frames, self.frames, self.size, rec["mask"])
            mask = (m.amax(dim=1, keepdim=True) > 0.5).float()
            if mask.shape[0] != src.shape[0]:
                raise UserError(f"pair {rec['id']}: mask has {mask.shape[0]} frames, video {src.shape[0]}")
        else:
            mask = torch.zeros(src.shape[0], 1, *src.shape[-2:])
        ref = read_image(rec["reference"]) if rec.get("reference") else None
        return {"id": rec["id"], "source": src, "target": tgt, "mask": mask, "instruction": rec["instruction"],
                "reference": ref, "is_image": src.shape[0] == 1}


def collate_pairs(items: list[dict]) -> dict:
    shapes = {tuple(it["source"].shape) for it in items}
    if len(shapes) > 1:
        raise UserError(f"pairs in one batch differ in shape {sorted(shapes)}; set data.frames and data.size "
                        "so every clip is cut and resized alike")
    return {
        "id": [it["id"] for it in items],
        "source": torch.stack([it["source"] for it in items]),
        "target": torch.stack([it["target"] for it in items]),
        "mask": torch.stack([it["mask"] for it in items]),
        "instruction": [it["instruction"] for it in items],
        "reference": [it["reference"] for it in items],
    }


@dataclass
class MixedBatchSampler:
    """Global batch indices for optimizer step ``step`` (and micro-batch ``micro``), from (seed, step) alone."""

    is_image: list[bool]
    batch_size: int
    p_video: float = 0.4
    seed: int = 0

    def __post_init__(self):
        self.video_idx = [i for i, im in enumerate(self.is_image) if not im]
        self.image_idx = [i for i, im in enumerate(self.is_image) if im]
        if not self.video_idx and not self.image_idx:
            raise UserError("the dataset is empty")

    def indices(self, step: int, micro: int = 0) -> list[int]:
        g = torch.Generator().manual_seed(((self.seed * 1_000_003 + step) * 1009 + micro) % (2**63 - 1))
        use_video = bool(self.video_idx) and (not self.image_idx or torch.rand((), generator=g).item() < self.p_video)
        pool = self.video_idx if use_video else self.image_idx
        if len(pool) >= self.batch_size:
            pick = torch.randperm(len(pool), generator=g)[: self.batch_size]
        else:
            pick = torch.randint(len(pool), (self.batch_size,), generator=g)
        return [pool[int(j)] for j in pick]


class MicroBatches:
    """The index lists of a run's micro-batches, in training order: item ``k`` is, for step ``start + k //
    accumulation`` and micro-batch ``k % accumulation``, this process's share (``rank``'s ``per_micro`` indices) of
    ``sampler.indices(step, micro)``. The batches are a function of ``(seed, step, micro)``, so reading ahead never
    changes them, and a resumed run starts at its step."""

    def __init__(self, sampler: MixedBatchSampler, start: int, max_steps: int, accumulation: int, rank: int,
                 per_micro: int):
        self.sampler, self.start, self.max_steps = sampler, start, max_steps
        self.accumulation, self.rank, self.per_micro = accumulation, rank, per_micro

    def __getitem__(self, k: int) -> list[int]:
        if not 0 <= k < len(self):
            raise IndexError(k)
        step, micro = self.start + k // self.accumulation, k % self.accumulation
        return self.sampler.indices(step, micro)[self.rank * self.per_micro:(self.rank + 1) * self.per_micro]

    def __len__(self) -> int:
        return max(0, self.max_steps - self.start) * self.accumulation


class _Collate:
    """``collate_pairs`` over the pairs of one micro-batch (read in a worker when there are workers); a user error
    (a missing or unreadable clip) is returned as ``{"error": message}`` for the training loop to raise as one line
    (a ``DataLoader`` would re-raise it with the worker's traceback in its message)."""

    def __init__(self, dataset: PairDataset):
        self.dataset = dataset

    def __call__(self, idx: list[int]) -> dict:
        try:
            return collate_pairs([self.dataset[i] for i in idx])
        except UserError as exc:
            return {"error": str(exc)}


def pair_batches(dataset: PairDataset, batches: MicroBatches, num_workers: int = 0):
    """Yield the collated micro-batches of ``batches`` in order. ``num_workers > 0``: that many processes read and
    decode the next micro-batches while the current one trains (a torch ``DataLoader`` over ``batches``, 2 micro-
    batches ahead each); the batches are the ones read in the loop (``num_workers=0``), in the same order. Raises
    ``UserError`` for a pair that cannot be read."""
    collate = _Collate(dataset)
    if num_workers <= 0:
        source = (collate(batches[k]) for k in range(len(batches)))
    else:
        from torch.utils.data import DataLoader

        source = DataLoader(batches, batch_size=None, shuffle=False, num_workers=num_workers, collate_fn=collate,
                            prefetch_factor=2)
    for batch in source:
        if "error" in batch:
            raise UserError(batch["error"])
        yield batch
