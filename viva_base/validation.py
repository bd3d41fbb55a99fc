"""Held-out validation during SFT (the SFT recipe's ``validation`` block), as diffusers' training scripts log
validation samples and torchtune a validation loss:

- ``val/loss``: eq. 3, the training objective (the recipe's ``w_m``, loss weighting and mask normalisation; no CFG or
  pooled dropout), on held-out pairs at fixed noise levels ``validation.sigmas`` with fixed noise (seeded by
  ``validation.seed`` and the pair's index). The same pairs, noise and levels at every validation, so its curve shows
  the editor's fit on data it does not train on, without the training loss's sampling noise. Each pair's loss is
  the mean over the levels (one forward: the pair repeated once per level), ``val/loss`` the mean over pairs.
- edits of the first ``validation.edits`` pairs (the edit command's sampler, ``EditPipeline.sample``): written to
  ``output_dir/validation/step-<k>/`` as GIFs, logged to the trackers (``log_videos``), and scored against their
  targets: ``val/edit_error_in`` / ``val/edit_error_out``, the mean absolute pixel error inside and outside the
  pair's mask (how far the edit is from the target's; how much the rest of the clip drifted).

The pairs are shared out over the processes (process ``r`` of ``n`` takes pairs ``r, r + n, ...``) and the sums
reduced, so the numbers do not depend on the number of processes beyond float rounding; under DeepSpeed ZeRO-3,
whose every DiT forward needs every process, each process runs as many pairs as the others (repeats of its own, whose
results are dropped). With ``train.ema_decay`` the EMA weights are validated (what ``final/`` holds)."""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from .distributed import share_out
from .errors import UserError
from .policy import Condition

logger = logging.getLogger("viva_base.validation")


@dataclass
class ValidationConfig:
    manifest: Optional[str] = None       # a held-out pairs manifest (docs/data.md); None: no validation
    every: int = 0                       # optimizer steps between validations (0: only after the last step)
    at_start: bool = True                # validate the starting editor too (step 0; not on a resumed run)
    max_items: Optional[int] = 16        # the manifest's first N pairs (None: all)
    sigmas: list[float] = field(default_factory=lambda: [0.25, 0.5, 0.75])  # noise levels of val/loss
    seed: int = 0                        # the noise of val/loss and of the edits
    edits: int = 4                       # the first N pairs are edited, written and logged as videos (0: loss only)
    num_steps: int = 20                  # ODE steps of an edit
    guidance_scale: float = 2.0          # CFG on the instruction of an edit


def check_validation(vc: ValidationConfig) -> None:
    """Every ``validation.*`` value, and the manifest read, before any expensive work (UserError naming the key)."""
    if vc.manifest is None:
        return
    if vc.every < 0:
        raise UserError(f"validation.every={vc.every} must be >= 0 (0: only after the last step)")
    if vc.max_items is not None and vc.max_items < 1:
        raise UserError(f"validation.max_items={vc.max_items} must be >= 1 (or null: every pair)")
    if not vc.sigmas or not all(0 < s <= 1 for s in vc.sigmas):
        raise UserError(f"validation.sigmas={list(vc.sigmas)} must be noise levels in (0, 1], at least one")
    if vc.edits < 0:
        raise UserError(f"validation.edits={vc.edits} must be >= 0")
    if vc.edits and vc.num_steps < 1:
        raise UserError(f"validation.num_steps={vc.num_steps} must be >= 1")
    if vc.guidance_scale <= 0:
        raise UserError(f"validation.guidance_scale={vc.guidance_scale} must be > 0 (1: no CFG)")
    from .data.manifest import check_manifest

    records = check_manifest("validation.manifest", vc.manifest, "pairs")
    records = records[: vc.max_items] if vc.max_items else records
    for rec in records[: vc.edits]:
        if not str(rec["instruction"]).strip():
            raise UserError(f"validation.manifest={vc.manifest}: pair {rec['id']} has an empty instruction and "
                            f"cannot be edited; set validation.edits below its place or give it an instruction")


def edit_errors(edited: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> tuple[float, float]:
    """Mean absolute pixel error of ``edited`` against ``target`` (both ``(F, 3, H, W)`` in [0, 1]) inside and
    outside ``mask`` (``(F, 1, H, W)`` in {0, 1}); NaN for a region with no pixel."""
    err = (edited.float() - target.float()).abs().mean(1, keepdim=True)
    m = mask.float()
    inside, outside = float(m.sum()), float((1 - m).sum())
    return (float((err * m).sum()) / inside if inside else math.nan,
            float((err * (1 - m)).sum()) / outside if outside else math.nan)


class Validator:
    def __init__(self, cfg: ValidationConfig, *, frames, size, out_dir: Path, loss_options: dict):
        from .data.manifest import read_manifest
        from .data.pairs import PairDataset

        self.cfg = cfg
        records = read_manifest(cfg.manifest, "pairs")
        records = records[: cfg.max_items] if cfg.max_items else records
        self.dataset = PairDataset(records, frames=frames, size=size)
        self.records = records
        self.out = Path(out_dir)
        self.loss_options = loss_options  # w_m, loss_weighting, loss_weight_cap, mask_normalization of the recipe

    def due(self, step: int, max_steps: int) -> bool:
        """After optimizer step ``step`` (1-based): every ``validation.every`` steps and after the last."""
        return step == max_steps or bool(self.cfg.every and step % self.cfg.every == 0)

    def pair_loss(self, editor, index: int) -> torch.Tensor:
        """Eq. 3 of pair ``index`` averaged over ``validation.sigmas``: the pair encoded once (instructor, VAE), the
        DiT run once on it repeated once per level."""
        from .sft import encode_pairs, sft_loss

        item = self.dataset[index]
        one = {"source": item["source"][None], "target": item["target"][None], "mask": item["mask"][None],
               "instruction": [item["instruction"]], "reference": [item["reference"]]}
        n = len(self.cfg.sigmas)
        g = torch.Generator().manual_seed(_seed(self.cfg.seed, index))
        return sft_loss(editor, {"index": [index] * n}, g, cfg_dropout=0.0, pooled_dropout=0.0,
                        timestep_sampling="uniform", shift=1.0,
                        sigma=torch.tensor(self.cfg.sigmas, dtype=torch.float32),
                        features=_Repeated(*encode_pairs(editor, one, torch.tensor([False]))), **self.loss_options)

    def pair_edit(self, editor, index: int) -> dict:
        from .pipeline import EditPipeline

        item = self.dataset[index]
        edited = EditPipeline(editor).sample(item["source"], item["instruction"], item["reference"],
                                             num_inference_steps=self.cfg.num_steps,
                                             guidance_scale=self.cfg.guidance_scale,
                                             seed=_seed(self.cfg.seed, index), progress=False)
        err_in, err_out = edit_errors(edited, item["target"], item["mask"])
        return {"index": index, "clip": edited.clamp(0, 1).mul(255).round().to(torch.uint8), "error_in": err_in,
                "error_out": err_out}

    @torch.no_grad()
    def run(self, editor, dit, *, step: int, accelerator, lockstep: bool, ema=None, params=None,
            autocast=None) -> dict | None:
        """Validate at ``step`` on every process; the main process writes ``validation/step-<step>/`` and logs to the
        trackers, and gets the summary (None on the others). ``autocast``: a context factory for the forwards (the
        training step's)."""
        from contextlib import nullcontext

        rank, world = accelerator.process_index, accelerator.num_processes
        was_training = dit.training
        dit.eval()
        if ema is not None:  # validate the EMA weights (final/'s), then put the trained ones back
            ema.store(params)
            ema.copy_to(params)
        ctx = autocast or nullcontext
        try:
            mine, n_real = share_out(len(self.records), rank, world, lockstep=lockstep)
            losses = []
            for index in mine:
                with ctx():
                    losses.append(float(self.pair_loss(editor, index)))
            total = torch.tensor([sum(losses[:n_real]), float(n_real)], dtype=torch.float64, device=accelerator.device)
            if world > 1:
                total = accelerator.reduce(total, reduction="sum")
            edits = []
            n_edits = min(self.cfg.edits, len(self.records))
            mine, n_real = share_out(n_edits, rank, world, lockstep=lockstep)
            for index in mine:
                with ctx():
                    edits.append(self.pair_edit(editor, index))
            edits = edits[:n_real]
            if world > 1:
                from accelerate.utils import gather_object

                edits = gather_object(edits)
        finally:
            if ema is not None:
                ema.restore(params)
            if was_training:
                dit.train()
        summary = None
        if accelerator.is_main_process:
            summary = self._write(step, float(total[0] / total[1]), sorted(edits, key=lambda e: e["index"]),
                                  accelerator)
        accelerator.wait_for_everyone()
        return summary

    def _write(self, step: int, loss: float, edits: list[dict], accelerator) -> dict:
        from .atomic import atomic_dir
        from .training import log_videos
        from .video import write_video

        def mean(key):
            vals = [e[key] for e in edits if not math.isnan(e[key])]
            return sum(vals) / len(vals) if vals else None

        summary = {"step": step, "loss": loss, "pairs": len(self.records), "sigmas": list(self.cfg.sigmas),
                   "edit_error_in": mean("error_in"), "edit_error_out": mean("error_out"),
                   "edits": [{"id": self.records[e["index"]]["id"],
                              "instruction": self.records[e["index"]]["instruction"],
                              "error_in": e["error_in"], "error_out": e["error_out"]} for e in edits]}
        with atomic_dir(self.out / f"step-{step}") as tmp:
            (tmp / "summary.json").write_text(json.dumps(summary, indent=2))
            for e in edits:
                write_video(tmp / f"{self.records[e['index']]['id']}.gif", e["clip"].float() / 255, 8.0)
        scalars = {"val/loss": loss, "val/edit_error_in": summary["edit_error_in"],
                   "val/edit_error_out": summary["edit_error_out"]}
        accelerator.log({k: v for k, v in scalars.items() if v is not None}, step=step)
        log_videos(accelerator, {f"val/{self.records[e['index']]['id']}": e["clip"].float() / 255 for e in edits},
                   step)
        logger.info("validation@%d: loss %.5f, edit error in/out %s / %s", step, loss, summary["edit_error_in"],
                    summary["edit_error_out"])
        return summary


def history(out_dir: str | Path) -> list[dict]:
    """The summaries of a run's validations (``output_dir/validation/step-<k>/summary.json``), by step."""
    folders = [p for p in Path(out_dir).glob("step-*") if (p / "summary.json").exists()
               and p.name.split("-", 1)[1].isdigit()]
    return [json.loads((p / "summary.json").read_text())
            for p in sorted(folders, key=lambda p: int(p.name.split("-", 1)[1]))]


class _Repeated:
    """``sft_loss``'s ``features`` (as ``PrecomputedPairs``): one pair's frozen encodings, one row per index asked."""

    def __init__(self, cond, z, mask):
        self.cond, self.z, self.mask = cond, z, mask

    def batch(self, index: list[int], drop: torch.Tensor) -> tuple:
        assert not bool(drop.any())  # no CFG dropout in validation
        n = len(index)
        return Condition.cat([self.cond] * n), torch.cat([self.z] * n), torch.cat([self.mask] * n)


def _seed(seed: int, index: int) -> int:
    return (int(seed) * 1_000_003 + int(index)) % (2**63)
