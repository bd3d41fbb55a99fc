"""Aggregates, tables and the HTML report of a benchmark run (and of several runs compared).

Input: the per-item records of ``items.jsonl`` (written by :mod:`benchmarks.viebench`), each with
``system``, ``id``, ``task``, ``category``, ``instruction``, ``scores`` ({metric: value or null}),
``judge_error`` and ``report`` (paths of the report's video copies, relative to the run folder).

* :func:`aggregate` -- per system, the mean and count of every metric per (task, category), per task
  (``all``) and overall, and the number of judge failures. Means are over items (each item counts once;
  a task's "Avg" is the mean over its items, not the mean of its category means); missing values
  (``null``: not applicable, not computable, or a failed judgement) are left out and the count says so.
* :func:`render_markdown` -- the judge scores in the layout of the VIVA paper's Table 1 (a row per
  system, a column group per category: IF, SP, Q and, for reference-based edits, SS), then the
  automatic metrics per task and category.
* :func:`write_csv` -- one row per (system, task, category) with every metric's mean and count.
* :func:`render_html` -- one row per item: source and edited videos playing side by side, the
  instruction and the scores; sortable by any column (click a header, or open
  ``report.html#sort=<metric>`` / ``#sort=-<metric>`` for descending). Plain HTML + a few lines of JS,
  videos by relative path, so it opens from the folder without a server.

``python -m benchmarks.report RUN [RUN ...] --out DIR`` merges finished runs (each a ``--out`` folder
of ``benchmarks.viebench``) into one table and report, recording every run's protocol (judge prompt and
model, metric models and versions) and flagging where they differ.
"""
from __future__ import annotations

import argparse
import csv
import html
import io
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import urllib.parse
from collections import OrderedDict
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

logger = logging.getLogger(__name__)

__all__ = [
    "JUDGE_METRICS",
    "METRICS",
    "TABLE1_LAYOUT",
    "aggregate",
    "build_summary",
    "compare_runs",
    "read_items",
    "render_html",
    "render_markdown",
    "write_csv",
    "write_outputs",
    "write_text_atomic",
]

#: tasks and their categories in the order of the paper's Table 1, with the labels used in tables
TABLE1_LAYOUT: "OrderedDict[str, list[tuple[str, str]]]" = OrderedDict([
    ("instruction", [("add", "Add"), ("replace", "Replace"), ("remove", "Remove"), ("color", "Color"),
                     ("style", "Style"), ("tone_weather", "Tone & Weather"), ("hybrid", "Hybrid")]),
    ("reference", [("add", "Add"), ("swap", "Swap")]),
])
TASK_LABELS = {"instruction": "Instruction-only editing", "reference": "Reference-based editing"}

#: metric -> (short label, decimals, description)
METRICS: "OrderedDict[str, tuple[str, int, str]]" = OrderedDict([
    ("instruction_following", ("IF", 2, "VLM judge: instruction following (0-10)")),
    ("source_preservation", ("SP", 2, "VLM judge: source preservation (0-10)")),
    ("editing_quality", ("Q", 2, "VLM judge: editing quality (0-10)")),
    ("subject_similarity", ("SS", 2, "VLM judge: subject similarity to the reference (0-10)")),
    ("clip_tc", ("CLIP-TC", 4, "CLIP temporal consistency")),
    ("dino_tc", ("DINO-TC", 4, "DINO temporal consistency")),
    ("pickscore", ("PickScore", 2, "PickScore over frames vs the target caption")),
    ("clip_t", ("CLIP-T", 2, "frame-text CLIP score vs the target caption")),
    ("viclip_t", ("ViCLIP-T", 2, "video-text ViCLIP score vs the target caption")),
])
JUDGE_METRICS = ("instruction_following", "source_preservation", "editing_quality", "subject_similarity")
AUTO_METRICS = tuple(m for m in METRICS if m not in JUDGE_METRICS)


# ------------------------------------------------------------------------------------------------
# Files
# ------------------------------------------------------------------------------------------------
def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def read_items(path: str | os.PathLike) -> list[dict]:
    """The records of an ``items.jsonl``; a torn last line (a killed writer) is ignored."""
    path = Path(path)
    if not path.is_file():
        return []
    items = []
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            items.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines) - 1 and any(x.strip() for x in lines[i + 1:]):
                raise ValueError(f"{path}:{i + 1}: not valid JSON; the file is damaged (remove that line)") from None
            logger.warning("%s: ignoring a torn last line (an interrupted run)", path)
    return items


# ------------------------------------------------------------------------------------------------
# Aggregation
# ------------------------------------------------------------------------------------------------
def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _metric_order(names: Iterable[str]) -> list[str]:
    names = set(names)
    return [m for m in METRICS if m in names] + sorted(names - set(METRICS))


def _category_order(task: str, categories: Iterable[str]) -> list[str]:
    known = [c for c, _ in TABLE1_LAYOUT.get(task, [])]
    categories = set(categories)
    return [c for c in known if c in categories] + sorted(categories - set(known))


def _category_label(task: str, category: str) -> str:
    return dict(TABLE1_LAYOUT.get(task, [])).get(category, category.replace("_", " ").title())


def _group(items: Sequence[Mapping], metrics: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {"n_items": len(items), "metrics": {},
                           "judge_failures": sum(1 for it in items if it.get("judge_error"))}
    for m in metrics:
        values = [it["scores"][m] for it in items if _finite(it.get("scores", {}).get(m))]
        out["metrics"][m] = {"mean": sum(values) / len(values) if values else None, "n": len(values)}
    return out


def aggregate(items: Sequence[Mapping]) -> dict[str, dict[str, Any]]:
    """Per system: ``{"groups": {"<task>/<category>": group, "<task>/all": group, "all": group}, ...}``
    where a group is ``{"n_items", "judge_failures", "metrics": {m: {"mean", "n"}}}`` (see module doc)."""
    systems: "OrderedDict[str, list[Mapping]]" = OrderedDict()
    for it in items:
        systems.setdefault(str(it.get("system", "system")), []).append(it)
    result: dict[str, dict[str, Any]] = {}
    for system, its in systems.items():
        metrics = _metric_order({m for it in its for m in it.get("scores", {})})
        groups: dict[str, Any] = {}
        tasks = [t for t in TABLE1_LAYOUT if any(it.get("task") == t for it in its)]
        tasks += sorted({str(it.get("task")) for it in its} - set(tasks))
        for task in tasks:
            tits = [it for it in its if it.get("task") == task]
            for cat in _category_order(task, {str(it.get("category")) for it in tits}):
                groups[f"{task}/{cat}"] = _group([it for it in tits if it.get("category") == cat], metrics)
            groups[f"{task}/all"] = _group(tits, metrics)
        groups["all"] = _group(its, metrics)
        result[system] = {"n_items": len(its), "metrics": metrics, "groups": groups,
                          "judge_failures": groups["all"]["judge_failures"]}
    return result


def build_summary(items: Sequence[Mapping], *, protocol: Mapping | None = None,
                  missing: Mapping[str, Sequence[str]] | None = None,
                  not_computed: Mapping[str, str] | None = None,
                  protocols: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The content of ``summary.json``: the aggregates, the total judge-failure count, items with no
    edited video (``missing``, per system), metrics left out and why, and the run protocol(s)."""
    systems = aggregate(items)
    summary: dict[str, Any] = {
        "format": "viebench-summary-v1",
        "systems": systems,
        "judge_failures": sum(s["judge_failures"] for s in systems.values()),
        "missing": {k: list(v) for k, v in (missing or {}).items() if v},
        "not_computed": dict(not_computed or {}),
    }
    if protocol is not None:
        summary["protocol"] = protocol
    if protocols is not None:
        summary["protocols"] = dict(protocols)
        summary["protocol_differences"] = protocol_differences(protocols)
    return summary


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, Mapping):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def protocol_differences(protocols: Mapping[str, Any]) -> list[str]:
    """Keys (dotted) on which the given runs' protocols disagree (the command line and timing excluded)."""
    flat = {run: _flatten({k: v for k, v in (p or {}).items() if k not in ("command", "started", "system")})
            for run, p in protocols.items()}
    keys = sorted({k for f in flat.values() for k in f})
    return [k for k in keys if len({json.dumps(f.get(k), sort_keys=True) for f in flat.values()}) > 1]


# ------------------------------------------------------------------------------------------------
# Tables
# ------------------------------------------------------------------------------------------------
def _fmt(value: Any, metric: str) -> str:
    if not _finite(value):
        return "–"
    return f"{value:.{METRICS.get(metric, ('', 3, ''))[1]}f}"


def _md_row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"


def render_markdown(summary: Mapping[str, Any], title: str = "VIE-Bench results") -> str:
    """``table.md``: Table-1 layout of the judge scores per task, the automatic metrics, failures, protocol."""
    systems: Mapping[str, Any] = summary["systems"]
    lines = [f"# {title}", ""]
    judge_present = any(s["groups"]["all"]["metrics"].get(m, {}).get("n") for s in systems.values()
                        for m in JUDGE_METRICS)
    tasks = []
    for s in systems.values():
        for key in s["groups"]:
            task = key.split("/")[0]
            if key != "all" and task not in tasks:
                tasks.append(task)
    tasks = [t for t in TABLE1_LAYOUT if t in tasks] + [t for t in tasks if t not in TABLE1_LAYOUT]

    if judge_present:
        for task in tasks:
            metrics = [m for m in JUDGE_METRICS if m != "subject_similarity" or task == "reference"]
            cats = _category_order(task, {k.split("/", 1)[1] for s in systems.values() for k in s["groups"]
                                          if k.startswith(task + "/") and not k.endswith("/all")})
            header = ["System"] + [f"{_category_label(task, c)} {METRICS[m][0]}" for c in cats for m in metrics] + \
                     [f"Avg {METRICS[m][0]}" for m in metrics]
            lines += [f"## {TASK_LABELS.get(task, task)}: VLM judge (0-10)", "", _md_row(header),
                      _md_row(["---"] + ["---:"] * (len(header) - 1))]
            for name, s in systems.items():
                row = [name]
                for key in [f"{task}/{c}" for c in cats] + [f"{task}/all"]:
                    g = s["groups"].get(key)
                    row += [_fmt(g["metrics"].get(m, {}).get("mean") if g else None, m) for m in metrics]
                lines.append(_md_row(row))
            lines.append("")
        labels = ", ".join(f"{METRICS[m][0]} = {METRICS[m][2].split(': ', 1)[1]}" for m in JUDGE_METRICS)
        lines += [f"{labels}. Avg = mean over the task's items.", ""]

    auto = [m for m in AUTO_METRICS if any(m in s["metrics"] for s in systems.values())]
    if auto:
        header = ["System", "Task", "Category", "N"] + [METRICS[m][0] for m in auto]
        lines += ["## Automatic metrics", "", _md_row(header), _md_row(["---"] * 3 + ["---:"] * (len(header) - 3))]
        for name, s in systems.items():
            for key, g in s["groups"].items():
                task, _, cat = key.partition("/")
                task_label = "all" if key == "all" else task
                cat_label = "all" if key == "all" or cat == "all" else _category_label(task, cat)
                lines.append(_md_row([name, task_label, cat_label, g["n_items"]] +
                                     [_fmt(g["metrics"].get(m, {}).get("mean"), m) for m in auto]))
        lines += ["", "; ".join(f"{METRICS[m][0]}: {METRICS[m][2]}" for m in auto) + ".", ""]

    lines += ["## Run", ""]
    for name, s in systems.items():
        judged = s["groups"]["all"]["metrics"].get("instruction_following", {}).get("n", 0)
        lines.append(f"- {name}: {s['n_items']} items, judge failures: {s['judge_failures']}"
                     + (f" ({judged} judged)" if judge_present else ""))
    for system, ids in summary.get("missing", {}).items():
        lines.append(f"- {system}: {len(ids)} item(s) without an edited video: {', '.join(ids[:10])}"
                     + (" ..." if len(ids) > 10 else ""))
    for metric, why in summary.get("not_computed", {}).items():
        lines.append(f"- {METRICS.get(metric, (metric,))[0]}: {why}")
    protocol = summary.get("protocol")
    if protocol:
        judge = protocol.get("judge")
        if judge:
            lines.append(f"- judge: {judge.get('model')} at {judge.get('base_url')}, prompt "
                         f"{judge.get('prompt_version')}, {judge.get('frames')} frames per video")
        for key, info in (protocol.get("metrics") or {}).get("models", {}).items():
            version = info.get("commit") or info.get("weights_fingerprint") or "version unknown"
            lines.append(f"- {key}: {info.get('name')} ({version})")
        tc = (protocol.get("metrics") or {}).get("tc_mode")
        if tc:
            lines.append(f"- temporal consistency: {tc} formula")
    diffs = summary.get("protocol_differences")
    if diffs:
        lines.append(f"- WARNING: the compared runs differ in {', '.join(diffs)}; see summary.json 'protocols'")
    lines.append("")
    return "\n".join(lines)


def write_csv(summary: Mapping[str, Any]) -> str:
    """``table.csv``: one row per (system, task, category), ``all`` rows for tasks and overall; columns
    ``n_items``, ``judge_failures`` and ``<metric>``, ``<metric>_n`` for every metric."""
    systems = summary["systems"]
    metrics = _metric_order({m for s in systems.values() for m in s["metrics"]})
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["system", "task", "category", "n_items", "judge_failures"]
                    + [c for m in metrics for c in (m, f"{m}_n")])
    for name, s in systems.items():
        for key, g in s["groups"].items():
            task, _, cat = key.partition("/")
            row: list[Any] = [name, "all" if key == "all" else task, cat or "all", g["n_items"], g["judge_failures"]]
            for m in metrics:
                stat = g["metrics"].get(m, {"mean": None, "n": 0})
                row += ["" if stat["mean"] is None else repr(float(stat["mean"])), stat["n"]]
            writer.writerow(row)
    return buf.getvalue()


# ------------------------------------------------------------------------------------------------
# HTML
# ------------------------------------------------------------------------------------------------
_CSS = """
body{font-family:system-ui,sans-serif;margin:16px;color:#222}
table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 6px;vertical-align:top}
th[data-key]{cursor:pointer;background:#f3f3f3;white-space:nowrap}th[data-key]:hover{background:#e4e4ff}
th.asc::after{content:" \\25B2"}th.desc::after{content:" \\25BC"}
td.num{text-align:right;font-variant-numeric:tabular-nums}td.na{color:#aaa;text-align:center}
video{width:240px;height:auto;display:block;background:#000}img.ref{width:120px;height:auto;display:block}
.instr{max-width:280px}.cap{color:#666;font-size:90%}.err{color:#b00;font-size:85%}
.summary td{font-size:90%}
"""

_JS = """
(function(){
  const table = document.getElementById('items');
  const body = table.tBodies[0];
  function value(row, key){
    const cell = row.querySelector('td[data-key="' + key + '"]');
    const raw = cell ? cell.getAttribute('data-value') : null;
    if (raw === null || raw === '') return null;
    const x = Number(raw);
    return Number.isNaN(x) ? raw.toLowerCase() : x;
  }
  function sortBy(key, desc){
    const rows = Array.from(body.rows);
    rows.sort(function(a, b){
      const x = value(a, key), y = value(b, key);
      if (x === null && y === null) return 0;
      if (x === null) return 1;
      if (y === null) return -1;
      const c = x < y ? -1 : (x > y ? 1 : 0);
      return desc ? -c : c;
    });
    rows.forEach(function(r){ body.appendChild(r); });
    table.querySelectorAll('th[data-key]').forEach(function(th){
      th.classList.remove('asc', 'desc');
      if (th.dataset.key === key) th.classList.add(desc ? 'desc' : 'asc');
    });
    table.dataset.sortKey = key; table.dataset.sortDesc = desc ? '1' : '0';
  }
  table.querySelectorAll('th[data-key]').forEach(function(th){
    th.addEventListener('click', function(){
      const desc = table.dataset.sortKey === th.dataset.key ? table.dataset.sortDesc !== '1' : th.dataset.num === '1';
      sortBy(th.dataset.key, desc);
    });
  });
  document.querySelectorAll('video').forEach(function(v){
    v.dataset.state = 'loading';
    v.addEventListener('loadeddata', function(){ v.dataset.state = 'loaded'; });
    v.addEventListener('error', function(){ v.dataset.state = 'error'; });
  });
  document.querySelectorAll('tr.item').forEach(function(tr){
    tr.addEventListener('dblclick', function(){
      tr.querySelectorAll('video').forEach(function(v){ v.currentTime = 0; v.play(); });
    });
  });
  const m = /sort=(-?)([A-Za-z0-9_]+)/.exec(location.hash);
  if (m) sortBy(m[2], m[1] === '-');
})();
"""


def _url(rel: str) -> str:
    return urllib.parse.quote(rel.replace(os.sep, "/"))


def _media(rel: str | None, kind: str) -> str:
    if not rel:
        return '<span class="na">–</span>'
    if kind == "image":
        return f'<img class="ref" src="{html.escape(_url(rel))}" alt="reference">'
    return (f'<video src="{html.escape(_url(rel))}" autoplay loop muted playsinline controls preload="auto" '
            f'data-role="{kind}"></video>')


def render_html(items: Sequence[Mapping], summary: Mapping[str, Any], title: str = "VIE-Bench report") -> str:
    """``report.html`` (see the module doc). Media paths in ``item["report"]`` are relative to the folder
    the page is written to."""
    esc = html.escape
    metrics = _metric_order({m for it in items for m in it.get("scores", {})})
    has_ref = any((it.get("report") or {}).get("reference") for it in items)
    multi = len({it.get("system") for it in items}) > 1
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           f"<title>{esc(title)}</title>", f"<style>{_CSS}</style></head><body>", f"<h1>{esc(title)}</h1>"]

    # summary: one row per system and task
    out.append('<table class="summary"><thead><tr><th>System</th><th>Group</th><th>N</th>'
               + "".join(f"<th title=\"{esc(METRICS.get(m, ('', 0, m))[2])}\">{esc(METRICS.get(m, (m,))[0])}</th>"
                         for m in metrics) + "<th>Judge failures</th></tr></thead><tbody>")
    for name, s in summary["systems"].items():
        for key, g in s["groups"].items():
            if key != "all" and not key.endswith("/all"):
                continue
            out.append(f"<tr><td>{esc(name)}</td><td>{esc(key)}</td><td class=\"num\">{g['n_items']}</td>"
                       + "".join(f"<td class=\"num\">{_fmt(g['metrics'].get(m, {}).get('mean'), m)}</td>" for m in metrics)
                       + f"<td class=\"num\">{g['judge_failures']}</td></tr>")
    out.append("</tbody></table>")
    notes = []
    for metric, why in summary.get("not_computed", {}).items():
        notes.append(f"{METRICS.get(metric, (metric,))[0]}: {why}")
    for system, ids in summary.get("missing", {}).items():
        notes.append(f"{system}: {len(ids)} item(s) without an edited video")
    judge = (summary.get("protocol") or {}).get("judge")
    if judge:
        notes.append(f"judge: {judge.get('model')}, prompt {judge.get('prompt_version')}")
    if summary.get("protocol_differences"):
        notes.append("WARNING: the compared runs differ in " + ", ".join(summary["protocol_differences"]))
    if notes:
        out.append("<ul>" + "".join(f"<li>{esc(n)}</li>" for n in notes) + "</ul>")
    out.append("<p>Click a column header to sort (again to reverse); double-click a row to restart its videos.</p>")

    # items
    head = [("system", "System", False)] if multi else []
    head += [("id", "ID", False), ("category", "Category", False), ("instruction", "Instruction", False)]
    out.append('<table id="items"><thead><tr>'
               + "".join(f'<th data-key="{k}" data-num="0">{esc(label)}</th>' for k, label, _ in head)
               + "<th>Source</th><th>Edited</th>" + ("<th>Reference</th>" if has_ref else "")
               + "".join(f'<th data-key="{esc(m)}" data-num="1" title="{esc(METRICS.get(m, ("", 0, m))[2])}">'
                         f'{esc(METRICS.get(m, (m,))[0])}</th>' for m in metrics)
               + "</tr></thead><tbody>")
    for it in items:
        rep = it.get("report") or {}
        cells = []
        if multi:
            cells.append(f'<td data-key="system" data-value="{esc(str(it.get("system")))}">{esc(str(it.get("system")))}</td>')
        cells.append(f'<td data-key="id" data-value="{esc(str(it["id"]))}">{esc(str(it["id"]))}</td>')
        cat = f'{it.get("task")}/{it.get("category")}'
        cells.append(f'<td data-key="category" data-value="{esc(cat)}">{esc(cat)}</td>')
        instr = f'<div>{esc(str(it.get("instruction", "")))}</div>'
        if it.get("target_caption"):
            instr += f'<div class="cap">target: {esc(str(it["target_caption"]))}</div>'
        if it.get("judge_error"):
            instr += f'<div class="err">judge failed: {esc(str(it["judge_error"])[:200])}</div>'
        cells.append(f'<td class="instr" data-key="instruction" data-value="{esc(str(it.get("instruction", "")))}">'
                     f"{instr}</td>")
        cells.append(f"<td>{_media(rep.get('source'), 'source')}</td><td>{_media(rep.get('edited'), 'edited')}</td>")
        if has_ref:
            cells.append(f"<td>{_media(rep.get('reference'), 'image')}</td>")
        for m in metrics:
            v = it.get("scores", {}).get(m)
            if _finite(v):
                cells.append(f'<td class="num" data-key="{esc(m)}" data-value="{float(v)!r}">{_fmt(v, m)}</td>')
            else:
                cells.append(f'<td class="na" data-key="{esc(m)}" data-value="">–</td>')
        out.append(f'<tr class="item" data-id="{esc(str(it["id"]))}">' + "".join(cells) + "</tr>")
    out.append("</tbody></table>")
    out.append(f"<script>{_JS}</script></body></html>")
    return "\n".join(out) + "\n"


def _sorted_items(items: Sequence[Mapping]) -> list[Mapping]:
    order = {t: i for i, t in enumerate(TABLE1_LAYOUT)}

    def key(it):
        task = str(it.get("task"))
        cats = [c for c, _ in TABLE1_LAYOUT.get(task, [])]
        cat = str(it.get("category"))
        return (order.get(task, len(order)), task, cats.index(cat) if cat in cats else len(cats), cat,
                str(it.get("id")), str(it.get("system")))

    return sorted(items, key=key)


def write_outputs(out_dir: str | os.PathLike, items: Sequence[Mapping], **summary_kwargs) -> dict[str, Any]:
    """Write ``summary.json``, ``table.md``, ``table.csv`` and ``report.html`` into ``out_dir`` (atomically);
    returns the summary."""
    out_dir = Path(out_dir)
    items = _sorted_items(items)
    summary = build_summary(items, **summary_kwargs)
    write_text_atomic(out_dir / "summary.json", json.dumps(summary, indent=2, allow_nan=False) + "\n")
    write_text_atomic(out_dir / "table.md", render_markdown(summary))
    write_text_atomic(out_dir / "table.csv", write_csv(summary))
    write_text_atomic(out_dir / "report.html", render_html(items, summary))
    return summary


# ------------------------------------------------------------------------------------------------
# Comparing finished runs
# ------------------------------------------------------------------------------------------------
def _copy(src: Path, dst: Path) -> None:
    if dst.exists():
        return
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def compare_runs(runs: Sequence[str | os.PathLike], out_dir: str | os.PathLike) -> dict[str, Any]:
    """Merge the ``items.jsonl`` of finished runs into one table and report in ``out_dir`` (videos are
    linked or copied there, so the folder stands alone; ``items.jsonl`` of the merge is written too).
    System names that repeat across runs get the run's folder name as a prefix. With one run and
    ``out_dir`` equal to it, the run's tables and report are rewritten in place."""
    out_dir = Path(out_dir)
    if len(runs) == 1 and Path(runs[0]).resolve() == out_dir.resolve():
        items = read_items(out_dir / "items.jsonl")
        if not items:
            raise FileNotFoundError(f"{out_dir}: no items.jsonl with results; run benchmarks.viebench --out {out_dir}")
        old = json.loads((out_dir / "summary.json").read_text()) if (out_dir / "summary.json").is_file() else {}
        return write_outputs(out_dir, items, protocol=old.get("protocol"), missing=old.get("missing"),
                             not_computed=old.get("not_computed"))
    if any(Path(r).resolve() == out_dir.resolve() for r in runs):
        raise ValueError(f"--out {out_dir} is one of the compared runs; give a new folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    merged: list[dict] = []
    protocols: dict[str, Any] = {}
    missing: dict[str, list[str]] = {}
    not_computed: dict[str, str] = {}
    seen_systems: set[str] = set()
    for run in runs:
        run = Path(run)
        items = read_items(run / "items.jsonl")
        if not items:
            raise FileNotFoundError(f"{run}: no items.jsonl with results; run benchmarks.viebench with --out {run} first")
        summary_path = run / "summary.json"
        summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
        key = run.name if run.name not in protocols else str(run)
        protocols[key] = summary.get("protocol")
        not_computed.update(summary.get("not_computed", {}))
        rename: dict[str, str] = {}
        for system in dict.fromkeys(str(it.get("system")) for it in items):
            new = system if system not in seen_systems else f"{run.name}/{system}"
            rename[system] = new
            seen_systems.add(new)
        for system, ids in summary.get("missing", {}).items():
            missing[rename.get(system, system)] = list(ids)
        for it in items:
            it = dict(it)
            it["system"] = rename[str(it.get("system"))]
            rep = dict(it.get("report") or {})
            for kind, rel in rep.items():
                if not rel or not (run / rel).exists():
                    continue
                parts = Path(rel).parts
                if kind == "edited" and len(parts) >= 3:  # videos/<system>/<file> -> videos/<new system>/<file>
                    rel_new = str(Path(parts[0], _safe_dir(it["system"]), *parts[2:]))
                else:
                    rel_new = rel
                _copy(run / rel, out_dir / rel_new)
                rep[kind] = rel_new
            it["report"] = rep
            merged.append(it)
    write_text_atomic(out_dir / "items.jsonl", "".join(json.dumps(it) + "\n" for it in merged))
    return write_outputs(out_dir, merged, missing=missing, not_computed=not_computed, protocols=protocols)


def _safe_dir(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "_"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.report",
        description="Merge finished benchmark runs (benchmarks.viebench --out folders) into one table and "
                    "HTML report; with one run and no --out, rewrite that run's tables and report.")
    parser.add_argument("runs", nargs="+", help="run folders (each holds items.jsonl and summary.json)")
    parser.add_argument("--out", help="output folder (default: the run folder when only one is given)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.out is None and len(args.runs) != 1:
        parser.error("give --out when comparing several runs")
    out = args.out or args.runs[0]
    from viva_base.errors import UserError
    from viva_base.recipe import check_output_dir

    try:
        if args.out:
            check_output_dir("--out", args.out)
        summary = compare_runs(args.runs, out)
    except (FileNotFoundError, ValueError, UserError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(render_markdown(summary))
    print(f"wrote {out}/summary.json, table.md, table.csv, report.html")
    return 0


if __name__ == "__main__":
    from viva_base.errors import exit_with

    exit_with(main)
