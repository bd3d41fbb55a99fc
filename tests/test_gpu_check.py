"""benchmarks.gpu_check: the no-GPU answer, and every check's CPU stand-in (tiny shapes, the same code paths)."""
import json

import pytest
import torch

from benchmarks import gpu_check


def test_without_cuda_it_says_so_in_one_line_and_runs_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.chdir(tmp_path)
    assert gpu_check.main([]) == 0
    out = capsys.readouterr().out
    assert len(out.strip().splitlines()) == 1 and "no CUDA" in out
    assert list(tmp_path.iterdir()) == []  # nothing run, nothing written


def test_a_relative_out_works_from_any_folder(tmp_path, monkeypatch, one_thread):
    """The recipe checks run the trainers in processes started in the package's folder; a relative ``--out`` was
    handed to them as it was, so from any other folder they wrote elsewhere and every such check FAILed with
    FileNotFoundError (the check a user runs first, from wherever they are)."""
    monkeypatch.chdir(tmp_path)
    assert gpu_check.main(["--device", "cpu", "--tiny-only", "--checks", "sft", "--out", "rel/g.json"]) == 0
    res = json.loads((tmp_path / "rel" / "g.json").read_text())["results"]
    assert res["sft"]["status"] == "ok", res["sft"]["detail"]
    assert (tmp_path / "rel" / "runs" / "sft" / "metrics.jsonl").is_file()


@pytest.mark.parametrize("args, words", [
    (["--checks", "sft,nope"], "unknown checks ['nope']"),
    (["--out", "/proc/no/such/g.json"], "--out /proc/no/such/g.json: cannot create folders in /proc")])
def test_a_bad_argument_is_one_line_and_nothing_is_written(tmp_path, monkeypatch, capsys, args, words):
    monkeypatch.chdir(tmp_path)
    try:
        code = gpu_check.main(["--device", "cpu", "--tiny-only", *args])
    except SystemExit as stop:  # argparse's own errors
        code = stop.code
    assert code == 2 and words in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_every_check_runs_on_cpu_at_tiny_sizes(tmp_path, capsys, one_thread, monkeypatch):
    """Every check of the default list, with dynamo's graphs run by ``aot_eager`` (torch's own backend override,
    which the check's subprocesses inherit): the compiled checks trace, guard and differentiate as on a GPU, without
    inductor's C++ build for a CPU (90 s more here for the Edit-GRPO check alone). Inductor's kernels for the DiT's
    training step are tested in tests/test_sft.py and tests/test_scale_multiprocess.py; on a GPU the check itself
    runs them."""
    monkeypatch.setenv("TORCH_COMPILE_OVERRIDE_BACKENDS", ">=0:aot_eager")
    out = tmp_path / "check" / "gpu_check.json"
    assert gpu_check.main(["--device", "cpu", "--tiny-only", "--out", str(out)]) == 0
    res = json.loads(out.read_text())["results"]
    assert list(res) == gpu_check.parser().get_default("checks").split(",") == [
        "kernels", "sft", "sft_compile", "grpo", "grpo_compile", "grpo_2proc", "dit", "vae"]
    assert all(r["status"] == "ok" for r in res.values()), {k: r["detail"] for k, r in res.items()}
    assert res["sft"]["steps"] == 2
    assert res["sft_compile"]["eager_losses"] == res["sft"]["losses"] and res["sft_compile"]["max_rel_diff"] <= 0.02
    grpo = res["grpo"]
    assert grpo["evaluations"] == ["step-0", "step-2"] and abs(grpo["ratio_mean"] - 1) <= gpu_check.RATIO_TOL
    comp = res["grpo_compile"]
    assert comp["iterations"] == 2 and abs(comp["ratio_mean"] - 1) <= gpu_check.RATIO_TOL
    assert comp["eager_first_reward"] == grpo["first_reward"]
    assert comp["first_reward"] == pytest.approx(grpo["first_reward"], rel=1e-4)  # float32 on CPU: the same rollouts
    assert res["grpo_2proc"]["backend"] == "gloo"
    dit = res["dit"]
    assert dit["checkpointing"] and dit["grad_ok"] and dit["predicted_train_seconds"] > dit["predicted_sample_seconds"] > 0
    assert dit["peak_bytes"] is None and dit["train_ratio"] is None  # no GPU: no memory peak, no ratio to a GPU
    vae = res["vae"]  # the tiles ran (288 px > 256) one clip at a time: the shapes and finite pixels are checked
    assert vae["editor"]["clips"] == 2 and vae["untiled"]["clips"] == 1 and vae["editor"]["peak_bytes"] is None
    assert vae["editor"]["shape"] == [2, 3, 5, 288, 288] and "sliced + tiled" in vae["detail"]
    md = out.with_suffix(".md").read_text()
    assert "| grpo_2proc | ok |" in md and "| 5x32x32 |" in md
    assert "| dit | ok |" in capsys.readouterr().out
    from benchmarks.scaling import gpu_check_section  # python -m benchmarks.scaling --gpu-check FILE adds it

    section = gpu_check_section(json.loads(out.read_text()))
    assert section.startswith("## Measured: checking a GPU machine") and "| grpo | ok |" in section


def test_the_dit_step_is_timed_next_to_the_scaling_prediction():
    """The same function runs the 13B config on a GPU; on the tiny config the prediction is the scaling plan's
    count (train = fwd + bwd + one recomputed forward) and the memory prediction includes the weights."""
    from benchmarks.scaling import dit_pass, latent_grid, meta_editor_dit, seconds_at_mfu

    r = gpu_check.dit_step(gpu_check.TINY_DIT, frames=5, height=32, width=32, text_tokens=8, device="cpu",
                           lora_rank=4, repeats=1)
    meta = meta_editor_dit(gpu_check.TINY_DIT, 4, 8)
    grid = latent_grid(5, 32, 32)
    fwd = dit_pass(meta, gpu_check.TINY_DIT, 2, grid, 8, train=False)["flops"]["total"]
    train = dit_pass(meta, gpu_check.TINY_DIT, 2, grid, 8, train=True)
    assert r["predicted_sample_seconds"] == seconds_at_mfu(fwd, 1)
    assert r["predicted_train_seconds"] == seconds_at_mfu(train["flops"]["total"] + fwd, 1)
    assert r["predicted_peak_bytes"] > 2 * r["config_params"] + train["activations"]["checkpointing"]
    assert r["output_finite"] and r["checkpointing"]


def test_docs_scaling_has_the_generated_gpu_check_section(repo_root):
    from pathlib import Path

    from benchmarks.scaling import CHECKING

    assert CHECKING in (Path(repo_root) / "docs" / "scaling.md").read_text()
