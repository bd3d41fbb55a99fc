"""Oracle metrics for the toy world, where the true target video and the exact edit mask are known.

Pure torch functions, free of model code (re-exported by ``benchmarks.toybench``): the evaluation loop edits the held-out prompts of
``eval.jsonl`` (see :mod:`viva_base.data.toyworld.build`), scores them with the proxy rewards, and
passes the videos here, so that the proxy rewards and the oracle can be read side by side (a proxy that
rises while the oracle falls is reward hacking).

Notation, per sample: edited video ``E``, source ``S``, true target ``T``, all ``(F, 3, H, W)`` in [0, 1];
edit mask ``M`` in {0, 1}, broadcast over the 3 channels; sums run over frames, channels and pixels.

* instruction-following error (inside the edit region, against the target)::

      if_error = sum(M |E - T|) / sum(M)

* structure-preservation error (outside it, against the source)::

      sp_error = sum((1 - M) |E - S|) / sum(1 - M)

* combined oracle score, higher is better, in [0, 1] (1 = the exact target)::

      oracle = 1 - (if_error + sp_error) / 2

Errors are mean absolute errors (L1) per channel value, in the units of the pixels (1.0 = black vs
white), so they read directly as "average colour error". A mean over an empty region is defined as 0:
when nothing must change (empty mask) there is nothing to get wrong inside, and when everything must
change there is nothing to preserve. Every toy edit changes at least one pixel, so ``if_error`` is
always defined on toy data.

Also returned: ``if_identity = sum(M |S - T|) / sum(M)``, the inside error of not editing at all (a per
sample baseline), ``if_progress = 1 - if_error / if_identity`` (1: exact, 0: no better than copying the
source, < 0: worse; NaN where ``if_identity = 0``), and ``full_error = mean |E - T|`` over all pixels.
"""
from __future__ import annotations

import math

import torch


def _check_videos(edited: torch.Tensor, source: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> None:
    if edited.ndim != 5 or edited.shape[2] != 3:
        raise ValueError(f"edited must be (B, F, 3, H, W), got {tuple(edited.shape)}; add a batch dim with [None]")
    for name, t in (("source", source), ("target", target)):
        if t.shape != edited.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, edited {tuple(edited.shape)}; they must match")
    b, f, _, h, w = edited.shape
    if mask.ndim != 5 or mask.shape[2] not in (1, 3) or (mask.shape[0], mask.shape[1], *mask.shape[3:]) != (b, f, h, w):
        raise ValueError(f"mask must be (B, F, 1, H, W) matching the videos {tuple(edited.shape)}, got {tuple(mask.shape)}")


def masked_mean_abs(a: torch.Tensor, b: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``sum(w |a - b|) / sum(w)`` per sample over all non-batch dims (0 where ``sum(w) = 0``);
    ``weight`` broadcasts against ``a``."""
    weight = weight.expand_as(a)
    num = (weight * (a - b).abs()).flatten(1).sum(1)
    den = weight.flatten(1).sum(1)
    return torch.where(den > 0, num / den.clamp_min(1e-12), torch.zeros_like(num))


def oracle_scores(edited: torch.Tensor, source: torch.Tensor, target: torch.Tensor,
                  mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Oracle metrics (module docstring) of ``edited`` ``(B, F, 3, H, W)`` against ``source`` and ``target``
    with the edit ``mask`` ``(B, F, 1, H, W)`` (values > 0.5 count as inside; 3 channels: any channel).

    Returns ``[B]`` float64 tensors: ``if_error``, ``sp_error``, ``oracle``, ``if_identity``, ``if_progress``,
    ``full_error``.
    """
    _check_videos(edited, source, target, mask)
    e, s, t = edited.double(), source.double(), target.double()
    m = (mask.double() > 0.5).amax(dim=2, keepdim=True).double()
    if_error = masked_mean_abs(e, t, m)
    sp_error = masked_mean_abs(e, s, 1 - m)
    if_identity = masked_mean_abs(s, t, m)
    if_progress = torch.where(if_identity > 0, 1 - if_error / if_identity.clamp_min(1e-12),
                              torch.full_like(if_error, math.nan))
    return {
        "if_error": if_error,
        "sp_error": sp_error,
        "oracle": 1 - 0.5 * (if_error + sp_error),
        "if_identity": if_identity,
        "if_progress": if_progress,
        "full_error": (e - t).abs().flatten(1).mean(1),
    }


def best_oracle_scores(edited: torch.Tensor, source: torch.Tensor,
                       truths: list[list[tuple[torch.Tensor, torch.Tensor]]]) -> dict[str, torch.Tensor]:
    """Oracle metrics against the best of several correct edits: an open instruction ("add a red square", no place
    given; :mod:`.edits`, "Open edits") has one ``(target, mask)`` per correct edit, and an edit is as good as its
    nearest correct one::

        k*_b = argmax_k oracle(E_b; S_b, T_bk, M_bk),   metrics_b = metrics(E_b; S_b, T_bk*, M_bk*)

    ``truths[b]`` lists sample ``b``'s ``(target (F, 3, H, W), mask (F, 1, H, W))`` pairs (one pair: the plain
    :func:`oracle_scores`). Returns the keys of :func:`oracle_scores` plus ``alternative``, the chosen index ``k*``
    (ties: the lowest)."""
    if len(truths) != edited.shape[0]:
        raise ValueError(f"best_oracle_scores: {len(truths)} truth lists for {edited.shape[0]} edited videos")
    for b, options in enumerate(truths):
        if not options:
            raise ValueError(f"best_oracle_scores: sample {b} has no correct edit")
    owner = torch.tensor([b for b, options in enumerate(truths) for _ in options])  # one row per (sample, option)
    s = oracle_scores(edited[owner], source[owner], torch.stack([t for o in truths for t, _ in o]).to(edited),
                      torch.stack([m for o in truths for _, m in o]).to(edited))
    starts = torch.tensor([0] + [len(o) for o in truths[:-1]]).cumsum(0)
    best = torch.stack([starts[b] + torch.argmax(s["oracle"][starts[b]:starts[b] + len(o)])  # first maximum
                        for b, o in enumerate(truths)])
    return {**{k: v[best] for k, v in s.items()}, "alternative": (best - starts).double()}


def bootstrap_ci(deltas: torch.Tensor | list[float], n: int = 2000, seed: int = 0,
                 alpha: float = 0.05) -> tuple[float, float, float]:
    """Percentile bootstrap of the mean of paired differences ``deltas`` (e.g. oracle after GRPO minus
    before, per prompt): resample the ``N`` values with replacement ``n`` times, take each resample's
    mean, and return ``(mean, lo, hi)`` with ``lo``/``hi`` the ``alpha/2`` and ``1 - alpha/2`` quantiles of
    those means. Deterministic given ``seed``. An interval that excludes 0 marks a significant change."""
    d = torch.as_tensor(deltas, dtype=torch.float64).flatten()
    if d.numel() == 0:
        raise ValueError("bootstrap_ci needs at least one difference")
    if not torch.isfinite(d).all():
        raise ValueError("bootstrap_ci got NaN/inf differences; drop the failed samples first")
    if not 0 < alpha < 1 or n < 1:
        raise ValueError(f"bootstrap_ci needs 0 < alpha < 1 and n >= 1, got alpha={alpha}, n={n}")
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, d.numel(), (n, d.numel()), generator=gen)
    means = d[idx].mean(1)
    lo, hi = torch.quantile(means, torch.tensor([alpha / 2, 1 - alpha / 2], dtype=torch.float64)).tolist()
    return float(d.mean()), float(lo), float(hi)


def average_ranks(x: torch.Tensor) -> torch.Tensor:
    """1-based ranks of a 1-D tensor, ties sharing their average rank (the ranks Spearman's rho uses)."""
    uniq, inverse, counts = torch.unique(x, sorted=True, return_inverse=True, return_counts=True)
    last = torch.cumsum(counts, 0).double()
    avg = last - (counts.double() - 1) / 2
    return avg[inverse]


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman's rank correlation ``rho = pearson(rank(a), rank(b))`` (average ranks for ties): how well a
    proxy reward orders the samples as the oracle does. NaN when either input is constant."""
    a = torch.as_tensor(a, dtype=torch.float64).flatten()
    b = torch.as_tensor(b, dtype=torch.float64).flatten()
    if a.numel() != b.numel() or a.numel() < 2:
        raise ValueError(f"spearman needs two equally long inputs of >= 2 values, got {a.numel()} and {b.numel()}")
    ra, rb = average_ranks(a), average_ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = math.sqrt(float((ra * ra).sum()) * float((rb * rb).sum()))
    return float((ra * rb).sum()) / den if den > 0 else math.nan


def operation_regions(scene, ops) -> list[torch.Tensor]:
    """Per operation ``k`` of a compound edit, the ``(F, 1, H, W)`` region in {0, 1} where it acts: the pixels it
    changes in the scene the operations before it left (``render(apply(ops[:k]))`` vs ``render(apply(ops[:k+1]))``),
    among those the whole edit changes (the mask ``M``), so that each region is scored against the final target."""
    from .edits import apply_op
    from .render import changed_pixels, render

    frames = [render(scene)]
    for op in ops:
        scene = apply_op(scene, op)
        frames.append(render(scene))
    whole = changed_pixels(frames[0], frames[-1])
    return [torch.from_numpy(changed_pixels(frames[k], frames[k + 1]) & whole).float()[:, None]
            for k in range(len(ops))]


def record_operation_regions(rec: dict) -> list[torch.Tensor] | None:
    """:func:`operation_regions` of a toy manifest record with two or more operations and one correct edit (as
    :func:`record_truths` reads its ``scene`` and ``ops``); None for any other record (a simple edit, an open
    instruction, a manifest without scenes)."""
    ops = rec.get("ops") or []
    if not rec.get("scene") or len(ops) < 2 or any(o.get("free") for o in ops):
        return None
    from .edits import op_from_json
    from .scene import scene_from_json

    return operation_regions(scene_from_json(rec["scene"]), [op_from_json(o) for o in ops])


def operation_errors(edited: torch.Tensor, source: torch.Tensor, target: torch.Tensor,
                     regions: list[torch.Tensor]) -> dict[str, float]:
    """Which operations of a compound instruction an edit carries out: for the ``k``-th named operation
    (``k`` from 1; ``regions`` from :func:`operation_regions`) of one sample ``E``, ``S``, ``T`` ``(F, 3, H, W)``::

        op<k>_error    = sum(R_k |E - T|) / sum(R_k)      (if_error in the operation's own region)
        op<k>_identity = sum(R_k |S - T|) / sum(R_k)      (the same for returning the source)

    An empty region (a later operation covered all of it) gives no entry. :func:`pooled_progress` turns the
    means over prompts into ``op<k>_progress``."""
    out = {}
    for k, region in enumerate(regions, start=1):
        if float(region.sum()) == 0:
            continue
        w = region[None].to(edited)
        out[f"op{k}_error"] = float(masked_mean_abs(edited[None].double(), target[None].double(), w.double())[0])
        out[f"op{k}_identity"] = float(masked_mean_abs(source[None].double(), target[None].double(), w.double())[0])
    return out


def preservation_split(edited: torch.Tensor, source: torch.Tensor, mask: torch.Tensor,
                       token: int) -> dict[str, float]:
    """Where the preservation error of one sample sits: at the edit's boundary or away from it.

    ``E``, ``S`` ``(F, 3, H, W)``, the edit mask ``M`` ``(F, 1 or 3, H, W)``; the DiT sees each frame as tokens of
    ``token x token`` pixels (the VAE's spatial factor times the patch size: ``editor.spatial_ratio``). A kept pixel
    (``K = 1 - M``) is at the *boundary* when its token also holds edited pixels (``B``: a token must then change
    some of its pixels and keep the others), in the *interior* otherwise (``I = K - B``)::

        sp_boundary       = sum(B |E - S|) / sum(B)      (absent when no kept pixel is at the boundary)
        sp_interior       = sum(I |E - S|) / sum(I)      (absent when every kept pixel is)
        sp_boundary_share = sum(B) / sum(K)              (absent when nothing is kept)

    so ``sp_error = share * sp_boundary + (1 - share) * sp_interior``. A per-frame (spatial) split: with a VAE that
    compresses time a token also spans several frames, which this does not model. Trailing rows or columns that
    fill no whole token are counted in the token they start."""
    if edited.ndim != 4 or edited.shape != source.shape:
        raise ValueError(f"preservation_split: edited {tuple(edited.shape)} and source {tuple(source.shape)} must "
                         f"both be (F, 3, H, W)")
    if token < 1:
        raise ValueError(f"preservation_split: token must be >= 1 pixel, got {token}")
    keep = 1 - (mask.double() > 0.5).amax(dim=1, keepdim=True).double()  # (F, 1, H, W)
    f, _, h, w = keep.shape
    pad = (0, (-w) % token, 0, (-h) % token)  # pad with kept pixels: they never make a token mixed
    kept_share = torch.nn.functional.avg_pool2d(torch.nn.functional.pad(keep, pad, value=1.0), token)
    mixed = (kept_share < 1).double().repeat_interleave(token, 2).repeat_interleave(token, 3)[..., :h, :w]
    boundary, interior = keep * mixed, keep * (1 - mixed)
    err = (edited.double() - source.double()).abs().mean(dim=1, keepdim=True)  # mean over channels, as sp_error
    out = {}
    n_keep, n_b, n_i = float(keep.sum()), float(boundary.sum()), float(interior.sum())
    if n_b:
        out["sp_boundary"] = float((err * boundary).sum()) / n_b
    if n_i:
        out["sp_interior"] = float((err * interior).sum()) / n_i
    if n_keep:
        out["sp_boundary_share"] = n_b / n_keep
    return out


def pooled_progress(mean_error: float, mean_identity: float) -> float:
    """``1 - mean(op<k>_error) / mean(op<k>_identity)`` over a group of prompts: how far the ``k``-th named
    operations went from the source towards the target (1: as the target, 0: as the source, < 0: worse).
    A ratio of means, not a mean of per-prompt ratios: an operation that changes a colour to a near one (a sand
    background made mint: ``|S - T|`` 0.035 where it acts) would give one prompt a ratio of -7 for a small error."""
    return 1 - mean_error / mean_identity if mean_identity > 0 else math.nan


__all__ = ["oracle_scores", "best_oracle_scores", "record_truths", "masked_mean_abs", "bootstrap_ci", "average_ranks",
           "spearman", "operation_regions", "record_operation_regions", "operation_errors", "preservation_split",
           "pooled_progress"]


def read_mask(path) -> torch.Tensor:
    """An edit-mask video (grey frames, as the toy builder writes them) as ``(F, 1, H, W)`` floats in {0, 1}."""
    from viva_base.video import read_video

    return (read_video(path).frames.amax(dim=1, keepdim=True) > 0.5).float()


def record_truths(rec: dict, target: torch.Tensor | None = None,
                  mask: torch.Tensor | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The correct edits ``[(target (F, 3, H, W), mask (F, 1, H, W)), ...]`` of a toy manifest record, for
    :func:`best_oracle_scores`: for an open instruction (its ``ops`` leave a field ``free``) every correct edit,
    rendered from its ``scene``; otherwise the record's own target and mask (``target``/``mask`` when given, else
    read from its files)."""
    ops = rec.get("ops") or []
    if rec.get("scene") and any(o.get("free") for o in ops):
        from .edits import admissible_truths, op_from_json
        from .scene import scene_from_json

        return admissible_truths(scene_from_json(rec["scene"]), [op_from_json(o) for o in ops])
    if target is None:
        from viva_base.video import read_video

        target = read_video(rec["target"]).frames
    return [(target, read_mask(rec["mask"]) if mask is None else mask)]
