"""The VIVA ablation (paper Table 2) in miniature, on the toy world, with ground truth.

    python -m benchmarks.ablation recipe=recipes/toy.yaml [rows=Vanilla,+V,...] [--quick] [--seeds 0 1 2]
        [--sft-steps N] [key=value ...]

Runs the rows of the paper's ablation on ONE shared toy dataset, toy reward model (toy CLIP) and toy instructor
(the stages of the toy chain, editgrpo/toy.py, cached in ``<output_dir>/ablation/``), each row its own cached SFT
(and Edit-GRPO for +E), all evaluated on the same held-out prompts and eval seeds:

==========  ============================================================================================
row         what it changes (over the previous row)
==========  ============================================================================================
Vanilla     the instructor reads the instruction only (``model.instructor_images=false``: the same LLaVA
            given no first frame and no reference), plain flow-matching loss (``train.w_m=0``,
            ``train.mask_normalization=none``), video pairs only (``data.p_video=1.0``)
+V          the VLM instructor sees the source's first frame (paper eq. 1): ``model.instructor_images=true``
+V+M        the masked loss (eq. 3): the recipe's ``train.w_m`` and ``train.mask_normalization``
+V+M+I      image pairs mixed in: the recipe's ``data.p_video`` (toy image pairs carry ``replace``, which
            video pairs never do)
+V+M+I+E    Edit-GRPO (the recipe's GRPO stage, compound prompts) on the +V+M+I editor
==========  ============================================================================================

Each row is a set of SFT recipe overrides (:data:`ROWS`) appended last to ``toy.sft_overrides``, so rows differ
only in what they ablate. ``mask_normalization`` goes with ``w_m``: with ``w_m=0`` the recipe's ``balanced``
normalisation would still reweight every sample's edit region, so "no masked loss" is both keys off (the plain
flow-matching loss). All SFT rows train ``--sft-steps`` steps (default :data:`DEFAULT_SFT_STEPS`, the compute
arithmetic in docs/toy_world.md); ``--seeds`` repeats every row over training seeds (SFT and GRPO ``train.seed``).

Outputs in ``<output_dir>/ablation/`` (``ablation-quick/`` with ``--quick``): ``rows/<row>/sft/final`` (the row's
editor; ``python -m viva_base.edit --model`` runs on it), ``rows/<row>/sft/config.yaml`` (its resolved recipe),
``rows/V+M+I+E/grpo/lora`` (``--lora``), ``rows/<row>/eval/step-<k>/items.jsonl``; ``ablation.md/json/html`` and
``ablation_<metric>.png``: per edit type (add / remove / replace / recolour / background / compound /
compound-novel) the oracle metrics (oracle, if_error, sp_error, if_progress) and the proxies (clip_if, clip_sp,
pixel_sp, and clip_tc: the EditVerse temporal consistency of benchmarks/metrics.py on the toy CLIP's frame
embeddings), each row against the previous one with a paired bootstrap 95% interval over prompts. With several
``--seeds`` the folders are ``rows/<row>/seed-<s>/`` and each prompt's score is its mean over the seeds.
"""
from __future__ import annotations

import json
import logging
import math
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from viva_base.data.toyworld.oracle import bootstrap_ci
from viva_base.errors import UserError
from viva_base.recipe import RecipeError, atomic_write_text

logger = logging.getLogger("benchmarks.ablation")

# 4 SFT rows (3 of video pairs only) + 1 Edit-GRPO + 5 evaluations in <= 90 min on 2 cores: docs/toy_world.md,
# "The ablation (paper Table 2 in miniature)", has the arithmetic.
DEFAULT_SFT_STEPS = 3500
QUICK_SFT_STEPS = 3
QUICK = ["toy.n_sft_video=8", "toy.n_sft_image=8", "toy.n_grpo=4", "toy.n_eval_compound=4", "toy.n_eval_simple=5",
         "toy.reward_steps=10", "toy.instructor_steps=5", "toy.instructor_compound=8",
         "train.num_iterations=1", "train.prompts_per_iteration=2",
         "train.num_generations=2", "train.checkpoint_every=1", "sampling.num_steps=4", "sampling.sde_window_size=2",
         "sampling.sde_window_range=[0,1]", "eval.num_steps=2", "eval.seeds=[1]", "eval.save_videos=0",
         "report_to=none"]
# a smoke run of 3 SFT steps per row does not compile the DiT (inductor would take longer than the steps)
QUICK_SFT = ["train.checkpoint_every=0", "train.compile=none"]


@dataclass(frozen=True, eq=False)
class Row:
    name: str
    sft: dict = field(default_factory=dict)  # SFT recipe overrides (the whole set: rows are not cumulative in code)
    grpo: bool = False                        # Edit-GRPO on the previous row's SFT editor
    ablates: tuple = ()                       # the keys that differ from the previous row

    @property
    def folder(self) -> str:
        return self.name.lstrip("+")


_NO_MASK = {"train.w_m": 0.0, "train.mask_normalization": "none"}
ROWS = (
    Row("Vanilla", {"model.instructor_images": False, **_NO_MASK, "data.p_video": 1.0}),
    Row("+V", {"model.instructor_images": True, **_NO_MASK, "data.p_video": 1.0}, ablates=("model.instructor_images",)),
    Row("+V+M", {"model.instructor_images": True, "data.p_video": 1.0}, ablates=tuple(_NO_MASK)),
    Row("+V+M+I", {"model.instructor_images": True}, ablates=("data.p_video",)),
    Row("+V+M+I+E", {"model.instructor_images": True}, grpo=True, ablates=("Edit-GRPO",)),
)
GROUPS = (("add", "type/add"), ("remove", "type/remove"), ("replace", "type/replace"), ("recolour", "type/recolour"),
          ("background", "type/background"), ("compound", "split/compound"),
          ("compound-novel", "split/compound-novel"), ("all", "all"))
METRICS = ("oracle", "if_error", "sp_error", "if_progress", "reward/clip_if", "reward/clip_sp", "reward/pixel_sp",
           "reward/clip_tc")
LOWER_IS_BETTER = {"if_error", "sp_error"}


def find_rows(spec: str | None) -> list[Row]:
    """``rows=`` (comma-separated names, any case, the leading + optional) -> the rows in table order."""
    if not spec:
        return list(ROWS)
    by_key = {r.folder.lower(): r for r in ROWS}
    chosen = []
    for name in (s.strip() for s in spec.split(",") if s.strip()):
        row = by_key.get(name.lstrip("+").lower())
        if row is None:
            raise UserError(f"rows: unknown row {name!r}; choose from {', '.join(r.name for r in ROWS)}")
        chosen.append(row)
    return [r for r in ROWS if r in chosen]


def _previous(row: Row) -> Row:
    return ROWS[ROWS.index(row) - 1]


def _overrides(mapping: dict) -> list[str]:
    return [f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in mapping.items()]


def _time_file(folder: Path, key: str, seconds: float) -> None:
    path = folder / "timing.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    data[key] = round(seconds, 1)
    atomic_write_text(path, json.dumps(data, indent=1))


def temporal_consistency_reward(model: str):
    """A weight-0 reward for the evaluation: EditVerse temporal consistency (benchmarks.metrics) of the edited
    video's frames embedded by the CLIP ``model`` (the toy CLIP here): the toy analogue of Table 2's "video
    quality" columns."""
    from rewards.base import RewardOutput
    from rewards.clip import ClipImageRewardBase

    from .metrics import temporal_consistency

    class ClipTemporalConsistency(ClipImageRewardBase):
        name = "clip_tc"

        def score(self, edited, source, *, source_captions, target_captions, instructions, references):
            (img,) = self.embed_frames(self.scorer(edited), edited)
            return RewardOutput(temporal_consistency(img).float())

    return ClipTemporalConsistency(model=model)


class Ablation:
    """One ablation run: the recipe (a GRPO config with ``toy``), the rows, the seeds and the SFT step count."""

    def __init__(self, cfg, rows: list[Row], *, seeds: list[int] | None, sft_steps: int, quick: bool = False):
        from omegaconf import OmegaConf

        self.cfg = OmegaConf.merge(cfg, {})
        self.root = Path(cfg.output_dir) / ("ablation-quick" if quick else "ablation")
        self.cfg.output_dir = str(self.root)
        self.cfg.toy.enabled = True
        self.rows, self.seeds, self.sft_steps, self.quick = rows, seeds, sft_steps, quick
        self.seconds: dict[str, dict] = {}

    def run_dir(self, row: Row, seed: int | None) -> Path:
        base = self.root / "rows" / row.folder
        return base if self.seeds is None or len(self.seeds) == 1 else base / f"seed-{seed}"

    # ------------------------------------------------------------------ stages
    def run(self) -> dict:
        from rewards.registry import CombinedReward

        from editgrpo.toy import point_at, shared_stages

        t0 = time.time()
        self.root.mkdir(parents=True, exist_ok=True)
        self.paths, self.reward_name, self.base = shared_stages(self.cfg, self.root)
        if time.time() - t0 > 5 or not (self.root / "timing.json").exists():  # else cached: keep the first run's
            _time_file(self.root, "shared_s", time.time() - t0)
        self.seconds["shared stages (data, toy CLIP, toy instructor)"] = json.loads((self.root / "timing.json").read_text())
        logger.info("ablation: shared stages ready in %.0f s", time.time() - t0)
        pointed = point_at(self.cfg, self.paths, self.reward_name, self.root, "")
        reward_fn = CombinedReward.from_config(pointed.rewards)
        if self.reward_name:
            reward_fn = CombinedReward({**reward_fn.rewards, "clip_tc": temporal_consistency_reward(self.reward_name)},
                                       {**reward_fn.weights, "clip_tc": 0.0})
        self.reward_fn = reward_fn
        needed = {r.name for r in self.rows} | {_previous(r).name for r in self.rows if r.grpo}
        self.evals: dict[str, list[Path]] = {r.name: [] for r in self.rows}
        for seed in self.seeds or [None]:
            fingerprints = {}
            for row in ROWS:
                if row.name not in needed:
                    continue
                if row.grpo:
                    self._grpo_row(row, seed, fingerprints[_previous(row).name])
                else:
                    fingerprints[row.name] = self._sft_row(row, seed)
        return self.report(time.time() - t0)

    def _sft_row(self, row: Row, seed: int | None) -> str:
        from omegaconf import OmegaConf

        from editgrpo.toy import _sft_stage

        folder = self.run_dir(row, seed)
        folder.mkdir(parents=True, exist_ok=True)
        t = OmegaConf.merge(self.cfg.toy, {})
        t.sft_overrides = [f"train.max_steps={self.sft_steps}", *self.cfg.toy.sft_overrides,
                           *(QUICK_SFT if self.quick else []), *([f"train.seed={seed}"] if seed is not None else []),
                           *_overrides(row.sft)]
        start = time.time()
        fingerprint = _sft_stage(t, folder / "sft", self.paths["sft"], self.cfg.report_to, base=self.base)
        if time.time() - start > 5 or not (folder / "timing.json").exists():
            _time_file(folder, "sft_s", time.time() - start)
        if row in self.rows:
            self._evaluate(row, folder, folder / "sft" / "final", None, self.sft_steps, {"sft": fingerprint})
        return fingerprint

    def _grpo_row(self, row: Row, seed: int | None, sft_fingerprint: str) -> None:
        from omegaconf import OmegaConf

        from editgrpo.toy import point_at, stage_fingerprint
        from editgrpo.train import main as grpo_main

        folder = self.run_dir(row, seed)
        sft_final = self.run_dir(_previous(row), seed) / "sft" / "final"
        cfg = point_at(self.cfg, self.paths, self.reward_name, sft_final, sft_fingerprint)
        cfg.output_dir, cfg.toy.enabled, cfg.eval.manifest, cfg.resume = str(folder / "grpo"), False, None, "latest"
        if seed is not None:
            cfg.train.seed = seed
        want = stage_fingerprint(json.loads(json.dumps(OmegaConf.to_container(cfg, resolve=True), default=str)))
        stage = folder / "grpo" / "stage.json"
        start = time.time()
        if not ((folder / "grpo" / "lora").is_dir() and stage.exists() and json.loads(stage.read_text()) == want):
            if (folder / "grpo").exists():
                logger.info("ablation: %s's Edit-GRPO recipe or SFT editor changed; training it afresh", row.name)
                shutil.rmtree(folder / "grpo")
            grpo_main(cfg)
            atomic_write_text(stage, json.dumps(want))
            _time_file(folder, "grpo_s", time.time() - start)
        atomic_write_text(folder / "row.json", json.dumps({"sft_editor": str(sft_final), "lora": str(folder / "grpo" / "lora"),
                                                           "edit": f"python -m viva_base.edit --model {sft_final} "
                                                                   f"--lora {folder / 'grpo' / 'lora'} ..."}, indent=1))
        if row in self.rows:
            self._evaluate(row, folder, sft_final, folder / "grpo" / "lora", int(cfg.train.num_iterations),
                           {"sft": sft_fingerprint, "grpo": want})

    def _evaluate(self, row: Row, folder: Path, editor_dir: Path, lora: Path | None, step: int, key: dict) -> None:
        import torch
        from omegaconf import OmegaConf

        from editgrpo.evaluate import Evaluator
        from viva_base.edit import load_model
        from viva_base.peft_utils import ADAPTER

        key = {**key, "eval": OmegaConf.to_container(self.cfg.eval, resolve=True),
               "rewards": sorted(self.reward_fn.weights), "manifest": str(self.paths["eval"])}
        out = folder / "eval"
        self.evals[row.name].append(out / f"step-{step}")
        if (out / f"step-{step}" / "items.jsonl").exists() and (out / "key.json").exists() and \
                json.loads((out / "key.json").read_text()) == json.loads(json.dumps(key, default=str)):
            return
        start = time.time()
        editor = load_model(str(editor_dir), {ADAPTER: str(lora)} if lora else None, device="cpu",
                            dtype=torch.float32)
        eval_cfg = OmegaConf.merge(self.cfg.eval, {"manifest": str(self.paths["eval"])})
        if out.exists():
            shutil.rmtree(out)
        Evaluator(eval_cfg, self.reward_fn, out).run(editor, step=step)
        atomic_write_text(out / "key.json", json.dumps(key, default=str, indent=1))
        _time_file(folder, "eval_s", time.time() - start)

    # ------------------------------------------------------------------ the table
    def report(self, seconds: float) -> dict:
        for row in self.rows:
            times = {}
            for seed in self.seeds or [None]:
                path = self.run_dir(row, seed) / "timing.json"
                for k, v in (json.loads(path.read_text()) if path.exists() else {}).items():
                    times[k] = times.get(k, 0.0) + v
            self.seconds[row.name] = times
        result = ablation_table([r.name for r in self.rows], {r: self.evals[r] for r in self.evals})
        result.update(output_dir=str(self.root), sft_steps=self.sft_steps, seeds=self.seeds, quick=self.quick, seconds=seconds,
                      compute=self.seconds, eval_manifest=str(self.paths["eval"]),
                      rows_spec={r.name: {"sft_overrides": _overrides(r.sft), "edit_grpo": r.grpo,
                                          "ablates": list(r.ablates), "folder": str(self.run_dir(r, (self.seeds or [None])[0]))}
                                 for r in self.rows})
        from editgrpo.report import copy_source_groups

        source = copy_source_groups(self.paths["eval"])
        if source is not None:
            result["copy_source"] = {name: {m: source.get(g, {}).get(m) for m in ("oracle", "if_error", "sp_error")}
                                     for name, g in GROUPS}
        write_outputs(self.root, result)
        return result


def _values(eval_dirs: list[Path]) -> dict[str, dict]:
    """Per prompt id: its groups and each metric's mean over the eval dirs (training seeds), NaNs skipped."""
    from editgrpo.evaluate import item_groups, load_eval

    acc: dict[str, dict] = {}
    for d in eval_dirs:
        for it in load_eval(d)[0]:
            entry = acc.setdefault(it["id"], {"groups": set(item_groups(it)), "vals": {}})
            for m in METRICS:
                v = it["mean"].get(m)
                if v is not None and v == v:
                    entry["vals"].setdefault(m, []).append(v)
    return {i: {"groups": e["groups"], **{m: sum(v) / len(v) for m, v in e["vals"].items()}} for i, e in acc.items()}


def ablation_table(rows: list[str], evals: dict[str, list[Path]], n_boot: int = 2000) -> dict:
    """The Table-2 layout: ``table[row][group][metric] = {"mean", "n", "delta": {"mean", "ci95", "n"} | None}``,
    ``delta`` paired over the prompts both rows scored (this row minus the previous listed row)."""
    per_row = {r: _values(evals[r]) for r in rows}
    metrics = [m for m in METRICS if any(m in v for r in rows for v in per_row[r].values())]
    table: dict = {}
    for i, r in enumerate(rows):
        table[r] = {}
        for name, g in GROUPS:
            cell_row = {}
            for m in metrics:
                here = {k: v[m] for k, v in per_row[r].items() if g in v["groups"] and m in v}
                cell = {"mean": sum(here.values()) / len(here) if here else None, "n": len(here), "delta": None}
                if i > 0:
                    prev = per_row[rows[i - 1]]
                    pairs = [here[k] - prev[k][m] for k in here if k in prev and m in prev[k]]
                    if pairs:
                        mean, lo, hi = bootstrap_ci(pairs, n=n_boot, seed=0)
                        cell["delta"] = {"mean": mean, "ci95": [lo, hi], "n": len(pairs)}
                cell_row[m] = cell
            table[r][name] = cell_row
    return {"rows": rows, "groups": [n for n, _ in GROUPS], "metrics": metrics, "table": table}


def _fmt(cell: dict) -> str:
    if cell["mean"] is None:
        return "-"
    s = f"{cell['mean']:.3f}"
    d = cell["delta"]
    if d is not None:
        s += f" ({d['mean']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}])"
    return s


def markdown(result: dict) -> str:
    groups, rows = result["groups"], result["rows"]
    n = {g: result["table"][rows[0]][g][result["metrics"][0]]["n"] for g in groups} if rows and result["metrics"] else {}
    lines = ["# The VIVA ablation (paper Table 2) on the toy world", "",
             f"SFT steps per row: {result['sft_steps']}; training seeds: {result['seeds'] or 'the recipe default'}; "
             f"{'--quick (tiny sizes: structure only, not a result)' if result['quick'] else 'full run'}; "
             f"total {result['seconds'] / 60:.1f} min.",
             "Each cell: the row's mean over the group's held-out prompts; after the first row, in brackets its paired "
             "difference from the previous row with the bootstrap 95% interval over prompts. if_error and sp_error: "
             "lower is better; every other column: higher is better. oracle / if_error / sp_error / if_progress are "
             "measured against the true target; clip_if, clip_sp, pixel_sp and clip_tc are proxies.", ""]
    if "copy_source" in result:
        src = result["copy_source"]
        lines += ["Returning the source unchanged scores oracle " + ", ".join(
            f"{g} {src[g]['oracle']:.3f}" for g in groups if src.get(g, {}).get("oracle") is not None) + ".", ""]
    for m in result["metrics"]:
        lines += [f"## {m.removeprefix('reward/')}", "",
                  "| row | " + " | ".join(f"{g} ({n.get(g, 0)})" for g in groups) + " |",
                  "|---|" + "---|" * len(groups)]
        for r in rows:
            lines.append(f"| {r} | " + " | ".join(_fmt(result["table"][r][g][m]) for g in groups) + " |")
        lines.append("")
    lines += ["## Compute", "", "| row | seconds |", "|---|---|"]
    for name, times in result["compute"].items():
        lines.append(f"| {name} | " + ", ".join(f"{k} {v:.0f}" for k, v in times.items()) + " |")
    lines += ["", "Rows (SFT recipe overrides, over toy.sft_overrides):", ""]
    for r, spec in result["rows_spec"].items():
        lines.append(f"- {r}: {' '.join(spec['sft_overrides'])}{' + Edit-GRPO' if spec['edit_grpo'] else ''} "
                     f"(editor: {spec['folder']})")
    return "\n".join(lines) + "\n"


def plot(out: Path, result: dict) -> list[str]:
    """One PNG per metric: the rows' means per group (left) and each row's paired difference from the previous row
    with its 95% interval (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names, rows, groups = [], result["rows"], result["groups"]
    for m in result["metrics"]:
        fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4))
        x = range(len(rows))
        for gi, g in enumerate(groups):
            ys = [result["table"][r][g][m]["mean"] for r in rows]
            a.plot(list(x), [math.nan if y is None else y for y in ys], marker="o", label=g)
            for ri, r in enumerate(rows[1:], 1):
                d = result["table"][r][g][m]["delta"]
                if d is not None:
                    xpos = ri + (gi - len(groups) / 2) * 0.06
                    b.errorbar([xpos], [d["mean"]], yerr=[[d["mean"] - d["ci95"][0]], [d["ci95"][1] - d["mean"]]],
                               fmt="o", color=f"C{gi}", capsize=2)
        short = m.removeprefix("reward/")
        a.set_xticks(list(x), rows, fontsize=8)
        a.set_title(f"{short} per row" + (" (lower is better)" if m in LOWER_IS_BETTER else ""))
        a.legend(fontsize=7)
        b.axhline(0, color="grey", lw=0.8)
        b.set_xticks(list(x), ["", *[f"{r}\nvs previous" for r in rows[1:]]], fontsize=7)
        b.set_title(f"{short}: paired difference, 95% CI")
        fig.tight_layout()
        name = f"ablation_{short}.png"
        fig.savefig(out / name, dpi=80)
        plt.close(fig)
        names.append(name)
    return names


def write_outputs(out: Path, result: dict) -> None:
    import html

    from editgrpo.report import _md_tables_html

    md = markdown(result)
    images = plot(out, result)
    result["plots"] = images
    atomic_write_text(out / "ablation.md", md)
    atomic_write_text(out / "ablation.json", json.dumps(result, indent=1, default=str))
    body = _md_tables_html("\n".join(ln for ln in md.splitlines() if not ln.startswith("#")))
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>VIVA ablation (toy world)</title>"
            f"<style>table.t{{border-collapse:collapse}}table.t td,table.t th{{border:1px solid #ccc;padding:2px 6px;"
            f"font-size:12px}}</style></head><body><h1>{html.escape(md.splitlines()[0].lstrip('# '))}</h1>{body}"
            + "".join(f"<h3>{html.escape(n)}</h3><img src='{html.escape(n)}'>" for n in images) + "</body></html>")
    atomic_write_text(out / "ablation.html", page)


# ---------------------------------------------------------------------- command line
def parse(argv: list[str]):
    """``recipe=PATH`` / ``rows=...`` / ``key=value`` (the GRPO recipe's overrides), ``--quick``, ``--seeds S ...``,
    ``--sft-steps N``, in any order."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m benchmarks.ablation", description=__doc__.split("\n\n")[0],
                                epilog="Arguments key=value: recipe=PATH (a toy recipe, recipes/toy.yaml), "
                                       "rows=Vanilla,+V,+V+M,+V+M+I,+V+M+I+E (default: all), and any recipe key.")
    p.add_argument("--quick", action="store_true", help="tiny sizes (a few SFT steps, a few prompts): a smoke run")
    p.add_argument("--seeds", type=int, nargs="+", help="repeat every row over these training seeds")
    p.add_argument("--sft-steps", type=int, help=f"SFT steps per row (default {DEFAULT_SFT_STEPS}; "
                                                 f"--quick: {QUICK_SFT_STEPS})")
    p.add_argument("--recipe", help="the recipe (same as recipe=PATH)")
    pairs = [a for a in argv if "=" in a and not a.startswith("-")]
    args = p.parse_args([a for a in argv if a not in pairs])
    if args.sft_steps is not None and args.sft_steps < 1:
        p.error("--sft-steps must be >= 1")
    args.rows = next((a.split("=", 1)[1] for a in reversed(pairs) if a.startswith("rows=")), None)
    args.recipe_args = [*([f"recipe={args.recipe}"] if args.recipe else []), *(a for a in pairs if not a.startswith("rows="))]
    return args


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        from editgrpo.config import GRPOConfig
        from viva_base.recipe import check_output_dir, load_recipe, resolve_recipe_path

        rows = find_rows(args.rows)
        recipe_args = [*(QUICK if args.quick else []), *args.recipe_args]
        cfg = load_recipe(GRPOConfig, recipe_args)
        if not cfg.toy.enabled:
            raise UserError("the ablation runs on the toy world: give a recipe with toy.enabled: true, such as "
                            "recipe=recipes/toy.yaml")
        try:
            resolve_recipe_path(cfg.toy.sft_recipe or "")
        except RecipeError:
            raise UserError(f"toy.sft_recipe={cfg.toy.sft_recipe!r}: no such recipe file (the ablation needs a toy "
                            "recipe such as recipes/toy.yaml)") from None
        check_output_dir("output_dir", cfg.output_dir)
        steps = args.sft_steps or (QUICK_SFT_STEPS if args.quick else DEFAULT_SFT_STEPS)
        result = Ablation(cfg, rows, seeds=args.seeds, sft_steps=steps, quick=args.quick).run()
    except (RecipeError, UserError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = Path(result["output_dir"])
    print("compute (rows x time, seconds):")
    for name, times in result["compute"].items():
        print(f"  {name}: " + ", ".join(f"{k} {v:.0f}" for k, v in times.items()))
    print(f"ablation: {len(result['rows'])} rows x {result['sft_steps']} SFT steps in {result['seconds'] / 60:.1f} min; "
          f"table in {out / 'ablation.md'} (.json, .html)")
    return 0


if __name__ == "__main__":
    from viva_base.errors import exit_with

    exit_with(main)
