"""CLIP models for rewards (two backends, loaded once per process) and the CLIP rewards.

How a CLIP is named (the ``model`` option of every CLIP-based reward):

* ``"hf:<hub id or local dir>"`` (or a bare hub id / local dir): a transformers ``CLIPModel``;
  the tokenizer and image-processor config come from the same place, or from ``processor``
  when given (PickScore: model ``yuvalkirstain/PickScore_v1``, processor
  ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``).
* ``"open_clip:<arch>"`` + ``pretrained=<tag or local weights file>``: an open_clip architecture
  (``open_clip.list_models()``) with a pretrained tag or a local ``.safetensors`` / ``.pt`` file
  (``{"state_dict": ...}`` and ``module.`` prefixes are handled, so HPS checkpoints load as they are);
* ``"open_clip:local-dir:<dir>"`` (or ``"open_clip:<dir>"``): a folder with ``open_clip_config.json``
  and ``open_clip_model.safetensors`` (what :func:`rewards.tiny.make_tiny_open_clip` writes);
  ``pretrained=<file>`` then overrides the weights found there;
* ``"open_clip:hf-hub:<repo>"``: an open_clip model on the hub.

Nothing here downloads unless the name is a hub id / tag and the machine is online.

Images are preprocessed with torch ops on the tensors (no PIL round trip): resize to the model's
size the way its own preprocessing does (shortest side + center crop, squash, or longest side +
pad), antialiased bicubic, then normalise with the model's own mean/std. All frames of a call go
through ONE batched forward (``max_batch`` splits it when memory demands).
"""
from __future__ import annotations

import inspect
import logging
import os
import threading
from collections.abc import Sequence
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .base import FrameSpec, Reward, RewardOutput
from .registry import register_reward

logger = logging.getLogger(__name__)

__all__ = [
    "ClipImageRewardBase",
    "ClipInstructionFollowing",
    "ClipScorer",
    "ClipSourcePreservation",
    "ClipSpec",
    "ImagePreprocess",
    "clear_clip_cache",
    "clip_if_score",
    "clip_sp_score",
    "frame_text_similarity",
    "load_clip",
    "parse_clip_spec",
]

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# ------------------------------------------------------------------------------------------------
# The math (paper section 3.3)
# ------------------------------------------------------------------------------------------------
def frame_text_similarity(image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
    """``C(V, t) = 1/F sum_f cos(E_I(v_f), E_T(t))``, the frame-averaged CLIP similarity of eqs. 4 and 6.

    Args:
        image_emb: ``(B, F, D)`` L2-normalised frame embeddings.
        text_emb: ``(B, D)`` L2-normalised text embeddings.
    Returns:
        ``(B,)``.
    """
    return (image_emb * text_emb[:, None, :]).sum(-1).mean(-1)


def clip_if_score(image_emb: torch.Tensor, edit_text_emb: torch.Tensor, src_text_emb: torch.Tensor) -> torch.Tensor:
    """Eq. 4, instruction following: ``R_IF = C(V_edit, t_edit) - C(V_edit, t_src)``.

    Exactly 0 when ``t_edit == t_src`` (both terms are the same computation on the same numbers).
    Shapes as in :func:`frame_text_similarity`; returns ``(B,)``.
    """
    return frame_text_similarity(image_emb, edit_text_emb) - frame_text_similarity(image_emb, src_text_emb)


def clip_sp_score(source_emb: torch.Tensor, edited_emb: torch.Tensor) -> torch.Tensor:
    """Eq. 5, source preservation: ``R_SP = 1/F sum_f cos(E_I(v_src,f), E_I(v_edit,f))``.

    Args:
        source_emb, edited_emb: ``(B, F, D)`` L2-normalised embeddings of matching frames.
    Returns:
        ``(B,)``; 1 when the videos are identical.
    """
    return (source_emb * edited_emb).sum(-1).mean(-1)


# ------------------------------------------------------------------------------------------------
# Naming and preprocessing
# ------------------------------------------------------------------------------------------------
def clip_direction_score(source_emb: torch.Tensor, edited_emb: torch.Tensor, src_text_emb: torch.Tensor,
                         edit_text_emb: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Directional CLIP similarity (Gal et al. 2022, StyleGAN-NADA eq. 4; InstructPix2Pix's "CLIP direction"),
    frame-averaged: ``1/F sum_f cos(E_I(v_edit,f) - E_I(v_src,f), E_T(t_edit) - E_T(t_src))``: does the video change
    the way the caption changes? Embeddings ``(B, F, D)`` (images) and ``(B, D)`` (texts), L2-normalised; a frame
    with no change scores 0 (its difference is below ``eps``)."""
    d_img = edited_emb - source_emb
    d_txt = edit_text_emb - src_text_emb
    d_img = d_img / d_img.norm(dim=-1, keepdim=True).clamp_min(eps)
    d_txt = d_txt / d_txt.norm(dim=-1, keepdim=True).clamp_min(eps)
    return (d_img * d_txt[:, None, :]).sum(-1).mean(1)


@dataclass(frozen=True)
class ClipSpec:
    """Which CLIP to load: ``backend`` is ``"hf"`` or ``"open_clip"``; ``name`` the hub id, folder or
    open_clip architecture; ``pretrained`` an open_clip tag or weights file; ``processor`` where an
    hf model's tokenizer and image-processor config live when not next to the weights."""

    backend: str
    name: str
    pretrained: str | None = None
    processor: str | None = None


def parse_clip_spec(model: str | ClipSpec, pretrained: str | None = None, processor: str | None = None) -> ClipSpec:
    """Parse ``"hf:<id|dir>"``, ``"open_clip:<arch|local-dir:dir|hf-hub:repo|dir>"`` or a bare id/dir (= hf)."""
    if isinstance(model, ClipSpec):
        return model
    if not isinstance(model, str) or not model:
        raise ValueError(f"invalid CLIP model name {model!r}: use 'hf:<hub id or dir>' or 'open_clip:<arch>' "
                         f"with pretrained=<tag or file>")
    if model.startswith("tiny:"):
        return tiny_clip_spec(model)
    if model.startswith("open_clip:"):
        name = model[len("open_clip:"):]
        if os.path.isdir(name):
            name = "local-dir:" + name
        if processor is not None:
            raise ValueError("processor= applies to hf CLIP models only; open_clip models carry their own preprocessing")
        return ClipSpec("open_clip", name, pretrained=str(pretrained) if pretrained is not None else None)
    name = model[len("hf:"):] if model.startswith("hf:") else model
    if pretrained is not None:
        raise ValueError(f"pretrained= applies to open_clip models only; for hf models put the weights in the "
                         f"folder given as model (got model={model!r}, pretrained={pretrained!r})")
    return ClipSpec("hf", name, processor=str(processor) if processor is not None else None)


def tiny_clip_spec(model: str) -> ClipSpec:
    """``"tiny:hf[:seed]"`` / ``"tiny:open_clip[:seed]"``: a tiny random CLIP (rewards.tiny) saved once per
    machine into a cache folder and loaded through the normal loader, exactly like real weights. For tests and
    smoke recipes that must run with no prior step; its scores carry no meaning."""
    import shutil
    import tempfile
    from pathlib import Path

    from .tiny import make_tiny_hf_clip, make_tiny_open_clip

    parts = model.split(":")
    kind = parts[1] if len(parts) > 1 else ""
    if kind not in ("hf", "open_clip") or len(parts) > 3:
        raise ValueError(f"invalid tiny CLIP name {model!r}: use 'tiny:hf', 'tiny:open_clip' or 'tiny:hf:<seed>'")
    seed = int(parts[2]) if len(parts) == 3 else 0
    root = Path(os.environ.get("EDITGRPO_CACHE", Path(tempfile.gettempdir()) / "editgrpo-cache")) / "tiny-clip"
    folder = root / f"{kind}-{seed}"
    if not (folder / ".complete").exists():
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=root))
        try:
            (make_tiny_hf_clip if kind == "hf" else make_tiny_open_clip)(tmp, seed=seed)
            (tmp / ".complete").write_text("ok")
            if folder.exists():
                shutil.rmtree(folder, ignore_errors=True)
            try:
                os.replace(tmp, folder)
            except OSError:  # another process finished first
                pass
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return ClipSpec("hf", str(folder)) if kind == "hf" else ClipSpec("open_clip", f"local-dir:{folder}")


@dataclass(frozen=True)
class ImagePreprocess:
    """The model's own image preprocessing, done with torch ops on ``(N, 3, H, W)`` tensors in [0, 1].

    ``resize_mode``: ``"shortest"`` (resize the short side to the crop size, center crop; CLIP's
    default), ``"squash"`` (resize to the size directly) or ``"longest"`` (resize the long side, pad
    with ``fill``; ``fill=None``: with the normalisation mean, i.e. zeros after normalising).
    """

    size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    resize_mode: str = "shortest"
    interpolation: str = "bicubic"
    fill: float | None = 0.0
    #: "shortest": the short-side length before the crop (default: the larger crop side);
    #: "squash": the (h, w) resized to before the crop (default: ``size``)
    resize_to: int | tuple[int, int] | None = None
    #: center-crop offset: ``"round"`` (torchvision / open_clip) or ``"floor"`` (transformers)
    crop_offset: str = "round"
    #: clamp resized pixels to [0, 1] (open_clip resizes 8-bit PIL images; transformers does not clamp)
    clamp: bool = True

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        th, tw = self.size
        h, w = images.shape[-2:]
        if self.resize_mode == "squash":
            images = _resize(images, tuple(self.resize_to or self.size), self.interpolation, self.clamp)
            images = _center_crop(images, (th, tw), self.crop_offset)
        elif self.resize_mode == "longest":
            scale = min(th / h, tw / w)
            nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
            images = _resize(images, (nh, nw), self.interpolation, self.clamp)
            top, left = (th - nh) // 2, (tw - nw) // 2
            border = (left, tw - nw - left, top, th - nh - top)
            if self.fill is None:  # the mean colour: pad the normalised images with zeros
                return F.pad(self.normalise(images), border, value=0.0)
            images = F.pad(images, border, value=self.fill)
        elif self.resize_mode == "shortest":
            short = int(self.resize_to) if self.resize_to is not None else max(th, tw)
            # like torchvision's Resize(int): the short side becomes `short`, the long side is truncated
            nh, nw = (short, int(short * w / h)) if h <= w else (int(short * h / w), short)
            images = _center_crop(_resize(images, (nh, nw), self.interpolation, self.clamp), (th, tw),
                                  self.crop_offset)
        else:
            raise ValueError(f"unknown resize_mode {self.resize_mode!r}: use 'shortest', 'squash' or 'longest'")
        return self.normalise(images)

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.mean, device=images.device, dtype=images.dtype).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=images.device, dtype=images.dtype).view(1, -1, 1, 1)
        return (images - mean) / std

    def whole_frame(self) -> "ImagePreprocess":
        """This preprocessing with the whole frame kept: scaled to fit the model's input, padded with the mean
        colour (instead of a centre crop, which keeps the middle 56% of a 16:9 frame)."""
        return dataclasses.replace(self, resize_mode="longest", fill=None)


def _center_crop(images: torch.Tensor, size: tuple[int, int], offset: str = "round") -> torch.Tensor:
    th, tw = size
    h, w = images.shape[-2:]
    if (h, w) == (th, tw):
        return images
    if h < th or w < tw:  # pad the short side symmetrically (as the hf image processors do)
        ph, pw = max(th - h, 0), max(tw - w, 0)
        images = F.pad(images, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
        h, w = images.shape[-2:]
    if offset == "floor":
        top, left = int((h - th) / 2.0), int((w - tw) / 2.0)
    else:
        top, left = int(round((h - th) / 2.0)), int(round((w - tw) / 2.0))
    return images[..., top : top + th, left : left + tw]


def _resize(images: torch.Tensor, size: tuple[int, int], interpolation: str, clamp: bool = True) -> torch.Tensor:
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    mode = interpolation if interpolation in ("bicubic", "bilinear", "nearest") else "bicubic"
    kwargs = {"align_corners": False, "antialias": True} if mode != "nearest" else {}
    images = F.interpolate(images, size=size, mode=mode, **kwargs)
    return images.clamp(0, 1) if clamp else images


# ------------------------------------------------------------------------------------------------
# Scorers
# ------------------------------------------------------------------------------------------------
class ClipScorer:
    """A loaded CLIP in eval mode: ``encode_images`` / ``encode_texts`` return L2-normalised float32
    embeddings; ``logit_scale`` is ``exp(model.logit_scale)``. Get one with :func:`load_clip`."""

    backend: str = ""

    def __init__(self, model: torch.nn.Module, preprocess: ImagePreprocess, device: torch.device, dtype: torch.dtype):
        self.model = model.eval().requires_grad_(False)
        self.preprocess = preprocess
        self.device = device
        self.dtype = dtype

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.detach().float().exp())

    def _image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _text_features(self, texts: list[str]) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def encode_images(self, frames: torch.Tensor | Sequence[torch.Tensor], max_batch: int | None = None,
                      preprocess: ImagePreprocess | None = None) -> torch.Tensor:
        """Embed images: ``frames`` is ``(N, 3, H, W)`` in [0, 1] or a list of such tensors (sizes may
        differ between tensors; the result stacks them in order). Returns ``(N_total, D)`` float32 on
        the model's device, L2-normalised. One forward for all images unless ``max_batch`` splits it.
        ``preprocess``: instead of the model's own (e.g. ``self.preprocess.whole_frame()``)."""
        parts = [frames] if isinstance(frames, torch.Tensor) else list(frames)
        preprocess = preprocess or self.preprocess
        pixels = torch.cat(
            [preprocess(p.to(device=self.device, dtype=torch.float32)) for p in parts], dim=0
        ).to(self.dtype)
        step = pixels.shape[0] if not max_batch else max_batch
        feats = [self._image_features(pixels[i : i + step]) for i in range(0, pixels.shape[0], max(step, 1))]
        return F.normalize(torch.cat(feats).float(), dim=-1)

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Embed texts: ``(len(texts), D)`` float32, L2-normalised. Duplicates are embedded once, so
        equal strings give bitwise-equal rows."""
        unique = list(dict.fromkeys(texts))
        feats = F.normalize(self._text_features(unique).float(), dim=-1)
        index = {t: i for i, t in enumerate(unique)}
        return feats[torch.tensor([index[t] for t in texts], device=feats.device, dtype=torch.long)]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(device={self.device}, dtype={self.dtype})"


class HFClipScorer(ClipScorer):
    backend = "hf"

    def __init__(self, model, tokenizer, preprocess, device, dtype, max_length: int):
        super().__init__(model, preprocess, device, dtype)
        self.tokenizer = tokenizer
        self.max_length = max_length

    def _image_features(self, pixels):
        out = self.model.get_image_features(pixel_values=pixels)
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    def _text_features(self, texts):
        # Pad to the fixed maximum length so a text's embedding never depends on the other texts.
        tok = self.tokenizer(texts, padding="max_length", truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        out = self.model.get_text_features(input_ids=tok["input_ids"].to(self.device),
                                           attention_mask=tok["attention_mask"].to(self.device))
        return out if isinstance(out, torch.Tensor) else out.pooler_output


class OpenClipScorer(ClipScorer):
    backend = "open_clip"

    def __init__(self, model, tokenizer, preprocess, device, dtype):
        super().__init__(model, preprocess, device, dtype)
        self.tokenizer = tokenizer

    def _image_features(self, pixels):
        return self.model.encode_image(pixels)

    def _text_features(self, texts):
        return self.model.encode_text(self.tokenizer(texts).to(self.device))


_CACHE: dict[tuple, ClipScorer] = {}
_CACHE_LOCK = threading.Lock()


def _as_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if dtype not in names:
        raise ValueError(f"unknown dtype {dtype!r}: use one of {sorted(names)}")
    return names[dtype]


def load_clip(
    model: str | ClipSpec,
    *,
    pretrained: str | None = None,
    processor: str | None = None,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = torch.float32,
) -> ClipScorer:
    """Load a CLIP once per process (cached by backend, name, weights, processor, device and dtype).

    See the module doc for how ``model`` names a CLIP. Raises a one-line error when weights are
    missing (an open_clip architecture without ``pretrained`` would be random: refused).
    """
    spec = parse_clip_spec(model, pretrained, processor)
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    dtype = _as_dtype(dtype)
    key = (spec, str(device), dtype)
    with _CACHE_LOCK:
        scorer = _CACHE.get(key)
        if scorer is None:
            logger.info("loading CLIP %s:%s on %s (%s)", spec.backend, spec.name, device, dtype)
            scorer = (_load_hf if spec.backend == "hf" else _load_open_clip)(spec, device, dtype)
            _CACHE[key] = scorer
    return scorer


def clear_clip_cache() -> None:
    """Drop every cached CLIP (frees their memory once no reward holds them)."""
    with _CACHE_LOCK:
        _CACHE.clear()


def _hf_preprocess(image_processor) -> ImagePreprocess:
    size = dict(getattr(image_processor, "size", None) or {})
    crop = dict(getattr(image_processor, "crop_size", None) or {})
    do_crop = getattr(image_processor, "do_center_crop", True)
    mean = tuple(float(m) for m in (getattr(image_processor, "image_mean", None) or OPENAI_CLIP_MEAN))
    std = tuple(float(s) for s in (getattr(image_processor, "image_std", None) or OPENAI_CLIP_STD))
    if "shortest_edge" in size:
        short = int(size["shortest_edge"])
        target = (int(crop["height"]), int(crop["width"])) if do_crop and crop else (short, short)
        return ImagePreprocess(target, mean, std, "shortest", resize_to=short, crop_offset="floor", clamp=False)
    if "height" in size and "width" in size:
        resize = (int(size["height"]), int(size["width"]))
        target = (int(crop["height"]), int(crop["width"])) if do_crop and crop else resize
        return ImagePreprocess(target, mean, std, "squash", resize_to=resize, crop_offset="floor", clamp=False)
    raise ValueError(f"unsupported image-processor size {size!r} (expected shortest_edge or height/width)")


def _load_hf(spec: ClipSpec, device: torch.device, dtype: torch.dtype) -> ClipScorer:
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

    source = spec.processor or spec.name
    try:
        model = CLIPModel.from_pretrained(spec.name)
        tokenizer = AutoTokenizer.from_pretrained(source)
        image_processor = AutoImageProcessor.from_pretrained(source)
    except OSError as e:
        reason = " ".join(str(e).split()).rstrip(".")
        raise OSError(f"cannot load the transformers CLIP {spec.name!r} (processor {source!r}): {reason}. "
                      f"Give a local folder (save_pretrained) or download it first; offline runs cannot "
                      f"reach the hub") from e
    model = model.to(device=device, dtype=dtype)
    max_length = int(model.config.text_config.max_position_embeddings)
    tok_max = getattr(tokenizer, "model_max_length", None)
    if isinstance(tok_max, int) and 0 < tok_max < max_length:
        max_length = tok_max
    return HFClipScorer(model, tokenizer, _hf_preprocess(image_processor), device, dtype, max_length)


def _has_weights(folder: str) -> bool:
    return any(Path(folder).glob(pattern) for pattern in ("*.safetensors", "*.bin", "*.pth", "*.pt"))


def _load_open_clip(spec: ClipSpec, device: torch.device, dtype: torch.dtype) -> ClipScorer:
    import open_clip

    name, pretrained = spec.name, spec.pretrained
    has_schema = name.startswith(("local-dir:", "hf-hub:"))
    weights_file = None
    if pretrained is not None:
        if os.path.isfile(pretrained):
            weights_file = pretrained
        elif has_schema or os.sep in pretrained or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors")):
            raise FileNotFoundError(f"open_clip weights file not found: {pretrained}")
    if name.startswith("local-dir:"):
        folder = name[len("local-dir:"):]
        if not os.path.isfile(os.path.join(folder, "open_clip_config.json")):
            raise FileNotFoundError(f"{folder} has no open_clip_config.json; save models with "
                                    f"rewards.tiny.save_open_clip or give open_clip:<arch> + pretrained=<file>")
        if weights_file is None and not _has_weights(folder):
            raise FileNotFoundError(f"{folder} has no weights (*.safetensors/*.bin/*.pth); "
                                    f"add them or pass pretrained=<file>")
    elif not has_schema and pretrained is None:
        raise ValueError(f"open_clip:{name} needs pretrained=<tag or local weights file>; without it the "
                         f"model would have random weights (tags: open_clip.list_pretrained_tags_by_model("
                         f"{name!r}))")
    tag = pretrained if (pretrained is not None and weights_file is None) else None
    extra = {"pretrained_text": False} if "pretrained_text" in inspect.signature(open_clip.create_model).parameters else {}
    try:
        model = open_clip.create_model(name, pretrained=tag, device="cpu", **extra)
    except (RuntimeError, OSError) as e:
        raise RuntimeError(f"cannot build open_clip:{name} (pretrained={pretrained!r}): {e}. Offline, download the "
                           f"weights once and pass the file as pretrained=<path>") from e
    if weights_file is not None:
        safe = {"weights_only": True} if "weights_only" in inspect.signature(open_clip.load_checkpoint).parameters else {}
        open_clip.load_checkpoint(model, weights_file, **safe)
    model = model.to(device=device, dtype=dtype)
    tokenizer = open_clip.get_tokenizer(name)
    cfg = open_clip.get_model_preprocess_cfg(model)
    size = cfg.get("size", 224)
    size = (size, size) if isinstance(size, int) else tuple(size)
    preprocess = ImagePreprocess(
        size=size,
        mean=tuple(float(m) for m in cfg.get("mean", OPENAI_CLIP_MEAN)),
        std=tuple(float(s) for s in cfg.get("std", OPENAI_CLIP_STD)),
        resize_mode=cfg.get("resize_mode", "shortest"),
        interpolation=cfg.get("interpolation", "bicubic"),
        fill=float(cfg.get("fill_color", 0)) / 255.0,
    )
    return OpenClipScorer(model, tokenizer, preprocess, device, dtype)


# ------------------------------------------------------------------------------------------------
# The CLIP rewards
# ------------------------------------------------------------------------------------------------
ASPECTS = ("crop", "pad")  # how a frame that is not square meets the model's square input (ClipImageRewardBase)


class ClipImageRewardBase(Reward):
    """Shared options of the CLIP-based rewards.

    Args:
        model: the CLIP (see the module doc for the naming scheme).
        pretrained: open_clip pretrained tag or weights file.
        processor: hf only: where the tokenizer / image-processor config live, if not with the model.
        dtype: model dtype (``"float32"``, ``"bfloat16"``, ``"float16"``); embeddings are float32.
        max_batch: split the image forward into chunks of this many frames (``None``: one forward).
        text: the text the reward scores against, for the rewards that offer a choice (``TEXTS``, the default
            first: ``pickscore`` / ``hps``, ``clip_dir``); others refuse it.
        aspect: ``"crop"`` (the model's own preprocessing: for CLIP, the short side resized and the middle
            square kept, so a 16:9 frame loses 44% of its width and an edit near its left or right edge goes
            unseen) or ``"pad"`` (the whole frame, scaled to fit and padded with the mean colour).
        frames, device: see :class:`rewards.base.Reward`.
    """

    default_model: str = "hf:openai/clip-vit-large-patch14"
    default_processor: str | None = None
    checked_by_building = True  # the model loads at the first call (or load()), not here
    TEXTS: tuple[str, ...] = ()  # the choices of a ``text`` option, the default first (empty: no such option)

    def __init__(
        self,
        *,
        model: str | None = None,
        text: str | None = None,
        pretrained: str | None = None,
        processor: str | None = None,
        dtype: str = "float32",
        max_batch: int | None = None,
        aspect: str = "crop",
        frames: FrameSpec = "all",
        device: str | None = None,
    ):
        super().__init__(frames=frames, device=device)
        if aspect not in ASPECTS:
            raise ValueError(f"aspect must be one of {', '.join(ASPECTS)}, got {aspect!r}")
        self.aspect = aspect
        if self.TEXTS:
            text = self.TEXTS[0] if text is None else text
            if text not in self.TEXTS:
                raise ValueError(f"text must be one of {', '.join(self.TEXTS)}, got {text!r}")
        elif text is not None:
            raise ValueError(f"{type(self).__name__} has no text option (got text={text!r})")
        self.text = text
        model = model if model is not None else self.default_model
        if processor is None and model == self.default_model:
            processor = self.default_processor
        self.spec = parse_clip_spec(model, pretrained, processor)
        self.dtype = _as_dtype(dtype)
        if max_batch is not None and (not isinstance(max_batch, int) or max_batch < 1):
            raise ValueError(f"max_batch must be a positive integer or None, got {max_batch!r}")
        self.max_batch = max_batch

    def scorer(self, video: torch.Tensor) -> ClipScorer:
        """The (process-wide cached) CLIP on this reward's device."""
        return load_clip(self.spec, device=self.resolve_device(video), dtype=self.dtype)

    def load(self, device: torch.device | str = "cpu") -> None:
        load_clip(self.spec, device=self.device if self.device is not None else torch.device(device), dtype=self.dtype)

    def embed_frames(self, scorer: ClipScorer, *videos: torch.Tensor) -> list[torch.Tensor]:
        """Sample frames of each ``(B, F, 3, H, W)`` video and embed ALL of them in one forward;
        returns one ``(B, F', D)`` tensor per video."""
        sampled = [self.sample_frames(v) for v in videos]
        flat = [s.reshape(-1, *s.shape[2:]) for s in sampled]
        emb = scorer.encode_images(flat, max_batch=self.max_batch,
                                   preprocess=scorer.preprocess.whole_frame() if self.aspect == "pad" else None)
        out, start = [], 0
        for s in sampled:
            n = s.shape[0] * s.shape[1]
            out.append(emb[start : start + n].view(s.shape[0], s.shape[1], -1))
            start += n
        return out

    def embed_frame_pairs(self, scorer: ClipScorer, edited: torch.Tensor, source: torch.Tensor,
                          name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Embed edited and source frames in one forward, for rewards that compare frame f with frame f (same frame
        count required; ``name`` is the reward's, for the message)."""
        if edited.shape[1] != source.shape[1]:
            raise ValueError(f"{name} compares frame f of the source with frame f of the edit: frame counts "
                             f"differ ({source.shape[1]} source, {edited.shape[1]} edited)")
        edited_emb, source_emb = self.embed_frames(scorer, edited, source)
        return edited_emb, source_emb

    @staticmethod
    def encode_caption_pairs(scorer: ClipScorer, target_captions, source_captions) -> tuple[torch.Tensor, torch.Tensor]:
        """``(t_edit, t_src)`` embeddings, both caption lists in one text forward."""
        text = scorer.encode_texts(list(target_captions) + list(source_captions))
        return text[: len(target_captions)], text[len(target_captions):]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(model={self.spec}, frames={self.frames!r})"


@register_reward("clip_if")
class ClipInstructionFollowing(ClipImageRewardBase):
    """Eq. 4: ``C(V_edit, t_edit) - C(V_edit, t_src)`` with a CLIP (details: ``c_edit``, ``c_src``)."""

    def score(self, edited, source, *, source_captions, target_captions, instructions, references):
        scorer = self.scorer(edited)
        (img,) = self.embed_frames(scorer, edited)
        t_edit, t_src = self.encode_caption_pairs(scorer, target_captions, source_captions)
        c_edit = frame_text_similarity(img, t_edit)
        c_src = frame_text_similarity(img, t_src)
        scores = clip_if_score(img, t_edit, t_src)
        details = [{"c_edit": float(e), "c_src": float(s)} for e, s in zip(c_edit.tolist(), c_src.tolist())]
        return RewardOutput(scores, details)


@register_reward("clip_sp")
class ClipSourcePreservation(ClipImageRewardBase):
    """Eq. 5: mean over frames of the cosine between source and edited frame embeddings.

    Source and edited videos must have the same number of frames (frame f is compared with frame f).
    """

    def score(self, edited, source, *, source_captions, target_captions, instructions, references):
        edited_emb, source_emb = self.embed_frame_pairs(self.scorer(edited), edited, source, "clip_sp")
        return RewardOutput(clip_sp_score(source_emb, edited_emb))


@register_reward("clip_dir")
class ClipDirection(ClipImageRewardBase):
    """Directional instruction following (:func:`clip_direction_score`): the change from source to edit, in CLIP
    image space, against the change from source to target caption in text space. Unlike eq. 4 it compares
    *changes*, so damage that moves the frames away from both captions (noise, blur) does not raise it.

    ``text``: the text direction, ``"captions"`` (``E_T(t_edit) - E_T(t_src)``, the default and InstructPix2Pix's
    metric) or ``"instruction"`` (``E_T(instruction)``: the instruction names the change itself; for a model trained
    to judge an edit's change against its instruction, e.g. a source-aware toy preference model of
    :mod:`editgrpo.toy_preference`, ``--score direction``).
    """

    TEXTS = ("captions", "instruction")

    def score(self, edited, source, *, source_captions, target_captions, instructions, references):
        scorer = self.scorer(edited)
        edited_emb, source_emb = self.embed_frame_pairs(scorer, edited, source, "clip_dir")
        if self.text == "instruction":
            t_edit = scorer.encode_texts(instructions)
            t_src = torch.zeros_like(t_edit)
        else:
            t_edit, t_src = self.encode_caption_pairs(scorer, target_captions, source_captions)
        return RewardOutput(clip_direction_score(source_emb, edited_emb, t_src, t_edit))


class ClipTextRewardBase(ClipImageRewardBase):
    """A frame-averaged image-text score of the edited video against ``t_edit``; subclasses define
    :meth:`combine` (default: ``C(V_edit, t_edit)``).

    ``text``: what the frames are scored against, ``"target_caption"`` (``t_edit``, the default and the paper's
    eq. 6) or ``"instruction"`` (for a model trained to judge an edit against its instruction, e.g. the toy
    preference model of :mod:`editgrpo.toy_preference`, whose instructions name the place and motion that target
    captions leave out).
    """

    TEXTS = ("target_caption", "instruction")

    def combine(self, image_emb: torch.Tensor, text_emb: torch.Tensor, scorer: ClipScorer) -> torch.Tensor:
        return frame_text_similarity(image_emb, text_emb)

    def score(self, edited, source, *, source_captions, target_captions, instructions, references):
        scorer = self.scorer(edited)
        (img,) = self.embed_frames(scorer, edited)
        texts = target_captions if self.text == "target_caption" else instructions
        return RewardOutput(self.combine(img, scorer.encode_texts(texts), scorer))
