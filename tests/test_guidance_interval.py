"""CFG in a limited interval of noise levels (``sampling.guidance_interval``, ``eval.guidance_interval``,
``--guidance-interval``): the weights, the velocity, trajectories against a hand-written reference, the GRPO
ratio and the evaluator's sampler (the config checks: tests/test_config_checks.py)."""
import json
import math

import pytest
import torch
from omegaconf import OmegaConf

from editgrpo.config import EvalConfig, GRPOConfig
from editgrpo.rollout import guided_velocity, rollout, step_log_prob
from editgrpo.sampling import cfg_velocity, ode_step, sample_trajectory, sigma_schedule
from viva_base.guidance import check_guidance_interval, guidance_weights
from viva_base.recipe import load_recipe
from viva_base.tiny import make_tiny_editor

INSTR = ["remove the red square", "make the background night"]


def test_weights_are_the_scale_inside_the_interval_and_one_outside():
    sig = torch.tensor([1.0, 0.9, 0.5, 0.4999, 0.1, 0.0])
    assert guidance_weights(sig, 3.0).tolist() == [3.0] * 6
    # (lo, hi]: lo excluded, hi included
    assert guidance_weights(sig, 3.0, (0.5, 1.0)).tolist() == [3.0, 3.0, 1.0, 1.0, 1.0, 1.0]
    assert guidance_weights(sig, 3.0, (0.0, 0.9)).tolist() == [1.0, 3.0, 3.0, 3.0, 3.0, 1.0]
    assert guidance_weights(sig, 3.0, (0.95, 2.0)).tolist() == [3.0, 1.0, 1.0, 1.0, 1.0, 1.0]


def test_per_sample_weights_give_each_sample_its_own_cfg_and_v_cond_exactly_at_one():
    g = torch.Generator().manual_seed(0)
    v_c, v_u = torch.randn(3, 4, 5, generator=g), torch.randn(3, 4, 5, generator=g)
    out = cfg_velocity(v_c, v_u, torch.tensor([2.0, 1.0, 0.5]))
    assert torch.equal(out[0], v_u[0] + 2.0 * (v_c[0] - v_u[0]))
    assert torch.equal(out[1], v_c[1])  # not v_u + 1 * (v_c - v_u), which rounds
    assert torch.equal(out[2], v_u[2] + 0.5 * (v_c[2] - v_u[2]))


@pytest.mark.parametrize("bad", [[0.5], [0.8, 0.2], [0.5, 0.5], [-0.1, 1.0], ["a", 1.0], [0.1, float("inf")],
                                 [0.1, 0.5, 1.0]])
def test_bad_intervals_are_refused_by_name(bad):
    with pytest.raises(ValueError, match="my.interval"):
        check_guidance_interval(bad, "my.interval")
    assert check_guidance_interval(None) is None
    assert check_guidance_interval([0, 1]) == (0.0, 1.0)


@pytest.fixture(scope="module")
def editor_and_cond():
    editor = make_tiny_editor(seed=1)
    video = torch.rand(2, 5, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    cond, uncond = editor.encode_condition(video, INSTR)
    return editor, cond, uncond


def _counting(editor, monkeypatch):
    rows = []
    real = editor.velocity

    def velocity(latents, sigma, cond):
        rows.append(latents.shape[0])
        return real(latents, sigma, cond)

    monkeypatch.setattr(editor, "velocity", velocity)
    return rows


@torch.no_grad()
def test_guided_velocity_skips_the_unconditional_forward_outside_the_interval(editor_and_cond, monkeypatch):
    editor, cond, uncond = editor_and_cond
    z = torch.randn(2, *editor.latent_shape(cond), generator=torch.Generator().manual_seed(1))
    plain = {s: guided_velocity(editor, z, torch.full((2,), s), cond, uncond, 2.0) for s in (0.9, 0.3)}
    v_cond = editor.velocity(z, torch.full((2,), 0.3), cond)
    rows = _counting(editor, monkeypatch)
    inside = guided_velocity(editor, z, torch.full((2,), 0.9), cond, uncond, 2.0, guidance_interval=(0.5, 1.0))
    outside = guided_velocity(editor, z, torch.full((2,), 0.3), cond, uncond, 2.0, guidance_interval=(0.5, 1.0))
    assert rows == [4, 2]  # [cond; uncond] inside, the conditional forward alone outside
    assert torch.equal(inside, plain[0.9]) and torch.equal(outside, v_cond)
    assert (plain[0.3] - v_cond).abs().max() > 1e-3  # guidance does change the velocity there
    # a batch that straddles lo: each sample as if alone (one joint forward)
    mixed = guided_velocity(editor, z, torch.tensor([0.9, 0.3]), cond, uncond, 2.0, guidance_interval=(0.5, 1.0))
    assert rows[-1] == 4
    assert torch.allclose(mixed[0], plain[0.9][0], atol=1e-5)
    assert torch.allclose(mixed[1], v_cond[1], atol=1e-5)


@torch.no_grad()
def test_ode_trajectory_matches_a_hand_written_interval_sampler(editor_and_cond):
    editor, cond, uncond = editor_and_cond
    sig = sigma_schedule(6, shift=3.0)
    z0 = torch.randn(2, *editor.latent_shape(cond), generator=torch.Generator().manual_seed(2))
    lo, hi = 0.6, 1.0
    out = sample_trajectory(lambda x, s: guided_velocity(editor, x, s, cond, uncond, 2.5, guidance_interval=(lo, hi)),
                            z0, sig, mode="ode").latents

    def reference(interval):
        z = z0.clone()
        for i in range(6):
            s = sig[i].expand(2)
            v_c = editor.velocity(z, s, cond)
            use = interval is None or interval[0] < float(sig[i]) <= interval[1]
            v = v_c if not use else editor.velocity(z, s, uncond) + 2.5 * (v_c - editor.velocity(z, s, uncond))
            z = ode_step(v, z, sig[i], sig[i + 1])
        return z

    guided_steps = [i for i in range(6) if lo < float(sig[i]) <= hi]
    assert 0 < len(guided_steps) < 6, sig  # the schedule crosses the interval
    assert torch.allclose(out, reference((lo, hi)), atol=1e-5)
    # the check can fail: both plain CFG and no CFG give other samples
    assert (reference(None) - out).abs().max() > 1e-3
    assert (reference((0.0, 1e-9)) - out).abs().max() > 1e-3


def test_grpo_ratio_is_one_when_the_training_forward_uses_the_rollouts_interval(editor_and_cond):
    editor, cond, uncond = editor_and_cond
    sigmas = sigma_schedule(4, shift=1.0)  # 1, .667, .334, .001, 0: steps 0-1 guided, step 2 not
    interval = (0.5, 1.0)
    ro = rollout(editor, cond, uncond, [0, 0, 1, 1], [11, 12, 13, 14], sigmas, method="flow_sde", eta=0.7,
                 guidance_scale=2.0, batch_size=2, guidance_interval=interval)
    assert [round(float(r.sigma[0]), 3) for r in ro.steps] == [1.0, 0.667, 0.334]
    rows, sel = torch.tensor([0, 1]), torch.tensor([1, 2])
    with torch.no_grad():
        for rec in ro.steps:
            same = step_log_prob(editor, rec, rows, cond, uncond, guidance_scale=2.0, method="flow_sde", eta=0.7,
                                 sample_index=sel, guidance_interval=interval)
            assert (same.log_prob - rec.log_prob[sel]).abs().max() < 1e-5
        # without the interval the training forward would guide the unguided step: its ratio is off by more than
        # Flow-GRPO's whole clip range (1e-4)
        other = step_log_prob(editor, ro.steps[2], rows, cond, uncond, guidance_scale=2.0, method="flow_sde", eta=0.7,
                              sample_index=sel)
        assert (other.log_prob - ro.steps[2].log_prob[sel]).abs().max() > 2e-4


def test_the_trainer_rolls_out_and_trains_with_the_interval(tmp_path, repo_root, monkeypatch):
    """sampling.guidance_interval reaches the rollouts and the training forwards alike: on-policy, ratio 1."""
    import editgrpo.train as train_mod

    monkeypatch.chdir(repo_root)
    cfg = load_recipe(GRPOConfig, [
        "recipe=recipes/tiny.yaml", f"output_dir={tmp_path}", "report_to=none", "train.num_iterations=1",
        "train.prompts_per_iteration=2", "train.num_generations=2", "data.toy_prompts=2", "sampling.num_steps=4",
        "sampling.sde_window_size=3", "train.checkpoint_every=0", "sampling.guidance_interval=[0.5,1.0]"])
    train_mod.main(cfg)
    row = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert math.isfinite(row["loss"]) and abs(row["ratio_mean"] - 1) < 1e-5, row


def _eval_records(tmp_path):
    from viva_base.data.toy import ensure_toy_dataset

    return ensure_toy_dataset(tmp_path / "toy", seed=3, n_sft_video=0, n_sft_image=0, n_grpo=0, n_eval_compound=1,
                              n_eval_simple=2)["eval"]


@torch.no_grad()
def test_the_evaluator_samples_with_its_own_shift_and_interval(tmp_path):
    from editgrpo.evaluate import Evaluator, eval_seed
    from editgrpo.rollout import initial_noise, sample_generators
    from viva_base.data.manifest import read_manifest
    from viva_base.video import read_video

    manifest = _eval_records(tmp_path)
    editor = make_tiny_editor(seed=0)
    cfg = OmegaConf.structured(EvalConfig)
    cfg.manifest, cfg.num_steps, cfg.shift, cfg.guidance_interval = str(manifest), 4, 3.0, [0.7, 1.0]
    ev = Evaluator(cfg, None, tmp_path / "eval")
    recs = read_manifest(str(manifest), "eval")[:2]
    got = ev.edit(editor, recs, seed=1, first_index=0)

    src = torch.stack([read_video(r["source"]).frames for r in recs])
    cond, uncond = editor.encode_condition(src, [r["instruction"] for r in recs], [None, None])
    z = initial_noise(editor.latent_shape(cond), sample_generators([eval_seed(1, i) for i in range(2)]))
    sig = sigma_schedule(4, 3.0)  # the evaluator's shift, not the editor's (1.0)
    assert editor.config.shift != 3.0
    for i in range(4):
        s = sig[i].expand(2)
        v = editor.velocity(z, s, cond)
        if 0.7 < float(sig[i]) <= 1.0:
            v = editor.velocity(z, s, uncond) + cfg.guidance_scale * (v - editor.velocity(z, s, uncond))
        z = ode_step(v, z, sig[i], sig[i + 1])
    assert torch.allclose(got, editor.decode(z).cpu(), atol=1e-4)
    cfg.shift, cfg.guidance_interval = None, None  # the editor's schedule, CFG everywhere: another edit
    assert (Evaluator(cfg, None, tmp_path / "eval2").edit(editor, recs, seed=1, first_index=0) - got).abs().max() > 1e-3
