"""Multi-process and DeepSpeed plumbing of the Edit-GRPO recipe (accelerate launch --config_file
recipes/accelerate/zero*.yaml): the engine steps the optimizer itself at the last backward pass of an
update, ZeRO-3 partitions only the DiT, and checkpoints carry every rank's optimizer partition."""
from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path

from viva_base.errors import UserError
from viva_base.training import save_checkpoint


def deepspeed_stage(accelerator) -> int | None:
    """The ZeRO stage when launched with a DeepSpeed accelerate config, else None."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return None if plugin is None else int(plugin.zero_stage)


def backward_passes(cfg, n_local: int, train_bs: int, n_steps: int) -> int:
    """Backward passes per optimizer step (micro-batches x trained steps): DeepSpeed's gradient accumulation."""
    tc = cfg.train
    mb_size = math.ceil(n_local / tc.minibatches_per_iteration)
    sizes = [min(n_local, s + mb_size) - s for s in range(0, n_local, mb_size)]
    micro = {math.ceil(n / train_bs) for n in sizes}
    if len(micro) != 1:
        raise UserError(f"with DeepSpeed every minibatch needs the same number of micro-batches: make the "
                        f"{n_local} samples per process divisible by train.minibatches_per_iteration x train.train_batch_size")
    return micro.pop() * n_steps


def configure_deepspeed(accelerator, *, micro_batch: int, accumulation: int, clip: float) -> None:
    """Fill the DeepSpeed config's "auto" batch keys from the recipe (no dataloader passes through prepare)."""
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    world = accelerator.num_processes
    for key, value in (("train_micro_batch_size_per_gpu", micro_batch), ("gradient_accumulation_steps", accumulation),
                       ("train_batch_size", micro_batch * accumulation * world), ("gradient_clipping", clip)):
        if ds.get(key, "auto") == "auto":
            ds[key] = value
        elif ds[key] != value:
            raise UserError(f"the DeepSpeed config sets {key}={ds[key]} but this recipe needs {value}; set it to \"auto\"")


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


def save_state(accelerator, out: Path, step: int, *, engine, model, optimizer, lr_scheduler, keep, params,
               config=None) -> None:
    """Write ``checkpoint-<step>`` (viva_base.training.save_checkpoint, main process). Under DeepSpeed every rank
    first writes its optimizer partition with ``engine.save_checkpoint`` (moved into ``checkpoint-<step>/deepspeed``),
    and ZeRO-3 gathers the trainable weights for the main process to save."""
    accelerator.wait_for_everyone()
    if deepspeed_stage(accelerator) is None:
        if accelerator.is_main_process:
            save_checkpoint(out, step, model=model, optimizer=optimizer, lr_scheduler=lr_scheduler, keep=keep,
                            config=config)
        return
    staging = out / f".deepspeed-{step}"
    engine.save_checkpoint(str(staging), tag="state", exclude_frozen_parameters=True)
    accelerator.wait_for_everyone()
    with gathered(accelerator, params):
        if accelerator.is_main_process:
            path = save_checkpoint(out, step, model=model, optimizer=DeepSpeedOptimizerState(),
                                   lr_scheduler=lr_scheduler, keep=keep, config=config)
            os.replace(staging, path / "deepspeed")
    accelerator.wait_for_everyone()


