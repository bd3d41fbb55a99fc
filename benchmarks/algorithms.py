"""Time to TRUE quality: Edit-GRPO, Flow-GRPO's defaults, DiffusionNFT and AWM on the shared toy chain.

    python -m benchmarks.algorithms --out outputs/toy --seeds 0 1 2 [--configs grpo flow_grpo grpo_prefix nft awm] [key=value ...]
    python -m benchmarks.algorithms --quick --out /tmp/algos     # the whole pipeline at tiny sizes (minutes)

The toy chain (data, toy CLIP reward model, SFT editor) runs once and is shared, cached in ``--out`` (as
``benchmarks.toybench``: the same ``--out`` reuses a chain it already built). Each configuration of
:data:`CONFIGS` (overrides of ``--recipe``, default recipes/toy.yaml) is then trained once per training seed in
``--out/algorithms/<config>/seed-<s>``, evaluated on the held-out prompts every few iterations (about 6 points a
curve). Written to ``--out/algorithms/``:

* ``curves.png``: held-out oracle gain and proxy-reward gain over the SFT editor (mean over seeds and prompts)
  against training wall-clock seconds and against rollouts consumed;
* ``algorithms.json`` / ``algorithms.md``: per configuration the final oracle gain (pooled over seeds, 95%
  bootstrap interval over prompts), the change of ``if_error`` (the edit itself: lower is better), the proxy gain, seconds and rollouts, the seconds to reach the GRPO
  recipe's final oracle gain, and the oracle gain at a fixed budget (the GRPO recipe's wall-clock).

Seconds are the trainer's per-iteration ``seconds`` (rollouts + scoring + update; evaluation excluded), summed.
Several processes may share one ``--out`` (e.g. one per core, each given other ``--configs``): a run is trained
under a lock, so a process that reaches a run another one is training waits for it and then reuses it.
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
from pathlib import Path

from benchmarks.toybench import bootstrap_ci, pooled_delta, train_linked_run
from viva_base.recipe import atomic_write_text

# name -> (what it is, overrides of the recipe). Equal rollouts consumed: recipes/toy.yaml does 24 x 4 x 8 = 768.
CONFIGS: dict[str, tuple[str, list[str]]] = {
    "grpo": ("Edit-GRPO recipe (recipes/toy.yaml: SDE window of 4 steps, G 8, clip 1e-3)", []),
    "flow_grpo": ("Flow-GRPO defaults: SDE on every step, no window, G 24, clip 1e-4, beta 0.04 (flow_grpo KL)",
                  ["sampling.sde_window_size=null", "sampling.sde_window_range=null", "train.num_generations=24",
                   "train.epsilon=1.0e-4", "train.beta=0.04", "train.kl_type=flow_grpo", "train.num_iterations=8"]),
    "grpo_prefix": ("Edit-GRPO recipe with prefix sharing: a group shares its noise and the ODE steps before the "
                    "SDE window, computed once per prompt", ["sampling.share_prefix=true"]),
    "nft": ("DiffusionNFT: ODE rollouts, 2 re-noised timesteps per rollout, b = 1",
            ["train.algorithm=nft", "sampling.method=ode"]),
    "awm": ("Advantage-weighted matching: ODE rollouts, 2 re-noised timesteps per rollout",
            ["train.algorithm=awm", "sampling.method=ode"]),
    "nft_5step": ("DiffusionNFT with 5-step ODE rollouts (half the sampling cost)",
                  ["train.algorithm=nft", "sampling.method=ode", "sampling.num_steps=5"]),
}
DEFAULT_CONFIGS = ["grpo", "flow_grpo", "grpo_prefix", "nft", "awm"]
REFERENCE = "grpo"  # the targets: its final oracle gain and its wall-clock
# tiny sizes for --quick: the toy chain shrunk as tests/test_evaluate.py's smoke run, 2 iterations of each config
QUICK = ["toy.n_sft_video=8", "toy.n_sft_image=4", "toy.n_grpo=4", "toy.n_eval_compound=2", "toy.n_eval_simple=1",
         "toy.reward_steps=10", "toy.instructor_steps=5", "toy.instructor_compound=8",
         "toy.sft_overrides=[train.max_steps=3,train.checkpoint_every=0,train.compile=none]",
         "train.num_iterations=2", "train.prompts_per_iteration=2", "train.num_generations=2", "sampling.num_steps=3",
         "sampling.sde_window_size=1", "sampling.sde_window_range=null", "eval.num_steps=2", "eval.seeds=[1]",
         "eval.save_videos=0", "train.checkpoint_every=0", "report_to=none"]


def run_config(out: Path, name: str, seeds: list[int], overrides: list[str], recipe: str) -> list[Path]:
    """Train configuration ``name`` once per seed (skipping finished runs; an interrupted one resumes), each run
    linked to the shared chain in ``out``. Returns the run directories."""
    from editgrpo.config import GRPOConfig
    from viva_base.recipe import load_recipe

    runs = []
    for seed in seeds:
        run_dir = out / "algorithms" / name / f"seed-{seed}"
        args = [f"recipe={recipe}", *CONFIGS[name][1], *overrides, f"output_dir={run_dir}", f"train.seed={seed}",
                "resume=latest"]
        every = max(1, load_recipe(GRPOConfig, args).train.num_iterations // 6)
        train_linked_run(out, run_dir, [*args, f"eval.every={every}", "eval.at_start=true"])
        runs.append(run_dir)
    return runs


def _eval_steps(run: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in (run / "eval").glob("step-*"))


def gain_at(runs: list[Path], step: int, key: str = "oracle", n_boot: int = 2000) -> dict:
    """Per held-out prompt, the mean over ``runs`` of ``key`` at evaluation ``step`` minus at step 0 (the SFT
    editor), and its bootstrap mean and 95% interval over prompts (``bootstrap_ci``)."""
    from editgrpo.evaluate import load_eval

    per_run = []
    for run in runs:
        first = {r["id"]: r["mean"][key] for r in load_eval(run / "eval" / "step-0")[0]}
        per_run.append({r["id"]: r["mean"][key] - first[r["id"]] for r in load_eval(run / "eval" / f"step-{step}")[0]})
    ids = sorted(per_run[0])
    deltas = [sum(p[i] for p in per_run) / len(per_run) for i in ids]
    mean, lo, hi = bootstrap_ci(deltas, n=n_boot)
    return {"mean": mean, "ci95": [lo, hi]}


def curve(runs: list[Path], n_boot: int = 2000) -> list[dict]:
    """One point per evaluation step common to all ``runs``: mean training seconds so far (over seeds), rollouts
    consumed, and the pooled oracle and proxy (``reward``) gains."""
    steps = sorted(set.intersection(*(set(_eval_steps(r)) for r in runs)))
    if not steps or steps[0] != 0:
        raise ValueError(f"{runs[0].parent}: every run needs its step-0 evaluation (eval.at_start)")
    per_it = _rollouts_per_iteration(runs[0])
    rows = {run: [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
            for run in runs}
    points = []
    for step in steps:
        secs = [sum(r["seconds"] for r in rows[run] if r["step"] <= step) for run in runs]
        points.append({"step": step, "seconds": statistics.fmean(secs), "rollouts": step * per_it,
                       "oracle": gain_at(runs, step, "oracle", n_boot), "proxy": gain_at(runs, step, "reward", n_boot)})
    return points


def _rollouts_per_iteration(run: Path) -> int:
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(run / "config.yaml")
    return int(cfg.train.prompts_per_iteration) * int(cfg.train.num_generations)


def summarize(curves: dict[str, list[dict]], finals: dict[str, dict]) -> dict:
    """The table: per configuration its final gains, cost, seconds to reach the reference's final oracle gain
    (the first evaluation at or above it; None: never) and oracle gain at the reference's wall-clock budget (its
    last evaluation within the budget)."""
    ref = curves[REFERENCE] if REFERENCE in curves else next(iter(curves.values()))
    target, budget = ref[-1]["oracle"]["mean"], ref[-1]["seconds"]
    rows = {}
    for name, pts in curves.items():
        reach = next((p["seconds"] for p in pts if p["step"] > 0 and p["oracle"]["mean"] >= target), None)
        within = [p for p in pts if p["seconds"] <= budget * (1 + 1e-9)]
        at_budget = within[-1]["oracle"] if within else None
        last = pts[-1]
        rows[name] = {"what": CONFIGS.get(name, ("", []))[0], "seconds": last["seconds"], "rollouts": last["rollouts"],
                      "final_oracle_gain": finals[name]["all"], "final_proxy_gain": last["proxy"],
                      # the instruction-following error's change (lower is better): tells a gain by editing from
                      # one by preserving (returning more of the source)
                      "final_if_error_change": finals[name].get("by_group", {}).get("all", {}).get("if_error"),
                      "seconds_to_reference_gain": reach,
                      "speedup_vs_reference": (budget / reach) if reach else None,
                      "oracle_gain_at_budget": at_budget,
                      "oracle_falls_while_proxy_rises": last["oracle"]["mean"] < 0 < last["proxy"]["mean"],
                      "pooled": finals[name]}
    return {"reference": REFERENCE, "target_oracle_gain": target, "budget_seconds": budget, "configs": rows}


def _fmt(g: dict | None) -> str:
    return "-" if g is None else f"{g['mean']:+.4f} [{g['ci95'][0]:+.4f}, {g['ci95'][1]:+.4f}]"


def table_md(summary: dict, n_seeds: int) -> str:
    lines = [f"Reference: `{summary['reference']}`, final held-out oracle gain {summary['target_oracle_gain']:+.4f}, "
             f"wall-clock budget {summary['budget_seconds']:.0f} s; {n_seeds} training seeds; 95% bootstrap "
             f"intervals over held-out prompts (per-prompt gains averaged over seeds).", "",
             "| config | final oracle gain | final `if_error` change | final proxy gain | seconds | rollouts | "
             "s to reference gain | speed-up | oracle gain at budget | oracle falls, proxy rises |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in summary["configs"].items():
        reach = "never" if r["seconds_to_reference_gain"] is None else f"{r['seconds_to_reference_gain']:.0f}"
        speed = "-" if r["speedup_vs_reference"] is None else f"{r['speedup_vs_reference']:.2f}x"
        lines.append(f"| {name} | {_fmt(r['final_oracle_gain'])} | {_fmt(r.get('final_if_error_change'))} | "
                     f"{_fmt(r['final_proxy_gain'])} | "
                     f"{r['seconds']:.0f} | {r['rollouts']} | {reach} | {speed} | {_fmt(r['oracle_gain_at_budget'])} | "
                     f"{'YES' if r['oracle_falls_while_proxy_rises'] else 'no'} |")
    return "\n".join(lines) + "\n"


def plot(curves: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 8), sharey="row")
    for name, pts in curves.items():
        for row, key in enumerate(("oracle", "proxy")):
            for col, x in enumerate(("seconds", "rollouts")):
                ax = axes[row][col]
                xs = [p[x] for p in pts]
                ax.plot(xs, [p[key]["mean"] for p in pts], marker="o", label=name)
                ax.fill_between(xs, [p[key]["ci95"][0] for p in pts], [p[key]["ci95"][1] for p in pts], alpha=0.15)
                ax.axhline(0, color="grey", lw=0.5)
                ax.set_xlabel("training wall-clock (s)" if x == "seconds" else "rollouts consumed")
                ax.set_ylabel(f"held-out {'oracle' if key == 'oracle' else 'proxy reward'} gain over SFT")
    axes[0][0].legend()
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def run(out: Path, seeds: list[int], configs: list[str], overrides: list[str], recipe: str, n_boot: int = 2000) -> dict:
    curves, finals = {}, {}
    for name in configs:
        runs = run_config(out, name, seeds, overrides, recipe)
        curves[name] = curve(runs, n_boot)
        finals[name] = pooled_delta(runs, n_boot=n_boot)
    summary = summarize(curves, finals)
    result = {"seeds": seeds, "recipe": recipe, "overrides": overrides, **summary, "curves": curves}
    dest = out / "algorithms"
    md = table_md(summary, len(seeds))
    atomic_write_text(dest / "algorithms.md", md)
    atomic_write_text(dest / "algorithms.json", json.dumps(result, indent=2))
    plot(curves, dest / "curves.png")
    print(md)
    return result


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.algorithms", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="outputs/toy", help="the toy chain's folder (shared with benchmarks.toybench)")
    p.add_argument("--seeds", nargs="+", default=["0", "1", "2"], help="training seeds of each configuration")
    p.add_argument("--configs", nargs="+", default=None,
                   help=f"configurations to run, of {', '.join(CONFIGS)} (default: {' '.join(DEFAULT_CONFIGS)}; "
                        f"--quick: all)")
    p.add_argument("--recipe", default="recipes/toy.yaml")
    p.add_argument("--quick", action="store_true", help="tiny chain and runs: checks the pipeline, measures nothing")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the recipe, for every configuration")
    args = p.parse_args(argv)
    # key=value overrides may follow --seeds / --configs directly (argparse alone would take them as values)
    listed = [*args.seeds, *(args.configs or [])]
    args.overrides = [*[w for w in listed if "=" in w], *args.overrides]
    args.seeds = [w for w in args.seeds if "=" not in w]
    if not args.seeds or not all(w.lstrip("-").isdigit() for w in args.seeds):
        p.error(f"--seeds needs integer seeds, got {args.seeds}")
    args.seeds = [int(w) for w in args.seeds]
    if args.configs is not None:
        args.configs = [w for w in args.configs if "=" not in w]
        unknown = [c for c in args.configs if c not in CONFIGS]
        if unknown:
            p.error(f"--configs: unknown {unknown[0]!r}; choose from {', '.join(CONFIGS)}")
    args.configs = args.configs or (list(CONFIGS) if args.quick else DEFAULT_CONFIGS)
    if REFERENCE not in args.configs:
        args.configs.insert(0, REFERENCE)  # the targets come from it
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    overrides = [*args.overrides, *QUICK] if args.quick else args.overrides
    from viva_base.errors import UserError
    from viva_base.recipe import RecipeError, check_output_dir

    from .toybench import check_toy_recipe

    try:
        for name in args.configs:  # every configuration's recipe before the first one trains (hours)
            try:
                check_toy_recipe(args.recipe, [*CONFIGS[name][1], *overrides])
            except (RecipeError, UserError) as exc:
                raise UserError(f"configuration {name}: {exc}") from None
        check_output_dir("--out", args.out)
        run(Path(args.out), args.seeds, args.configs, overrides, args.recipe, n_boot=200 if args.quick else 2000)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    from viva_base.errors import exit_with

    exit_with(main)
