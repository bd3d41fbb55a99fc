"""Classifier-free guidance in a limited interval of noise levels: the pure functions shared by the edit
pipeline (viva_base.pipeline), Edit-GRPO's rollouts and training forwards (editgrpo.rollout) and its evaluation."""
from __future__ import annotations

import math

import torch


def check_guidance_interval(interval, name: str = "guidance_interval") -> tuple[float, float] | None:
    """``None`` or ``(lo, hi)`` with ``0 <= lo < hi``, as floats; a ValueError naming ``name`` otherwise."""
    if interval is None:
        return None
    try:
        lo, hi = (float(x) for x in interval)
    except (TypeError, ValueError):
        raise ValueError(f"{name}={interval!r}: give two noise levels [lo, hi] (e.g. [0.5, 1.0]) or null") from None
    if not (0.0 <= lo < hi) or not math.isfinite(hi):
        raise ValueError(f"{name}=[{lo}, {hi}]: need 0 <= lo < hi (noise levels; sigma = 1 is pure noise)")
    return lo, hi


def check_sampler_options(guidance_interval=None, shift=None, *, interval_name: str = "guidance_interval",
                          shift_name: str = "shift") -> tuple[float, float] | None:
    """The user-facing check of a sampler's interval and shift: a UserError (one line naming the option) for a bad
    one; returns the interval as ``(lo, hi)`` or None."""
    from .errors import UserError

    try:
        interval = check_guidance_interval(guidance_interval, interval_name)
    except ValueError as e:
        raise UserError(str(e)) from None
    if shift is not None and not (math.isfinite(float(shift)) and float(shift) > 0):
        raise UserError(f"{shift_name} {shift}: the schedule shift must be a number > 0")
    return interval


def add_sampler_arguments(parser, *, page: bool = False) -> None:
    """The command-line sampler options shared by the edit command, the web demo and VIE-Bench: ``--guidance-interval
    LO HI`` and ``--shift`` (``page``: they set the web page's defaults). Check them with
    :func:`checked_sampler_arguments`."""
    whose = "the page's default: " if page else ""
    parser.add_argument("--guidance-interval", nargs=2, type=float, metavar=("LO", "HI"), default=None,
                        help=f"{whose}apply CFG only on the steps with LO < sigma <= HI (sigma 1 = pure noise), e.g. "
                        "0.5 1; the other steps run one forward (default: every step)")
    parser.add_argument("--shift", type=float, default=None,
                        help=f"{whose}schedule shift of the sampler (default: the editor's; 6 with --guidance-interval "
                        "0.5 1 is the toy recipe's evaluation sampler)")


def checked_sampler_arguments(args) -> tuple[float, float] | None:
    """:func:`check_sampler_options` on the options of :func:`add_sampler_arguments`, named as the user typed them."""
    return check_sampler_options(args.guidance_interval, args.shift, interval_name="--guidance-interval",
                                 shift_name="--shift")


def guidance_weights(sigma: torch.Tensor, guidance_scale: float,
                     interval: tuple[float, float] | None = None) -> torch.Tensor:
    """Per-sample CFG weight ``w(sigma)`` [B] (float32) for :func:`cfg_velocity`.

    Without an interval, ``w = guidance_scale`` at every noise level. With ``interval = (lo, hi)``, guidance
    applies only in a limited interval of noise levels (Kynkaanniemi et al. 2024, "Applying Guidance in a
    Limited Interval Improves Sample and Distribution Quality in Diffusion Models", arXiv 2404.07724)::

        w(sigma) = guidance_scale   if lo < sigma <= hi,   else 1   (the conditional velocity alone)

    Their sigma is EDM's; here it is the flow's (sigma = 1 pure noise, so ``hi >= 1`` keeps the first step
    guided). Steps with ``w = 1`` need no unconditional forward. Where guidance helps depends on the model: in
    the toy editor it sets *what* is edited at high noise and, at low noise, only pushes the preserved part of
    the frame off the source (docs/toy_world.md, "Sampling the toy editor").
    """
    sigma = torch.as_tensor(sigma, dtype=torch.float32)
    w = torch.full_like(sigma, float(guidance_scale))
    return torch.where(guided(sigma, interval), w, torch.ones_like(w))


def guided(sigma: torch.Tensor, interval: tuple[float, float] | None = None) -> torch.Tensor:
    """Which noise levels get guidance: ``lo < sigma <= hi`` (all of them without an interval); bool, sigma's shape."""
    sigma = torch.as_tensor(sigma, dtype=torch.float32)
    if interval is None:
        return torch.ones_like(sigma, dtype=torch.bool)
    lo, hi = interval
    return (sigma > lo) & (sigma <= hi)
