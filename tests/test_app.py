"""The web demo (viva_base.app): the edit behind the page (same seed for every variant, oracle scores of toy
examples, the edit command's checks), one-line errors for a bad --model / --lora, and the page itself served on
localhost and driven in headless Chromium (playwright, with Debian's chromium; skipped without either)."""
import html
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from viva_base.app import BASE_LABEL, EditDemo, lora_labels, main, toy_examples
from viva_base.errors import UserError
from viva_base.pipeline import EditPipeline
from viva_base.video import probe_video, read_video, write_video

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tiny_editor):
    """The tiny editor on disk and a LoRA of it whose non-zero B changes the edit."""
    from viva_base.model import widen_patch_embedding
    from viva_base.peft_utils import add_lora, save_lora
    from viva_base.tiny import TinySpec, make_tiny_transformer

    root = tmp_path_factory.mktemp("app")
    tiny_editor.save_pretrained(root / "editor")
    dit = add_lora(widen_patch_embedding(make_tiny_transformer(TinySpec())), rank=4, alpha=4,
                   targets=tiny_editor.lora_targets)
    with torch.no_grad():
        for name, p in dit.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    save_lora(dit, root / "lora")
    return root


@pytest.fixture(scope="module")
def demo(saved, tmp_path_factory):
    from viva_base.edit import load_model

    editor = load_model(str(saved / "editor"), {"lora0": saved / "lora"}, device=torch.device("cpu"),
                        dtype=torch.float32)
    return EditDemo(editor, {BASE_LABEL: None, "SFT + lora": "lora0"}, tmp_path_factory.mktemp("work"))


def test_toy_examples_are_one_per_edit_type_and_reproducible():
    a, b = toy_examples(), toy_examples()
    assert [e.edit_type for e in a] == ["add", "remove", "replace", "recolour", "background"]
    for x, y in zip(a, b):
        assert x.label == y.label and torch.equal(x.source, y.source) and torch.equal(x.target, y.target)
        assert x.source.shape == (9, 3, 32, 32) and x.mask.shape == (9, 1, 32, 32) and x.mask.sum() > 0


def test_each_variant_edits_the_same_clip_with_the_same_seed(demo, saved):
    ex = next(iter(demo.examples.values()))
    steps = []
    r = demo.edit(example=ex.label, upload=None, instruction=ex.instruction, num_steps=2, seed=5,
                  progress=lambda done, total, desc: steps.append((done, total)))
    assert steps == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert list(r.views) == [BASE_LABEL, "SFT + lora"] and len(r.downloads) == 2
    base, lora = (read_video(p) for p in r.downloads)
    assert base.frames.shape == lora.frames.shape == (9, 3, 32, 32) and base.fps == 8
    assert probe_video(r.views[BASE_LABEL])[1:3] == (256, 256)  # the display copy: 8x, nearest
    # the SFT variant is the editor with its adapters off: the same edit as the bare pipeline, same seed
    from viva_base.training import load_editor

    bare = EditPipeline(load_editor(saved / "editor"))(ex.source, ex.instruction, num_inference_steps=2, seed=5,
                                                       progress=False)
    got = demo.edit(example=ex.label, upload=None, instruction=ex.instruction, num_steps=2, seed=5,
                    variants=[BASE_LABEL])
    assert list(got.views) == [BASE_LABEL]
    assert torch.allclose(got.edits[BASE_LABEL], bare, atol=1e-5)
    assert torch.equal(got.edits[BASE_LABEL], r.edits[BASE_LABEL])  # with or without the LoRA variant after it
    assert (r.edits[BASE_LABEL] - r.edits["SFT + lora"]).abs().mean() > 0.02  # the LoRA changes the edit
    assert set(r.scores) == {BASE_LABEL, "SFT + lora", "source unchanged"}
    assert r.scores["source unchanged"]["if_progress"] == 0 and 0 < r.scores[BASE_LABEL]["oracle"] < 1
    assert "oracle" in r.message and "seed 5" in r.message


def test_the_sampler_fields_give_the_pipelines_edit_with_that_sampler(demo, saved):
    """Shift and CFG interval from the page reach the pipeline: the SFT variant equals the bare pipeline sampled
    with the same options, differs from the default sampler, and says so; empty fields (or shift 0) are the
    default sampler exactly."""
    from viva_base.training import load_editor

    ex = next(iter(demo.examples.values()))
    kw = dict(example=ex.label, upload=None, instruction=ex.instruction, num_steps=3, seed=5, variants=[BASE_LABEL])
    default = demo.edit(**kw).edits[BASE_LABEL]
    assert torch.equal(demo.edit(**kw, shift=0, guidance_interval="").edits[BASE_LABEL], default)
    assert torch.equal(demo.edit(**kw, shift="", guidance_interval=" ").edits[BASE_LABEL], default)
    got = demo.edit(**kw, shift="6", guidance_interval="0.5, 1")
    bare = EditPipeline(load_editor(saved / "editor"))(ex.source, ex.instruction, num_inference_steps=3, seed=5,
                                                       progress=False, shift=6.0, guidance_interval=(0.5, 1.0))
    assert torch.allclose(got.edits[BASE_LABEL], bare, atol=1e-5)
    assert (got.edits[BASE_LABEL] - default).abs().mean() > 1e-3
    assert torch.equal(demo.edit(**kw, shift=6, guidance_interval=(0.5, 1.0)).edits[BASE_LABEL], got.edits[BASE_LABEL])
    assert "guidance 2 where 0.5 < sigma <= 1, shift 6, seed 5" in html.unescape(got.message)
    assert "guidance 2, the editor's shift, seed 5" in html.unescape(demo.edit(**kw).message)


def test_an_upload_is_edited_at_its_frame_count_size_and_fps(demo, tmp_path):
    clip = torch.rand(7, 3, 22, 30, generator=torch.Generator().manual_seed(0))
    path = write_video(tmp_path / "clip.mp4", clip, fps=12)
    r = demo.edit(example=None, upload=str(path), instruction="make it blue", num_steps=1, size="16x16")
    assert [probe_video(p) for p in r.downloads] == [(7, 22, 30, 12.0)] * 2
    assert r.scores == {} and r.target_view is None and "oracle" not in r.message


def test_an_uploads_sound_goes_into_the_downloads(demo, tmp_path, clip_with_sound):
    import av

    path = clip_with_sound(tmp_path / "talk.mp4", frames=9, fps=12, delay=0.25)
    r = demo.edit(example=None, upload=str(path), instruction="make it blue", num_steps=1, size="16x16")
    for p in r.downloads:
        with av.open(p) as c:
            assert c.streams.audio and c.streams.audio[0].codec_context.name == "aac"
            assert c.streams.audio[0].start_time * c.streams.audio[0].time_base == pytest.approx(0.25, abs=0.03)


@pytest.mark.parametrize("kwargs,message", [
    ({"instruction": "  "}, "instruction is empty"),
    ({"example": None}, "no source video"),
    ({"num_steps": 0}, "steps 0: use a whole number >= 1"),
    ({"num_steps": 2.5}, "steps 2.5"),
    ({"seed": -1}, "seed -1"),
    ({"guidance_scale": "x"}, "guidance 'x' is not a number"),
    ({"guidance_scale": 0}, "guidance 0: give a number > 0 (1: no CFG)"),  # was an edit without the instruction
    ({"guidance_scale": -2}, "guidance -2: give a number > 0"),
    ({"size": "big"}, "is not WIDTHxHEIGHT"),
    ({"variants": []}, "no variant chosen"),
    ({"reference": "/nonexistent/ref.png"}, "ref.png: image not found"),
    ({"shift": "x"}, "shift 'x' is not a number"),
    ({"shift": -1}, "shift -1.0: the schedule shift must be a number > 0"),
    ({"guidance_interval": "0.5"}, "CFG interval '0.5': give two numbers LO HI"),
    ({"guidance_interval": "0.5 high"}, "CFG interval '0.5 high': give two numbers LO HI"),
    ({"guidance_interval": "1 0.5"}, "CFG interval=[1.0, 0.5]: need 0 <= lo < hi"),
])
def test_bad_page_inputs_raise_the_edit_commands_messages(demo, kwargs, message):
    args = {"example": next(iter(demo.examples)), "upload": None, "instruction": "make it blue", "num_steps": 1,
            **kwargs}
    with pytest.raises(UserError, match=re.escape(message)):
        demo.edit(**args)


def test_lora_labels_are_readable_and_unique(tmp_path):
    assert list(lora_labels(["outputs/toy/lora", "outputs/other/lora", "outputs/toy/lora"])) == [
        "SFT + LoRA toy/lora", "SFT + LoRA other/lora", "SFT + LoRA toy/lora (2)"]


def test_bad_uploads_and_limits(demo, tmp_path):
    (tmp_path / "corrupt.mp4").write_bytes(b"this is not a video\n" * 150)  # (random bytes may parse as audio)
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(UserError, match="corrupt.mp4: not a readable video"):
        demo.preview_upload(tmp_path / "corrupt.mp4")
    with pytest.raises(UserError, match="unsupported file type '.txt'"):
        demo.preview_upload(tmp_path / "notes.txt")
    long = write_video(tmp_path / "long.mp4", torch.zeros(12, 3, 16, 16), fps=8)
    small = EditDemo(demo.editor, demo.variants, tmp_path / "w", max_input_frames=10, max_upload_mb=1e-3,
                     examples=[])
    with pytest.raises(UserError, match="over this demo's upload limit"):
        small.preview_upload(long)
    small.max_upload_mb = 10
    with pytest.raises(UserError, match="12 frames; this demo edits clips of at most 10"):
        small.preview_upload(long)


@pytest.mark.parametrize("extra,message", [
    (["--model", "{root}/nope"], "nope: no such directory"),
    (["--model", "{root}/editor", "--lora", "{root}/nolora"], "nolora: LoRA folder not found"),
    (["--model", "{root}/editor", "--lora", "{root}"], "no LoRA here"),
    (["--model", "{root}/editor", "--port", "70000"], "--port 70000"),
    (["--model", "{root}/editor", "--shift", "0"], "--shift 0.0: the schedule shift must be a number > 0"),
    (["--model", "{root}/editor", "--guidance-scale", "0"], "--guidance-scale 0: must be > 0 (1: no CFG)"),
    (["--model", "{root}/editor", "--guidance-interval", "1", "0.5"], "--guidance-interval=[1.0, 0.5]: need 0 <= lo"),
])
def test_bad_model_or_lora_is_one_line_and_exit_2(saved, capsys, extra, message):
    assert main([a.format(root=saved) for a in extra]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert len([line for line in err.splitlines() if line.startswith("error: ")]) == 1, err


def test_the_page_runs_one_edit_at_a_time_and_serves_localhost_by_default(demo):
    from viva_base.app import build_page, build_parser

    args = build_parser().parse_args(["--model", "m"])
    assert (args.host, args.port) == ("127.0.0.1", 7860)
    page = build_page(demo)
    edit = [fn for fn in page.fns.values() if fn.name == "run_edit"]
    assert len(edit) == 1 and edit[0].queue and edit[0].concurrency_limit == 1


def test_without_gradio_the_command_says_how_to_install_it(saved, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "gradio", None)  # import gradio -> ImportError
    assert main(["--model", str(saved / "editor")]) == 2
    err = capsys.readouterr().err
    assert "pip install 'edit-grpo[app]'" in err and "Traceback" not in err


def test_a_busy_port_is_one_line_and_exit_2(saved, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        assert main(["--model", str(saved / "editor"), "--port", str(s.getsockname()[1])]) == 2
    err = capsys.readouterr().err
    assert "error: cannot serve on 127.0.0.1:" in err and "Traceback" not in err


def test_bad_lora_in_a_real_process(saved):
    r = subprocess.run([sys.executable, "-m", "viva_base.app", "--model", str(saved / "editor"), "--lora",
                        str(saved / "missing")], capture_output=True, text=True, timeout=120, cwd=REPO,
                       env=dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1"))
    assert r.returncode == 2 and "missing: LoRA folder not found" in r.stderr and "Traceback" not in r.stderr


# ------------------------------------------------------------------------------------------ in a browser
def _chromium() -> str | None:
    return next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)


@pytest.fixture(scope="module")
def server(saved, tmp_path_factory):
    """The app on a free localhost port with the tiny editor and its LoRA; yields its URL."""
    from test_scale_multiprocess import free_port

    port = free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "viva_base.app", "--model", str(saved / "editor"), "--lora",
                                 str(saved / "lora"), "--port", str(port), "--num-steps", "2", "--shift", "6",
                                 "--guidance-interval", "0.5", "1"], cwd=REPO,
                                stdout=out, stderr=subprocess.STDOUT,
                                env=dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1"))
    url = f"http://127.0.0.1:{port}/"
    try:
        import urllib.request

        deadline = time.time() + 60
        while True:
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.time() < deadline, "the app did not start in 60 s: " + log.read_text()[-3000:]
            time.sleep(0.3)
        yield url
    finally:
        proc.terminate()  # closes the server and removes its files, as Ctrl-C does
        try:
            assert proc.wait(20) == 0, log.read_text()[-3000:]
        except subprocess.TimeoutExpired:
            proc.kill()
            raise


RESULTS = "#result-0 video, #result-1 video"


def test_the_page_in_headless_chromium(server, saved, tmp_path):
    browser = _chromium()
    if browser is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright
    from PIL import Image

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=browser, headless=True, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = b.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(server)
            page.wait_for_selector("#edit")
            # a bundled example: its instruction and source appear; edit it with both variants
            page.locator("#example label").filter(has_text="recolour").click()
            page.wait_for_function("document.querySelector('#instruction textarea').value.length > 0")
            page.wait_for_selector("#source video")
            page.click("#edit")
            page.wait_for_function(f"document.querySelectorAll('{RESULTS}').length == 2", timeout=30000)
            # both edits load and play
            page.wait_for_function(f"[...document.querySelectorAll('{RESULTS}')].every(v => v.duration > 0)",
                                   timeout=15000)
            page.evaluate(f"Promise.all([...document.querySelectorAll('{RESULTS}')].map(v => v.play()))")
            page.wait_for_function(f"[...document.querySelectorAll('{RESULTS}')].every(v => v.currentTime > 0)",
                                   timeout=15000)
            status = page.inner_text("#status")
            assert "SFT editor" in status and f"SFT + LoRA {saved.name}/lora" in status and "oracle" in status, status
            assert "where 0.5 < sigma <= 1, shift 6," in status, status  # --shift / --guidance-interval: the defaults
            assert page.locator("#downloads a").count() >= 2
            # the screenshot shows two result panes side by side, each a rendered video
            shot = tmp_path / "page.png"
            page.screenshot(path=str(shot))
            boxes = [page.locator(f"#result-{i} video").bounding_box() for i in (0, 1)]
            assert abs(boxes[0]["y"] - boxes[1]["y"]) < 2 and boxes[1]["x"] > boxes[0]["x"] + boxes[0]["width"] - 1
            with Image.open(shot) as img:
                for box in boxes:
                    x, y, w, h = (box[k] for k in ("x", "y", "width", "height"))
                    lo, hi = img.convert("L").crop((x, y, x + w, y + h)).getextrema()
                    assert box["width"] > 100 and hi - lo > 50, (box, lo, hi)
            # a bad upload: the edit command's message, in the page
            bad = tmp_path / "broken.mp4"
            bad.write_bytes(b"this is not a video\n" * 150)  # random bytes sometimes parse as an audio file
            page.set_input_files("#upload input[type=file]", str(bad))
            page.wait_for_selector("#status .viva-error", timeout=15000)
            text = page.inner_text("#status")
            assert "broken.mp4: not a readable video" in text and "Traceback" not in page.content(), text
        finally:
            b.close()
