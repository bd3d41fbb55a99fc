"""The first command to run on a GPU machine: does this project's GPU path work here, and how fast is it?

    python -m benchmarks.gpu_check                                  # on a CUDA machine: a few minutes
    python -m benchmarks.gpu_check --frames 33 --height 480 --width 848   # the real-size DiT at a larger shape
    python -m benchmarks.gpu_check --device cpu --tiny-only         # the same code paths on CPU, tiny shapes

Checks, each reported as ok / FAIL / skipped (a failing check does not stop the others):

* ``kernels``: a bf16 matmul and bf16 SDPA attention on the device, against float32 references (on CUDA also
  the FlashAttention backend alone);
* ``sft``: ``python -m viva_base.sft recipe=recipes/sft_tiny.yaml`` for a few steps in bf16 (``model.dtype=bf16``,
  ``train.mixed_precision=bf16``); the loss must be finite;
* ``sft_compile``: the same run with ``train.compile=regional`` and ``train.fused_optimizer=true`` (the DiT's
  repeated blocks compiled in place, ``viva_base.training.compile_dit``; AdamW's fused kernel); the losses must be
  the eager run's to 2% (bf16);
* ``grpo``: ``python -m editgrpo.train recipe=recipes/tiny.yaml``, 2 iterations in bf16, with the held-out
  evaluation (a few toy-world eval prompts) at the start and the end; the first minibatch's mean importance
  ratio (``ratio_mean`` of the first iteration in metrics.jsonl, one minibatch and one inner epoch: every
  forward before the first optimizer step) must be within 1e-3 of 1 -- the training forward reproduces the
  rollout's log-probs in bf16;
* ``grpo_compile``: the ``grpo`` run (without the evaluation) with ``train.compile=regional`` and
  ``train.fused_optimizer=true``: the rollouts (no grad), training forwards (grad) and KL reference forwards
  (adapter off) are separately compiled graphs, and the first minibatch's ratio must still be within 1e-3 of 1
  (the training graph reproduces the rollout graph's log-probs in bf16); its first-iteration reward is reported
  next to the eager run's;
* ``grpo_2proc``: the same GRPO run under ``torchrun --nproc_per_node 2`` (NCCL on two GPUs; gloo on CPU);
  skipped with one GPU;
* ``dit``: the real-size HunyuanVideo DiT (``benchmarks.scaling.HUNYUAN_DIT_13B``, widened to 32 input channels,
  random weights, no download) with the recipe's LoRA r64 and gradient checkpointing: one sampling forward
  (no grad) and one training forward + backward at ``--frames x --height x --width`` (CFG batch 2), timed, with
  the peak GPU memory, next to what benchmarks.scaling predicts for that shape (FLOPs at 40% MFU of an H100's
  989 bf16 TFLOP/s; memory = weights + LoRA weights and gradients + checkpointed activations) and the ratio
  measured / predicted. ``--tiny-only`` runs a scaled-down DiT config through the same function;
* ``vae``: the real-size HunyuanVideo VAE (random weights, bf16) decoding 2 clips of ``--vae-frames x --height x
  --width`` (default 33 x 480 x 848, recipes/viva.yaml's clip) as the editor runs it (one clip at a time, 256-pixel
  tiles: ``viva_base.vae.configure_vae_memory``), then one clip untiled: the peak GPU memory of each and the seconds a
  clip (the decoding working set is not in the scaling plan's counts; docs/scaling.md, "The VAE's working memory").

``--dit-compile regional`` compiles the DiT as ``train.compile=regional`` does; the first call of each pass (which
compiles) is reported apart.

Prints a table, writes it as JSON (``--out``) and a markdown snippet next to it (``.md``), both again after every
check (a run stopped part-way keeps what it measured); ``python -m benchmarks.scaling --gpu-check FILE [FILE ...]``
adds them to docs/scaling.md. The runs of a lent H200 are kept in docs/gpu_check/.
Without CUDA (and without ``--device cpu``) it says so in one line and exits 0 with nothing run.
Exit status: 0 when no check failed, 1 otherwise.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
RATIO_TOL = 1e-3
# The --tiny-only stand-in of the 13B DiT: same class and LoRA targets, a few small blocks.
TINY_DIT = dict(in_channels=8, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=1,
                num_single_layers=1, num_refiner_layers=1, mlp_ratio=2.0, patch_size=2, patch_size_t=1,
                qk_norm="rms_norm", guidance_embeds=True, text_embed_dim=32, pooled_projection_dim=16,
                rope_theta=256.0, rope_axes_dim=(4, 6, 6))


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------- checks
def check_kernels(device: str) -> dict:
    """A bf16 matmul and bf16 SDPA on ``device`` against float32 references (relative errors)."""
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(512, 512, generator=g) for _ in range(2))
    got = (a.to(device, torch.bfloat16) @ b.to(device, torch.bfloat16)).float().cpu()
    ref = a @ b
    mm_err = float((got - ref).norm() / ref.norm())
    q, k, v = (torch.randn(2, 4, 256, 64, generator=g) for _ in range(3))
    att = F.scaled_dot_product_attention(*(t.to(device, torch.bfloat16) for t in (q, k, v))).float().cpu()
    att_ref = torch.softmax(q @ k.transpose(-1, -2) / 8.0, dim=-1) @ v
    sdpa_err = float((att - att_ref).norm() / att_ref.norm())
    out = {"matmul_bf16_rel_err": mm_err, "sdpa_bf16_rel_err": sdpa_err, "torch": torch.__version__}
    if device.startswith("cuda"):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        out.update(gpu=torch.cuda.get_device_name(), capability=".".join(map(str, torch.cuda.get_device_capability())),
                   cuda=torch.version.cuda, bf16_supported=torch.cuda.is_bf16_supported(),
                   gpus=torch.cuda.device_count())
        try:
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                F.scaled_dot_product_attention(*(t.to(device, torch.bfloat16) for t in (q, k, v)))
            _sync(device)
            out["flash_attention"] = True
        except RuntimeError as e:
            out["flash_attention"] = f"unavailable: {str(e).splitlines()[0][:120]}"
    ok = mm_err < 2e-2 and sdpa_err < 2e-2
    return {"status": "ok" if ok else "FAIL", **out,
            "detail": f"matmul rel err {mm_err:.1e}, sdpa rel err {sdpa_err:.1e}"}


def _run(cmd: list[str], log: Path, env: dict) -> None:
    """Run ``cmd`` in the repository, output to ``log``; raise with the log's tail on failure."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        rc = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
    if rc:
        tail = log.read_text().strip().splitlines()[-3:]
        raise RuntimeError(f"exit {rc}: {' / '.join(tail)[-400:]} (log: {log})")


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _env(device: str) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if device == "cpu":  # a CPU run on a GPU machine too
        env.update(ACCELERATE_USE_CPU="1", CUDA_VISIBLE_DEVICES="")
    return env


BF16 = ["model.dtype=bf16", "train.mixed_precision=bf16", "report_to=none"]


def _sft(work: Path, name: str, device: str, tiny: bool, *extra: str) -> list[dict]:
    """The tiny SFT recipe for a few bf16 steps (+ ``extra`` overrides); its metrics rows."""
    out = work / name
    shutil.rmtree(out, ignore_errors=True)
    args = ["recipe=recipes/sft_tiny.yaml", f"output_dir={out}", "train.max_steps=4", "train.checkpoint_every=0",
            "train.warmup_steps=1", *BF16]
    if tiny:
        args += ["data.toy.n_video=4", "data.toy.n_image=2", "data.toy.size=16", "train.max_steps=2",
                 "train.batch_size=2"]
    _run([sys.executable, "-m", "viva_base.sft", *args, *extra], work / f"{name}.log", _env(device))
    return [r for r in _rows(out / "metrics.jsonl") if "loss" in r]


def check_sft(work: Path, device: str, tiny: bool) -> dict:
    losses = [r["loss"] for r in _sft(work, "sft", device, tiny)]
    ok = bool(losses) and all(math.isfinite(x) for x in losses)
    return {"status": "ok" if ok else "FAIL", "steps": len(losses), "losses": losses,
            "detail": f"{len(losses)} steps, loss {losses[0]:.4f} -> {losses[-1]:.4f}" if losses else "no loss logged"}


def check_sft_compile(work: Path, device: str, tiny: bool, eager: list[float] | None = None) -> dict:
    """The ``sft`` check's run with ``train.compile=regional`` and ``train.fused_optimizer=true`` (the options a
    real run takes for speed): it must run, and its losses must be the eager run's (``eager``: the ``sft`` check's,
    else run here) to bf16 rounding (2%)."""
    if not eager:
        eager = [r["loss"] for r in _sft(work, "sft", device, tiny)]
    rows = _sft(work, "sft_compile", device, tiny, "train.compile=regional", "train.fused_optimizer=true")
    losses = [r["loss"] for r in rows]
    worst = max((abs(a - b) / max(abs(b), 1e-8) for a, b in zip(losses, eager)), default=math.inf)
    ok = len(losses) == len(eager) > 0 and worst <= 0.02
    return {"status": "ok" if ok else "FAIL", "steps": len(losses), "losses": losses, "eager_losses": eager,
            "max_rel_diff": worst, "step_seconds": [r.get("seconds") for r in rows],
            "detail": f"{len(losses)} compiled steps, losses within {worst:.1e} of eager (bound 2e-2)"}


def _grpo_args(out: Path, tiny: bool) -> list[str]:
    args = ["recipe=recipes/tiny.yaml", f"output_dir={out}", "train.num_iterations=2", "train.checkpoint_every=0",
            "train.minibatches_per_iteration=1", "train.num_inner_epochs=1", *BF16]
    if tiny:
        args += ["data.toy_prompts=2", "data.toy_size=16", "train.num_generations=2", "sampling.num_steps=3",
                 "sampling.sde_window_size=1"]
    return args


def _first_ratio(rows: list[dict]) -> dict:
    ratio = rows[0].get("ratio_mean")
    ok = ratio is not None and abs(ratio - 1.0) <= RATIO_TOL
    return {"ratio_mean": ratio, "ratio_ok": ok,
            "ratio_detail": f"first minibatch ratio mean {ratio:.6f} ({'within' if ok else 'NOT within'} {RATIO_TOL} of 1)"
            if ratio is not None else "no ratio_mean logged"}


def check_grpo(work: Path, device: str, tiny: bool) -> dict:
    from viva_base.data.toy import ensure_toy_dataset

    out = work / "grpo"
    shutil.rmtree(out, ignore_errors=True)
    toy = ensure_toy_dataset(work / "eval_data", seed=1, n_sft_video=0, n_sft_image=0, n_grpo=0, n_eval_compound=2,
                             n_eval_simple=1, size=16 if tiny else 32)
    args = _grpo_args(out, tiny) + [f"eval.manifest={toy['eval']}", "eval.num_steps=2", "eval.seeds=[1]",
                                    "eval.save_videos=1", "eval.batch_size=4"]
    _run([sys.executable, "-m", "editgrpo.train", *args], work / "grpo.log", _env(device))
    rows = _rows(out / "metrics.jsonl")
    r = _first_ratio(rows)
    evals = sorted(p.parent.name for p in (out / "eval").glob("step-*/summary.json"))
    eval_ok = evals == ["step-0", "step-2"]
    finite = all(math.isfinite(x["loss"]) for x in rows)
    ok = r["ratio_ok"] and eval_ok and finite and len(rows) == 2
    return {"status": "ok" if ok else "FAIL", "iterations": len(rows), "evaluations": evals, **r,
            "first_reward": rows[0]["reward"] if rows else None, "seconds_per_iteration": [x["seconds"] for x in rows],
            "detail": f"{len(rows)} iterations, loss finite: {finite}, held-out eval at {', '.join(evals) or 'none'}; "
                      + r["ratio_detail"]}


def check_grpo_compile(work: Path, device: str, tiny: bool, eager: dict | None = None) -> dict:
    """``grpo`` compiled (``train.compile=regional``, ``train.fused_optimizer=true``), no evaluation: it must run,
    and the first minibatch's ratio must be within RATIO_TOL of 1. ``eager``: the ``grpo`` check's result, whose
    first-iteration reward is shown next to this one's (the same seeds; bf16 rounding apart)."""
    out = work / "grpo_compile"
    shutil.rmtree(out, ignore_errors=True)
    _run([sys.executable, "-m", "editgrpo.train", *_grpo_args(out, tiny), "train.compile=regional",
          "train.fused_optimizer=true"], work / "grpo_compile.log", _env(device))
    rows = _rows(out / "metrics.jsonl")
    r = _first_ratio(rows)
    finite = all(math.isfinite(x["loss"]) for x in rows)
    ok = r["ratio_ok"] and finite and len(rows) == 2
    reward = rows[0]["reward"] if rows else None
    eager_reward = (eager or {}).get("first_reward")
    vs = f", eager {eager_reward:.4f}" if eager_reward is not None else ""
    return {"status": "ok" if ok else "FAIL", "iterations": len(rows), **r, "first_reward": reward,
            "eager_first_reward": eager_reward, "seconds_per_iteration": [x["seconds"] for x in rows],
            "detail": f"{len(rows)} compiled iterations, loss finite: {finite}, first reward "
                      f"{reward if reward is None else f'{reward:.4f}'}{vs}; " + r["ratio_detail"]}


def _free_port() -> int:
    """A TCP port free now, for the launch's rendezvous (a fixed one may be held by another job on the machine)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def check_grpo_2proc(work: Path, device: str, tiny: bool) -> dict:
    if device.startswith("cuda") and torch.cuda.device_count() < 2:
        return {"status": "skipped", "detail": f"skipped: {torch.cuda.device_count()} GPU"}
    out = work / "grpo_2proc"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           "-m", "editgrpo.train", *_grpo_args(out, tiny)]
    env = _env(device)
    env.pop("ACCELERATE_USE_CPU", None)  # torchrun on CPUs: the trainer starts gloo itself (viva_base.training)
    _run(cmd, work / "grpo_2proc.log", env)
    rows = _rows(out / "metrics.jsonl")
    r = _first_ratio(rows)
    ok = r["ratio_ok"] and len(rows) == 2 and (out / "lora").is_dir()
    backend = "nccl" if device.startswith("cuda") else "gloo"
    return {"status": "ok" if ok else "FAIL", "backend": backend, **r,
            "seconds_per_iteration": [x["seconds"] for x in rows],
            "detail": f"2 processes ({backend}), {len(rows)} iterations; " + r["ratio_detail"]}


def _init_random_(dit: torch.nn.Module, seed: int = 0) -> None:
    """Random weights in place (fan-in scaled normals, unit norms, zero biases; LoRA: A ~ N(0, 1/r^2), B = 0)."""
    g = torch.Generator(device=next(dit.parameters()).device).manual_seed(seed)
    with torch.no_grad():
        for name, p in dit.named_parameters():
            if "lora_B" in name:
                p.zero_()
            elif "lora_A" in name:
                p.normal_(0.0, 1.0 / p.shape[0], generator=g)
            elif p.ndim >= 2:
                p.normal_(0.0, 1.0 / math.sqrt(p[0].numel()), generator=g)
            elif name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.zero_()
        for buf in dit.buffers():
            if buf.is_floating_point():
                buf.zero_()


def dit_step(config: dict, *, frames: int, height: int, width: int, text_tokens: int, device: str,
             lora_rank: int = 64, repeats: int = 2, compile: str = "none") -> dict:
    """One Edit-GRPO-like DiT step of ``config`` (random weights) on ``device``: a sampling forward (no grad) and a
    training forward + backward (LoRA ``lora_rank``, gradient checkpointing, bf16 autocast), CFG batch 2, each
    timed (best of ``repeats`` after a warm-up), with the peak memory of the training pass (CUDA), next to
    benchmarks.scaling's prediction for the same config and shape (the latent grid of a ``frames x height x width``
    clip through HunyuanVideo's VAE, ``benchmarks.scaling.latent_grid``). ``compile``: ``train.compile``'s modes
    (``viva_base.training.compile_dit``; ``regional`` compiles the repeated blocks): the first call of each pass,
    which compiles, is reported apart (``*_first_seconds``)."""
    from viva_base.training import compile_dit

    from benchmarks.scaling import (GPU, MFU, achieved_mfu, dit_inputs, dit_pass, latent_grid, meta_editor_dit,
                                    seconds_at_mfu)

    grid = latent_grid(frames, height, width)
    batch = 2  # CFG: cond and uncond rows of one sample
    dtype = torch.bfloat16
    # prediction: the same model on the meta device, counted
    meta = meta_editor_dit(config, lora_rank, 2 * lora_rank, dtype=dtype)
    n_frozen = sum(p.numel() for p in meta.parameters() if not p.requires_grad)
    n_lora = sum(p.numel() for p in meta.parameters() if p.requires_grad)
    pred_sample = dit_pass(meta, config, batch, grid, text_tokens, train=False)["flops"]["total"]
    train = dit_pass(meta, config, batch, grid, text_tokens, train=True)
    pred_train = train["flops"]["total"] + pred_sample  # checkpointing recomputes the forward once
    pred_mem = 2 * n_frozen + 8 * n_lora + train["activations"]["checkpointing"]  # bf16 base, fp32 LoRA + grads
    del meta

    # the real thing: built on meta, materialised on the device, random weights
    dit = meta_editor_dit(config, lora_rank, 2 * lora_rank, dtype=dtype).to_empty(device=device)
    _init_random_(dit)
    dit.enable_gradient_checkpointing()
    compile_dit(dit, compile)
    g = torch.Generator(device=device).manual_seed(0)
    kw = dit_inputs(config, batch, grid, text_tokens, dtype=dtype, device=device)
    for key in ("hidden_states", "encoder_hidden_states", "pooled_projections"):
        kw[key] = torch.randn(kw[key].shape, generator=g, device=device, dtype=dtype)
    lora = [p for p in dit.parameters() if p.requires_grad]
    cuda = device.startswith("cuda")

    def sample():
        with torch.no_grad(), torch.autocast(device_type=torch.device(device).type, dtype=dtype):
            return dit(**kw)[0]

    def train_step():
        with torch.autocast(device_type=torch.device(device).type, dtype=dtype):
            out = dit(**kw)[0]
        out.float().square().mean().backward()
        return out

    def timed(fn) -> tuple[float, float]:
        """(best of the repeats, the first call): the first is a warm-up (kernel selection, allocator, compiling)."""
        times = []
        for _ in range(repeats + 1):
            _sync(device)
            t = time.perf_counter()
            fn()
            _sync(device)
            times.append(time.perf_counter() - t)
        return min(times[1:]), times[0]

    t_sample, first_sample = timed(sample)
    for p in lora:
        p.grad = None
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    dit.train()
    calls = [0]  # calls of the first block: 2 per training step when checkpointing recomputes it (a pre-hook:
    # the recomputation stops early, before the forward hooks)
    hook = dit.transformer_blocks[0].register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    t_train, first_train = timed(train_step)
    hook.remove()
    peak = torch.cuda.max_memory_allocated() if cuda else None
    grads = [p.grad for p in lora if p.grad is not None]
    grad_ok = bool(grads) and all(torch.isfinite(x).all() for x in grads) and any(x.abs().sum() > 0 for x in grads)
    out_finite = bool(torch.isfinite(sample()).all())
    dit = kw = grads = None  # free the device memory (the closures above hold the names, so no del)
    if cuda:
        torch.cuda.empty_cache()
    p_sample, p_train = seconds_at_mfu(pred_sample, 1), seconds_at_mfu(pred_train, 1)
    return {"config_params": n_frozen, "lora_params": n_lora, "lora_rank": lora_rank, "frames": frames,
            "height": height, "width": width,
            "latent_grid": list(grid), "video_tokens": grid[0] * (grid[1] // 2) * (grid[2] // 2),
            "text_tokens": text_tokens, "compile": compile, "sample_seconds": t_sample, "train_seconds": t_train,
            "sample_first_seconds": first_sample, "train_first_seconds": first_train,
            "predicted_sample_seconds": p_sample, "predicted_train_seconds": p_train,
            # a GPU prediction: no ratio for a CPU run (the stand-in only exercises the code)
            "sample_ratio": t_sample / p_sample if cuda else None, "train_ratio": t_train / p_train if cuda else None,
            "sample_tflops": pred_sample / 1e12, "train_tflops": pred_train / 1e12,
            "achieved_mfu_train": achieved_mfu(pred_train, t_train),
            "peak_bytes": peak, "predicted_peak_bytes": pred_mem,
            "memory_ratio": peak / pred_mem if peak is not None else None,
            "prediction_basis": f"{GPU['name']} {GPU['bf16_tflops']} bf16 TFLOP/s at {MFU:.0%} MFU",
            "grad_ok": grad_ok, "output_finite": out_finite, "checkpointing": calls[0] == 2 * (repeats + 1)}


def check_dit(device: str, tiny: bool, frames: int, height: int, width: int, text_tokens: int,
              compile: str = "none") -> dict:
    from benchmarks.scaling import HUNYUAN_DIT_13B

    if tiny:  # the stand-in: a few small blocks, a small latent
        r = dit_step(TINY_DIT, frames=5, height=32, width=32, text_tokens=8, device=device, lora_rank=4, repeats=1,
                     compile=compile)
    else:
        r = dit_step(HUNYUAN_DIT_13B, frames=frames, height=height, width=width, text_tokens=text_tokens,
                     device=device, compile=compile)
    mem = (f", peak {r['peak_bytes'] / 2**30:.1f} GiB (predicted {r['predicted_peak_bytes'] / 2**30:.1f}, "
           f"x{r['memory_ratio']:.2f})" if r["peak_bytes"] is not None else "")
    x = lambda v: f"x{v:.2f} of predicted" if v is not None else "no GPU prediction"  # noqa: E731
    detail = (f"{'tiny stand-in' if tiny else 'HunyuanVideo-13B'} {r['frames']}x{r['height']}x{r['width']}, "
              f"{r['video_tokens']} video tokens: forward {r['sample_seconds']:.3f} s ({x(r['sample_ratio'])}), "
              f"fwd+bwd {r['train_seconds']:.3f} s ({x(r['train_ratio'])}){mem}")
    if compile != "none":
        detail += (f"; compiled ({compile}): first forward {r['sample_first_seconds']:.1f} s, first fwd+bwd "
                   f"{r['train_first_seconds']:.1f} s")
    ok = r["grad_ok"] and r["output_finite"] and r["checkpointing"]
    return {"status": "ok" if ok else "FAIL", **r, "detail": detail}


# The --tiny-only stand-in of the HunyuanVideo VAE: same class, a few channels.
TINY_VAE = dict(latent_channels=4, block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4,
                spatial_compression_ratio=8, temporal_compression_ratio=4, mid_block_add_attention=False)


def check_vae(device: str, tiny: bool, frames: int, height: int, width: int, clips: int = 2) -> dict:
    """The HunyuanVideo VAE (``benchmarks.scaling.HUNYUAN_VAE``, random weights, bf16 on a GPU) decoding ``clips``
    clips of ``frames x height x width`` as the editor runs it (``viva_base.vae.configure_vae_memory``: one clip at a
    time, spatial tiles), then one clip untiled; the peak GPU memory of each, and seconds a clip."""
    from diffusers import AutoencoderKLHunyuanVideo

    from benchmarks.scaling import HUNYUAN_VAE
    from viva_base.vae import configure_vae_memory

    if tiny:  # larger than one 256-pixel tile, so the tiles run
        frames, height, width = 5, 288, 288
    cuda = device.startswith("cuda")
    dtype = torch.bfloat16 if cuda else torch.float32
    torch.manual_seed(0)
    vae = AutoencoderKLHunyuanVideo(**(TINY_VAE if tiny else HUNYUAN_VAE)).to(device, dtype).eval()
    z = torch.randn(clips, vae.config.latent_channels, (frames - 1) // 4 + 1, height // 8, width // 8,
                    device=device, dtype=dtype)
    runs = {}
    for name, tiling, n in (("editor", True, clips), ("untiled", False, 1)):
        configure_vae_memory(vae, tiling)
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        t = time.time()
        with torch.no_grad():
            x = vae.decode(z[:n]).sample
        _sync(device)
        runs[name] = {"clips": n, "seconds_per_clip": (time.time() - t) / n,
                      "peak_bytes": torch.cuda.max_memory_allocated(device) - base if cuda else None,
                      "finite": bool(torch.isfinite(x).all()), "shape": list(x.shape)}
        del x
    gib = lambda r: f", peak {r['peak_bytes'] / 2**30:.1f} GiB" if r["peak_bytes"] is not None else ""  # noqa: E731
    e, u = runs["editor"], runs["untiled"]
    detail = (f"{'tiny stand-in' if tiny else 'HunyuanVideo VAE'} decoding {frames}x{height}x{width}: {clips} clips "
              f"sliced + tiled {e['seconds_per_clip']:.2f} s a clip{gib(e)}; one clip untiled "
              f"{u['seconds_per_clip']:.2f} s{gib(u)}")
    ok = all(r["finite"] and r["shape"] == [r["clips"], 3, frames, height, width] for r in runs.values())
    return {"status": "ok" if ok else "FAIL", "frames": frames, "height": height, "width": width, **runs,
            "detail": detail}


# ---------------------------------------------------------------------------- report
def measured_by(meta: dict) -> str:
    """The line naming the command, the machine, its torch and the date of a run (from its JSON's ``meta``)."""
    command = f"python -m benchmarks.gpu_check {meta['argv']}".strip()
    return f"`{command}` on {meta['device_name']} (torch {meta.get('torch', '?')}, {meta['date']})"


def check_table(results: dict, meta: dict) -> list[str]:
    lines = ["| check | status | result |", "|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['status']} | {r.get('detail', '')} |")
    missing = [c for c in meta.get("checks", ()) if c not in results]
    if meta.get("complete") is False and missing:  # written part-way; if the run stops here, this says so
        lines.append(f"| {', '.join(missing)} | not run | the run stopped before these checks |")
    return lines


def dit_table(rows: list[dict]) -> list[str]:
    """The ``dit`` checks' measurements, one row each, next to the predictions, with the model FLOPs utilisation
    measured (the counted FLOPs over the seconds, against the prediction's GPU peak), and a line saying what the
    predictions are."""
    from benchmarks.scaling import achieved_mfu

    gib = lambda b: f"{b / 2**30:.1f} GiB" if b is not None else "n/a"  # noqa: E731
    x = lambda r: f"{r:.2f}" if r is not None else "n/a"  # noqa: E731
    mfu = lambda tflops, sec, d: (f"{achieved_mfu(tflops * 1e12, sec):.0%}"  # noqa: E731
                                  if d["peak_bytes"] is not None else "n/a")  # a CPU run: no GPU peak to compare
    ranks = sorted({d["lora_rank"] for d in rows})
    lines = ["| frames x H x W | video + text tokens | forward (CFG 2) | predicted | ratio | fwd+bwd, LoRA "
             f"r{'/'.join(map(str, ranks))} + checkpointing | predicted | ratio | MFU forward / fwd+bwd | "
             "peak memory | predicted | ratio |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for d in rows:
        compiled = f", compiled ({d['compile']})" if d.get("compile", "none") != "none" else ""
        lines.append(
            f"| {d['frames']}x{d['height']}x{d['width']}{compiled} | {d['video_tokens']:,} + {d['text_tokens']} | "
            f"{d['sample_seconds']:.3g} s | {d['predicted_sample_seconds']:.3g} s | {x(d['sample_ratio'])} | "
            f"{d['train_seconds']:.3g} s | {d['predicted_train_seconds']:.3g} s | {x(d['train_ratio'])} | "
            f"{mfu(d['sample_tflops'], d['sample_seconds'], d)} / {mfu(d['train_tflops'], d['train_seconds'], d)} | "
            f"{gib(d['peak_bytes'])} | {gib(d['predicted_peak_bytes'])} | {x(d['memory_ratio'])} |")
    basis = sorted({d["prediction_basis"] for d in rows})
    return lines + ["", f"Predictions: benchmarks.scaling's counts for this shape, {'; '.join(basis)}; memory = bf16 "
                    "weights + fp32 LoRA and its gradients + the checkpointed activations (ratio = measured / "
                    "predicted; MFU = the counted FLOPs per second over the same peak)."]


def markdown(results: dict, meta: dict) -> str:
    """One run's report: its command, its checks, and the DiT step's table."""
    lines = [f"Measured by {measured_by(meta)}:", "", *check_table(results, meta)]
    d = results.get("dit")
    if d and "train_seconds" in d:
        lines += ["", *dit_table([d])]
    return "\n".join(lines) + "\n"


def write_results(out: Path, meta: dict, results: dict, done: bool) -> str:
    """``out`` (JSON) and its markdown snippet (``.md``), each replaced whole (a temporary file renamed over it);
    ``done`` is False while checks are still to run (recorded as ``meta["complete"]``). Returns the markdown."""
    meta = {**meta, "complete": done}
    md = markdown(results, meta)
    out.parent.mkdir(parents=True, exist_ok=True)
    for path, text in ((out, json.dumps({"meta": meta, "results": results}, indent=2, default=str)),
                       (out.with_suffix(".md"), md)):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)
    return md


def parser() -> argparse.ArgumentParser:
    from viva_base.cli_args import clip_frames, count, side

    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu (the code paths with --tiny-only)")
    ap.add_argument("--tiny-only", action="store_true", help="tiny shapes everywhere, the DiT check on a small config")
    ap.add_argument("--frames", type=clip_frames, default=9, help="real-size DiT check: clip frames (4k+1)")
    ap.add_argument("--height", type=side, default=480, help="DiT and VAE checks: frame height (a multiple of 16)")
    ap.add_argument("--width", type=side, default=848, help="DiT and VAE checks: frame width (a multiple of 16)")
    ap.add_argument("--text-tokens", type=count(1), default=832,
                    help="DiT check: text tokens (the first frame's 576 image tokens + at most 256 of the instruction)")
    ap.add_argument("--dit-compile", default="none", choices=["none", "regional", "full"],
                    help="DiT check: compile the DiT as train.compile does (its first calls, compiling, apart)")
    ap.add_argument("--vae-frames", type=clip_frames, default=33,
                    help="VAE check: clip frames (4k+1; recipes/viva.yaml's clip)")
    ap.add_argument("--checks", default="kernels,sft,sft_compile,grpo,grpo_compile,grpo_2proc,dit,vae",
                    help="comma-separated subset to run")
    ap.add_argument("--out", default="outputs/gpu_check/gpu_check.json", help="JSON results (markdown next to it)")
    return ap


def main(argv=None) -> int:
    ap = parser()
    a = ap.parse_args(argv)
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here (torch.cuda.is_available() is False): nothing run "
              "(use --device cpu --tiny-only to run the code paths on CPU)")
        return 0
    if a.device == "cpu" and not a.tiny_only:
        ap.error("--device cpu needs --tiny-only (the real-size DiT does not run on a CPU)")
    out = Path(a.out).resolve()  # the recipe checks run from the package's folder: their paths are absolute
    work = out.parent / "runs"
    device = "cuda:0" if a.device == "cuda" else a.device
    checks = {
        "kernels": lambda: check_kernels(device),
        "sft": lambda: check_sft(work, a.device, a.tiny_only),
        "sft_compile": lambda: check_sft_compile(work, a.device, a.tiny_only, results.get("sft", {}).get("losses")),
        "grpo": lambda: check_grpo(work, a.device, a.tiny_only),
        "grpo_compile": lambda: check_grpo_compile(work, a.device, a.tiny_only, results.get("grpo")),
        "grpo_2proc": lambda: check_grpo_2proc(work, a.device, a.tiny_only),
        "dit": lambda: check_dit(device, a.tiny_only, a.frames, a.height, a.width, a.text_tokens, a.dit_compile),
        "vae": lambda: check_vae(device, a.tiny_only, a.vae_frames, a.height, a.width),
    }
    wanted = [c.strip() for c in a.checks.split(",") if c.strip()]
    unknown = sorted(set(wanted) - set(checks))
    if unknown or not wanted:
        ap.error(f"unknown checks {unknown}; use any of {', '.join(checks)}" if unknown else
                 f"--checks names no check; use any of {', '.join(checks)}")
    from viva_base.errors import UserError
    from viva_base.recipe import check_output_file

    try:
        check_output_file("--out", a.out)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    work.mkdir(parents=True, exist_ok=True)
    meta = {"argv": " ".join(argv if argv is not None else sys.argv[1:]), "device": device,
            "device_name": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
            "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "checks": wanted}
    results = {}
    for name in wanted:
        t = time.time()
        try:
            r = checks[name]()
        except Exception as e:  # noqa: BLE001 -- a failed check is a result; the next one still runs
            r = {"status": "FAIL", "detail": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:600]}
        r["seconds"] = time.time() - t
        results[name] = r
        print(f"[{r['status']:>7}] {name:<10} {r['seconds']:6.1f} s  {r.get('detail', '')}", flush=True)
        # written after every check: a run stopped part-way (a time limit, a hung kernel) keeps what it measured
        md = write_results(out, meta, results, done=len(results) == len(wanted))
    print("\n" + md)
    print(f"written {out} and {out.with_suffix('.md')}")
    return 0 if all(r["status"] != "FAIL" for r in results.values()) else 1


if __name__ == "__main__":
    from viva_base.errors import exit_with

    exit_with(main)
