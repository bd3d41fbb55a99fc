"""Rollouts: G samples per prompt from an edit policy, with CFG on the instruction, batched.

Conditions are built once per prompt (``policy.encode_condition``) and indexed per sample. Every sample
draws its initial noise and its SDE noise from its own generator seeded by ``(seed, iteration, sample's
global index)``, so a sample is the same whatever process or batch it lands in (2 processes reproduce
1 process), and a resumed run redraws exactly what it would have drawn.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from viva_base.guidance import guidance_weights
from viva_base.policy import Condition

from .sampling import StepRecord, cfg_velocity, sample_trajectory, sde_mean_std, sde_step, sde_step_indices


def guided_velocity(policy, latents: torch.Tensor, sigma: torch.Tensor, cond: Condition, uncond: Condition | None,
                    guidance_scale: float, cfg_grad: str = "full",
                    guidance_interval: tuple[float, float] | None = None) -> torch.Tensor:
    """CFG velocity ``v_u + w (v_c - v_u)`` with ONE forward over ``[cond; uncond]`` (float32 out); ``cfg_grad``
    says whether the gradient flows through the unconditional branch too (``cfg_velocity``). With a
    ``guidance_interval``, ``w`` is per sample (``guidance_weights``: 1 outside the interval, where the sample's
    velocity is ``v_c`` exactly); a batch with no sample inside it runs the conditional forward alone."""
    if uncond is None or guidance_scale == 1.0:
        return policy.velocity(latents, sigma, cond)
    w = guidance_scale
    if guidance_interval is not None:
        w = guidance_weights(sigma, guidance_scale, guidance_interval)
        if bool((w == 1.0).all()):
            return policy.velocity(latents, sigma, cond)
    both = Condition.cat([cond, uncond])
    v = policy.velocity(torch.cat([latents, latents]), torch.cat([sigma, sigma]), both)
    v_cond, v_uncond = v.chunk(2)
    return cfg_velocity(v_cond, v_uncond, w, cfg_grad)


def sample_generators(seeds: list[int]) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


def initial_noise(shape: tuple[int, ...], generators: list[torch.Generator]) -> torch.Tensor:
    """One float32 standard-normal latent per generator (drawn before that sample's SDE noise)."""
    return torch.cat([torch.randn((1, *shape), generator=g, dtype=torch.float32) for g in generators])


def shared_prefix(policy, cond: Condition, uncond: Condition | None, prompt_index: list[int], prefix_seeds: list[int],
                  sigmas: torch.Tensor, *, mode: str, sde_window, guidance_scale: float, batch_size: int,
                  shape: tuple[int, ...], guidance_interval=None) -> tuple[int, torch.Tensor]:
    """The deterministic prefix of a rollout, once per distinct ``(prompt, prefix seed)``: each distinct pair draws
    its initial noise from ``prefix_seeds`` and runs the ODE steps before the first SDE step ``k``
    (:func:`sde_step_indices`; ``k = 0``: only the noise is shared). Returns ``(k, latents [N, ...])``, every
    sample's latent at ``sigmas[k]``. Forwards saved: ``k`` steps for all but one sample of each group."""
    sde_steps = sde_step_indices(torch.as_tensor(sigmas, dtype=torch.float32), mode, sde_window)
    if not sde_steps:
        raise ValueError("rollout: prefix_seeds need SDE steps (with an ODE rollout every sample of a group would be "
                         "the same)")
    first = min(sde_steps)
    keys = list(dict.fromkeys(zip(prompt_index, prefix_seeds)))
    latents = []
    for start in range(0, len(keys), batch_size):
        part = keys[start:start + batch_size]
        rows = torch.tensor([p for p, _ in part])
        c = cond.select(rows)
        u = uncond.select(rows) if uncond is not None else None
        z = initial_noise(shape, sample_generators([s for _, s in part])).to(policy.device)
        if first > 0:
            z = sample_trajectory(lambda x, s: guided_velocity(policy, x, s, c, u, guidance_scale,
                                                               guidance_interval=guidance_interval), z,
                                  sigmas[:first + 1], mode="ode").latents
        latents.append(z)
    latents = torch.cat(latents)
    where = {k: i for i, k in enumerate(keys)}
    return first, latents[torch.tensor([where[k] for k in zip(prompt_index, prefix_seeds)])]


@dataclass
class Rollouts:
    """N samples: final latents, the recorded steps (tensors [N, ...]) and each sample's prompt index."""

    latents: torch.Tensor
    steps: list[StepRecord]
    prompt_index: torch.Tensor


def rollout(policy, cond: Condition, uncond: Condition | None, prompt_index: list[int], seeds: list[int],
            sigmas: torch.Tensor, *, mode: str = "sde", method: str = "flow_sde", eta: float = 0.7,
            sde_window: tuple[int, int] | None = None, train_steps=None, guidance_scale: float = 2.0,
            batch_size: int | None = None, progress: bool = False, log_prob: str = "exact",
            on_chunk=None, prefix_seeds: list[int] | None = None,
            guidance_interval: tuple[float, float] | None = None) -> Rollouts:
    """Sample ``len(seeds)`` edits; sample ``i`` is conditioned on prompt ``prompt_index[i]`` (rows of
    ``cond``/``uncond``), in forwards of ``batch_size`` samples (cond and uncond in one forward).
    ``on_chunk(indices, latents)``, if given, receives each finished chunk's final latents as soon as it is
    sampled (the trainer decodes and scores it meanwhile: editgrpo/scoring.py).

    ``prefix_seeds`` (one per sample; ``sampling.share_prefix``): samples with the same prompt and prefix seed
    start from ONE initial noise (drawn from the prefix seed) and share the deterministic ODE steps before the
    first SDE step, computed once for them (:func:`shared_prefix`); each sample's own generator (``seeds``) then
    draws only its SDE noise. The samples of a group differ only by what the SDE window does."""
    n = len(seeds)
    batch_size = batch_size or n
    device = policy.device
    shape = policy.latent_shape(cond)
    first, start_latents = 0, None
    if prefix_seeds is not None:  # continue from the shared prefix at step `first`, indices shifted by `first`
        if len(prefix_seeds) != n:
            raise ValueError(f"rollout: {len(prefix_seeds)} prefix_seeds for {n} samples")
        first, start_latents = shared_prefix(policy, cond, uncond, prompt_index, prefix_seeds, sigmas, mode=mode,
                                             sde_window=sde_window, guidance_scale=guidance_scale,
                                             batch_size=batch_size, shape=shape, guidance_interval=guidance_interval)
    window = None if sde_window is None else (sde_window[0] - first, sde_window[1] - first)
    steps_to_train = None if train_steps is None else [int(i) - first for i in train_steps]
    finals, chunks = [], []
    for start in range(0, n, batch_size):
        idx = list(range(start, min(n, start + batch_size)))
        rows = torch.tensor([prompt_index[i] for i in idx])
        c = cond.select(rows)
        u = uncond.select(rows) if uncond is not None else None
        gens = sample_generators([seeds[i] for i in idx])
        z0 = initial_noise(shape, gens).to(device) if start_latents is None else start_latents[idx]
        traj = sample_trajectory(lambda z, s: guided_velocity(policy, z, s, c, u, guidance_scale,
                                                              guidance_interval=guidance_interval), z0, sigmas[first:],
                                 mode=mode, method=method, eta=eta, sde_window=window, train_steps=steps_to_train,
                                 generator=gens, progress=progress, log_prob=log_prob)
        if first:  # recorded under their full-schedule index
            traj.steps = [dataclasses.replace(r, index=r.index + first) for r in traj.steps]
        finals.append(traj.latents)
        chunks.append(traj.steps)
        if on_chunk is not None:
            on_chunk(idx, traj.latents)
    steps = []
    for j in range(len(chunks[0])):
        parts = [ch[j] for ch in chunks]
        steps.append(StepRecord(index=parts[0].index, sigma=torch.cat([p.sigma for p in parts]),
                                sigma_next=torch.cat([p.sigma_next for p in parts]),
                                latents=torch.cat([p.latents for p in parts]),
                                next_latents=torch.cat([p.next_latents for p in parts]),
                                log_prob=torch.cat([p.log_prob for p in parts])))
    return Rollouts(torch.cat(finals), steps, torch.tensor(prompt_index))


def step_log_prob(policy, record: StepRecord, rows: torch.Tensor, cond: Condition, uncond: Condition | None, *,
                  guidance_scale: float, method: str, eta: float, sample_index: torch.Tensor, log_prob: str = "exact",
                  cfg_grad: str = "full", guidance_interval=None):
    """Recompute a recorded step's log-prob (with grad) for samples ``sample_index`` whose prompts are
    ``rows``; same batch layout and CFG as the rollout, so an unchanged policy reproduces it exactly."""
    c = cond.select(rows)
    u = uncond.select(rows) if uncond is not None else None
    z = record.latents[sample_index]
    sigma, sigma_next = record.sigma[sample_index], record.sigma_next[sample_index]
    v = guided_velocity(policy, z, sigma, c, u, guidance_scale, cfg_grad, guidance_interval)
    return sde_step(v, z, sigma, sigma_next, method=method, eta=eta, prev_sample=record.next_latents[sample_index],
                    log_prob=log_prob)


@torch.no_grad()
def reference_mean(policy, dit, record: StepRecord, rows, cond, uncond, *, guidance_scale, method, eta, sample_index,
                   guidance_interval=None):
    """The reference policy's step mean: the same DiT with its LoRA adapter disabled (no model copy)."""
    c = cond.select(rows)
    u = uncond.select(rows) if uncond is not None else None
    z = record.latents[sample_index]
    dit.disable_adapters()
    try:
        v = guided_velocity(policy, z, record.sigma[sample_index], c, u, guidance_scale,
                            guidance_interval=guidance_interval)
    finally:
        dit.enable_adapters()
    mean, _ = sde_mean_std(v, z, record.sigma[sample_index], record.sigma_next[sample_index], method=method, eta=eta)
    return mean


# ----------------------------------------------------------------------------------------------------------------
# Forward-process training inputs (train.algorithm nft / awm): the rollouts' clean samples, re-noised
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class ForwardRecord:
    """One re-noising ``k`` of every local sample's final latent ``x0`` (all ``[N, ...]``, float32, detached).

    Attributes:
        index: ``k`` (0 .. ``train.forward_timesteps`` - 1).
        sigma: ``[N]`` noise levels.
        latents: ``[N, ...]`` ``z = (1 - sigma) x0 + sigma eps``, the velocity's input.
        target: ``[N, ...]`` the flow-matching target ``eps - x0``.
        old_velocity: ``[N, ...]`` the behaviour policy's velocity on ``latents`` (set by the trainer for NFT when
            the policy changes within an iteration; None: the trained velocity, detached, is the old one).
    """

    index: int
    sigma: torch.Tensor
    latents: torch.Tensor
    target: torch.Tensor
    old_velocity: torch.Tensor | None = None


def forward_records(x0: torch.Tensor, generators: list[torch.Generator], num_timesteps: int,
                    shift: float = 1.0) -> list[ForwardRecord]:
    """Re-noise each sample's clean latent ``x0[i]`` at ``num_timesteps`` noise levels (the flow-matching forward
    process, ``z = (1 - sigma) x0 + sigma eps``, ``v* = eps - x0``).

    Sample ``i`` draws from its own ``generators[i]`` (seeded per global sample: the same numbers whatever the
    process layout or batch, and after a resume), for each ``k`` in order: ``u ~ U(0, 1)``, then ``eps``. The
    noise level is ``sigma = shift u / (1 + (shift - 1) u)``, the sampler's schedule shift applied to a uniform
    time, so training covers the noise levels the sampler visits whatever its step count.
    """
    from viva_base.losses import add_noise

    x0 = x0.detach().float()
    sig = torch.empty(num_timesteps, len(generators))
    eps = torch.empty(num_timesteps, *x0.shape)
    for i, g in enumerate(generators):
        for k in range(num_timesteps):
            sig[k, i] = torch.rand((), generator=g)
            eps[k, i] = torch.randn(x0.shape[1:], generator=g, dtype=torch.float32)
    sig = shift * sig / (1 + (shift - 1) * sig)
    out = []
    for k in range(num_timesteps):
        s, e = sig[k].to(x0.device), eps[k].to(x0.device)
        out.append(ForwardRecord(index=k, sigma=s, latents=add_noise(x0, e, s), target=e - x0))
    return out


def forward_velocity(policy, record: ForwardRecord, rows: torch.Tensor, cond: Condition, uncond: Condition | None, *,
                     guidance_scale: float, sample_index: torch.Tensor, cfg_grad: str = "full",
                     dit=None, guidance_interval=None) -> torch.Tensor:
    """The policy's (CFG) velocity on re-noised samples ``sample_index`` (prompts ``rows``) of ``record``; with
    ``dit`` given, the reference policy's: the same DiT with its LoRA adapter disabled, no grad (no model copy).
    ``guidance_scale = 1`` is the conditional velocity alone (``train.cfg_free``: one forward, no uncond)."""
    c = cond.select(rows)
    u = uncond.select(rows) if uncond is not None else None
    z, sigma = record.latents[sample_index], record.sigma[sample_index]
    if dit is None:
        return guided_velocity(policy, z, sigma, c, u, guidance_scale, cfg_grad, guidance_interval)
    with torch.no_grad():
        dit.disable_adapters()
        try:
            return guided_velocity(policy, z, sigma, c, u, guidance_scale, guidance_interval=guidance_interval)
        finally:
            dit.enable_adapters()
