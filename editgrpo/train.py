"""Edit-GRPO: post-train an edit policy with Group Relative Policy Optimization (VIVA section 3.3).

    python -m editgrpo.train recipe=recipes/tiny.yaml [key=value ...]
    accelerate launch --num_processes N -m editgrpo.train recipe=recipes/viva.yaml

Per iteration (docs/architecture.md):
  1. pick ``prompts_per_iteration`` prompts; build each one's condition ONCE (VLM, pooled text, source
     latents, and the unconditional condition for CFG);
  2. roll out ``num_generations`` samples per prompt with the SDE sampler, recording the trained steps;
  3. decode and score them with the reward registry (every component logged);
  4. group-relative advantages over the whole group, gathered across processes (eq. 11);
  5. update the LoRA: recompute each trained step's log-prob with grad, clipped-ratio surrogate
     (eq. 13) + beta * KL to the reference policy (the same DiT with the adapter disabled).
With ``train.algorithm: nft | awm`` (forward-process RL, docs/algorithms.md) steps 1-4 are the same (rollouts
may be ODE: ``sampling.method: ode``) and step 5 trains on each rollout's final latent re-noised at
``train.forward_timesteps`` noise levels: DiffusionNFT's or AWM's loss (editgrpo/grpo.py) + beta * velocity KL.
Outputs: ``output_dir/checkpoint-<it>/`` (LoRA in diffusers + peft formats, optimizer, scheduler, state),
``metrics.jsonl`` (one object per iteration), ``config.yaml``, tensorboard logs, ``lora/`` (final adapter).
"""
from __future__ import annotations

import logging
import math
import time
from contextlib import nullcontext
from collections import defaultdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from rewards.remote import RemoteRewardError
from viva_base.atomic import atomic_dir
from viva_base.data.pairs import check_frame_counts, warn_changed_aspect
from viva_base.distributed import (DeepSpeedOptimizerState, check_resume, configure_deepspeed, deepspeed_stage,
                                   gathered, load_engine_state, no_zero_init, save_state)
from viva_base.errors import UserError
from viva_base.hub import card_files, check_hub, eval_results, lora_card, push_folder, write_files
from viva_base.peft_utils import add_lora, save_lora
from viva_base.recipe import run_cli, save_resolved
from viva_base.training import (MetricsFile, build_editor, clip_norm, compile_dit, find_checkpoint, init_trackers,
                                load_checkpoint, log_videos, main_process_first_polled, make_accelerator,
                                step_generator)

from .config import GRPOConfig, validate_config
from .distributed import backward_passes, check_reference_forwards
from .grpo import (FORWARD_ALGORITHMS, awm_loss, component_advantages, gather_for_advantages, group_advantages,
                   nft_loss, policy_loss, step_kl, velocity_kl)
from .prompts import PromptSource
from .rollout import forward_records, forward_velocity, reference_mean, rollout, step_log_prob
from .scoring import ChunkScorer
from .sampling import sde_step_indices, sde_window_at, sigma_schedule

logger = logging.getLogger("editgrpo.train")


def sample_seed(seed: int, iteration: int, sample: int) -> int:
    """The noise seed of global sample ``sample`` of ``iteration`` (independent of process layout)."""
    return ((seed * 1_000_003 + iteration) * 65_537 + sample) % (2 ** 63 - 1)


def group_seed(seed: int, iteration: int, group: int) -> int:
    """The seed of group ``group``'s shared initial noise (``sampling.share_prefix``); never a sample's seed."""
    return sample_seed(seed, iteration, 2 ** 40 + group)


def choose_steps(cfg, sigmas: torch.Tensor, iteration: int) -> tuple[tuple[int, int] | None, list[int]]:
    """The SDE window of this iteration (same on every process) and the steps to train."""
    sc = cfg.sampling
    if sc.method == "ode":  # deterministic rollouts (nft / awm): no SDE step, nothing recorded
        return None, []
    window = None
    if sc.sde_window_size:
        rng = tuple(sc.sde_window_range) if sc.sde_window_range else None
        window = sde_window_at(len(sigmas) - 1, sc.sde_window_size, start_range=rng,
                               generator=step_generator(cfg.train.seed, iteration, stream=1))
    sde = list(sde_step_indices(sigmas, "sde", window))
    if sc.train_steps and sc.train_steps < len(sde):
        pick = torch.randperm(len(sde), generator=step_generator(cfg.train.seed, iteration, stream=2))[: sc.train_steps]
        sde = sorted(sde[int(i)] for i in pick)
    return window, sde


def minibatches(n_local: int, minibatches_per_iteration: int, order: list[int] | None = None) -> list[list[int]]:
    """This process's samples ``0..n_local-1`` (in ``order``, default ascending) split into the inner epoch's
    minibatches (one optimizer step each): ``ceil(n_local / m)`` samples each, so there may be fewer than ``m``
    (4 samples, m = 3: sizes 2, 2)."""
    order = list(range(n_local)) if order is None else list(order)
    size = math.ceil(n_local / minibatches_per_iteration)
    return [order[s:s + size] for s in range(0, n_local, size)]


def epoch_order(seed: int, iteration: int, epoch: int, num_inner_epochs: int, rank: int, n_local: int,
                world: int) -> list[int]:
    """The order of this process's samples in inner epoch ``epoch``: ascending with one inner epoch (the shipped
    behaviour); with several, every epoch reshuffles them across minibatches. The shuffle is one permutation of
    the iteration's ``world x n_local`` global samples, seeded by ``(seed, iteration, epoch)``
    (``step_generator``), of which each process keeps its own samples in that order: a resumed run draws the same
    orders, and the order does not depend on the number of processes."""
    if num_inner_epochs == 1:
        return list(range(n_local))
    # stream 3 (0-2: prompts, SDE window, trained steps); the epoch takes step_generator's last coordinate
    perm = torch.randperm(world * n_local, generator=step_generator(seed, iteration, stream=3, rank=epoch))
    lo = rank * n_local
    return [int(g) - lo for g in perm if lo <= int(g) < lo + n_local]


def trained_microbatches(micro: list[list[int]], adv: torch.Tensor, valid: torch.Tensor, beta: float, *,
                         accelerator=None, deepspeed: bool = False) -> list[list[int]]:
    """The micro-batches of a minibatch whose training forwards can change the update.

    A sample whose advantage is 0 (a zero-variance group) has zero surrogate gradient, and with ``beta = 0`` no KL
    term either; an invalid sample (NaN reward) has neither. A micro-batch of only such samples adds exactly zero
    to the gradient, so its forwards (policy and KL reference) and backward are skipped. The loss weights stay
    those of the whole minibatch (``valid samples / valid samples of the minibatch on all processes``), so the
    gradient is the same. With ``beta > 0`` zero-advantage samples still train (their KL gradient).

    On several processes (DDP) the decision is reduced over the processes: a micro-batch index is skipped only if
    it is skipped on every process, so all run the same backward passes and the same final gradient sync. Under
    DeepSpeed (``deepspeed=True``) nothing is skipped: its engine counts ``gradient_accumulation_steps`` backward
    passes per optimizer step (fixed in its config), so every micro-batch runs as before.
    """
    if deepspeed:
        return micro
    needed = torch.tensor([bool((valid[ids] & ((adv[ids] != 0) | (beta > 0))).any()) for ids in micro],
                          dtype=torch.float32)
    if accelerator is not None and accelerator.num_processes > 1:
        needed = accelerator.reduce(needed.to(accelerator.device), "sum").cpu()
    return [ids for ids, n in zip(micro, needed.tolist()) if n > 0]


def grpo_loss(cfg, editor, dit_raw, rec, rows: torch.Tensor, sel: torch.Tensor, cond, uncond, adv: torch.Tensor,
              valid: torch.Tensor):
    """The Edit-GRPO loss on the recorded SDE step ``rec`` (a :class:`~editgrpo.sampling.StepRecord`) of samples
    ``sel`` (prompts ``rows``): the step's log-prob recomputed with grad, the clipped surrogate (eq. 13) and, when
    ``beta > 0``, the KL to the reference step (adapter disabled, no grad)."""
    tc, sc = cfg.train, cfg.sampling
    step = step_log_prob(editor, rec, rows, cond, uncond, guidance_scale=sc.guidance_scale, method=sc.method,
                         eta=sc.eta, sample_index=sel, log_prob=sc.log_prob, cfg_grad=tc.cfg_grad,
                         guidance_interval=sc.guidance_interval)
    kl = None
    if tc.beta > 0:
        ref = reference_mean(editor, dit_raw, rec, rows, cond, uncond, guidance_scale=sc.guidance_scale,
                             method=sc.method, eta=sc.eta, sample_index=sel, guidance_interval=sc.guidance_interval)
        kl = step_kl(step.mean, ref, step.std, sigma=rec.sigma[sel], sigma_next=rec.sigma_next[sel], method=sc.method,
                     kl_type=tc.kl_type)
    dev = step.log_prob.device
    return policy_loss(step.log_prob, rec.log_prob[sel].to(dev), adv.to(dev), tc.epsilon, kl=kl, beta=tc.beta,
                       valid=valid.to(dev))


def _old_velocities(cfg, editor, records, rows: torch.Tensor, cond, uncond, n_local: int, train_bs: int) -> None:
    """NFT: set each record's ``old_velocity``, the current (rollout) policy's velocity on all local re-noised
    samples, in micro-batches of ``train_bs``, no grad: one forward per sample and record, before any update."""
    gs = 1.0 if cfg.train.cfg_free else cfg.sampling.guidance_scale
    with torch.no_grad():
        for rec in records:
            parts = [forward_velocity(editor, rec, rows[sel], cond, uncond, guidance_scale=gs, sample_index=sel,
                                      guidance_interval=cfg.sampling.guidance_interval)
                     for sel in (torch.arange(i, min(n_local, i + train_bs)) for i in range(0, n_local, train_bs))]
            rec.old_velocity = torch.cat(parts)


def forward_loss(cfg, editor, dit_raw, rec, rows: torch.Tensor, sel: torch.Tensor, cond, uncond, adv: torch.Tensor,
                 valid: torch.Tensor):
    """The loss of ``train.algorithm`` nft / awm on the re-noised samples ``sel`` (prompts ``rows``) of ``rec``
    (a :class:`~editgrpo.rollout.ForwardRecord`): one policy forward with grad, one reference forward (adapter
    disabled, no grad) when ``beta > 0``. ``adv`` and ``valid`` are the samples' ``[B]`` advantages and flags."""
    tc = cfg.train
    gs = 1.0 if tc.cfg_free else cfg.sampling.guidance_scale
    gi = cfg.sampling.guidance_interval
    v = forward_velocity(editor, rec, rows, cond, uncond, guidance_scale=gs, sample_index=sel, cfg_grad=tc.cfg_grad,
                         guidance_interval=gi)
    dev = v.device
    kl = None
    if tc.beta > 0:
        kl = velocity_kl(v, forward_velocity(editor, rec, rows, cond, uncond, guidance_scale=gs, sample_index=sel,
                                             dit=dit_raw, guidance_interval=gi))
    target, adv, valid = rec.target[sel].to(dev), adv.to(dev), valid.to(dev)
    if tc.algorithm == "awm":
        return awm_loss(v, target, adv, kl=kl, beta=tc.beta, valid=valid)
    v_old = v.detach() if rec.old_velocity is None else rec.old_velocity[sel].to(dev)
    return nft_loss(v, v_old, target, rec.sigma[sel].to(dev), adv, nft_beta=tc.nft_beta, adv_max=tc.advantage_clip,
                    kl=kl, beta=tc.beta, valid=valid)


def main(cfg: GRPOConfig) -> Path:
    t_start = time.time()
    validate_config(cfg)  # before any expensive work: data, editor, reward models
    repo_id = check_hub(cfg.hub, cfg.output_dir)  # the main process creates the hub repo now: a bad token fails fast
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    tc, sc = cfg.train, cfg.sampling
    accelerator = make_accelerator(str(out), report_to=cfg.report_to, mixed_precision=tc.mixed_precision)
    rank, world = accelerator.process_index, accelerator.num_processes
    G, P = tc.num_generations, tc.prompts_per_iteration
    n_total = P * G
    if n_total % world:
        raise UserError(f"prompts_per_iteration x num_generations = {n_total} must be divisible by the {world} processes")
    n_local = n_total // world
    rollout_bs = sc.rollout_batch_size or min(G, n_local)
    train_bs = tc.train_batch_size or rollout_bs
    zero = deepspeed_stage(accelerator)
    forward = tc.algorithm in FORWARD_ALGORITHMS
    n_back_ds = 1
    if zero is not None:  # the trained-step count does not depend on the iteration or the shift
        n_steps = tc.forward_timesteps if forward else len(choose_steps(cfg, sigma_schedule(sc.num_steps), 0)[1])
        n_back_ds = backward_passes(cfg, n_local, train_bs, n_steps)
    if zero == 3:  # (held-out evaluation keeps the processes' DiT forwards in step: Evaluator.share)
        no_zero_init()
    if zero is not None:
        configure_deepspeed(accelerator, micro_batch=train_bs, accumulation=n_back_ds, clip=tc.max_grad_norm,
                            mixed_precision=tc.mixed_precision)
    if cfg.toy.enabled:  # the toy-world chain: data, reward model and SFT editor, each cached
        from .toy import prepare

        cfg = prepare(cfg, accelerator)
    ckpt = find_checkpoint(out, cfg.resume, cfg)  # before anything is written: a different recipe is refused
    if ckpt is not None:
        check_resume(ckpt, accelerator)  # DeepSpeed or not, ZeRO stage and processes as when it was written
    if accelerator.is_main_process:
        save_resolved(cfg, out)

    # ---- prompts, policy, rewards
    with accelerator.main_process_first():
        prompts = PromptSource.from_config(cfg)
    if zero == 3:
        check_reference_forwards(prompts.records, rollout_bs, train_bs)
    editor = build_editor(cfg.model, device=accelerator.device)
    check_frame_counts(prompts.records, prompts.frame_counts(), editor, "prompts")
    warn_changed_aspect(prompts.records, prompts.shapes(), cfg.data.size, "prompts")
    torch.manual_seed(tc.seed)  # the LoRA's gaussian init draws from the global generator
    add_lora(editor.transformer, rank=cfg.lora.rank, alpha=cfg.lora.alpha, init=cfg.lora.init,
             targets=cfg.lora.targets or editor.lora_targets)
    params = [p for p in editor.transformer.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=tc.learning_rate, betas=(tc.adam_beta1, tc.adam_beta2),
                                  weight_decay=tc.weight_decay, fused=tc.fused_optimizer or None)
    from diffusers.optimization import get_scheduler

    # the optimizer steps really taken (the same on every process: n_local is), not minibatches_per_iteration
    steps_per_epoch = len(minibatches(n_local, tc.minibatches_per_iteration))
    lr_scheduler = get_scheduler(tc.lr_scheduler, optimizer, num_warmup_steps=tc.warmup_steps,
                                 num_training_steps=tc.num_iterations * tc.num_inner_epochs * steps_per_epoch)
    from rewards.registry import CombinedReward

    reward_fn = CombinedReward.from_config(cfg.rewards)
    reward_fn.load(accelerator.device)  # a missing reward model stops here, not after the first rollouts
    start = 0
    if ckpt is not None:
        start = load_checkpoint(ckpt, model=editor.transformer, lr_scheduler=lr_scheduler,
                                optimizer=optimizer if zero is None else DeepSpeedOptimizerState())["step"]
        logger.info("resumed from %s at iteration %d", ckpt, start)
    dit_raw = editor.transformer
    # in place, with its LoRA: the same module and parameter names; the reference forwards (adapter disabled) and the
    # no-grad rollouts are graphs of their own, each compiled once (compile_dit)
    compile_dit(dit_raw, tc.compile)
    dit, optimizer, lr_scheduler = accelerator.prepare(dit_raw, optimizer, lr_scheduler)
    if ckpt is not None and zero is not None:  # every rank's ZeRO partition of the optimizer state
        load_engine_state(dit, ckpt)
    editor.dit_forward = dit
    init_trackers(accelerator, "edit_grpo", cfg)
    metrics_file = MetricsFile(out / "metrics.jsonl", resume_step=start, enabled=accelerator.is_main_process)
    shift = sc.shift if sc.shift is not None else editor.config.shift
    sigmas = sigma_schedule(sc.num_steps, shift)
    evaluator = None
    if cfg.eval.manifest:
        from .evaluate import Evaluator

        evaluator = Evaluator(cfg.eval, reward_fn, out / "eval")
        from viva_base.video import probe_video

        check_frame_counts(evaluator.records, [probe_video(r["source"])[0] for r in evaluator.records], editor,
                           "evaluation prompts", setting=None)  # evaluation reads its source clips whole
        if cfg.eval.at_start and start == 0:
            _evaluate(evaluator, editor, 0, accelerator)
    logger.info("Edit-GRPO: %d prompts, %d x %d samples per iteration on %d process(es), %d LoRA parameters",
                len(prompts), P, G, world, sum(p.numel() for p in params))

    row = None  # the last iteration's metrics (for the LoRA's model card)
    bar = tqdm(range(start, tc.num_iterations), initial=start, total=tc.num_iterations, desc="edit-grpo",
               disable=not accelerator.is_main_process)
    for it in bar:
        t_it = time.time()
        # 1. prompts of this iteration; this process's samples and their prompts' conditions (once per prompt)
        chosen = prompts.choose(P, step_generator(tc.seed, it, stream=0))
        mine = list(range(rank * n_local, (rank + 1) * n_local))
        local_prompts = sorted({g // G for g in mine})
        batch = prompts.load([chosen[j] for j in local_prompts])
        with torch.no_grad():
            cond, uncond = editor.encode_condition(batch["source"].to(accelerator.device), batch["instruction"],
                                                   batch["reference"])
        prompt_index = [local_prompts.index(g // G) for g in mine]
        window, train_steps = choose_steps(cfg, sigmas, it)

        # 2. rollouts (no grad), recording the trained steps; 3. decode and score (with train.overlap_rewards each
        # finished chunk on a background thread while the next one samples: editgrpo/scoring.py)
        rows = torch.tensor(prompt_index)
        pick = lambda key: [batch[key][i] for i in prompt_index]  # noqa: E731
        scorer = ChunkScorer(editor.decode, reward_fn, source=batch["source"][rows], references=pick("reference"),
                             texts={"source_captions": pick("source_caption"), "target_captions": pick("target_caption"),
                                    "instructions": pick("instruction")},
                             groups=[g // G for g in mine], overlap=tc.overlap_rewards)
        dit.eval()
        try:
            ro = rollout(editor, cond, uncond, prompt_index, [sample_seed(tc.seed, it, g) for g in mine], sigmas,
                         mode="ode" if sc.method == "ode" else "sde", method="flow_sde" if sc.method == "ode" else sc.method,
                         eta=sc.eta, sde_window=window, train_steps=[] if forward else train_steps,
                         guidance_scale=sc.guidance_scale, guidance_interval=sc.guidance_interval,
                         batch_size=rollout_bs, log_prob=sc.log_prob, on_chunk=scorer.add if tc.overlap_rewards else None,
                         prefix_seeds=[group_seed(tc.seed, it, g // G) for g in mine] if sc.share_prefix else None)
            edited, scored = scorer.finish(ro.latents, rollout_bs)
        except RemoteRewardError as e:
            scorer.close()
            _stop_for_reward_server(e, it, accelerator, out, engine=dit, model=dit_raw, optimizer=optimizer,
                                    lr_scheduler=lr_scheduler, keep=tc.keep_checkpoints, config=cfg)
        except BaseException:
            scorer.close()
            raise
        rewards = scored.total.float().cpu()

        # 4. advantages over whole groups (gathered across processes)
        group_ids = torch.tensor([g // G for g in mine])
        acc = accelerator if world > 1 else None
        all_r, all_g, local = gather_for_advantages(acc, rewards, group_ids)
        if tc.reward_normalization == "component":
            all_c = {k: gather_for_advantages(acc, v.float().cpu(), group_ids)[0] for k, v in scored.components.items()}
            adv_out = component_advantages(all_c, scored.weights, all_g, scale=tc.scale_rewards, eps=tc.advantage_eps,
                                           clip=tc.advantage_clip)
        else:
            adv_out = group_advantages(all_r, all_g, scale=tc.scale_rewards, eps=tc.advantage_eps,
                                       clip=tc.advantage_clip)
        adv, valid = adv_out.advantages[local].float(), adv_out.valid[local]

        # 5. policy update on the recorded steps (grpo), or on the rollouts' final latents re-noised (nft / awm;
        # per global sample generators: the same noise whatever the process layout, and after a resume)
        records = ro.steps
        if forward:
            records = forward_records(ro.latents, [step_generator(tc.seed, it, stream=4, rank=g) for g in mine],
                                      tc.forward_timesteps, shift)
        dit.train()
        # NFT's v_old is the rollout policy's velocity: when the policy moves within the iteration (several optimizer
        # steps) it is computed up front, no grad; with one step it is the trained velocity itself, detached
        old_pass = tc.algorithm == "nft" and tc.num_inner_epochs * steps_per_epoch > 1
        if old_pass:
            _old_velocities(cfg, editor, records, rows, cond, uncond, n_local, train_bs)
        sums = defaultdict(float)
        n_terms = 0
        skipped = 0
        for epoch in range(tc.num_inner_epochs):
            order = epoch_order(tc.seed, it, epoch, tc.num_inner_epochs, rank, n_local, world)
            for mb in minibatches(n_local, tc.minibatches_per_iteration, order):
                n_valid = valid[mb].sum().float()
                n_valid_global = accelerator.reduce(n_valid.to(accelerator.device), "sum").item() if world > 1 else n_valid.item()
                all_micro = [mb[i:i + train_bs] for i in range(0, len(mb), train_bs)]
                # micro-batches that add exactly zero to the gradient are skipped (the same ones on every process)
                # (NFT with a precomputed v_old: a zero-advantage sample still pulls v towards v_old, as beta > 0 does)
                micro = trained_microbatches(all_micro, adv, valid, 1.0 if old_pass else tc.beta,
                                             accelerator=accelerator if world > 1 else None, deepspeed=zero is not None)
                skipped += (len(all_micro) - len(micro)) * len(records)
                n_back = len(micro) * len(records)
                assert zero is None or n_back == n_back_ds, (n_back, n_back_ds)
                if n_back == 0:  # nothing to train in this minibatch: the zero gradient it would have had
                    for p in params:
                        p.grad = torch.zeros_like(p)
                k = 0
                for ids in micro:
                    sel = torch.tensor(ids)
                    for rec in records:
                        k += 1
                        if zero is not None:  # DeepSpeed accumulates, and steps at the last backward pass
                            accelerator.sync_gradients = k == n_back
                        ctx = accelerator.no_sync(dit) if (world > 1 and k < n_back and zero is None) else nullcontext()
                        with ctx, accelerator.autocast():
                            loss_fn = forward_loss if forward else grpo_loss
                            loss, m = loss_fn(cfg, editor, dit_raw, rec, rows[sel], sel, cond, uncond, adv[sel], valid[sel])
                            # mean over the minibatch's valid samples of all processes, and over the trained steps
                            weight = valid[sel].sum().item() / max(n_valid_global, 1.0) / len(records) * world
                            weight *= n_back_ds  # DeepSpeed divides by its gradient_accumulation_steps
                            accelerator.backward(loss * weight)
                        for name, value in m.items():
                            sums[name] += float(value)
                        n_terms += 1
                grad_norm = accelerator.clip_grad_norm_(params, clip_norm(tc.max_grad_norm))
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)

        # logging: every reward component, totals, loss terms
        comp = {f"reward/{k}": _global_mean(accelerator, v) for k, v in scored.components.items()}
        row = {"step": it + 1, "reward": _global_mean(accelerator, rewards), **comp,
               "reward_std": float(torch.nan_to_num(adv_out.group_std, nan=0.0).mean()),
               "nan_rewards": int((~adv_out.valid).sum()), "zero_variance_groups": int(adv_out.zero_variance.sum()) // G,
               **{k: v / max(n_terms, 1) for k, v in sums.items()},
               "grad_norm": float(grad_norm) if grad_norm is not None else None, "skipped_forwards": skipped,
               "lr": lr_scheduler.get_last_lr()[0], "sde_window": list(window) if window else None,
               "seconds": time.time() - t_it}
        if (it + 1) % tc.log_every == 0:
            accelerator.log({k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "step"}, step=it + 1)
            metrics_file.write(row)
        bar.set_postfix(reward=f"{row['reward']:.4f}", kl=f"{row.get('kl', 0.0):.2e}")
        done = it + 1 == tc.num_iterations
        if (tc.checkpoint_every and (it + 1) % tc.checkpoint_every == 0) or done:
            # a few rollouts of this process's first group (the samples GRPO ranked), to the trackers
            log_videos(accelerator, {f"rollout/{k}": edited[k] for k in range(min(4, n_local))}, it + 1)
            save_state(accelerator, out, it + 1, engine=dit, model=dit_raw, optimizer=optimizer, lr_scheduler=lr_scheduler,
                       keep=tc.keep_checkpoints, config=cfg)
        if evaluator is not None and ((cfg.eval.every and (it + 1) % cfg.eval.every == 0) or done):
            _evaluate(evaluator, editor, it + 1, accelerator)

    final = out / "lora"
    with gathered(accelerator, params):  # ZeRO-3: the full LoRA on every rank for the save (collective)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            _save_lora_atomic(dit_raw, final, base_model=cfg.model.pretrained)
    # the others wait for the report by polling a file, then every process tears the process group down together
    # (viva_base.sft: a process leaving while the main one still wrote once died of SIGABRT in its teardown)
    with main_process_first_polled(accelerator, out):
        if accelerator.is_main_process:
            report = None
            if evaluator is not None and (out / "eval" / "step-0").exists():
                from .report import write_report

                report = write_report(out, eval_dir=out / "eval", start_step=0, final_step=tc.num_iterations,
                                      seconds=time.time() - t_start, eval_manifest=cfg.eval.manifest,
                                      diagnostics=out / "sft" / "diagnostics.json" if cfg.toy.enabled else None)
                if "delta_oracle" in report:
                    d = report["delta_oracle"]
                    print(f"held-out oracle: SFT {report['sft']['oracle']:.4f} -> GRPO {report['grpo']['oracle']:.4f} "
                          f"(delta {d['mean']:+.4f}, 95% CI [{d['ci95'][0]:+.4f}, {d['ci95'][1]:+.4f}]); "
                          f"report in {out / 'report.html'}")
            card = lora_card(cfg, name=repo_id or str(final), title=repo_id or out.resolve().name,
                             iterations=tc.num_iterations, seconds=time.time() - t_start, processes=world,
                             last_row=row, resumed_at=start,
                             results=eval_results(out / "eval", report) if evaluator is not None else "")
            write_files(final, card_files(card, cfg))
            logger.info("Edit-GRPO done in %.1f s; LoRA in %s", time.time() - t_start, final)
            print(f"Edit-GRPO finished: {tc.num_iterations} iterations, LoRA in {final}, "
                  f"metrics in {out / 'metrics.jsonl'}")
    accelerator.end_training()
    if repo_id is not None and accelerator.is_main_process:
        push_folder(cfg.hub, repo_id, final, "Edit-GRPO LoRA")
    return out


def _stop_for_reward_server(error, it: int, accelerator, out: Path, **state) -> None:
    """A reward server stayed down (rewards/remote.py): write the checkpoint of the iterations done so far (unless it
    exists), then stop with one clear message (UserError). ``state``: save_state's keyword arguments."""
    if it == 0:
        where = "nothing was trained yet, so no checkpoint was written"
    else:
        path = out / f"checkpoint-{it}"
        if not (path / "trainer_state.json").exists():
            save_state(accelerator, out, it, **state)
        where = f"the last checkpoint is {path} ({it} iterations done)"
    raise UserError(f"stopped in iteration {it + 1}: {error}. {where}; restart the reward server and run again "
                    f"with resume=latest") from None


def _evaluate(evaluator, editor, step: int, accelerator) -> None:
    """Held-out evaluation; a reward server that is down stops the run with one message (checkpoints are kept)."""
    try:
        evaluator.run(editor, step=step, accelerator=accelerator)
    except RemoteRewardError as e:
        raise UserError(f"evaluation at step {step} stopped: {e}; the checkpoints written so far are kept") from None


def _save_lora_atomic(model, path: Path, base_model: str | None = None) -> None:
    with atomic_dir(path) as tmp:
        save_lora(model, tmp, base_model=base_model)


def _global_mean(accelerator, values: torch.Tensor) -> float:
    """Mean of the finite values over all processes."""
    v = values.float().flatten().to(accelerator.device)
    finite = torch.isfinite(v)
    stats = torch.stack([torch.where(finite, v, torch.zeros_like(v)).sum(), finite.sum().float()])
    if accelerator.num_processes > 1:
        stats = accelerator.reduce(stats, "sum")
    return float(stats[0] / stats[1]) if stats[1] > 0 else float("nan")


def interrupted(cfg) -> str:
    """The Ctrl-C line's hint (``run_cli``): the toy chain keeps every finished stage and resumes its SFT and Edit-GRPO
    stages on a rerun; a plain run names its last checkpoint (``viva_base.training.resume_hint``)."""
    from viva_base.training import resume_hint

    if cfg.toy.enabled:
        return f"every finished stage is kept in {cfg.output_dir}: run the same command again to continue"
    return resume_hint(cfg)


def cli(argv=None) -> int:
    return run_cli(main, GRPOConfig, argv, interrupted=interrupted)


if __name__ == "__main__":
    from viva_base.errors import exit_with

    exit_with(cli)
