"""Flow-matching samplers for Edit-GRPO: sigma schedule, ODE/SDE steps with log-probs, trajectories.

Pure tensor math; nothing here knows the model. Convention (diffusers): ``sigma = 1`` is pure noise,

    z_sigma = (1 - sigma) * z_data + sigma * noise,     v = noise - z_data,

and a step goes from ``sigma`` to ``sigma_next < sigma`` with ``dt = sigma_next - sigma < 0``.

All math runs in float32 whatever the model dtype: inputs are cast to float32 and every returned tensor is
float32 (the caller casts latents back to its model dtype inside its velocity function if it wants to).

Stochastic steps (``sde_step``):

* ``"flow_sde"`` -- the SDE of Flow-GRPO (Liu et al. 2025, eq. 9 / VIVA eq. 14), written in this convention::

      s    = eta * sqrt(sigma / (1 - sigma))
      mean = z + dt * (v + s^2 / (2 sigma) * (z + (1 - sigma) v))
      std  = s * sqrt(-dt)

* ``"cps"`` -- Coefficients-Preserving Sampling (Wang & Yu 2025, "Coefficients-Preserving Sampling for
  Reinforcement Learning with Flow Matching")::

      x0   = z - sigma v                      (predicted data)
      x1   = z + (1 - sigma) v                (predicted noise)
      std  = sigma_next * sin(eta * pi / 2)
      mean = (1 - sigma_next) x0 + sqrt(sigma_next^2 - std^2) x1

  so the sample ``mean + std * eps`` has exactly the coefficients ``(1 - sigma_next)`` on the data and
  ``sigma_next`` on (unit-variance) noise that the marginal at ``sigma_next`` has.

The sample is ``z' = mean + std * eps`` with ``eps ~ N(0, I)``; ``log_prob`` is, by default
(``log_prob="exact"``), the exact Gaussian log-density of ``z'`` under ``N(mean, std^2 I)``, **averaged** (not
summed) over all non-batch elements, so a policy ratio ``exp(logp - logp_old)`` is the exp of a per-element mean
(as Flow-GRPO does). ``log_prob="unscaled"`` is Flow-GRPO's CPS log-prob, ``-mean((z' - mean)^2)``: without the
``1 / (2 std^2)`` (and the constants), which for CPS reaches ~1e4 at the last steps of a shifted schedule, so
that those steps' ratios would dominate the update and saturate the clip (see :func:`unscaled_log_prob`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

SDEMethod = Literal["flow_sde", "cps"]
SDE_METHODS: tuple[str, ...] = ("flow_sde", "cps")
ROLLOUT_METHODS: tuple[str, ...] = (*SDE_METHODS, "ode")  # sampling.method; ode: deterministic, no log-probs
LogProbKind = Literal["exact", "unscaled"]
LOG_PROB_KINDS: tuple[str, ...] = ("exact", "unscaled")
_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)

Generator = torch.Generator | Sequence[torch.Generator] | None


# --------------------------------------------------------------------------------------------------------------
# Schedule
# --------------------------------------------------------------------------------------------------------------


def _shift_sigmas(sigmas, shift: float):
    """Timestep shift of SD3 / HunyuanVideo: ``sigma' = shift * sigma / (1 + (shift - 1) * sigma)``."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def sigma_schedule(num_steps: int, shift: float = 1.0, num_train_timesteps: int = 1000) -> torch.Tensor:
    """Sigmas of ``FlowMatchEulerDiscreteScheduler(shift=shift).set_timesteps(num_steps)``, plus the final 0.

    Returns a float32 tensor of length ``num_steps + 1``, decreasing from 1 to 0. It reproduces diffusers
    (default config: no dynamic shifting, no Karras/exponential/beta sigmas) including its quirk: the
    smallest sigma is the *shifted* ``1 / num_train_timesteps``, and the linear ramp from 1 to it is shifted
    again::

        sigma_max, sigma_min = shift(1), shift(1 / num_train_timesteps)   (float32, as the scheduler's __init__)
        sigmas = shift(linspace(sigma_max, sigma_min, num_steps))         (float64, then float32), append 0

    with ``shift(s) = shift * s / (1 + (shift - 1) * s)``. ``shift(1)`` rounds to slightly above 1 in float32
    for some shifts (e.g. 1/3); kept, as diffusers has it (``sde_step`` handles ``sigma >= 1``).
    """
    if num_steps < 1:
        raise ValueError(f"sigma_schedule: num_steps must be >= 1, got {num_steps}")
    if not shift > 0:
        raise ValueError(f"sigma_schedule: shift must be > 0, got {shift}")
    # The scheduler's __init__ shifts the training sigmas [1, ..., 1/N] in float32 and keeps their ends.
    train_ends = torch.tensor([num_train_timesteps, 1], dtype=torch.float32) / num_train_timesteps
    sigma_max, sigma_min = _shift_sigmas(train_ends, shift).tolist()
    # set_timesteps: numpy float64 ramp between the ends (as timesteps), shifted again, then float32.
    ramp = np.linspace(sigma_max * num_train_timesteps, sigma_min * num_train_timesteps, num_steps)
    sigmas = torch.from_numpy(_shift_sigmas(ramp / num_train_timesteps, shift)).to(torch.float32)
    return torch.cat([sigmas, torch.zeros(1, dtype=torch.float32)])


def timesteps_from_sigmas(sigmas: torch.Tensor | float, num_train_timesteps: int = 1000) -> torch.Tensor:
    """The timestep diffusers passes to the transformer: ``t = sigma * num_train_timesteps`` (float32)."""
    return torch.as_tensor(sigmas, dtype=torch.float32) * num_train_timesteps


# --------------------------------------------------------------------------------------------------------------
# Steps
# --------------------------------------------------------------------------------------------------------------


def _as_sigma(sigma: float | torch.Tensor, like: torch.Tensor, name: str) -> torch.Tensor:
    """A float or per-sample ``[B]`` sigma as a float32 tensor broadcastable to ``like`` (``[B, 1, ..., 1]``)."""
    s = torch.as_tensor(sigma, dtype=torch.float32, device=like.device)
    if s.ndim == 0:
        return s
    if s.ndim == 1 and s.shape[0] == like.shape[0]:
        return s.view(-1, *([1] * (like.ndim - 1)))
    raise ValueError(
        f"{name} must be a float or a tensor of shape [B]={[like.shape[0]]}, got shape {list(s.shape)}"
    )


def _per_sample(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Expand a scalar or ``[B, 1, ..., 1]`` tensor to the per-sample shape ``[B, 1, ..., 1]``."""
    return x.reshape(-1, *([1] * (like.ndim - 1))).expand(like.shape[0], *([1] * (like.ndim - 1)))


def _mean_non_batch(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1).mean(dim=1)


CFG_GRADS: tuple[str, ...] = ("full", "cond_only")


def cfg_velocity(v_cond: torch.Tensor, v_uncond: torch.Tensor, guidance_scale: float | torch.Tensor,
                 cfg_grad: str = "full") -> torch.Tensor:
    """Classifier-free guidance: ``v = v_uncond + w * (v_cond - v_uncond)`` in float32 (``w`` a float, or one
    weight per sample [B] from ``viva_base.guidance.guidance_weights``; where it is 1 the result is ``v_cond`` exactly).

    In Edit-GRPO the unconditional branch drops the instruction only (same source latents); ``w = 1`` gives
    ``v_cond``. The value never depends on ``cfg_grad``; its gradient does (``train.cfg_grad``)::

        full:       grad v = w grad v_cond + (1 - w) grad v_uncond     (w = 2: 2 grad v_c - grad v_u)
        cond_only:  grad v = w grad v_cond                             (v_uncond detached, as Flow-GRPO)
    """
    if cfg_grad not in CFG_GRADS:
        raise ValueError(f"cfg_velocity: unknown cfg_grad {cfg_grad!r}; use one of {CFG_GRADS}")
    v_cond = v_cond.float()
    v_uncond = v_uncond.float()
    if cfg_grad == "cond_only":
        v_uncond = v_uncond.detach()
    if not torch.is_tensor(guidance_scale):
        return v_uncond + guidance_scale * (v_cond - v_uncond)
    w = guidance_scale.to(device=v_cond.device, dtype=torch.float32).reshape(-1, *([1] * (v_cond.ndim - 1)))
    return torch.where(w == 1.0, v_cond, v_uncond + w * (v_cond - v_uncond))


def ode_step(
    velocity: torch.Tensor, sample: torch.Tensor, sigma: float | torch.Tensor, sigma_next: float | torch.Tensor
) -> torch.Tensor:
    """Euler step of the probability-flow ODE: ``z' = z + (sigma_next - sigma) * v`` (float32).

    Equals ``FlowMatchEulerDiscreteScheduler.step`` (non-stochastic) on the same sigmas. ``sigma`` and
    ``sigma_next`` are floats or per-sample tensors of shape ``[B]``.
    """
    sample = sample.float()
    s = _as_sigma(sigma, sample, "sigma")
    s_next = _as_sigma(sigma_next, sample, "sigma_next")
    return sample + (s_next - s) * velocity.float()


@dataclass
class SDEStepOutput:
    """Result of :func:`sde_step` (all float32).

    Attributes:
        prev_sample: ``[B, ...]`` the drawn sample ``mean + std * eps`` (or the given ``prev_sample``).
        log_prob: ``[B]`` log N(prev_sample; mean, std^2), averaged over non-batch elements.
        mean: ``[B, ...]`` the Gaussian mean (carries grad from ``velocity``).
        std: ``[B, 1, ..., 1]`` the Gaussian std (depends on sigmas and eta only).
    """

    prev_sample: torch.Tensor
    log_prob: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor


def sde_mean_std(
    velocity: torch.Tensor,
    sample: torch.Tensor,
    sigma: float | torch.Tensor,
    sigma_next: float | torch.Tensor,
    *,
    method: SDEMethod,
    eta: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean ``[B, ...]`` and std (scalar or ``[B, 1, ..., 1]``) of one stochastic step (float32).

    ``"flow_sde"`` (Flow-GRPO, VIVA eq. 14)::

        s = eta * sqrt(sigma / (1 - sigma)),  mean = z + dt (v + s^2/(2 sigma) (z + (1 - sigma) v)),
        std = s sqrt(-dt)

    At ``sigma = 1`` (the first step of an unshifted schedule) ``sigma / (1 - sigma)`` is infinite; as in
    Flow-GRPO (which substitutes the schedule's second sigma) the denominator uses ``sigma_next`` there:
    ``s = eta * sqrt(sigma / (1 - sigma_next))`` when ``sigma >= 1``. The mean keeps the true ``sigma``.

    ``"cps"`` (Coefficients-Preserving Sampling)::

        x0 = z - sigma v,  x1 = z + (1 - sigma) v,  std = sigma_next sin(eta pi / 2),
        mean = (1 - sigma_next) x0 + sqrt(sigma_next^2 - std^2) x1

    Raises ``ValueError`` unless ``sigma_next < sigma``, ``eta`` is valid for the method, and the std is
    finite and > 0 (a zero std -- ``eta = 0``, or ``sigma_next = 0`` with CPS -- is a deterministic step:
    use :func:`ode_step`; its log-density is undefined).
    """
    if method not in SDE_METHODS:
        raise ValueError(f"sde_step: unknown method {method!r}; use one of {SDE_METHODS}")
    if not eta > 0:
        raise ValueError(f"sde_step: eta must be > 0 (got {eta}); for eta = 0 the step is deterministic: use ode_step")
    if method == "cps" and eta > 1:
        raise ValueError(f"sde_step: CPS needs 0 < eta <= 1 (std = sigma_next * sin(eta * pi / 2)), got {eta}")
    z = sample.float()
    v = velocity.float()
    s = _as_sigma(sigma, z, "sigma")
    s_next = _as_sigma(sigma_next, z, "sigma_next")
    dt = s_next - s
    if method == "flow_sde":
        denom_sigma = torch.where(s >= 1, s_next, s)
        noise_scale = eta * torch.sqrt(s / (1 - denom_sigma))
        mean = z + dt * (v + noise_scale**2 / (2 * s) * (z + (1 - s) * v))
        std = noise_scale * torch.sqrt(-dt)
    else:
        x0 = z - s * v
        x1 = z + (1 - s) * v
        std = s_next * math.sin(eta * math.pi / 2)
        # sigma_next^2 - std^2 = (sigma_next cos(eta pi / 2))^2, written so it is never negative by rounding.
        mean = (1 - s_next) * x0 + s_next * math.cos(eta * math.pi / 2) * x1
    bad = (dt >= 0) | ~torch.isfinite(std) | (std <= 0)
    if bool(bad.any()):
        if bool((dt >= 0).any()):
            raise ValueError("sde_step: sigma_next must be < sigma (a step goes towards the data, sigma -> 0)")
        if bool((std <= 0).any()):
            raise ValueError(
                "sde_step: the step has std 0 (sigma_next == 0 with method='cps'), so its log-prob is undefined; "
                "make the final step to sigma 0 an ODE step (ode_step)"
            )
        raise ValueError(
            f"sde_step: non-finite std for sigma={sigma}, sigma_next={sigma_next}; sigmas must lie in [0, 1]"
        )
    return mean, std


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """``[B]`` exact log N(x; mean, std^2) per element, averaged over all non-batch elements (float32)::

        log p = mean_over_elements( -(x - mean)^2 / (2 std^2) - log std - log sqrt(2 pi) )
    """
    x = x.float()
    lp = -((x - mean) ** 2) / (2 * std**2) - torch.log(std) - _LOG_SQRT_2PI
    return _mean_non_batch(lp)


def unscaled_log_prob(x: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """``[B]`` Flow-GRPO's CPS log-prob (``log_prob="unscaled"``), averaged over non-batch elements (float32)::

        log p~ = mean_over_elements( -(x - mean)^2 )

    The exact log-density (:func:`gaussian_log_prob`) without its ``1 / (2 std^2)`` factor and its constants.
    It is not a log-density: ``exp(log p~ - log p~_old)`` is a surrogate ratio whose log scales with ``std``
    times the change of the mean, where the exact one scales with that change over ``std``. With CPS
    (``std = sigma_next sin(eta pi / 2)``) the exact factor ``1 / (2 std^2)`` grows to ~1e4 at the last steps of
    a shift-7 schedule, so those steps' ratios dominate the update and saturate the clip; the unscaled form
    keeps every step's ratio on a comparable scale. Constants cancel in ratios either way.
    """
    return _mean_non_batch(-((x.float() - mean) ** 2))


def step_log_prob_of(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, kind: LogProbKind) -> torch.Tensor:
    """``[B]`` log-prob of ``x`` under one step: ``"exact"`` (:func:`gaussian_log_prob`) or ``"unscaled"``
    (:func:`unscaled_log_prob`)."""
    if kind == "exact":
        return gaussian_log_prob(x, mean, std)
    if kind == "unscaled":
        return unscaled_log_prob(x, mean)
    raise ValueError(f"sde_step: unknown log_prob {kind!r}; use one of {LOG_PROB_KINDS}")


def _randn(shape: Sequence[int], generator: Generator, device: torch.device) -> torch.Tensor:
    """Standard normal float32 noise of ``shape`` on ``device``.

    Drawn on the generator's device (so a CPU generator gives the same noise whatever the latents' device)
    and moved. ``generator`` may be a list with one generator per sample (each draws its sample's noise),
    which makes a sample's noise independent of how the batch is split.
    """
    if generator is None:
        return torch.randn(tuple(shape), dtype=torch.float32, device=device)
    if isinstance(generator, torch.Generator):
        return torch.randn(tuple(shape), generator=generator, dtype=torch.float32, device=generator.device).to(device)
    generators = list(generator)
    if len(generators) != shape[0]:
        raise ValueError(f"got {len(generators)} generators for a batch of {shape[0]}; pass one per sample or one")
    return torch.cat(
        [torch.randn((1, *shape[1:]), generator=g, dtype=torch.float32, device=g.device).to(device) for g in generators]
    )


def sde_step(
    velocity: torch.Tensor,
    sample: torch.Tensor,
    sigma: float | torch.Tensor,
    sigma_next: float | torch.Tensor,
    *,
    method: SDEMethod,
    eta: float,
    noise: torch.Tensor | None = None,
    prev_sample: torch.Tensor | None = None,
    generator: Generator = None,
    log_prob: LogProbKind = "exact",
) -> SDEStepOutput:
    """One stochastic step ``z' = mean + std * eps`` and its log-prob (see :func:`sde_mean_std` for the math).

    Args:
        velocity: ``[B, ...]`` model velocity at ``(sample, sigma)`` (any dtype; math in float32).
        sample: ``[B, ...]`` current latents ``z`` at ``sigma``.
        sigma, sigma_next: floats or ``[B]`` tensors with ``sigma_next < sigma``.
        method: ``"flow_sde"`` (Flow-GRPO) or ``"cps"`` (Coefficients-Preserving Sampling).
        eta: noise level (> 0; <= 1 for CPS).
        noise: explicit standard-normal ``eps`` (``[B, ...]``); else drawn in float32 from ``generator``.
        prev_sample: if given, score this sample (no draw): used to recompute log-probs in training.
        generator: ``torch.Generator`` or a list of one per sample.
        log_prob: ``"exact"`` (the Gaussian log-density) or ``"unscaled"`` (Flow-GRPO's CPS form,
            :func:`unscaled_log_prob`).

    Returns:
        :class:`SDEStepOutput` with ``prev_sample``, ``log_prob [B]`` (averaged over non-batch elements),
        ``mean``, ``std``.
    """
    if prev_sample is not None and (noise is not None or generator is not None):
        raise ValueError("sde_step: pass either prev_sample (to score it) or noise/generator (to draw one), not both")
    if noise is not None and generator is not None:
        raise ValueError("sde_step: pass either noise or generator, not both")
    mean, std = sde_mean_std(velocity, sample, sigma, sigma_next, method=method, eta=eta)
    std = _per_sample(std, mean)
    if prev_sample is None:
        if noise is None:
            noise = _randn(mean.shape, generator, mean.device)
        elif noise.shape != mean.shape:
            raise ValueError(f"sde_step: noise has shape {list(noise.shape)}, expected {list(mean.shape)}")
        prev_sample = mean + std * noise.float()
    else:
        if prev_sample.shape != mean.shape:
            raise ValueError(f"sde_step: prev_sample has shape {list(prev_sample.shape)}, expected {list(mean.shape)}")
        prev_sample = prev_sample.float()
    return SDEStepOutput(
        prev_sample=prev_sample, log_prob=step_log_prob_of(prev_sample, mean, std, log_prob), mean=mean, std=std
    )


# --------------------------------------------------------------------------------------------------------------
# Trajectories
# --------------------------------------------------------------------------------------------------------------


@dataclass
class StepRecord:
    """What training needs of one recorded step (all tensors detached, float32).

    Attributes:
        index: step index ``i`` in the schedule (the step goes from ``sigmas[i]`` to ``sigmas[i + 1]``).
        sigma, sigma_next: ``[B]`` per-sample sigmas of the step.
        latents: ``[B, ...]`` latents ``z`` at ``sigma`` (the velocity function's input).
        next_latents: ``[B, ...]`` the sampled latents at ``sigma_next``.
        log_prob: ``[B]`` log-prob of ``next_latents`` under the sampling policy (the "old" log-prob).
    """

    index: int
    sigma: torch.Tensor
    sigma_next: torch.Tensor
    latents: torch.Tensor
    next_latents: torch.Tensor
    log_prob: torch.Tensor


@dataclass
class Trajectory:
    """Result of :func:`sample_trajectory`: final ``latents`` (float32), the recorded ``steps`` (in order) and
    the indices of the steps that were stochastic (``sde_steps``)."""

    latents: torch.Tensor
    steps: list[StepRecord] = field(default_factory=list)
    sde_steps: tuple[int, ...] = ()


def sde_step_indices(sigmas: torch.Tensor, mode: str, sde_window: tuple[int, int] | None) -> tuple[int, ...]:
    """Indices of the steps a trajectory takes with the SDE.

    ``mode="ode"``: none. ``mode="sde"``: the window ``[start, end)`` if given, else every step whose
    ``sigma_next > 0`` (the final step to sigma 0 is always an ODE step: its CPS std is 0 and a noisy final
    sample is not wanted). A window that reaches a step to sigma 0 is an error.
    """
    num_steps = len(sigmas) - 1
    stochastic_ok = [i for i in range(num_steps) if float(sigmas[i + 1]) > 0]
    if mode == "ode":
        if sde_window is not None:
            raise ValueError("sample_trajectory: sde_window needs mode='sde'")
        return ()
    if mode != "sde":
        raise ValueError(f"sample_trajectory: mode must be 'sde' or 'ode', got {mode!r}")
    if sde_window is None:
        return tuple(stochastic_ok)
    start, end = int(sde_window[0]), int(sde_window[1])
    if not 0 <= start < end <= num_steps:
        raise ValueError(f"sde_window {sde_window} must satisfy 0 <= start < end <= num_steps = {num_steps}")
    window = tuple(range(start, end))
    if not set(window) <= set(stochastic_ok):
        raise ValueError(
            f"sde_window {sde_window} includes the final step to sigma 0, which is always ODE; "
            f"end the window at {max(stochastic_ok, default=-1) + 1} at most"
        )
    return window


def sde_window_at(
    num_steps: int,
    window_size: int,
    *,
    generator: torch.Generator | None = None,
    start_range: tuple[int, int] | None = None,
) -> tuple[int, int]:
    """A random SDE window ``(start, start + window_size)`` as in Flow-GRPO-Fast / MixGRPO.

    ``start`` is uniform over ``start_range = (lo, hi)`` (inclusive), by default every start that keeps the
    window off the final step to sigma 0: ``(0, num_steps - 1 - window_size)``. Drawn with ``torch.randint``
    from ``generator``, so the same generator state gives the same window (on every process).
    """
    last_start = num_steps - 1 - window_size
    if window_size < 1 or last_start < 0:
        raise ValueError(
            f"sde_window_at: window_size must be in [1, num_steps - 1] = [1, {num_steps - 1}], got {window_size}"
        )
    lo, hi = (0, last_start) if start_range is None else (int(start_range[0]), int(start_range[1]))
    if not 0 <= lo <= hi <= last_start:
        raise ValueError(f"sde_window_at: start_range {start_range} must lie within [0, {last_start}]")
    start = int(torch.randint(lo, hi + 1, (1,), generator=generator).item())
    return start, start + window_size


def sample_trajectory(
    velocity_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    latents: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    mode: Literal["sde", "ode"] = "sde",
    method: SDEMethod = "flow_sde",
    eta: float = 0.7,
    sde_window: tuple[int, int] | None = None,
    train_steps: Sequence[int] | None = None,
    generator: Generator = None,
    progress: bool = False,
    log_prob: LogProbKind = "exact",
) -> Trajectory:
    """Run the sampler over the whole schedule, recording the steps to train.

    Step ``i`` goes from ``sigmas[i]`` to ``sigmas[i + 1]``; it uses :func:`sde_step` if ``i`` is an SDE step
    (see :func:`sde_step_indices`), else :func:`ode_step`. Latents are kept in float32 between steps.

    Args:
        velocity_fn: ``velocity_fn(latents [B, ...] float32, sigma [B] float32) -> velocity [B, ...]``; the
            caller's closure casts to its model dtype, converts sigma to timesteps and applies CFG
            (:func:`cfg_velocity`). Called once per step.
        latents: ``[B, ...]`` initial latents at ``sigmas[0]`` (usually pure noise).
        sigmas: ``[T + 1]`` schedule from :func:`sigma_schedule` (decreasing, ends with 0).
        mode: ``"sde"`` or ``"ode"`` (deterministic; records nothing).
        method, eta: the SDE (``"flow_sde"`` or ``"cps"``) and its noise level.
        sde_window: ``(start, end)``: only steps ``start <= i < end`` are stochastic; None = all but the
            final step to sigma 0.
        train_steps: steps to record (each must be an SDE step); default all SDE steps.
        generator: generator (or one per sample) for the SDE noise. Noise is drawn in float32, one
            ``[B, ...]`` draw per SDE step in step order, so the same generator state gives a bit-identical
            trajectory.
        progress: show a tqdm bar.
        log_prob: how recorded steps' log-probs are computed (:func:`sde_step`).
    """
    sigmas = torch.as_tensor(sigmas, dtype=torch.float32)
    if sigmas.ndim != 1 or len(sigmas) < 2:
        raise ValueError(
            f"sample_trajectory: sigmas must be a 1-D schedule of length T + 1 >= 2, got {list(sigmas.shape)}"
        )
    if bool((sigmas[1:] >= sigmas[:-1]).any()):
        raise ValueError("sample_trajectory: sigmas must be strictly decreasing (use sigma_schedule)")
    sde_steps = sde_step_indices(sigmas, mode, sde_window)
    if train_steps is None:
        record = set(sde_steps)
    else:
        record = {int(i) for i in train_steps}
        not_sde = sorted(record - set(sde_steps))
        if not_sde:
            raise ValueError(
                f"sample_trajectory: train_steps {not_sde} are not SDE steps (SDE steps: {list(sde_steps)}); "
                "only stochastic steps have a log-prob to train"
            )
    sde_set = set(sde_steps)
    batch = latents.shape[0]
    z = latents.detach().to(torch.float32, copy=True)
    steps: list[StepRecord] = []
    with torch.no_grad():
        for i in tqdm(range(len(sigmas) - 1), desc="sampling", disable=not progress, leave=False):
            sigma = sigmas[i].to(z.device).expand(batch)
            sigma_next = sigmas[i + 1].to(z.device).expand(batch)
            v = velocity_fn(z, sigma)
            if i in sde_set:
                out = sde_step(v, z, sigma, sigma_next, method=method, eta=eta, generator=generator, log_prob=log_prob)
                z_next = out.prev_sample
                if i in record:
                    steps.append(
                        StepRecord(
                            index=i,
                            sigma=sigma.clone(),
                            sigma_next=sigma_next.clone(),
                            latents=z,
                            next_latents=z_next,
                            log_prob=out.log_prob.detach(),
                        )
                    )
            else:
                z_next = ode_step(v, z, sigma, sigma_next)
            z = z_next.detach()
    return Trajectory(latents=z, steps=steps, sde_steps=sde_steps)
