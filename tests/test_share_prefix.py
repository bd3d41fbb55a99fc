"""``sampling.share_prefix``: a group's samples share their initial noise and the ODE steps before the SDE window,
computed once per prompt (the prefix-sharing trick, docs/algorithms.md)."""
import pytest
import torch

from editgrpo.rollout import guided_velocity, rollout, step_log_prob
from editgrpo.sampling import sample_trajectory, sigma_schedule
from test_train import _lora_editor


def _setup():
    editor = _lora_editor()
    video = torch.rand(2, 5, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    cond, uncond = editor.encode_condition(video, ["remove the red square", "make the background night"])
    return editor, cond, uncond


def _count_rows(editor):
    """Rows of the DiT batches (a CFG forward counts a sample twice), counted by a forward hook."""
    rows = [0]
    editor.transformer.register_forward_hook(lambda m, args, kwargs, out: rows.__setitem__(0, rows[0] + kwargs[
        "hidden_states"].shape[0]) if "hidden_states" in kwargs else rows.__setitem__(0, rows[0] + args[0].shape[0]),
        with_kwargs=True)
    return rows


def test_shared_prefix_equals_the_full_schedule_from_the_group_noise():
    """Each sample equals an independent reference: the full schedule sampled from its group's noise (drawn from the
    prefix seed) with the sample's own generator for the SDE noise; the recorded steps keep their full-schedule
    indices and log-probs."""
    editor, cond, uncond = _setup()
    sigmas = sigma_schedule(6, shift=1.0)
    window = (2, 4)
    prompt_index, seeds, prefix = [0, 0, 0, 1, 1, 1], [11, 12, 13, 14, 15, 16], [100, 100, 100, 200, 200, 200]
    ro = rollout(editor, cond, uncond, prompt_index, seeds, sigmas, sde_window=window, guidance_scale=2.0,
                 batch_size=4, prefix_seeds=prefix)
    assert [r.index for r in ro.steps] == [2, 3]
    shape = editor.latent_shape(cond)
    for i, (p, s, ps) in enumerate(zip(prompt_index, seeds, prefix)):
        z0 = torch.randn((1, *shape), generator=torch.Generator().manual_seed(ps))
        c, u = cond.select(torch.tensor([p])), uncond.select(torch.tensor([p]))
        ref = sample_trajectory(lambda z, sg: guided_velocity(editor, z, sg, c, u, 2.0), z0, sigmas, mode="sde",
                                sde_window=window, generator=[torch.Generator().manual_seed(s)])
        torch.testing.assert_close(ro.latents[i:i + 1], ref.latents, atol=1e-5, rtol=1e-4)
        for got, want in zip(ro.steps, ref.steps):
            assert got.index == want.index
            torch.testing.assert_close(got.latents[i:i + 1], want.latents, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(got.log_prob[i:i + 1], want.log_prob, atol=1e-3, rtol=1e-4)
    # a group shares its latent at the window's start, and its samples then differ
    first = ro.steps[0].latents
    assert torch.equal(first[0], first[1]) and torch.equal(first[1], first[2])
    assert not torch.equal(first[0], first[3])
    assert (ro.latents[0] - ro.latents[1]).abs().max() > 1e-3


def test_shared_prefix_saves_the_prefix_forwards_and_keeps_the_ratio_at_one():
    editor, cond, uncond = _setup()
    sigmas = sigma_schedule(6, shift=1.0)
    prompt_index, seeds = [0] * 4 + [1] * 4, list(range(20, 28))
    rows = _count_rows(editor)
    plain = rollout(editor, cond, uncond, prompt_index, seeds, sigmas, sde_window=(3, 5), batch_size=8)
    n_plain, rows[0] = rows[0], 0
    shared = rollout(editor, cond, uncond, prompt_index, seeds, sigmas, sde_window=(3, 5), batch_size=8,
                     prefix_seeds=[7] * 4 + [8] * 4)
    # 6 steps x 8 samples x 2 (CFG) without; the 3 prefix steps run for 2 prompts instead of 8 samples
    assert n_plain == 6 * 8 * 2
    assert rows[0] == (3 * 2 + 3 * 8) * 2
    assert [r.index for r in shared.steps] == [r.index for r in plain.steps] == [3, 4]
    for rec in shared.steps:  # recomputing the recorded steps' log-probs gives ratio 1 (on-policy)
        out = step_log_prob(editor, rec, torch.tensor(prompt_index), cond, uncond, guidance_scale=2.0,
                            method="flow_sde", eta=0.7, sample_index=torch.arange(8))
        assert (torch.exp(out.log_prob - rec.log_prob) - 1).abs().max() < 1e-4


def test_shared_prefix_without_an_ode_prefix_shares_only_the_noise():
    editor, cond, uncond = _setup()
    sigmas = sigma_schedule(4, shift=1.0)
    ro = rollout(editor, cond, uncond, [0, 0], [1, 2], sigmas, batch_size=2, prefix_seeds=[9, 9])
    assert [r.index for r in ro.steps] == [0, 1, 2]
    assert torch.equal(ro.steps[0].latents[0], ro.steps[0].latents[1])
    with pytest.raises(ValueError, match="SDE steps"):
        rollout(editor, cond, uncond, [0, 0], [1, 2], sigmas, mode="ode", prefix_seeds=[9, 9])


def test_share_prefix_config_is_validated_and_the_tiny_recipe_runs(tmp_path, repo_root):
    import json
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "editgrpo.train", f"recipe={repo_root}/recipes/tiny.yaml",
                          "train.algorithm=nft", "sampling.method=ode", "sampling.share_prefix=true",
                          f"output_dir={tmp_path}/bad"], capture_output=True, text=True, cwd=repo_root)
    assert out.returncode == 2 and "share_prefix" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "bad").exists()
    out = subprocess.run([sys.executable, "-m", "editgrpo.train", f"recipe={repo_root}/recipes/tiny.yaml",
                          "sampling.share_prefix=true", "train.num_iterations=2", "train.checkpoint_every=0",
                          "report_to=none", f"output_dir={tmp_path}/run"], capture_output=True, text=True, cwd=repo_root)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(abs(r["ratio_mean"] - 1) < 1e-3 for r in rows)


@pytest.mark.slow
def test_share_prefix_on_two_processes_reproduces_one_process(tmp_path, repo_root):
    """tests/test_scale_multiprocess.py's check with prefix sharing and a window starting at step 1 (a one-step
    ODE prefix): prompt 1's group is split over the 2 ranks, each computing the group's prefix; gathered rewards,
    advantages and the first update's LoRA gradients of torchrun --nproc_per_node 2 equal one process's."""
    import test_scale_multiprocess as mp

    mp.assert_two_processes_reproduce([*mp.COMMON, "sampling.share_prefix=true", "sampling.sde_window_range=[1,1]"],
                                      tmp_path, repo_root)
