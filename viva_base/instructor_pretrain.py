"""Pretrain a tiny LLaVA instructor on captioned edit pairs: the toy counterpart of the paper's pretrained VLM.

VIVA's instructor is a pretrained LLaVA: its hidden states already say *what* the instruction asks, with the roles
of its words bound ("make the red diamond green": red is the object, green the new colour). A tiny LLaVA with
random weights gives the DiT little more than a bag of word embeddings (docs/toy_world.md measures it: the two
orders of that instruction differ by 1% in the mean token feature, and a recolour-only SFT on random features does
not learn to recolour at all, while the same DiT given a clean symbolic encoding reaches ``if_progress`` 0.6).

This module trains the tiny instructor, before SFT and then frozen as in the paper, with the task its system prompt
states: read the instruction and the source frame (and the reference image, if any) and *describe the edited
video*. The sequence is the exact prompt :func:`viva_base.instructor.encode_instructions` builds, then
``ANSWER_PREFIX`` + the pair's ``target_caption`` + ``</s>``; the causal LM loss counts only the answer tokens.
To predict the edited caption, the states of the prompt's last tokens must carry the edit with its roles; the DiT
reads those states (``InstructorConfig.hidden_layer``).

For tiny editors only: a real LLaVA checkpoint is pretrained already.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import torch

from .instructor import InstructorConfig, _to_uint8_hwc, build_texts

logger = logging.getLogger(__name__)

ANSWER_PREFIX = "\nEdited video:"  # then " " + the answer


@dataclass
class InstructorPretrainConfig:
    steps: int = 0                    # 0: no pretraining (the instructor keeps the weights it has)
    batch_size: int = 32
    learning_rate: float = 1.0e-3
    warmup_steps: int = 50
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    hidden_layer: int = -1            # which hidden states the DiT reads afterwards (InstructorConfig.hidden_layer)
    summary_weight: float = 1.0       # weight of summary_loss: the prompt's last state predicts every answer token
    seed: int = 0


def caption_batch(processor, cfg: InstructorConfig, instructions: list[str], images: list[list[torch.Tensor]],
                  answers: list[str]) -> dict:
    """Model inputs and ``labels`` for the causal LM loss on ``answers`` only.

    The prompt is built as :func:`~viva_base.instructor.encode_instructions` builds it (same system prompt, image
    tokens and ``Instruction:`` line), so the states the DiT later reads are the states trained here."""
    tok = processor.tokenizer
    prompts = build_texts(instructions, [len(im) for im in images], cfg, processor.image_token)
    full = [p + ANSWER_PREFIX + " " + a + tok.eos_token for p, a in zip(prompts, answers)]
    flat = [_to_uint8_hwc(im) for item in images for im in item]
    enc = processor(text=full, images=flat or None, padding="longest", return_tensors="pt")
    ids = enc["input_ids"]
    lengths = []
    for texts in (prompts, [p + ANSWER_PREFIX for p in prompts]):
        part = processor(text=texts, images=flat or None, padding="longest", return_tensors="pt")
        n = part["attention_mask"].sum(1)
        for i in range(len(full)):  # each part must tokenize as a prefix of the whole sequence
            if not torch.equal(ids[i, :int(n[i])], part["input_ids"][i, :int(n[i])]):
                raise ValueError(f"instruction {instructions[i]!r}: the prompt does not tokenize as a prefix of "
                                 "prompt + answer; ANSWER_PREFIX must start a new token")
        lengths.append(n)
    n_prompt, n_prefix = lengths
    labels = ids.clone()
    pos = torch.arange(ids.shape[1])[None]
    labels[(pos < n_prefix[:, None]) | (enc["attention_mask"] == 0)] = -100
    return {**enc, "labels": labels, "prompt_length": n_prompt}


def summary_loss(hidden: torch.Tensor, lm_head, labels: torch.Tensor, prompt_length: torch.Tensor) -> torch.Tensor:
    """Bag-of-tokens loss of the prompt's last state: ``-mean_i mean_{t in answer_i} log softmax(W h_i)[t]`` with
    ``h_i`` the last prompt token's state of sample ``i`` (the layer the DiT reads) and ``W`` the LM head.

    The causal LM loss alone lets the prompt's last state predict only the answer's *first* token ("a ..."); the
    rest is worked out at answer positions, which the DiT never sees. This term makes the states the DiT does see
    carry the whole edited description."""
    b = hidden.shape[0]
    last = hidden[torch.arange(b, device=hidden.device), (prompt_length - 1).to(hidden.device)]
    logp = torch.log_softmax(lm_head(last).float(), dim=-1)            # (B, V)
    valid = labels != -100
    tok = labels.clamp(min=0)
    per = -(logp.gather(1, tok) * valid).sum(1) / valid.sum(1).clamp(min=1)
    return per.mean()


def pretrain_instructor(editor, examples: list[dict], cfg: InstructorPretrainConfig, *, progress: bool = True,
                        log=None) -> list[dict]:
    """Train ``editor.instructor`` in place on ``examples`` (dicts with ``image`` (3, H, W) in [0, 1], optional
    ``reference``, ``instruction`` and ``answer``), then freeze it and point ``editor.config.instructor.hidden_layer``
    at ``cfg.hidden_layer``. Deterministic given ``cfg.seed``. Returns the logged rows (step, loss, lr)."""
    from diffusers.optimization import get_scheduler
    from tqdm.auto import tqdm

    if not examples:
        raise ValueError("instructor pretraining needs examples (pairs with a target_caption)")
    model = editor.instructor
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    model.float().train().requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    sched = get_scheduler("cosine", opt, num_warmup_steps=min(cfg.warmup_steps, cfg.steps),
                          num_training_steps=cfg.steps)
    icfg = editor.config.instructor
    g = torch.Generator().manual_seed(cfg.seed)
    rows, t0, ema = [], time.time(), None
    bar = tqdm(range(cfg.steps), desc="instructor", disable=not progress)
    for step in bar:
        idx = torch.randint(len(examples), (cfg.batch_size,), generator=g).tolist()
        batch = caption_batch(editor.processor, icfg, [examples[i]["instruction"] for i in idx],
                              [[examples[i]["image"]] + ([examples[i]["reference"]] if examples[i].get("reference")
                                                         is not None else []) for i in idx],
                              [examples[i]["answer"] for i in idx])
        prompt_length = batch.pop("prompt_length")
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        out = model(**batch, output_hidden_states=cfg.summary_weight > 0)
        loss = out.loss
        if cfg.summary_weight > 0:
            loss = loss + cfg.summary_weight * summary_loss(out.hidden_states[cfg.hidden_layer], model.lm_head,
                                                            batch["labels"], prompt_length)
        if not math.isfinite(loss.item()):
            raise RuntimeError(f"instructor pretraining loss became {loss.item()} at step {step + 1}")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        bar.set_postfix(loss=f"{ema:.3f}")
        if (step + 1) % 50 == 0 or step + 1 == cfg.steps:
            row = {"step": step + 1, "loss": loss.item(), "loss_ema": ema, "lr": sched.get_last_lr()[0]}
            rows.append(row)
            if log is not None:
                log(row)
    model.eval().requires_grad_(False).to(dtype)
    editor.config.instructor.hidden_layer = cfg.hidden_layer
    logger.info("instructor pretrained: %d steps in %.1f s, answer loss %.3f", cfg.steps, time.time() - t0,
                ema if ema is not None else float("nan"))
    return rows


def examples_from_pairs(records: list[dict]) -> list[dict]:
    """(first source frame, reference, instruction, target caption) of every pair record with a ``target_caption``."""
    from .data.pairs import read_image
    from .video import read_video

    out = []
    for rec in records:
        if not rec.get("target_caption"):
            continue
        out.append({"image": read_video(rec["source"]).frames[0], "instruction": rec["instruction"],
                    "reference": read_image(rec["reference"]) if rec.get("reference") else None,
                    "answer": rec["target_caption"]})
    return out
