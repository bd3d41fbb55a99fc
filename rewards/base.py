"""The reward interface: what every reward (built-in or plugin) is called with and returns.

A reward scores a batch of edits. It is called with

* ``edited``, ``source``: pixel videos ``(B, F, 3, H, W)``, float in ``[0, 1]`` (an image is a
  1-frame video; ``edited`` and ``source`` may differ in ``H, W``),
* ``source_captions`` (``t_src``), ``target_captions`` (``t_edit``), ``instructions`` (``t_ins``):
  lists of ``B`` strings,
* ``references``: ``None``, or a list of ``B`` items, each ``None`` or an image ``(3, H, W)`` in
  ``[0, 1]``,

and returns a :class:`RewardOutput`: ``scores``, a float32 CPU tensor ``[B]`` where NaN marks a
sample the reward could not score, and optional per-sample ``details`` (one dict per sample).

Frame sampling is a shared constructor option, ``frames``:

* ``"all"``: every frame (the default of the CLIP rewards),
* ``{"every": k}``: frames ``0, k, 2k, ...``,
* ``{"num": n}``: ``n`` frames evenly spaced from the first to the last (all frames when the
  video has ``n`` or fewer).

Devices: a reward runs its model on its ``device`` option, or, when that is ``None``, on the
device of the ``edited`` tensor; scores always come back as float32 on the CPU.

Group-wise rewards (``group_wise = True``) score the samples of one group (the G rollouts of one
prompt) together, e.g. by pairwise preference inside the group: they implement :meth:`Reward.score_group`,
and ``__call__`` takes ``groups`` (one group id per sample) and calls it once per group. Without
``groups`` every sample is a group of its own.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Union

import torch

__all__ = ["FrameSpec", "Reward", "RewardOutput", "frame_indices", "parse_frames"]

FrameSpec = Union[str, Mapping[str, int], None]

# Values this far outside [0, 1] are a wrong scale ([-1, 1] or [0, 255]), not rounding noise.
_RANGE_TOLERANCE = 1e-3


@dataclass
class RewardOutput:
    """What a reward returns: ``scores`` float32 ``[B]`` on the CPU (NaN = could not score) and
    optional per-sample ``details`` (a list of ``B`` dicts)."""

    scores: torch.Tensor
    details: list[dict] | None = None


def parse_frames(frames: FrameSpec) -> tuple[str, int]:
    """Normalise a frame-sampling option to ``("all", 0)``, ``("every", k)`` or ``("num", n)``.

    Accepts ``"all"`` / ``None``, ``{"every": k}`` and ``{"num": n}`` (k, n >= 1).
    """
    if frames is None or frames == "all":
        return ("all", 0)
    if isinstance(frames, Mapping) and len(frames) == 1:
        (mode, value), = frames.items()
        if mode in ("every", "num") and isinstance(value, int) and not isinstance(value, bool) and value >= 1:
            return (str(mode), int(value))
    raise ValueError(
        f"invalid frame sampling {frames!r}: use 'all', {{'every': k}} or {{'num': n}} with k, n >= 1"
    )


def frame_indices(num_frames: int, frames: FrameSpec) -> list[int]:
    """The frame indices a sampling option selects from a ``num_frames``-frame video.

    ``all``: ``0..F-1``; ``every k``: ``0, k, 2k, ... < F``; ``num n``: ``round(linspace(0, F-1, n))``
    (every frame when ``n >= F``).
    """
    if num_frames < 1:
        raise ValueError(f"a video needs at least one frame, got {num_frames}")
    mode, value = parse_frames(frames)
    if mode == "all":
        return list(range(num_frames))
    if mode == "every":
        return list(range(0, num_frames, value))
    if value >= num_frames:
        return list(range(num_frames))
    if value == 1:
        return [0]
    step = (num_frames - 1) / (value - 1)
    return [int(math.floor(i * step + 0.5)) for i in range(value)]


def _check_video(name: str, video: Any) -> torch.Tensor:
    if not isinstance(video, torch.Tensor) or video.ndim != 5 or video.shape[2] != 3:
        shape = tuple(video.shape) if isinstance(video, torch.Tensor) else type(video).__name__
        raise ValueError(f"{name} must be a (B, F, 3, H, W) tensor, got {shape}; add batch/frame dims with "
                         f"video[None] (an image is a 1-frame video)")
    if not video.is_floating_point():
        raise ValueError(f"{name} must be float in [0, 1], got {video.dtype}; convert uint8 with video.float() / 255")
    if video.numel():
        lo, hi = float(video.min()), float(video.max())
        if lo < -_RANGE_TOLERANCE or hi > 1 + _RANGE_TOLERANCE:
            raise ValueError(f"{name} must be in [0, 1], got values in [{lo:.3g}, {hi:.3g}]; "
                             f"map [-1, 1] with (x + 1) / 2 or [0, 255] with x / 255")
        if lo < 0 or hi > 1:  # rounding noise of a decoder: clip it (copies only when needed)
            video = video.clamp(0, 1)
    return video


def _check_texts(name: str, texts: Any, batch: int) -> list[str]:
    if isinstance(texts, str) or not isinstance(texts, Sequence):
        raise ValueError(f"{name} must be a list of {batch} strings, got {type(texts).__name__}")
    texts = list(texts)
    if len(texts) != batch or not all(isinstance(t, str) for t in texts):
        raise ValueError(f"{name} must be a list of {batch} strings (one per video), got {len(texts)} items")
    return texts


def _check_references(references: Any, batch: int) -> list[torch.Tensor | None] | None:
    if references is None:
        return None
    references = list(references)
    if len(references) != batch:
        raise ValueError(f"references must be None or a list of {batch} items (an image or None each), "
                         f"got {len(references)}")
    out: list[torch.Tensor | None] = []
    for i, ref in enumerate(references):
        if ref is None:
            out.append(None)
            continue
        if not isinstance(ref, torch.Tensor) or ref.ndim != 3 or ref.shape[0] != 3 or not ref.is_floating_point():
            raise ValueError(f"references[{i}] must be None or a float (3, H, W) image in [0, 1]")
        out.append(ref.clamp(0, 1))
    return out


def _check_groups(groups: Any, batch: int) -> list[int] | None:
    if groups is None:
        return None
    if isinstance(groups, torch.Tensor):
        groups = groups.tolist()
    groups = list(groups)
    if len(groups) != batch or not all(isinstance(g, int) and not isinstance(g, bool) for g in groups):
        raise ValueError(f"groups must be None or {batch} integers (one group id per sample), got {groups!r}")
    return groups


class Reward:
    """Base class of all rewards. Subclasses implement :meth:`score`; ``__call__`` validates the batch,
    calls it and normalises the result to a float32 CPU ``[B]`` tensor.

    Args:
        frames: frame sampling, ``"all"``, ``{"every": k}`` or ``{"num": n}`` (see module doc).
        device: where the reward's model runs; ``None`` = the device of the edited videos.
    """

    #: registry name; set by :func:`rewards.registry.register_reward` and by the registry for plugins
    name: str = "reward"
    #: True: the reward scores a whole group at once (:meth:`score_group`), not each sample on its own
    group_wise: bool = False
    #: True: the constructor only checks and stores its options (it loads and reads nothing), so a recipe's
    #: values are checked by building the reward before any work (:func:`rewards.registry.check_rewards_config`)
    checked_by_building: bool = False

    def __init__(self, *, frames: FrameSpec = "all", device: str | torch.device | None = None):
        parse_frames(frames)  # fail at construction, not at the first batch
        self.frames = frames
        self.device = torch.device(device) if device is not None else None

    # -- helpers for subclasses ------------------------------------------------------------------
    def frame_indices(self, num_frames: int) -> list[int]:
        """Indices this reward samples from a ``num_frames``-frame video."""
        return frame_indices(num_frames, self.frames)

    def sample_frames(self, video: torch.Tensor) -> torch.Tensor:
        """``(B, F, 3, H, W) -> (B, F', 3, H, W)`` with this reward's frame sampling."""
        idx = self.frame_indices(video.shape[1])
        if len(idx) == video.shape[1]:
            return video
        return video[:, idx]

    def resolve_device(self, video: torch.Tensor) -> torch.device:
        """The configured device, else the device of ``video``."""
        return self.device if self.device is not None else video.device

    def load(self, device: torch.device | str = "cpu") -> None:
        """Load the reward's model(s) now (on its configured device, else ``device``), so that a missing or broken
        model shows before any rollout instead of at the first score. Default: nothing to load."""

    # -- the interface ---------------------------------------------------------------------------
    def score(
        self,
        edited: torch.Tensor,
        source: torch.Tensor,
        *,
        source_captions: list[str],
        target_captions: list[str],
        instructions: list[str],
        references: list[torch.Tensor | None] | None,
    ) -> RewardOutput | torch.Tensor:
        """Score a validated batch; return a :class:`RewardOutput` or a ``[B]`` tensor."""
        raise NotImplementedError(f"{type(self).__name__} must implement score()")

    def score_group(self, edited: torch.Tensor, source: torch.Tensor, *, source_captions: list[str],
                    target_captions: list[str], instructions: list[str],
                    references: list[torch.Tensor | None] | None) -> RewardOutput | torch.Tensor:
        """Group-wise rewards: score the samples of ONE group (same arguments as :meth:`score`, the group's
        samples only, in batch order); return a :class:`RewardOutput` or a tensor with one score per sample."""
        raise NotImplementedError(f"{type(self).__name__} sets group_wise = True and must implement score_group()")

    def score_batch(self, edited: torch.Tensor, source: torch.Tensor, *, groups: list[int] | None,
                    **texts: Any) -> RewardOutput | torch.Tensor:
        """A validated batch: :meth:`score`, or for a group-wise reward :meth:`score_group` on each group
        (``groups``: one id per sample; ``None``: each sample alone). Overridden by the remote reward."""
        if not self.group_wise:
            return self.score(edited, source, **texts)
        batch = edited.shape[0]
        ids = list(range(batch)) if groups is None else groups
        scores = torch.full((batch,), float("nan"), dtype=torch.float32)
        details: list[dict] | None = [{} for _ in range(batch)]
        refs = texts["references"]
        for g in dict.fromkeys(ids):  # groups in order of first appearance
            idx = [i for i in range(batch) if ids[i] == g]
            sel = torch.tensor(idx)
            out = self.score_group(edited[sel], source[sel], **{k: [v[i] for i in idx] for k, v in texts.items()
                                                               if k != "references"},
                                   references=[refs[i] for i in idx] if refs is not None else None)
            if isinstance(out, torch.Tensor):
                out = RewardOutput(out)
            got = out.scores.detach().to(device="cpu", dtype=torch.float32).reshape(-1)
            if got.shape[0] != len(idx):
                raise RuntimeError(f"reward {self.name!r} returned {got.shape[0]} scores for a group of {len(idx)}")
            scores[sel] = got
            for j, i in enumerate(idx):
                details[i] = out.details[j] if out.details is not None else {}
        return RewardOutput(scores, details)

    def __call__(
        self,
        edited: torch.Tensor,
        source: torch.Tensor,
        *,
        source_captions: Sequence[str],
        target_captions: Sequence[str],
        instructions: Sequence[str],
        references: Sequence[torch.Tensor | None] | None = None,
        groups: Sequence[int] | None = None,
    ) -> RewardOutput:
        """Validate the batch, score it (see :meth:`score_batch`), return float32 CPU scores ``[B]``.
        ``groups`` (one int per sample) matters to group-wise rewards only."""
        edited = _check_video("edited", edited)
        source = _check_video("source", source)
        batch = edited.shape[0]
        if source.shape[0] != batch:
            raise ValueError(f"edited and source must have the same batch size, got {batch} and {source.shape[0]}")
        out = self.score_batch(
            edited,
            source,
            source_captions=_check_texts("source_captions", source_captions, batch),
            target_captions=_check_texts("target_captions", target_captions, batch),
            instructions=_check_texts("instructions", instructions, batch),
            references=_check_references(references, batch),
            groups=_check_groups(groups, batch),
        )
        if isinstance(out, torch.Tensor):
            out = RewardOutput(out)
        scores = out.scores.detach().to(device="cpu", dtype=torch.float32).reshape(-1)
        if scores.shape[0] != batch:
            raise RuntimeError(f"reward {self.name!r} returned {scores.shape[0]} scores for a batch of {batch}")
        details = out.details
        if details is not None and len(details) != batch:
            raise RuntimeError(f"reward {self.name!r} returned {len(details)} details for a batch of {batch}")
        return RewardOutput(scores, details)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, frames={self.frames!r})"
