"""The edit command on real files: a clip made from a real photograph (scikit-image's astronaut, panned
and zoomed), mp4 / gif / image-folder inputs, reproducible files, and a table of bad inputs that must
each give one clear line, a non-zero exit, no traceback and no output file."""
import os
import subprocess
import sys
from fractions import Fraction

import av
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from viva_base.edit import main
from viva_base.pipeline import EditPipeline
from viva_base.video import probe_video, read_video, write_video

INSTR = "make the sky night"
FPS = 12
N, H, W = 9, 50, 70  # an odd size: neither x4 (pixel editor) nor x16


def photo_clip(n=N, h=H, w=W) -> torch.Tensor:
    """A short clip panning and zooming across a real photograph (skimage.data.astronaut, 512x512)."""
    from skimage import data

    img = torch.from_numpy(data.astronaut()).permute(2, 0, 1).float() / 255
    frames = []
    for i in range(n):
        ch = 360 - 12 * i                      # zoom in
        cw = int(ch * w / h)
        y, x = 40 + 4 * i, 10 + 6 * i          # pan
        crop = img[:, y:y + ch, x:x + cw]
        frames.append(F.interpolate(crop[None], size=(h, w), mode="bilinear", antialias=True, align_corners=False)[0])
    return torch.stack(frames).clamp(0, 1)


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_editor):
    """The saved tiny editor, the photo clip as mp4 / gif / PNG folder, a reference, and LoRAs."""
    from viva_base.model import widen_patch_embedding
    from viva_base.peft_utils import add_lora, save_lora
    from viva_base.tiny import TinySpec, make_tiny_transformer

    root = tmp_path_factory.mktemp("edit_cli")
    clip = photo_clip()
    d = {"root": root, "clip": clip, "editor": tiny_editor.save_pretrained(root / "editor")}
    d["mp4"] = write_video(root / "photo.mp4", clip, fps=FPS)
    pil = [Image.fromarray((f.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)) for f in clip]
    pil[0].save(root / "photo.gif", save_all=True, append_images=pil[1:], duration=80, loop=0)  # 12.5 fps
    d["gif"] = root / "photo.gif"
    (root / "seq").mkdir()
    for i, im in enumerate(pil[:5]):
        im.save(root / "seq" / f"frame_{i:03d}.png")
    d["seq"] = root / "seq"
    d["ref"] = root / "ref.png"
    pil[4].resize((32, 24)).save(d["ref"])
    for name, spec, bump in (("lora_ok", TinySpec(), True), ("lora_other", TinySpec(head_dim=16), False)):
        dit = add_lora(widen_patch_embedding(make_tiny_transformer(spec)), rank=4, alpha=4,
                       targets=tiny_editor.lora_targets)
        if bump:  # non-zero B, so the adapter changes the output
            with torch.no_grad():
                for n_, p in dit.named_parameters():
                    if "lora_B" in n_:
                        p.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
        save_lora(dit, root / name)
        d[name] = root / name
    return d


def _run_cli(*args, timeout=120):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="2")
    return subprocess.run([sys.executable, "-m", "viva_base.edit", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_cli_edits_a_photo_clip_at_the_input_frame_count_size_and_fps(files, tiny_editor, tmp_path):
    # lossless FFV1 output, so the comparison below sees only float noise: through lossy H.264 a one-level
    # rounding flip of a pixel changes the encoder's choices and whole blocks (a CI run saw 13/255)
    out = tmp_path / "edited.mkv"
    r = _run_cli("--model", files["editor"], "--video", files["mp4"], "--instruction", INSTR, "--out", out,
                 "--num-steps", 3, "--frames", 5, "--seed", 7, "--device", "cpu")
    assert r.returncode == 0, r.stderr[-2000:]
    assert probe_video(out) == (N, H, W, float(FPS))
    got = read_video(out)
    assert got.frames.shape == (N, 3, H, W) and got.fps == FPS
    assert f"wrote {out} ({N} frames, {W}x{H}, {FPS} fps)" in r.stdout
    # the same edit in-process (same weights, same seed): the same file content up to float noise
    again = EditPipeline(tiny_editor).edit_file(files["mp4"], INSTR, tmp_path / "api.mkv", num_inference_steps=3,
                                                num_frames=5, seed=7, progress=False)
    assert (read_video(again).frames - got.frames).abs().max() <= 2 / 255
    assert sorted(p.name for p in tmp_path.iterdir()) == ["api.mkv", "edited.mkv"]  # no temp files left


@pytest.mark.parametrize("source,expected", [
    ("gif", (N, H, W, 12.5)),      # GIF delays are centiseconds: 80 ms -> 12.5 fps
    ("seq", (5, H, W, 8.0)),       # an image folder plays at the default 8 fps
    ("mp4", (N, H, W, float(FPS))),
])
def test_file_inputs_keep_frame_count_size_and_fps(files, tiny_editor, tmp_path, source, expected):
    assert probe_video(files[source]) == expected
    out = EditPipeline(tiny_editor).edit_file(files[source], INSTR, tmp_path / "o.mp4", num_inference_steps=2,
                                              size=(24, 16), num_frames=3, progress=False)
    assert probe_video(out) == expected
    assert read_video(out).frames.shape == (expected[0], 3, H, W)


def test_a_phone_portrait_clip_is_edited_upright_and_written_upright(tiny_editor, tmp_path, oriented_clip):
    """A portrait phone clip: landscape 64 x 32 frames turned a quarter clockwise by the display matrix. The model
    must see it upright (the instructor reads its first frame) and the edit must come back 32 wide, 64 tall,
    upright, in the input's frame count and fps (before: edited and written lying on its side, 64 x 32)."""
    src = oriented_clip(tmp_path / "portrait.mp4", -90, frames=5)
    pipe = EditPipeline(tiny_editor)
    clip, info = pipe.load_clip(src, num_frames=5, size=(16, 32))  # (width, height)
    assert clip.shape == (5, 3, 32, 16) and (info.height, info.width) == (64, 32)
    assert clip[0, 0, :4, -4:].mean() > 0.8 and clip[0, 2, -4:, :4].mean() > 0.8  # red top-right, blue bottom-left
    # should a probe ever disagree with the decoder on the orientation, the decoded frames win
    from viva_base.pipeline import ClipInfo

    again, info2 = pipe.load_clip(src, num_frames=5, info=ClipInfo(5, 32, 64, 8.0))
    assert (info2.height, info2.width) == (64, 32) and again.shape[-2] > again.shape[-1]
    out = pipe.edit_file(src, INSTR, tmp_path / "edited.mp4", num_inference_steps=2, size=(16, 32), num_frames=5,
                         progress=False)
    assert probe_video(out) == (5, 64, 32, 8.0)
    with av.open(str(out)) as c:  # upright pixels, and no display matrix left to turn them again
        assert all("DISPLAYMATRIX" not in sd.type.name for sd in next(c.decode(video=0)).side_data)


def test_same_seed_gives_identical_files(files, tiny_editor, tmp_path):
    pipe = EditPipeline(tiny_editor)
    kw = dict(num_inference_steps=2, size="32x24", progress=False)
    paths = [pipe.edit_file(files["mp4"], INSTR, tmp_path / f"{name}.mp4", seed=seed, **kw)
             for name, seed in (("a", 3), ("b", 3), ("c", 4))]
    a, b, c = (p.read_bytes() for p in paths)
    assert a == b and a != c
    assert torch.equal(read_video(paths[0]).frames, read_video(paths[1]).frames)


def test_lora_and_dtype_options(files, tmp_path):
    """--lora loads the adapter (it changes the edit); --dtype bf16 gives the same edit up to bf16 noise."""
    common = ["--model", str(files["editor"]), "--video", str(files["seq"]), "--instruction", INSTR, "--num-steps", "2",
              "--size", "24x16", "--frames", "3", "--no-progress", "--device", "cpu"]
    assert main(common + ["--out", str(tmp_path / "base.mp4")]) == 0
    assert main(common + ["--out", str(tmp_path / "lora.mp4"), "--lora", str(files["lora_ok"])]) == 0
    assert main(common + ["--out", str(tmp_path / "bf16.mp4"), "--dtype", "bf16"]) == 0
    base, lora, bf16 = (read_video(tmp_path / f"{n}.mp4").frames for n in ("base", "lora", "bf16"))
    assert base.shape == lora.shape == bf16.shape == (5, 3, H, W)
    assert (base - lora).abs().mean() > 0.02
    assert (base - bf16).abs().mean() < 0.03


# ------------------------------------------------------------------------------------------ bad inputs
def _bad_inputs(root, files):
    """name -> (argument overrides, text the one-line error must contain)."""
    (root / "empty.mp4").write_bytes(b"")
    (root / "corrupt.mp4").write_bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    with av.open(str(root / "zero.mkv"), "w") as c:  # a video stream with no frames
        s = c.add_stream("ffv1", rate=Fraction(12))
        s.width, s.height, s.pix_fmt = 64, 48, "bgr0"
        c.start_encoding()
    (root / "noimages").mkdir(exist_ok=True)
    (root / "notanimage.png").write_text("hello")
    (root / "notaneditor").mkdir(exist_ok=True)
    (root / "emptylora").mkdir(exist_ok=True)
    return {
        "missing video": ({"--video": root / "nope.mp4"}, "nope.mp4: video not found"),
        "empty video": ({"--video": root / "empty.mp4"}, "empty.mp4: file is empty"),
        "corrupt video": ({"--video": root / "corrupt.mp4"}, "corrupt.mp4: not a readable video"),
        "zero-frame video": ({"--video": root / "zero.mkv"}, "zero.mkv: not a readable video"),
        "empty image folder": ({"--video": root / "noimages"}, "noimages: folder holds no images"),
        "non-image reference": ({"--reference": root / "notanimage.png"}, "notanimage.png: not a readable image"),
        "missing reference": ({"--reference": root / "nope.png"}, "nope.png: image not found"),
        "empty instruction": ({"--instruction": ""}, "instruction is empty"),
        "blank instruction": ({"--instruction": "  \t"}, "instruction is empty"),
        "missing output folder": ({"--out": root / "no_such_dir" / "o.mp4"}, "no_such_dir does not exist"),
        "output under a file": ({"--out": root / "notanimage.png" / "o.mp4"}, "notanimage.png is a file, not a folder"),
        "output folder not writable": ({"--out": "/proc/o.mp4"}, "/proc/o.mp4: cannot write in /proc"),
        "unsupported extension": ({"--out": root / "out" / "o.avi"}, "unsupported output extension '.avi'"),
        "image out, many frames": ({"--out": root / "out" / "o.png"}, "an image file holds one frame"),
        "unknown model folder": ({"--model": root / "notaneditor"}, "missing editor_config.json"),
        "hub id while offline": ({"--model": "nobody/no-such-editor"}, "could not be fetched"),
        "missing LoRA folder": ({"--lora": root / "nolora"}, "nolora: LoRA folder not found"),
        "folder without a LoRA": ({"--lora": root / "emptylora"}, "no LoRA here"),
        "LoRA of another model": ({"--lora": files["lora_other"]}, "the LoRA does not match the model"),
        "zero steps": ({"--num-steps": 0}, "argument --num-steps/--steps: 0 must be at least 1"),
        "bad size": ({"--size": "big"}, "is not WIDTHxHEIGHT"),
        "backwards guidance interval": ({"--guidance-interval": (0.8, 0.2)},
                                        "--guidance-interval=[0.8, 0.2]: need 0 <= lo < hi"),
        "zero shift": ({"--shift": 0}, "--shift 0.0: the schedule shift must be a number > 0"),
    }


def _argv(files, out, overrides):
    args = {"--model": files["editor"], "--video": files["mp4"], "--instruction": INSTR, "--out": out,
            "--num-steps": 1, "--no-progress": None, **overrides}
    argv = []
    for k, v in args.items():
        argv += [k] if v is None else [k, *map(str, v)] if isinstance(v, tuple) else [k, str(v)]
    return argv


@pytest.fixture(scope="module")
def bad(files):
    root = files["root"] / "bad"
    root.mkdir()
    (root / "out").mkdir()
    return root, _bad_inputs(root, files)


BAD_CASES = [
    "missing video", "empty video", "corrupt video", "zero-frame video", "empty image folder",
    "non-image reference", "missing reference", "empty instruction", "blank instruction", "missing output folder",
    "output under a file", "output folder not writable",
    "unsupported extension", "image out, many frames", "unknown model folder", "hub id while offline",
    "missing LoRA folder", "folder without a LoRA", "LoRA of another model", "zero steps", "bad size",
    "backwards guidance interval", "zero shift"]


def test_bad_case_list_covers_the_table(tmp_path, files):
    assert sorted(_bad_inputs(tmp_path, files)) == sorted(BAD_CASES)


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_is_one_clear_line_and_no_output(files, bad, capsys, case):
    root, table = bad
    overrides, message = table[case]
    out = overrides.get("--out", root / "out" / "edited.mp4")
    before = sorted(os.listdir(root / "out"))
    code = main(_argv(files, out, overrides))
    err = capsys.readouterr().err
    assert code == 2
    assert message in err, err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1, err
    assert not os.path.exists(out) and sorted(os.listdir(root / "out")) == before


@pytest.mark.parametrize("case", ["corrupt video", "LoRA of another model"])
def test_bad_input_exits_nonzero_in_a_real_process(files, bad, case):
    root, table = bad
    overrides, message = table[case]
    out = root / "out" / "proc.mp4"
    r = _run_cli(*_argv(files, out, overrides))
    assert r.returncode == 2
    assert message in r.stderr
    assert len([line for line in r.stderr.splitlines() if line.startswith("error: ")]) == 1, r.stderr
    assert "Traceback" not in r.stderr
    assert not out.exists() and sorted(os.listdir(root / "out")) == []


def test_old_flag_spellings_are_aliases_of_the_shared_knob_names(files, tmp_path, caplog):
    """--num-steps / --guidance-scale are the names every command and recipe uses (sampling.num_steps,
    sampling.guidance_scale); the edit command's old --steps / --guidance give the same edit, with a warning."""
    from viva_base.edit import main

    base = ["--model", str(files["editor"]), "--video", str(files["mp4"]), "--instruction", INSTR, "--frames", "5",
            "--seed", "3", "--device", "cpu", "--no-progress"]
    assert main([*base, "--out", str(tmp_path / "new.mkv"), "--num-steps", "2", "--guidance-scale", "3"]) == 0
    with caplog.at_level("WARNING"):
        assert main([*base, "--out", str(tmp_path / "old.mkv"), "--steps", "2", "--guidance", "3"]) == 0
    assert "--steps is the old name of --num-steps" in caplog.text and "--guidance is the old name" in caplog.text
    assert torch.equal(read_video(tmp_path / "new.mkv").frames, read_video(tmp_path / "old.mkv").frames)
    assert main([*base, "--out", str(tmp_path / "other.mkv"), "--num-steps", "2", "--guidance-scale", "1"]) == 0
    assert not torch.equal(read_video(tmp_path / "new.mkv").frames, read_video(tmp_path / "other.mkv").frames)


def test_the_edit_keeps_the_clips_sound_unless_told_not_to(files, tmp_path, clip_with_sound, capsys):
    """A clip with sound (a 440 Hz tone from 0.5 s): the edit command's output carries the same AAC packets at
    the same time, and `--no-audio` leaves them out. Before, every edit came out silent."""
    from viva_base.edit import main

    src = clip_with_sound(tmp_path / "talk.mp4", frames=9, fps=12, delay=0.25)
    base = ["--model", str(files["editor"]), "--video", str(src), "--instruction", INSTR, "--frames", "5",
            "--size", "32x16", "--num-steps", "2", "--device", "cpu", "--no-progress"]
    assert main([*base, "--out", str(tmp_path / "with.mp4")]) == 0
    assert "fps, with the input's sound)" in capsys.readouterr().out
    assert main([*base, "--out", str(tmp_path / "without.mp4"), "--no-audio"]) == 0
    assert "12 fps)" in capsys.readouterr().out
    with av.open(str(src)) as c:
        want = [(p.pts, bytes(p)) for p in c.demux(c.streams.audio[0]) if p.size]
    with av.open(str(tmp_path / "with.mp4")) as c:
        assert [(p.pts, bytes(p)) for p in c.demux(c.streams.audio[0]) if p.size] == want
        assert c.streams.video[0].frames == 9
    with av.open(str(tmp_path / "without.mp4")) as c:
        assert not c.streams.audio and c.streams.video[0].frames == 9
    assert torch.equal(read_video(tmp_path / "with.mp4").frames, read_video(tmp_path / "without.mp4").frames)


def test_mapped_back_gives_map_backs_frames_one_at_a_time():
    from viva_base.pipeline import MappedBack, map_back

    edited = torch.rand(5, 3, 16, 32, generator=torch.Generator().manual_seed(0))
    lazy, whole = MappedBack(edited, 23, (50, 70)), map_back(edited, 23, (50, 70))
    assert len(lazy) == 23 and torch.equal(torch.stack([lazy[i] for i in range(23)]), whole)


LONG_EDIT = """
import resource, sys, torch
from viva_base.pipeline import EditPipeline
from viva_base.tiny import make_tiny_editor
torch.set_num_threads(1)
pipe = EditPipeline(make_tiny_editor(seed=0))
kw = dict(num_inference_steps=1, num_frames=5, size=(32, 16), progress=False)
pipe.edit_file(sys.argv[1], "make it blue", sys.argv[3] + ".warm.mp4", **kw)  # a short clip: every lazy import done
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
pipe.edit_file(sys.argv[2], "make it blue", sys.argv[3], **kw)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
"""


def test_a_long_clip_is_written_back_without_holding_it_whole(tmp_path):
    """The edit of 1000 frames of 160 x 120 (5 model frames) raised the process's peak memory by 660 MB: the whole
    clip at the input's size, as float32, three times over (a minute of 1080p would need about 128 GB). Written one
    frame at a time (MappedBack) it raises it by about 2 MB."""
    n = 1000
    ramp = torch.linspace(0, 1, n)[:, None, None, None].expand(n, 3, 120, 160)
    long = write_video(tmp_path / "long.mp4", ramp, fps=30)
    short = write_video(tmp_path / "short.mp4", ramp[:9], fps=30)
    r = subprocess.run([sys.executable, "-c", LONG_EDIT, str(short), str(long), str(tmp_path / "out.mp4")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert float(r.stdout.split()[-1]) < 60, r.stdout
    assert probe_video(tmp_path / "out.mp4") == (n, 120, 160, 30.0)


def test_a_variable_frame_rate_clip_keeps_its_frame_times_and_lip_sync(tiny_editor, tmp_path, clip_with_sound):
    """A phone clip at 30 fps that drops to 15 fps halfway (low light), with sound. Written at its average rate
    (23.7 fps) frame 30 was shown at 1.27 s instead of 1.00 s: the picture ran 267 ms behind its sound. Each output
    frame now keeps its source frame's time."""
    from viva_base.video import frame_times

    times = [i / 30 for i in range(30)] + [1 + i / 15 for i in range(15)]
    src = clip_with_sound(tmp_path / "vfr.mp4", fps=30, delay=0.0, times=times)
    assert frame_times(src) == pytest.approx(times, abs=1e-4)
    out = EditPipeline(tiny_editor).edit_file(src, INSTR, tmp_path / "out.mp4", num_inference_steps=1, num_frames=5,
                                             size=(32, 16), progress=False)
    assert frame_times(out) == pytest.approx(times, abs=1e-4)
    with av.open(str(out)) as c:
        assert c.streams.video[0].frames == 45 and c.streams.audio
