"""Video I/O: round trips per format, fps kept, lossless formats exact, clear errors, atomic writes."""
import pytest
import torch

from viva_base.video import VideoError, probe_video, read_image, read_video, write_video


def _clip(f=5, h=32, w=48):
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (f, 3, h, w), generator=g).float() / 255


@pytest.mark.parametrize("ext,tol", [(".mkv", 0.0), ("", 0.0), (".mp4", 0.25), (".webm", 0.25), (".gif", 0.35)])
def test_round_trip(tmp_path, ext, tol):
    x = _clip()
    path = write_video(tmp_path / f"clip{ext}", x, fps=12)
    v = read_video(path)
    assert v.frames.shape == x.shape
    if ext != ".gif":  # GIF stores frame durations in centiseconds
        assert abs(v.fps - (8.0 if ext == "" else 12.0)) < 1e-6
    assert (v.frames - x).abs().mean() <= tol
    assert probe_video(path)[:3] == (5, 32, 48)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp leftovers


def test_odd_sizes_and_limits(tmp_path):
    x = _clip(f=7, h=33, w=51)
    v = read_video(write_video(tmp_path / "odd.mp4", x, fps=10))
    assert v.frames.shape == x.shape
    small = read_video(tmp_path / "odd.mp4", max_frames=3, max_side=17)
    assert small.frames.shape[0] == 3 and max(small.frames.shape[-2:]) == 17


def test_errors_are_clear(tmp_path):
    with pytest.raises(VideoError, match="not found"):
        read_video(tmp_path / "missing.mp4")
    (tmp_path / "empty.mp4").write_bytes(b"")
    with pytest.raises(VideoError, match="empty"):
        read_video(tmp_path / "empty.mp4")
    (tmp_path / "junk.mp4").write_bytes(b"not a video at all" * 50)
    with pytest.raises(VideoError, match="not a readable video"):
        read_video(tmp_path / "junk.mp4")
    from viva_base.video import mp4_display_matrix

    assert mp4_display_matrix(tmp_path / "junk.mp4") is None  # (probe_video then decodes a frame)
    (tmp_path / "junk.png").write_bytes(b"nope")
    with pytest.raises(VideoError, match="not a readable image"):
        read_image(tmp_path / "junk.png")
    with pytest.raises(VideoError, match="does not exist"):
        write_video(tmp_path / "no" / "dir.mp4", _clip())
    with pytest.raises(VideoError, match="unsupported output extension"):
        write_video(tmp_path / "x.xyz", _clip())
    assert not (tmp_path / "x.xyz").exists()


@pytest.mark.parametrize("ext", [".mp4", ".mkv", ".webm"])
def test_same_frames_give_identical_bytes_whatever_the_heap_holds(tmp_path, ext):
    """Identical frames must give byte-identical files, whatever garbage the allocator hands the encoder.
    x264's macroblock-tree pass (AVX-512 code) read uninitialised memory: 216 of 300 encodes of one 70x50 clip
    differed while the heap was churned between them, which made the edit command's same-seed files differ."""
    import numpy as np

    x = _clip(f=9, h=13, w=18).repeat_interleave(4, 2).repeat_interleave(4, 3)[:, :, :50, :70]  # 4x4 blocks
    rng = np.random.default_rng(0)
    first = write_video(tmp_path / f"ref{ext}", x, fps=12).read_bytes()
    for i in range(24):
        junk = [rng.random(int(n)) for n in rng.integers(1, 50_000, 4)]  # reshape the heap between encodes
        assert write_video(tmp_path / f"again{ext}", x, fps=12).read_bytes() == first, f"encode {i} differed"
        del junk


def _corner(frames, channel):
    """(row, column) of the centre of the coloured block in the first frame."""
    m = (frames[0, channel] > 0.8) & (frames[0, 2 - channel] < 0.4)
    idx = m.nonzero().float().mean(0)
    return round(idx[0].item()), round(idx[1].item())


# Where ffmpeg's CLI (5.1, autorotate on) shows the red and blue blocks of the 32 x 64 coded frame, measured with
# `ffmpeg -i clip.mp4 frame.png` on clips written by the `oriented_clip` fixture: (shown height, width), red centre,
# blue centre.
SHOWN = {
    (0, False, False): ((32, 64), (4, 4), (28, 60)),
    (90, False, False): ((64, 32), (60, 4), (4, 28)),     # a quarter turn counter-clockwise
    (-90, False, False): ((64, 32), (4, 28), (60, 4)),    # clockwise (a phone held upright)
    (180, False, False): ((32, 64), (28, 60), (4, 4)),
    (0, True, False): ((32, 64), (4, 60), (28, 4)),       # a mirror (front camera)
    (90, True, False): ((64, 32), (60, 28), (4, 4)),
}


@pytest.mark.parametrize("turn", list(SHOWN))
def test_a_video_is_read_as_players_show_it(tmp_path, turn, oriented_clip):
    """Phones store a portrait clip as landscape frames plus a display matrix. Read as coded, such a clip was
    edited and written back lying on its side (and its first frame reached the instructor sideways)."""
    path = oriented_clip(tmp_path / "clip.mp4", *turn)
    (h, w), red, blue = SHOWN[turn]
    import av

    from viva_base.video import display_matrix, mp4_display_matrix, upright_transposes

    with av.open(str(path)) as c:  # probe_video reads the matrix from the MP4 boxes: FFmpeg's, without decoding
        decoded = display_matrix(next(c.decode(video=0)))
    assert upright_transposes(mp4_display_matrix(path)) == upright_transposes(decoded)
    assert mp4_display_matrix(path) == (decoded or (65536, 0, 0, 65536))
    v = read_video(path)
    assert v.frames.shape == (3, 3, h, w)
    assert _corner(v.frames, 0) == red and _corner(v.frames, 2) == blue
    assert probe_video(path) == (3, h, w, 8.0)
    small = read_video(path, max_side=32, frame_step=2)  # shrinking while decoding keeps the orientation
    assert small.frames.shape == (2, 3, h // 2, w // 2)


def test_an_image_is_read_as_its_exif_orientation_says(tmp_path, oriented_clip):
    """A phone photo (a reference image, or a frame of an image folder) stores its orientation in EXIF."""
    from PIL import Image

    img = Image.fromarray(oriented_clip.coded)
    exif = img.getexif()
    exif[0x0112] = 6  # Orientation 6: shown turned 90 degrees clockwise
    img.save(tmp_path / "photo.jpg", exif=exif, quality=100, subsampling=0)
    x = read_image(tmp_path / "photo.jpg")[None]
    assert x.shape == (1, 3, 64, 32)
    assert _corner(x, 0) == (4, 28) and _corner(x, 2) == (60, 4)  # = the clockwise quarter turn above


def test_hd_video_is_written_with_colour_tags_players_read_right(tmp_path):
    """Untagged, players take BT.709 for HD: our BT.601 frames then showed green (32, 224, 64) as (16, 193, 58)."""
    av = pytest.importorskip("av")
    from av.video.reformatter import Colorspace

    colour = torch.tensor([32, 224, 64]) / 255
    for (h, w), matrix in (((720, 1280), Colorspace.ITU709), ((48, 64), Colorspace.ITU601)):
        path = write_video(tmp_path / f"{w}.mp4", colour[None, :, None, None].expand(2, 3, h, w).clone(), fps=8)
        with av.open(str(path)) as c:
            frame = next(c.decode(video=0))
            assert (frame.colorspace, frame.color_range) == ((1, 1) if w == 1280 else (6, 1))  # BT.709 / 170M, tv
            # decoded with the matrix the size implies (what a player guesses), and by our reader (the tags)
            guessed = frame.reformat(format="rgb24", src_colorspace=matrix).to_ndarray()[h // 2, w // 2]
        assert (torch.from_numpy(guessed.astype("float32")) - colour * 255).abs().max() <= 3
        assert (read_video(path).frames[0, :, h // 2, w // 2] - colour).abs().max() <= 3 / 255


def _sound(path):
    """(codec, sample rate, start in seconds, packets' bytes, decoded samples) of a file's first audio stream (mono),
    or None when it has none."""
    av = pytest.importorskip("av")
    import numpy as np

    with av.open(str(path)) as c:
        if not c.streams.audio:
            return None
        a = c.streams.audio[0]
        packets = [bytes(p) for p in c.demux(a) if p.size]
    with av.open(str(path)) as c:
        a = c.streams.audio[0]
        frames = list(c.decode(a))
        samples = np.concatenate([f.to_ndarray()[0] for f in frames])  # mono: one row, planar or packed
        start = float(frames[0].pts * frames[0].time_base)
        return a.codec_context.name, a.codec_context.sample_rate, start, packets, samples


def _tone_hz(samples, rate):
    import numpy as np

    x = samples[: rate // 2]
    return np.argmax(np.abs(np.fft.rfft(x))) * rate / len(x)


def test_the_sound_of_a_clip_goes_along_in_sync(tmp_path, clip_with_sound, caplog):
    """An edit written with ``audio=source`` keeps the source's sound: its packets as they are where the container
    takes the codec (AAC into .mp4/.mov/.mkv), re-encoded where not (Opus for .webm), starting where it started
    relative to the first frame. Before, every edit came out silent."""
    src = clip_with_sound(tmp_path / "talk.mp4", delay=0.5)
    codec, rate, start, packets, samples = _sound(src)
    x = _clip(f=24, h=48, w=64)
    for ext in (".mp4", ".mov", ".mkv"):
        got = _sound(write_video(tmp_path / f"out{ext}", x, fps=12, audio=src))
        # copied as it is, at the same time (to the millisecond: .mkv's time base)
        assert got[:3] == (codec, rate, pytest.approx(start, abs=1e-3)) and got[3] == packets
    opus = _sound(write_video(tmp_path / "out.webm", x, fps=12, audio=src))
    assert opus[:2] == ("opus", 48000) and abs(opus[2] - start) < 0.025  # one Opus frame
    assert _tone_hz(opus[4][round((start + 0.1) * 48000):], 48000) == pytest.approx(440, abs=4)
    assert start == pytest.approx(0.5, abs=0.03)  # the fixture's tone starts half a second in
    # the edit itself is unchanged by its sound; a silent source and audio=None add none
    alone = write_video(tmp_path / "v.mkv", x, 12)
    assert torch.equal(read_video(tmp_path / "out.mkv").frames, read_video(alone).frames)
    silent = write_video(tmp_path / "silent.mp4", x, fps=12)
    assert _sound(write_video(tmp_path / "again.mp4", x, fps=12, audio=silent)) is None
    with caplog.at_level("WARNING", logger="viva_base.video"):
        write_video(tmp_path / "out.gif", x, fps=12, audio=src)
    assert "holds no sound" in caplog.text


def test_a_sound_that_cannot_be_carried_over_drops_with_a_warning(tmp_path, clip_with_sound, caplog, monkeypatch):
    import viva_base.video as video

    src = clip_with_sound(tmp_path / "talk.mp4")
    monkeypatch.setitem(video.AUDIO_ENCODER, ".webm", "no_such_encoder")  # AAC must be re-encoded for .webm
    x = _clip(f=24, h=48, w=64)
    with caplog.at_level("WARNING", logger="viva_base.video"):
        out = write_video(tmp_path / "out.webm", x, fps=12, audio=src)
    assert "cannot be carried over" in caplog.text and _sound(out) is None
    assert (read_video(out).frames - x).abs().mean() <= 0.25 and read_video(out).frames.shape == x.shape
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.webm", "talk.mp4"]  # no temporary file left


def test_an_hdr_clip_is_read_with_a_warning_that_it_is_not_tone_mapped(tmp_path, caplog):
    """Phones record HDR (HLG) by default; reading it as SDR without tone mapping gives flat colours. Say so."""
    av = pytest.importorskip("av")
    import numpy as np

    for trc, name in ((18, "HLG"), (1, None)):
        path = tmp_path / f"trc{trc}.mp4"
        with av.open(str(path), "w") as c:
            s = c.add_stream("libx264", rate=8)
            s.width, s.height, s.pix_fmt = 32, 32, "yuv420p"
            s.codec_context.color_trc = trc
            packets = [*s.encode(av.VideoFrame.from_ndarray(np.zeros((32, 32, 3), np.uint8), format="rgb24")),
                       *s.encode(None)]
            for p in packets:
                c.mux(p)
        caplog.clear()
        with caplog.at_level("WARNING", logger="viva_base.video"):
            assert read_video(path).frames.shape == (1, 3, 32, 32)
        assert ("HDR video (HLG" in caplog.text) == (name is not None), caplog.text


def test_frame_times_round_trip_a_variable_frame_rate(tmp_path):
    from viva_base.video import frame_times, variable_rate_times

    times = [i / 30 for i in range(30)] + [1 + i / 15 for i in range(15)]  # 30 fps, then 15 (frames dropped)
    x = _clip(f=45, h=16, w=16)
    for ext in (".mp4", ".mkv", ".webm"):
        path = write_video(tmp_path / f"vfr{ext}", x, fps=45 / 2, times=times)
        assert frame_times(path) == pytest.approx(times, abs=1e-3)
        assert read_video(path).frames.shape == x.shape
    cfr = write_video(tmp_path / "cfr.mp4", x, fps=30)
    assert frame_times(cfr) == pytest.approx([i / 30 for i in range(45)], abs=1e-6)
    # the stream's time base was once read after the container was closed (freed memory): times of 3.6e9 s, now and
    # then, which made a constant-rate clip look variable and its edit fail to mux
    n = 1000
    long = write_video(tmp_path / "long.mp4", x[:1].expand(n, -1, -1, -1), fps=30)
    for _ in range(20):
        assert max(abs(t - i / 30) for i, t in enumerate(frame_times(long))) < 1e-6
    assert variable_rate_times(frame_times(cfr), 30.0, 45) is None  # written as before
    assert variable_rate_times(times, 45 / 2, 45) == times and variable_rate_times(times, 45 / 2, 44) is None
    assert frame_times(tmp_path) is None
    with pytest.raises(VideoError, match="44 frame times for 45 frames"):
        write_video(tmp_path / "bad.mp4", x, fps=30, times=times[:44])


def test_a_folder_output_says_it_drops_the_sound(tmp_path, clip_with_sound, caplog):
    src = clip_with_sound(tmp_path / "talk.mp4")
    with caplog.at_level("WARNING", logger="viva_base.video"):
        write_video(tmp_path / "frames", _clip(f=3, h=48, w=64), fps=12, audio=src)
    assert "a folder output holds no sound" in caplog.text
