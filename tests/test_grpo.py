"""Tests of editgrpo.grpo: advantages (eq. 11), gathering across processes, clipped surrogate (eq. 13), KL."""

import math
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from editgrpo.grpo import (
    clipped_surrogate_loss,
    gather_for_advantages,
    gaussian_kl,
    group_advantages,
    policy_loss,
)
from editgrpo.sampling import sde_step

EPS = 1e-4


# ---------------------------------------------------------------------------------------------- advantages


def test_group_advantages_hand_checked():
    # group 0: [1, 3] -> mean 2, population std 1; group 1: [0, 0, 3, 3] -> mean 1.5, std 1.5.
    rewards = torch.tensor([1.0, 3.0, 0.0, 0.0, 3.0, 3.0])
    groups = torch.tensor([0, 0, 1, 1, 1, 1])
    out = group_advantages(rewards, groups)
    a, b = 1 / (1 + EPS), 1.5 / (1.5 + EPS)
    assert torch.allclose(out.advantages, torch.tensor([-a, a, -b, -b, b, b]), atol=1e-7)
    assert out.advantages.dtype == torch.float32
    assert out.valid.all() and not out.zero_variance.any()
    assert torch.allclose(out.group_mean, torch.tensor([2.0, 2.0, 1.5, 1.5, 1.5, 1.5]))
    assert torch.allclose(out.group_std, torch.tensor([1.0, 1.0, 1.5, 1.5, 1.5, 1.5]))


def test_group_advantages_match_a_per_group_reference():
    gen = torch.Generator().manual_seed(0)
    rewards = torch.rand(24, generator=gen)
    groups = torch.tensor([7, 42, 3] * 8)[torch.randperm(24, generator=gen)]  # non-contiguous ids, interleaved
    out = group_advantages(rewards, groups)
    for g in (7, 42, 3):
        m = groups == g
        r = rewards[m].double()
        expected = (r - r.mean()) / (r.std(unbiased=False) + EPS)
        assert torch.allclose(out.advantages[m].double(), expected, atol=1e-6)


def test_identical_rewards_give_zero_advantages():
    # float64 0.1 * 3 / 3 != 0.1: mean - value is a rounding error, which must not become error / eps.
    rewards = torch.tensor([0.1, 0.1, 0.1, 0.7, 0.7, 1.0, 2.0], dtype=torch.float64)
    assert (rewards[:3] - rewards[:3].sum() / 3).abs().max() > 0
    groups = torch.tensor([0, 0, 0, 1, 1, 2, 2])
    for scale in ("group", "global", "none"):
        out = group_advantages(rewards, groups, scale=scale)
        assert torch.equal(out.advantages[:5], torch.zeros(5))
        assert out.zero_variance.tolist() == [True] * 5 + [False] * 2
        assert (out.advantages[5:].abs() > 0.1).all()


def test_nan_reward_drops_only_its_sample():
    rewards = torch.tensor([1.0, float("nan"), 3.0, 5.0, 9.0])
    groups = torch.tensor([0, 0, 0, 1, 1])
    out = group_advantages(rewards, groups)
    a = 1 / (1 + EPS)
    assert out.valid.tolist() == [True, False, True, True, True]
    assert torch.allclose(out.advantages, torch.tensor([-a, 0.0, a, -2 / (2 + EPS), 2 / (2 + EPS)]), atol=1e-7)
    assert not torch.isnan(out.advantages).any()
    # The same as without that sample.
    keep = torch.tensor([True, False, True, True, True])
    assert torch.equal(out.advantages[keep], group_advantages(rewards[keep], groups[keep]).advantages)
    # A group left with a single valid reward (or none) gives zeros, and inf counts as a failed reward.
    out = group_advantages(torch.tensor([float("nan"), 4.0, float("inf"), float("nan"), 1.0, 2.0]),
                           torch.tensor([0, 0, 1, 1, 2, 2]))
    assert out.valid.tolist() == [False, True, False, False, True, True]
    assert torch.equal(out.advantages[:4], torch.zeros(4))
    assert out.zero_variance[:4].all() and math.isnan(out.group_mean[2].item())


def test_global_and_none_scales_and_clip():
    rewards = torch.tensor([0.0, 2.0, 4.0, 6.0, float("nan")])
    groups = torch.tensor([0, 0, 1, 1, 1])
    # Centred per group (means 1 and 5): +-1; global population std of [0, 2, 4, 6] = sqrt(5).
    glob = group_advantages(rewards, groups, scale="global")
    g = 1 / (math.sqrt(5) + EPS)
    assert torch.allclose(glob.advantages, torch.tensor([-g, g, -g, g, 0.0]), atol=1e-7)
    none = group_advantages(rewards, groups, scale="none")
    assert torch.equal(none.advantages, torch.tensor([-1.0, 1.0, -1.0, 1.0, 0.0]))
    clipped = group_advantages(torch.tensor([0.0, 0.0, 0.0, 10.0]), torch.zeros(4, dtype=torch.long), clip=1.0)
    # mean 2.5, std sqrt(18.75): the 10 gets 7.5 / 4.33 = 1.73 -> clamped to 1; the zeros -0.577 stay.
    assert torch.allclose(clipped.advantages, torch.tensor([-2.5 / (math.sqrt(18.75) + EPS)] * 3 + [1.0]))
    with pytest.raises(ValueError, match="unknown scale"):
        group_advantages(rewards, groups, scale="batch")
    with pytest.raises(ValueError, match="integer"):
        group_advantages(rewards, groups.float())


def _gather_worker(rank, world_size, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size))
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    # Rank 0 holds 3 samples, rank 1 holds 2; group 1 is split over the two processes.
    local = {0: ([1.0, 3.0, 10.0], [0, 0, 1]), 1: ([14.0, float("nan")], [1, 1])}[rank]
    rewards, groups = torch.tensor(local[0]), torch.tensor(local[1])
    all_r, all_g, sl = gather_for_advantages(accelerator, rewards, groups)
    adv = group_advantages(all_r, all_g).advantages[sl]
    torch.save({"all_r": all_r, "all_g": all_g, "slice": (sl.start, sl.stop), "adv": adv},
               os.path.join(out_dir, f"rank{rank}.pt"))
    accelerator.wait_for_everyone()
    torch.distributed.destroy_process_group()


def test_gather_for_advantages_identity_without_accelerator():
    r, g = torch.tensor([1.0, 2.0]), torch.tensor([0, 0])
    all_r, all_g, sl = gather_for_advantages(None, r, g)
    assert all_r is r and all_g is g and sl == slice(0, 2)


def test_gather_for_advantages_two_processes(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_gather_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    res = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    expected_r = torch.tensor([1.0, 3.0, 10.0, 14.0, float("nan")])
    expected_g = torch.tensor([0, 0, 1, 1, 1])
    for r in res:
        assert torch.equal(r["all_r"].nan_to_num(-1), expected_r.nan_to_num(-1))
        assert torch.equal(r["all_g"], expected_g)
    assert res[0]["slice"] == (0, 3) and res[1]["slice"] == (3, 5)
    full = group_advantages(expected_r, expected_g).advantages
    assert torch.equal(torch.cat([res[0]["adv"], res[1]["adv"]]), full)
    a = 1 / (1 + EPS)
    b = 2 / (2 + EPS)  # group 1 = [10, 14] across the two ranks: mean 12, std 2
    assert torch.allclose(full, torch.tensor([-a, a, -b, b, 0.0]), atol=1e-7)


# ---------------------------------------------------------------------------------------------- losses


def test_clipped_surrogate_hand_checked():
    old = torch.tensor([-1.0, -2.0, -3.0])
    logp = old + torch.tensor([math.log(1.5), math.log(0.5), 0.0])
    adv = torch.tensor([1.0, -1.0, 2.0])
    loss, metrics = clipped_surrogate_loss(logp, old, adv, 0.2)
    # max(-1.5, -1.2) = -1.2; max(0.5, 0.8) = 0.8; max(-2, -2) = -2.
    assert loss.item() == pytest.approx((-1.2 + 0.8 - 2.0) / 3, abs=1e-6)
    assert metrics["clip_frac"].item() == pytest.approx(2 / 3)
    assert metrics["ratio_mean"].item() == pytest.approx(1.0, abs=1e-6)
    assert metrics["approx_kl"].item() == pytest.approx(0.5 * (math.log(1.5) ** 2 + math.log(0.5) ** 2) / 3, rel=1e-5)
    # Asymmetric clip (eps_low=0.2, eps_high=0.6): ratio 1.5 is no longer clipped for A > 0.
    loss, metrics = clipped_surrogate_loss(logp, old, adv, (0.2, 0.6))
    assert loss.item() == pytest.approx((-1.5 + 0.8 - 2.0) / 3, abs=1e-6)
    assert metrics["clip_frac"].item() == pytest.approx(1 / 3)


def _toy_policy_log_probs(method):
    """Log-probs of fixed transitions under a linear velocity model, as the trainer computes them."""
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 8)
    z = torch.randn(6, 8)
    with torch.no_grad():
        drawn = sde_step(model(z), z, 0.7, 0.5, method=method, eta=0.8, generator=torch.Generator().manual_seed(1))
    out = sde_step(model(z), z, 0.7, 0.5, method=method, eta=0.8, prev_sample=drawn.prev_sample)
    return model, out, drawn


@pytest.mark.parametrize("method", ["flow_sde", "cps"])
def test_clipped_loss_gradient_at_ratio_one_is_policy_gradient(method):
    model, out, drawn = _toy_policy_log_probs(method)
    adv = torch.tensor([1.0, -0.5, 2.0, 0.0, -1.5, 0.3])
    loss, metrics = clipped_surrogate_loss(out.log_prob, drawn.log_prob, adv, 0.2)
    assert metrics["ratio_mean"].item() == pytest.approx(1.0, abs=1e-6) and metrics["clip_frac"].item() == 0
    grads = torch.autograd.grad(loss, list(model.parameters()), retain_graph=True)
    pg = torch.autograd.grad(-(adv * out.log_prob).mean(), list(model.parameters()))
    for g, ref in zip(grads, pg):
        assert torch.allclose(g, ref, atol=1e-6, rtol=1e-5)
        assert ref.abs().max() > 1e-3


def test_invalid_samples_get_no_gradient():
    model, out, drawn = _toy_policy_log_probs("cps")
    adv = torch.tensor([1.0, -0.5, 2.0, 0.7, -1.5, 0.3])
    valid = torch.tensor([True, True, False, True, False, True])
    loss, metrics = clipped_surrogate_loss(out.log_prob, drawn.log_prob, adv, 0.2, valid=valid)
    ref, _ = clipped_surrogate_loss(out.log_prob[valid], drawn.log_prob[valid], adv[valid], 0.2)
    assert torch.allclose(loss, ref, atol=1e-7)
    # A NaN log-prob of an invalid sample reaches neither the loss nor the gradient.
    lp = torch.where(valid, out.log_prob, torch.full_like(out.log_prob, float("nan")))
    loss, metrics = clipped_surrogate_loss(lp, drawn.log_prob, adv, 0.2, valid=valid)
    grads = torch.autograd.grad(loss, list(model.parameters()), retain_graph=True)
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads)
    assert all(torch.isfinite(m) for m in metrics.values())
    # With no valid sample the loss is 0 with a zero (not missing) gradient.
    loss, _ = clipped_surrogate_loss(out.log_prob, drawn.log_prob, adv, 0.2, valid=torch.zeros(6, dtype=torch.bool))
    grads = torch.autograd.grad(loss, list(model.parameters()))
    assert loss.item() == 0 and all(torch.equal(g, torch.zeros_like(g)) for g in grads)


def test_gaussian_kl_equals_torch_distributions():
    gen = torch.Generator().manual_seed(3)
    mean, ref = torch.randn(3, 4, 5, generator=gen), torch.randn(3, 4, 5, generator=gen)
    std = torch.tensor([0.3, 0.7, 1.2])
    expected = torch.distributions.kl_divergence(
        torch.distributions.Normal(mean, std.view(-1, 1, 1)), torch.distributions.Normal(ref, std.view(-1, 1, 1))
    ).mean(dim=(1, 2))
    assert torch.allclose(gaussian_kl(mean, ref, std), expected, atol=1e-6)
    assert torch.allclose(gaussian_kl(mean, ref, std.view(-1, 1, 1)), expected, atol=1e-6)
    assert torch.allclose(gaussian_kl(mean, ref, 0.5), ((mean - ref) ** 2 / 0.5).mean(dim=(1, 2)), atol=1e-6)
    assert torch.equal(gaussian_kl(mean, mean, std), torch.zeros(3))


def test_policy_loss_adds_beta_kl():
    model, out, drawn = _toy_policy_log_probs("flow_sde")
    adv = torch.tensor([1.0, -0.5, 2.0, 0.7, -1.5, 0.3])
    kl = gaussian_kl(out.mean, drawn.mean + 0.1, out.std)
    surrogate, _ = clipped_surrogate_loss(out.log_prob, drawn.log_prob, adv, 0.2)
    loss, metrics = policy_loss(out.log_prob, drawn.log_prob, adv, 0.2, kl=kl, beta=0.04)
    assert torch.allclose(loss, surrogate + 0.04 * kl.mean(), atol=1e-7)
    assert metrics["kl"].item() == pytest.approx(kl.mean().item())
    assert metrics["policy_loss"].item() == pytest.approx(surrogate.item())
    with pytest.raises(ValueError, match="needs kl"):
        policy_loss(out.log_prob, drawn.log_prob, adv, 0.2, beta=0.04)


class _MetaDeviceAccelerator:
    """Rank 0 of 2 processes whose device is ``meta``: every collective asserts its input is on that device (as
    NCCL does: CPU tensors are rejected), then answers with what a real 2-process gather would give."""

    device = torch.device("meta")
    num_processes, process_index = 2, 0

    def __init__(self, local, other):
        self.ranks = [local, other]  # per rank: {"sizes": .., "rewards": .., "groups": ..} (CPU, known to the test)
        self.calls = []

    def _check(self, name, tensor):
        self.calls.append(name)
        assert tensor.device == self.device, f"{name} got a tensor on {tensor.device}, not on accelerator.device"

    def pad_across_processes(self, tensor, dim=0):
        self._check("pad_across_processes", tensor)
        return tensor

    def gather(self, tensor):
        self._check("gather", tensor)
        width = max(len(r["rewards"]) for r in self.ranks)
        if tensor.shape == (1,) and not tensor.dtype.is_floating_point:
            return torch.tensor([len(r["rewards"]) for r in self.ranks])
        key = "rewards" if tensor.dtype.is_floating_point else "groups"
        return torch.cat([torch.nn.functional.pad(r[key], (0, width - len(r[key]))) for r in self.ranks])


def test_gather_for_advantages_moves_every_tensor_to_the_accelerator_device():
    local = {"rewards": torch.tensor([0.1, 0.5, 0.2]), "groups": torch.tensor([0, 0, 1])}
    other = {"rewards": torch.tensor([0.7, 0.3]), "groups": torch.tensor([1, 2])}
    acc = _MetaDeviceAccelerator(local, other)
    all_r, all_g, sl = gather_for_advantages(acc, local["rewards"], local["groups"])
    assert acc.calls.count("gather") == 3 and acc.calls.count("pad_across_processes") == 2
    assert all_r.device.type == "cpu" and all_g.device.type == "cpu"  # back on the caller's device
    torch.testing.assert_close(all_r, torch.tensor([0.1, 0.5, 0.2, 0.7, 0.3]))
    assert all_g.tolist() == [0, 0, 1, 1, 2] and sl == slice(0, 3)


def test_step_kl_exact_and_flow_grpo_by_hand():
    """train.kl_type: exact = mean(d^2) / (2 std^2) with the step's full std; flow_grpo = mean(d^2) / (2 std_dev_t^2),
    Flow-GRPO's std_dev_t = eta sqrt(sigma / (1 - sigma)) without sqrt(|dt|) (Flow-SDE); equal for CPS."""
    from editgrpo.grpo import flow_grpo_std_dev, step_kl
    from editgrpo.sampling import sde_mean_std

    z, v = torch.zeros(2, 4), torch.zeros(2, 4)
    sigma, sigma_next = torch.tensor([0.5, 0.8]), torch.tensor([0.4, 0.6])
    d = torch.tensor([[0.1, 0.1, 0.1, 0.1], [0.2, 0.0, 0.2, 0.0]])  # mean - ref_mean; mean(d^2) = 0.01, 0.02
    _, std = sde_mean_std(v, z, sigma, sigma_next, method="flow_sde", eta=0.7)
    # by hand: s = 0.7 sqrt(sigma / (1 - sigma)) = 0.7, 0.7 * 2; std^2 = s^2 |dt| = 0.049, 1.96 * 0.2 = 0.392
    s = torch.tensor([0.7, 1.4])
    torch.testing.assert_close(std.flatten() ** 2, torch.tensor([0.049, 0.392]))
    torch.testing.assert_close(flow_grpo_std_dev(std, sigma, sigma_next, "flow_sde").flatten(), s)
    exact = step_kl(d, torch.zeros_like(d), std, sigma=sigma, sigma_next=sigma_next, method="flow_sde", kl_type="exact")
    flow = step_kl(d, torch.zeros_like(d), std, sigma=sigma, sigma_next=sigma_next, method="flow_sde",
                   kl_type="flow_grpo")
    torch.testing.assert_close(exact, torch.tensor([0.01 / (2 * 0.049), 0.02 / (2 * 0.392)]))
    torch.testing.assert_close(flow, torch.tensor([0.01 / (2 * 0.49), 0.02 / (2 * 1.96)]))
    torch.testing.assert_close(flow, exact * (sigma - sigma_next))  # flow_grpo = exact x |dt|
    # CPS: std_dev_t is the step std itself (sigma_next sin(eta pi / 2)), so the two scales agree
    _, std_cps = sde_mean_std(v, z, sigma, sigma_next, method="cps", eta=0.5)
    kw = dict(sigma=sigma, sigma_next=sigma_next, method="cps")
    torch.testing.assert_close(step_kl(d, 0 * d, std_cps, kl_type="flow_grpo", **kw),
                               step_kl(d, 0 * d, std_cps, kl_type="exact", **kw))
    torch.testing.assert_close(step_kl(d, 0 * d, std_cps, kl_type="exact", **kw),
                               torch.tensor([0.01, 0.02]) / (2 * (sigma_next * math.sin(0.25 * math.pi)) ** 2))
    with pytest.raises(ValueError, match="kl_type"):
        step_kl(d, 0 * d, std, kl_type="sum", **kw)
