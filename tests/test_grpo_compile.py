"""``train.compile`` in the Edit-GRPO trainer: the compiled DiT (with its LoRA) gives the eager numbers, honours the
adapter being switched off for the reference policy, and stays within dynamo's recompile limit over a run's
rollouts, training forwards, reference forwards and held-out evaluation."""
import json

import pytest
import torch
from safetensors.torch import load_file

from test_sft import _spy_on_compile
from test_sft_checks import error_without_a_cpp_compiler
from test_train import _lora_editor
from viva_base.data.toy import ensure_toy_dataset
from viva_base.training import compile_dit


@pytest.mark.parametrize("mode", ["full", "regional"])
def test_compiled_dit_switches_its_lora_off_and_on_as_eager_does(mode, monkeypatch):
    """The reference policy is the same DiT with its adapter disabled. Compiled, every switch must reach the
    compiled graphs: adapter on, off, on again (no grad, as the rollouts and the reference forwards run) and with
    grad (the training forward), each equal to the eager module's output, and on and off must differ. Compiled with
    ``aot_eager``: the adapter switch is a dynamo guard; inductor's kernels are tested in tests/test_sft.py."""
    monkeypatch.setattr(torch._dynamo.config, "fail_on_recompile_limit_hit", True)
    torch._dynamo.reset()
    compiled = _spy_on_compile(monkeypatch, backend="aot_eager")
    editor, eager = _lora_editor(scale=0.2), _lora_editor(scale=0.2)
    compile_dit(editor.transformer, mode)
    assert compiled
    src = torch.rand(2, 5, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cond, _ = editor.encode_condition(src, ["make the square red", "remove the circle"])
    z = torch.randn(cond["source_latents"].shape, generator=torch.Generator().manual_seed(1))
    sigma = torch.tensor([0.7, 0.3])

    def velocities(ed):
        out = []
        with torch.no_grad():
            out.append(ed.velocity(z, sigma, cond))
            ed.transformer.disable_adapters()
            try:
                out.append(ed.velocity(z, sigma, cond))
            finally:
                ed.transformer.enable_adapters()
            out.append(ed.velocity(z, sigma, cond))
        out.append(ed.velocity(z, sigma, cond).detach())
        return out

    got, want = velocities(editor), velocities(eager)
    for g, w in zip(got, want):
        assert torch.allclose(g, w, atol=1e-5, rtol=1e-4), (g - w).abs().max()
    assert (want[0] - want[1]).abs().max() > 1e-3  # the adapter matters, so "off" is tested
    assert torch.equal(got[0], got[2])


@pytest.fixture(scope="module")
def eval_manifest(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy_eval")
    return str(ensure_toy_dataset(root, seed=3, n_sft_video=0, n_sft_image=0, n_grpo=0, n_eval_compound=2,
                                  n_eval_simple=2)["eval"])


def test_compiled_edit_grpo_run_matches_eager(tmp_path, repo_root, monkeypatch, eval_manifest):
    """``train.compile=full train.fused_optimizer=true`` on the tiny recipe with the KL term (reference forwards)
    and held-out evaluation before and after: the DiT is compiled once (in place), no graph hits dynamo's
    recompile limit (it would fall back to eager silently; here it fails), and rewards, losses, KL, evaluation
    scores and the final LoRA are eager's. Compiled with ``aot_eager`` (dynamo's graphs and guards, no C++ build:
    inductor's kernels are tested in tests/test_sft.py)."""
    from editgrpo import train as train_mod
    from editgrpo.config import GRPOConfig
    from viva_base.recipe import load_recipe

    monkeypatch.chdir(repo_root)
    monkeypatch.setattr(torch._dynamo.config, "fail_on_recompile_limit_hit", True)
    common = ["recipe=recipes/tiny.yaml", "report_to=none", "train.num_iterations=2", "train.checkpoint_every=0",
              "train.prompts_per_iteration=2", "train.num_generations=2", "data.toy_prompts=2",
              "sampling.num_steps=3", "sampling.sde_window_size=1", "sampling.guidance_interval=[0.5,1.0]",
              "train.beta=0.04", f"eval.manifest={eval_manifest}", "eval.num_steps=2", "eval.seeds=[1]",
              "eval.save_videos=0"]
    train_mod.main(load_recipe(GRPOConfig, [*common, f"output_dir={tmp_path / 'eager'}"]))
    torch._dynamo.reset()
    compiled = _spy_on_compile(monkeypatch, backend="aot_eager")
    train_mod.main(load_recipe(GRPOConfig, [*common, f"output_dir={tmp_path / 'compiled'}", "train.compile=full",
                                            "train.fused_optimizer=true"]))
    assert compiled == ["HunyuanVideoTransformer3DModel"]

    def rows(run):
        return [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]

    eager, comp = rows("eager"), rows("compiled")
    assert len(eager) == len(comp) == 2
    for a, b in zip(eager, comp):
        for key in ("reward", "loss", "kl", "ratio_mean"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-7), key
    assert all(r["kl"] > 0 for r in comp[1:])  # the reference forward ran with the adapter off
    for step in (0, 2):
        sa = json.loads((tmp_path / "eager" / "eval" / f"step-{step}" / "summary.json").read_text())
        sb = json.loads((tmp_path / "compiled" / "eval" / f"step-{step}" / "summary.json").read_text())
        assert sb["groups"]["all"]["oracle"] == pytest.approx(sa["groups"]["all"]["oracle"], abs=1e-5)
    la = load_file(tmp_path / "eager" / "lora" / "pytorch_lora_weights.safetensors")
    lb = load_file(tmp_path / "compiled" / "lora" / "pytorch_lora_weights.safetensors")
    assert la.keys() == lb.keys()
    for k in la:
        assert torch.allclose(la[k], lb[k], atol=1e-6, rtol=1e-4), k
    # the kernels are not part of what a run is (RESUME_FREE_KEYS): the compiled run continues eagerly
    train_mod.main(load_recipe(GRPOConfig, [*common, f"output_dir={tmp_path / 'compiled'}", "train.num_iterations=3",
                                            "resume=latest"]))
    assert [r["step"] for r in rows("compiled")] == [1, 2, 3]


def test_compile_option_is_checked_before_any_work(tmp_path, repo_root, monkeypatch):
    """A mistyped ``train.compile`` names the key and the choices; on a CPU without a C++ compiler the command says
    so in one line, exit 2, before the data or the editor are built (nothing written)."""
    from editgrpo.config import GRPOConfig, validate_config
    from viva_base.errors import UserError
    from viva_base.recipe import load_recipe

    monkeypatch.chdir(repo_root)
    cfg = load_recipe(GRPOConfig, ["recipe=recipes/tiny.yaml", f"output_dir={tmp_path}", "train.compile=max"])
    with pytest.raises(UserError, match=r"train.compile.*none, full, regional"):
        validate_config(cfg)
    if torch.cuda.is_available():
        return
    line = error_without_a_cpp_compiler(["editgrpo.train", "recipe=recipes/tiny.yaml", "train.compile=regional"],
                                        tmp_path / "run", repo_root)
    assert "train.compile='regional' needs a C++ compiler" in line and "'no-such-compiler'" in line, line
