"""Rewards for Edit-GRPO (VIVA section 3.3): a registry of built-in and plugin rewards.

Quick use::

    from rewards import CombinedReward
    reward = CombinedReward.from_config({"clip_if": {"weight": 1.0, "model": "hf:/path/clip"},
                                         "clip_sp": {"weight": 0.5, "model": "hf:/path/clip"}})
    out = reward(edited, source, source_captions=..., target_captions=..., instructions=...)
    out.total, out.components["clip_if"]

See docs/rewards.md.
"""
from .base import FrameSpec, Reward, RewardOutput, frame_indices, parse_frames
from .registry import (
    ENTRY_POINT_GROUP,
    CombinedOutput,
    CombinedReward,
    available_rewards,
    build_reward,
    register_reward,
    weighted_total,
)

__all__ = [
    "ENTRY_POINT_GROUP",
    "CombinedOutput",
    "CombinedReward",
    "FrameSpec",
    "JudgeClient",
    "Reward",
    "RewardOutput",
    "available_rewards",
    "build_reward",
    "frame_indices",
    "load_clip",
    "parse_frames",
    "register_reward",
    "weighted_total",
]


def __getattr__(name):  # heavy modules (transformers, open_clip) load only when used
    if name == "load_clip":
        from .clip import load_clip

        return load_clip
    if name == "JudgeClient":
        from .vlm_judge import JudgeClient

        return JudgeClient
    raise AttributeError(f"module 'rewards' has no attribute {name!r}")
