"""Decoding and scoring an iteration's rollouts, optionally overlapped with sampling.

Without overlap (``train.overlap_rewards: false``, the default) the trainer samples every rollout chunk,
decodes them, then calls the combined reward once on all of this process's samples.

With overlap, each finished rollout chunk (``sampling.rollout_batch_size`` samples) is handed to one
background thread that decodes it and scores every sample whose group is complete, while the main thread
samples the next chunk. Reward latency (a remote reward server, a VLM judge) then hides behind sampling:
only the last chunk's decoding and scoring remain after the last sampling forward. The numbers are the
same: every sample is decoded in the same chunk as without overlap, and a reward's score of a sample never
depends on the rest of its batch (docs/rewards.md); group-wise rewards still see whole groups.
"""
from __future__ import annotations

import concurrent.futures
from collections.abc import Callable, Sequence
from typing import Any

import torch

__all__ = ["ChunkScorer", "ready_samples"]


def ready_samples(received: set[int], submitted: set[int], groups: Sequence[int]) -> list[int]:
    """The samples not yet scored whose whole group (every index with the same id in ``groups``) has been
    received, ascending."""
    complete = {}
    for i, g in enumerate(groups):
        complete[g] = complete.get(g, True) and i in received
    return [i for i, g in enumerate(groups) if complete[g] and i not in submitted]


class ChunkScorer:
    """Decodes rollout chunks and scores them with ``reward_fn``, on a background thread when ``overlap``.

    Args:
        decode: latents ``(b, C, F, h, w)`` -> pixels ``(b, F, 3, H, W)`` (the editor's decoder).
        reward_fn: a :class:`rewards.registry.CombinedReward` (or anything called like one).
        source: source videos, one per sample; ``texts``: ``{source_captions, target_captions, instructions}``,
            lists with one entry per sample; ``references``: one per sample (or None); ``groups``: group ids.
        overlap: score on a background thread as chunks arrive (:meth:`add`); else all at once in :meth:`finish`.
    """

    def __init__(self, decode: Callable[[torch.Tensor], torch.Tensor], reward_fn, *, source: torch.Tensor,
                 texts: dict[str, list[str]], references: list | None, groups: Sequence[int], overlap: bool):
        self.decode, self.reward_fn = decode, reward_fn
        self.source, self.texts, self.references = source, texts, references
        self.groups = list(groups)
        self.overlap = overlap
        self.pixels: dict[int, torch.Tensor] = {}       # first sample index of a chunk -> its decoded pixels
        self.parts: list[tuple[list[int], Any]] = []     # (sample indices, CombinedOutput), in order
        self.received: set[int] = set()
        self.submitted: set[int] = set()
        self.futures: list[concurrent.futures.Future] = []
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="rewards") if overlap else None
        self._failed = False

    def _score(self, idx: list[int], edited: torch.Tensor):
        sel = torch.tensor(idx)
        return self.reward_fn(edited, self.source[sel], **{k: [v[i] for i in idx] for k, v in self.texts.items()},
                              references=[self.references[i] for i in idx] if self.references is not None else None,
                              groups=[self.groups[i] for i in idx])

    def _edited(self, idx: list[int]) -> torch.Tensor:
        rows = []
        for start, px in sorted(self.pixels.items()):
            rows.extend((start + j, px[j]) for j in range(px.shape[0]))
        by_index = dict(rows)
        return torch.stack([by_index[i] for i in idx])

    def _job(self, start: int, latents: torch.Tensor, ready: list[int]) -> None:
        if self._failed:  # an earlier chunk failed for good (e.g. the reward server is down): do no more work
            return
        try:
            with torch.no_grad():
                self.pixels[start] = self.decode(latents)
                if ready:
                    self.parts.append((ready, self._score(ready, self._edited(ready))))
        except BaseException:
            self._failed = True
            raise

    def add(self, idx: list[int], latents: torch.Tensor) -> None:
        """A finished rollout chunk: samples ``idx`` (consecutive) with final ``latents``. With overlap, queue
        its decoding and the scoring of every sample whose group is now complete; otherwise only keep it."""
        self.received.update(idx)
        if not self.overlap:
            return
        ready = ready_samples(self.received, self.submitted, self.groups)
        self.submitted.update(ready)
        self.futures.append(self._pool.submit(self._job, idx[0], latents, ready))

    def finish(self, latents: torch.Tensor, batch_size: int):
        """Wait for (or run) the decoding and scoring of all ``latents``; returns ``(edited pixels, CombinedOutput)``
        in sample order. Re-raises a reward's error (after the queued work has stopped)."""
        n = latents.shape[0]
        if not self.overlap:
            edited = torch.cat([self.decode(latents[i:i + batch_size]) for i in range(0, n, batch_size)])
            return edited, self._score(list(range(n)), edited)
        try:
            for f in self.futures:
                f.result()
        finally:
            self._pool.shutdown(wait=True)
        order = [i for idx, _ in self.parts for i in idx]
        if order != list(range(n)):
            raise RuntimeError(f"overlapped scoring covered samples {order}, expected 0..{n - 1}")
        from rewards.registry import CombinedReward

        edited = torch.cat([px for _, px in sorted(self.pixels.items())])
        return edited, CombinedReward.concat([out for _, out in self.parts])

    def close(self) -> None:
        """Stop the background thread (after an error elsewhere); queued work is dropped."""
        if self._pool is not None:
            self._failed = True
            self._pool.shutdown(wait=True, cancel_futures=True)
