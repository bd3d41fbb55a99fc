"""A toy preference reward model: the toy CLIP fine-tuned, as PickScore and HPS fine-tune CLIP, on preferences
between the SFT editor's own samples, with the toy world's oracle as the (simulated) annotator.

Why: the toy world's proxies (the toy CLIP's ``clip_if`` / ``clip_dir``, a quality-aware toy CLIP, a detector
trained on clean frames) cannot order the samples of one prompt (within-group Spearman with the oracle about
+0.2, docs/toy_world.md, seventh pass), and GRPO's advantages use nothing else. Real users answer this with a
reward model trained on human preferences between *generated* samples (PickScore, HPS v2, VideoAlign). This
module is that recipe at toy scale, in three steps::

    # 1. samples of the TRAINING prompts (G per prompt, the SFT editor's SDE sampler), scored by the oracle
    python -m editgrpo.toy_preference collect --model outputs/toy/sft/final \\
        --manifest outputs/toy/data/grpo.jsonl --out outputs/pref/train.safetensors
    # 2. fine-tune the toy CLIP on the oracle's preferences between samples of one prompt
    python -m editgrpo.toy_preference train --init outputs/toy/reward_model \\
        --data outputs/pref/train.safetensors --out outputs/pref/model
    # 3. held-out prompts (collected the same way): how well it orders a group, next to the proxies
    python -m editgrpo.toy_preference evaluate --data outputs/pref/eval.safetensors \\
        --model outputs/pref/model --model outputs/toy/reward_model

The result is an ordinary open_clip ``local-dir`` folder, scored by the ``pickscore`` reward exactly as the
real PickScore is (eq. 6: ``s * mean_f cos(E_I(v_f), E_T(t_edit))``)::

    rewards:
      pickscore: {weight: 1.0, model: "open_clip:local-dir:/runs/pref/model"}

``train --score direction`` makes the model source-aware: it scores the change from source to edit against the
text, ``s * mean_f cos(E_I(v_f) - E_I(src_f), E_T(text))`` (the ``clip_dir`` reward with ``text: instruction``, or
``text: captions`` against ``E_T(t_edit) - E_T(t_src)``), so that it can judge what an edit keeps as well as what it
adds. ``train`` prints the reward keys for the model it wrote.

The training loss is PickScore's (Kirstain et al. 2023, sec. 4): a softmax over the two samples' scores
against the annotator's preference ``p``, i.e. the Bradley-Terry likelihood
``L = -[p log sigma(r_i - r_j) + (1 - p) log sigma(r_j - r_i)]`` (:func:`bradley_terry_loss`). The annotator
prefers the sample with the higher oracle score (:func:`preference_pairs`; ``temperature > 0`` makes it a noisy
Bradley-Terry annotator, ``margin`` drops near-ties as annotators' "no preference").
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

__all__ = ["bradley_terry_loss", "collect_samples", "evaluate_rankers", "load_samples", "pairwise_accuracy",
           "preference_pairs", "reward_of", "save_samples", "train_preference_model", "within_group_spearman"]

META_FILE = "toy_preference.json"
TEXT_KEYS = ("ids", "instructions", "source_captions", "target_captions")


# ------------------------------------------------------------------------------------------------
# Pure pieces
# ------------------------------------------------------------------------------------------------
def preference_pairs(scores: torch.Tensor, *, margin: float = 0.0, temperature: float = 0.0,
                     generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                         torch.Tensor]:
    """The annotated pairs of a set of groups: every ``(n, i, j)`` with ``i < j`` samples of group ``n`` whose
    true scores ``scores`` ``(N, G)`` differ by more than ``margin`` (closer ones are "no preference" and
    dropped), with ``p`` the probability that the annotator prefers ``i``.

    ``temperature == 0``: a perfect annotator, ``p = 1[s_i > s_j]``. ``temperature > 0``: each pair is shown
    once to a Bradley-Terry annotator, ``p ~ Bernoulli(sigma((s_i - s_j) / temperature))`` drawn with
    ``generator``. Returns ``(n, i, j, p)``, 1-D tensors (``p`` float32)."""
    if scores.ndim != 2:
        raise ValueError(f"scores must be (groups, samples), got shape {tuple(scores.shape)}")
    if margin < 0 or temperature < 0:
        raise ValueError(f"margin and temperature must be >= 0, got {margin}, {temperature}")
    g = scores.shape[1]
    i, j = torch.triu_indices(g, g, offset=1)
    diff = scores[:, i] - scores[:, j]  # (N, P)
    keep = diff.abs() > margin
    n = torch.arange(scores.shape[0])[:, None].expand_as(diff)[keep]
    ii, jj, d = i.expand_as(diff)[keep], j.expand_as(diff)[keep], diff[keep].double()
    if temperature == 0:
        p = (d > 0).float()
    else:
        u = torch.rand(d.shape, generator=generator, dtype=torch.float64)
        p = (u < torch.sigmoid(d / temperature)).float()
    return n, ii, jj, p


def bradley_terry_loss(r_i: torch.Tensor, r_j: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """PickScore's preference loss (Kirstain et al. 2023, sec. 4) for two samples: the cross-entropy of the softmax
    over ``(r_i, r_j)`` against the preference ``(p, 1 - p)``, which is the Bradley-Terry negative log-likelihood
    ``-[p log sigma(r_i - r_j) + (1 - p) log sigma(r_j - r_i)]``; mean over pairs."""
    return F.binary_cross_entropy_with_logits(r_i - r_j, p.to(r_i.dtype))


def within_group_spearman(pred: torch.Tensor, truth: torch.Tensor, *, min_spread: float = 1e-6) -> float:
    """The mean over groups (rows of ``(N, G)`` tensors) of the Spearman correlation between ``pred`` and ``truth``,
    over the groups where both spread more than ``min_spread`` (a spread of float rounding only ranks nothing;
    the same rule as :func:`editgrpo.diagnose.group_spread`). NaN when no group qualifies."""
    from viva_base.data.toyworld.oracle import spearman

    rhos = []
    for a, b in zip(pred.float(), truth.float()):
        if min(float(a.std()), float(b.std())) > min_spread:
            rho = spearman(a, b)
            if not math.isnan(rho):
                rhos.append(rho)
    return sum(rhos) / len(rhos) if rhos else float("nan")


def pairwise_accuracy(pred: torch.Tensor, truth: torch.Tensor, *, margin: float = 0.0) -> float:
    """The fraction of within-group pairs whose true scores differ by more than ``margin`` that ``pred`` orders
    as ``truth`` does (a tie in ``pred`` counts half): the preference model's held-out agreement with the annotator."""
    n, i, j, p = preference_pairs(truth, margin=margin)
    if len(p) == 0:
        return float("nan")
    d = pred[n, i] - pred[n, j]
    agree = torch.where(d == 0, 0.5, ((d > 0).float() == p).float())
    return float(agree.mean())


# ------------------------------------------------------------------------------------------------
# Samples: the SFT editor's groups, scored by the oracle
# ------------------------------------------------------------------------------------------------
@torch.no_grad()
def collect_samples(editor, records: list[dict], *, group_size: int = 8, num_steps: int = 10,
                    guidance_scale: float = 2.0, method: str = "flow_sde", eta: float = 0.7, sde_window=None,
                    prompts_per_batch: int = 4, seed: int = 0, progress: bool = True) -> dict:
    """``group_size`` SDE samples of each record's instruction (the sampler of :func:`editgrpo.diagnose.group_spread`,
    the same seeds: sample ``k`` of record ``r`` uses ``seed * 1_000_003 + r * 1000 + k``), decoded, with their
    oracle scores against the nearest correct edit. Returns ``videos`` ``(N, G, F, 3, H, W)`` uint8,
    ``sources`` ``(N, F, 3, H, W)`` uint8, ``oracle`` / ``if_error`` / ``sp_error`` ``(N, G)`` float32 and the
    records' ``ids``, ``instructions``, ``source_captions``, ``target_captions``."""
    from tqdm.auto import tqdm

    from viva_base.data.toyworld.oracle import best_oracle_scores

    from editgrpo.diagnose import _load
    from editgrpo.rollout import rollout
    from editgrpo.sampling import sigma_schedule

    missing = [r.get("id", "?") for r in records if not ((r.get("scene") and r.get("ops")) or
                                                         (r.get("target") and r.get("mask")))]
    if missing:
        raise ValueError(f"{len(missing)} record(s) have neither a scene + ops nor a target + mask for the oracle "
                         f"(first: {missing[0]}); collect from a toy-world manifest")
    sigmas = sigma_schedule(num_steps, editor.config.shift)
    out: dict = {k: [] for k in ("videos", "sources", "oracle", "if_error", "sp_error")}
    bar = tqdm(total=len(records), desc="collect", disable=not progress)
    for start in range(0, len(records), prompts_per_batch):
        chunk = records[start : start + prompts_per_batch]
        items = [_load(r) for r in chunk]
        src = torch.stack([it["source"] for it in items]).to(editor.device)
        cond, uncond = editor.encode_condition(src, [r["instruction"] for r in chunk], [None] * len(chunk))
        index = [p for p in range(len(chunk)) for _ in range(group_size)]
        seeds = [seed * 1_000_003 + (start + p) * 1000 + k for p in range(len(chunk)) for k in range(group_size)]
        ro = rollout(editor, cond, uncond, index, seeds, sigmas, mode="sde", method=method, eta=eta,
                     sde_window=sde_window, train_steps=[], guidance_scale=guidance_scale,
                     batch_size=len(seeds))
        edited = editor.decode(ro.latents).cpu().clamp(0, 1)
        edited = (edited * 255).round().to(torch.uint8).float() / 255  # score what is stored
        for p, (rec, it) in enumerate(zip(chunk, items)):
            e = edited[p * group_size : (p + 1) * group_size]
            truths = _truths(rec, it)
            o = best_oracle_scores(e, it["source"].expand_as(e), [truths] * group_size)
            for k in ("oracle", "if_error", "sp_error"):
                out[k].append(o[k].float())
            out["videos"].append((e * 255).round().to(torch.uint8))
            out["sources"].append((it["source"].clamp(0, 1) * 255).round().to(torch.uint8))
        bar.update(len(chunk))
    bar.close()
    result = {k: torch.stack(v) for k, v in out.items()}
    result.update(ids=[r["id"] for r in records], instructions=[r["instruction"] for r in records],
                  source_captions=[r.get("source_caption", "") for r in records],
                  target_captions=[r.get("target_caption", "") for r in records])
    return result


def _truths(rec: dict, item: dict) -> list:
    """Every correct edit of a record: rendered from its scene graph where it has one (GRPO prompts carry no target
    files), else its target and mask files."""
    from viva_base.data.toyworld.edits import admissible_truths, op_from_json
    from viva_base.data.toyworld.oracle import record_truths
    from viva_base.data.toyworld.scene import scene_from_json

    if rec.get("scene") and rec.get("ops"):
        return admissible_truths(scene_from_json(rec["scene"]), [op_from_json(o) for o in rec["ops"]])
    return record_truths(rec, item["target"], item["mask"])


def save_samples(samples: dict, path: str | os.PathLike, *, meta: dict | None = None) -> None:
    """Write collected samples as one safetensors file (tensors; the texts and ``meta`` in its metadata), atomically."""
    from safetensors.torch import save_file

    tensors = {k: v.contiguous() for k, v in samples.items() if isinstance(v, torch.Tensor)}
    metadata = {k: json.dumps(samples[k]) for k in TEXT_KEYS}
    metadata["meta"] = json.dumps(meta or {})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_samples(path: str | os.PathLike) -> dict:
    """Read a file written by :func:`save_samples` (videos as uint8, scores float32, texts as lists)."""
    from safetensors import safe_open

    out: dict = {}
    with safe_open(str(path), framework="pt") as f:
        for k in f.keys():
            out[k] = f.get_tensor(k)
        md = f.metadata() or {}
    for k in TEXT_KEYS:
        out[k] = json.loads(md.get(k, "[]"))
    out["meta"] = json.loads(md.get("meta", "{}"))
    return out


# ------------------------------------------------------------------------------------------------
# Training: PickScore's recipe on the annotated pairs
# ------------------------------------------------------------------------------------------------
def _local_dir(model: str) -> Path:
    """The folder of a toy CLIP named ``open_clip:local-dir:<dir>``, ``local-dir:<dir>`` or a bare folder."""
    for prefix in ("open_clip:local-dir:", "local-dir:"):
        if model.startswith(prefix):
            return Path(model[len(prefix):])
    return Path(model)


SCORES = ("pickscore", "direction")


def _score_fn(model, preprocess, tokenizer, kind: str = "pickscore"):
    """``score(videos (B, F, 3, H, W) in [0, 1], texts, sources=None, source_texts=None) -> (B,)``, with gradients.

    ``kind="pickscore"``: eq. 6 as :class:`rewards.pickscore.PickScore` computes it (every frame; the same
    preprocessing, normalisation and scale); the source is not used. ``kind="direction"``: the source-aware score
    ``s * 1/F sum_f cos(E_I(v_f) - E_I(src_f), E_T(t) - E_T(t_src))`` (:func:`rewards.clip.clip_direction_score`
    times the learned scale ``s``; ``E_T(t_src) = 0`` when ``source_texts`` is None, i.e. the text names the change,
    as an instruction does), as :class:`rewards.clip.ClipDirection` computes it up to ``s``. ``sources`` holds
    ``(B / k, F, 3, H, W)`` frames and ``source_texts`` ``B / k`` texts, source ``b`` serving rows ``b, b + B/k, ...``
    (the two halves of a pair batch share their sources, embedded once)."""
    from rewards.clip import clip_direction_score, frame_text_similarity

    if kind not in SCORES:
        raise ValueError(f"score must be one of {', '.join(SCORES)}, got {kind!r}")

    def images(v: torch.Tensor) -> torch.Tensor:
        b, f = v.shape[:2]
        return F.normalize(model.encode_image(preprocess(v.reshape(b * f, *v.shape[2:]).float())).float(),
                           dim=-1).view(b, f, -1)

    def texts(captions: Sequence[str]) -> torch.Tensor:
        unique = list(dict.fromkeys(captions))
        txt = F.normalize(model.encode_text(tokenizer(unique)).float(), dim=-1)
        return txt[torch.tensor([unique.index(c) for c in captions])]

    def score(videos: torch.Tensor, captions: Sequence[str], sources: torch.Tensor | None = None,
              source_captions: Sequence[str] | None = None) -> torch.Tensor:
        img, txt = images(videos), texts(captions)
        if kind == "pickscore":
            return model.logit_scale.exp() * frame_text_similarity(img, txt)
        if sources is None:
            raise ValueError("the direction score needs the source frames")
        k = videos.shape[0] // sources.shape[0]
        src = images(sources).repeat(k, 1, 1)
        t_src = torch.zeros_like(txt) if source_captions is None else texts(source_captions).repeat(k, 1)
        return model.logit_scale.exp() * clip_direction_score(src, img, t_src, txt)

    return score


def reward_of(model_dir: str | os.PathLike) -> tuple[str, dict]:
    """The reward that scores as a trained preference model in ``model_dir`` was trained to: ``("pickscore",
    {model, text})`` or, for ``score="direction"``, ``("clip_dir", {model, text: "instruction" | "captions"})``.
    A folder without ``toy_preference.json`` (a plain toy CLIP) is read as ``pickscore`` against target captions."""
    folder = _local_dir(str(model_dir)).resolve()
    meta = folder / META_FILE
    params = json.loads(meta.read_text())["params"] if meta.is_file() else {}
    text = params.get("text", "target_caption")
    model = f"open_clip:local-dir:{folder}"
    if params.get("score", "pickscore") == "direction":
        return "clip_dir", {"model": model, "text": "instruction" if text == "instruction" else "captions"}
    return "pickscore", {"model": model, "text": text}


def _concat(datasets: Sequence[dict]) -> dict:
    out = {k: torch.cat([d[k] for d in datasets]) for k in ("videos", "sources", "oracle")}
    for key in ("target_captions", "source_captions", "instructions"):
        out[key] = [c for d in datasets for c in d[key]]
    return out


def train_preference_model(init: str, datasets: Sequence[dict], out_dir: str | os.PathLike, *, steps: int = 1500,
                           pairs_per_step: int = 32, lr: float = 1e-4, weight_decay: float = 0.0,
                           warmup: float = 0.05, margin: float = 0.0, temperature: float = 0.0,
                           frames_per_sample: int = 0, hflip: bool = False, text: str = "target_caption",
                           score: str = "pickscore", seed: int = 0,
                           num_threads: int = 1, progress: bool = True) -> str:
    """Fine-tune the toy CLIP ``init`` (a ``local-dir`` folder, e.g. the chain's ``reward_model``) on the annotated
    pairs of ``datasets`` (:func:`collect_samples` results, each group's samples compared among themselves only:
    :func:`preference_pairs` with ``margin`` / ``temperature``) with :func:`bradley_terry_loss` on eq. 6 scores,
    AdamW, linear warmup then cosine decay (:func:`editgrpo.toy_reward.lr_at`); every weight trains, the logit
    scale included (clamped to 100 as CLIP does). Augmentation, the same for both samples of a pair:
    ``frames_per_sample > 0`` scores a random subset of that many frames (the reward averages all of them; a subset
    is cheaper and varies the input), ``hflip`` mirrors the pair half of the time (the captions name no places and
    the toy shapes are mirror-symmetric, so a mirrored pair keeps its preference). ``score``: ``"pickscore"``
    (eq. 6: the edit against ``text`` only; the reward is ``pickscore`` with the same ``text``) or ``"direction"``
    (source-aware: the change from source to edit against the instruction, or against the change from source to
    target caption; the reward is ``clip_dir`` with ``text: instruction`` or ``captions``; :func:`_score_fn`).
    Writes an open_clip ``local-dir`` folder to ``out_dir`` (atomically; ``toy_preference.json`` holds the
    parameters and training statistics) and returns its reward model name.
    Deterministic for the same inputs, parameters and ``num_threads``."""
    from tqdm.auto import tqdm

    from rewards.clip import clear_clip_cache, load_clip, parse_clip_spec
    from rewards.tiny import save_open_clip

    from editgrpo.toy_reward import clip_optimizer, clip_step, lr_at

    folder = _local_dir(init)
    cfg_file = folder / "open_clip_config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{folder} holds no open_clip_config.json: --init must be a toy CLIP folder "
                                f"(the chain's reward_model, or `python -m editgrpo.toy_reward --out DIR`)")
    if text not in ("target_caption", "instruction"):
        raise ValueError(f"text must be 'target_caption' or 'instruction', got {text!r}")
    if score not in SCORES:
        raise ValueError(f"score must be one of {', '.join(SCORES)}, got {score!r}")
    if hflip and text == "instruction":
        raise ValueError("hflip mirrors places and motions that an instruction names: use it with text=target_caption")
    if steps < 1 or pairs_per_step < 1:
        raise ValueError(f"steps and pairs_per_step must be >= 1, got {steps}, {pairs_per_step}")
    data = _concat(datasets)
    n, i, j, p = preference_pairs(data["oracle"], margin=margin, temperature=temperature,
                                  generator=torch.Generator().manual_seed(seed))
    if len(p) == 0:
        raise ValueError(f"no pair of samples differs by more than margin={margin}: nothing to learn from")
    open_cfg = json.loads(cfg_file.read_text())
    out = Path(out_dir).resolve()
    if out.exists() and not (out / META_FILE).is_file() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and does not hold a toy preference model; give a new or empty --out")
    params = dict(init=str(folder.resolve()), steps=steps, pairs_per_step=pairs_per_step, lr=lr,
                  weight_decay=weight_decay, warmup=warmup, margin=margin, temperature=temperature,
                  frames_per_sample=frames_per_sample, hflip=hflip, text=text, score=score, seed=seed,
                  num_threads=num_threads, groups=int(data["oracle"].shape[0]), group_size=int(data["oracle"].shape[1]),
                  pairs=len(p))
    threads = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    start = time.perf_counter()
    losses, accs = [], []
    try:
        base = load_clip(parse_clip_spec(f"open_clip:local-dir:{folder}"), device=torch.device("cpu"), dtype=torch.float32)
        model = copy.deepcopy(base.model).float().train().requires_grad_(True)  # the cached reward CLIP is frozen
        score_fn = _score_fn(model, base.preprocess, base.tokenizer, score)
        opt = clip_optimizer(model, lr, weight_decay)
        gen = torch.Generator().manual_seed(seed)
        bar = tqdm(range(steps), desc="preference model", disable=not progress)
        for step in bar:
            pick = torch.randint(len(p), (pairs_per_step,), generator=gen)
            gi, si, sj, pp = n[pick], i[pick], j[pick], p[pick]
            a, b = data["videos"][gi, si], data["videos"][gi, sj]  # (P, F, 3, H, W) each
            # the pair's source, for the direction score only: the same frames, the same flip
            clips = [a, b, data["sources"][gi]] if score == "direction" else [a, b]
            if 0 < frames_per_sample < a.shape[1]:
                keep = torch.rand(len(pick), a.shape[1], generator=gen).argsort(1)[:, :frames_per_sample]
                idx = keep[:, :, None, None, None].expand(-1, -1, *a.shape[2:])
                clips = [v.gather(1, idx) for v in clips]
            if hflip:
                flip = (torch.rand(len(pick), generator=gen) < 0.5).view(-1, 1, 1, 1, 1)
                clips = [torch.where(flip, v.flip(-1), v) for v in clips]
            videos = torch.cat(clips[:2]).float() / 255
            captions = [data[text + "s"][g] for g in gi.tolist()] * 2
            sources = clips[2].float() / 255 if score == "direction" else None
            source_captions = ([data["source_captions"][g] for g in gi.tolist()]
                               if score == "direction" and text == "target_caption" else None)
            for group in opt.param_groups:
                group["lr"] = lr_at(step, steps, lr, warmup)
            r = score_fn(videos, captions, sources, source_captions)
            loss = bradley_terry_loss(r[:pairs_per_step], r[pairs_per_step:], pp)
            clip_step(opt, model, loss)
            losses.append(float(loss.detach()))
            accs.append(float((((r[:pairs_per_step] > r[pairs_per_step:]).float() == pp).float().mean())))
            if step % 20 == 0 or step == steps - 1:
                bar.set_postfix(loss=f"{np.mean(losses[-50:]):.3f}", acc=f"{np.mean(accs[-50:]):.2f}")
        model.eval()
        stats = {"seconds": round(time.perf_counter() - start, 1), "first_loss": float(np.mean(losses[:20])),
                 "final_loss": float(np.mean(losses[-50:])), "final_train_accuracy": float(np.mean(accs[-50:])),
                 "logit_scale": float(model.logit_scale.detach().exp())}
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
        try:
            save_open_clip(model, open_cfg["model_cfg"], tmp, preprocess_cfg=open_cfg.get("preprocess_cfg"))
            (tmp / META_FILE).write_text(json.dumps({"params": params, "stats": stats}, indent=2))
            if out.exists():  # a preference model (checked before training): replaced
                shutil.rmtree(out)
            os.replace(tmp, out)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    finally:
        torch.set_num_threads(threads)
    clear_clip_cache()
    logger.info("preference model: %d steps in %.1f s, loss %.3f -> %.3f, train pair accuracy %.2f", steps,
                stats["seconds"], stats["first_loss"], stats["final_loss"], stats["final_train_accuracy"])
    return f"open_clip:local-dir:{out}"


# ------------------------------------------------------------------------------------------------
# Held-out evaluation: how well a reward orders the samples of a prompt
# ------------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate_rankers(data: dict, rewards: dict, *, batch_size: int = 64, margin: float = 0.0) -> list[dict]:
    """For each named reward (``{label: Reward}``, built by :func:`rewards.registry.build_reward`), its scores of the
    collected samples, their within-group Spearman with the oracle, with ``-if_error`` (the edit itself) and with
    ``-sp_error`` (what the edit keeps of the source), and the pairwise
    accuracy against the oracle's preferences (pairs differing by more than ``margin``). Rows, in order."""
    N, G = data["oracle"].shape
    rows = []
    flat_vid = data["videos"].reshape(N * G, *data["videos"].shape[2:])
    flat_src = data["sources"][:, None].expand(N, G, *data["sources"].shape[1:]).reshape_as(flat_vid)
    rep = lambda key: [t for t in data[key] for _ in range(G)]  # noqa: E731
    texts = {k: rep(k) for k in ("instructions", "source_captions", "target_captions")}
    for label, reward in rewards.items():
        scores = []
        for a in range(0, N * G, batch_size):
            b = slice(a, a + batch_size)
            o = reward(flat_vid[b].float() / 255, flat_src[b].float() / 255, source_captions=texts["source_captions"][b],
                       target_captions=texts["target_captions"][b], instructions=texts["instructions"][b],
                       references=[None] * len(flat_vid[b]))
            scores.append(o.scores.float() if hasattr(o, "scores") else o.total.float())
        s = torch.cat(scores).view(N, G)
        rows.append({"reward": label, "spearman_oracle": within_group_spearman(s, data["oracle"]),
                     "spearman_if": within_group_spearman(s, -data["if_error"]),
                     "spearman_sp": within_group_spearman(s, -data["sp_error"]),
                     "pair_accuracy": pairwise_accuracy(s, data["oracle"], margin=margin)})
    return rows


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------
def _collect_main(args) -> int:
    from viva_base.data.manifest import read_manifest
    from viva_base.errors import UserError
    from viva_base.training import load_editor

    if not Path(args.manifest).is_file():
        raise UserError(f"--manifest {args.manifest}: no such file")
    records = read_manifest(args.manifest, "eval")
    if args.max_prompts:
        records = records[: args.max_prompts]
    if args.group_size < 2:
        raise UserError(f"--group-size {args.group_size}: a preference needs at least 2 samples of a prompt")
    from viva_base.recipe import check_output_file

    check_output_file("--out", args.out)  # before the editor samples (minutes)
    if args.threads:
        torch.set_num_threads(args.threads)
    editor = load_editor(args.model)
    start = time.perf_counter()
    try:
        samples = collect_samples(editor, records, group_size=args.group_size, num_steps=args.num_steps,
                                  guidance_scale=args.guidance_scale, eta=args.eta, seed=args.seed,
                                  prompts_per_batch=args.prompts_per_batch)
    except ValueError as exc:
        raise UserError(f"--manifest {args.manifest}: {exc}") from None
    meta = dict(model=str(args.model), manifest=str(args.manifest), group_size=args.group_size,
                num_steps=args.num_steps, guidance_scale=args.guidance_scale, eta=args.eta, seed=args.seed,
                seconds=round(time.perf_counter() - start, 1))
    save_samples(samples, args.out, meta=meta)
    o = samples["oracle"]
    print(f"{o.shape[0]} prompts x {o.shape[1]} samples in {meta['seconds']} s -> {args.out}; oracle mean "
          f"{float(o.mean()):.4f}, within-group std {float(o.std(dim=1, unbiased=False).mean()):.4f}")
    return 0


def _read_data(paths: Sequence[str], flag: str) -> list[dict]:
    from viva_base.errors import UserError

    out = []
    for path in paths:
        if not Path(path).is_file():
            raise UserError(f"{flag} {path}: no such file; make it with `python -m editgrpo.toy_preference collect`")
        out.append(load_samples(path))
    shapes = {tuple(d["videos"].shape[1:]) for d in out}
    if len(shapes) > 1:
        raise UserError(f"{flag}: the files hold samples of different shapes {sorted(shapes)}; collect them alike")
    return out


def _train_main(args) -> int:
    from viva_base.errors import UserError

    if not (_local_dir(args.init) / "open_clip_config.json").is_file():
        raise UserError(f"--init {args.init}: not a toy CLIP folder (no open_clip_config.json); give the chain's "
                        f"reward_model folder or one from `python -m editgrpo.toy_reward --out DIR`")
    datasets = _read_data(args.data, "--data")
    from viva_base.recipe import check_output_dir

    check_output_dir("--out", args.out)
    try:
        name = train_preference_model(args.init, datasets, args.out, steps=args.steps, pairs_per_step=args.pairs_per_step,
                                      lr=args.lr, weight_decay=args.weight_decay, margin=args.margin,
                                      temperature=args.temperature, frames_per_sample=args.frames_per_sample,
                                      hflip=args.hflip, text=args.text, score=args.score, seed=args.seed,
                                      num_threads=args.threads)
    except (ValueError, FileExistsError) as exc:
        raise UserError(str(exc)) from None
    stats = json.loads((_local_dir(name) / META_FILE).read_text())["stats"]
    reward, kwargs = reward_of(name)
    use = " ".join(f"rewards.{reward}.{k}={v}" for k, v in kwargs.items())
    print(f"preference model in {args.out} ({stats['seconds']} s; loss {stats['first_loss']:.3f} -> "
          f"{stats['final_loss']:.3f}). Use it as\n  rewards.{reward}.weight=1 {use}")
    return 0


def _evaluate_main(args) -> int:
    from rewards.registry import CombinedReward, build_reward

    (data,) = _read_data([args.data], "--data")
    if args.out:
        from viva_base.recipe import check_output_file

        check_output_file("--out", args.out)
    rewards = {}
    for m in args.model or []:
        reward, kwargs = reward_of(m)
        rewards[f"{reward} ({m})"] = build_reward(reward, **kwargs)
    if args.proxies:
        clip = f"open_clip:local-dir:{Path(args.proxies).resolve()}"
        for name in ("clip_if", "clip_dir", "clip_sp"):
            rewards[name] = build_reward(name, model=clip)
        rewards["pixel_sp"] = build_reward("pixel_sp")
        rewards["recipe total (clip_if + 0.5 clip_sp + pixel_sp)"] = CombinedReward.from_config(
            {"clip_if": {"weight": 1.0, "model": clip}, "clip_sp": {"weight": 0.5, "model": clip}, "pixel_sp": 1.0})
    n, g = data["oracle"].shape
    rows = evaluate_rankers(data, rewards, margin=args.margin)
    lines = [f"{n} prompts x {g} samples ({args.data}); oracle within-group std "
             f"{float(data['oracle'].std(dim=1, unbiased=False).mean()):.4f}",
             "| reward | Spearman with the oracle in a group | with -if_error | with -sp_error | pair accuracy |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['reward']} | {r['spearman_oracle']:+.3f} | {r['spearman_if']:+.3f} | {r['spearman_sp']:+.3f} | "
              f"{r['pair_accuracy']:.3f} |" for r in rows]
    print("\n".join(lines))
    if args.out:
        from viva_base.recipe import atomic_write_text

        atomic_write_text(args.out, json.dumps(rows, indent=2))  # (its folder created)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    from viva_base.cli_args import count, nonnegative, positive

    p = argparse.ArgumentParser(prog="python -m editgrpo.toy_preference", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("collect", help="sample groups of the SFT editor and score them with the oracle")
    c.add_argument("--model", required=True, help="an editor directory (save_pretrained)")
    c.add_argument("--manifest", required=True, help="a toy-world manifest (records with target + mask)")
    c.add_argument("--out", required=True, help="the .safetensors file to write")
    c.add_argument("--group-size", type=int, default=8, help="samples per prompt (>= 2: pairs)")
    c.add_argument("--max-prompts", type=count(0), default=0, help="the first N records only (0: all)")
    c.add_argument("--num-steps", type=count(1), default=10)
    c.add_argument("--guidance-scale", type=positive, default=2.0, help="CFG scale (1: no CFG)")
    c.add_argument("--eta", type=positive, default=0.7, help="the SDE sampler's noise (> 0)")
    c.add_argument("--prompts-per-batch", type=count(1), default=4)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--threads", type=count(0), default=0, help="torch CPU threads (0: torch's default)")
    t = sub.add_parser("train", help="fine-tune the toy CLIP on the oracle's preferences (PickScore's loss)")
    t.add_argument("--init", required=True, help="the toy CLIP folder to start from (the chain's reward_model)")
    t.add_argument("--data", required=True, nargs="+", help="collected .safetensors file(s) of TRAINING prompts")
    t.add_argument("--out", required=True, help="the model folder to write")
    t.add_argument("--steps", type=count(1), default=1500)
    t.add_argument("--pairs-per-step", type=count(1), default=32)
    t.add_argument("--lr", type=positive, default=1e-4)
    t.add_argument("--weight-decay", type=nonnegative, default=0.0)
    t.add_argument("--margin", type=nonnegative, default=0.0,
                   help="pairs closer than this in oracle score are ties (dropped)")
    t.add_argument("--temperature", type=nonnegative, default=0.0,
                   help="0: a perfect annotator; > 0: a noisy Bradley-Terry annotator of this temperature")
    t.add_argument("--frames-per-sample", type=count(0), default=0,
                   help="score a random subset of this many frames per training pair (0: all, as the reward does)")
    t.add_argument("--hflip", action="store_true", help="mirror half of the training pairs (both samples alike)")
    t.add_argument("--text", choices=("target_caption", "instruction"), default="target_caption",
                   help="what the frames are scored against (the reward then needs the same pickscore text=...)")
    t.add_argument("--score", choices=SCORES, default="pickscore",
                   help="pickscore: the edit against the text (eq. 6); direction: source-aware, the change from source "
                        "to edit against the text (the reward is then clip_dir)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--threads", type=count(1), default=1)
    e = sub.add_parser("evaluate", help="how well rewards order the samples of held-out prompts")
    e.add_argument("--data", required=True, help="a collected .safetensors file of HELD-OUT prompts")
    e.add_argument("--model", action="append", help="a preference model folder, scored as pickscore (repeatable)")
    e.add_argument("--proxies", default=None, help="a toy CLIP folder: also score the recipe's proxies with it")
    e.add_argument("--margin", type=nonnegative, default=0.0, help="pairs closer than this in oracle score are ties")
    e.add_argument("--out", default=None, help="write the rows as JSON here")
    args = p.parse_args(argv)
    from viva_base.errors import UserError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return {"collect": _collect_main, "train": _train_main, "evaluate": _evaluate_main}[args.cmd](args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    from viva_base.errors import exit_with

    exit_with(main)
