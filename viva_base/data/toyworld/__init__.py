"""The toy world: procedural videos with known ground-truth edits (scene graph -> caption, edits, pixels).

See :mod:`.scene` (the scene graph and captions), :mod:`.render` (exact numpy rendering), :mod:`.edits`
(operations, edit masks, instructions), :mod:`.pairs` (examples in memory) and :mod:`.build` (the
manifests the SFT and Edit-GRPO recipes read; ``python -m viva_base.data.toyworld.build --out DIR``).
"""
from .edits import (EDIT_TYPES, Add, EditError, Recolour, Remove, Replace, SetBackground, apply, apply_op,
                    edit_mask, instruction, op_from_json, op_to_json)
from .pairs import ToyExample, ToyPairs, compound_combos, example_rng, random_scene, sample_example, split_combos
from .render import render, render_tensor
from .scene import Background, Obj, Scene, caption, scene_from_json, scene_to_json

__all__ = [
    "Background", "Obj", "Scene", "caption", "scene_to_json", "scene_from_json", "render", "render_tensor",
    "Add", "Remove", "Replace", "Recolour", "SetBackground", "EditError", "EDIT_TYPES", "apply", "apply_op",
    "edit_mask", "instruction", "op_to_json", "op_from_json", "ToyExample", "ToyPairs", "sample_example",
    "random_scene", "example_rng", "compound_combos", "split_combos", "build_toy_dataset",
]


def build_toy_dataset(*args, **kwargs):
    """See :func:`viva_base.data.toyworld.build.build_toy_dataset` (imported lazily: it pulls in video I/O)."""
    from .build import build_toy_dataset as _build

    return _build(*args, **kwargs)
