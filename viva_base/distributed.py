"""DeepSpeed plumbing both training recipes share (``viva_base.sft`` and ``editgrpo.train``, launched with
``accelerate launch --config_file recipes/accelerate/zero*.yaml``).

* the recipe fills the DeepSpeed config's "auto" batch keys (:func:`configure_deepspeed`): no dataloader passes
  through ``accelerator.prepare``, so accelerate cannot;
* the engine accumulates gradients, clips them and steps the optimizer itself, at the backward pass accelerate
  marks as the accumulation boundary (``accelerator.sync_gradients``); ``accelerator.clip_grad_norm_`` then only
  reads the norm and ``optimizer.step()`` is a no-op;
* under ZeRO-3 only the DiT is partitioned (by ``accelerator.prepare``): the frozen instructor, text encoder, VAE
  and reward models are built whole (:func:`no_zero_init`);
* a checkpoint carries every rank's ZeRO partition of the optimizer state in ``checkpoint-<step>/deepspeed``
  (the engine's own format), next to the trainable weights gathered whole from the fp32 master weights
  (:func:`save_state`), and resumes from it exactly (:func:`check_resume`, :func:`load_engine_state`).
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import torch

from .errors import UserError
from .training import save_checkpoint

DEEPSPEED_DIR = "deepspeed"  # checkpoint-<step>/deepspeed: the engine's files (every rank's partition)
ENGINE_TAG = "state"


def deepspeed_stage(accelerator) -> int | None:
    """The ZeRO stage when launched with a DeepSpeed accelerate config, else None."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return None if plugin is None else int(plugin.zero_stage)


def refuse_mixed_references(records: list[dict], batch: int, items: str, fix: str) -> None:
    """ZeRO-3 gathers the DiT's weights from every process at every forward, so all processes must run the same
    number of forwards. A batch mixing ``items`` with and without a reference image runs two (different token
    counts, ``VivaEditor.velocity``) and the processes would wait on each other for ever: refuse ``records`` that
    could be mixed in a batch of ``batch``, with one line ending in ``fix``."""
    with_ref = sum(bool(r.get("reference")) for r in records)
    if batch > 1 and 0 < with_ref < len(records):
        raise UserError(f"under ZeRO-3 every process must run the same DiT forwards, and {with_ref} of the "
                        f"{len(records)} {items} have a reference image: {fix}")


def configure_deepspeed(accelerator, *, micro_batch: int, accumulation: int, clip: float,
                        mixed_precision: str | None = None) -> None:
    """Fill the DeepSpeed config's "auto" batch keys from the recipe (no dataloader passes through prepare):
    micro-batch per GPU, gradient accumulation steps, their product with the processes (``train_batch_size``) and
    the clipping norm. A key the config sets to another value is a UserError naming both values; so is a
    ``bf16``/``fp16`` ``enabled`` the config sets against the recipe's ``train.mixed_precision`` (accelerate fills
    "auto" from it, but lets a fixed value win silently)."""
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    world = accelerator.num_processes
    for key, value in (("train_micro_batch_size_per_gpu", micro_batch), ("gradient_accumulation_steps", accumulation),
                       ("train_batch_size", micro_batch * accumulation * world), ("gradient_clipping", clip)):
        if ds.get(key, "auto") == "auto":
            ds[key] = value
        elif ds[key] != value:
            raise UserError(f"the DeepSpeed config sets {key}={ds[key]} but this recipe needs {value}; set it to \"auto\"")
    if mixed_precision is not None:
        for dtype in ("bf16", "fp16"):
            enabled = str(ds.get(dtype, {}).get("enabled", "auto")).lower()
            if enabled != "auto" and (enabled == "true") != (mixed_precision == dtype):
                raise UserError(f"the DeepSpeed config sets {dtype}.enabled={enabled} but the recipe has "
                                f"train.mixed_precision={mixed_precision}; set it to \"auto\"")


class DeepSpeedOptimizerState:
    """Stands in for the optimizer in save/load_checkpoint under DeepSpeed: every rank's ZeRO partition of the
    optimizer state is in ``checkpoint-<step>/deepspeed`` (the engine's own format), not in optimizer.pt."""

    def state_dict(self):
        return {"deepspeed": "see deepspeed/"}

    def load_state_dict(self, state):
        pass


def no_zero_init() -> None:
    """ZeRO-3: accelerate's DeepSpeed config makes transformers build every model under ``deepspeed.zero.Init``
    (partitioned at construction). Only the DiT is partitioned here (by ``accelerator.prepare``); the frozen
    instructor, text encoder and reward models are built whole."""
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()


def gathered(accelerator, params):
    """ZeRO-3: a context holding the full (unpartitioned) ``params`` on every rank (collective); else a no-op."""
    if deepspeed_stage(accelerator) == 3:
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    return contextlib.nullcontext()


def full_parameters(accelerator, module: torch.nn.Module, *, trainable_only: bool = False) -> dict | None:
    """Every parameter of a DeepSpeed-prepared ``module`` whole, on the main process's CPU (None on the others).

    Trainable parameters come from the optimizer's float32 master weights (``safe_get_full_fp32_param``: under
    bf16 the module itself only holds bf16 copies), frozen ones from the module (gathered from their partitions
    under ZeRO-3). One parameter at a time, so no rank ever holds more than one whole parameter beyond its
    partitions (a 13B DiT is never gathered at once). A collective: every rank must call it."""
    from deepspeed.utils import safe_get_full_fp32_param

    zero3 = deepspeed_stage(accelerator) == 3
    out = {} if accelerator.is_main_process else None
    for name, p in module.named_parameters():
        if trainable_only and not p.requires_grad:
            continue
        with contextlib.nullcontext() if p.requires_grad else gathered(accelerator, [p]):
            full = safe_get_full_fp32_param(p) if p.requires_grad else p.detach()  # collectives
            if out is not None:
                out[name] = full.cpu().reshape(p.ds_shape if zero3 else p.shape).clone()
    return out


def restore_parameters(module: torch.nn.Module, weights: dict) -> torch.nn.Module:
    """Put whole ``weights`` (:func:`full_parameters`: the trainable ones float32, as outside DeepSpeed) back into
    ``module`` in place, so that it saves and merges like an ordinary module. Only for a module whose training is
    over: under ZeRO-3 its parameters stop being partitions."""
    for name, p in module.named_parameters():
        p.data = weights[name]
    return module


def engine_state(accelerator) -> dict:
    """What a DeepSpeed checkpoint records of its layout: ``{"stage": ZeRO stage, "world": processes}``."""
    return {"stage": deepspeed_stage(accelerator), "world": accelerator.num_processes}


def check_resume(ckpt: Path, accelerator) -> None:
    """Refuse, in one line, a resume the engine could not continue exactly: a checkpoint written without DeepSpeed
    resumed under it (no optimizer partitions) or the reverse, or one written with another ZeRO stage or number
    of processes (the partitions are per rank)."""
    stage = deepspeed_stage(accelerator)
    has_engine = (ckpt / DEEPSPEED_DIR).is_dir()
    written = json.loads((ckpt / "trainer_state.json").read_text()).get("deepspeed")
    if stage is not None and not has_engine:
        raise UserError(f"{ckpt} has no {DEEPSPEED_DIR}/ optimizer state (written by a non-DeepSpeed run, or cut "
                        "short); resume it without DeepSpeed, or delete it to resume from the one before")
    if stage is None and (has_engine or written):
        raise UserError(f"{ckpt} was written under DeepSpeed (its optimizer state is in {DEEPSPEED_DIR}/): resume it "
                        "with the same accelerate --config_file")
    now = engine_state(accelerator)
    if stage is not None and written and written != now:
        raise UserError(f"{ckpt} was written with ZeRO-{written['stage']} on {written['world']} processes; this run "
                        f"is ZeRO-{now['stage']} on {now['world']}: resume with the same accelerate config and "
                        "--num_processes")


def load_engine_state(engine, ckpt: Path) -> None:
    """Every rank's ZeRO partition of the optimizer state (and the fp32 master weights) from ``ckpt`` (after
    ``accelerator.prepare``). The lr schedule is not the engine's: it is restored from scheduler.pt."""
    engine.load_checkpoint(str(ckpt / DEEPSPEED_DIR), tag=ENGINE_TAG, load_module_strict=False,
                           load_lr_scheduler_states=False)


def save_state(accelerator, out: Path, step: int, *, engine, model, optimizer, lr_scheduler, keep, config=None,
               extra: dict | None = None) -> None:
    """Write ``checkpoint-<step>`` (viva_base.training.save_checkpoint, main process). Under DeepSpeed every rank
    first writes its optimizer partition with ``engine.save_checkpoint`` (moved into ``checkpoint-<step>/deepspeed``),
    the trainable weights are gathered from the fp32 master weights (:func:`full_parameters`), and a LoRA (small)
    is gathered whole for its own folder."""
    accelerator.wait_for_everyone()
    if deepspeed_stage(accelerator) is None:
        if accelerator.is_main_process:
            save_checkpoint(out, step, model=model, optimizer=optimizer, lr_scheduler=lr_scheduler, keep=keep,
                            config=config, extra=extra)
        return
    staging = out / f".deepspeed-{step}"
    engine.save_checkpoint(str(staging), tag=ENGINE_TAG, exclude_frozen_parameters=True)
    accelerator.wait_for_everyone()
    weights = full_parameters(accelerator, model, trainable_only=True)
    lora = [p for n, p in model.named_parameters() if p.requires_grad and "lora_" in n]
    with gathered(accelerator, lora) if hasattr(model, "peft_config") else contextlib.nullcontext():
        if accelerator.is_main_process:
            path = save_checkpoint(out, step, model=model, optimizer=DeepSpeedOptimizerState(), weights=weights,
                                   lr_scheduler=lr_scheduler, keep=keep, config=config, extra=extra,
                                   state={"deepspeed": engine_state(accelerator)})
            os.replace(staging, path / DEEPSPEED_DIR)
    accelerator.wait_for_everyone()


def share_out(n_items: int, rank: int, world: int, *, lockstep: bool) -> tuple[list[int], int]:
    """Process ``rank``'s items of ``range(n_items)`` (``rank, rank + world, ...``) and how many of them count.
    ``lockstep`` (DeepSpeed ZeRO-3, whose every DiT forward gathers its parameters from all processes, so every
    process must run as many as the others): padded to ``ceil(n_items / world)`` with repeats of one of its own
    (item 0 when it has none), whose results the caller drops. The SFT's validation and Edit-GRPO's evaluation share
    their work this way."""
    mine = list(range(rank, n_items, world))
    n_real = len(mine)
    if lockstep and n_items:
        mine += [mine[-1] if mine else 0] * (-(-n_items // world) - n_real)
    return mine, n_real
