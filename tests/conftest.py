import os
import resource
import subprocess
import time

# Tests never reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "offline")

import pytest  # noqa: E402
import torch  # noqa: E402

# Two intra-op threads for a serial run on the 2-core machines this suite is sized for; one per worker under
# pytest-xdist (`-n`), whose workers already share the cores.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)


@pytest.fixture(scope="session")
def tiny_editor():
    """The tiny offline VIVA editor (random weights), built once per session. Do not mutate it."""
    from viva_base.tiny import make_tiny_editor

    return make_tiny_editor(seed=0)


@pytest.fixture()
def oriented_clip():
    """``write(path, degrees, hflip=False, vflip=False, frames=3)``: a 64 x 32 H.264 clip (8 fps) whose display
    matrix turns it ``degrees`` counter-clockwise, then mirrors it, as a phone's clips are; ``write.coded`` is its
    coded frame: a red block at the top-left corner, a blue one at the bottom-right."""
    import numpy as np

    av = pytest.importorskip("av")
    coded = np.zeros((32, 64, 3), np.uint8)
    coded[:8, :8, 0] = 255
    coded[-8:, -8:, 2] = 255

    def write(path, degrees, hflip=False, vflip=False, frames=3):
        with av.open(str(path), "w") as c:
            s = c.add_stream("libx264", rate=8)
            s.width, s.height, s.pix_fmt = 64, 32, "yuv444p"
            if not hasattr(s, "set_display_rotation"):
                pytest.skip("this PyAV cannot write a display matrix")
            s.set_display_rotation(degrees, hflip=hflip, vflip=vflip)
            for _ in range(frames):
                for p in s.encode(av.VideoFrame.from_ndarray(coded, format="rgb24")):
                    c.mux(p)
            for p in s.encode():
                c.mux(p)
        return path

    write.coded = coded
    return write


@pytest.fixture()
def clip_with_sound():
    """``write(path, frames=24, fps=12, delay=0.5, vcodec="libx264", acodec="aac", rate=44100, times=None)``: a
    64 x 48 clip whose sound is a 440 Hz tone starting ``delay`` seconds after its first frame and lasting to its end;
    ``times``: each frame's time in seconds (a variable frame rate) instead of ``i / fps``."""
    from fractions import Fraction

    import numpy as np

    av = pytest.importorskip("av")

    def write(path, frames=24, fps=12, delay=0.5, vcodec="libx264", acodec="aac", rate=44100, times=None):
        frames = len(times) if times is not None else frames
        length = times[-1] + 1 / fps if times is not None else frames / fps
        with av.open(str(path), "w") as c:
            v = c.add_stream(vcodec, rate=fps)
            v.width, v.height, v.pix_fmt = 64, 48, "yuv420p"
            if times is not None:
                v.codec_context.time_base = Fraction(1, 90000)
            a = c.add_stream(acodec, rate=rate)
            a.layout = "mono"
            t = np.arange(int(rate * (length - delay))) / rate
            tone = av.AudioFrame.from_ndarray((0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)[None],
                                              format="flt", layout="mono")
            tone.sample_rate, tone.pts = rate, round(delay * rate)
            packets = [*a.encode(tone), *a.encode(None)]
            for i in range(frames):
                frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), 10 * i % 256, np.uint8), format="rgb24")
                if times is not None:
                    frame.pts, frame.time_base = round(times[i] * 90000), Fraction(1, 90000)
                packets += v.encode(frame)
            for p in [*packets, *v.encode(None)]:
                c.mux(p)
        return path

    return write


@pytest.fixture()
def repo_root():
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture()
def timed_run():
    """``subprocess.run`` that also returns the CPU seconds (user + system) the command and its waited-for children
    spent, and the wall-clock seconds: ``proc, cpu, wall = timed_run([...], **kwargs)``.

    A promise such as "one line, exit 2, in under 10 seconds" is about the work a command does before it refuses.
    On an idle machine the two agree (1.8 s and 1.7 s for a refused toy recipe); on a busy CI machine the wall clock
    also counts the other workers' tests (a 6.4 s check once took 10.5 s there), the CPU time does not. Tests assert
    the promise on ``cpu`` and keep a loose bound on ``wall`` for hangs and sleeps, which use no CPU."""
    def run(args, **kwargs):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        proc = subprocess.run(args, **kwargs)
        wall = time.perf_counter() - t0
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        return proc, cpu, wall

    return run


@pytest.fixture(scope="module")
def one_thread():
    """One torch intra-op thread for a module: tiny models are overhead-bound, and one thread is several times
    faster on a busy machine. The count before is restored."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pytest_xdist_auto_num_workers(config):
    """``-n auto``: one worker per CPU (logical: on the 2-core CI machines that is 2, where pytest-xdist's own
    physical-core count can say 1), at most 4. The multi-process tests start 2 processes of their own and every
    worker holds its models in memory, so more workers mostly add contention."""
    return max(1, min(4, os.cpu_count() or 1))

