"""benchmarks.viebench / benchmarks.report end to end, offline: generated clips, tiny CLIP and DINO, a VLM
judge served by a local HTTP server; the JSON, tables and HTML it writes; kill-and-resume with a real
SIGKILL; the --model mode with the tiny editor; VIE-Bench conversion; comparing runs; the report in
headless Chromium."""
from __future__ import annotations

import csv
import html.parser
import http.server
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from benchmarks import report as report_mod
from benchmarks import viebench
from benchmarks.metrics import make_tiny_dino
from viva_base.video import read_video, write_video

# item id -> (category as written in the manifest, instruction); the digit drives the judge's scores
ITEMS = {
    "add_1": ("add", "add a red hat to the cat 1"),
    "swap_2": ("swap", "replace the ball with a cube 2"),
    "tone_3": ("Tone & Weather", "make it snow 3"),
    "remove_x": ("remove", "FAILME remove the bird 4"),
    "ref_5": ("reference-based swap", "swap the dog with the toy in the image 5"),
}


# ------------------------------------------------------------------------------------------------ judge server
def judge_scores(instruction: str, with_reference: bool) -> dict[str, float]:
    d = int(re.search(r"(\d+)\s*$", instruction).group(1))
    scores = {"instruction_following": float(d), "source_preservation": float(10 - d),
              "editing_quality": float(d * 3 % 11)}
    if with_reference:
        scores["subject_similarity"] = 6.0
    return scores


class JudgeServer:
    """An OpenAI-compatible /chat/completions endpoint: scores follow the instruction's last digit; an
    instruction with FAILME gets prose (an unparseable answer); after ``block_after`` answers, requests
    wait until ``release`` is set."""

    def __init__(self, block_after: int | None = None):
        self.requests: list[dict] = []
        self.block_after = block_after
        self.blocked = threading.Event()
        self.release = threading.Event()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                parts = body["messages"][0]["content"]
                prompt = parts[0]["text"]
                instruction = re.search(r'INSTRUCTION: "(.*)"', prompt).group(1)
                with_ref = any(p.get("text") == "REFERENCE image:" for p in parts)
                server.requests.append({"instruction": instruction, "model": body["model"], "reference": with_ref,
                                        "images": sum(p["type"] == "image_url" for p in parts)})
                if server.block_after is not None and len(server.requests) > server.block_after:
                    server.blocked.set()
                    server.release.wait(60)
                content = ("I cannot judge this edit." if "FAILME" in instruction
                           else "Here you go:\n```json\n" + json.dumps(judge_scores(instruction, with_ref)) + "\n```")
                data = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:  # the client was killed
                    pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def close(self):
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


# ------------------------------------------------------------------------------------------------ data
@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    from rewards.tiny import make_tiny_hf_clip

    root = tmp_path_factory.mktemp("viebench")
    clip = make_tiny_hf_clip(root / "clip")
    dino = make_tiny_dino(root / "dino")
    data, sys_a, sys_b = root / "data", root / "sysA", root / "sysB"
    for d in (data, sys_a, sys_b):
        d.mkdir()
    g = torch.Generator().manual_seed(0)
    records = []
    for i, (item_id, (category, instruction)) in enumerate(ITEMS.items()):
        base = torch.rand(1, 3, 1, 1, generator=g)
        frames = (base + 0.25 * torch.rand(6, 3, 32, 48, generator=g)).clamp(0, 1)
        write_video(data / f"{item_id}.mp4", frames, fps=8)
        write_video(sys_a / f"{item_id}.mp4", frames * 0.7, fps=8)
        if item_id != "add_1":  # system B has no result for add_1
            (sys_b / item_id).mkdir()
            write_video(sys_b / item_id / "generate.mp4", frames.flip(-1), fps=8)
        rec = {"id": item_id, "source": f"{item_id}.mp4", "instruction": instruction, "category": category,
               "target_caption": f"a photo of a cat {i}", "source_caption": "a photo of a cat"}
        if category.startswith("reference"):
            write_video(data / f"{item_id}_ref.png", torch.rand(1, 3, 24, 24, generator=g))
            rec["reference"] = f"{item_id}_ref.png"
        records.append(rec)
    (data / "bench.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    common = ["--manifest", str(data / "bench.jsonl"), "--clip", f"hf:{clip}", "--dino", dino,
              "--pickscore", f"hf:{clip}", "--device", "cpu", "--report-max-side", "64"]
    return {"root": root, "clip": clip, "dino": dino, "manifest": data / "bench.jsonl", "sysA": sys_a,
            "sysB": sys_b, "common": common}


@pytest.fixture(scope="module")
def e2e(bench):
    """One evaluation of two systems with every metric and the judge, written to OUT."""
    server = JudgeServer()
    out = bench["root"] / "out"
    try:
        rc = viebench.main(bench["common"] + [
            "--results", f"sysA={bench['sysA']}", "--results", f"sysB={bench['sysB']}", "--out", str(out),
            "--judge", server.url, "--judge-model", "judge-test-1", "--judge-frames", "2", "--judge-retries", "0",
            "--judge-backoff", "0"])
    finally:
        server.close()
    assert rc == 0
    return {"out": out, "requests": server.requests}


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ------------------------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("category, task, ref, expected", [
    ("add", None, False, ("instruction", "add")),
    ("Swap", None, False, ("instruction", "replace")),
    ("replace", "reference", True, ("reference", "swap")),
    ("Tone & Weather", None, False, ("instruction", "tone_weather")),
    ("tone-weather", "instruction-only", False, ("instruction", "tone_weather")),
    ("ref_add", None, False, ("reference", "add")),
    ("Reference-based Swap", None, False, ("reference", "swap")),
    ("hybrid", None, False, ("instruction", "hybrid")),
    (None, None, True, ("reference", "other")),
    ("Camera Motion", None, False, ("instruction", "camera_motion")),
])
def test_normalize_category(category, task, ref, expected):
    assert viebench.normalize_category(category, task, ref) == expected


def test_end_to_end_outputs(bench, e2e):
    out = e2e["out"]
    items = _lines(out / "items.jsonl")
    by = {(r["system"], r["id"]): r for r in items}
    assert sorted(by) == sorted([("sysA", i) for i in ITEMS] + [("sysB", i) for i in ITEMS if i != "add_1"])
    for (system, item_id), r in by.items():
        instruction = ITEMS[item_id][1]
        assert r["instruction"] == instruction
        assert {"clip_tc", "dino_tc", "pickscore", "clip_t"} <= set(r["scores"]) and "viclip_t" not in r["scores"]
        assert 0 <= r["scores"]["clip_tc"] <= 1 and 0 <= r["scores"]["dino_tc"] <= 1
        if "FAILME" in instruction:
            assert r["judge_error"] and r["scores"]["instruction_following"] is None
        else:
            expected = judge_scores(instruction, item_id == "ref_5")
            assert r["judge_error"] is None
            assert {k: r["scores"][k] for k in expected} == expected
        assert ("subject_similarity" in r["scores"]) == (item_id == "ref_5")
        assert (r["task"], r["category"]) == viebench.normalize_category(ITEMS[item_id][0])
        for key in ("source", "edited"):
            assert not os.path.isabs(r["report"][key]) and (out / r["report"][key]).is_file()
    assert by[("sysA", "ref_5")]["report"]["reference"] and by[("sysA", "add_1")]["report"]["reference"] is None
    # the judge saw 2 source + 2 edited frames (+ the reference), once per item, with the configured model
    assert len(e2e["requests"]) == 9
    assert all(q["images"] == 4 + q["reference"] and q["model"] == "judge-test-1" for q in e2e["requests"])

    summary = json.loads((out / "summary.json").read_text())
    assert summary["judge_failures"] == 2 and summary["missing"] == {"sysB": ["add_1"]}
    assert "viclip_t" in summary["not_computed"]
    a = summary["systems"]["sysA"]["groups"]
    # instruction-only items of A judged 1, 2, 3 (remove_x failed): IF mean 2, SP mean 8; n says 3 of 4
    assert a["instruction/all"]["metrics"]["instruction_following"] == {"mean": 2.0, "n": 3}
    assert a["instruction/all"]["metrics"]["source_preservation"]["mean"] == pytest.approx(8.0)
    assert a["instruction/all"]["n_items"] == 4 and a["instruction/all"]["judge_failures"] == 1
    assert a["instruction/replace"]["metrics"]["instruction_following"]["mean"] == 2.0
    assert a["reference/swap"]["metrics"]["subject_similarity"] == {"mean": 6.0, "n": 1}
    assert a["all"]["metrics"]["clip_tc"]["mean"] == pytest.approx(
        sum(by[("sysA", i)]["scores"]["clip_tc"] for i in ITEMS) / 5)
    assert summary["systems"]["sysB"]["groups"]["instruction/all"]["metrics"]["instruction_following"]["mean"] == 2.5
    from rewards.vlm_judge import JUDGE_PROMPT, JUDGE_PROMPT_VERSION

    judge = summary["protocol"]["judge"]
    assert judge["prompt"] == JUDGE_PROMPT and judge["prompt_version"] == JUDGE_PROMPT_VERSION
    assert judge["model"] == "judge-test-1"
    assert summary["protocol"]["metrics"]["models"]["dino"]["name"] == bench["dino"]

    table = (out / "table.md").read_text()
    assert "## Instruction-only editing: VLM judge (0-10)" in table and "## Reference-based editing" in table
    header = next(line for line in table.splitlines() if line.startswith("| System | Add IF"))
    assert "Replace IF" in header and "Tone & Weather IF" in header and "Avg IF" in header
    row_a = next(line for line in table.splitlines() if line.startswith("| sysA | 1.00 |"))
    assert row_a.split(" | ")[-3] == "2.00"  # Avg IF
    assert "judge failures: 1" in table
    rows = list(csv.DictReader((out / "table.csv").open()))
    row = next(r for r in rows if (r["system"], r["task"], r["category"]) == ("sysA", "instruction", "tone_weather"))
    assert float(row["instruction_following"]) == 3.0 and row["instruction_following_n"] == "1"
    assert next(r for r in rows if r["system"] == "sysB" and r["task"] == "all")["judge_failures"] == "1"

    page = (out / "report.html").read_text()
    assert page.count('<tr class="item"') == 9 and page.count("<video ") == 18
    assert str(out) not in page and str(bench["root"]) not in page  # relative paths only


class _DomRows(html.parser.HTMLParser):
    """Rows of #items from a DOM dump: id, system, the IF cell's data-value, and video states."""

    def __init__(self):
        super().__init__()
        self.rows, self.videos = [], []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "tr" and a.get("class") == "item":
            self.rows.append({"id": a["data-id"]})
        elif tag == "td" and self.rows and a.get("data-key") in ("system", "instruction_following"):
            self.rows[-1][a["data-key"]] = a.get("data-value")
        elif tag == "video":
            self.videos.append(a)


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if shutil.which(name):
            return shutil.which(name)
    return None


def test_report_in_headless_chromium(e2e, tmp_path):
    browser = _chromium()
    if browser is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    page = (e2e["out"] / "report.html").resolve()
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}",
             "--window-size=1400,1000", "--virtual-time-budget=4000"]
    shot = tmp_path / "report.png"
    subprocess.run(flags + [f"--screenshot={shot}", page.as_uri()], check=True, capture_output=True, timeout=120)
    from PIL import Image

    with Image.open(shot) as img:
        assert img.size == (1400, 1000)
        lo, hi = img.convert("L").getextrema()
        assert hi - lo > 100  # a rendered page, not a blank one
    dom = subprocess.run(flags + ["--dump-dom", page.as_uri() + "#sort=-instruction_following"], check=True,
                         capture_output=True, text=True, timeout=120).stdout
    parsed = _DomRows()
    parsed.feed(dom)
    items = {(r["system"], r["id"]): r for r in _lines(e2e["out"] / "items.jsonl")}
    assert len(parsed.rows) == len(items) == 9
    # sorted by instruction following, descending, the failed judgements last
    values = [float(r["instruction_following"]) if r["instruction_following"] else None for r in parsed.rows]
    scored = [v for v in values if v is not None]
    assert scored == sorted(scored, reverse=True) and values[len(scored):] == [None, None]
    for r in parsed.rows:
        expected = items[(r["system"], r["id"])]["scores"]["instruction_following"]
        assert (float(r["instruction_following"]) if r["instruction_following"] else None) == expected
    assert "<h1>VIE-Bench report</h1>" in dom and "2.00" in dom
    # every video element decoded its H.264 file from the relative path (file://, no server)
    assert len(parsed.videos) == 18 and all(v.get("data-state") == "loaded" for v in parsed.videos), \
        [v.get("data-state") for v in parsed.videos]


def test_kill_and_resume(bench, tmp_path):
    """A real SIGKILL after 2 finished items; the rerun judges only the other 3 and keeps the first 2 lines."""
    out = tmp_path / "out"
    server = JudgeServer(block_after=2)
    args = bench["common"] + ["--results", f"sysA={bench['sysA']}", "--out", str(out), "--metrics", "clip_tc",
                              "--judge", server.url, "--judge-retries", "0", "--judge-concurrency", "1",
                              "--judge-cache", "none", "--judge-backoff", "0"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    log = open(tmp_path / "killed.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "benchmarks.viebench", *args], env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            done = len(_lines(out / "items.jsonl")) if (out / "items.jsonl").exists() else 0
            if done == 2 and server.blocked.is_set():
                break
            assert proc.poll() is None, (tmp_path / "killed.log").read_text()[-2000:]
            time.sleep(0.1)
        else:
            pytest.fail("the evaluation did not reach 2 finished items")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    first = (out / "items.jsonl").read_text()
    assert len(first.splitlines()) == 2 and not (out / "summary.json").exists()
    server.release.set()
    server.block_after = None
    before = len(server.requests)  # 3: two answered, one cut off by the kill
    try:
        assert viebench.main(args) == 0
    finally:
        server.close()
    final = _lines(out / "items.jsonl")
    assert (out / "items.jsonl").read_text().startswith(first)  # finished items untouched
    assert sorted(r["id"] for r in final) == sorted(ITEMS)  # all items, none twice
    done_ids = {r["id"] for r in _lines_from_text(first)}
    rerun = [q["instruction"] for q in server.requests[before:]]
    assert sorted(rerun) == sorted(ITEMS[i][1] for i in ITEMS if i not in done_ids)  # nothing recomputed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["systems"]["sysA"]["n_items"] == 5 and summary["judge_failures"] == 1

    # resuming with other settings would mix incomparable numbers: refused
    assert viebench.main(args + ["--tc-mode", "vbench"]) == 2


def _lines_from_text(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_model_mode_with_lora(bench, tiny_editor, tmp_path):
    """--model edits each item with EditPipeline (tiny editor + LoRA) and reuses edits on a rerun."""
    import copy

    from viva_base.peft_utils import add_lora, save_lora

    editor_dir = tiny_editor.save_pretrained(tmp_path / "editor")
    transformer = copy.deepcopy(tiny_editor.transformer)
    add_lora(transformer, rank=2, alpha=2, init="gaussian", targets=tiny_editor.lora_targets)
    with torch.no_grad():
        for name, p in transformer.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    save_lora(transformer, tmp_path / "lora")
    out = tmp_path / "out"
    args = bench["common"] + ["--model", str(editor_dir), "--lora", str(tmp_path / "lora"), "--name", "tiny",
                              "--num-steps", "2", "--ids", "ref_5", "--metrics", "clip_tc", "--out", str(out),
                              "--dtype", "float32"]
    assert viebench.main(args) == 0
    items = {r["id"]: r for r in _lines(out / "items.jsonl")}
    assert sorted(items) == ["ref_5"] and items["ref_5"]["reference"]
    for item_id, r in items.items():
        edited = read_video(out / "edited" / "tiny" / f"{item_id}.mp4")
        source = read_video(bench["manifest"].parent / f"{item_id}.mp4")
        assert edited.frames.shape == source.frames.shape and edited.fps == pytest.approx(source.fps)
        assert (edited.frames - source.frames).abs().mean() > 0.01  # an edit, not a copy of the source
        assert r["seed"] == viebench.ModelSystem("tiny", "x", seed=0).item_seed(item_id)
    protocol = json.loads((out / "protocol.json").read_text())
    assert protocol["systems"]["tiny"]["lora"] == str(tmp_path / "lora") and protocol["systems"]["tiny"]["num_inference_steps"] == 2
    # a rerun after losing items.jsonl rescored the kept edits without editing again
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "edited" / "tiny").iterdir()}
    (out / "items.jsonl").unlink()
    assert viebench.main(args) == 0
    assert {p.name: p.stat().st_mtime_ns for p in (out / "edited" / "tiny").iterdir()} == stamps
    assert len(_lines(out / "items.jsonl")) == 1


def test_model_mode_samples_with_the_given_sampler_and_records_it(bench, tiny_editor, tmp_path, capsys):
    """--shift / --guidance-interval reach EditPipeline (the edit equals edit_file with the same options and
    differs from the default sampler's), are recorded in the protocol, and a folder written with another sampler
    refuses to mix them; bad values are one line, exit 2."""
    from viva_base.pipeline import EditPipeline

    editor_dir = tiny_editor.save_pretrained(tmp_path / "editor")
    common = bench["common"] + ["--model", str(editor_dir), "--name", "tiny", "--num-steps", "3", "--ids", "ref_5",
                                "--metrics", "clip_tc", "--dtype", "float32"]
    plain, sampled = tmp_path / "plain", tmp_path / "sampled"
    assert viebench.main([*common, "--out", str(plain)]) == 0
    assert viebench.main([*common, "--out", str(sampled), "--shift", "6", "--guidance-interval", "0.5", "1"]) == 0
    system = json.loads((sampled / "protocol.json").read_text())["systems"]["tiny"]
    assert system["shift"] == 6.0 and system["guidance_interval"] == [0.5, 1.0]
    assert "shift" not in json.loads((plain / "protocol.json").read_text())["systems"]["tiny"]
    item = next(it for it in viebench.load_benchmark(bench["manifest"]) if it["id"] == "ref_5")
    ref = EditPipeline(tiny_editor).edit_file(item["source"], item["instruction"], tmp_path / "ref.mp4",
                                              item.get("reference") or None, num_inference_steps=3,
                                              seed=viebench.ModelSystem("tiny", "x").item_seed("ref_5"),
                                              progress=False, shift=6.0, guidance_interval=(0.5, 1.0))
    got, default = (read_video(d / "edited" / "tiny" / "ref_5.mp4").frames for d in (sampled, plain))
    assert torch.equal(got, read_video(ref).frames)
    assert (got - default).abs().mean() > 1e-3
    capsys.readouterr()
    assert viebench.main([*common, "--out", str(plain), "--shift", "6"]) == 2  # another sampler, same folder
    assert "protocol.json" in capsys.readouterr().err
    for bad, message in ((["--shift", "0"], "--shift 0.0: the schedule shift must be a number > 0"),
                         (["--guidance-interval", "1", "0.5"], "--guidance-interval=[1.0, 0.5]: need 0 <= lo < hi")):
        assert viebench.main([*common, "--out", str(tmp_path / "bad"), *bad]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and not (tmp_path / "bad").exists()


def test_prepare_viebench_layouts(tmp_path):
    root = tmp_path / "VIE-Bench"
    (root / "videos").mkdir(parents=True)
    (root / "references").mkdir()
    for name in ("a", "b", "c"):
        write_video(root / "videos" / f"{name}.mp4", torch.rand(2, 3, 16, 16), fps=4)
    write_video(root / "references" / "c.png", torch.rand(1, 3, 8, 8))
    # the {id: {...}} layout with EditVerseBench-style keys
    (root / "test.json").write_text(json.dumps({
        "a": {"video": "a.mp4", "<text>": "add a hat", "type": "Add", "target_prompt": "a cat with a hat"},
        "b": {"video": "b", "<text>": "make it winter", "type": "tone & weather"},
        "c": {"video": "c.mp4", "<text>": "swap the cat with this toy", "type": "swap", "ref_image": "c.png"},
    }))
    manifest = viebench.prepare_viebench(root, tmp_path / "vie.jsonl")
    items = {it["id"]: it for it in viebench.load_benchmark(manifest)}
    assert (items["a"]["task"], items["a"]["category"], items["a"]["target_caption"]) == ("instruction", "add",
                                                                                         "a cat with a hat")
    assert (items["b"]["task"], items["b"]["category"]) == ("instruction", "tone_weather")
    assert Path(items["b"]["source"]).name == "b.mp4"
    assert (items["c"]["task"], items["c"]["category"]) == ("reference", "swap")
    assert Path(items["c"]["reference"]).is_file()
    assert not os.path.isabs(json.loads(manifest.read_text().splitlines()[0])["source"])  # portable manifest
    # a CSV with other column names, one mapped explicitly
    (tmp_path / "meta.csv").write_text("uid,clip,prompt,category\n1,VIE-Bench/videos/a.mp4,remove the cat,removal\n")
    m2 = viebench.prepare_viebench(tmp_path / "meta.csv", tmp_path / "m2.jsonl", fields={"source": "clip"},
                                   expected=None)
    (it,) = viebench.load_benchmark(m2)
    assert (it["id"], it["category"], it["instruction"]) == ("1", "remove", "remove the cat")
    (tmp_path / "bad.json").write_text(json.dumps([{"id": "z", "video": "VIE-Bench/videos/a.mp4"}]))
    with pytest.raises(ValueError, match="--field instruction"):
        viebench.prepare_viebench(tmp_path / "bad.json", tmp_path / "m3.jsonl")
    assert viebench.main(["--prepare", str(root), "--manifest", str(tmp_path / "m4.jsonl")]) == 0
    assert len((tmp_path / "m4.jsonl").read_text().splitlines()) == 3


def test_compare_runs(bench, e2e, tmp_path):
    """Two runs with different protocols in one table; the difference is recorded and flagged."""
    out2 = tmp_path / "run2"
    assert viebench.main(bench["common"] + ["--results", f"sysB={bench['sysB']}", "--out", str(out2),
                                            "--metrics", "clip_tc"]) == 0
    cmp_dir = tmp_path / "cmp"
    assert report_mod.main([str(e2e["out"]), str(out2), "--out", "/sys/no/cmp"]) == 2  # a PermissionError before
    assert report_mod.main([str(e2e["out"]), str(out2), "--out", str(cmp_dir)]) == 0
    merged = _lines(cmp_dir / "items.jsonl")
    assert sorted({r["system"] for r in merged}) == ["run2/sysB", "sysA", "sysB"] and len(merged) == 13
    for r in merged:
        for key in ("source", "edited"):
            assert (cmp_dir / r["report"][key]).is_file()
    summary = json.loads((cmp_dir / "summary.json").read_text())
    assert set(summary["protocols"]) == {"out", "run2"}
    assert "metrics.metrics" in summary["protocol_differences"] and "judge.model" in summary["protocol_differences"]
    assert summary["protocols"]["out"]["judge"]["prompt_version"]
    run2_clip = _lines(out2 / "items.jsonl")
    assert summary["systems"]["run2/sysB"]["groups"]["all"]["metrics"]["clip_tc"]["mean"] == pytest.approx(
        sum(r["scores"]["clip_tc"] for r in run2_clip) / len(run2_clip))
    assert "WARNING: the compared runs differ" in (cmp_dir / "table.md").read_text()
    assert (cmp_dir / "report.html").read_text().count('<tr class="item"') == 13


def test_cli_errors(bench, tmp_path, capsys):
    assert viebench.main(["--manifest", str(bench["manifest"]), "--out", str(tmp_path / "o")]) == 2
    assert "--model DIR" in capsys.readouterr().err
    assert viebench.main(["--manifest", str(bench["manifest"]), "--results", str(tmp_path / "nope"),
                          "--out", str(tmp_path / "o")]) == 2
    assert "not found" in capsys.readouterr().err
    assert viebench.main(["--manifest", str(bench["manifest"]), "--results", str(bench["sysA"]), "--ids", "zzz",
                          "--out", str(tmp_path / "o")]) == 2
    assert "zzz" in capsys.readouterr().err


def test_a_wrong_editor_or_metric_model_is_one_line_and_leaves_no_results_folder(bench, tiny_editor, tmp_path, capsys,
                                                                                 monkeypatch):
    """--model / --lora are checked before the metric models load (a wrong editor path used to be reported only after
    CLIP, DINO and PickScore had loaded: minutes at real sizes), and a metric model that cannot load leaves no --out
    folder behind (it left one holding a lock file)."""
    from benchmarks.metrics import VideoMetrics

    def no_metrics(*args, **kwargs):
        raise AssertionError("the metric models were loaded")

    out = tmp_path / "o"
    (tmp_path / "not_an_editor").mkdir()
    with monkeypatch.context() as m:
        m.setattr(VideoMetrics, "__init__", no_metrics)
        for model, words in ((tmp_path / "nope", "--model " + str(tmp_path / "nope") + ": editor folder not found"),
                             (tmp_path / "not_an_editor", "missing editor_config.json")):
            assert viebench.main(bench["common"] + ["--model", str(model), "--out", str(out)]) == 2
            assert words in capsys.readouterr().err
        bench_editor = tiny_editor.save_pretrained(tmp_path / "ed")
        assert viebench.main(bench["common"] + ["--model", str(bench_editor), "--lora", str(tmp_path / "nope"),
                                                "--out", str(out)]) == 2
        assert "LoRA folder not found" in capsys.readouterr().err
        assert viebench.main(bench["common"] + ["--model", str(bench_editor), "--out", "/proc/no/such"]) == 2
        assert "--out /proc/no/such: cannot create folders in /proc" in capsys.readouterr().err
    args = ["--manifest", str(bench["manifest"]), "--results", f"sysA={bench['sysA']}", "--metrics", "clip_t",
            "--clip", f"hf:{tmp_path / 'no_clip'}", "--out", str(out)]
    assert viebench.main(args) == 2
    assert capsys.readouterr().err.startswith("error: ") and not out.exists()


def test_launch_shard_combines_the_shard_with_the_launchers_process_and_pins_its_gpu():
    assert viebench.launch_shard(None, "cpu", env={}) == ((0, 1), "cpu")
    assert viebench.launch_shard("1/2", "cpu", env={}) == ((1, 2), "cpu")
    torchrun = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "3"}
    assert viebench.launch_shard(None, "cuda", env=torchrun) == ((3, 4), "cuda:3")
    assert viebench.launch_shard("1/2", "cuda:0", env=torchrun) == ((7, 8), "cuda:0")  # machine 1 of 2, GPU given


def _summary_tables(out: Path) -> tuple[str, dict]:
    summary = json.loads((out / "summary.json").read_text())
    return (out / "table.md").read_text(), {k: summary[k] for k in ("systems", "missing", "n_records")
                                             if k in summary}


def test_two_shards_at_once_share_the_folder_and_the_last_writes_every_item(bench, tmp_path):
    """Two processes (RANK 0 and 1 of WORLD_SIZE 2, as torchrun sets them) on one --out at the same time: every
    (system, item) once in items.jsonl, no torn line, and the last shard to finish writes the tables one process
    writes, with sysB's missing result whichever shard its item fell in."""
    from viva_base.data.build.records import in_shard

    args = bench["common"] + ["--results", f"sysA={bench['sysA']}", "--results", f"sysB={bench['sysB']}",
                              "--metrics", "clip_tc,clip_t"]
    assert {in_shard(i, 0, 2) for i in ITEMS} == {True, False}  # both shards have items
    assert viebench.main(args + ["--out", str(tmp_path / "one")]) == 0
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "WORLD_SIZE": "2"}
    procs = [subprocess.Popen([sys.executable, "-m", "benchmarks.viebench", *args, "--out", str(tmp_path / "two")],
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    rows = _lines(tmp_path / "two" / "items.jsonl")
    assert sorted((r["system"], r["id"]) for r in rows) == sorted(
        (s, i) for s in ("sysA", "sysB") for i in ITEMS if (s, i) != ("sysB", "add_1"))
    # the shard that finished last rewrote the tables (under the lock) from every item: the one-process tables
    assert _summary_tables(tmp_path / "two") == _summary_tables(tmp_path / "one")
    assert _summary_tables(tmp_path / "two")[1]["missing"] == {"sysB": ["add_1"]}


def test_shards_one_after_the_other_evaluate_only_their_own_items(bench, tmp_path):
    from viva_base.data.build.records import in_shard

    args = bench["common"] + ["--results", f"sysA={bench['sysA']}", "--metrics", "clip_t", "--out", str(tmp_path)]
    assert viebench.main(args + ["--shard", "0/2"]) == 0
    assert sorted(r["id"] for r in _lines(tmp_path / "items.jsonl")) == sorted(i for i in ITEMS if in_shard(i, 0, 2))
    assert viebench.main(args + ["--shard", "1/2"]) == 0
    assert sorted(r["id"] for r in _lines(tmp_path / "items.jsonl")) == sorted(ITEMS)
    assert json.loads((tmp_path / "summary.json").read_text())["systems"]["sysA"]["n_items"] == len(ITEMS)
    assert viebench.main(args + ["--shard", "2/2"]) == 2  # one line, exit 2
