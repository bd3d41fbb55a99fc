"""GRPO prompts: ``(V_src, t_src, t_edit, t_ins[, I_ref])`` from a prompts manifest (paper Appendix C.2),
or toy-world prompts generated into ``output_dir/data`` when no manifest is given."""
from __future__ import annotations

import functools
from pathlib import Path

import torch

from viva_base.data.manifest import read_manifest
from viva_base.data.pairs import _fit_clip
from viva_base.errors import UserError
from viva_base.video import read_image, read_video


class PromptSource:
    def __init__(self, records: list[dict], *, frames: int | None = None, size=None):
        self.records = records
        self.frames = frames
        self.size = tuple(size) if size else None
        self._cache: dict[str, torch.Tensor] = {}

    @classmethod
    def from_config(cls, cfg) -> "PromptSource":
        manifest = cfg.data.manifest
        if manifest is None:
            from viva_base.data.toy import ensure_toy_dataset

            d = cfg.data
            paths = ensure_toy_dataset(Path(cfg.output_dir) / "data", seed=d.toy_seed, n_sft_video=0, n_sft_image=0,
                                      n_grpo=d.toy_prompts, n_eval_compound=0, n_eval_simple=0,
                                      frames=d.toy_frames, size=d.toy_size)
            manifest = paths["grpo"]
        return cls(read_manifest(manifest, "prompts"), frames=cfg.data.frames, size=cfg.data.size)

    @functools.cached_property
    def _probes(self) -> list[tuple]:
        """``probe_video`` of every prompt's source, once."""
        from viva_base.video import probe_video

        return [probe_video(r["source"]) for r in self.records]

    def frame_counts(self) -> list[int]:
        """Each prompt's source frame count as the editor will see it (after ``data.frames``)."""
        from viva_base.data.pairs import frames_after_cut

        return frames_after_cut([int(p[0]) for p in self._probes], self.frames)

    def shapes(self) -> list[tuple[int, int]]:
        """Each prompt's source ``(height, width)``, as shown."""
        return [(int(p[1]), int(p[2])) for p in self._probes]

    def __len__(self) -> int:
        return len(self.records)

    def choose(self, n: int, generator: torch.Generator) -> list[int]:
        """``n`` prompt indices for one iteration (without replacement when there are enough)."""
        if n <= len(self.records):
            return [int(i) for i in torch.randperm(len(self.records), generator=generator)[:n]]
        return [int(i) for i in torch.randint(len(self.records), (n,), generator=generator)]

    def _video(self, path: str) -> torch.Tensor:
        if path not in self._cache:
            self._cache[path] = _fit_clip(read_video(path).frames, self.frames, self.size, path)
        return self._cache[path]

    def load(self, indices: list[int]) -> dict:
        recs = [self.records[i] for i in indices]
        videos = [self._video(r["source"]) for r in recs]
        if len({tuple(v.shape) for v in videos}) > 1:
            raise UserError("prompt videos differ in shape; set data.frames and data.size")
        return {
            "id": [r["id"] for r in recs],
            "source": torch.stack(videos),
            "instruction": [r["instruction"] for r in recs],
            "source_caption": [r["source_caption"] for r in recs],
            "target_caption": [r["target_caption"] for r in recs],
            "reference": [read_image(r["reference"]) if r.get("reference") else None for r in recs],
        }
