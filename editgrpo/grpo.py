"""RL math for Edit-GRPO: group advantages, clipped surrogate, KL to the reference policy, and the losses of the
forward-process algorithms (``train.algorithm``: ``grpo`` | ``nft`` | ``awm``).

Pure tensor functions; nothing here knows the model or the sampler. Equations follow VIVA (eq. 11: group
advantage, eq. 13: clipped surrogate) and Flow-GRPO (the KL between the Gaussian step policies); :func:`nft_loss`
follows DiffusionNFT (Zheng et al., arXiv 2509.16117) and :func:`awm_loss` Advantage Weighted Matching (Xue et
al., arXiv 2509.25050). docs/algorithms.md puts the three objectives side by side.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal

import torch

logger = logging.getLogger(__name__)

AdvantageScale = Literal["group", "global", "none"]
ADVANTAGE_SCALES: tuple[str, ...] = ("group", "global", "none")
KLType = Literal["exact", "flow_grpo"]
KL_TYPES: tuple[str, ...] = ("exact", "flow_grpo")
ALGORITHMS: tuple[str, ...] = ("grpo", "nft", "awm")   # train.algorithm
FORWARD_ALGORITHMS: tuple[str, ...] = ("nft", "awm")    # trained on the forward process (no log-probs)


@dataclass
class AdvantageOutput:
    """Result of :func:`group_advantages` (all ``[N]``, on the rewards' device).

    Attributes:
        advantages: float32 advantages; 0 for invalid samples and for degenerate groups.
        valid: bool, the reward is finite (a NaN/inf reward drops its sample from statistics and training).
        group_mean: float32 mean of the valid rewards of the sample's group (NaN if the group has none).
        group_std: float32 population std of the valid rewards of the sample's group (NaN if none).
        zero_variance: bool, the sample's group is degenerate (fewer than 2 valid rewards, or all equal):
            its advantages are exactly 0.
    """

    advantages: torch.Tensor
    valid: torch.Tensor
    group_mean: torch.Tensor
    group_std: torch.Tensor
    zero_variance: torch.Tensor


def group_advantages(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    scale: AdvantageScale = "group",
    eps: float = 1e-4,
    clip: float | None = None,
) -> AdvantageOutput:
    """Group-relative advantages (VIVA eq. 11)::

        A_i = (R_i - mean_{g(i)}) / (std + eps)

    where ``mean_g`` is the mean of the valid rewards of group ``g`` (the G rollouts of one prompt) and

    * ``scale="group"``: ``std = std_{g(i)}``, the std of the group's valid rewards (eq. 11);
    * ``scale="global"``: ``std`` over all valid rewards of the batch (Flow-GRPO's ``global_std``);
    * ``scale="none"``: ``std + eps`` replaced by 1 (only centering, as Dr. GRPO).

    Stds are **population** stds (``ddof = 0``, as Flow-GRPO's ``np.std``; trl uses the unbiased one), and
    ``eps = 1e-4`` as in Flow-GRPO. Statistics are computed in float64.

    Edge cases: a non-finite reward (a failed reward model returns NaN) is left out of its group's statistics
    and gets advantage 0 and ``valid = False``; a group whose valid rewards are all equal, or that has fewer
    than two valid rewards, gets advantages exactly 0 (never NaN, never ``rounding_error / eps``).
    ``clip`` (if set) clamps advantages to ``[-clip, clip]`` (Flow-GRPO's ``adv_clip_max``).

    Args:
        rewards: ``[N]`` rewards (any float dtype).
        group_ids: ``[N]`` integer ids, equal for samples of the same prompt (any values, not necessarily
            contiguous; must be unique across processes when gathered).
    """
    if scale not in ADVANTAGE_SCALES:
        raise ValueError(f"group_advantages: unknown scale {scale!r}; use one of {ADVANTAGE_SCALES}")
    if rewards.ndim != 1 or group_ids.shape != rewards.shape:
        raise ValueError(
            f"group_advantages: rewards and group_ids must both be [N], got {list(rewards.shape)} and "
            f"{list(group_ids.shape)}"
        )
    if group_ids.dtype.is_floating_point or group_ids.dtype == torch.bool:
        raise ValueError(f"group_advantages: group_ids must be an integer tensor, got {group_ids.dtype}")
    if clip is not None and not clip > 0:
        raise ValueError(f"group_advantages: clip must be > 0 or None, got {clip}")
    r = rewards.detach().to(torch.float64)
    valid = torch.isfinite(r)
    if r.numel() == 0:
        empty = r.to(torch.float32)
        return AdvantageOutput(empty, valid, empty, empty, valid)
    _, inverse = torch.unique(group_ids, return_inverse=True)
    num_groups = int(inverse.max()) + 1
    zeros = r.new_zeros(num_groups)
    r_valid = torch.where(valid, r, 0.0)
    count = zeros.index_add(0, inverse, valid.to(torch.float64))
    mean = zeros.index_add(0, inverse, r_valid) / count.clamp_min(1)
    dev = torch.where(valid, r - mean[inverse], 0.0)
    std = torch.sqrt(zeros.index_add(0, inverse, dev**2) / count.clamp_min(1))
    r_max = r.new_full((num_groups,), -torch.inf).scatter_reduce(0, inverse, torch.where(valid, r, -torch.inf), "amax")
    r_min = r.new_full((num_groups,), torch.inf).scatter_reduce(0, inverse, torch.where(valid, r, torch.inf), "amin")
    degenerate = (count < 2) | (r_max == r_min)

    if scale == "group":
        adv = dev / (std[inverse] + eps)
    elif scale == "global":
        n_valid = valid.sum().clamp_min(1)
        global_mean = r_valid.sum() / n_valid
        global_std = torch.sqrt((torch.where(valid, r - global_mean, 0.0) ** 2).sum() / n_valid)
        adv = dev / (global_std + eps)
    else:
        adv = dev
    zero = degenerate[inverse] | ~valid
    adv = torch.where(zero, 0.0, adv)
    if clip is not None:
        adv = adv.clamp(-clip, clip)
    no_valid = count == 0
    return AdvantageOutput(
        advantages=adv.to(torch.float32),
        valid=valid,
        group_mean=torch.where(no_valid, torch.nan, mean)[inverse].to(torch.float32),
        group_std=torch.where(no_valid, torch.nan, std)[inverse].to(torch.float32),
        zero_variance=degenerate[inverse],
    )


def component_advantages(
    components: dict[str, torch.Tensor],
    weights: dict[str, float],
    group_ids: torch.Tensor,
    *,
    scale: AdvantageScale = "group",
    eps: float = 1e-4,
    clip: float | None = None,
) -> AdvantageOutput:
    """Advantages normalised per reward component, then weighted (``train.reward_normalization: component``)::

        A_i = sum_k w_k A_i^(k),    A_i^(k) = (R_i^(k) - mean_{g(i)}^(k)) / (std^(k) + eps)

    i.e. eq. 11 applied to each component ``R^(k)`` separately (same ``scale`` and ``eps`` rules as
    :func:`group_advantages`) before eq. 7's weighted sum, instead of normalising the weighted total. The
    weights then say how much each reward's *ranking* of a group counts, whatever its units or spread: with
    the total, a component whose within-group spread is 10x larger (CLIP differences vs a pixel error)
    decides the ranking alone whatever its weight.

    Components with weight 0 are ignored. A sample is ``valid`` only if every weighted component is finite;
    a component that is constant within a group contributes 0 there. ``group_mean``/``group_std`` describe
    the weighted total (for logging); ``zero_variance`` marks groups where every weighted component is
    constant. ``clip`` clamps the summed advantage.
    """
    used = {k: float(w) for k, w in weights.items() if float(w) != 0.0}
    if not used:
        raise ValueError("component_advantages: every reward weight is 0; give at least one reward a weight")
    missing = sorted(set(used) - set(components))
    if missing:
        raise ValueError(f"component_advantages: no scores for weighted components {missing}")
    valid = torch.ones_like(group_ids, dtype=torch.bool)
    for k in used:
        valid &= torch.isfinite(components[k].detach())
    total = sum(w * components[k].detach().to(torch.float64) for k, w in used.items())
    total = torch.where(valid, total, torch.nan)
    adv = torch.zeros(group_ids.shape, dtype=torch.float64, device=group_ids.device)
    degenerate = torch.ones_like(valid)
    for k, w in used.items():
        part = group_advantages(torch.where(valid, components[k].detach().double(), torch.nan), group_ids,
                                scale=scale, eps=eps)
        adv = adv + w * part.advantages.double()
        degenerate &= part.zero_variance
    if clip is not None:
        if not clip > 0:
            raise ValueError(f"component_advantages: clip must be > 0 or None, got {clip}")
        adv = adv.clamp(-clip, clip)
    adv = torch.where(valid & ~degenerate, adv, 0.0)
    stats = group_advantages(total, group_ids, scale=scale, eps=eps)
    return AdvantageOutput(advantages=adv.to(torch.float32), valid=valid, group_mean=stats.group_mean,
                           group_std=stats.group_std, zero_variance=degenerate)


def gather_for_advantages(
    accelerator: Any | None, rewards: torch.Tensor, group_ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, slice]:
    """Gather ``rewards`` and ``group_ids`` (``[n]`` on each process) from all processes.

    Returns ``(all_rewards [N], all_group_ids [N], local)`` where ``local`` is the slice of this process's
    samples in the gathered batch (processes in rank order), so that a group split over processes gets its
    statistics from all its members::

        all_r, all_g, local = gather_for_advantages(accelerator, rewards, group_ids)
        advantages = group_advantages(all_r, all_g).advantages[local]

    Processes may hold different numbers of samples (tensors are padded for the collective, then unpadded).
    With ``accelerator=None`` or a single process it is the identity. ``accelerator`` is an
    ``accelerate.Accelerator`` (its ``gather`` and ``pad_across_processes`` are used).

    Every tensor is moved to ``accelerator.device`` before the collectives (NCCL's all-gather rejects CPU
    tensors; gloo accepts them, so CPU runs would not notice), and the results come back on ``rewards``'
    device.
    """
    n = rewards.shape[0]
    if group_ids.shape != rewards.shape:
        raise ValueError(
            f"gather_for_advantages: rewards {list(rewards.shape)} and group_ids {list(group_ids.shape)} differ"
        )
    if accelerator is None or accelerator.num_processes == 1:
        return rewards, group_ids, slice(0, n)
    home, device = rewards.device, accelerator.device
    sizes = accelerator.gather(torch.tensor([n], device=device)).cpu().tolist()
    width = max(sizes)
    padded_r = accelerator.gather(accelerator.pad_across_processes(rewards.to(device), dim=0)).to(home)
    padded_g = accelerator.gather(accelerator.pad_across_processes(group_ids.to(device), dim=0)).to(home)
    parts = [slice(p * width, p * width + size) for p, size in enumerate(sizes)]
    all_rewards = torch.cat([padded_r[s] for s in parts])
    all_group_ids = torch.cat([padded_g[s] for s in parts])
    start = sum(sizes[: accelerator.process_index])
    return all_rewards, all_group_ids, slice(start, start + n)


def _masked_mean(x: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    if valid is None:
        return x.mean()
    x = torch.where(valid, x, torch.zeros((), dtype=x.dtype, device=x.device))
    return x.sum() / valid.sum().clamp_min(1)


def clipped_surrogate_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    clip_range: float | tuple[float, float],
    *,
    valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO/GRPO clipped surrogate (VIVA eq. 13), to minimise::

        ratio = exp(logp - logp_old)
        loss  = mean_i max(-A_i * ratio_i, -A_i * clip(ratio_i, 1 - eps_low, 1 + eps_high))

    Args:
        log_prob: ``[B]`` log-probs under the current policy (with grad), e.g. ``sde_step(...).log_prob``.
        old_log_prob: ``[B]`` log-probs recorded at sampling time (treated as constants).
        advantages: ``[B]`` advantages (constants).
        clip_range: ``eps`` (symmetric) or ``(eps_low, eps_high)``.
        valid: optional ``[B]`` bool; the mean runs over valid samples only (invalid ones get zero gradient;
            with none valid the loss is 0 with zero gradient, so every process still runs backward).

    Returns:
        ``(loss, metrics)`` with detached scalar metrics over valid samples: ``clip_frac`` (fraction with the
        ratio outside ``[1 - eps_low, 1 + eps_high]``), ``approx_kl`` (``0.5 * mean((logp - logp_old)^2)``,
        the estimator Flow-GRPO logs), ``ratio_mean``.
    """
    if isinstance(clip_range, (tuple, list)):
        eps_low, eps_high = float(clip_range[0]), float(clip_range[1])
    else:
        eps_low = eps_high = float(clip_range)
    if not (0 < eps_low < 1 and eps_high > 0):
        raise ValueError(
            f"clipped_surrogate_loss: clip_range must give 0 < eps_low < 1 and eps_high > 0, got {clip_range}"
        )
    if not log_prob.shape == old_log_prob.shape == advantages.shape:
        raise ValueError(
            f"clipped_surrogate_loss: log_prob {list(log_prob.shape)}, old_log_prob {list(old_log_prob.shape)} "
            f"and advantages {list(advantages.shape)} must have the same shape"
        )
    log_ratio = log_prob.float() - old_log_prob.detach().float()
    if valid is not None:
        # where() rather than a product: a non-finite value of an invalid sample cannot reach the gradient.
        log_ratio = torch.where(valid, log_ratio, torch.zeros((), device=log_ratio.device))
    adv = advantages.detach().float()
    ratio = torch.exp(log_ratio)
    per_sample = torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, 1 - eps_low, 1 + eps_high))
    loss = _masked_mean(per_sample, valid)
    with torch.no_grad():
        clipped = ((ratio < 1 - eps_low) | (ratio > 1 + eps_high)).float()
        metrics = {
            "clip_frac": _masked_mean(clipped, valid),
            "approx_kl": 0.5 * _masked_mean(log_ratio**2, valid),
            "ratio_mean": _masked_mean(ratio, valid),
        }
    return loss, metrics


def gaussian_kl(mean: torch.Tensor, ref_mean: torch.Tensor, std: torch.Tensor | float) -> torch.Tensor:
    """``[B]`` KL( N(mean, std^2) || N(ref_mean, std^2) ) per element, averaged over non-batch elements::

        KL = mean_over_elements( (mean - ref_mean)^2 / (2 std^2) )

    The exact KL between the current and the reference policy's step Gaussians (same std: it depends on the
    sigmas only), averaged like ``sde_step``'s ``log_prob`` (per element, not summed). With the step's full
    std (``SDEStepOutput.std``) this is ``kl_type="exact"``; Flow-GRPO's scale is :func:`step_kl` with
    ``kl_type="flow_grpo"``. ``std`` is a float, ``[B]``, or ``[B, 1, ..., 1]``. Compute ``ref_mean`` under
    ``torch.no_grad()`` (adapter disabled).
    """
    mean = mean.float()
    ref_mean = ref_mean.float()
    std = torch.as_tensor(std, dtype=torch.float32, device=mean.device)
    if std.ndim == 1 and mean.ndim > 1:
        std = std.view(-1, *([1] * (mean.ndim - 1)))
    kl = (mean - ref_mean) ** 2 / (2 * std**2)
    return kl.reshape(kl.shape[0], -1).mean(dim=1)


def flow_grpo_std_dev(std: torch.Tensor, sigma: torch.Tensor | float, sigma_next: torch.Tensor | float,
                      method: str) -> torch.Tensor:
    """Flow-GRPO's ``std_dev_t``, the divisor of its KL: the step std without the Brownian increment's
    ``sqrt(|dt|)``::

        flow_sde:  std_dev_t = eta sqrt(sigma / (1 - sigma)) = std / sqrt(sigma - sigma_next)   (VIVA eq. 14)
        cps:       std_dev_t = sigma_next sin(eta pi / 2)    = std                              (no dt in CPS)

    ``std`` is the step's full std (``SDEStepOutput.std``, ``[B, 1, ..., 1]`` or a float); ``sigma`` and
    ``sigma_next`` floats or ``[B]``. Returns a float32 tensor shaped like ``std``.
    """
    std = torch.as_tensor(std, dtype=torch.float32)
    if method == "cps":
        return std
    if method != "flow_sde":
        raise ValueError(f"flow_grpo_std_dev: unknown method {method!r}; use flow_sde or cps")
    dt = (torch.as_tensor(sigma, dtype=torch.float32, device=std.device)
          - torch.as_tensor(sigma_next, dtype=torch.float32, device=std.device))
    if dt.ndim == 1 and std.ndim > 1:
        dt = dt.view(-1, *([1] * (std.ndim - 1)))
    return std / torch.sqrt(dt)


def step_kl(mean: torch.Tensor, ref_mean: torch.Tensor, std: torch.Tensor | float, *, sigma, sigma_next,
            method: str, kl_type: KLType = "exact") -> torch.Tensor:
    """``[B]`` KL term of one trained step (``train.kl_type``), averaged over non-batch elements::

        exact:     mean( (mu - mu_ref)^2 ) / (2 std^2)           the true KL of the two step Gaussians
        flow_grpo: mean( (mu - mu_ref)^2 ) / (2 std_dev_t^2)     Flow-GRPO's term (:func:`flow_grpo_std_dev`)

    For Flow-SDE ``std^2 = std_dev_t^2 |dt|``, so ``exact = flow_grpo / |dt|`` (x13 to x100 on the 16-step,
    shift-7 schedule of recipes/viva.yaml); for CPS the two are equal. ``exact`` is the default: it is the KL
    of the distributions the policy samples from, so the per-step KLs add up to the trajectory's KL whatever
    the step sizes, and ``beta`` keeps its meaning when ``num_steps`` or the shift change. Flow-GRPO's
    ``beta`` values (0.04, 0.01) apply to ``flow_grpo`` only.
    """
    if kl_type == "exact":
        return gaussian_kl(mean, ref_mean, std)
    if kl_type == "flow_grpo":
        return gaussian_kl(mean, ref_mean, flow_grpo_std_dev(std, sigma, sigma_next, method).to(mean.device))
    raise ValueError(f"step_kl: unknown kl_type {kl_type!r}; use one of {KL_TYPES}")


def _with_kl(loss: torch.Tensor, metrics: dict, kl: torch.Tensor | None, beta: float,
             valid: torch.Tensor | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``loss + beta * mean_valid(kl)`` (``kl`` logged when given) and the ``loss`` metric."""
    if kl is not None:
        kl_mean = _masked_mean(kl.float(), valid)
        metrics["kl"] = kl_mean.detach()
        if beta > 0:
            loss = loss + beta * kl_mean
    metrics["loss"] = loss.detach()
    return loss, metrics


def policy_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    clip_range: float | tuple[float, float],
    *,
    kl: torch.Tensor | None = None,
    beta: float = 0.0,
    valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Edit-GRPO objective to minimise: clipped surrogate (eq. 13) ``+ beta * mean(kl)`` over valid samples.

    ``kl`` is ``[B]`` from :func:`step_kl` (required when ``beta > 0``). Metrics are those of
    :func:`clipped_surrogate_loss` plus ``policy_loss`` (the surrogate), ``kl`` (when given) and ``loss``.
    """
    if beta < 0:
        raise ValueError(f"policy_loss: beta must be >= 0, got {beta}")
    if beta > 0 and kl is None:
        raise ValueError("policy_loss: beta > 0 needs kl (gaussian_kl of the policy and reference step means)")
    surrogate, metrics = clipped_surrogate_loss(log_prob, old_log_prob, advantages, clip_range, valid=valid)
    loss = surrogate
    metrics["policy_loss"] = surrogate.detach()
    return _with_kl(loss, metrics, kl, beta, valid)


# ----------------------------------------------------------------------------------------------------------------
# Forward-process algorithms: trained on the rollouts' clean samples x0, re-noised (docs/algorithms.md)
# ----------------------------------------------------------------------------------------------------------------


def _per_elem_mean(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1).mean(dim=1)


def velocity_kl(v: torch.Tensor, v_ref: torch.Tensor) -> torch.Tensor:
    """``[B]`` velocity-space KL surrogate to the reference policy, averaged over non-batch elements::

        kl_i = mean_elements( (v_theta - v_ref)^2 )

    For two flow policies sharing the forward process this is (up to the time weighting) the KL of their
    path measures (DiffusionNFT's and AWM's regulariser; Flow-Factory's ``v-based`` KL). ``v_ref`` is the
    adapter-disabled DiT's velocity, computed under ``torch.no_grad()``.
    """
    return _per_elem_mean((v.float() - v_ref.detach().float()) ** 2)


def nft_optimality(advantages: torch.Tensor, adv_max: float) -> torch.Tensor:
    """DiffusionNFT's optimality probability ``r in [0, 1]`` of each sample from its (clipped) advantage::

        r = clamp( A / (2 A_max) + 1/2, 0, 1 )

    ``A_max`` is the advantage clip (``train.advantage_clip``): ``A = 0`` gives ``r = 1/2`` (neither positive nor
    negative), ``A = +A_max`` a pure positive sample, ``A = -A_max`` a pure negative one.
    """
    if not adv_max > 0:
        raise ValueError(f"nft_optimality: adv_max must be > 0, got {adv_max}")
    return torch.clamp(advantages.detach().float() / (2.0 * adv_max) + 0.5, 0.0, 1.0)


def nft_loss(
    v: torch.Tensor,
    v_old: torch.Tensor,
    v_target: torch.Tensor,
    sigma: torch.Tensor,
    advantages: torch.Tensor,
    *,
    nft_beta: float,
    adv_max: float,
    kl: torch.Tensor | None = None,
    beta: float = 0.0,
    valid: torch.Tensor | None = None,
    weight_floor: float = 1e-5,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DiffusionNFT's negative-aware flow-matching objective (Zheng et al., arXiv 2509.16117, Sec. 3: the implicit
    positive and negative policies; Sec. 4: optimality probability and adaptive loss weighting), to minimise.

    On a rollout's clean sample ``x0`` re-noised at ``sigma`` (``z = (1 - sigma) x0 + sigma eps``, target velocity
    ``v* = eps - x0``), with the behaviour (rollout) policy's velocity ``v_old`` (no grad) and the trained one
    ``v = v_theta``::

        v+ = (1 - b) v_old + b v             implicit positive policy   (b = nft_beta)
        v- = (1 + b) v_old - b v             implicit negative policy   (the reflection of v+ about v_old)
        e+- = x0_hat(v+-) - x0 = sigma (v* - v+-)        (x0_hat(u) = z - sigma u: the clean-sample regression)
        w+- = sg( mean|e+-| ) clamped to >= weight_floor (adaptive weighting: each term self-normalised)
        L_i = (A_max / b) * [ r_i mean(e+^2) / w+ + (1 - r_i) mean(e-^2) / w- ]
        loss = mean_valid(L_i) + beta * mean_valid(kl_i)

    with ``r_i`` from :func:`nft_optimality`. High-reward samples (``r > 1/2``) pull ``v+`` towards them,
    low-reward ones push ``v-`` towards them, i.e. ``v`` away. The ``A_max / b`` factor (as the public code) makes
    the gradient at ``v = v_old`` equal ``A_i`` times the (self-normalised) flow-matching gradient: with
    ``w+ = w- = w`` there, ``dL_i/dv = 2 A_i sigma^2 (v_old - v*) / w`` (per element, before the mean), for any ``b``.

    Args:
        v: ``[B, ...]`` the trained policy's velocity (with grad).
        v_old: ``[B, ...]`` the behaviour policy's velocity on the same input (treated as a constant).
        v_target: ``[B, ...]`` ``eps - x0``.
        sigma: ``[B]`` noise levels of the re-noised inputs.
        advantages: ``[B]`` advantages (constants), clipped to ``[-A_max, A_max]`` by :func:`nft_optimality`.
        nft_beta: ``b > 0``, the step size of the implicit policies (``train.nft_beta``).
        adv_max: ``A_max > 0`` (``train.advantage_clip``).
        kl: optional ``[B]`` from :func:`velocity_kl` (required when ``beta > 0``).
        valid: optional ``[B]`` bool; means over valid samples only (as :func:`clipped_surrogate_loss`).

    Returns ``(loss, metrics)``: ``policy_loss`` (the NFT term), ``kl`` (when given), ``loss``, ``r_mean``, and
    ``old_deviate`` = ``mean((v - v_old)^2)`` (how far the trained policy has left the behaviour one).
    """
    if not nft_beta > 0:
        raise ValueError(f"nft_loss: nft_beta must be > 0, got {nft_beta}")
    if beta < 0 or (beta > 0 and kl is None):
        raise ValueError(f"nft_loss: beta must be >= 0 and beta > 0 needs kl, got beta={beta}")
    if not v.shape == v_old.shape == v_target.shape:
        raise ValueError(f"nft_loss: v {list(v.shape)}, v_old {list(v_old.shape)} and v_target "
                         f"{list(v_target.shape)} must have the same shape")
    v, v_old, v_target = v.float(), v_old.detach().float(), v_target.detach().float()
    s = sigma.detach().float().reshape(-1, *([1] * (v.ndim - 1)))
    r = nft_optimality(advantages, adv_max)
    v_pos = (1.0 - nft_beta) * v_old + nft_beta * v
    v_neg = (1.0 + nft_beta) * v_old - nft_beta * v
    terms = []
    for u in (v_pos, v_neg):
        err = s * (v_target - u)
        with torch.no_grad():
            w = _per_elem_mean(err.abs()).clamp_min(weight_floor)
        terms.append(_per_elem_mean(err ** 2) / w)
    per_sample = (adv_max / nft_beta) * (r * terms[0] + (1.0 - r) * terms[1])
    if valid is not None:
        per_sample = torch.where(valid, per_sample, torch.zeros((), device=per_sample.device))
    nft = _masked_mean(per_sample, valid)
    loss = nft
    with torch.no_grad():
        metrics = {"policy_loss": nft.detach(), "r_mean": _masked_mean(r, valid),
                   "old_deviate": _masked_mean(_per_elem_mean((v - v_old) ** 2), valid)}
    return _with_kl(loss, metrics, kl, beta, valid)


def awm_loss(
    v: torch.Tensor,
    v_target: torch.Tensor,
    advantages: torch.Tensor,
    *,
    kl: torch.Tensor | None = None,
    beta: float = 0.0,
    valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Advantage Weighted Matching (Xue et al., arXiv 2509.25050): the pretraining flow-matching loss on the
    rollouts' re-noised clean samples, weighted per sample by its advantage, to minimise::

        l_i  = mean_elements( (v_theta(z_i, sigma_i) - (eps_i - x0_i))^2 )      (the flow-matching / DSM loss)
        loss = mean_valid( A_i l_i ) + beta * mean_valid( kl_i )

    A positive advantage lowers the sample's matching error (raises its likelihood under the flow, whose ELBO
    is the time-weighted matching loss), a negative one raises it: the policy gradient with the score-matching
    loss in place of the log-likelihood, i.e. the same objective as pretraining with the data replaced by
    advantage-weighted rollouts. ``kl`` is :func:`velocity_kl` to the reference (adapter-disabled) DiT; AWM
    needs it (or few steps per rollout) against collapse, since ``-A l`` is unbounded below for ``A < 0``.
    Uniform time weighting (Flow-Factory's ``Uniform``).

    Returns ``(loss, metrics)``: ``policy_loss`` (the weighted term), ``fm_loss`` (the unweighted mean of ``l``),
    ``kl`` (when given) and ``loss``.
    """
    if beta < 0 or (beta > 0 and kl is None):
        raise ValueError(f"awm_loss: beta must be >= 0 and beta > 0 needs kl, got beta={beta}")
    if v.shape != v_target.shape:
        raise ValueError(f"awm_loss: v {list(v.shape)} and v_target {list(v_target.shape)} differ")
    fm = _per_elem_mean((v.float() - v_target.detach().float()) ** 2)
    per_sample = advantages.detach().float() * fm
    if valid is not None:
        per_sample = torch.where(valid, per_sample, torch.zeros((), device=per_sample.device))
    weighted = _masked_mean(per_sample, valid)
    loss = weighted
    metrics = {"policy_loss": weighted.detach(), "fm_loss": _masked_mean(fm.detach(), valid)}
    return _with_kl(loss, metrics, kl, beta, valid)
