"""Toy-world benchmark: does Edit-GRPO improve the TRUE edit accuracy, across training seeds?

    python -m benchmarks.toybench --out outputs/toy --seeds 0 1 2 [key=value ...]
    python -m benchmarks.toybench --out outputs/toy --sft-seeds 0 1 2 [key=value ...]

Runs the toy chain once (data, reward model and SFT editor are shared and cached in ``--out``), then the
Edit-GRPO stage once per training seed in ``--out/seed-<s>`` (each with its own held-out evaluation and
report), and writes ``--out/toybench.json`` / ``toybench.md``: per seed the SFT and GRPO oracle and the
paired delta with its bootstrap interval over prompts, the mean delta over seeds with its spread, and per evaluation
group (splits, edit types, open instructions) the pooled oracle and ``if_error`` deltas with their intervals.

``--sft-seeds`` varies the SFT stage's training seed instead (``train.seed`` of the SFT recipe): one whole chain per
seed in ``--out/sft-seed-<s>``, sharing the data, toy CLIP and toy instructor of ``--out`` (the seed the chain's own
SFT stage has reuses ``--out/sft`` too), and writes ``--out/sftbench.json`` / ``sftbench.md``: per seed the SFT
editor's held-out numbers (simple-edit oracle against returning the source, ``if_progress``, ``sp_error`` and its
split at the edit's boundary and in the interior, compound prompts, the progress of the 1st/2nd/3rd named operation)
and its Edit-GRPO delta, then each number's mean, standard deviation and range over the seeds. A recipe change smaller than that spread is not shown by one run.

The oracle metric functions live in :mod:`viva_base.data.toyworld.oracle` (the trainer's evaluation
computes them too) and are re-exported here.
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
from contextlib import contextmanager
from pathlib import Path

from viva_base.data.toyworld.oracle import (average_ranks, bootstrap_ci, masked_mean_abs,  # noqa: F401
                                            oracle_scores, spearman)
from viva_base.recipe import atomic_write_text

SHARED = ("data", "reward_model", "instructor", "sft")  # every stage before Edit-GRPO


def pooled_delta(run_dirs: list[Path], *, n_boot: int = 2000) -> dict:
    """Per held-out prompt, the mean over runs of ``oracle(GRPO) - oracle(SFT)`` (each run's first and last
    evaluation, ``eval/step-<k>/items.jsonl``), and its bootstrap mean and 95% interval over prompts (the
    prompts are the random unit; the runs differ only in their training seed). Also per split
    (``compound`` / ``simple``) and the number of prompts whose pooled delta is positive; and ``by_group``: for every
    evaluation group (:func:`editgrpo.evaluate.item_groups`: splits, edit types, open instructions) the pooled
    oracle and ``if_error`` deltas with their intervals."""
    from editgrpo.evaluate import item_groups, load_eval

    per_run = []
    for run in run_dirs:
        steps = sorted((int(p.name.split("-")[1]), p) for p in (Path(run) / "eval").glob("step-*"))
        if len(steps) < 2:
            raise ValueError(f"{run}/eval holds {len(steps)} evaluation(s); a run needs its first and last one")
        first, _ = load_eval(steps[0][1])
        last, _ = load_eval(steps[-1][1])
        before = {r["id"]: r for r in first}
        per_run.append({r["id"]: (r["mean"]["oracle"] - before[r["id"]]["mean"]["oracle"], before[r["id"]]["split"],
                                  r["mean"].get("if_error", float("nan")) - before[r["id"]]["mean"].get("if_error", float("nan")),
                                  item_groups(before[r["id"]]))
                        for r in last})
    ids = sorted(per_run[0])
    if any(sorted(p) != ids for p in per_run):
        raise ValueError("the runs were evaluated on different prompts; pool runs of one chain only")
    deltas = {i: sum(p[i][0] for p in per_run) / len(per_run) for i in ids}
    if_deltas = {i: sum(p[i][2] for p in per_run) / len(per_run) for i in ids}
    out = {"n_runs": len(per_run), "n_prompts": len(ids), "improved": sum(d > 0 for d in deltas.values())}
    mean, lo, hi = bootstrap_ci(list(deltas.values()), n=n_boot)
    out["all"] = {"mean": mean, "ci95": [lo, hi]}
    for split in ("compound", "simple"):
        sel = [deltas[i] for i in ids if per_run[0][i][1].startswith(split)]
        if sel:
            mean, lo, hi = bootstrap_ci(sel, n=n_boot)
            out[split] = {"n": len(sel), "mean": mean, "ci95": [lo, hi]}
    groups: dict[str, list] = {}
    for i in ids:
        for g in per_run[0][i][3]:
            groups.setdefault(g, []).append(i)
    out["by_group"] = {}
    for g, members in sorted(groups.items()):
        entry = {"n": len(members)}
        for key, values in (("oracle", deltas), ("if_error", if_deltas)):
            sel = [values[i] for i in members if values[i] == values[i]]
            if sel:
                mean, lo, hi = bootstrap_ci(sel, n=n_boot)
                entry[key] = {"mean": mean, "ci95": [lo, hi]}
        out["by_group"][g] = entry
    return out


@contextmanager
def run_lock(run_dir: Path):
    """Hold an exclusive lock on ``run_dir`` (``flock`` on ``run_dir/.benchmark.lock``) while training it, so two
    benchmark processes sharing an ``--out`` (``toybench``, ``algorithms``: each trains the reference runs) never
    train the same run at once: the second waits, then finds the run finished and reuses it."""
    import fcntl

    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / ".benchmark.lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logging.getLogger(__name__).info("%s is being trained by another process: waiting for it", run_dir)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def train_linked_run(out: Path, run_dir: Path, args: list[str], shared=SHARED, edit=None) -> None:
    """Train the Edit-GRPO run ``run_dir`` (recipe ``args``, which set its ``output_dir``) unless it has finished
    (``report.json``), its chain stages ``shared`` (default :data:`SHARED`) linked to the shared, cached ones in
    ``out``. ``edit``: a function given the loaded recipe before training (what an override string cannot say)."""
    from editgrpo.config import GRPOConfig
    from editgrpo.train import main as train_main
    from viva_base.recipe import load_recipe

    run_dir.mkdir(parents=True, exist_ok=True)
    for name in shared:
        (out / name).mkdir(parents=True, exist_ok=True)
        link = run_dir / name
        if not link.exists():
            link.symlink_to((out / name).resolve(), target_is_directory=True)
    with run_lock(run_dir):
        if not (run_dir / "report.json").exists():
            cfg = load_recipe(GRPOConfig, args)
            if edit is not None:
                edit(cfg)
            train_main(cfg)


def run(out: Path, seeds: list[int], overrides: list[str], recipe: str) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for seed in seeds:
        run_dir = out / f"seed-{seed}"
        train_linked_run(out, run_dir, [f"recipe={recipe}", f"output_dir={run_dir}", f"train.seed={seed}",
                                        "resume=latest", *overrides])
        rep = json.loads((run_dir / "report.json").read_text())
        rows.append({"seed": seed, "sft": rep["sft"]["oracle"], "grpo": rep["grpo"]["oracle"],
                     "delta": rep["delta_oracle"]["mean"], "ci95": rep["delta_oracle"]["ci95"],
                     "reward_sft": rep["sft"].get("reward"), "reward_grpo": rep["grpo"].get("reward"),
                     "n_prompts": rep["n_prompts"]})
    deltas = [r["delta"] for r in rows]
    result = {"seeds": rows, "mean_delta": statistics.fmean(deltas),
              "std_delta": statistics.stdev(deltas) if len(deltas) > 1 else None,
              "seeds_improved": sum(d > 0 for d in deltas), "n_seeds": len(deltas),
              "pooled": pooled_delta([out / f"seed-{seed}" for seed in seeds])}
    lines = ["| seed | SFT oracle | GRPO oracle | delta | 95% CI (prompts) | SFT reward | GRPO reward |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['seed']} | {r['sft']:.4f} | {r['grpo']:.4f} | {r['delta']:+.4f} | "
                     f"[{r['ci95'][0]:+.4f}, {r['ci95'][1]:+.4f}] | {r['reward_sft']:.4f} | {r['reward_grpo']:.4f} |")
    lines.append(f"\nmean delta over {len(rows)} seeds: {result['mean_delta']:+.4f}"
                 + (f" (std {result['std_delta']:.4f})" if result["std_delta"] is not None else "")
                 + f"; improved on {result['seeds_improved']}/{len(rows)} seeds")
    pooled = result["pooled"]
    lines.append(f"pooled over seeds, per prompt: {pooled['all']['mean']:+.4f} "
                 f"[{pooled['all']['ci95'][0]:+.4f}, {pooled['all']['ci95'][1]:+.4f}] (95% CI over "
                 f"{pooled['n_prompts']} prompts; {pooled['improved']} improved)")
    lines += ["", "| group | prompts | oracle delta [95% CI] | if_error delta [95% CI] |", "|---|---|---|---|"]
    for g, e in pooled["by_group"].items():
        cells = [f"{e[k]['mean']:+.4f} [{e[k]['ci95'][0]:+.4f}, {e[k]['ci95'][1]:+.4f}]" if k in e else "-"
                 for k in ("oracle", "if_error")]
        lines.append(f"| {g} | {e['n']} | {cells[0]} | {cells[1]} |")
    atomic_write_text(out / "toybench.md", "\n".join(lines) + "\n")
    atomic_write_text(out / "toybench.json", json.dumps(result, indent=2))
    print("\n".join(lines))
    return result


# the SFT editor's numbers per seed: (column, report.json path); "sft" is report["groups"]["sft"]
SFT_COLUMNS = (
    ("simple oracle", ("groups", "sft", "split/simple", "oracle")),
    ("source, simple", ("copy_source_groups", "split/simple", "oracle")),
    ("simple if_progress", ("if_progress", "simple", "sft")),
    ("simple sp_error", ("groups", "sft", "split/simple", "sp_error")),
    ("sp_error", ("groups", "sft", "all", "sp_error")),
    ("sp_error at the boundary", ("preservation", "all", "sp_boundary", "sft")),
    ("sp_error interior", ("preservation", "all", "sp_interior", "sft")),
    # compound prompts of 3 operations, one a background edit: where the seeds' sp_error differs (twenty-first pass)
    ("sp_error, 3 ops with background", ("groups", "sft", "ops/3/background", "sp_error")),
    ("oracle", ("groups", "sft", "all", "oracle")),
    ("compound seen", ("groups", "sft", "split/compound-seen", "oracle")),
    ("compound novel", ("groups", "sft", "split/compound-novel", "oracle")),
    ("1st op", ("op_progress", "compound", "op1", "sft")),
    ("2nd op", ("op_progress", "compound", "op2", "sft")),
    ("3rd op", ("op_progress", "compound", "op3", "sft")),
    ("GRPO delta", ("delta_oracle", "mean")),
)


def _get(report: dict, path: tuple):
    for key in path:
        if not isinstance(report, dict) or key not in report:
            return None
        report = report[key]
    return report


def sft_seed_table(reports: dict[int, dict]) -> dict:
    """Per SFT training seed (``reports``: seed -> the chain's ``report.json``) the values of :data:`SFT_COLUMNS`,
    the number of simple edit types whose SFT oracle beats returning the source (``types_above_source``, of
    ``types``), and per column the mean, sample standard deviation, min and max over the seeds (columns a report
    lacks, e.g. an evaluation without compound prompts, are left out of those)."""
    rows = []
    for seed, rep in sorted(reports.items()):
        row = {"seed": seed, **{name: _get(rep, path) for name, path in SFT_COLUMNS}}
        sft, src = _get(rep, ("groups", "sft")) or {}, rep.get("copy_source_groups") or {}
        types = [g for g in sft if g.startswith("type/") and g != "type/compound" and g in src]
        row["types"] = len(types)
        row["types_above_source"] = sum(sft[g]["oracle"] > src[g]["oracle"] for g in types)
        row["grpo_ci95"] = _get(rep, ("delta_oracle", "ci95"))
        rows.append(row)
    summary = {}
    for name, _ in SFT_COLUMNS:
        vals = [r[name] for r in rows if r[name] is not None]
        if vals:
            summary[name] = {"n": len(vals), "mean": statistics.fmean(vals), "min": min(vals), "max": max(vals),
                             "std": statistics.stdev(vals) if len(vals) > 1 else None}
    return {"rows": rows, "summary": summary}


def sft_seed_markdown(table: dict, pooled: dict | None = None) -> str:
    names = [n for n, _ in SFT_COLUMNS if n in table["summary"]]
    lines = ["| SFT seed | " + " | ".join(names) + " | types above source | GRPO delta 95% CI |",
             "|---" * (len(names) + 3) + "|"]
    for r in table["rows"]:
        ci = r["grpo_ci95"]
        cells = [(f"{r[n]:+.4f}" if n == "GRPO delta" else f"{r[n]:.4f}") if r[n] is not None else "-" for n in names]
        lines.append(f"| {r['seed']} | " + " | ".join(cells) + f" | {r['types_above_source']}/{r['types']} | "
                     + (f"[{ci[0]:+.4f}, {ci[1]:+.4f}]" if ci else "-") + " |")
    for stat in ("mean", "std", "min", "max"):
        cells = [f"{table['summary'][n][stat]:.4f}" if table["summary"][n][stat] is not None else "-" for n in names]
        lines.append(f"| {stat} | " + " | ".join(cells) + " | | |")
    if pooled is not None:
        lines.append(f"\nEdit-GRPO, pooled over the {pooled['n_runs']} SFT seeds per prompt: "
                     f"{pooled['all']['mean']:+.4f} "
                     f"[{pooled['all']['ci95'][0]:+.4f}, {pooled['all']['ci95'][1]:+.4f}] (95% CI over "
                     f"{pooled['n_prompts']} prompts; {pooled['improved']} improved)")
    return "\n".join(lines) + "\n"


def run_sft_seeds(out: Path, seeds: list[int], overrides: list[str], recipe: str) -> dict:
    """One chain per SFT training seed (module docstring); returns what ``sftbench.json`` holds."""
    from omegaconf import OmegaConf

    from editgrpo.config import GRPOConfig
    from viva_base.recipe import load_recipe
    from viva_base.sft import SFTConfig

    out.mkdir(parents=True, exist_ok=True)
    t = load_recipe(GRPOConfig, [f"recipe={recipe}", *overrides]).toy
    own = load_recipe(SFTConfig, [f"recipe={t.sft_recipe}", *t.sft_overrides]).train.seed  # the chain's own stage
    reports, runs = {}, []
    for seed in seeds:
        run_dir = out / f"sft-seed-{seed}"

        def with_seed(cfg, seed=seed):
            cfg.toy.sft_overrides = [*OmegaConf.to_container(cfg.toy.sft_overrides), f"train.seed={seed}"]

        shared = ("data", "reward_model", "instructor", *(("sft",) if seed == own else ()))
        train_linked_run(out, run_dir, [f"recipe={recipe}", f"output_dir={run_dir}", "resume=latest", *overrides],
                         shared=shared, edit=with_seed)
        reports[seed] = json.loads((run_dir / "report.json").read_text())
        runs.append(run_dir)
    table = sft_seed_table(reports)
    pooled = pooled_delta(runs) if len(runs) > 1 else None
    result = {**table, "seeds": seeds, "recipe": recipe, "overrides": overrides, "grpo_pooled": pooled}
    md = sft_seed_markdown(table, pooled)
    atomic_write_text(out / "sftbench.md", md)
    atomic_write_text(out / "sftbench.json", json.dumps(result, indent=2))
    print(md)
    return result


def parse_args(argv=None) -> argparse.Namespace:
    """The arguments, in any order: ``key=value`` overrides may also follow ``--seeds 0 1 2`` directly (argparse
    alone would read them as seeds)."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.toybench", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="outputs/toybench")
    p.add_argument("--seeds", nargs="+", default=None, help="training seeds of the Edit-GRPO stage (default 0 1 2)")
    p.add_argument("--sft-seeds", nargs="+", default=None,
                   help="training seeds of the SFT stage instead: one chain per seed (sftbench.md)")
    p.add_argument("--recipe", default="recipes/toy.yaml")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the GRPO recipe")
    args = p.parse_args(argv)
    if args.seeds is not None and args.sft_seeds is not None:
        p.error("give --seeds (Edit-GRPO's training seeds) or --sft-seeds (the SFT stage's), not both")
    flag = "--sft-seeds" if args.sft_seeds is not None else "--seeds"
    given = args.sft_seeds if args.sft_seeds is not None else args.seeds if args.seeds is not None else ["0", "1", "2"]
    args.overrides = [*[s for s in given if "=" in s], *args.overrides]
    bad = [s for s in given if "=" not in s and not s.lstrip("-").isdigit()]
    if bad:
        p.error(f"{flag}: {bad[0]!r} is not an integer seed")
    seeds = [int(s) for s in given if "=" not in s]
    if not seeds:
        p.error(f"{flag} needs at least one integer seed")
    args.seeds, args.sft_seeds = (None, seeds) if flag == "--sft-seeds" else (seeds, None)
    return args


def check_toy_recipe(recipe: str, overrides: list[str]):
    """``recipe`` + ``overrides`` loaded and checked as ``editgrpo.train`` checks them (``validate_config``), and a
    toy-chain recipe (``toy.enabled``), before a benchmark runs any stage. Returns the config; raises RecipeError or
    UserError."""
    from editgrpo.config import GRPOConfig, validate_config
    from viva_base.errors import UserError
    from viva_base.recipe import load_recipe

    cfg = load_recipe(GRPOConfig, [f"recipe={recipe}", *overrides])
    if not cfg.toy.enabled:
        raise UserError(f"--recipe {recipe}: the benchmark runs the toy chain; give a recipe with "
                        "toy.enabled: true, such as recipes/toy.yaml")
    validate_config(cfg)
    return cfg


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from viva_base.errors import UserError
    from viva_base.recipe import RecipeError

    from viva_base.recipe import check_output_dir

    try:  # the recipe and its overrides are checked before any stage runs
        check_toy_recipe(args.recipe, args.overrides)
        check_output_dir("--out", args.out)
        if args.sft_seeds is not None:
            run_sft_seeds(Path(args.out), args.sft_seeds, args.overrides, args.recipe)
        else:
            run(Path(args.out), args.seeds, args.overrides, args.recipe)
    except (RecipeError, UserError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    from viva_base.errors import exit_with

    exit_with(main)
