"""One trainer, two editors: ``editgrpo.train.main`` runs unchanged on the tiny VIVA and the tiny Lucy-Edit editor,
and ``editgrpo/`` holds no backbone-specific branch. The Lucy LoRA it writes loads into diffusers' LucyEditPipeline."""
import ast
import json
import math
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

EDITGRPO = Path(__file__).resolve().parent.parent / "editgrpo"
# names of backbones, their editors and their components: the trainer must not mention any of them in code
BACKBONE_SUBSTRINGS = ("lucy", "hunyuan", "llava", "umt5", "t5encoder", "backbone", "tiny_kind", "vivaeditor",
                       "viva_editor")
BACKBONE_WORDS = {"viva", "wan"}  # whole words only (``WanTransformer3DModel``, ``"viva"``; not ``swan``)
BACKBONE_MODULES = ("viva_base.model", "viva_base.lucy", "viva_base.tiny", "viva_base.tiny_lucy",
                    "viva_base.instructor", "viva_base.vae")
COMPONENT_ATTRS = {"instructor", "processor", "text_encoder", "text_encoder_2", "tokenizer_2", "vae"}


def backbone_named(text: str) -> bool:
    """Whether an identifier or string names a backbone (substrings above, or a whole camel/snake-case word)."""
    words = re.split(r"[^A-Za-z0-9]+|(?<=[a-z])(?=[A-Z])", text)
    return any(s in text.lower() for s in BACKBONE_SUBSTRINGS) or any(w.lower() in BACKBONE_WORDS for w in words)


def backbone_branches(source: str) -> list[str]:
    """Places in ``source`` where code (not docstrings or comments) knows which backbone it runs: backbone-named
    identifiers or imports, editor-component attributes, backbone names in comparisons, isinstance on an editor
    class, or a branch on a class name."""
    found = []
    tree = ast.parse(source)
    for node in ast.walk(tree):
        line = getattr(node, "lineno", 0)
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            names = [] if isinstance(node, ast.Import) else [a.name for a in node.names]
            names += [a.asname for a in node.names if a.asname]
            if any(m.startswith(BACKBONE_MODULES) or m.startswith(("diffusers.models", "transformers.models"))
                   for m in mods) or any(backbone_named(n) for n in names):
                found.append(f"{line}: import of a backbone module or class")
        elif isinstance(node, ast.Name) and backbone_named(node.id):
            found.append(f"{line}: name {node.id}")
        elif isinstance(node, ast.Attribute):
            if backbone_named(node.attr):
                found.append(f"{line}: attribute .{node.attr}")
            elif node.attr in COMPONENT_ATTRS:
                found.append(f"{line}: editor component .{node.attr}")
            elif node.attr == "__name__" and isinstance(node.value, ast.Attribute) and node.value.attr == "__class__":
                found.append(f"{line}: branch on a class name")
        elif isinstance(node, (ast.Compare, ast.Match)):
            for sub in ast.walk(node):
                if isinstance(sub, ast.Constant) and isinstance(sub.value, str) and backbone_named(sub.value):
                    found.append(f"{line}: comparison with {sub.value!r}")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("isinstance", "type"):
            for sub in ast.walk(node):
                if isinstance(sub, ast.Name) and sub.id.endswith("Editor"):
                    found.append(f"{line}: {node.func.id} on {sub.id}")
    return found


def test_the_checker_finds_backbone_branches():
    bad = {
        'if type(editor).__name__ == "LucyEditor":\n    x = 1\n': "comparison",
        "from viva_base.lucy import LucyEditor\n": "import",
        "if isinstance(policy, VivaEditor):\n    pass\n": "VivaEditor",
        "z = policy.vae.encode(x)\n": "component",
        'if cfg.model.tiny_kind == "viva":\n    pass\n': "tiny_kind",
        "if editor.__class__.__name__ == name:\n    pass\n": "class name",
        "from diffusers import WanTransformer3DModel\n": "import",
        'match kind:\n    case "hunyuan":\n        pass\n': "hunyuan",
        "from diffusers.models.transformers.transformer_wan import WanAttention\n": "import",
        'if kind == "wan":\n    pass\n': "wan",
    }
    for snippet, what in bad.items():
        found = backbone_branches(snippet)
        assert found and any(what.lower() in f.lower() for f in found), (snippet, found)
    good = ("v = policy.velocity(z, sigma, cond)\nshape = policy.latent_shape(cond)\n"
            "add_lora(editor.transformer, rank=4, alpha=8, targets=editor.lora_targets)\n"
            "from viva_base.policy import Condition\nfrom viva_base.training import build_editor\n"
            "shift = editor.config.shift\nsampling = 'swan song'\nn_wanted = 3\nif mode == 'sde':\n    pass\n"
            "import viva_base.video\nfrom diffusers.optimization import get_scheduler\n")
    assert backbone_branches(good) == []


def test_editgrpo_has_no_backbone_branches():
    files = sorted(EDITGRPO.glob("*.py"))
    assert len(files) >= 5
    found = {f.name: backbone_branches(f.read_text()) for f in files}
    assert {k: v for k, v in found.items() if v} == {}


RUN = ["train.num_iterations=2", "train.prompts_per_iteration=2", "train.num_generations=2", "data.toy_prompts=4",
       "sampling.num_steps=3", "sampling.sde_window_size=1", "train.checkpoint_every=0", "report_to=none"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """``editgrpo.train.main`` on each tiny editor's recipe, through the same code (the recipe names the model)."""
    from editgrpo import train as train_mod
    from editgrpo.config import GRPOConfig
    from viva_base.recipe import load_recipe

    out = {}
    real_build = train_mod.build_editor
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(EDITGRPO.parent)
        for recipe in ("tiny", "lucy_tiny"):
            seen = {}

            def build(cfg, device=None, _seen=seen):
                _seen["editor"] = real_build(cfg, device)
                return _seen["editor"]

            mp.setattr(train_mod, "build_editor", build)
            d = tmp_path_factory.mktemp(recipe)
            cfg = load_recipe(GRPOConfig, [f"recipe=recipes/{recipe}.yaml", f"output_dir={d}", *RUN])
            train_mod.main(cfg)
            out[recipe] = {"dir": d, "editor": seen["editor"]}
    return out


@pytest.mark.parametrize("recipe,editor_class", [("tiny", "VivaEditor"), ("lucy_tiny", "LucyEditor")])
def test_same_trainer_on_both_tiny_editors(runs, recipe, editor_class):
    run = runs[recipe]
    editor = run["editor"]
    assert type(editor).__name__ == editor_class
    rows = [json.loads(line) for line in (run["dir"] / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(math.isfinite(r["reward"]) and r["nan_rewards"] == 0 for r in rows)
    assert rows[0]["ratio_mean"] == pytest.approx(1.0, abs=1e-4)  # first inner step is on-policy
    assert any(r["grad_norm"] > 0 for r in rows)
    # every frozen encoder saw each prompt once per iteration (2 iterations x 2 prompts), never once per sample
    assert editor.calls and all(n == 2 * 2 for n in editor.calls.values()), editor.calls
    lora = load_file(str(run["dir"] / "lora" / "pytorch_lora_weights.safetensors"))
    modules = {k.removeprefix("transformer.").rsplit(".lora_", 1)[0] for k in lora}
    assert modules and all(re.fullmatch(editor.lora_targets, m) for m in modules)
    assert any(v.abs().max() > 0 for k, v in lora.items() if "lora_B" in k)  # B starts at 0: it was trained


def test_lucy_lora_loads_into_diffusers_lucy_pipeline(runs):
    """The adapter the trainer wrote is a diffusers LoRA: LucyEditPipeline.load_lora_weights gives the DiT our
    adapter-loaded editor has."""
    from viva_base.peft_utils import load_lora
    from viva_base.tiny_lucy import make_tiny_lucy_editor

    path = runs["lucy_tiny"]["dir"] / "lora"
    ours, base = make_tiny_lucy_editor(seed=0), make_tiny_lucy_editor(seed=0)
    load_lora(ours.transformer, path)
    theirs = make_tiny_lucy_editor(seed=0)
    theirs.to_pipeline().load_lora_weights(str(path))
    video = torch.rand(1, 9, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    cond, _ = base.encode_condition(video, ["make the background night"], with_uncond=False)
    z = torch.randn(1, *base.latent_shape(cond), generator=torch.Generator().manual_seed(1))
    v_ours, v_theirs, v_base = (e.velocity(z, 0.6, cond) for e in (ours, theirs, base))
    assert torch.allclose(v_ours, v_theirs, atol=1e-6)
    assert (v_ours - v_base).abs().max() > 1e-6
