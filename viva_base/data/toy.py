"""A cached toy-world dataset: build it once per parameter set, reuse it on every later run."""
from __future__ import annotations

import json
import logging
from pathlib import Path

logger = logging.getLogger(__name__)

_COUNT_KEYS = {"n_sft_video": "sft_video", "n_sft_image": "sft_image", "n_sft_compound_video": "sft_compound_video",
               "n_sft_compound_image": "sft_compound_image", "n_grpo": "grpo",
               "n_eval_compound": "eval_compound", "n_eval_simple": "eval_simple"}


# parameters added after worlds were first cached: a world without the key was built with this value
_ADDED_LATER = {"open_place": 0.0, "grpo_types": None, "eval_simple_types": None, "noop_clause": 0.0}


def ensure_toy_dataset(out_dir, **params) -> dict[str, Path]:
    """``build_toy_dataset(out_dir, **params)`` unless ``out_dir/world.json`` says it was built with the
    same parameters (a finished build writes world.json last, so a killed build is rebuilt)."""
    from .toyworld.build import build_toy_dataset

    out = Path(out_dir)
    world_file = out / "world.json"
    if world_file.exists():
        world = json.loads(world_file.read_text())
        same = all(
            (world.get("counts", {}).get(_COUNT_KEYS[k], 0) == v) if k in _COUNT_KEYS else  # (worlds built
            # before a count existed hold 0 of it)
            (_plain(world.get(k, _ADDED_LATER[k])) == _plain(v)) if k in _ADDED_LATER else
            (k not in world or _plain(world[k]) == _plain(v))
            for k, v in params.items())
        if same:
            logger.info("toy data: reusing %s", out)
            return {name: out / fname for name, fname in world["manifests"].items()} | {"world": world_file}
        world_file.unlink()
    return build_toy_dataset(out, overwrite=True, **params)


def _plain(v):
    return list(v) if v is not None and not isinstance(v, (str, int, float, dict)) else v  # lists, tuples, ListConfig
