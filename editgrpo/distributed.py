"""Multi-process plumbing specific to the Edit-GRPO recipe. What both recipes share under DeepSpeed (filling the
config's "auto" keys, ZeRO-3 partitioning only the DiT, checkpoints with every rank's optimizer partition) is in
``viva_base.distributed``."""
from __future__ import annotations

import math

from viva_base.distributed import refuse_mixed_references
from viva_base.errors import UserError


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


def check_reference_forwards(records: list[dict], rollout_bs: int, train_bs: int) -> None:
    """Under ZeRO-3, refuse before any work a prompt manifest whose prompts with and without a reference image could
    meet in a rollout or training micro-batch (``viva_base.distributed.refuse_mixed_references``; SFT:
    ``viva_base.sft.check_zero3_forwards``; held-out evaluation never mixes them: ``Evaluator.batches``)."""
    refuse_mixed_references(records, max(rollout_bs, train_bs), "prompts", "set sampling.rollout_batch_size=1 and "
                            "train.train_batch_size=1, give all or no prompts a reference, or use ZeRO-2")
