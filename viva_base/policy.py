"""The edit-policy interface: what Edit-GRPO, the edit command and evaluation see of an editor.

An editor (``VivaEditor``; a Lucy-Edit editor later) implements :class:`EditPolicy`. Nothing outside
the editors knows which backbone it is.

Conditions are :class:`Condition` objects: a dict of tensors sharing the leading batch dimension,
built ONCE per prompt (the frozen VLM and VAE never run G times for one prompt) and then repeated,
concatenated (cond ++ uncond for one CFG forward) or indexed by the caller.
"""
from __future__ import annotations

from typing import Iterator, Mapping, Protocol, Sequence, runtime_checkable

import torch
import torch.nn.functional as F


class Condition(Mapping[str, torch.Tensor]):
    """A batch of per-sample condition tensors (leading dim = batch).

    Sequence tensors of different lengths (text tokens) are right-padded with zeros when concatenated:
    their masks are padded with zeros too, so padded positions are ignored by the model.
    """

    def __init__(self, tensors: Mapping[str, torch.Tensor]):
        sizes = {k: v.shape[0] for k, v in tensors.items()}
        if len(set(sizes.values())) > 1:
            raise ValueError(f"condition tensors disagree on the batch size: {sizes}")
        self._t = dict(tensors)

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._t[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._t)

    def __len__(self) -> int:
        return len(self._t)

    @property
    def batch_size(self) -> int:
        return next(iter(self._t.values())).shape[0]

    def __repr__(self) -> str:
        return "Condition(" + ", ".join(f"{k}={tuple(v.shape)}" for k, v in self._t.items()) + ")"

    def map(self, fn) -> "Condition":
        return Condition({k: fn(v) for k, v in self._t.items()})

    def to(self, *args, **kwargs) -> "Condition":
        return self.map(lambda v: v.to(*args, **kwargs))

    def select(self, index) -> "Condition":
        """Rows ``index`` (an int list, a slice or a long/bool tensor)."""
        if isinstance(index, int):
            index = [index]
        return self.map(lambda v: v[index])

    def repeat_interleave(self, repeats: int) -> "Condition":
        """Each prompt's condition ``repeats`` times in a row (a group of G samples)."""
        return self.map(lambda v: v.repeat_interleave(repeats, dim=0))

    @staticmethod
    def cat(conditions: Sequence["Condition"]) -> "Condition":
        keys = list(conditions[0].keys())
        for c in conditions[1:]:
            if list(c.keys()) != keys:
                raise ValueError(f"cannot concatenate conditions with keys {keys} and {list(c.keys())}")
        out = {}
        for k in keys:
            parts = [c[k] for c in conditions]
            if len({p.shape[1:] for p in parts}) > 1:
                if any(p.ndim < 2 or p.shape[2:] != parts[0].shape[2:] for p in parts):
                    raise ValueError(f"condition '{k}' differs in more than its sequence length")
                length = max(p.shape[1] for p in parts)
                parts = [F.pad(p, [0, 0] * (p.ndim - 2) + [0, length - p.shape[1]]) for p in parts]
            out[k] = torch.cat(parts, dim=0)
        return Condition(out)


@runtime_checkable
class EditPolicy(Protocol):
    """The small interface an editor implements (docs/architecture.md, "The edit-policy interface")."""

    transformer: torch.nn.Module  # the module LoRA goes on
    device: torch.device          # where latents and conditions live

    def encode_condition(self, videos: torch.Tensor, instructions: Sequence[str],
                         references: Sequence[torch.Tensor | None] | None = None) -> tuple[Condition, Condition]:
        """(cond, uncond) for B prompts; ``videos`` (B, F, 3, H, W) in [0, 1]. Runs each frozen encoder once."""

    def encode_video(self, videos: torch.Tensor) -> torch.Tensor:
        """Pixel videos (B, F, 3, H, W) in [0, 1] -> latents (B, C, f, h, w), normalised."""

    def latent_shape(self, cond: Condition) -> tuple[int, ...]:
        """Shape of one sample's noise latent (C, f, h, w)."""

    def velocity(self, latents: torch.Tensor, sigma: torch.Tensor, cond: Condition) -> torch.Tensor:
        """Predicted velocity ``v = noise - z_data`` at noise level ``sigma`` [B] (float32 out)."""

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> pixel videos (B, F, 3, H, W) in [0, 1]."""

    @property
    def lora_targets(self) -> list[str] | str:
        """peft ``target_modules`` for the paper's LoRA (self- and cross-attention of the DiT)."""

    def save_pretrained(self, path) -> None: ...

    @classmethod
    def from_pretrained(cls, path, **kwargs) -> "EditPolicy": ...
