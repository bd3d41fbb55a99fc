"""Masked flow-matching SFT of the VIVA editor (paper section 3.2, eq. 3).

    python -m viva_base.sft recipe=recipes/sft_tiny.yaml [key=value ...]
    accelerate launch --config_file recipes/accelerate/zero3.yaml -m viva_base.sft recipe=recipes/sft_viva.yaml
    ACCELERATE_USE_CPU=1 torchrun --nproc_per_node N -m viva_base.sft ...     # DDP on CPUs (gloo)

Reads a pairs manifest (viva_base/data/manifest.py), mixes video and image pairs (``data.p_video``),
drops the instruction with probability ``train.cfg_dropout`` (so CFG works at inference), and trains the
projector, the token refiner and the DiT (``train.trainable``: full | lora | projector_refiner).
Writes ``output_dir/checkpoint-<step>/``, ``metrics.jsonl``, ``config.yaml``, tensorboard logs, and the
trained editor to ``output_dir/final/`` (a directory ``VivaEditor.from_pretrained`` loads).

Under DeepSpeed (viva_base.distributed) the recipe fills the config's "auto" keys (micro-batch per GPU =
``batch_size / (gradient_accumulation_steps x processes)``, accumulation = ``gradient_accumulation_steps``,
clipping = ``max_grad_norm``); the engine accumulates, clips and steps at the last micro-batch of each step; ZeRO-3
partitions only the DiT; ``final/`` is written from the whole fp32 master weights, gathered one parameter at a
time. docs/scaling.md has the memory plan of the 13B full fine-tuning.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from tqdm.auto import tqdm

from .data.manifest import read_manifest
from .data.pairs import (MicroBatches, MixedBatchSampler, PairDataset, check_frame_counts, pair_batches,
                         warn_changed_aspect)
from .distributed import (DeepSpeedOptimizerState, check_resume, configure_deepspeed, deepspeed_stage,
                          full_parameters, load_engine_state, no_zero_init, refuse_mixed_references,
                          restore_parameters, save_state)
from .errors import CheckpointError, UserError
from .hub import HubConfig, card_files, check_hub, push_folder, sft_card
from .losses import (add_noise, flow_matching_target, mask_to_latent, masked_flow_matching_loss, sample_sigmas,
                     sigma_loss_weight)
from .policy import Condition
from .precompute import PrecomputedPairs
from .recipe import run_cli, save_resolved
from .sft_checks import validate_sft_config
from .validation import ValidationConfig
from .validation import history as validation_history
from .training import (DTYPES, MetricsFile, ModelConfig, build_editor, clip_norm, compile_dit, compute_autocast,
                       find_checkpoint, init_trackers, load_checkpoint, make_accelerator, step_generator,
                       main_process_first_polled, upcast_trainable)

logger = logging.getLogger("viva_base.sft")


@dataclass
class ToyDataConfig:
    """Build a toy-world pairs manifest when ``data.manifest`` is not given (cached in output_dir/data)."""

    seed: int = 0                        # toy-world seed
    n_video: int = 64                    # video pairs
    n_image: int = 32                    # 1-frame image pairs
    frames: int = 9                      # frames per clip (4k+1)
    size: int = 32                       # frame side in pixels (multiple of 16)


@dataclass
class DataConfig:
    manifest: Optional[str] = None       # a pairs manifest; None -> the toy world (data.toy)
    frames: Optional[int] = None         # cut every clip to this many frames (4k+1 for the Hunyuan VAE)
    size: Optional[list[int]] = None     # resize every frame to [H, W]
    p_video: float = 0.4                 # probability that a batch is a video batch (paper: 0.4)
    num_workers: int = 0                 # processes that read and decode the next micro-batches' clips while one
                                         # trains (torch DataLoader; the same batches); 0: read in the training loop
    precompute: bool = False             # encode every pair's frozen inputs (instructor, VAE) once before training
                                         # and keep them in host memory (viva_base/precompute.py): per step only the DiT runs
    toy: ToyDataConfig = field(default_factory=ToyDataConfig)


@dataclass
class LoraConfig:
    rank: int = 64                       # LoRA rank r
    alpha: int = 128                     # LoRA alpha (scale alpha / r)
    init: str = "gaussian"               # peft init_lora_weights: gaussian | default (kaiming) | ...
    targets: Optional[str] = None        # peft target_modules; None -> the editor's lora_targets


@dataclass
class TrainConfig:
    seed: int = 0                        # seeds the batches, noise, CFG dropout and any LoRA init
    max_steps: int = 100                 # optimizer steps (paper: 12k)
    batch_size: int = 4                  # global batch per optimizer step (paper: 128)
    gradient_accumulation_steps: int = 1  # micro-batches per optimizer step (batch_size = micro x accum x procs)
    trainable: str = "full"              # full | lora | projector_refiner
    learning_rate: float = 2e-5          # paper: 2e-5
    weight_decay: float = 0.0            # AdamW weight decay
    adam_beta1: float = 0.9              # AdamW betas
    adam_beta2: float = 0.999
    lr_scheduler: str = "constant_with_warmup"  # a diffusers get_scheduler name (constant, cosine, linear, ...)
    warmup_steps: int = 0                # optimizer steps of linear warmup
    max_grad_norm: float = 1.0           # gradient clipping (0: none, as DeepSpeed reads it)
    ema_decay: float = 0.0               # EMA of the trained weights (diffusers EMAModel); final/ holds the EMA; 0: off
    w_m: float = 1.0                     # eq. 3 mask weight
    cfg_dropout: float = 0.1             # probability of an empty instruction
    pooled_dropout: float = 0.0          # probability of a zeroed pooled text vector (the DiT must read the tokens)
    timestep_sampling: str = "logit_normal"   # logit_normal | uniform
    loss_weighting: str = "none"         # none (eq. 3) | x0 (x sigma^2: the clean-latent error, every noise level alike) | capped (x min(1, cap sigma^2))
    loss_weight_cap: float = 25.0        # capped: the largest clean-latent weight 1/sigma^2 (sigma < cap^-1/2 are capped)
    mask_normalization: str = "none"     # none (eq. 3: an edit's weight grows with its area) | balanced (eq. 3's budget, every edit the same share) | area (each edit averaged alone)
    shift: Optional[float] = None        # training sigma shift; None -> the editor's schedule shift
    mixed_precision: str = "no"          # no | bf16 | fp16 (accelerate autocast)
    compile: str = "none"                # none | full (torch.compile the whole DiT) | regional (each repeated block)
    fused_optimizer: bool = False        # AdamW's fused kernel (torch's fused=True; CPU or GPU)
    checkpoint_every: int = 50           # steps between checkpoints (0: only the final editor)
    keep_checkpoints: int = 2            # older checkpoints are deleted
    log_every: int = 1                   # steps between logged metric rows


@dataclass
class SFTConfig:
    output_dir: str = "outputs/sft"      # checkpoints, logs and final/ (the trained editor) land here
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)  # used with train.trainable=lora (same block as Edit-GRPO's)
    report_to: str = "tensorboard"       # tensorboard | wandb (offline without a key) | none
    resume: Optional[str] = None         # latest | a checkpoint folder
    hub: HubConfig = field(default_factory=HubConfig)  # model card and upload of final/ (viva_base/hub.py)
    validation: ValidationConfig = field(default_factory=ValidationConfig)  # held-out loss and edits (validation.py)

    RECIPE_ALIASES = {"train.lora": "lora"}  # the spelling before 2026-11-30 (the LoRA block is top-level everywhere)


def set_trainable(editor, cfg: TrainConfig, lora: LoraConfig | None = None) -> list[torch.nn.Parameter]:
    """Choose what SFT trains (``cfg.trainable``; the adapter's shape from ``lora``); returns the trainable
    parameters (projector + refiner always), in float32 whatever the model dtype (``upcast_trainable``)."""
    lora = lora if lora is not None else LoraConfig()
    dit = editor.transformer
    dit.requires_grad_(False)
    if cfg.trainable == "full":
        dit.requires_grad_(True)
    elif cfg.trainable == "lora":
        from .peft_utils import add_lora

        add_lora(dit, rank=lora.rank, alpha=lora.alpha, init=lora.init, targets=lora.targets or editor.lora_targets)
    elif cfg.trainable != "projector_refiner":
        raise UserError(f"train.trainable={cfg.trainable!r}: use full, lora or projector_refiner")
    dit.x_embedder.requires_grad_(True)        # the projector (2C-channel patch embedding)
    dit.context_embedder.requires_grad_(True)  # the token refiner
    return upcast_trainable(dit)


EMA_FILE = "ema"  # checkpoint-<step>/ema.safetensors: the EMA weights by parameter name


def make_ema(dit, decay: float):
    """An EMA of ``dit``'s trainable weights (diffusers ``EMAModel``: ``w_ema <- d w_ema + (1 - d) w`` after every
    optimizer step, with ``d = min(decay, (1 + k) / (10 + k))`` at step k, so the first steps are not frozen in);
    None when ``decay`` is 0."""
    if not decay:
        return None
    from diffusers.training_utils import EMAModel

    return EMAModel([p for p in dit.parameters() if p.requires_grad], decay=decay, foreach=True)


def ema_state(ema, dit) -> dict[str, torch.Tensor]:
    """The EMA weights by the DiT's parameter names (what a checkpoint stores)."""
    names = [n for n, p in dit.named_parameters() if p.requires_grad]
    return {n: s.detach().cpu().contiguous() for n, s in zip(names, ema.shadow_params)}


def load_ema(ema, dit, ckpt: Path, step: int) -> None:
    """Restore :func:`ema_state` from ``ckpt``; the EMA's step count is the optimizer's."""
    from safetensors.torch import load_file

    path = ckpt / f"{EMA_FILE}.safetensors"
    if not path.exists():
        raise CheckpointError(f"{ckpt}: no {path.name} (written without train.ema_decay); resume=null starts fresh")
    saved = load_file(str(path))
    names = [n for n, p in dit.named_parameters() if p.requires_grad]
    if sorted(saved) != sorted(names):
        raise CheckpointError(f"{path}: EMA weights do not match the model's trainable parameters")
    with torch.no_grad():
        for n, s in zip(names, ema.shadow_params):
            s.copy_(saved[n].to(s.device, s.dtype))
    ema.optimization_step = step


def encode_pairs(editor, batch: dict, drop: torch.Tensor) -> tuple:
    """The frozen half of an SFT step: ``(cond, z_target, latent_mask)`` of a collated batch, the instruction
    of the samples in ``drop`` emptied (CFG dropout). ``viva_base.precompute`` gives the same from memory."""
    instructions = ["" if d else t for d, t in zip(drop.tolist(), batch["instruction"])]
    device = editor.device
    cond, _ = editor.encode_condition(batch["source"].to(device), instructions, batch["reference"], with_uncond=False)
    z_tgt = editor.encode_video(batch["target"].to(device)).float()
    mask = mask_to_latent(batch["mask"].to(device), tuple(z_tgt.shape[2:]), editor.temporal_ratio)
    return cond, z_tgt, mask


def drop_pooled(cond: Condition, keep: torch.Tensor) -> Condition:
    """``cond`` with the pooled text vector (HunyuanVideo's ``pooled_projections``) zeroed where ``keep`` is False.

    Why (docs/toy_world.md, "fourteenth pass"): the pooled vector enters the DiT as a global modulation (adaLN), the
    text tokens through attention. A DiT trained on single edits learns to read the edit from the pooled vector
    alone, one global code per edit, and a compound instruction's pooled vector then means no edit at all; trained
    with the vector zeroed for part of the samples it has to read the tokens, which compose."""
    pooled = cond["pooled"]
    keep = keep.to(pooled.device, pooled.dtype).view(-1, *[1] * (pooled.dim() - 1))
    return Condition({**cond, "pooled": pooled * keep})


def sft_loss(editor, batch: dict, generator: torch.Generator, *, w_m: float, cfg_dropout: float,
             timestep_sampling: str, shift: float, loss_weighting: str = "none", mask_normalization: str = "none",
             loss_weight_cap: float = 25.0, pooled_dropout: float = 0.0,
             noise: torch.Tensor | None = None,
             sigma: torch.Tensor | None = None, features: PrecomputedPairs | None = None) -> torch.Tensor:
    """One masked flow-matching loss (eq. 3) on a batch. ``noise``/``sigma`` may be fixed by the caller.

    With ``features`` (``data.precompute``) ``batch`` is ``{"index": [pair indices]}`` and the frozen encodings
    come from memory; the random draws (dropout, noise, sigma) are the same either way.
    """
    b = len(batch["index"]) if features is not None else len(batch["instruction"])
    drop = torch.rand(b, generator=generator) < cfg_dropout
    if features is not None:
        cond, z_tgt, mask = features.batch(batch["index"], drop)
    else:
        cond, z_tgt, mask = encode_pairs(editor, batch, drop)
    if pooled_dropout > 0:  # drawn only when on: runs without it keep their random stream bit for bit
        cond = drop_pooled(cond, torch.rand(b, generator=generator) >= pooled_dropout)
    device = editor.device
    if noise is None:
        noise = torch.randn(z_tgt.shape, generator=generator)
    if sigma is None:
        sigma = sample_sigmas(b, shift=shift, method=timestep_sampling, generator=generator)
    noise, sigma = noise.to(device), sigma.to(device)
    z_t = add_noise(z_tgt, noise, sigma)
    v = editor.velocity(z_t, sigma, cond)
    return masked_flow_matching_loss(v, flow_matching_target(noise, z_tgt), mask, w_m,
                                     sample_weight=sigma_loss_weight(sigma, loss_weighting, loss_weight_cap),
                                     normalization=mask_normalization)


def prepare_toy_manifest(cfg: SFTConfig) -> str:
    from .data.toy import ensure_toy_dataset

    out = Path(cfg.output_dir) / "data"
    t = cfg.data.toy
    paths = ensure_toy_dataset(out, seed=t.seed, n_sft_video=t.n_video, n_sft_image=t.n_image, n_grpo=0,
                              n_eval_compound=0, n_eval_simple=0, frames=t.frames, size=t.size)
    return str(paths["sft"])


def micro_batch_size(batch_size: int, accumulation: int, processes: int) -> int:
    """Pairs each process takes per forward (DeepSpeed's ``train_micro_batch_size_per_gpu``):
    ``train.batch_size / (gradient_accumulation_steps x processes)``, a UserError unless a whole number >= 1."""
    per_micro = batch_size // (accumulation * processes)
    if per_micro * accumulation * processes != batch_size or per_micro == 0:
        raise UserError(f"train.batch_size={batch_size} must be a multiple of gradient_accumulation_steps "
                        f"({accumulation}) x processes ({processes})")
    return per_micro


def check_zero3_forwards(records: list[dict], per_micro: int) -> None:
    """ZeRO-3 gathers the DiT's weights from every process at every forward, so all processes must run the same
    number of forwards. A micro-batch mixing pairs with and without a reference image runs two (different token
    counts, ``VivaEditor.velocity``): refuse a manifest that could mix them unless each process takes one pair."""
    refuse_mixed_references(records, per_micro, "pairs", "set train.batch_size = gradient_accumulation_steps x "
                            "processes (one pair per process and micro-batch), give all or no pairs a reference, or "
                            "use ZeRO-2")


def main(cfg: SFTConfig) -> Path:
    t0 = time.time()
    validate_sft_config(cfg)  # before any data, editor or accelerator
    repo_id = check_hub(cfg.hub, cfg.output_dir)  # the main process creates the hub repo now: a bad token fails fast
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    tc = cfg.train
    accelerator = make_accelerator(str(out), report_to=cfg.report_to, mixed_precision=tc.mixed_precision,
                                   gradient_accumulation_steps=tc.gradient_accumulation_steps)
    rank, world = accelerator.process_index, accelerator.num_processes
    if world == 1 and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError(f"launched as {os.environ['WORLD_SIZE']} processes but accelerate sees 1 (no GPU): on CPUs "
                        "run `ACCELERATE_USE_CPU=1 torchrun --nproc_per_node N -m viva_base.sft ...`")
    per_micro = micro_batch_size(tc.batch_size, tc.gradient_accumulation_steps, world)
    zero = deepspeed_stage(accelerator)
    if zero is not None:  # the engine accumulates and clips: it must agree with the recipe (else a UserError)
        configure_deepspeed(accelerator, micro_batch=per_micro, accumulation=tc.gradient_accumulation_steps,
                            clip=tc.max_grad_norm, mixed_precision=tc.mixed_precision)
    if zero == 3 and tc.ema_decay:
        raise UserError("train.ema_decay does not work with DeepSpeed ZeRO-3 (its weights are partitioned); use "
                        "ZeRO-2 or DDP, or train.ema_decay=0")
    if zero == 3:
        no_zero_init()  # the frozen instructor and text encoder are built whole; prepare partitions the DiT
    ckpt = find_checkpoint(out, cfg.resume, cfg)  # before anything is written: a different recipe is refused
    if ckpt is not None:
        check_resume(ckpt, accelerator)  # DeepSpeed or not, ZeRO stage and processes as when it was written
    if accelerator.is_main_process:
        save_resolved(cfg, out)
    manifest = cfg.data.manifest
    if manifest is None:
        with accelerator.main_process_first():
            manifest = prepare_toy_manifest(cfg)
    records = read_manifest(manifest, "pairs")
    if zero == 3:
        check_zero3_forwards(records, per_micro)
    dataset = PairDataset(records, frames=cfg.data.frames, size=cfg.data.size)
    sampler = MixedBatchSampler(dataset.is_image, tc.batch_size // tc.gradient_accumulation_steps,
                                cfg.data.p_video, tc.seed)

    editor = build_editor(cfg.model, device=accelerator.device)
    from .model import VivaEditor

    if not isinstance(editor, VivaEditor):  # a hub id of another editor (local ones are refused before any work)
        raise UserError(f"model.pretrained={cfg.model.pretrained}: a {type(editor).__name__}; viva_base.sft trains "
                        "the VIVA editor only: post-train Lucy-Edit with Edit-GRPO (recipes/lucy_grpo.yaml)")
    check_frame_counts(records, dataset.model_frames(), editor, "training pairs")
    warn_changed_aspect(records, dataset.shapes, cfg.data.size, "training pairs")
    model_dtype = DTYPES[cfg.model.dtype]  # of the frozen weights; the trained ones are float32

    @contextlib.contextmanager
    def step_autocast():  # accelerate's mixed precision, bf16 frozen x fp32 trained weights, as the training step
        with accelerator.autocast(), compute_autocast(accelerator.device, model_dtype):
            yield

    validator = None
    if cfg.validation.manifest is not None:
        from .validation import Validator

        validator = Validator(cfg.validation, frames=cfg.data.frames, size=cfg.data.size,
                              out_dir=out / "validation",
                              loss_options={"w_m": tc.w_m, "loss_weighting": tc.loss_weighting,
                                            "loss_weight_cap": tc.loss_weight_cap,
                                            "mask_normalization": tc.mask_normalization})
        check_frame_counts(validator.records, validator.dataset.model_frames(), editor, "validation pairs")
    torch.manual_seed(tc.seed)  # a LoRA's init draws from the global generator
    params = set_trainable(editor, tc, cfg.lora)
    n_trainable = sum(p.numel() for p in params)  # before ZeRO-3 partitions them
    optimizer = torch.optim.AdamW(params, lr=tc.learning_rate, betas=(tc.adam_beta1, tc.adam_beta2),
                                  weight_decay=tc.weight_decay, fused=tc.fused_optimizer or None)
    from diffusers.optimization import get_scheduler

    lr_scheduler = get_scheduler(tc.lr_scheduler, optimizer, num_warmup_steps=tc.warmup_steps,
                                 num_training_steps=tc.max_steps)
    ema = make_ema(editor.transformer, tc.ema_decay)
    start = 0
    if ckpt is not None:
        start = load_checkpoint(ckpt, model=editor.transformer, lr_scheduler=lr_scheduler,
                                optimizer=optimizer if zero is None else DeepSpeedOptimizerState())["step"]
        if ema is not None:
            load_ema(ema, editor.transformer, ckpt, start)
        logger.info("resumed from %s at step %d", ckpt, start)
    features = None
    if cfg.data.precompute:  # the frozen encoders' outputs, once per pair, under the step's autocast
        with step_autocast():
            features = PrecomputedPairs(editor, dataset, progress=accelerator.is_main_process)
    dit_raw = editor.transformer
    compile_dit(dit_raw, tc.compile)  # in place: the same module and parameter names
    dit, optimizer, lr_scheduler = accelerator.prepare(dit_raw, optimizer, lr_scheduler)
    if ckpt is not None and zero is not None:  # every rank's ZeRO partition of the optimizer state
        load_engine_state(dit, ckpt)
    editor.dit_forward = dit
    init_trackers(accelerator, "viva_sft", cfg)
    metrics = MetricsFile(out / "metrics.jsonl", resume_step=start, enabled=accelerator.is_main_process)
    shift = tc.shift if tc.shift is not None else editor.config.shift
    logger.info("SFT: %d pairs (%d video, %d image), %d trainable parameters, steps %d -> %d on %d process(es)",
                len(dataset), len(sampler.video_idx), len(sampler.image_idx), n_trainable, start,
                tc.max_steps, world)

    def validate(at: int) -> None:
        validator.run(editor, dit, step=at, accelerator=accelerator, lockstep=world > 1 and zero == 3, ema=ema,
                      params=params, autocast=step_autocast)

    if validator is not None and cfg.validation.at_start and start == 0:
        validate(0)

    dit.train()
    max_norm = clip_norm(tc.max_grad_norm)  # 0: no clipping, as DeepSpeed reads it
    loss_mean = float("nan")
    bar = tqdm(range(start, tc.max_steps), initial=start, total=tc.max_steps, desc="sft",
               disable=not accelerator.is_main_process)
    micro_batches = MicroBatches(sampler, start, tc.max_steps, tc.gradient_accumulation_steps, rank, per_micro)
    loaded = pair_batches(dataset, micro_batches, cfg.data.num_workers) if features is None else None
    for step in bar:
        t_step, losses = time.time(), []
        for micro in range(tc.gradient_accumulation_steps):
            k = (step - start) * tc.gradient_accumulation_steps + micro
            batch = {"index": micro_batches[k]} if features is not None else next(loaded)
            with accelerator.accumulate(dit), accelerator.autocast():
                with compute_autocast(accelerator.device, model_dtype):  # bf16 frozen x fp32 trained weights
                    loss = sft_loss(editor, batch, step_generator(tc.seed, step, micro, rank), w_m=tc.w_m,
                                    cfg_dropout=tc.cfg_dropout, timestep_sampling=tc.timestep_sampling, shift=shift,
                                    loss_weighting=tc.loss_weighting, loss_weight_cap=tc.loss_weight_cap,
                                    mask_normalization=tc.mask_normalization, pooled_dropout=tc.pooled_dropout,
                                    features=features)
                # DeepSpeed: backward runs the engine, which steps (clipping first) at the last micro-batch; then
                # clip_grad_norm_ only returns the norm it clipped, and optimizer.step / zero_grad are no-ops
                accelerator.backward(loss)
                grad_norm = accelerator.clip_grad_norm_(params, max_norm) if accelerator.sync_gradients else None
                optimizer.step()
                if accelerator.sync_gradients:  # once per optimizer step (make_accelerator)
                    lr_scheduler.step()
                    if ema is not None:
                        ema.step(params)
                optimizer.zero_grad(set_to_none=True)
            losses.append(loss.detach())
        loss_mean = accelerator.reduce(torch.stack(losses).mean().to(accelerator.device), reduction="mean").item()
        if not math.isfinite(loss_mean):
            raise RuntimeError(f"SFT loss became {loss_mean} at step {step + 1}; lower train.learning_rate")
        row = {"step": step + 1, "loss": loss_mean, "lr": lr_scheduler.get_last_lr()[0],
               "grad_norm": float(grad_norm) if grad_norm is not None else None, "seconds": time.time() - t_step}
        if (step + 1) % tc.log_every == 0:
            accelerator.log({k: v for k, v in row.items() if v is not None and k != "step"}, step=step + 1)
            metrics.write(row)
        bar.set_postfix(loss=f"{loss_mean:.4f}")
        if validator is not None and validator.due(step + 1, tc.max_steps):  # before the checkpoint: a run killed
            validate(step + 1)  # between the two validates this step again when it resumes
        if (tc.checkpoint_every and (step + 1) % tc.checkpoint_every == 0) or step + 1 == tc.max_steps:
            save_state(accelerator, out, step + 1, engine=dit, model=dit_raw, optimizer=optimizer,
                       lr_scheduler=lr_scheduler, keep=tc.keep_checkpoints, config=cfg,
                       extra={EMA_FILE: ema_state(ema, dit_raw)} if ema is not None else None)
    accelerator.wait_for_everyone()
    final = out / "final"
    whole = full_parameters(accelerator, dit_raw) if zero is not None else None  # collective: every rank
    # the others wait for the save by polling a file (a 13B editor can take longer than NCCL's 10-minute
    # timeout), then every process tears the process group down together: a process that left while the main
    # one was still saving once died of SIGABRT in its teardown (CI, ZeRO-3 on CPUs)
    with main_process_first_polled(accelerator, out):
        if accelerator.is_main_process:
            transformer = accelerator.unwrap_model(dit)
            if whole is not None:  # the fp32 master weights (and frozen ones gathered), not ZeRO-3's partitions
                restore_parameters(transformer, whole)
            if ema is not None:  # the editor is the average of the weights, as diffusers' training scripts save it
                ema.copy_to(p for p in transformer.parameters() if p.requires_grad)
            if tc.trainable == "lora":
                from .peft_utils import merge_lora

                transformer = merge_lora(transformer)
            editor.transformer, editor.dit_forward = transformer.to(model_dtype), None
            card = sft_card(cfg, name=repo_id or str(final), title=repo_id or out.resolve().name, steps=tc.max_steps,
                            loss=loss_mean, seconds=time.time() - t0, processes=world, pairs=len(records),
                            editor_class=type(editor).__name__, resumed_at=start,
                            validation=validation_history(out / "validation") if validator is not None else None)
            editor.save_pretrained(final, files=card_files(card, cfg))
            logger.info("SFT done in %.1f s; editor written to %s", time.time() - t0, final)
            print(f"SFT finished: {tc.max_steps} steps, last loss {loss_mean:.4f}, "
                  f"editor in {final}")
    accelerator.end_training()
    if repo_id is not None and accelerator.is_main_process:
        push_folder(cfg.hub, repo_id, final, "SFT editor")
    return final


def cli(argv=None) -> int:
    from .training import resume_hint

    return run_cli(main, SFTConfig, argv, interrupted=resume_hint)


if __name__ == "__main__":
    from viva_base.errors import exit_with

    exit_with(cli)
