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
    (["--checks", ","], "--checks names no check"),
    (["--out", "/proc/no/such/g.json"], "--out /proc/no/such/g.json: cannot create folders in /proc")])
def test_a_bad_argument_is_one_line_and_nothing_is_written(tmp_path, monkeypatch, capsys, args, words):
    monkeypatch.chdir(tmp_path)
    try:
        code = gpu_check.main(["--device", "cpu", "--tiny-only", *args])
    except SystemExit as stop:  # argparse's own errors
        code = stop.code
    assert code == 2 and words in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_a_run_stopped_part_way_keeps_what_it_measured(tmp_path, monkeypatch, one_thread):
    """A lent GPU machine's command has a time limit: killed during a later check, the run must leave the earlier
    checks' results (they were written only at the end before, so a stopped run returned nothing)."""
    def stopped(*_a, **_k):
        raise KeyboardInterrupt  # what a kill looks like to Python: not a failed check, the end of the run

    monkeypatch.setattr(gpu_check, "check_sft", stopped)
    out = tmp_path / "g.json"
    with pytest.raises(KeyboardInterrupt):
        gpu_check.main(["--device", "cpu", "--tiny-only", "--checks", "kernels,sft,vae", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert list(saved["results"]) == ["kernels"] and saved["results"]["kernels"]["status"] == "ok"
    assert saved["meta"]["complete"] is False and saved["meta"]["checks"] == ["kernels", "sft", "vae"]
    assert "| sft, vae | not run |" in out.with_suffix(".md").read_text()
    assert not list(tmp_path.glob("*.tmp"))


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

    section = gpu_check_section([json.loads(out.read_text())])
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


def _dit_run(frames: int, compile: str, seconds: float, torch_version: str = "2.11.0+cu130") -> dict:
    """A gpu_check.json of a ``--checks dit`` run on a GPU, with the numbers given (the rest as the check writes)."""
    d = {"status": "ok", "detail": f"{frames} frames", "frames": frames, "height": 480, "width": 848,
         "video_tokens": 1000 * frames, "text_tokens": 832, "compile": compile, "lora_rank": 64,
         "sample_seconds": seconds / 4, "predicted_sample_seconds": 1.0, "sample_ratio": seconds / 4,
         "train_seconds": seconds, "predicted_train_seconds": 4.0, "train_ratio": seconds / 4,
         "sample_tflops": 395.76, "train_tflops": 1583.04, "peak_bytes": 40 * 2**30,
         "predicted_peak_bytes": 40 * 2**30, "memory_ratio": 1.0, "prediction_basis": "H100 SXM at 40% MFU"}
    return {"meta": {"argv": f"--checks dit --frames {frames}", "device_name": "NVIDIA H200", "date": "2026-12-04",
                     "torch": torch_version, "checks": ["dit"], "complete": True}, "results": {"dit": d}}


def test_the_doc_section_puts_several_runs_dit_steps_in_one_table():
    """``benchmarks.scaling --gpu-check A B ...``: the first run's checks in full, each further run in a line, and
    every DiT step in one table with its measured MFU (the counted TFLOP over the seconds, against 989.4 TFLOP/s).
    The torch version is the run's, from its JSON: the page printed the version of the machine that rendered it."""
    from benchmarks.scaling import gpu_check_section

    first = _dit_run(9, "none", 4.0)
    first["results"]["kernels"] = {"status": "ok", "detail": "matmul rel err 3e-03"}
    section = gpu_check_section([first, _dit_run(33, "regional", 2.0)])
    lines = section.splitlines()
    assert "Measured by `python -m benchmarks.gpu_check --checks dit --frames 9` on NVIDIA H200 (torch 2.11.0+cu130, " \
        "2026-12-04):" in lines
    assert "| kernels | ok | matmul rel err 3e-03 |" in lines
    assert "* `python -m benchmarks.gpu_check --checks dit --frames 33` on NVIDIA H200 (torch 2.11.0+cu130, " \
        "2026-12-04): dit ok" in lines
    rows = [line for line in lines if line.startswith("| 9x480x848") or line.startswith("| 33x480x848")]
    assert len(rows) == 2 and rows[1].startswith("| 33x480x848, compiled (regional) |")
    # 395.76 TFLOP in 1 s and 1583.04 in 4 s: 40% of 989.4 TFLOP/s; the compiled run, twice as fast: 80%
    assert "| 40% / 40% |" in rows[0] and "| 80% / 80% |" in rows[1]
    assert torch.__version__ not in section or torch.__version__ == "2.11.0+cu130"


def test_the_docs_gpu_section_is_the_recorded_runs(repo_root):
    """docs/scaling.md's measured GPU section is what ``benchmarks.scaling --gpu-check`` renders from the runs kept in
    docs/gpu_check/ (no number in it typed by hand), and the recorded runs passed every check they ran."""
    from pathlib import Path

    from benchmarks.scaling import gpu_check_section, measured_mfu

    folder = Path(repo_root) / "docs" / "gpu_check" / "h200-2026-12-04"
    runs = [json.loads((folder / f"{name}.json").read_text()) for name in ("gpu_check", "dit33", "dit33c", "dit65")]
    page = (Path(repo_root) / "docs" / "scaling.md").read_text()
    assert gpu_check_section(runs) in page and measured_mfu(runs) in page
    assert all(r["meta"]["complete"] is not False for r in runs)
    assert all(c["status"] in ("ok", "skipped") for r in runs for c in r["results"].values())
