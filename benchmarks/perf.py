"""Performance benchmark of the Edit-GRPO trainer: iteration time against its floor, encoder calls, memory, scaling.

    python -m benchmarks.perf --quick            # tiny and toy recipes, ~2 minutes on 2 CPU cores
    python -m benchmarks.perf                    # + how iteration time grows with frames, resolution, group size
    python -m benchmarks.perf --cases toy --iterations 6 --out outputs/perf
    python -m benchmarks.perf --overlap --latency 0.5   # a slow remote reward: after sampling vs overlapped

What is measured (all through the real trainer, ``editgrpo.train.main``, in this process):

* **iteration wall time**: the time between two consecutive ``metrics.jsonl`` rows (everything an iteration
  does), the minimum over the iterations after the first (the first loads the reward models);
* **floor**: the model passes that iteration had to run, *recorded while it ran* (every DiT forward with its
  batch, grad mode and adapter state; the condition encoders; the decoder; the reward models), each kind then
  replayed alone on the captured inputs, timed (minimum of ``--reps``), and summed over the iteration's calls.
  Minima on both sides: on a shared machine the least-disturbed run is the one that measures the code.
  A training forward is replayed as forward + backward. The optimizer step is not a model pass: it counts as
  overhead. ``overhead = wall / floor`` (target: at most 1.15);
* **calls**: prompts seen by the VLM instructor and the VAE encoder per iteration (``editor.calls``); they must
  equal the prompts per iteration (conditions are built once per prompt, never per sample);
* **peak memory**: CUDA ``max_memory_allocated``, or on CPU the peak resident set size sampled every 5 ms over
  the run, minus the size before it;
* **scaling** (full run): iteration time over frames, frame size and group size, the fitted exponent
  ``t ~ x^k`` next to the exponent the FLOPs of the same passes predict (:mod:`benchmarks.scaling`).

* **overlap** (``--overlap``): the tiny case with a remote reward of ``--latency`` seconds per server batch (a
  reward server on this machine, rewards/serve.py, batches of one rollout chunk) scored after sampling
  (``train.overlap_rewards=false``) and overlapped with it (``true``), next to the same run without that reward:
  iteration times, the reward time left exposed, and the sampling time it should hide behind (target: exposed
  reward time within 10% of the sampling time).

Writes ``<out>/perf.json`` and prints a table. CPU timings on a shared machine vary by 10-20% between runs.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

logger = logging.getLogger("benchmarks.perf")

REPO = Path(__file__).resolve().parents[1]
TOY_SPEC = {"heads": 2, "head_dim": 32, "num_layers": 1, "num_single_layers": 2}  # recipes/sft_toy.yaml's editor
_NO_OUTPUTS = ["report_to=none", "train.checkpoint_every=0", "eval.manifest=null"]

# The benchmark cases: a recipe and overrides. No checkpoints, no evaluation. The toy case is recipes/toy.yaml's
# Edit-GRPO stage (its sampling, LoRA, group and batch settings) on the toy editor's architecture with random
# weights and an untrained toy CLIP instead of the chain's trained ones: timing does not depend on weights.
# Its toy_oracle reward (``manifest: toy``, which only the toy chain resolves) reads the case's own generated
# prompts instead (TOY_PROMPTS), so the oracle's cost is timed too.
CASES = {
    "tiny": ["recipe=recipes/tiny.yaml", *_NO_OUTPUTS],
    "toy": ["recipe=recipes/toy.yaml", *_NO_OUTPUTS, "toy.enabled=false", "model.tiny=true",
            *[f"model.tiny_spec.{k}={v}" for k, v in TOY_SPEC.items()], "data.toy_prompts=16",
            "rewards.clip_if.model=TOY_CLIP", "rewards.clip_sp.model=TOY_CLIP",
            "rewards.toy_oracle.manifest=TOY_PROMPTS"],
}


# ---------------------------------------------------------------------------- small pure functions
def fit_power_law(xs, ys) -> float:
    """Least-squares exponent ``k`` of ``y = c x^k``: the slope of ``log y`` against ``log x``."""
    lx = [math.log(x) for x in xs]
    ly = [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    sxx = sum((a - mx) ** 2 for a in lx)
    if sxx == 0:
        raise ValueError("fit_power_law needs at least two different x values")
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sxx


def floor_seconds(calls: dict[str, int], seconds: dict[str, float]) -> float:
    """The floor of an iteration: sum over pass kinds of (calls of that kind) x (time of one pass alone)."""
    missing = set(calls) - set(seconds)
    if missing:
        raise KeyError(f"no timing for pass kinds {sorted(missing)}")
    return sum(n * seconds[k] for k, n in calls.items())


# ---------------------------------------------------------------------------- recording the passes
@dataclass
class PassLog:
    """Model passes per iteration, by kind, and one captured input per kind (to replay it alone)."""

    per_iteration: list[dict[str, int]] = field(default_factory=lambda: [{}])
    inputs: dict[str, tuple] = field(default_factory=dict)
    depth: int = 0  # > 0 inside a recorded composite pass (its inner DiT/encoder calls are part of it)

    def add(self, kind: str, replay: tuple) -> None:
        it = self.per_iteration[-1]
        it[kind] = it.get(kind, 0) + 1
        self.inputs.setdefault(kind, replay)

    def next_iteration(self) -> None:
        self.per_iteration.append({})


def _detach(x):
    if isinstance(x, torch.Tensor):
        return x.detach().clone()
    if isinstance(x, dict):
        return {k: _detach(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_detach(v) for v in x)
    return x


def _adapters_enabled(module) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    for m in module.modules():
        if isinstance(m, BaseTunerLayer):
            return not m.disable_adapters
    return False


@contextlib.contextmanager
def record_passes(editor, reward_cls, log: PassLog):
    """Record every model pass of the trainer: DiT forwards (hook), ``encode_condition``, ``decode``, rewards."""
    dit = editor.transformer

    def pre_hook(module, args, kwargs):
        if log.depth:
            return
        x = kwargs["hidden_states"]
        grad = torch.is_grad_enabled()
        kind = (f"dit_{'train' if grad else 'sample'}{'' if _adapters_enabled(module) else '_ref'}"
                f"[b={x.shape[0]},{'x'.join(map(str, x.shape[2:]))}]")
        log.add(kind, ("dit", _detach(kwargs), grad, _adapters_enabled(module)))

    handle = dit.register_forward_pre_hook(pre_hook, with_kwargs=True)
    real_cond, real_decode, real_reward = editor.encode_condition, editor.decode, reward_cls.__call__

    def composite(name, fn, key):
        def wrapped(*args, **kwargs):
            if log.depth:
                return fn(*args, **kwargs)
            log.add(f"{name}[{key(*args, **kwargs)}]", (name, _detach(args), _detach(kwargs)))
            log.depth += 1
            try:
                return fn(*args, **kwargs)
            finally:
                log.depth -= 1
        return wrapped

    editor.encode_condition = composite("conditions", real_cond, lambda v, *a, **k: f"prompts={v.shape[0]}")
    editor.decode = composite("decode", real_decode, lambda z, *a, **k: f"b={z.shape[0]}")
    reward_call = composite("rewards", lambda *a, **k: real_reward(*a, **k), lambda self, e, *a, **k: f"b={e.shape[0]}")
    reward_cls.__call__ = lambda self, *a, **k: reward_call(self, *a, **k)
    try:
        yield log
    finally:
        handle.remove()
        editor.encode_condition, editor.decode = real_cond, real_decode
        reward_cls.__call__ = real_reward


def _replay(editor, reward_fn, entry) -> None:
    """Run one recorded pass alone (a training forward also runs its backward)."""
    if entry[0] == "dit":
        _, kwargs, grad, adapters = entry
        dit = editor.transformer
        if not adapters:
            dit.disable_adapters()
        try:
            with torch.set_grad_enabled(grad):
                out = dit(**kwargs)[0]
                if grad:
                    out.float().sum().backward()
        finally:
            if not adapters:
                dit.enable_adapters()
    elif entry[0] == "conditions":
        editor.encode_condition(*entry[1], **entry[2])
    elif entry[0] == "decode":
        editor.decode(*entry[1], **entry[2])
    elif entry[0] == "rewards":
        type(reward_fn).__call__(*entry[1], **entry[2])


def time_passes(editor, reward_fn, inputs: dict[str, tuple], reps: int) -> dict[str, float]:
    """Seconds of each recorded pass kind replayed alone: the minimum of ``reps`` runs after one warm-up."""
    out = {}
    for kind, entry in inputs.items():
        _replay(editor, reward_fn, entry)
        times = []
        for _ in range(reps):
            _sync()
            t = time.perf_counter()
            _replay(editor, reward_fn, entry)
            _sync()
            times.append(time.perf_counter() - t)
        out[kind] = min(times)
    editor.transformer.zero_grad(set_to_none=True)
    return out


def dit_flops(dit, inputs: dict[str, tuple]) -> dict[str, dict[str, float]]:
    """FLOPs (total, attention) of each recorded DiT pass kind, counted on a meta-device copy of the DiT."""
    from .scaling import meta_like, pass_flops

    meta = meta_like(dit)
    out = {}
    for kind, entry in inputs.items():
        if entry[0] != "dit":
            continue
        _, kwargs, grad, adapters = entry
        if not adapters:
            meta.disable_adapters()
        try:
            out[kind] = pass_flops(meta, kwargs, train=grad)
        finally:
            if not adapters:
                meta.enable_adapters()
    return out


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class PeakMemory:
    """Peak memory over a block: CUDA max_memory_allocated, else the sampled peak RSS (bytes above the start)."""

    def __init__(self, interval: float = 0.005):
        self.interval, self.peak, self.start = interval, 0, 0
        self._stop = threading.Event()

    def __enter__(self):
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
            return self
        import psutil

        proc = psutil.Process()
        self.start = self.peak = proc.memory_info().rss

        def sample():
            while not self._stop.is_set():
                self.peak = max(self.peak, proc.memory_info().rss)
                time.sleep(self.interval)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        if torch.cuda.is_available():
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._thread.join()
        return False

    @property
    def kind(self) -> str:
        return "cuda_max_allocated" if torch.cuda.is_available() else "cpu_peak_rss"


def _timing(fn, add):
    """``fn`` wrapped to pass the seconds of each call to ``add``."""
    def wrapped(*a, **k):
        t = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            add(time.perf_counter() - t)
    return wrapped


# ---------------------------------------------------------------------------- one case
def _toy_clip(cache: Path) -> str:
    """An untrained open_clip model with the toy reward model's architecture (editgrpo.toy_reward)."""
    from open_clip.model import CLIP

    from editgrpo.toy_reward import toy_clip_config
    from rewards.tiny import save_open_clip

    folder = cache / "toy-clip-untrained"
    if not (folder / "open_clip_config.json").exists():
        cfg = toy_clip_config()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            save_open_clip(CLIP(**cfg), cfg, folder)
    return f"open_clip:local-dir:{folder}"


def run_case(name: str, overrides: list[str], *, iterations: int, reps: int, workdir: Path) -> dict:
    """Run the trainer for ``iterations`` on a case, recording its passes; time the passes alone; summarise."""
    from editgrpo import train as T
    from editgrpo.config import GRPOConfig
    from rewards.registry import CombinedReward
    from viva_base.recipe import load_recipe
    from viva_base.training import MetricsFile

    out = workdir / name
    args = [a.replace("TOY_CLIP", _toy_clip(workdir)) if "TOY_CLIP" in a else a for a in overrides]
    args = [a.replace("TOY_PROMPTS", str(out / "data" / "grpo.jsonl")) for a in args]  # PromptSource's toy prompts
    args += [f"output_dir={out}", f"train.num_iterations={iterations}"]
    cfg = load_recipe(GRPOConfig, args)
    seen, log, stamps = {}, PassLog(), []
    real_build, real_from_config, real_write = T.build_editor, CombinedReward.from_config, MetricsFile.write
    stack = contextlib.ExitStack()

    def build(*a, **k):
        seen["editor"] = editor = real_build(*a, **k)
        stack.enter_context(record_passes(editor, CombinedReward, log))
        return editor

    def from_config(cls_cfg):
        seen["reward"] = real_from_config(cls_cfg)
        return seen["reward"]

    def write(self, row):
        stamps.append(time.perf_counter())
        log.next_iteration()
        return real_write(self, row)

    phases: list[dict[str, float]] = [{}]  # per iteration: wall seconds in the trainer's main phases

    def timed(name, fn):
        def add(seconds):
            phases[-1][name] = phases[-1].get(name, 0.0) + seconds
        return _timing(fn, add)

    real_phase = {n: getattr(T, n) for n in ("rollout", "step_log_prob", "reference_mean")}
    for n, fn in real_phase.items():
        setattr(T, n, timed(n, fn))
    real_write_phases = write

    def write(self, row):  # noqa: F811 (also starts the next iteration's phase bucket)
        phases.append({})
        return real_write_phases(self, row)

    T.build_editor, CombinedReward.from_config, MetricsFile.write = build, from_config, write
    mem = PeakMemory()
    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        with mem:
            t0 = time.perf_counter()
            T.main(cfg)
    finally:
        os.chdir(cwd)
        stack.close()
        T.build_editor, CombinedReward.from_config, MetricsFile.write = real_build, real_from_config, real_write
        for n, fn in real_phase.items():
            setattr(T, n, fn)
    editor, reward_fn = seen["editor"], seen["reward"]
    tc = cfg.train
    calls = {k: v / iterations for k, v in editor.calls.items()}  # before the replays below add their own
    # the trainer's iteration i runs between metrics rows i-1 and i (the first between the loop start and row 1)
    walls = [b - a for a, b in zip(stamps, stamps[1:])]
    per_it = log.per_iteration[:len(stamps)]
    editor.transformer.train()
    seconds = time_passes(editor, reward_fn, log.inputs, reps)
    flops = dit_flops(editor.transformer, log.inputs)
    floors = [floor_seconds(c, seconds) for c in per_it]
    steady = list(range(1, len(stamps)))  # iterations 2.. (wall known, reward models loaded)
    if not steady:
        raise ValueError("run at least 2 iterations (the first one loads the reward models)")
    best = min(steady, key=lambda i: walls[i - 1] / floors[i])  # = min wall: the floor is the same every iteration
    wall, floor = walls[best - 1], floors[best]
    return {
        "case": name, "iterations": iterations, "overrides": overrides,
        "prompts_per_iteration": tc.prompts_per_iteration, "num_generations": tc.num_generations,
        "num_steps": cfg.sampling.num_steps, "frames": cfg.data.toy_frames, "size": cfg.data.toy_size,
        "iteration_seconds": wall, "floor_seconds": floor, "overhead": wall / floor,
        "iteration_seconds_all": walls, "floor_seconds_all": floors[1:len(stamps)],
        "pass_calls_per_iteration": per_it[best], "pass_seconds": seconds, "pass_flops": flops,
        "dit_flops_per_iteration": {k: sum(n * flops[kind][k] for kind, n in per_it[best].items() if kind in flops)
                                    for k in ("total", "attention")},
        "phase_seconds": phases[best],
        "calls_per_iteration": calls,
        "calls_ok": calls["instructor"] == tc.prompts_per_iteration and calls["vae_encode"] == tc.prompts_per_iteration,
        "peak_memory_bytes": mem.peak - mem.start, "memory_kind": mem.kind, "total_seconds": time.perf_counter() - t0,
    }


# ---------------------------------------------------------------------------- overlap with a slow remote reward
# 6 rollout chunks (one group of 2 each) of 20 steps. What overlap cannot hide is the last chunk's reward call, so
# the exposed fraction is about latency / sampling time: it meets 10% when sampling takes 10x the latency or more.
OVERLAP_CASE = ["recipe=recipes/tiny.yaml", *_NO_OUTPUTS, "data.toy_prompts=6", "train.prompts_per_iteration=6",
                "train.num_generations=2", "sampling.rollout_batch_size=2", "sampling.num_steps=20",
                "sampling.sde_window_size=1", "train.beta=0"]


def exposed_fraction(with_overlap: float, without_reward: float, sampling: float) -> float:
    """The reward time left exposed by overlapping (the trainer's wait after sampling with the overlapped reward
    minus its wait without that reward), as a fraction of the sampling time it should hide behind (target: 0.1)."""
    return max(0.0, with_overlap - without_reward) / sampling


def _timed_run(overrides: list[str], *, iterations: int, out: Path) -> dict:
    """Run the trainer; the steady iteration wall time (minimum over iterations 2..), that iteration's time in
    ``rollout`` (sampling; with overlap it runs beside the decoding and scoring thread), and the least time the
    trainer waited after sampling for decoding and scoring (``ChunkScorer.finish``) over iterations 2.."""
    from editgrpo import train as T
    from editgrpo.config import GRPOConfig
    from viva_base.recipe import load_recipe
    from viva_base.training import MetricsFile

    from editgrpo.scoring import ChunkScorer

    cfg = load_recipe(GRPOConfig, [*overrides, f"output_dir={out}", f"train.num_iterations={iterations}"])
    stamps, sampling, waits = [], [0.0], [0.0]
    real_write, real_rollout, real_finish = MetricsFile.write, T.rollout, ChunkScorer.finish

    def write(self, row):
        stamps.append(time.perf_counter())
        sampling.append(0.0)
        waits.append(0.0)
        return real_write(self, row)

    def timed(fn, bucket):
        def add(seconds):
            bucket[-1] += seconds
        return _timing(fn, add)

    MetricsFile.write, T.rollout, ChunkScorer.finish = write, timed(real_rollout, sampling), timed(real_finish, waits)
    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        T.main(cfg)
    finally:
        os.chdir(cwd)
        MetricsFile.write, T.rollout, ChunkScorer.finish = real_write, real_rollout, real_finish
    walls = [b - a for a, b in zip(stamps, stamps[1:])]
    best = min(range(len(walls)), key=walls.__getitem__)
    # the wait after sampling for decoding and scoring (all of it without overlap; what is left of it with)
    return {"iteration_seconds": walls[best], "sampling_seconds": sampling[best + 1],
            "scoring_wait_seconds": min(waits[1:len(stamps)]), "iteration_seconds_all": walls}


def run_overlap(latency: float, *, iterations: int, workdir: Path, overrides: list[str] | None = None) -> dict:
    """Iteration time of the overlap case (:data:`OVERLAP_CASE` + ``overrides``) without the slow reward, with it
    scored after sampling, and with it overlapped; the slow reward is served by a reward server on a thread of
    this process (``latency`` seconds per server batch of one rollout chunk; weight 0, so training is unchanged)."""
    from rewards.base import Reward
    from rewards.serve import ServeConfig, Served, start_server
    from viva_base.recipe import load_recipe
    from editgrpo.config import GRPOConfig

    base = [*OVERLAP_CASE, *(overrides or [])]
    cfg = load_recipe(GRPOConfig, base)
    chunk = cfg.sampling.rollout_batch_size or cfg.train.num_generations

    class Latency(Reward):
        def score(self, edited, source, **_):
            time.sleep(latency)
            return (edited.mean(dim=(1, 2, 3, 4)) - source.mean(dim=(1, 2, 3, 4))).abs()

    server = start_server({"slow": Served(Latency(), "latency", {})},
                          ServeConfig(port=0, log_level="warning", max_batch_size=chunk, max_samples_per_request=chunk,
                                      max_wait_ms=0))
    try:
        slow = [f"rewards.slow={{weight: 0.0, server: '{server.url}'}}"]
        runs = {"no_slow_reward": base, "after_sampling": [*base, *slow],
                "overlapped": [*base, *slow, "train.overlap_rewards=true"]}
        result = {name: _timed_run(args, iterations=iterations, out=workdir / f"overlap-{name}")
                  for name, args in runs.items()}
    finally:
        server.stop()
    # measured on the wait after sampling (whole iterations on a shared CPU vary by more than the reward time)
    plain, after, over = (result[k]["scoring_wait_seconds"] for k in ("no_slow_reward", "after_sampling", "overlapped"))
    sampling = result["overlapped"]["sampling_seconds"]
    n_local = cfg.train.prompts_per_iteration * cfg.train.num_generations
    return {"latency": latency, "chunks": math.ceil(n_local / chunk), "runs": result, "sampling_seconds": sampling,
            "reward_seconds": after - plain, "exposed_seconds": max(0.0, over - plain),
            "exposed_fraction_of_sampling": exposed_fraction(over, plain, sampling),
            "gain_seconds": after - over, "server_stats": server.stats}


def format_overlap(r: dict) -> str:
    runs = r["runs"]
    return "\n".join([
        f"overlap: a remote reward of {r['latency']:g} s per rollout chunk ({r['chunks']} chunks per iteration)",
        "| run | iteration (s) | sampling (s) | wait for decode + rewards after sampling (s) |", "|---|---|---|---|",
        *[f"| {k} | {v['iteration_seconds']:.3f} | {v['sampling_seconds']:.3f} | {v['scoring_wait_seconds']:.3f} |"
          for k, v in runs.items()],
        f"reward time after sampling {r['reward_seconds']:.3f} s; overlapped, {r['exposed_seconds']:.3f} s stay exposed "
        f"(the last chunk's call) "
        f"= {100 * r['exposed_fraction_of_sampling']:.1f}% of the sampling time (target <= 10%); gain "
        f"{r['gain_seconds']:.3f} s per iteration"])


# ---------------------------------------------------------------------------- scaling sweeps
SWEEPS = {  # axis -> (override key, values); the tiny case's other settings stay fixed
    "frames": ("data.toy_frames", [5, 9, 17]),
    "size": ("data.toy_size", [16, 32, 48]),
    "group": ("train.num_generations", [2, 4, 8]),
}


def run_isolated(name: str, overrides: list[str], *, iterations: int, reps: int, workdir: Path) -> dict:
    """:func:`run_case` in a fresh Python process, so that its peak memory is its own."""
    import subprocess

    result = workdir / f"{name}.json"
    cmd = [sys.executable, "-m", "benchmarks.perf", "--_case", name, "--_overrides", json.dumps(overrides),
           "--_result", str(result), "--iterations", str(iterations), "--reps", str(reps), "--out", str(workdir)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark case {name} failed:\n{proc.stderr[-3000:]}")
    return json.loads(result.read_text())


def run_sweeps(*, iterations: int, reps: int, workdir: Path, axes=tuple(SWEEPS), isolated: bool = True) -> dict:
    """Iteration time (and its floor) over each axis, fitted exponents, and the FLOPs-predicted exponents."""
    run = run_isolated if isolated else run_case
    result = {}
    for axis in axes:
        key, values = SWEEPS[axis]
        points = []
        for v in values:
            r = run(f"sweep-{axis}-{v}", [*CASES["tiny"], f"{key}={v}", "data.toy_prompts=4"],
                    iterations=iterations, reps=reps, workdir=workdir)
            points.append({"value": v, "flops": r["dit_flops_per_iteration"],
                           **{k: r[k] for k in ("iteration_seconds", "floor_seconds", "overhead", "peak_memory_bytes")}})
        xs = [p["value"] for p in points]
        result[axis] = {"key": key, "points": points,
                        "exponent_time": fit_power_law(xs, [p["iteration_seconds"] for p in points]),
                        "exponent_floor": fit_power_law(xs, [p["floor_seconds"] for p in points]),
                        "exponent_flops": fit_power_law(xs, [p["flops"]["total"] for p in points])}
    return result


# ---------------------------------------------------------------------------- report
def format_table(results: list[dict]) -> str:
    head = ("| case | P x G | steps | iteration (s) | floor (s) | overhead | VLM calls/it | VAE enc calls/it "
            "| peak memory (MB) |")
    lines = [head, "|" + "---|" * 9]
    for r in results:
        c = r["calls_per_iteration"]
        lines.append(f"| {r['case']} | {r['prompts_per_iteration']} x {r['num_generations']} | {r['num_steps']} "
                     f"| {r['iteration_seconds']:.3f} | {r['floor_seconds']:.3f} | {r['overhead']:.3f} "
                     f"| {c['instructor']:g} | {c['vae_encode']:g} | {r['peak_memory_bytes'] / 2**20:.0f} |")
    return "\n".join(lines)


def format_passes(r: dict) -> str:
    lines = [f"passes of one {r['case']} iteration (calls x seconds alone):"]
    for kind, n in sorted(r["pass_calls_per_iteration"].items()):
        lines.append(f"  {kind:<48} {n:>4} x {r['pass_seconds'][kind] * 1e3:8.2f} ms = {n * r['pass_seconds'][kind]:.3f} s")
    calls, sec, ph = r["pass_calls_per_iteration"], r["pass_seconds"], r.get("phase_seconds", {})

    def floor_of(prefix):
        return sum(n * sec[k] for k, n in calls.items() if k.startswith(prefix))

    if ph:
        lines.append("  phases in the trainer (wall) against the floor of their passes:")
        lines.append(f"    rollouts (sampling forwards + sampler math)  {ph.get('rollout', 0):7.3f} s  floor "
                     f"{floor_of('dit_sample['):7.3f} s")
        lines.append(f"    KL reference forwards                        {ph.get('reference_mean', 0):7.3f} s  floor "
                     f"{floor_of('dit_sample_ref'):7.3f} s")
        rest = r["iteration_seconds"] - ph.get("rollout", 0) - ph.get("reference_mean", 0)
        lines.append(f"    the rest: policy forwards + backward + optimizer + conditions, decoding, rewards, logging "
                     f"{rest:7.3f} s  floor {floor_of('dit_train') + floor_of('conditions') + floor_of('decode') + floor_of('rewards'):7.3f} s")
    return "\n".join(lines)


def format_sweeps(sweeps: dict) -> str:
    lines = ["| axis | values | iteration (s) | exponent (time) | exponent (floor) | exponent (FLOPs) |",
             "|---|---|---|---|---|---|"]
    for axis, s in sweeps.items():
        vals = ", ".join(str(p["value"]) for p in s["points"])
        times = ", ".join(f"{p['iteration_seconds']:.2f}" for p in s["points"])
        lines.append(f"| {axis} ({s['key']}) | {vals} | {times} | {s['exponent_time']:.2f} | "
                     f"{s['exponent_floor']:.2f} | {s['exponent_flops']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.perf", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny and toy cases only, fewer iterations (~2 minutes)")
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    p.add_argument("--iterations", type=int, default=None, help="trainer iterations per case (default 4, quick 3)")
    p.add_argument("--reps", type=int, default=None, help="timed replays of each pass (default 5, quick 3)")
    p.add_argument("--no-sweeps", action="store_true", help="skip the frames / size / group-size sweeps")
    p.add_argument("--out", default="outputs/perf", help="folder for perf.json (and the runs' scratch outputs)")
    p.add_argument("--overlap", action="store_true", help="only the overlap measurement: a slow remote reward "
                   "scored after sampling vs overlapped with it")
    p.add_argument("--latency", type=float, default=0.5, help="seconds per server batch of the slow remote reward")
    p.add_argument("--_case", help=argparse.SUPPRESS)        # internal: run one case in this process
    p.add_argument("--_overrides", help=argparse.SUPPRESS)
    p.add_argument("--_result", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    logging.basicConfig(level=os.environ.get("LOGLEVEL", "WARNING"), format="%(levelname)s %(name)s: %(message)s")
    if a.iterations is not None and a.iterations < 2:
        p.error(f"--iterations {a.iterations}: give at least 2 (the first loads the reward models; the later ones "
                "are timed)")
    if a.reps is not None and a.reps < 1:
        p.error(f"--reps {a.reps}: give at least 1")
    if a.latency < 0:
        p.error(f"--latency {a.latency}: seconds, >= 0")
    iterations = a.iterations or (3 if a.quick else 4)
    reps = a.reps or (3 if a.quick else 5)
    from viva_base.errors import UserError
    from viva_base.recipe import check_output_dir

    try:
        check_output_dir("--out", a.out)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = Path(a.out).resolve()  # each case runs in its own process from the package's folder: an absolute path
    out.mkdir(parents=True, exist_ok=True)
    if a._case:
        r = run_case(a._case, json.loads(a._overrides), iterations=iterations, reps=reps, workdir=out)
        Path(a._result).write_text(json.dumps(r))
        return 0
    if a.overlap:
        with tempfile.TemporaryDirectory(prefix="perf-", dir=out) as tmp:
            r = run_overlap(a.latency, iterations=iterations, workdir=Path(tmp))
        (out / "perf_overlap.json").write_text(json.dumps(r, indent=2))
        print(format_overlap(r))
        print(f"written {out / 'perf_overlap.json'}")
        return 0
    with tempfile.TemporaryDirectory(prefix="perf-", dir=out) as tmp:
        iters = {"toy": 2} if a.quick else {}  # quick: the toy case's first iteration warms up, the second is timed
        results = [run_isolated(c, CASES[c], iterations=iters.get(c, iterations), reps=reps, workdir=Path(tmp))
                   for c in a.cases]
        sweeps = None if (a.quick or a.no_sweeps) else run_sweeps(iterations=3, reps=reps, workdir=Path(tmp))
    report = {"device": "cuda" if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)",
              "torch_threads": torch.get_num_threads(), "results": results, "sweeps": sweeps}
    (out / "perf.json").write_text(json.dumps(report, indent=2))
    print(format_table(results))
    for r in results:
        print(format_passes(r))
    if sweeps:
        print(format_sweeps(sweeps))
    bad = [r["case"] for r in results if not r["calls_ok"]]
    if bad:
        print(f"encoder calls per iteration differ from the prompts per iteration in: {', '.join(bad)}")
    print(f"written {out / 'perf.json'}")
    return 1 if bad else 0


if __name__ == "__main__":
    from viva_base.errors import exit_with

    exit_with(main)
