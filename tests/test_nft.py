"""Forward-process RL (train.algorithm: nft | awm): the DiffusionNFT and AWM losses against hand-computed values,
the re-noising of the rollouts, the config checks, a tiny-recipe run of each, exact resume after SIGKILL, and 2
processes reproducing 1 (the same checks Edit-GRPO has in test_train.py and test_scale_multiprocess.py)."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from editgrpo.config import GRPOConfig, validate_config
from editgrpo.grpo import awm_loss, nft_loss, nft_optimality, velocity_kl
from editgrpo.rollout import forward_records
from viva_base.errors import UserError
from viva_base.recipe import load_recipe

TINY = ["recipe=recipes/tiny.yaml", "report_to=none"]


# ---------------------------------------------------------------------------------------------------------------
# the losses, by hand
# ---------------------------------------------------------------------------------------------------------------


def test_nft_optimality_probability():
    a = torch.tensor([-10.0, -5.0, -2.5, 0.0, 2.5, 5.0, 10.0])
    assert nft_optimality(a, 5.0).tolist() == [0.0, 0.0, 0.25, 0.5, 0.75, 1.0, 1.0]


def test_nft_loss_hand_computed_value_and_gradient():
    """One sample, two elements: v_old = [1, 0], v = [2, 0], v* = [0, 0], sigma 0.5, b = 0.5, A = 2.5, A_max = 5.
    r = 0.75; v+ = [1.5, 0], v- = [0.5, 0]; e+ = 0.5 [-1.5, 0], mean e+^2 = 0.28125, w+ = 0.375: 0.75;
    e- = 0.5 [-0.5, 0], mean e-^2 = 0.03125, w- = 0.125: 0.25; L = (5 / 0.5)(0.75 * 0.75 + 0.25 * 0.25) = 6.25.
    dL/dv_0 = 10 (0.75 * 0.5 * 1 + 0.25 * (-0.5) * 1) = 2.5 (w+- held constant)."""
    v = torch.tensor([[2.0, 0.0]], requires_grad=True)
    loss, m = nft_loss(v, torch.tensor([[1.0, 0.0]]), torch.zeros(1, 2), torch.tensor([0.5]), torch.tensor([2.5]),
                       nft_beta=0.5, adv_max=5.0)
    assert loss.item() == pytest.approx(6.25, abs=1e-6)
    assert m["r_mean"].item() == 0.75 and m["old_deviate"].item() == pytest.approx(0.5)
    (g,) = torch.autograd.grad(loss, v)
    torch.testing.assert_close(g, torch.tensor([[2.5, 0.0]]))
    # the KL term: velocity_kl([1, 2], [0, 0]) = (1 + 4) / 2 = 2.5, added with weight beta
    kl = velocity_kl(torch.tensor([[1.0, 2.0]]), torch.zeros(1, 2))
    assert kl.tolist() == [2.5]
    loss_kl, m_kl = nft_loss(v, torch.tensor([[1.0, 0.0]]), torch.zeros(1, 2), torch.tensor([0.5]),
                             torch.tensor([2.5]), nft_beta=0.5, adv_max=5.0, kl=kl, beta=0.1)
    assert loss_kl.item() == pytest.approx(6.5, abs=1e-6) and m_kl["kl"].item() == 2.5


@pytest.mark.parametrize("nft_beta", [0.1, 1.0])
def test_nft_gradient_on_policy_is_advantage_weighted_flow_matching(nft_beta):
    """At v = v_old (the first update of an iteration) the NFT gradient is A_i times the self-normalised clean-sample
    regression gradient, for any b: d/dv [A sigma^2 mean((v - v*)^2) / w], w = mean|sigma (v_old - v*)|."""
    g = torch.Generator().manual_seed(0)
    v_old, target = torch.randn(3, 2, 4, generator=g), torch.randn(3, 2, 4, generator=g)
    sigma, adv = torch.tensor([0.9, 0.5, 0.2]), torch.tensor([1.5, -0.7, 0.0])
    v = v_old.clone().requires_grad_(True)
    loss, _ = nft_loss(v, v_old, target, sigma, adv, nft_beta=nft_beta, adv_max=5.0)
    (got,) = torch.autograd.grad(loss, v)
    s = sigma.view(-1, 1, 1)
    w = (s * (v_old - target)).abs().flatten(1).mean(1).view(-1, 1, 1)
    want = (adv.view(-1, 1, 1) * 2 * s ** 2 * (v_old - target) / w / 8) / 3  # mean over 8 elements, 3 samples
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    assert got[2].abs().max() < 1e-7  # A = 0: no gradient on-policy


def test_nft_loss_ignores_invalid_samples():
    g = torch.Generator().manual_seed(1)
    v, v_old, t = (torch.randn(2, 3, generator=g) for _ in range(3))
    t[1] = float("nan")  # a failed sample's values never reach the loss
    valid = torch.tensor([True, False])
    a, _ = nft_loss(v, v_old, t, torch.tensor([0.4, 0.6]), torch.tensor([1.0, 0.0]), nft_beta=1.0, adv_max=5.0,
                    valid=valid)
    b, _ = nft_loss(v[:1], v_old[:1], t[:1], torch.tensor([0.4]), torch.tensor([1.0]), nft_beta=1.0, adv_max=5.0)
    assert torch.isfinite(a) and a.item() == pytest.approx(b.item(), rel=1e-6)


def test_awm_loss_hand_computed_value_and_gradient():
    """Two samples: v = [[1, 2], [0, 1]], v* = [[0, 0], [1, 1]]: l = [2.5, 0.5]; A = [2, -1]:
    mean(A l) = (5 - 0.5) / 2 = 2.25; + 0.1 * mean(kl = [1, 3]) = 2.45. dL/dv_0 = A_0 2 (v - v*) / 2 / 2 = [1, 2]."""
    v = torch.tensor([[1.0, 2.0], [0.0, 1.0]], requires_grad=True)
    target = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    adv = torch.tensor([2.0, -1.0])
    loss, m = awm_loss(v, target, adv)
    assert loss.item() == pytest.approx(2.25) and m["fm_loss"].item() == pytest.approx(1.5)
    (g,) = torch.autograd.grad(loss, v)
    torch.testing.assert_close(g, torch.tensor([[1.0, 2.0], [0.5, 0.0]]))
    loss_kl, m_kl = awm_loss(v, target, adv, kl=torch.tensor([1.0, 3.0]), beta=0.1)
    assert loss_kl.item() == pytest.approx(2.45) and m_kl["kl"].item() == 2.0
    with pytest.raises(ValueError, match="needs kl"):
        awm_loss(v, target, adv, beta=0.1)


def test_forward_records_renoise_the_clean_latents_per_sample():
    """z = (1 - sigma) x0 + sigma eps and v* = eps - x0, so z - sigma v* = x0; sample i's noise comes from its own
    generator (the same alone or in a batch: layout-independent); sigma is the shifted uniform time."""
    x0 = torch.randn(3, 2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    gens = lambda idx: [torch.Generator().manual_seed(100 + i) for i in idx]  # noqa: E731
    recs = forward_records(x0, gens([0, 1, 2]), 2, shift=3.0)
    assert [r.index for r in recs] == [0, 1] and recs[0].old_velocity is None
    for r in recs:
        s = r.sigma.view(-1, 1, 1, 1, 1)
        torch.testing.assert_close(r.latents - s * r.target, x0, atol=1e-6, rtol=0)
        assert ((r.sigma > 0) & (r.sigma < 1)).all()
    u = torch.rand((), generator=torch.Generator().manual_seed(101))
    assert recs[0].sigma[1].item() == pytest.approx((3 * u / (1 + 2 * u)).item())
    alone = forward_records(x0[1:2], gens([1]), 2, shift=3.0)
    for a, b in zip(alone, recs):
        assert torch.equal(a.latents[0], b.latents[1]) and torch.equal(a.sigma[0], b.sigma[1])
    assert not torch.equal(recs[0].sigma, recs[1].sigma)


# ---------------------------------------------------------------------------------------------------------------
# config
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides, key", [
    (["train.algorithm=ppo"], "train.algorithm"),
    (["sampling.method=ode"], "sampling.method=ode"),             # GRPO needs SDE log-probs
    (["train.algorithm=nft", "train.advantage_clip=null"], "advantage_clip"),
    (["train.algorithm=nft", "train.nft_beta=0"], "train.nft_beta"),
    (["train.algorithm=awm", "train.forward_timesteps=0"], "train.forward_timesteps"),
])
def test_bad_algorithm_settings_name_the_key(overrides, key):
    with pytest.raises(UserError, match=key):
        validate_config(load_recipe(GRPOConfig, ["recipe=recipes/tiny.yaml", *overrides]))


def test_bad_algorithm_is_one_line_exit_2(repo_root, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "editgrpo.train", *TINY, f"output_dir={tmp_path}/run",
                           "train.algorithm=dpo"], cwd=repo_root, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: train.algorithm")
    assert not (tmp_path / "run" / "data").exists()


# ---------------------------------------------------------------------------------------------------------------
# the trainer
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm, extra, keys", [
    ("nft", ["sampling.method=ode", "train.cfg_free=true"], ("r_mean", "old_deviate")),
    ("nft", ["sampling.method=ode", "train.minibatches_per_iteration=2"], ("r_mean", "old_deviate")),
    ("awm", ["sampling.method=ode"], ("fm_loss",)),
    ("awm", ["sampling.method=cps", "sampling.eta=0.5"], ("fm_loss",)),  # any sampler
])
def test_tiny_recipe_trains_with_each_forward_algorithm(algorithm, extra, keys, tmp_path, repo_root, monkeypatch,
                                                        one_thread):
    from editgrpo import train as train_mod

    monkeypatch.chdir(repo_root)
    train_mod.main(load_recipe(GRPOConfig, [*TINY, f"output_dir={tmp_path}", f"train.algorithm={algorithm}",
                                            "train.num_iterations=2", "train.checkpoint_every=0", *extra]))
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        for k in ("loss", "policy_loss", "kl", "grad_norm", *keys):
            assert isinstance(r[k], float) and r[k] == r[k], k
        assert r["grad_norm"] > 0 and "clip_frac" not in r
    if "train.minibatches_per_iteration=2" in extra:  # the second minibatch trains away from v_old
        assert rows[-1]["old_deviate"] > 0
    lora = load_file(str(tmp_path / "lora" / "pytorch_lora_weights.safetensors"))
    assert any(float(t.abs().max()) > 0 for k, t in lora.items() if "lora_B" in k or "lora_up" in k)


def _run_train(args, cwd):
    from test_train import BIT_EXACT_ENV

    return subprocess.Popen([sys.executable, "-m", "editgrpo.train", *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **BIT_EXACT_ENV})


@pytest.mark.slow
@pytest.mark.parametrize("algorithm, extra", [
    ("nft", ["sampling.method=ode", "train.minibatches_per_iteration=2"]),  # v_old precomputed, 2 steps an iteration
    ("awm", ["sampling.method=ode", "sampling.num_steps=4"]),
])
def test_forward_algorithms_resume_bit_identically_after_sigkill(algorithm, extra, tmp_path, repo_root):
    """As Edit-GRPO's test: SIGKILL after checkpoint-2, resume=latest; checkpoint-4, the final LoRA and the metrics
    equal an uninterrupted run's (the re-noising draws from per-sample generators of (seed, iteration, sample))."""
    from test_train import assert_same_run, run_kill_and_resume, uninterrupted_again

    common = [*TINY, f"train.algorithm={algorithm}", "train.num_iterations=4", *extra]
    full, resumed, _ = run_kill_and_resume(common, tmp_path, repo_root, _run_train)
    assert_same_run(full, resumed, ("checkpoint-4/trainable.safetensors", "lora/pytorch_lora_weights.safetensors"),
                    rerun=uninterrupted_again(common, tmp_path, repo_root, _run_train))
    assert len((full / "metrics.jsonl").read_text().splitlines()) == 4


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["nft", "awm"])
def test_forward_algorithms_on_two_processes_reproduce_one_process(algorithm, tmp_path, repo_root):
    """The multi-process check of Edit-GRPO (tests/test_scale_multiprocess.py, whose hooks are reused): 3 prompts x 2
    samples, prompt 1's group split over the 2 ranks; gathered rewards, advantages and the first update's LoRA
    gradients of torchrun --nproc_per_node 2 (gloo, CPU) equal one process's."""
    import test_scale_multiprocess as mp

    args = [*mp.COMMON, f"train.algorithm={algorithm}", "sampling.method=ode", "train.beta=0.01"]
    mp.assert_two_processes_reproduce(args, tmp_path, repo_root)
