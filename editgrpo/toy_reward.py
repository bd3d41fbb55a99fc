"""The toy reward model: a small open_clip CLIP trained contrastively on toy-world frames and captions.

``train_toy_clip(dir)`` trains it on CPU in a few minutes and saves it as an open_clip ``local-dir``
folder, so the normal reward loaders read it like any other CLIP::

    rewards:
      clip_if: {weight: 1.0, model: "open_clip:local-dir:/runs/toy/reward_model"}
      clip_sp: {weight: 0.5, model: "open_clip:local-dir:/runs/toy/reward_model"}

or ``python -m editgrpo.toy_reward --out DIR`` (prints that model name and held-out quality numbers).

Training data is drawn fresh at every step from the toy world (:mod:`viva_base.data.toyworld`) with a
generator seeded by ``(seed, step)``: each batch holds edit pairs, the source and the target scene of
one edit, rendered at the same random frame, with their two captions. Every pair is a HARD negative
for itself: the two images differ in exactly what the edit changed (one object added or removed, a
shape, a colour, the background's style / colour / day-night-snow variant, several of these for a
compound edit, or an object's size for the extra ``resize`` pairs), so the contrastive loss can only
be lowered by reading those attributes. That is what Edit-GRPO needs from ``clip_if``
(``C(V, t_edit) - C(V, t_src)``, eq. 4): a higher score for the video that made the true edit.

Training is deterministic: the same parameters (and ``num_threads``) give bit-identical weights.
The folder is written atomically (a temporary folder renamed into place) and doubles as a cache: it
records its training parameters in ``toy_clip.json``, and a call with the same parameters returns at
once.
"""
from __future__ import annotations

import argparse
import dataclasses
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

from viva_base.errors import UserError

logger = logging.getLogger(__name__)

__all__ = ["TOY_CLIP_DEFAULTS", "PAIR_KINDS", "DEGRADED_PREFIX", "caption_token_bound", "clip_contrastive_loss",
           "degrade_image", "evaluate_toy_clip", "heldout_pairs", "lr_at", "sample_pair", "sample_training_batch",
           "toy_clip_config", "train_toy_clip"]

META_FILE = "toy_clip.json"
FORMAT_VERSION = 1
TRAIN_STREAM, EVAL_STREAM = 0x70C11, 0xE7A11  # SeedSequence words: training and held-out scenes never share a stream
#: the kinds of pairs in a training batch and their relative frequencies: the five simple edit types,
#: compound edits (2-3 types) and "resize" (one object's size class flipped; no edit type changes sizes)
PAIR_KINDS = {"add": 1.0, "remove": 1.0, "replace": 2.0, "recolour": 1.0, "background": 2.0, "compound": 1.5,
              "resize": 0.5}
#: the architecture and optimiser settings train_toy_clip uses unless told otherwise
TOY_CLIP_DEFAULTS = dict(steps=600, batch_size=64, lr=2e-3, width=64, layers=2, heads=2, embed_dim=64,
                         patch_size=4, warmup=0.05, weight_decay=0.1, degrade=0.0)
#: the caption of a degraded rendering: the clean caption after this prefix (see :func:`degrade_image`)
DEGRADED_PREFIX = "a noisy blurry picture of "
MAX_SCENE_OBJECTS = 4  # toyworld sources hold <= 3 objects and an "add" brings one more


# ------------------------------------------------------------------------------------------------
# Pure pieces
# ------------------------------------------------------------------------------------------------
def clip_contrastive_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor,
                          caption_ids: torch.Tensor | None = None) -> torch.Tensor:
    """CLIP's symmetric InfoNCE loss (Radford et al. 2021; open_clip ``ClipLoss``), with repeated captions.

    ``logits = s * I T^T`` (``I``, ``T`` the ``(N, D)`` L2-normalised image and text embeddings of N
    image-caption pairs, ``s`` the logit scale), and
    ``L = 1/2 [CE(logits, P) + CE(logits^T, P)]`` where row ``i`` of the target ``P`` is uniform over the
    ``j`` with ``caption_ids[j] == caption_ids[i]`` (the pairs showing the same caption: one image of an
    empty background may match another's caption). With all captions distinct ``P`` is the identity
    and this is exactly ``open_clip.loss.ClipLoss``.
    """
    logits = logit_scale * image_emb @ text_emb.T
    n = logits.shape[0]
    if caption_ids is None:
        target = torch.eye(n, dtype=logits.dtype, device=logits.device)
    else:
        same = (caption_ids[:, None] == caption_ids[None, :]).to(logits.dtype)
        target = same / same.sum(1, keepdim=True)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def lr_at(step: int, steps: int, lr: float, warmup: float) -> float:
    """Learning rate at ``step`` (0-based): linear warm-up over ``warmup * steps`` steps, then cosine to 0."""
    n_warm = max(1, round(warmup * steps))
    if step < n_warm:
        return lr * (step + 1) / n_warm
    progress = (step - n_warm) / max(1, steps - n_warm)
    return lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def caption_token_bound(max_objects: int = MAX_SCENE_OBJECTS) -> int:
    """Most BPE tokens (without start/end) a toy caption with <= ``max_objects`` objects can have.

    open_clip's tokenizer encodes words independently, so the worst caption is built from the longest
    word of each slot: '<a S C Sh>, ..., <a S C Sh> and <a S C Sh> on a <colour style> background <variant>'."""
    from open_clip.tokenizer import SimpleTokenizer

    from viva_base.data.toyworld.scene import (BACKGROUND_COLOURS, OBJECT_COLOURS, SHAPES, SIZES, STYLE_WORDS,
                                               VARIANT_SUFFIX)

    tok = SimpleTokenizer()

    def longest(words):
        return max(words, key=lambda w: len(tok.encode(w)))

    obj = f"a {longest(SIZES)} {longest(OBJECT_COLOURS)} {longest(SHAPES)}"
    objs = [obj] * max_objects
    listed = objs[0] if max_objects == 1 else ", ".join(objs[:-1]) + " and " + objs[-1]
    bg = f"a {longest(BACKGROUND_COLOURS)} {longest(STYLE_WORDS.values())} background{longest(VARIANT_SUFFIX.values())}"
    return len(tok.encode(f"{listed} on {bg}"))


def toy_clip_config(*, size: int = 32, width: int = 64, layers: int = 2, heads: int = 2, embed_dim: int = 64,
                    patch_size: int = 4, context_length: int | None = None, degraded_captions: bool = False) -> dict:
    """The open_clip ``model_cfg``: a ViT over ``patch_size`` patches of ``size x size`` frames and a causal
    text transformer over open_clip's BPE; ``context_length`` defaults to the longest toy caption + 2
    (+ the tokens of :data:`DEGRADED_PREFIX` with ``degraded_captions``)."""
    from open_clip.tokenizer import SimpleTokenizer

    from rewards.tiny import tiny_open_clip_config

    need = caption_token_bound() + 2
    if degraded_captions:
        need += len(SimpleTokenizer().encode(DEGRADED_PREFIX))
    if context_length is None:
        context_length = need
    elif context_length < need:
        raise ValueError(f"context_length={context_length} would truncate toy captions (up to {need} tokens with "
                         f"start/end); use context_length >= {need}")
    if size % patch_size:
        raise ValueError(f"frame size {size} is not a multiple of patch_size {patch_size}; pick a divisor")
    return tiny_open_clip_config(image_size=size, patch_size=patch_size, width=width, layers=layers, heads=heads,
                                 embed_dim=embed_dim, context_length=context_length)


def _flip_size(rng: np.random.Generator, scene):
    """``scene`` with one random object's size class flipped (small <-> large)."""
    i = int(rng.integers(len(scene.objects)))
    objs = list(scene.objects)
    objs[i] = dataclasses.replace(objs[i], size="large" if objs[i].size == "small" else "small")
    return scene.replace(objects=tuple(objs))


def sample_pair(rng: np.random.Generator, kind: str, *, frames: int = 9, size: int = 32):
    """``(source_scene, target_scene)`` for one pair of ``kind`` (a key of :data:`PAIR_KINDS`)."""
    from viva_base.data.toyworld import EDIT_TYPES, compound_combos, random_scene, sample_example
    from viva_base.data.toyworld.pairs import ordered_types
    from viva_base.data.toyworld.render import changed_pixels, render

    if kind in EDIT_TYPES:
        ex = sample_example(rng, [kind], num_frames=frames, height=size, width=size)
        return ex.source, ex.target
    if kind == "compound":
        combos = compound_combos()
        ex = sample_example(rng, ordered_types(rng, combos[int(rng.integers(len(combos)))]), num_frames=frames,
                            height=size, width=size)
        return ex.source, ex.target
    if kind == "resize":
        for _ in range(20):
            src = random_scene(rng, num_frames=frames, height=size, width=size)
            tgt = _flip_size(rng, src)
            if changed_pixels(render(src), render(tgt)).any():
                return src, tgt
        raise RuntimeError("could not sample a visible resize pair in 20 tries")
    raise ValueError(f"unknown pair kind {kind!r}; choose one of {', '.join(PAIR_KINDS)}")


DEGRADATIONS = ("noise", "confetti", "blur", "fade", "blocks")


def degrade_image(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """A damaged copy of a clean ``(H, W, 3)`` float image in [0, 1]: one or two of

    * ``noise``: additive Gaussian noise, std ~ U(0.04, 0.25);
    * ``confetti``: a fraction ~ U(0.03, 0.3) of the pixels replaced by random colours;
    * ``blur``: a 3x3 box blur (edge-replicated), once or twice;
    * ``fade``: contrast and saturation pulled toward the image mean by ~ U(0.2, 0.6);
    * ``blocks``: 2x2 average pooling upsampled back (loss of detail).

    These are generic rendering faults, defined without looking at any editor's outputs; a CLIP that must
    tell a clean frame from its damaged copy (:func:`sample_training_batch` with ``degrade > 0``) embeds
    image quality, the role PickScore plays for real videos (VIVA eq. 7's third term).
    """
    x = image.astype(np.float64)
    h, w, _ = x.shape
    for kind in rng.choice(DEGRADATIONS, size=int(rng.integers(1, 3)), replace=False):
        if kind == "noise":
            x = x + rng.normal(0.0, rng.uniform(0.04, 0.25), x.shape)
        elif kind == "confetti":
            hit = rng.random((h, w)) < rng.uniform(0.03, 0.3)
            x = np.where(hit[..., None], rng.random((h, w, 3)), x)
        elif kind == "blur":
            for _ in range(int(rng.integers(1, 3))):
                pad = np.pad(x, ((1, 1), (1, 1), (0, 0)), mode="edge")
                x = sum(pad[i:i + h, j:j + w] for i in range(3) for j in range(3)) / 9.0
        elif kind == "fade":
            a = rng.uniform(0.2, 0.6)
            x = (1 - a) * x + a * x.mean(axis=(0, 1), keepdims=True).mean(axis=2, keepdims=True)
        else:  # blocks
            x = x[: h // 2 * 2, : w // 2 * 2].reshape(h // 2, 2, w // 2, 2, 3).mean(axis=(1, 3))
            x = x.repeat(2, axis=0).repeat(2, axis=1)
    return np.clip(x, 0.0, 1.0).astype(np.float32)


def sample_training_batch(rng: np.random.Generator, n_pairs: int, *, frames: int = 9, size: int = 32,
                          degrade: float = 0.0) -> tuple[torch.Tensor, list[str]]:
    """``n_pairs`` hard-negative pairs: images ``(2 n_pairs + d, 3, size, size)`` float32 in [0, 1] (source then
    target of each pair, both at the same random frame index) and their captions.

    With ``degrade > 0`` each pair also brings, with that probability, a damaged copy of one of its two
    images (:func:`degrade_image`) captioned ``DEGRADED_PREFIX + caption``: a hard negative that differs from a
    clean image only in quality, appended after the pairs (``d`` of them)."""
    from viva_base.data.toyworld import caption
    from viva_base.data.toyworld.render import render

    kinds = list(PAIR_KINDS)
    p = np.array([PAIR_KINDS[k] for k in kinds])
    images, captions, damaged, damaged_caps = [], [], [], []
    for _ in range(n_pairs):
        src, tgt = sample_pair(rng, kinds[rng.choice(len(kinds), p=p / p.sum())], frames=frames, size=size)
        f = int(rng.integers(frames))
        for scene in (src, tgt):
            images.append(render(scene)[f].astype(np.float32) / 255.0)
            captions.append(caption(scene))
        if degrade > 0 and rng.random() < degrade:
            k = len(images) - 2 + int(rng.integers(2))
            damaged.append(degrade_image(rng, images[k]))
            damaged_caps.append(DEGRADED_PREFIX + captions[k])
    pixels = torch.from_numpy(np.stack(images + damaged)).permute(0, 3, 1, 2).contiguous()
    return pixels, captions + damaged_caps


# ------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------
def _read_meta(folder: Path) -> dict | None:
    try:
        return json.loads((folder / META_FILE).read_text())
    except (OSError, ValueError):
        return None


def _is_finished(folder: Path, params: dict) -> bool:
    meta = _read_meta(folder)
    return (meta is not None and meta.get("params") == params and (folder / "open_clip_config.json").is_file()
            and (folder / "open_clip_model.safetensors").is_file())


class ToyClipError(UserError, ValueError):
    """A toy CLIP parameter no model can be trained with; the CLI prints it as one line, exit code 2."""


class ToyClipFolderError(UserError, FileExistsError):
    """``out_dir`` exists and holds something other than a toy CLIP."""


def check_toy_clip_params(*, steps: int, batch_size: int, lr: float, frames: int, size: int, width: int, layers: int,
                          heads: int, patch_size: int, degrade: float, num_threads: int) -> None:
    """Refuse, before any work, the toy CLIP parameters that would fail (or train nothing) later: one
    :class:`ToyClipError` naming the value and what it must be."""
    def need(ok: bool, message: str) -> None:
        if not ok:
            raise ToyClipError(message)

    need(steps >= 1, f"steps={steps}: must be >= 1")
    need(batch_size >= 2 and batch_size % 2 == 0,
         f"batch_size={batch_size}: must be an even number >= 2 (source + target of each pair)")
    need(lr > 0, f"lr={lr}: must be > 0")
    need(frames >= 1, f"frames={frames}: must be >= 1")
    need(size >= 8 and patch_size >= 1 and size % patch_size == 0,
         f"size={size}: frames must be at least 8 px and a multiple of the patch size {patch_size}")
    need(layers >= 1, f"layers={layers}: must be >= 1")
    need(heads >= 1 and width >= heads and width % heads == 0,
         f"width={width}: must be a positive multiple of the {heads} attention heads")
    need(0.0 <= degrade <= 1.0, f"degrade={degrade}: a probability in [0, 1]")
    need(num_threads >= 1, f"num_threads={num_threads}: must be >= 1")


def train_toy_clip(
    out_dir: str | os.PathLike,
    *,
    seed: int = 0,
    steps: int = TOY_CLIP_DEFAULTS["steps"],
    batch_size: int = TOY_CLIP_DEFAULTS["batch_size"],
    lr: float = TOY_CLIP_DEFAULTS["lr"],
    frames: int = 9,
    size: int = 32,
    width: int = TOY_CLIP_DEFAULTS["width"],
    layers: int = TOY_CLIP_DEFAULTS["layers"],
    heads: int = TOY_CLIP_DEFAULTS["heads"],
    embed_dim: int = TOY_CLIP_DEFAULTS["embed_dim"],
    patch_size: int = TOY_CLIP_DEFAULTS["patch_size"],
    warmup: float = TOY_CLIP_DEFAULTS["warmup"],
    weight_decay: float = TOY_CLIP_DEFAULTS["weight_decay"],
    degrade: float = TOY_CLIP_DEFAULTS["degrade"],
    num_threads: int = 1,
    progress: bool = True,
) -> str:
    """Train the toy CLIP into ``out_dir`` (or find it there) and return its reward model name,
    ``"open_clip:local-dir:<absolute out_dir>"``.

    ``batch_size`` counts image-caption pairs (an even number: half sources, half their edited targets).
    ``degrade``: the probability that a pair also brings a damaged copy of one image as a quality hard
    negative (:func:`sample_training_batch`), so that the CLIP's similarities fall on noisy or blurred frames.
    ``num_threads`` torch CPU threads are used while training (the weights are bit-identical for the same
    parameters and thread count). If ``out_dir`` holds a model trained with the same parameters it is
    returned at once; one trained with other parameters is replaced; any other non-empty folder is an error.
    """
    out = Path(out_dir).resolve()  # a linked folder (a benchmark run sharing the chain's) is filled, not replaced
    check_toy_clip_params(steps=steps, batch_size=batch_size, lr=lr, frames=frames, size=size, width=width,
                          layers=layers, heads=heads, patch_size=patch_size, degrade=degrade, num_threads=num_threads)
    model_cfg = toy_clip_config(size=size, width=width, layers=layers, heads=heads, embed_dim=embed_dim,
                                patch_size=patch_size, degraded_captions=degrade > 0)
    params = dict(format=FORMAT_VERSION, seed=int(seed), steps=int(steps), batch_size=int(batch_size), lr=float(lr),
                  frames=int(frames), size=int(size), warmup=float(warmup), weight_decay=float(weight_decay),
                  num_threads=int(num_threads), pair_kinds=PAIR_KINDS, model_cfg=model_cfg)
    if degrade > 0:  # absent when off, so models trained before this option still count as the same
        params["degrade"] = float(degrade)
    params = json.loads(json.dumps(params))  # the form it has once read back from disk
    name = f"open_clip:local-dir:{out}"
    if _is_finished(out, params):
        logger.info("toy CLIP found in %s (same parameters): not retraining", out)
        return name
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and _read_meta(out) is None)):
        raise ToyClipFolderError(f"{out} exists and does not hold a toy CLIP; give an empty or new --out folder")
    if _read_meta(out) is not None:
        logger.info("%s holds a toy CLIP trained with other parameters: retraining it", out)

    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    except OSError as exc:
        raise ToyClipFolderError(f"cannot write the toy CLIP into {out}: {exc.strerror}; give a writable --out folder"
                                 ) from None
    try:
        stats = _train(tmp, model_cfg, params, progress=progress)
        (tmp / META_FILE).write_text(json.dumps({"params": params, "stats": stats}, indent=2))
        _move_into_place(tmp, out, params)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    from rewards.clip import clear_clip_cache

    clear_clip_cache()  # a CLIP loaded earlier from this folder would now be stale
    return name


def _move_into_place(tmp: Path, out: Path, params: dict) -> None:
    """Rename the finished ``tmp`` folder to ``out``, replacing an older toy CLIP there."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    try:
        os.replace(tmp, out)
    except OSError:
        if not _is_finished(out, params):  # not another process that just finished the same model
            raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _fused_if_available() -> dict:
    """``{"fused": True}`` where torch has the fused CPU AdamW (several times faster here, same math)."""
    import inspect

    return {"fused": True} if "fused" in inspect.signature(torch.optim.AdamW).parameters else {}


def clip_optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """open_clip's AdamW for a CLIP: weight decay on the >= 2-D weights except embeddings, betas (0.9, 0.98)."""
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, 0.98), eps=1e-6, **_fused_if_available())


def clip_step(opt: torch.optim.Optimizer, model: torch.nn.Module, loss: torch.Tensor) -> None:
    """One optimiser step on ``loss``, then the logit scale clamped to ``<= 100`` as CLIP does."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    with torch.no_grad():
        model.logit_scale.clamp_(0, math.log(100))


def _train(folder: Path, model_cfg: dict, params: dict, *, progress: bool) -> dict:
    import open_clip
    from open_clip.model import CLIP
    from open_clip.transform import PreprocessCfg
    from tqdm.auto import tqdm

    from rewards.tiny import save_open_clip

    steps, n_pairs = params["steps"], params["batch_size"] // 2
    pp = PreprocessCfg(size=params["size"])
    mean = torch.tensor(pp.mean).view(1, 3, 1, 1)
    std = torch.tensor(pp.std).view(1, 3, 1, 1)
    tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=model_cfg["text_cfg"]["context_length"])

    threads = torch.get_num_threads()
    torch.set_num_threads(params["num_threads"])
    start, cpu_start = time.perf_counter(), time.process_time()
    losses = []
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(params["seed"])
            model = CLIP(**model_cfg)
        model.train()
        opt = clip_optimizer(model, params["lr"], params["weight_decay"])
        bar = tqdm(range(steps), desc="toy CLIP", disable=not progress)
        for step in bar:
            rng = np.random.default_rng(np.random.SeedSequence([params["seed"], TRAIN_STREAM, step]))
            pixels, captions = sample_training_batch(rng, n_pairs, frames=params["frames"], size=params["size"],
                                                     degrade=params.get("degrade", 0.0))
            _, caption_ids = np.unique(captions, return_inverse=True)
            for group in opt.param_groups:
                group["lr"] = lr_at(step, steps, params["lr"], params["warmup"])
            img = model.encode_image((pixels - mean) / std, normalize=True)
            txt = model.encode_text(tokenizer(captions), normalize=True)
            loss = clip_contrastive_loss(img, txt, model.logit_scale.exp(), torch.from_numpy(caption_ids.ravel()))
            clip_step(opt, model, loss)
            losses.append(float(loss.detach()))
            if step % 20 == 0 or step == steps - 1:
                bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
        model.eval()
        save_open_clip(model, model_cfg, folder)
    finally:
        torch.set_num_threads(threads)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    logger.info("toy CLIP: %d steps in %.1f s (%.1f s of CPU), final loss %.3f", steps, seconds, cpu_seconds,
                np.mean(losses[-20:]))
    return {"seconds": round(seconds, 2), "cpu_seconds": round(cpu_seconds, 2), "final_loss": float(np.mean(losses[-20:])),
            "first_loss": float(losses[0]), "logit_scale": float(model.logit_scale.detach().exp())}


# ------------------------------------------------------------------------------------------------
# Held-out quality
# ------------------------------------------------------------------------------------------------
def heldout_pairs(kind: str, n: int, *, seed: int = 0, frames: int = 9, size: int = 32) -> list:
    """``n`` held-out ``(source, target)`` scene pairs of ``kind`` from a stream training never draws from."""
    k = list(PAIR_KINDS).index(kind)
    return [sample_pair(np.random.default_rng(np.random.SeedSequence([seed, EVAL_STREAM, k, i])), kind,
                        frames=frames, size=size) for i in range(n)]


@torch.no_grad()
def evaluate_toy_clip(model: str, *, kinds: Sequence[str] = ("add", "remove", "replace", "recolour", "background",
                                                              "compound"),
                      pairs_per_kind: int = 50, seed: int = 0, frames: int = 9, size: int = 32,
                      num_threads: int | None = None) -> dict:
    """Held-out quality of a CLIP named ``model``, per pair kind:

    * ``retrieval``: over every frame where source and target differ, the fraction of frames whose own
      caption scores higher than the other caption of the pair (source frames vs the target caption and
      target frames vs the source caption);
    * ``clip_if_sign``: the fraction of pairs with ``clip_if(V_tgt) > clip_if(V_src)`` (both scored with
      ``t_src`` and ``t_edit`` = the target caption), computed through the rewards registry;
    * ``clip_sp``: mean ``clip_sp(V_tgt, V_src)``;
    * ``quality``: the fraction of target frames that score higher with their caption than a damaged copy
      (:func:`degrade_image`) does, and ``clip_sp_damaged``: mean ``clip_sp`` of the damaged target video
      against the clean one (1 = the CLIP cannot see the damage).

    ``num_threads``: torch CPU threads while evaluating (``None``: as set); one thread is fastest for
    this tiny model on a busy machine.
    """
    threads = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        return _evaluate(model, kinds, pairs_per_kind, seed, frames, size)
    finally:
        torch.set_num_threads(threads)


def _evaluate(model: str, kinds: Sequence[str], pairs_per_kind: int, seed: int, frames: int, size: int) -> dict:
    from rewards import CombinedReward
    from rewards.clip import load_clip
    from viva_base.data.toyworld import caption
    from viva_base.data.toyworld.render import changed_pixels, render

    clip_if = CombinedReward.from_config({"clip_if": {"weight": 1.0, "model": model}})
    clip_sp = CombinedReward.from_config({"clip_sp": {"weight": 1.0, "model": model}})
    scorer = load_clip(model)
    out = {}
    for kind in kinds:
        pairs = heldout_pairs(kind, pairs_per_kind, seed=seed, frames=frames, size=size)
        src_np = [render(s) for s, _ in pairs]
        tgt_np = [render(t) for _, t in pairs]
        src = torch.from_numpy(np.stack(src_np)).permute(0, 1, 4, 2, 3).float() / 255.0
        tgt = torch.from_numpy(np.stack(tgt_np)).permute(0, 1, 4, 2, 3).float() / 255.0
        s_cap = [caption(s) for s, _ in pairs]
        t_cap = [caption(t) for _, t in pairs]
        b = len(pairs)
        # retrieval, on the frames where the edit is visible
        visible = torch.from_numpy(np.stack([changed_pixels(x, y).reshape(frames, -1).any(1)
                                             for x, y in zip(src_np, tgt_np)]))
        emb = scorer.encode_images(torch.cat([src, tgt]).flatten(0, 1)).view(2, b, frames, -1)
        ts, tt = scorer.encode_texts(s_cap), scorer.encode_texts(t_cap)
        margin_src = (emb[0] * ts[:, None]).sum(-1) - (emb[0] * tt[:, None]).sum(-1)  # > 0: right
        margin_tgt = (emb[1] * tt[:, None]).sum(-1) - (emb[1] * ts[:, None]).sum(-1)
        right = torch.cat([(margin_src > 0)[visible], (margin_tgt > 0)[visible]]).float()
        # the rewards, through the registry
        texts = dict(source_captions=s_cap, target_captions=t_cap, instructions=[""] * b)
        if_tgt = clip_if(tgt, src, **texts).total
        if_src = clip_if(src, src, **texts).total
        # quality: the target video against a damaged copy of itself
        rng = np.random.default_rng(np.random.SeedSequence([seed, EVAL_STREAM, 99, list(PAIR_KINDS).index(kind)]))
        bad = torch.from_numpy(np.stack([[degrade_image(rng, fr.astype(np.float32) / 255.0) for fr in v]
                                         for v in tgt_np])).permute(0, 1, 4, 2, 3).contiguous()
        emb_bad = scorer.encode_images(bad.flatten(0, 1)).view(b, frames, -1)
        better = ((emb[1] * tt[:, None]).sum(-1) > (emb_bad * tt[:, None]).sum(-1)).float()
        out[kind] = {"retrieval": float(right.mean()), "frames": int(right.numel()), "pairs": b,
                     "clip_if_sign": float((if_tgt > if_src).float().mean()),
                     "clip_sp": float(clip_sp(tgt, src, **texts).total.mean()),
                     "quality": float(better.mean()),
                     "clip_sp_damaged": float(clip_sp(bad, tgt, **texts).total.mean())}
    return out


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------
_FLAGS = {"steps": "--steps", "batch_size": "--batch-size", "lr": "--lr", "frames": "--frames", "size": "--size",
          "width": "--width", "layers": "--layers", "degrade": "--degrade", "num_threads": "--threads"}


def main(argv: Sequence[str] | None = None) -> int:
    d = TOY_CLIP_DEFAULTS
    p = argparse.ArgumentParser(prog="python -m editgrpo.toy_reward",
                                description="Train the toy-world CLIP reward model (cached in --out).")
    p.add_argument("--out", required=True, help="folder to write the model to (reused if already trained)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=d["steps"])
    p.add_argument("--batch-size", type=int, default=d["batch_size"], help="image-caption pairs per step (even)")
    p.add_argument("--lr", type=float, default=d["lr"])
    p.add_argument("--frames", type=int, default=9)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--width", type=int, default=d["width"])
    p.add_argument("--layers", type=int, default=d["layers"])
    p.add_argument("--degrade", type=float, default=d["degrade"],
                   help="probability that a pair brings a damaged copy as a quality hard negative")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads while training")
    p.add_argument("--eval-pairs", type=int, default=50, help="held-out pairs per edit type to report (0: skip)")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    if a.eval_pairs < 0:
        p.error(f"--eval-pairs {a.eval_pairs}: give a count >= 0 (0 skips the evaluation)")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logger.setLevel(logging.INFO)
    try:
        name = train_toy_clip(a.out, seed=a.seed, steps=a.steps, batch_size=a.batch_size, lr=a.lr, frames=a.frames,
                              size=a.size, width=a.width, layers=a.layers, degrade=a.degrade, num_threads=a.threads,
                              progress=not a.no_progress)
    except UserError as exc:  # "batch_size=3: ..." names the parameter: say it as its flag, "--batch-size 3: ..."
        message = str(exc)
        key, _, rest = message.partition("=")
        if key in _FLAGS:
            message = f"{_FLAGS[key]} {rest}"
        print(f"error: {message}", file=sys.stderr)
        return 2
    meta = _read_meta(Path(a.out))
    print(f"model: {name}")
    st = meta["stats"]
    print(f"trained in {st['seconds']:.1f} s, {st['cpu_seconds']:.1f} s of CPU (final loss {st['final_loss']:.3f})")
    if a.eval_pairs > 0:
        res = evaluate_toy_clip(name, pairs_per_kind=a.eval_pairs, seed=a.seed, frames=a.frames, size=a.size,
                                num_threads=a.threads)
        print(f"{'edit type':<12} {'retrieval':>9} {'clip_if>':>9} {'clip_sp':>8} {'quality':>8} {'sp_damaged':>10}")
        for kind, r in res.items():
            print(f"{kind:<12} {r['retrieval']:>9.3f} {r['clip_if_sign']:>9.3f} {r['clip_sp']:>8.3f} "
                  f"{r['quality']:>8.3f} {r['clip_sp_damaged']:>10.3f}")
    print(f'rewards config:\n  clip_if: {{weight: 1.0, model: "{name}"}}\n  clip_sp: {{weight: 0.5, model: "{name}"}}')
    return 0


if __name__ == "__main__":
    from viva_base.errors import exit_with

    exit_with(main)
