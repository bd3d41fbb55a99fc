"""viva_base.sft_checks.validate_sft_config: a wrong SFT value is one UserError naming its key, before any work."""
import time

import pytest

from viva_base.errors import UserError
from viva_base.recipe import load_recipe
from viva_base.sft import SFTConfig
from viva_base.sft_checks import validate_sft_config


def _cfg(repo_root, monkeypatch, *overrides, recipe="recipes/sft_tiny.yaml"):
    monkeypatch.chdir(repo_root)
    return load_recipe(SFTConfig, [f"recipe={recipe}", *overrides])


@pytest.mark.parametrize("recipe", ["recipes/sft_tiny.yaml", "recipes/sft_toy.yaml", "recipes/sft_viva.yaml"])
def test_shipped_recipes_pass(repo_root, monkeypatch, recipe):
    overrides = ["data.manifest=null"] if recipe.endswith("sft_viva.yaml") else []  # its manifest is the user's
    validate_sft_config(_cfg(repo_root, monkeypatch, *overrides, recipe=recipe))


@pytest.mark.parametrize("override, key", [
    ("train.trainable=everything", "train.trainable"),
    ("train.mixed_precision=fp8", "train.mixed_precision"),
    ("train.lr_scheduler=cosinus", "train.lr_scheduler"),
    ("train.lr_scheduler=piecewise_constant", "train.lr_scheduler"),  # an AttributeError once the editor was built
    ("train.timestep_sampling=beta", "train.timestep_sampling"),
    ("model.dtype=int8", "model.dtype"),
    ("train.max_steps=0", "train.max_steps"),
    ("train.learning_rate=-1e-4", "train.learning_rate"),
    ("train.warmup_steps=-1", "train.warmup_steps"),
    ("train.cfg_dropout=1.5", "train.cfg_dropout"),
    ("train.pooled_dropout=-0.1", "train.pooled_dropout"),
    ("train.adam_beta2=1.0", "train.adam_beta2"),
    ("train.compile=max-autotune", "train.compile"),
    ("train.ema_decay=1.0", "train.ema_decay"),
    ("train.gradient_accumulation_steps=3", "train.batch_size"),
    ("data.p_video=2", "data.p_video"),
    ("data.manifest=/no/such/pairs.jsonl", "data.manifest"),
    ("data.toy.size=0", "data.toy.size"),
    ("data.toy.frames=8", "data.toy.frames=8: use 4k"),  # "toy world frames=8", once config.yaml was written
    ("data.toy.size=20", "data.toy.size=20: use a side"),
    ("model.pretrained=some/dir", "model.pretrained"),
    ("train.shift=0", "train.shift"),
    ("model.tiny_kind=foo", "model.tiny_kind"),  # once only when the editor was built, after the data
])
def test_a_wrong_value_names_its_key(repo_root, monkeypatch, override, key):
    with pytest.raises(UserError, match=key.replace(".", r"\.")) as e:
        validate_sft_config(_cfg(repo_root, monkeypatch, override))
    assert "\n" not in str(e.value)


def test_lora_rank_is_checked_only_when_training_a_lora(repo_root, monkeypatch):
    validate_sft_config(_cfg(repo_root, monkeypatch, "lora.rank=0"))
    with pytest.raises(UserError, match=r"'?lora\.rank"):
        validate_sft_config(_cfg(repo_root, monkeypatch, "lora.rank=0", "train.trainable=lora"))
    # the spelling before the LoRA block moved to the top level (as in Edit-GRPO's recipes) still works
    with pytest.raises(UserError, match=r"lora\.rank"):
        validate_sft_config(_cfg(repo_root, monkeypatch, "train.lora.rank=0", "train.trainable=lora"))


def test_loss_weighting_asks_the_loss_code(repo_root, monkeypatch):
    cfg = _cfg(repo_root, monkeypatch)
    if not hasattr(cfg.train, "loss_weighting"):
        pytest.skip("this SFTConfig has no train.loss_weighting")
    cfg.train.loss_weighting = "sqrt"
    with pytest.raises(UserError, match=r"train\.loss_weighting"):
        validate_sft_config(cfg)


def test_checks_take_well_under_a_second(repo_root, monkeypatch):
    cfg = _cfg(repo_root, monkeypatch)
    validate_sft_config(cfg)  # imports warm
    t = time.time()
    validate_sft_config(cfg)
    assert time.time() - t < 0.5


def test_a_compiler_that_answers_is_not_looked_up_through_inductor(monkeypatch):
    """``check_compile`` settles the common case (``$CXX`` or ``g++`` answers ``--version``) with one subprocess:
    inductor's lookup imports 1.5-3 s of dynamo. Inductor is asked only when that compiler does not answer (it may
    know another, e.g. one it installs through conda), so the check never refuses what inductor accepts."""
    import shutil

    import torch._inductor.cpp_builder as cpp_builder

    from viva_base.training import check_compile

    if shutil.which("g++") is None:
        pytest.skip("no g++ here")
    asked = []
    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", lambda: asked.append(1) or "c++")
    monkeypatch.delenv("CXX", raising=False)
    check_compile("full")
    assert asked == []
    monkeypatch.setenv("CXX", "no-such-compiler")
    check_compile("full")  # inductor found one: accepted
    assert asked == [1]


def error_without_a_cpp_compiler(command: list[str], out, repo_root) -> str:
    """``python -m <command> output_dir=<out>`` with ``$CXX`` pointing at no compiler: exit 2, no traceback, nothing
    written; returns its one error line."""
    import subprocess
    import sys

    env = {**__import__("os").environ, "CXX": "no-such-compiler", "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-m", *command, f"output_dir={out}", "report_to=none"], cwd=repo_root,
                         env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2, run.stderr[-2000:]
    assert "Traceback" not in run.stderr
    assert not out.exists()
    return run.stderr.strip().splitlines()[-1]


def test_compile_without_a_cpp_compiler_is_one_error_before_any_work(repo_root, monkeypatch, tmp_path):
    """On a CPU, torch.compile builds C++ kernels: a machine without a compiler hears so from the checks (it was a
    long inductor traceback at the first forward, after the data and the editor were built)."""
    cfg = _cfg(repo_root, monkeypatch, "train.compile=full")
    validate_sft_config(cfg)  # g++ is here
    line = error_without_a_cpp_compiler(["viva_base.sft", "recipe=recipes/sft_tiny.yaml", "train.compile=full"],
                                        tmp_path / "run", repo_root)
    assert "train.compile='full' needs a C++ compiler" in line and "'no-such-compiler'" in line, line
    monkeypatch.setenv("CXX", "no-such-compiler")
    validate_sft_config(_cfg(repo_root, monkeypatch, "train.compile=none"))  # no compile: no compiler needed


def test_a_lucy_editor_is_refused_in_one_line_before_any_work(repo_root, monkeypatch, tmp_path):
    """viva_base.sft trains the VIVA editor (its projector and token refiner); a Lucy-Edit editor, tiny or a saved
    folder, once failed with an AttributeError traceback (no ``x_embedder``) after the data and the editor were
    built. A hub id is checked once the editor is built, before any training."""
    from viva_base import sft_checks
    from viva_base.sft import main
    from viva_base.tiny_lucy import make_tiny_lucy_editor

    with pytest.raises(UserError, match=r"model\.tiny_kind: a LucyEditor.*recipes/lucy_grpo\.yaml"):
        validate_sft_config(_cfg(repo_root, monkeypatch, "model.tiny_kind=lucy"))
    folder = tmp_path / "lucy"
    make_tiny_lucy_editor().save_pretrained(folder)
    with pytest.raises(UserError, match=r"model\.pretrained: a LucyEditor"):
        validate_sft_config(_cfg(repo_root, monkeypatch, "model.tiny=false", f"model.pretrained={folder}"))
    monkeypatch.setattr(sft_checks, "_editor_class", lambda mc: None)  # as for a hub id: known once built
    with pytest.raises(UserError, match="a LucyEditor"):
        main(_cfg(repo_root, monkeypatch, "model.tiny=false", f"model.pretrained={folder}",
                  f"output_dir={tmp_path / 'run'}", "report_to=none"))
    assert not (tmp_path / "run" / "checkpoint-1").exists() and not (tmp_path / "run" / "metrics.jsonl").exists()


def test_clips_a_causal_vae_cannot_encode_whole_are_refused_before_training(repo_root, monkeypatch, tmp_path):
    """A video VAE with temporal ratio r (the Hunyuan VAE: 4) encodes r k + 1 frames: an 8-frame clip lost its last 3
    frames in the latent while the mask, pooled to the latent grid, spread over all 8: the run trained on, quietly
    misaligned. Now one line names a pair and the fix before the first step (the tiny Hunyuan VAE, r = 4)."""
    from viva_base.sft import main

    cfg = _cfg(repo_root, monkeypatch, "model.tiny_spec.vae=hunyuan", "data.toy.n_video=2", "data.toy.n_image=2",
               f"output_dir={tmp_path}", "report_to=none", "train.max_steps=1", "data.frames=8")
    with pytest.raises(UserError, match=r"2 of the 4 training pairs .* has 8, .* drop the last 3; set data\.frames=5"):
        main(cfg)  # the 2 video pairs, cut to 8 frames (the image pairs are 1 frame)
    assert not (tmp_path / "metrics.jsonl").exists() and not (tmp_path / "final").exists()
    main(_cfg(repo_root, monkeypatch, "model.tiny_spec.vae=hunyuan", "data.toy.n_video=2", "data.toy.n_image=2",
              f"output_dir={tmp_path / 'ok'}", "report_to=none", "train.max_steps=1", "data.toy.frames=9"))
    assert (tmp_path / "ok" / "final").is_dir()


@pytest.mark.parametrize("line, words", [
    ('{"id": "a", "source": "a.mp4"', ":1: not valid JSON"),
    ('{"id": "a", "source": "a.mp4", "target": "nope.mp4", "instruction": "x"}', ":1: target file"),
])
def test_a_bad_pairs_manifest_is_refused_before_anything_is_written(repo_root, monkeypatch, tmp_path, line, words):
    """data.manifest was read after the output folder, config.yaml and the accelerator were made: a bad line left
    a run folder with a config.yaml behind. Now it is read with the other checks: one line naming the key, nothing
    written."""
    from viva_base.sft import main

    (tmp_path / "a.mp4").write_bytes(b"")
    (tmp_path / "pairs.jsonl").write_text(line + "\n")
    cfg = _cfg(repo_root, monkeypatch, f"data.manifest={tmp_path / 'pairs.jsonl'}", f"output_dir={tmp_path / 'run'}",
               "report_to=none")
    with pytest.raises(UserError, match=r"^data\.manifest: .*pairs\.jsonl" + words.replace(".", r"\.")):
        main(cfg)
    assert not (tmp_path / "run").exists()
