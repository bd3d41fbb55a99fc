"""``toy_oracle``: the toy world's true edit accuracy used as a reward: a diagnostic upper bound.

A proxy reward (``clip_if``, ``clip_sp``, ...) can only be as good as its agreement with the truth.
In the toy world the truth is known: every prompt of a toy manifest carries its source ``scene`` and
its edit ``ops``, so the true target video and the exact edit mask can be rendered. This reward looks
each sample up by its ``(instruction, source caption)`` in that manifest, renders the target and mask
and returns the oracle combined score (:func:`viva_base.data.toyworld.oracle.oracle_scores`, in [0, 1],
1 = exactly the target).

Training on it answers "can Edit-GRPO (sampler, advantages, clipped loss, KL, LoRA) improve the true
edit accuracy at all with this budget, given a perfect reward?". If it can and a proxy cannot, the
proxy is the problem; if it cannot, the optimiser settings are. It is never a method: the real world has
no oracle.

    rewards:
      toy_oracle: {weight: 1.0, manifest: outputs/toy/data/grpo.jsonl}

With the toy chain (``toy.enabled``) ``manifest: toy`` names the chain's own GRPO and eval manifests (the
trainer's held-out evaluation scores its prompts with the same rewards).
"""
from __future__ import annotations

from pathlib import Path

import torch

from .base import Reward, RewardOutput
from .registry import register_reward

__all__ = ["ToyOracleReward"]


@register_reward("toy_oracle")
class ToyOracleReward(Reward):
    """The toy oracle score of each edit (module docstring).

    Args:
        manifest: a toy-world manifest (``grpo.jsonl``, ``eval.jsonl``) or a list of them, whose records carry
            ``scene`` and ``ops``; every scored prompt must be in one of them.
        component: which oracle quantity to return: ``oracle`` (default), or the negated error
            ``-if_error`` / ``-sp_error`` (``if`` / ``sp``) to study one side alone.
    """

    COMPONENTS = ("oracle", "if", "sp")

    def __init__(self, manifest, *, component: str = "oracle", frames="all", device=None):
        super().__init__(frames=frames, device=device)
        if component not in self.COMPONENTS:
            raise ValueError(f"toy_oracle: component={component!r}; use one of {list(self.COMPONENTS)}")
        self.component = component
        self.records: dict[tuple[str, str], dict] = {}
        for path in [Path(manifest)] if isinstance(manifest, (str, Path)) else [Path(m) for m in manifest]:
            if not path.is_file():
                raise FileNotFoundError(f"toy_oracle: manifest {path} does not exist; point `manifest` at a toy "
                                        f"world manifest (python -m viva_base.data.toyworld.build --out DIR)")
            from viva_base.data.manifest import read_jsonl

            for n, rec in read_jsonl(path):
                if "scene" not in rec or "ops" not in rec:
                    raise ValueError(f"toy_oracle: {path}:{n} has no `scene`/`ops`: not a toy-world manifest")
                self.records[(rec["instruction"], rec["source_caption"])] = rec
        self._cache: dict[tuple[str, str], list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def truth(self, instruction: str, source_caption: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``[(target (F, 3, H, W) in [0, 1], mask (F, 1, H, W)), ...]`` of one prompt, rendered from its scene
        graph: one pair, or one per correct edit of an open instruction (``toyworld.edits.admissible_truths``)."""
        key = (instruction, source_caption)
        if key not in self._cache:
            from viva_base.data.toyworld import op_from_json, scene_from_json
            from viva_base.data.toyworld.edits import admissible_truths

            rec = self.records.get(key)
            if rec is None:
                raise KeyError(f"toy_oracle: the prompt {instruction!r} (source {source_caption!r}) is not in the "
                               f"manifest; give the manifest the prompts come from")
            self._cache[key] = admissible_truths(scene_from_json(rec["scene"]), [op_from_json(o) for o in rec["ops"]])
        return self._cache[key]

    def score(self, edited, source, *, source_captions, target_captions, instructions, references):
        from viva_base.data.toyworld.oracle import best_oracle_scores

        truths = [self.truth(i, s) for i, s in zip(instructions, source_captions)]
        shape = tuple(truths[0][0][0].shape) if truths else ()
        if shape != tuple(edited.shape[1:]):
            raise ValueError(f"toy_oracle: edited videos {tuple(edited.shape)} do not match the rendered targets "
                             f"{shape}; do not resize or cut toy clips")
        idx = self.frame_indices(edited.shape[1])
        s = best_oracle_scores(edited[:, idx], source[:, idx], [[(t[idx], m[idx]) for t, m in options]
                                                                for options in truths])
        value = {"oracle": s["oracle"], "if": -s["if_error"], "sp": -s["sp_error"]}[self.component]
        details = [{"if_error": float(a), "sp_error": float(b)} for a, b in zip(s["if_error"], s["sp_error"])]
        return RewardOutput(scores=value.float().cpu(), details=details)
