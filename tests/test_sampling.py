"""Tests of editgrpo.sampling: schedule and ODE against diffusers, SDE steps against the design formulas."""

import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from editgrpo.sampling import (
    SDEStepOutput,
    cfg_velocity,
    gaussian_log_prob,
    ode_step,
    sample_trajectory,
    sde_step,
    sde_step_indices,
    sde_window_at,
    sigma_schedule,
    timesteps_from_sigmas,
)

SHAPE = (3, 4, 2, 5, 6)  # (B, C, F, H, W)


def _randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _diffusers_scheduler(num_steps, shift):
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(num_steps)
    return scheduler


def _broadcast(x, ndim):
    return torch.as_tensor(x, dtype=torch.float64).reshape(-1, *([1] * (ndim - 1)))


def _reference_mean_std(v, z, sigma, sigma_next, method, eta):
    """The design note's formulas, written out in float64 (sigma < 1 here)."""
    v, z = v.double(), z.double()
    s, sn = _broadcast(sigma, z.ndim), _broadcast(sigma_next, z.ndim)
    dt = sn - s
    if method == "flow_sde":
        noise_scale = eta * torch.sqrt(s / (1 - s))
        mean = z + dt * (v + noise_scale**2 / (2 * s) * (z + (1 - s) * v))
        std = noise_scale * torch.sqrt(-dt)
    else:
        x0 = z - s * v
        x1 = z + (1 - s) * v
        std = sn * math.sin(eta * math.pi / 2)
        mean = (1 - sn) * x0 + torch.sqrt(sn**2 - std**2) * x1
    return mean, std


# ---------------------------------------------------------------------------------------------- schedule, ODE


@pytest.mark.parametrize("shift", [1.0, 7.0, 1.0 / 3.0, 3.0])
@pytest.mark.parametrize("num_steps", [1, 10, 50])
def test_sigma_schedule_equals_diffusers(shift, num_steps):
    scheduler = _diffusers_scheduler(num_steps, shift)
    sigmas = sigma_schedule(num_steps, shift)
    assert sigmas.dtype == torch.float32 and sigmas.shape == (num_steps + 1,)
    assert sigmas[-1] == 0
    assert torch.equal(sigmas, scheduler.sigmas)
    assert torch.equal(timesteps_from_sigmas(sigmas[:-1]), scheduler.timesteps)


@pytest.mark.parametrize("shift", [1.0, 7.0])
def test_ode_step_over_full_schedule_equals_diffusers(shift):
    num_steps = 12
    scheduler = _diffusers_scheduler(num_steps, shift)
    sigmas = sigma_schedule(num_steps, shift)
    ours = theirs = _randn(*SHAPE, seed=1)
    for i, t in enumerate(scheduler.timesteps):
        v = _randn(*SHAPE, seed=100 + i)
        theirs = scheduler.step(v, t, theirs).prev_sample
        per_sample = ode_step(v, ours, sigmas[i].expand(SHAPE[0]), sigmas[i + 1].expand(SHAPE[0]))
        ours = ode_step(v, ours, float(sigmas[i]), float(sigmas[i + 1]))
        assert torch.allclose(per_sample, ours, atol=1e-6, rtol=0)
        assert torch.allclose(ours, theirs, atol=1e-6, rtol=0)


def test_ode_step_is_float32_and_accepts_bf16_inputs():
    z = _randn(*SHAPE, seed=2).bfloat16()
    v = _randn(*SHAPE, seed=3).bfloat16()
    out = ode_step(v, z, 0.6, 0.4)
    assert out.dtype == torch.float32
    assert torch.allclose(out.double(), z.double() - 0.2 * v.double(), atol=1e-6, rtol=0)


def test_cfg_velocity():
    v_c, v_u = _randn(*SHAPE, seed=4), _randn(*SHAPE, seed=5)
    assert torch.allclose(cfg_velocity(v_c, v_u, 2.0), 2 * v_c - v_u, atol=1e-6)
    assert torch.allclose(cfg_velocity(v_c, v_u, 1.0), v_c, atol=1e-6)
    assert torch.allclose(cfg_velocity(v_c, v_u, 0.0), v_u, atol=0)
    assert cfg_velocity(v_c.half(), v_u.half(), 3.0).dtype == torch.float32


# ---------------------------------------------------------------------------------------------- SDE step


@pytest.mark.parametrize("method,eta", [("flow_sde", 0.7), ("flow_sde", 1.3), ("cps", 0.7), ("cps", 1.0)])
def test_sde_mean_std_match_design_formulas(method, eta):
    v, z = _randn(*SHAPE, seed=6), _randn(*SHAPE, seed=7)
    for sigma, sigma_next in [(0.8, 0.65), (torch.tensor([0.9, 0.5, 0.2]), torch.tensor([0.85, 0.3, 0.05]))]:
        out = sde_step(v, z, sigma, sigma_next, method=method, eta=eta, generator=torch.Generator().manual_seed(0))
        assert isinstance(out, SDEStepOutput)
        mean, std = _reference_mean_std(v, z, sigma, sigma_next, method, eta)
        assert out.mean.dtype == out.std.dtype == out.log_prob.dtype == out.prev_sample.dtype == torch.float32
        assert out.std.shape == (SHAPE[0], 1, 1, 1, 1) and out.log_prob.shape == (SHAPE[0],)
        assert torch.allclose(out.mean.double(), mean, atol=1e-5, rtol=1e-5)
        assert torch.allclose(out.std.double(), std.expand_as(out.std), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("method", ["flow_sde", "cps"])
def test_log_prob_equals_torch_distributions(method):
    v, z = _randn(*SHAPE, seed=8), _randn(*SHAPE, seed=9)
    sigma, sigma_next = torch.tensor([0.9, 0.5, 0.3]), torch.tensor([0.8, 0.45, 0.1])
    out = sde_step(v, z, sigma, sigma_next, method=method, eta=0.8, generator=torch.Generator().manual_seed(1))
    normal = torch.distributions.Normal(out.mean, out.std)
    expected = normal.log_prob(out.prev_sample).mean(dim=(1, 2, 3, 4))
    assert torch.allclose(out.log_prob, expected, atol=1e-5, rtol=1e-6)
    # Scoring a given sample (no draw): the sampled one gives the same log_prob; another one its own density.
    rescored = sde_step(v, z, sigma, sigma_next, method=method, eta=0.8, prev_sample=out.prev_sample)
    assert torch.equal(rescored.log_prob, out.log_prob)
    other = _randn(*SHAPE, seed=10)
    scored = sde_step(v, z, sigma, sigma_next, method=method, eta=0.8, prev_sample=other)
    assert torch.equal(scored.prev_sample, other)
    assert torch.allclose(scored.log_prob, normal.log_prob(other).mean(dim=(1, 2, 3, 4)), atol=1e-5, rtol=1e-6)


@pytest.mark.parametrize("method", ["flow_sde", "cps"])
def test_explicit_noise_and_generator(method):
    v, z = _randn(*SHAPE, seed=11), _randn(*SHAPE, seed=12)
    noise = _randn(*SHAPE, seed=13)
    out = sde_step(v, z, 0.7, 0.5, method=method, eta=0.5, noise=noise)
    assert torch.allclose(out.prev_sample, out.mean + out.std * noise, atol=0, rtol=0)
    drawn = sde_step(v, z, 0.7, 0.5, method=method, eta=0.5, generator=torch.Generator().manual_seed(13))
    assert torch.equal(drawn.prev_sample, out.prev_sample)  # float32 randn from the generator
    # One generator per sample: sample i's noise is its own generator's draw.
    gens = [torch.Generator().manual_seed(100 + i) for i in range(SHAPE[0])]
    per = sde_step(v, z, 0.7, 0.5, method=method, eta=0.5, generator=gens)
    for i in range(SHAPE[0]):
        eps = torch.randn(1, *SHAPE[1:], generator=torch.Generator().manual_seed(100 + i))
        assert torch.equal(per.prev_sample[i : i + 1], out.mean[i : i + 1] + out.std[i : i + 1] * eps)
    with pytest.raises(ValueError, match="either"):
        sde_step(v, z, 0.7, 0.5, method=method, eta=0.5, noise=noise, prev_sample=noise)


@pytest.mark.parametrize("method", ["flow_sde", "cps"])
def test_sde_mean_tends_to_ode_step_as_eta_goes_to_zero(method):
    v, z = _randn(*SHAPE, seed=14), _randn(*SHAPE, seed=15)
    ode = ode_step(v, z, 0.6, 0.45)
    errors = []
    for eta in [1e-1, 1e-2, 1e-3]:
        out = sde_step(v, z, 0.6, 0.45, method=method, eta=eta, noise=torch.zeros(SHAPE))
        errors.append((out.mean - ode).abs().max().item())
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 1e-5
    assert errors[0] / errors[1] > 50  # the deviation is O(eta^2) for both methods


@pytest.mark.parametrize("method", ["flow_sde", "cps"])
def test_empirical_moments_match_mean_std(method):
    n = 200_000
    v = torch.full((1, n), 0.3)
    z = torch.full((1, n), -0.8)
    out = sde_step(v, z, 0.7, 0.55, method=method, eta=0.9, generator=torch.Generator().manual_seed(3))
    mean, std = out.mean[0, 0].item(), out.std.item()
    samples = out.prev_sample[0].double()
    assert abs(samples.mean().item() - mean) < 5 * std / math.sqrt(n)
    assert abs(samples.std().item() / std - 1) < 5 * math.sqrt(1 / (2 * n))


def test_flow_sde_at_sigma_one_is_finite():
    v, z = _randn(*SHAPE, seed=16), _randn(*SHAPE, seed=17)
    for shift in [1.0, 1.0 / 3.0]:  # sigma_0 == 1, and sigma_0 slightly above 1 (diffusers' float32 rounding)
        sigmas = sigma_schedule(10, shift)
        assert sigmas[0] >= 1
        gen = torch.Generator().manual_seed(0)
        out = sde_step(v, z, sigmas[0], sigmas[1], method="flow_sde", eta=0.7, generator=gen)
        for t in (out.mean, out.std, out.log_prob, out.prev_sample):
            assert torch.isfinite(t).all()
        # The ratio sigma / (1 - sigma) uses sigma_next in its denominator there (as Flow-GRPO does).
        s, sn = sigmas[0].double(), sigmas[1].double()
        noise_scale = 0.7 * torch.sqrt(s / (1 - sn))
        assert torch.allclose(out.std.double(), noise_scale * torch.sqrt(s - sn), rtol=1e-5)
        mean = z.double() + (sn - s) * (v.double() + noise_scale**2 / (2 * s) * (z.double() + (1 - s) * v.double()))
        assert torch.allclose(out.mean.double(), mean, atol=1e-5, rtol=1e-5)


def test_cps_preserves_coefficients():
    """CPS keeps (1 - sigma_next) on x0 and total noise coefficient sigma_next: c1^2 + std^2 == sigma_next^2."""
    v = _randn(2, 16, seed=18)
    for sigma, sigma_next, eta in [(0.9, 0.7, 0.3), (0.5, 0.2, 1.0), (1.0, 0.95, 0.6)]:
        # z = sigma v gives x0 = z - sigma v = 0, x1 = z + (1 - sigma) v = v: mean = c1 * x1.
        z = sigma * v
        out = sde_step(v, z, sigma, sigma_next, method="cps", eta=eta, noise=torch.zeros_like(v))
        c1 = out.mean / v
        assert torch.allclose(c1, c1[0, 0].expand_as(c1), atol=1e-5)
        assert abs(c1[0, 0].item() ** 2 + out.std[0].item() ** 2 - sigma_next**2) < 1e-5
        # z = -(1 - sigma) v gives x1 = 0, x0 = -v: mean = -(coefficient on x0) * v.
        out = sde_step(v, -(1 - sigma) * v, sigma, sigma_next, method="cps", eta=eta, noise=torch.zeros_like(v))
        assert torch.allclose(out.mean, -(1 - sigma_next) * v, atol=1e-6)


def test_invalid_steps_raise():
    v, z = _randn(*SHAPE, seed=19), _randn(*SHAPE, seed=20)
    with pytest.raises(ValueError, match="ode_step"):  # CPS to sigma 0: std 0, no density
        sde_step(v, z, 0.3, 0.0, method="cps", eta=0.7)
    with pytest.raises(ValueError, match="ode_step"):
        sde_step(v, z, 0.3, 0.2, method="flow_sde", eta=0.0)
    with pytest.raises(ValueError, match="sigma_next must be < sigma"):
        sde_step(v, z, 0.3, 0.3, method="flow_sde", eta=0.7)
    with pytest.raises(ValueError, match="unknown method"):
        sde_step(v, z, 0.3, 0.2, method="ddim", eta=0.7)
    with pytest.raises(ValueError, match="eta <= 1"):
        sde_step(v, z, 0.3, 0.2, method="cps", eta=1.5)
    with pytest.raises(ValueError, match="shape"):
        sde_step(v, z, torch.tensor([0.3, 0.2]), 0.1, method="cps", eta=0.5)
    # Flow-SDE to sigma 0 is a proper Gaussian (std = s * sqrt(sigma) > 0).
    out = sde_step(v, z, 0.3, 0.0, method="flow_sde", eta=0.7, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out.log_prob).all() and (out.std > 0).all()


# ---------------------------------------------------------------------------------------------- trajectories


class _ToyVelocity:
    """A deterministic velocity field that logs its inputs."""

    def __init__(self):
        self.calls = []
        self.weight = torch.linspace(-0.5, 0.5, SHAPE[1]).view(1, -1, 1, 1, 1)

    def __call__(self, latents, sigma):
        assert latents.dtype == torch.float32 and sigma.shape == (latents.shape[0],)
        self.calls.append((latents.clone(), sigma.clone()))
        return self.weight * latents + sigma.view(-1, 1, 1, 1, 1) * 0.3


def test_ode_trajectory_equals_diffusers_loop():
    num_steps, shift = 8, 3.0
    scheduler = _diffusers_scheduler(num_steps, shift)
    fn = _ToyVelocity()
    z0 = _randn(*SHAPE, seed=21)
    traj = sample_trajectory(fn, z0, sigma_schedule(num_steps, shift), mode="ode")
    assert traj.steps == [] and traj.sde_steps == ()
    z = z0
    for t in scheduler.timesteps:
        z = scheduler.step(fn(z, (t / 1000).expand(SHAPE[0])), t, z).prev_sample
    assert torch.allclose(traj.latents, z, atol=1e-6, rtol=0)


@pytest.mark.parametrize("method", ["flow_sde", "cps"])
def test_trajectory_is_deterministic_given_generator(method):
    sigmas = sigma_schedule(6, 3.0)
    z0 = _randn(*SHAPE, seed=22)
    runs = [
        sample_trajectory(
            _ToyVelocity(), z0, sigmas, method=method, eta=0.7, generator=torch.Generator().manual_seed(s)
        )
        for s in (5, 5, 6)
    ]
    assert torch.equal(runs[0].latents, runs[1].latents)
    for a, b in zip(runs[0].steps, runs[1].steps):
        assert torch.equal(a.next_latents, b.next_latents) and torch.equal(a.log_prob, b.log_prob)
    assert not torch.equal(runs[0].latents, runs[2].latents)


@pytest.mark.parametrize("method", ["flow_sde", "cps"])
def test_default_trajectory_records_all_but_final_step_and_log_probs_rescore(method):
    num_steps = 5
    sigmas = sigma_schedule(num_steps, 3.0)
    fn = _ToyVelocity()
    traj = sample_trajectory(fn, _randn(*SHAPE, seed=23), sigmas, method=method, eta=0.7,
                             generator=torch.Generator().manual_seed(0), progress=True)
    assert traj.sde_steps == tuple(range(num_steps - 1))
    assert [r.index for r in traj.steps] == list(range(num_steps - 1))
    step_inputs = [z for z, _ in fn.calls]
    assert len(step_inputs) == num_steps
    for k, rec in enumerate(traj.steps):
        assert torch.equal(rec.sigma, sigmas[k].expand(SHAPE[0]))
        assert torch.equal(rec.sigma_next, sigmas[k + 1].expand(SHAPE[0]))
        assert rec.log_prob.shape == (SHAPE[0],) and rec.log_prob.dtype == torch.float32
        assert torch.equal(rec.latents, step_inputs[k])
        assert torch.equal(rec.next_latents, step_inputs[k + 1])
        # Re-scoring the recorded transition with the same policy gives the recorded log-prob (ratio 1).
        rescored = sde_step(fn(rec.latents, rec.sigma), rec.latents, rec.sigma, rec.sigma_next,
                            method=method, eta=0.7, prev_sample=rec.next_latents)
        assert torch.equal(rescored.log_prob, rec.log_prob)
    # The final step is the ODE step.
    z_last, s_last = fn.calls[num_steps - 1]
    assert torch.equal(traj.latents, ode_step(fn(z_last, s_last), z_last, sigmas[-2], sigmas[-1]))


def test_sde_window_and_train_steps():
    num_steps = 8
    sigmas = sigma_schedule(num_steps, 3.0)
    z0 = _randn(*SHAPE, seed=24)
    ode_fn, sde_fn = _ToyVelocity(), _ToyVelocity()
    sample_trajectory(ode_fn, z0, sigmas, mode="ode")
    gen = torch.Generator().manual_seed(7)
    traj = sample_trajectory(sde_fn, z0, sigmas, method="cps", eta=0.5, sde_window=(2, 5), generator=gen)
    assert traj.sde_steps == (2, 3, 4)
    assert [r.index for r in traj.steps] == [2, 3, 4]
    # Steps 0, 1 are ODE steps: the inputs of steps 0..2 equal the ODE run's; step 3's differ.
    for i in range(3):
        assert torch.equal(sde_fn.calls[i][0], ode_fn.calls[i][0])
    assert not torch.equal(sde_fn.calls[3][0], ode_fn.calls[3][0])
    # Steps 5.. are ODE steps again.
    for i in range(5, num_steps - 1):
        z, s = sde_fn.calls[i]
        expected = ode_step(sde_fn.weight * z + s.view(-1, 1, 1, 1, 1) * 0.3, z, sigmas[i], sigmas[i + 1])
        assert torch.equal(sde_fn.calls[i + 1][0], expected)
    # Exactly one [B, ...] float32 draw per SDE step.
    ref = torch.Generator().manual_seed(7)
    for _ in range(3):
        torch.randn(SHAPE, generator=ref)
    assert torch.equal(gen.get_state(), ref.get_state())
    # train_steps chooses the recorded subset of the SDE steps.
    sub = sample_trajectory(_ToyVelocity(), z0, sigmas, method="cps", eta=0.5, sde_window=(2, 5), train_steps=[3],
                            generator=torch.Generator().manual_seed(7))
    assert [r.index for r in sub.steps] == [3]
    assert torch.equal(sub.steps[0].next_latents, traj.steps[1].next_latents)
    assert torch.equal(sub.latents, traj.latents)


def test_trajectory_rejects_bad_windows():
    sigmas = sigma_schedule(6)
    z0 = _randn(*SHAPE, seed=25)
    with pytest.raises(ValueError, match="always ODE"):
        sample_trajectory(_ToyVelocity(), z0, sigmas, sde_window=(3, 6))
    with pytest.raises(ValueError, match="not SDE steps"):
        sample_trajectory(_ToyVelocity(), z0, sigmas, sde_window=(1, 3), train_steps=[0, 1])
    with pytest.raises(ValueError, match="not SDE steps"):
        sample_trajectory(_ToyVelocity(), z0, sigmas, mode="ode", train_steps=[1])
    with pytest.raises(ValueError, match="needs mode='sde'"):
        sample_trajectory(_ToyVelocity(), z0, sigmas, mode="ode", sde_window=(0, 2))
    with pytest.raises(ValueError, match="0 <= start < end"):
        sde_step_indices(sigmas, "sde", (4, 2))


def test_sde_window_at():
    draws = [sde_window_at(10, 3, generator=torch.Generator().manual_seed(s)) for s in range(40)]
    again = [sde_window_at(10, 3, generator=torch.Generator().manual_seed(s)) for s in range(40)]
    assert draws == again
    starts = {a for a, _ in draws}
    assert all(b - a == 3 for a, b in draws)
    assert starts == set(range(0, 7))  # 10 steps, the last one (to sigma 0) excluded: starts 0..6
    for a, b in draws:
        sde_step_indices(sigma_schedule(10), "sde", (a, b))  # always a valid window
    assert {sde_window_at(10, 2, generator=torch.Generator().manual_seed(s), start_range=(1, 2))[0]
            for s in range(30)} == {1, 2}
    with pytest.raises(ValueError, match="window_size"):
        sde_window_at(4, 4)
    with pytest.raises(ValueError, match="start_range"):
        sde_window_at(10, 3, start_range=(5, 8))


def _log_ratio_per_step(kind: str) -> list[float]:
    """Mean |log ratio| per step of a 16-step shift-7 CPS schedule when the velocity moves by 1e-2 (a policy
    update): the recorded sample is scored under the old and the moved step Gaussian."""
    from editgrpo.sampling import sde_step

    g = torch.Generator().manual_seed(0)
    sig = sigma_schedule(16, 7.0)
    out = []
    for i in range(15):  # every SDE step (the last one, to sigma 0, is ODE)
        s, sn = sig[i].expand(4), sig[i + 1].expand(4)
        z, v, u = (torch.randn(4, 4, 3, 8, 8, generator=g) for _ in range(3))
        old = sde_step(v, z, s, sn, method="cps", eta=0.7, generator=g, log_prob=kind)
        new = sde_step(v + 1e-2 * u, z, s, sn, method="cps", eta=0.7, prev_sample=old.prev_sample, log_prob=kind)
        out.append(float((new.log_prob - old.log_prob).abs().mean()))
    return out


def test_cps_unscaled_log_prob_keeps_every_steps_ratio_on_one_scale():
    """sampling.log_prob: exact divides by 2 std^2 (std = sigma_next sin(eta pi / 2) ~ 5e-3 at the last CPS step),
    so the last steps' ratios are orders of magnitude larger than the others'; unscaled (Flow-GRPO's CPS
    -(x - mean)^2) keeps them within a small factor."""
    from editgrpo.sampling import unscaled_log_prob

    exact, unscaled = _log_ratio_per_step("exact"), _log_ratio_per_step("unscaled")
    median = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    assert exact[-1] > 30 * median(exact), exact  # ~110x here
    assert max(unscaled) < 10 * median(unscaled), unscaled  # ~2.4x here
    # the unscaled value by hand, and its identity with the exact one up to 2 std^2 and the constants
    x, m = torch.tensor([[1.0, 2.0], [0.0, 0.5]]), torch.tensor([[0.5, 2.0], [1.0, 0.5]])
    torch.testing.assert_close(unscaled_log_prob(x, m), torch.tensor([-0.125, -0.5]))
    std = torch.tensor([[0.1], [0.2]])
    exact_lp = gaussian_log_prob(x, m, std)
    torch.testing.assert_close(exact_lp, unscaled_log_prob(x, m) / (2 * std.flatten() ** 2)
                               - torch.log(std.flatten()) - 0.5 * math.log(2 * math.pi))
