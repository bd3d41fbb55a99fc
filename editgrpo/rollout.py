"""Rollouts: G samples per prompt from an edit policy, with CFG on the instruction, batched.

Conditions are built once per prompt (``policy.encode_condition``) and indexed per sample. Every sample
draws its initial noise and its SDE noise from its own generator seeded by ``(seed, iteration, sample's
global index)``, so a sample is the same whatever process or batch it lands in (2 processes reproduce
1 process), and a resumed run redraws exactly what it would have drawn.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from viva_base.policy import Condition

from .sampling import StepRecord, cfg_velocity, sample_trajectory, sde_mean_std, sde_step


def guided_velocity(policy, latents: torch.Tensor, sigma: torch.Tensor, cond: Condition, uncond: Condition | None,
                    guidance_scale: float, cfg_grad: str = "full") -> torch.Tensor:
    """CFG velocity ``v_u + s (v_c - v_u)`` with ONE forward over ``[cond; uncond]`` (float32 out); ``cfg_grad``
    says whether the gradient flows through the unconditional branch too (``cfg_velocity``)."""
    if uncond is None or guidance_scale == 1.0:
        return policy.velocity(latents, sigma, cond)
    both = Condition.cat([cond, uncond])
    v = policy.velocity(torch.cat([latents, latents]), torch.cat([sigma, sigma]), both)
    v_cond, v_uncond = v.chunk(2)
    return cfg_velocity(v_cond, v_uncond, guidance_scale, cfg_grad)


def sample_generators(seeds: list[int]) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


def initial_noise(shape: tuple[int, ...], generators: list[torch.Generator]) -> torch.Tensor:
    """One float32 standard-normal latent per generator (drawn before that sample's SDE noise)."""
    return torch.cat([torch.randn((1, *shape), generator=g, dtype=torch.float32) for g in generators])


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
            on_chunk=None) -> Rollouts:
    """Sample ``len(seeds)`` edits; sample ``i`` is conditioned on prompt ``prompt_index[i]`` (rows of
    ``cond``/``uncond``), in forwards of ``batch_size`` samples (cond and uncond in one forward).
    ``on_chunk(indices, latents)``, if given, receives each finished chunk's final latents as soon as it is
    sampled (the trainer decodes and scores it meanwhile: editgrpo/scoring.py)."""
    n = len(seeds)
    batch_size = batch_size or n
    device = policy.device
    shape = policy.latent_shape(cond)
    finals, chunks = [], []
    for start in range(0, n, batch_size):
        idx = list(range(start, min(n, start + batch_size)))
        rows = torch.tensor([prompt_index[i] for i in idx])
        c = cond.select(rows)
        u = uncond.select(rows) if uncond is not None else None
        gens = sample_generators([seeds[i] for i in idx])
        z0 = initial_noise(shape, gens).to(device)
        traj = sample_trajectory(lambda z, s: guided_velocity(policy, z, s, c, u, guidance_scale), z0, sigmas,
                                 mode=mode, method=method, eta=eta, sde_window=sde_window, train_steps=train_steps,
                                 generator=gens, progress=progress, log_prob=log_prob)
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
                  cfg_grad: str = "full"):
    """Recompute a recorded step's log-prob (with grad) for samples ``sample_index`` whose prompts are
    ``rows``; same batch layout and CFG as the rollout, so an unchanged policy reproduces it exactly."""
    c = cond.select(rows)
    u = uncond.select(rows) if uncond is not None else None
    z = record.latents[sample_index]
    sigma, sigma_next = record.sigma[sample_index], record.sigma_next[sample_index]
    v = guided_velocity(policy, z, sigma, c, u, guidance_scale, cfg_grad)
    return sde_step(v, z, sigma, sigma_next, method=method, eta=eta, prev_sample=record.next_latents[sample_index],
                    log_prob=log_prob)


@torch.no_grad()
def reference_mean(policy, dit, record: StepRecord, rows, cond, uncond, *, guidance_scale, method, eta, sample_index):
    """The reference policy's step mean: the same DiT with its LoRA adapter disabled (no model copy)."""
    c = cond.select(rows)
    u = uncond.select(rows) if uncond is not None else None
    z = record.latents[sample_index]
    dit.disable_adapters()
    try:
        v = guided_velocity(policy, z, record.sigma[sample_index], c, u, guidance_scale)
    finally:
        dit.enable_adapters()
    mean, _ = sde_mean_std(v, z, record.sigma[sample_index], record.sigma_next[sample_index], method=method, eta=eta)
    return mean
