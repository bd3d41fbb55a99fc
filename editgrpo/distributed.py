"""Multi-process plumbing specific to the Edit-GRPO recipe. What both recipes share under DeepSpeed (filling the
config's "auto" keys, ZeRO-3 partitioning only the DiT, checkpoints with every rank's optimizer partition) is in
``viva_base.distributed``."""
from __future__ import annotations

import math

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
    """ZeRO-3 gathers the DiT's weights from every process at every forward, so all processes must run the same
    number of forwards. A batch mixing prompts with and without a reference image runs two (different token counts,
    ``VivaEditor.velocity``) and the processes would wait on each other for ever: refuse, before any work, a prompt
    manifest that could mix them in a rollout or training micro-batch (SFT: ``viva_base.sft.check_zero3_forwards``;
    held-out evaluation never mixes them: ``Evaluator.batches``)."""
    with_ref = sum(bool(r.get("reference")) for r in records)
    if max(rollout_bs, train_bs) > 1 and 0 < with_ref < len(records):
        raise UserError(f"under ZeRO-3 every process must run the same DiT forwards, and {with_ref} of the "
                        f"{len(records)} prompts have a reference image: set sampling.rollout_batch_size=1 and "
                        "train.train_batch_size=1, give all or no prompts a reference, or use ZeRO-2")
