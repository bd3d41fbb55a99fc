"""A group-wise reward: a VLM judge compares the edits of one group in pairs; the reward is each edit's win rate.

For every pair ``(i, j)`` of a group the judge (the OpenAI-compatible client of :mod:`rewards.vlm_judge`) sees
the source frames, edit A and edit B, and answers which one follows the instruction better while preserving the
source better. Each pair is asked in both orders (A = i, B = j and A = j, B = i), which cancels a judge's bias
for a position: a judge that always answers "A" gives every edit exactly 0.5. An edit's reward is its win rate

    w_i = 1/(G-1) sum_{j != i} 1/2 (win_i(i as A, j as B) + win_i(j as A, i as B))

(the mean over the orders that got an answer), in [0, 1], ``G (G - 1)`` requests per group. With log-probs
(``logprobs: true``) a win is the judge's probability ``P(A) / (P(A) + P(B))`` at the token of its answer (a
soft win) instead of 0 or 1. A pair with no answer in either order is left out; an edit with no answered pair
(or alone in its group) is NaN.

Normalisation: the win rates of a group whose pairs all got an answer average exactly 0.5, so the group mean
carries no information and only the spread ranks the samples. With ``train.reward_normalization: component``
(recommended) the win rate is normalised in its group like every other component, then weighted. With
``total`` it is added to the other components' raw scores before the group normalisation: its weight then
sets how much a win-rate difference counts against, e.g., a CLIP-score difference (docs/rewards.md).
"""
from __future__ import annotations

import concurrent.futures
import itertools
import math
import re
from collections.abc import Mapping
from typing import Any

import torch

from .base import FrameSpec, Reward, RewardOutput, frame_indices
from .registry import register_reward
from .vlm_judge import JudgeClient, JudgeParseError, expected_value, json_objects_in, token_probabilities

__all__ = ["PAIRWISE_PROMPT", "PAIRWISE_PROMPT_VERSION", "VlmPairwise", "parse_winner", "soft_winner", "win_rates"]

#: bump when the prompt or the message layout changes (part of every cache key)
PAIRWISE_PROMPT_VERSION = "edit-pairwise-v1"

PAIRWISE_PROMPT = """You are an impartial expert judge of instruction-based video editing.
You are shown frames of a SOURCE video and the frames at the same time steps of two EDITED videos, A and B, \
that editing models produced from it by following an editing INSTRUCTION.
Which edit is better: it carries out the instruction more completely and precisely, and it keeps better \
everything the instruction does not ask to change (other objects, identity, layout, background, camera and \
motion), without artifacts?
INSTRUCTION: "{instruction}"

Answer with a JSON object only, no other text: {{"winner": "A"}} or {{"winner": "B"}}"""


def parse_winner(text: str) -> float:
    """1.0 if the answer says A won, 0.0 if B: a JSON object ``{"winner": "A"}`` anywhere in the text, or the
    bare letter. Raises :class:`JudgeParseError` otherwise."""
    for obj in json_objects_in(text or ""):
        if isinstance(obj, Mapping):
            for k, v in obj.items():
                if str(k).strip().lower() in ("winner", "better", "answer") and str(v).strip().upper() in ("A", "B"):
                    return 1.0 if str(v).strip().upper() == "A" else 0.0
    bare = re.fullmatch(r"\W*([AaBb])\W*", text or "")
    if bare:
        return 1.0 if bare.group(1).upper() == "A" else 0.0
    raise JudgeParseError(f"no winner A or B in the answer: {(text or '').strip()[:80]!r}")


def soft_winner(content: Any) -> float | None:
    """``P(A) / (P(A) + P(B))`` at the answer's first token that reads A or B; None without log-probs there."""
    if not isinstance(content, list):
        return None
    for entry in content:
        if isinstance(entry, Mapping) and str(entry.get("token", "")).strip().strip('"').upper() in ("A", "B"):
            probs = {k.upper(): v for k, v in token_probabilities(entry).items()}
            return expected_value(probs, {"A": 1.0, "B": 0.0})
    return None


def win_rates(n: int, outcomes: Mapping[tuple[int, int], float]) -> list[float]:
    """Each of ``n`` samples' win rate from ordered comparisons: ``outcomes[(a, b)]`` is how much the sample shown
    as A beat the one shown as B (1, 0, or a probability; NaN = no answer). A pair's score for ``i`` is the mean
    over its answered orders of ``i``'s win; the win rate is the mean over ``i``'s pairs with an answer (NaN if none)."""
    rates = []
    for i in range(n):
        pair_scores = []
        for j in range(n):
            if j == i:
                continue
            wins = [outcomes.get((i, j), math.nan), 1.0 - outcomes.get((j, i), math.nan)]
            wins = [w for w in wins if not math.isnan(w)]
            if wins:
                pair_scores.append(sum(wins) / len(wins))
        rates.append(sum(pair_scores) / len(pair_scores) if pair_scores else math.nan)
    return rates


@register_reward("vlm_pairwise")
class VlmPairwise(Reward):
    """Pairwise VLM-judge reward: each edit's win rate against the other edits of its group (module doc).

    Kwargs: those of :class:`rewards.vlm_judge.JudgeClient` (``base_url``, ``model``, ``api_key_env``,
    ``logprobs``, ``concurrency``, ``cache_dir``, ...) and ``frames`` (default ``{"num": 4}``). Details per sample:
    ``comparisons`` (answered) and ``failed`` (comparisons without an answer).
    """

    group_wise = True

    def __init__(self, *, base_url: str, model: str, api_key_env: str | None = "OPENAI_API_KEY",
                 frames: FrameSpec = None, device: str | None = None, **client_kwargs: Any):
        if "api_key" in client_kwargs:
            raise ValueError("vlm_pairwise takes api_key_env=<name of an environment variable>, never the key itself")
        super().__init__(frames=frames if frames is not None else {"num": 4}, device=device)
        self.client = JudgeClient(base_url, model, api_key_env=api_key_env, **client_kwargs)

    def request(self, source: torch.Tensor, a: torch.Tensor, b: torch.Tensor, instruction: str) -> dict[str, Any]:
        """The chat request comparing edit ``a`` (shown as A) with ``b`` (B); frames ``(F, 3, H, W)``."""
        prompt = PAIRWISE_PROMPT.format(instruction=instruction.replace('"', "'"))
        return self.client.request_body(self.client.image_content(prompt, [
            (f"SOURCE video, {source.shape[0]} frame(s) in temporal order:", source),
            (f"EDIT A, {a.shape[0]} frame(s) at the same time steps:", a),
            (f"EDIT B, {b.shape[0]} frame(s) at the same time steps:", b)]))

    def _compare(self, body: Mapping[str, Any]) -> tuple[float, str | None]:
        key = self.client.cache_key(body, PAIRWISE_PROMPT_VERSION)
        cached = self.client._cache_get(key)
        if cached is not None and "p_a" in cached:
            return cached["p_a"], None
        value, error = self.client.ask(body, parse_winner, soft_winner, "vlm_pairwise")
        if error is None:
            self.client._cache_put(key, {"p_a": value}, "")
        return value, error

    def score_group(self, edited, source, *, source_captions, target_captions, instructions, references):
        n = edited.shape[0]
        src = [source[i, frame_indices(source.shape[1], self.frames)] for i in range(n)]
        edt = [edited[i, frame_indices(edited.shape[1], self.frames)] for i in range(n)]
        pairs = list(itertools.permutations(range(n), 2))   # both orders of every pair
        # the group shares its prompt: the source and instruction of the first sample are shown with every pair
        bodies = [self.request(src[a], edt[a], edt[b], instructions[a]) for a, b in pairs]
        if not bodies:
            return RewardOutput(torch.full((n,), math.nan), [{"comparisons": 0, "failed": 0}] * n)
        with concurrent.futures.ThreadPoolExecutor(max_workers=min(self.client.concurrency, len(bodies))) as pool:
            results = list(pool.map(self._compare, bodies))
        outcomes = {pair: value for pair, (value, _) in zip(pairs, results)}
        rates = win_rates(n, outcomes)
        details = []
        for i in range(n):
            mine = [r for (a, b), r in zip(pairs, results) if i in (a, b)]
            details.append({"comparisons": sum(e is None for _, e in mine), "failed": sum(e is not None for _, e in mine)})
        return RewardOutput(torch.tensor(rates, dtype=torch.float32), details)

    def __repr__(self) -> str:
        return f"VlmPairwise(client={self.client!r}, frames={self.frames!r})"
