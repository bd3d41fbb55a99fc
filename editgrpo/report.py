"""The end-of-run report: the starting policy (SFT) against the trained one (SFT + Edit-GRPO) on the
held-out prompts, in the layout of the VIVA paper's Table 2 (per edit type; oracle and proxy columns),
with reward curves, side-by-side clips and ``report.json``.

``delta_oracle`` is the paired difference of the per-prompt oracle score (each prompt's mean over the
eval seeds), with a percentile bootstrap 95% interval over prompts.
"""
from __future__ import annotations

import html
import json
import os
import shutil
from pathlib import Path

from viva_base.data.toyworld.oracle import bootstrap_ci
from viva_base.recipe import atomic_write_text
from viva_base.video import read_video, write_video

from .evaluate import load_eval

COLUMNS = ["oracle", "if_error", "sp_error", "if_progress", "reward"]
ORACLE_COLUMNS = ("oracle", "if_error", "sp_error", "if_progress")


def _fmt(v) -> str:
    return "–" if v is None or v != v else f"{v:.4f}"


def comparison_table(sft: dict, grpo: dict, keys: list[str], source: dict | None = None) -> str:
    """Markdown: one row per group (all, splits, edit types), SFT and GRPO side by side for each key; with
    ``source`` (the groups of :func:`copy_source_groups`), a "source" column first for each oracle key: the
    score of returning the source unchanged, the baseline an editor must beat."""
    def cols(k):
        return (["source"] if source is not None and k in ORACLE_COLUMNS else []) + ["SFT", "GRPO"]

    head = "| group | n | " + " | ".join(f"{k} {c}" for k in keys for c in cols(k)) + " |"
    sep = "|" + "---|" * (2 + sum(len(cols(k)) for k in keys))
    lines = [head, sep]
    order = sorted(sft, key=lambda g: (g != "all", not g.startswith("split"), g))
    for g in order:
        a, b, c = sft[g], grpo.get(g, {}), (source or {}).get(g, {})
        cells = " | ".join(_fmt({"source": c, "SFT": a, "GRPO": b}[col].get(k)) for k in keys for col in cols(k))
        lines.append(f"| {g} | {a['n']} | {cells} |")
    return "\n".join(lines) + "\n"


OP_PLACES = ("1st", "2nd", "3rd")
OPS_TITLE = "Which operations of a compound instruction are carried out"
OPS_CAPTION = ("progress of each operation in the pixels it changes, by its place in the instruction (1: as the "
               "target, 0: as the source; pooled over the prompts: 1 - mean error / mean error of the source)")


def op_progress(sft_groups: dict, grpo_groups: dict) -> dict:
    """``{split: {"op<k>": {"sft": p, "grpo": p}}}`` for the splits whose prompts have per-operation progress
    (``op<k>_progress`` of :func:`editgrpo.evaluate.group_means`: compound toy prompts)."""
    out = {}
    for g, stats in sft_groups.items():
        if not g.startswith("split/"):
            continue
        ops = {f"op{k}": {"sft": stats[f"op{k}_progress"], "grpo": grpo_groups.get(g, {}).get(f"op{k}_progress")}
               for k in range(1, 4) if stats.get(f"op{k}_progress") is not None}
        if ops:
            out[g.split("/", 1)[1]] = ops
    return out


def op_progress_table(ops: dict) -> str:
    """The markdown table of :func:`op_progress`: a row per split, SFT and GRPO per place in the instruction."""
    n = max(len(v) for v in ops.values())
    head = "| group | " + " | ".join(f"{OP_PLACES[k]} op SFT | {OP_PLACES[k]} op GRPO" for k in range(n)) + " |"
    lines = [head, "|---" * (1 + 2 * n) + "|"]
    for split, row in ops.items():
        cells = []
        for k in range(1, n + 1):
            v = row.get(f"op{k}", {})
            cells += [_fmt(v.get("sft")), _fmt(v.get("grpo"))]
        lines.append(f"| {split} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


SP_TITLE = "Where the preservation error sits"
SP_CAPTION = ("sp_error split by where the kept pixel lies: at the edit's boundary (its DiT token also holds edited "
              "pixels, so the token must change some pixels and keep others) or in the interior; share: the kept "
              "pixels at the boundary. Means over the prompts of a group (preservation_split in "
              "viva_base/data/toyworld/oracle.py); ops/<n>/background: compound prompts of n operations, one of "
              "them a background edit (their kept pixels are objects), ops/<n>/objects: none of them")
SP_KEYS = ("sp_error", "sp_boundary", "sp_interior", "sp_boundary_share")


def preservation(sft_groups: dict, grpo_groups: dict) -> dict:
    """``{group: {key: {"sft": v, "grpo": v}}}`` of :data:`SP_KEYS` for ``all``, the splits, the edit types and the
    compound prompts by their number of operations and whether one edits the background (``ops/<n>/...``), where
    the evaluation split the preservation error (:func:`editgrpo.evaluate.group_means` of ``sp_boundary``...)."""
    out = {}
    for g, stats in sft_groups.items():
        if g == "all" or g.startswith(("split/", "type/", "ops/")):
            if stats.get("sp_boundary_share") is not None:
                out[g] = {k: {"sft": stats.get(k), "grpo": grpo_groups.get(g, {}).get(k)} for k in SP_KEYS}
    return out


def preservation_table(sp: dict) -> str:
    """The markdown table of :func:`preservation`: a row per group, SFT and GRPO per key."""
    names = {"sp_error": "sp_error", "sp_boundary": "at the boundary", "sp_interior": "interior"}
    head = "| group | share at the boundary | " + " | ".join(f"{names[k]} SFT | {names[k]} GRPO" for k in names) + " |"
    lines = [head, "|---" * (2 + 2 * len(names)) + "|"]
    for g in sorted(sp, key=lambda g: (g != "all", not g.startswith("split"), g)):
        cells = [_fmt(sp[g]["sp_boundary_share"]["sft"])]  # a property of the prompts' masks: one column
        cells += [f"{_fmt(sp[g][k]['sft'])} | {_fmt(sp[g][k]['grpo'])}" for k in names]
        lines.append(f"| {g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def sampler_text(sampler: dict) -> str:
    """``Evaluator.sampler``'s record in words, e.g. "10 ODE steps, shift 6, CFG 2 where 0.5 < sigma <= 1"."""
    interval = sampler.get("guidance_interval")
    where = "on every step" if interval is None else f"where {interval[0]:g} < sigma <= {interval[1]:g}"
    return (f"{sampler['num_steps']} {sampler.get('method', 'ode').upper()} steps, shift {sampler['shift']:g}, "
            f"CFG {sampler['guidance_scale']:g} {where}")


def copy_source_groups(manifest: str | os.PathLike) -> dict | None:
    """Oracle metrics of the trivial editor that returns the source unchanged, per group (as
    :func:`editgrpo.evaluate.group_means`), for an eval manifest with true targets; None without them."""

    from viva_base.data.manifest import read_manifest
    from viva_base.data.toyworld.oracle import best_oracle_scores, record_truths

    from .evaluate import group_means, record_operations

    records = read_manifest(manifest, "eval")
    if not records or not all(r.get("target") and r.get("mask") for r in records):
        return None
    rows = []
    for r in records:
        src = read_video(r["source"]).frames[None]
        o = best_oracle_scores(src, src, [record_truths(r)])
        rows.append({"edit_type": r.get("edit_type"), "split": r.get("split"), "novel_combo": r.get("novel_combo"),
                     "open": r.get("open"), "operations": record_operations(r),
                     "mean": {k: float(o[k][0]) for k in ORACLE_COLUMNS}})
    return group_means(rows, list(ORACLE_COLUMNS))


def plot_curves(metrics_path: Path, out_png: Path, eval_points: list[tuple[int, float]]) -> bool:
    """Reward (total and components) per iteration, and the eval oracle score, with matplotlib."""
    if not metrics_path.exists():
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    if not rows:
        return False
    keys = ["reward"] + sorted(k for k in rows[0] if k.startswith("reward/"))
    fig, axes = plt.subplots(1, 2 if eval_points else 1, figsize=(11 if eval_points else 6, 3.6), squeeze=False)
    ax = axes[0][0]
    steps = [r["step"] for r in rows]
    for k in keys:
        ax.plot(steps, [r.get(k) for r in rows], label=k, lw=1.4 if k == "reward" else 1.0)
    ax.set_xlabel("iteration")
    ax.set_ylabel("mean reward of the rollouts")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    if eval_points:
        ax2 = axes[0][1]
        ax2.plot([s for s, _ in eval_points], [v for _, v in eval_points], "o-", color="tab:green")
        ax2.set_xlabel("iteration")
        ax2.set_ylabel("held-out oracle score")
        ax2.grid(alpha=0.3)
    fig.tight_layout()
    tmp = out_png.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, out_png)
    return True


def write_report(out_dir: str | os.PathLike, *, eval_dir: str | os.PathLike, start_step: int, final_step: int,
                 seconds: float, eval_manifest: str | None = None, title: str = "Edit-GRPO report",
                 diagnostics: str | os.PathLike | None = None) -> dict:
    """Write ``report.json``, ``report.md``, ``reward_curves.png`` and ``report.html`` into ``out_dir``."""
    out, eval_dir = Path(out_dir), Path(eval_dir)
    rows_a, sum_a = load_eval(eval_dir / f"step-{start_step}")
    rows_b, sum_b = load_eval(eval_dir / f"step-{final_step}")
    by_id = {r["id"]: r for r in rows_b}
    keys = [k for k in COLUMNS if k in sum_a["groups"]["all"]]
    keys += sorted(k for k in sum_a["groups"]["all"] if k.startswith("reward/"))
    result = {"sft": {k: sum_a["groups"]["all"].get(k) for k in keys},
              "grpo": {k: sum_b["groups"]["all"].get(k) for k in keys},
              "n_prompts": len(rows_a), "seeds": sum_a["seeds"], "seconds": seconds,
              "start_step": start_step, "final_step": final_step,
              "groups": {"sft": sum_a["groups"], "grpo": sum_b["groups"]}}
    for key in ("oracle", "reward"):
        if key in sum_a["groups"]["all"]:
            deltas = [by_id[r["id"]]["mean"][key] - r["mean"][key] for r in rows_a if r["id"] in by_id]
            mean, lo, hi = bootstrap_ci(deltas, n=5000, seed=0)
            wins = sum(d > 0 for d in deltas)
            result[f"delta_{key}"] = {"mean": mean, "ci95": [lo, hi], "wins": wins, "losses": sum(d < 0 for d in deltas),
                                      "n": len(deltas)}
    source = copy_source_groups(eval_manifest) if eval_manifest and "oracle" in keys else None
    if source is not None:
        result["copy_source"] = {k: source["all"][k] for k in ORACLE_COLUMNS}
        result["copy_source_groups"] = source
    if "if_progress" in keys:  # per split: how much of the way from the source to the target each policy went
        result["if_progress"] = {g.split("/", 1)[1]: {"sft": sum_a["groups"][g].get("if_progress"),
                                                      "grpo": sum_b["groups"].get(g, {}).get("if_progress")}
                                 for g in sum_a["groups"] if g.startswith("split/")}
        result["if_progress"]["all"] = {"sft": result["sft"]["if_progress"], "grpo": result["grpo"]["if_progress"]}
    table = comparison_table(sum_a["groups"], sum_b["groups"], keys, source)
    ops = op_progress(sum_a["groups"], sum_b["groups"])
    ops_md = f"{OPS_CAPTION}\n\n{op_progress_table(ops)}" if ops else ""
    if ops:
        result["op_progress"] = ops
    sp = preservation(sum_a["groups"], sum_b["groups"])
    sp_md = f"{SP_CAPTION}.\n\n{preservation_table(sp)}" if sp else ""
    if sp:
        result["preservation"] = sp
    evals = sorted((int(p.name.split("-")[1]) for p in eval_dir.glob("step-*") if (p / "summary.json").exists()))
    points = []
    for s in evals:
        v = json.loads((eval_dir / f"step-{s}" / "summary.json").read_text())["groups"]["all"].get("oracle")
        if v is not None:
            points.append((s, v))
    has_plot = plot_curves(out / "metrics.jsonl", out / "reward_curves.png", points)
    md = [f"# {title}", "", f"{len(rows_a)} held-out prompts x {len(sum_a['seeds'])} seeds; "
          f"SFT = the starting policy (step {start_step}), GRPO = after {final_step} iterations"
          + ("; source = returning the source unchanged (the baseline an editor must beat)." if source else "."), ""]
    for key in ("oracle", "reward"):
        if f"delta_{key}" in result:
            d = result[f"delta_{key}"]
            md.append(f"- delta {key} (GRPO - SFT): {d['mean']:+.4f}, 95% bootstrap CI [{d['ci95'][0]:+.4f}, "
                      f"{d['ci95'][1]:+.4f}]; better on {d['wins']}/{d['n']} prompts, worse on {d['losses']}")
    if sum_a.get("sampler"):  # evaluations written before the sampler was recorded have none
        result["eval_sampler"] = sum_a["sampler"]
        md.append(f"- evaluation sampler: {sampler_text(sum_a['sampler'])}")
        if sum_b.get("sampler") and sum_b["sampler"] != sum_a["sampler"]:
            md.append(f"- WARNING: the GRPO evaluation used another sampler ({sampler_text(sum_b['sampler'])}): "
                      f"the two columns are not comparable")
    if source is not None:
        c = result["copy_source"]
        md.append(f"- returning the source unchanged scores oracle {c['oracle']:.4f} (if_error {c['if_error']:.4f}, "
                  f"sp_error 0); SFT {result['sft']['oracle']:.4f}, GRPO {result['grpo']['oracle']:.4f}")
    md += ["", table]
    sections = [(title, text) for title, text in ((OPS_TITLE, ops_md), (SP_TITLE, sp_md)) if text]
    for title, text in sections:
        md += ["", f"## {title}", "", text]
    if diagnostics and Path(diagnostics).exists():  # editgrpo.diagnose on the starting (SFT) editor
        from .diagnose import format_tables

        diag = json.loads(Path(diagnostics).read_text())
        result["sft_diagnostics"] = diag
        md += ["", "## The starting editor, diagnosed (`python -m editgrpo.diagnose`)", "", format_tables(diag), ""]
    atomic_write_text(out / "report.md", "\n".join(md))
    atomic_write_text(out / "report.json", json.dumps(result, indent=2))
    diag_md = format_tables(result["sft_diagnostics"]) if "sft_diagnostics" in result else ""
    _write_html(out, eval_dir, start_step, final_step, rows_a, by_id, md, table, diag_md, has_plot, eval_manifest,
                sections)
    return result


def _md_tables_html(text: str) -> str:
    """Markdown text of captions and pipe tables -> HTML (captions as paragraphs, each table as a <table>)."""
    parts, rows = [], []

    def flush():
        if rows:
            parts.append("<div class=scroll><table class=t>" + "".join(
                "<tr>" + "".join(f"<{'th' if i == 0 else 'td'}>{html.escape(c.strip())}</{'th' if i == 0 else 'td'}>"
                                 for c in ln.strip("|").split("|")) + "</tr>" for i, ln in enumerate(rows)) + "</table></div>")
            rows.clear()

    for ln in text.splitlines():
        if ln.startswith("|"):
            if not ln.startswith("|---"):
                rows.append(ln)
            continue
        flush()
        if ln.strip():
            parts.append(f"<p>{html.escape(ln)}</p>")
    flush()
    return "".join(parts)


def _write_html(out: Path, eval_dir: Path, a: int, b: int, rows_a, by_id, md_lines, table_md, diag_md, has_plot,
                manifest, sections: list[tuple[str, str]] = ()) -> None:
    media = out / "report_media"
    media.mkdir(exist_ok=True)
    records = {}
    if manifest:
        from viva_base.data.manifest import read_manifest

        records = {r["id"]: r for r in read_manifest(manifest, "eval")}
    body = []
    for r in rows_a:
        sft_gif = eval_dir / f"step-{a}" / "videos" / f"{r['id']}.gif"
        grpo_gif = eval_dir / f"step-{b}" / "videos" / f"{r['id']}.gif"
        if not (sft_gif.exists() and grpo_gif.exists()):
            continue
        cells = []
        rec = records.get(r["id"], {})
        for name, src in (("source", rec.get("source")), ("target", rec.get("target"))):
            if src:
                dst = media / f"{r['id']}_{name}.gif"
                if not dst.exists():
                    v = read_video(src)
                    write_video(dst, v.frames, v.fps)
                cells.append(f"<td><img src='report_media/{dst.name}' width=128></td>")
            else:
                cells.append("<td>–</td>")
        for name, gif in (("sft", sft_gif), ("grpo", grpo_gif)):
            dst = media / f"{r['id']}_{name}.gif"
            shutil.copyfile(gif, dst)
            cells.append(f"<td><img src='report_media/{dst.name}' width=128></td>")
        g = by_id.get(r["id"], {}).get("mean", {})
        score = (f"oracle {_fmt(r['mean'].get('oracle'))} → {_fmt(g.get('oracle'))}<br>"
                 f"reward {_fmt(r['mean'].get('reward'))} → {_fmt(g.get('reward'))}")
        kind = html.escape(str(r.get("edit_type"))) + ("<br>open: the target shown is one of several correct edits"
                                                      if rec.get("open") else "")
        body.append(f"<tr><td>{html.escape(r['id'])}<br><small>{kind}</small></td>"
                    f"<td>{html.escape(r['instruction'])}</td>{''.join(cells)}<td>{score}</td></tr>")
    summary = "".join(f"<p>{html.escape(line)}</p>" for line in md_lines if line.startswith("- "))
    table = _md_tables_html(table_md)
    diag = f"<h2>The starting editor, diagnosed</h2>{_md_tables_html(diag_md)}" if diag_md else ""
    sections_html = "".join(f"<h2>{html.escape(title)}</h2>{_md_tables_html(text)}" for title, text in sections)
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>Edit-GRPO report</title>
<style>body{{font-family:sans-serif;margin:20px}} table{{border-collapse:collapse}} td,th{{border:1px solid #ccc;
padding:4px;font-size:13px;vertical-align:top}} img{{image-rendering:pixelated}}
.scroll{{overflow-x:auto;max-width:100%}} .t td:first-child,.t th:first-child{{position:sticky;left:0;background:#fff}}</style></head><body>
<h1>Edit-GRPO: SFT vs SFT + Edit-GRPO</h1>{summary}
{'<img src="reward_curves.png" style="max-width:100%">' if has_plot else ''}
<h2>Per group</h2>{table}{sections_html}{diag}
<h2>Held-out edits (eval seed {html.escape(str(rows_a[0]['seeds'][0]) if rows_a else '')})</h2>
<table><tr><th>id</th><th>instruction</th><th>source</th><th>target</th><th>SFT</th><th>SFT + GRPO</th><th>scores</th></tr>
{''.join(body)}</table></body></html>"""
    atomic_write_text(out / "report.html", page)
