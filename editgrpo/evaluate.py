"""Held-out evaluation during and after training (a trainer feature any recipe switches on with
``eval.manifest``): deterministic ODE edits of every eval prompt for each eval seed, scored by the
recipe's rewards (proxy) and, where the manifest gives the true ``target`` and ``mask`` (toy world), by
the oracle metrics (viva_base/data/toyworld/oracle.py). Proxy and oracle side by side make reward
hacking visible.

Writes ``<out>/step-<k>/items.jsonl`` (one line per prompt: every score per seed and their mean),
``summary.json`` (means overall, per split and per edit type) and a few edited clips as GIFs.
"""
from __future__ import annotations

import json
import logging
import os
from collections import defaultdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from viva_base.atomic import atomic_dir
from viva_base.data.manifest import read_manifest
from viva_base.data.toyworld.oracle import (best_oracle_scores, operation_errors, pooled_progress,
                                            preservation_split, read_mask, record_operation_regions, record_truths)
from viva_base.video import read_image, read_video, write_video

from .rollout import guided_velocity, initial_noise, sample_generators
from .sampling import sample_trajectory, sigma_schedule

logger = logging.getLogger(__name__)

ORACLE_KEYS = ("oracle", "if_error", "sp_error", "if_progress")


def eval_seed(seed: int, item: int) -> int:
    return (seed * 1_000_003 + item) % (2 ** 63 - 1)


def token_pixels(policy) -> int:
    """The side, in pixels, of what one DiT token covers (the VAE's spatial factor times the patch size), which
    :func:`~viva_base.data.toyworld.oracle.preservation_split` needs; 1 for a policy that does not say."""
    ratio = getattr(policy, "spatial_ratio", None)
    return ratio if isinstance(ratio, int) and ratio > 0 else 1


def record_operations(record: dict) -> list[str] | None:
    """The operation types a toy manifest record's instruction names, in its order (``ops``); None without them."""
    return [op["op"] for op in record["ops"]] if record.get("ops") else None


def item_groups(it: dict) -> list[str]:
    """The groups an evaluation item counts in: ``all``, ``split/<split>`` (compound ones also in
    ``split/compound-novel`` or ``-seen``), ``type/<edit_type>``, for an open instruction (several correct
    edits, ``open: true``) ``open/<split>``, and for an instruction of several operations (toy manifests name them:
    ``operations``) ``ops/<n>/background`` when one of its ``n`` operations edits the background (the kept pixels
    are then objects only) or ``ops/<n>/objects`` when none does (docs/toy_world.md, twenty-first pass)."""
    names = ["all"]
    if it.get("split"):
        names.append(f"split/{it['split']}")
        if it.get("novel_combo") is not None and it["split"] == "compound":
            names.append("split/compound-" + ("novel" if it["novel_combo"] else "seen"))
    if it.get("edit_type"):
        names.append(f"type/{it['edit_type']}")
    if it.get("open"):
        names.append(f"open/{it.get('split') or 'all'}")
    ops = it.get("operations") or []
    if len(ops) > 1:
        names.append(f"ops/{len(ops)}/" + ("background" if "background" in ops else "objects"))
    return names


def group_means(items: list[dict], keys: list[str]) -> dict:
    """Means of ``keys`` over all items, per ``split`` and per ``edit_type`` (NaNs skipped); where the items carry
    per-operation errors (compound toy prompts), ``op<k>_progress`` of the ``k``-th named operations
    (:func:`~viva_base.data.toyworld.oracle.pooled_progress`)."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for it in items:
        for name in item_groups(it):
            groups[name].append(it)
    out = {}
    for name, rows in groups.items():
        stats = {"n": len(rows)}
        for k in keys:
            vals = [r["mean"][k] for r in rows if r["mean"].get(k) is not None and r["mean"][k] == r["mean"][k]]
            stats[k] = sum(vals) / len(vals) if vals else None
        for k in range(1, 4):
            err, ident = _op_means(rows, k)
            if err is not None:
                stats[f"op{k}_progress"] = pooled_progress(err, ident)
        out[name] = stats
    return out


def _op_means(rows: list[dict], k: int) -> tuple[float | None, float | None]:
    """Means of ``op<k>_error`` and ``op<k>_identity`` over the rows that have both (the same prompts)."""
    pairs = [(r["mean"][f"op{k}_error"], r["mean"][f"op{k}_identity"]) for r in rows
             if r["mean"].get(f"op{k}_error") is not None and r["mean"].get(f"op{k}_identity") is not None]
    if not pairs:
        return None, None
    return sum(e for e, _ in pairs) / len(pairs), sum(i for _, i in pairs) / len(pairs)


def showcase_indices(records: list[dict], n: int) -> list[int]:
    """The ``n`` records whose clips an evaluation saves (the report's "Held-out edits"): taken in turn from each
    group of (split, edit type, open or not), in manifest order, so simple and compound, seen and novel, every edit
    type, open and named instructions are all shown rather than the manifest's first ``n`` (which may all be
    compound)."""
    groups: dict = {}
    for i, r in enumerate(records):
        key = (r.get("split"), bool(r.get("novel_combo")), r.get("edit_type"), bool(r.get("open")))
        groups.setdefault(key, []).append(i)
    queues, picked = list(groups.values()), []
    while len(picked) < min(n, len(records)):
        for q in queues:
            if q and len(picked) < n:
                picked.append(q.pop(0))
    return sorted(picked)


class Evaluator:
    def __init__(self, cfg, reward_fn, out_dir: str | os.PathLike):
        self.cfg = cfg
        self.reward_fn = reward_fn
        self.out = Path(out_dir)
        records = read_manifest(cfg.manifest, "eval")
        self.records = records[: cfg.max_items] if cfg.max_items else records
        self.showcase = set(showcase_indices(self.records, cfg.save_videos))
        self.oracle = all(r.get("target") and r.get("mask") for r in self.records)
        self.seeds = list(cfg.seeds)
        self._videos = {}

    def _load(self, rec: dict) -> dict:
        """The record's source clip (float32 in [0, 1], exactly as ``read_video`` gives it), reference image and, with
        an oracle, its correct edits. Kept between batches and evaluations; the source as uint8, a quarter of the
        memory (a 33 x 480 x 848 clip: 40 MB, not 161 MB, per item on every process)."""
        if rec["id"] not in self._videos:
            item = {"source": read_video(rec["source"]).frames.mul(255).round().to(torch.uint8)}
            if self.oracle:  # every correct edit (several for an open instruction; toyworld.oracle.record_truths)
                item["truths"] = record_truths(rec, read_video(rec["target"]).frames, read_mask(rec["mask"]))
            item["reference"] = read_image(rec["reference"]) if rec.get("reference") else None
            regions = record_operation_regions(rec) if self.oracle else None
            if regions is not None:
                item["regions"] = regions
            self._videos[rec["id"]] = item
        item = self._videos[rec["id"]]
        return {**item, "source": item["source"].float() / 255}

    def sampler(self, policy) -> dict:
        """The evaluation sampler as it ran (the shift resolved), recorded in each step's ``summary.json``."""
        interval = self.cfg.guidance_interval
        return {"method": "ode", "num_steps": int(self.cfg.num_steps), "guidance_scale": float(self.cfg.guidance_scale),
                "guidance_interval": None if interval is None else [float(x) for x in interval],
                "shift": float(policy.config.shift if self.cfg.shift is None else self.cfg.shift)}

    @torch.no_grad()
    def edit(self, policy, recs: list[dict], seed: int, first_index: int) -> torch.Tensor:
        """ODE edits (CFG on the instruction, in ``eval.guidance_interval`` if set; the schedule shift
        ``eval.shift``, else the editor's) of ``recs`` with per-item noise seeds."""
        items = [self._load(r) for r in recs]
        device = policy.device
        cond, uncond = policy.encode_condition(torch.stack([it["source"] for it in items]).to(device),
                                               [r["instruction"] for r in recs], [it["reference"] for it in items])
        gens = sample_generators([eval_seed(seed, first_index + i) for i in range(len(recs))])
        z = initial_noise(policy.latent_shape(cond), gens).to(device)
        sampler = self.sampler(policy)
        sigmas = sigma_schedule(sampler["num_steps"], sampler["shift"])
        interval = sampler["guidance_interval"]
        traj = sample_trajectory(lambda x, s: guided_velocity(policy, x, s, cond, uncond, sampler["guidance_scale"],
                                                              guidance_interval=interval),
                                 z, sigmas, mode="ode")
        return policy.decode(traj.latents).cpu()

    def batches(self) -> list[tuple[int, int]]:
        """``(first, stop)`` item ranges of the evaluation's batches: consecutive records, at most ``eval.batch_size``,
        never mixing items with and without a reference image (the editor would run such a batch as two DiT
        forwards a step: ``VivaEditor.velocity``), so every batch costs one forward a step."""
        bounds, start = [], 0
        for i in range(1, len(self.records) + 1):
            if i == len(self.records) or i - start == self.cfg.batch_size or (
                    bool(self.records[i].get("reference")) != bool(self.records[start].get("reference"))):
                bounds.append((start, i))
                start = i
        return bounds

    def units(self) -> list[tuple[int, int, int]]:
        """The evaluation's work: ``(seed, first item, stop)`` of every batch (:meth:`batches`), seed-major (one
        process's order)."""
        return [(seed, start, stop) for seed in self.seeds for start, stop in self.batches()]

    def share(self, rank: int, world: int, *, lockstep: bool = False) -> tuple[list[tuple[int, int, int]], int]:
        """Process ``rank``'s batches of :meth:`units` (``r, r + world, ...``) and how many of them count. With
        ``lockstep`` (DeepSpeed ZeRO-3: every DiT forward gathers its parameters from all processes, so every process
        must run as many as the others; each batch runs one a step) the list is padded to
        ``ceil(len(units) / world)`` with repeats of a batch it already has (``units[0]`` when it has none); the
        padding's results are dropped."""
        from viva_base.distributed import share_out

        units = self.units()
        mine, n_real = share_out(len(units), rank, world, lockstep=lockstep)
        return [units[i] for i in mine], n_real

    def _run_unit(self, policy, seed: int, start: int, stop: int) -> dict:
        """Edit and score one batch: ``{"unit": (seed, start, stop), "scores": [per item {key: value}], "clips": {id:
        uint8 clip}}`` (clips of the showcase items, first seed only; uint8 as they will be written)."""
        recs = self.records[start:stop]
        edited = self.edit(policy, recs, seed, start)
        items = [self._load(r) for r in recs]
        source = torch.stack([it["source"] for it in items])
        scored = self.reward_fn(edited, source, source_captions=[r["source_caption"] for r in recs],
                                target_captions=[r["target_caption"] for r in recs],
                                instructions=[r["instruction"] for r in recs],
                                references=[it["reference"] for it in items])
        scores = {"reward": scored.total, **{f"reward/{k}": v for k, v in scored.components.items()}}
        if self.oracle:
            o = best_oracle_scores(edited, source, [it["truths"] for it in items])
            scores.update({k: o[k] for k in ORACLE_KEYS})
        per_item, clips = [], {}
        for i, r in enumerate(recs):
            row = {k: float(v[i]) for k, v in scores.items()}
            if self.oracle:  # the preservation error at the edit's boundary and away from it
                mask = items[i]["truths"][int(o["alternative"][i])][1]
                row.update(preservation_split(edited[i], source[i], mask, token_pixels(policy)))
            if "regions" in items[i]:  # which operations of a compound instruction it carried out
                truth = items[i]["truths"][0][0]
                row.update(operation_errors(edited[i], source[i], truth, items[i]["regions"]))
            per_item.append(row)
            if seed == self.seeds[0] and start + i in self.showcase:
                clips[r["id"]] = edited[i].clamp(0, 1).mul(255).round().to(torch.uint8)
        return {"unit": (seed, start, stop), "scores": per_item, "clips": clips}

    def run(self, policy, *, step: int, accelerator=None) -> dict | None:
        """Evaluate ``policy``, the batches shared out over the processes (process ``r`` of ``n`` runs batches
        ``r, r + n, ...`` of :meth:`units`), then gathered (``accelerate.utils.gather_object``: scores, and the
        showcase clips as uint8) on the main process, which writes the step's folder and returns the summary (None
        on the others). Each item's noise comes from its seed and its index and the batches are the ones one process
        runs, so the scores do not depend on the number of processes. Under DeepSpeed ZeRO-3 every DiT forward needs
        every process, so each runs the same number of batches (:meth:`share`, ``lockstep``)."""
        from viva_base.distributed import deepspeed_stage

        rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator is not None else (0, 1)
        dit = getattr(policy, "dit_forward", None) or policy.transformer
        was_training = dit.training
        dit.eval()
        out = self.out / f"step-{step}"
        units = self.units()
        lockstep = world > 1 and deepspeed_stage(accelerator) == 3
        mine, n_real = self.share(rank, world, lockstep=lockstep)
        bar = tqdm(total=len(mine), desc=f"eval@{step}", leave=False, disable=rank != 0)
        results = []
        for unit in mine:
            results.append(self._run_unit(policy, *unit))
            bar.update(1)
        bar.close()
        results = results[:n_real]  # ZeRO-3's padding ran only to keep the processes' forwards in step
        if world > 1:
            from accelerate.utils import gather_object

            results = gather_object(results)  # every process's batches, on every process (CPU objects)
        if accelerator is not None and not accelerator.is_main_process:
            if was_training:
                dit.train()
            accelerator.wait_for_everyone()
            return None
        per_item = {r["id"]: defaultdict(list) for r in self.records}
        clips = {}
        order = {u: n for n, u in enumerate(units)}
        for res in sorted(results, key=lambda res: order[tuple(res["unit"])]):  # one process's order
            seed, start, stop = res["unit"]
            for r, row in zip(self.records[start:stop], res["scores"]):
                for k, v in row.items():
                    per_item[r["id"]][k].append(v)
            clips.update({name: clip.float() / 255 for name, clip in res["clips"].items()})
        clips = {r["id"]: clips[r["id"]] for r in self.records if r["id"] in clips}  # manifest order
        rows = []
        for r in self.records:
            scores = per_item[r["id"]]
            mean = {k: (sum(v) / len(v) if all(x == x for x in v) else float("nan")) for k, v in scores.items()}
            rows.append({"id": r["id"], "edit_type": r.get("edit_type"), "split": r.get("split"),
                         "novel_combo": r.get("novel_combo"), "open": r.get("open"), "instruction": r["instruction"],
                         "operations": record_operations(r),
                         "seeds": self.seeds, "scores": dict(scores), "mean": mean})
        keys = sorted({k for row in rows for k in row["mean"]})
        summary = {"step": step, "n_prompts": len(rows), "seeds": self.seeds, "oracle_available": self.oracle,
                   "sampler": self.sampler(policy), "groups": group_means(rows, keys)}
        _write_eval(out, rows, summary, clips, fps=8.0)
        logger.info("eval@%d: %s", step, {k: round(v, 4) for k, v in summary["groups"]["all"].items()
                                          if isinstance(v, float)})
        if accelerator is not None:
            from viva_base.training import log_videos

            accelerator.log({f"eval/{k}": v for k, v in summary["groups"]["all"].items()
                             if isinstance(v, float)}, step=step)
            log_videos(accelerator, {f"eval/{name}": clip for name, clip in list(clips.items())[:4]}, step)
            accelerator.wait_for_everyone()
        if was_training:
            dit.train()
        return summary


def _write_eval(out: Path, rows: list[dict], summary: dict, clips: dict, fps: float) -> None:
    """Write the step's folder atomically (temp folder, then rename)."""
    with atomic_dir(out) as tmp:
        with open(tmp / "items.jsonl", "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2))
        if clips:
            (tmp / "videos").mkdir()
            for name, frames in clips.items():
                write_video(tmp / "videos" / f"{name}.gif", frames, fps)


def load_eval(folder: str | os.PathLike) -> tuple[list[dict], dict]:
    folder = Path(folder)
    rows = [json.loads(line) for line in (folder / "items.jsonl").read_text().splitlines() if line.strip()]
    return rows, json.loads((folder / "summary.json").read_text())
