"""Paired-data construction from real videos with captions (VIVA section 3.4, Appendix C).

    python -m viva_base.data.build recipe=recipes/data_build.yaml inputs=<folder | manifest.jsonl>

Stages (each a function over one record, each cached in the record's folder): object replacement
(Grounding DINO + SAM 2 + inpainting), object addition/removal (random masks, inpainting without the
object), global content editing (Canny edges + a rewritten caption), then filtering (a VLM labels
artifacts and writes instructions; the direction rule). The output ``pairs.jsonl`` is a pairs
manifest that ``viva_base.sft`` reads as it is. See docs/data_pipeline.md.

Modules: :mod:`.cli` (recipe schema and runner), :mod:`.stages`, :mod:`.models` (VLM client, detector,
tracker, generator, tiny models), :mod:`.records` (inputs, record folders, sharding, manifests),
:mod:`.text` (caption rules and prompts).
"""
from .cli import BuildConfig, build_record, main, stage_fingerprints
from .records import RecordStore, in_shard, list_inputs, parse_shard, write_outputs
from .stages import choose_directions

__all__ = ["BuildConfig", "RecordStore", "build_record", "choose_directions", "in_shard", "list_inputs", "main",
           "parse_shard", "stage_fingerprints", "write_outputs"]
