"""Losses of the VIVA SFT stage (pure functions)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def flow_matching_target(noise: torch.Tensor, z_data: torch.Tensor) -> torch.Tensor:
    """Rectified-flow velocity target ``v = noise - z_data`` (``z_sigma = (1 - sigma) z_data + sigma noise``)."""
    return noise - z_data


def add_noise(z_data: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """``z_sigma = (1 - sigma) z_data + sigma noise`` with ``sigma`` [B] broadcast over the other dims."""
    s = sigma.reshape(-1, *([1] * (z_data.ndim - 1))).to(z_data.dtype)
    return (1 - s) * z_data + s * noise


def sample_sigmas(batch: int, *, shift: float = 1.0, method: str = "logit_normal", generator=None,
                  device=None) -> torch.Tensor:
    """Training noise levels: ``u ~ U(0,1)`` or ``sigmoid(N(0,1))`` (SD3's logit-normal), then the
    schedule shift ``sigma = shift u / (1 + (shift - 1) u)`` (the same map diffusers' scheduler applies)."""
    if method == "uniform":
        u = torch.rand(batch, generator=generator)
    elif method == "logit_normal":
        u = torch.sigmoid(torch.randn(batch, generator=generator))
    else:
        raise ValueError(f"unknown timestep sampling '{method}' (use 'uniform' or 'logit_normal')")
    sigma = shift * u / (1 + (shift - 1) * u)
    return sigma.to(device) if device is not None else sigma


def mask_to_latent(mask: torch.Tensor, latent_shape: tuple[int, int, int], temporal_ratio: int = 1) -> torch.Tensor:
    """Resize a pixel edit mask ``(B, F, 1, H, W)`` to the latent grid ``(B, 1, f, h, w)``.

    A latent cell counts as edited if any pixel it covers changed (max pooling). With a causal video
    VAE (``F = r (f - 1) + 1``: the first frame alone, then groups of ``r``), frames are grouped the
    same way; otherwise frames are pooled into ``f`` even bins.
    """
    b, n, _, h, w = mask.shape
    f, lh, lw = latent_shape
    m = mask.float().permute(0, 2, 1, 3, 4)  # B, 1, F, H, W
    if temporal_ratio > 1 and n == temporal_ratio * (f - 1) + 1:
        first = m[:, :, :1]
        rest = m[:, :, 1:].reshape(b, 1, f - 1, temporal_ratio, h, w).amax(dim=3) if f > 1 else m[:, :, :0]
        m = torch.cat([first, rest], dim=2)
    return F.adaptive_max_pool3d(m, (f, lh, lw))


MASK_NORMALIZATIONS = ("none", "area", "balanced")  # masked_flow_matching_loss(normalization=...)


def masked_flow_matching_loss(v_pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None,
                              w_m: float, sample_weight: torch.Tensor | None = None,
                              normalization: str = "none") -> torch.Tensor:
    """VIVA eq. 3: ``L = mean[(1 + w_m M) * ||v_pred - (noise - z_tgt)||^2]``.

    ``mask`` (B, 1, f, h, w) in {0, 1} on the latent grid (broadcast over channels), or None (no mask:
    the plain flow-matching loss). ``sample_weight`` (B,) multiplies each sample's terms (a noise-level
    weighting, :func:`sigma_loss_weight`).

    ``normalization="none"``: eq. 3 as written, the mean over every element of every sample, so a sample's edit
    term grows with the edit's area (a background change covering 75% of a toy frame outweighs an object edit
    covering 5% by ~14x). ``"area"``: per sample ``mean_{M=0} sq + (1 + w_m) mean_{M=1} sq`` (a sample without
    edited elements keeps only the first term), then the mean over samples: every sample's edit counts alike
    whatever its size, and the ratio of edit to preservation terms is ``1 + w_m`` for every sample.
    ``"balanced"``: eq. 3's budget, shared out evenly. With ``a_i`` the edited fraction of sample ``i`` and
    ``a = mean_i a_i`` over the batch, per sample ``(1 - a) mean_{M=0} sq + (1 + w_m) a mean_{M=1} sq``, then the
    mean over samples: the batch's total edit and preservation weights are eq. 3's (``(1 + w_m) sum_i a_i`` and
    ``sum_i (1 - a_i)`` elements' worth), but every sample's edit gets the same share, so a background change no
    longer outweighs an object edit ~14x, and (unlike ``"area"``) small edits are not weighted far above the
    preservation term.
    """
    if normalization not in MASK_NORMALIZATIONS:
        raise ValueError(f"unknown mask normalization {normalization!r} (use one of {', '.join(MASK_NORMALIZATIONS)})")
    sq = (v_pred.float() - target.float()) ** 2
    if normalization in ("area", "balanced") and mask is not None:
        m = mask.float().expand_as(sq).reshape(sq.shape[0], -1)
        flat = sq.reshape(sq.shape[0], -1)
        n_in = m.sum(1)
        n_out = m.shape[1] - n_in
        out_term = ((1 - m) * flat).sum(1) / n_out.clamp(min=1)
        in_term = (m * flat).sum(1) / n_in.clamp(min=1)
        if normalization == "area":
            per_sample = out_term + (1 + w_m) * in_term
        else:
            a = (n_in / m.shape[1]).mean()
            per_sample = (1 - a) * out_term + (1 + w_m) * a * in_term
        if sample_weight is not None:
            per_sample = per_sample * sample_weight.float()
        return per_sample.mean()
    if mask is not None and w_m != 0:
        sq = (1 + w_m * mask.float()) * sq
    if sample_weight is not None:
        sq = sq * sample_weight.float().reshape(-1, *([1] * (sq.ndim - 1)))
    return sq.mean()


def sigma_loss_weight(sigma: torch.Tensor, scheme: str, cap: float = 25.0) -> torch.Tensor | None:
    """Per-sample weight of the velocity loss at noise level ``sigma`` (B,).

    ``"none"``: 1 (eq. 3 as written). ``"x0"``: ``sigma^2``. Since ``x0 = z_sigma - sigma v``, the velocity error
    times ``sigma`` is the clean-latent error, so ``sigma^2 ||v - v*||^2 = ||x0_pred - x0||^2``: every noise level
    counts alike, instead of the low-noise levels (where ``z_sigma`` already shows the answer) dominating by
    ``1 / sigma^2``. ``"capped"``: ``min(1, cap sigma^2)``, i.e. the velocity loss's clean-latent weight
    ``1 / sigma^2`` capped at ``cap`` (the truncation of Min-SNR weighting, Hang et al. 2023, eq. 6, applied to
    the flow-matching loss): unchanged above ``sigma = cap^-1/2``, no longer unbounded below it (a uniform sigma
    draw makes ``E[1 / sigma^2]`` infinite: single samples near 0 then set the batch's gradient). Returns None
    for ``"none"``.
    """
    if scheme == "none":
        return None
    if scheme == "x0":
        return sigma.float() ** 2
    if scheme == "capped":
        if not cap > 0:
            raise ValueError(f"the loss weight cap must be > 0, got {cap}")
        return (cap * sigma.float() ** 2).clamp(max=1.0)
    raise ValueError(f"unknown loss weighting {scheme!r} (use 'none', 'x0' or 'capped')")
