"""Automatic metrics of instruction-based video editing (VIVA section 4.2; the EditVerseBench and
VBench protocols), as small pure functions plus the model wrappers that feed them.

Pure functions (tensors in, tensors out, no model code):

* :func:`temporal_consistency` -- CLIP / DINO temporal consistency (EditVerse; VBench variant as an option),
* :func:`frame_text_alignment` -- frame-text CLIP score against the target caption (EditVerse "CLIP-T"),
* :func:`pickscore_video` -- PickScore over frames (EditVerse "video quality"),
* :func:`video_text_alignment` -- ViCLIP video-text score (EditVerse "ViCLIP-T"),
* :func:`uniform_frame_indices` -- the frames ViCLIP sees.

Models (defaults are the published protocols' models; every name also accepts a local folder):

==============  ==================================================  ==========================================
metric          model (default)                                     features
==============  ==================================================  ==========================================
``clip_tc``     ``openai/clip-vit-large-patch14``                   vision tower ``pooler_output`` (before the
                                                                    projection), as EditVerse's CLIPVisionModel
``dino_tc``     ``facebook/dinov2-base``                            CLS token after the final layer norm
                                                                    (``Dinov2Model.pooler_output``)
``clip_t``      ``openai/clip-vit-large-patch14``                   projected image / text embeddings
``pickscore``   ``yuvalkirstain/PickScore_v1`` + processor of       projected image / text embeddings
                ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``
``viclip_t``    ViCLIP (``ViClip-InternVid-10M-FLT.pth``), only     the model's video / text embeddings
                when its code and weights are given
==============  ==================================================  ==========================================

VBench's subject consistency uses DINO v1 ViT-B/16 (``facebook/dino-vitb16`` in transformers) and its
background consistency CLIP ViT-B/32; pass those names with ``tc_mode="vbench"`` to follow VBench.
Any transformers vision model whose ``last_hidden_state[:, 0]`` is the (normalised) CLS token works as
the DINO model (``Dinov2Model``, ``ViTModel``).

Frames are preprocessed with torch ops the way each model's own image processor does
(:class:`rewards.clip.ImagePreprocess`): the same resize / crop / normalisation, no PIL round trip.
"""
from __future__ import annotations

import hashlib
import importlib
import inspect
import logging
import math
import os
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

__all__ = [
    "ALL_METRICS",
    "DinoEncoder",
    "MetricConfig",
    "VideoMetrics",
    "ViclipPlugin",
    "frame_text_alignment",
    "load_dino",
    "make_tiny_dino",
    "model_fingerprint",
    "pickscore_video",
    "temporal_consistency",
    "uniform_frame_indices",
    "video_text_alignment",
]

#: every automatic metric, in table order
ALL_METRICS = ("clip_tc", "dino_tc", "pickscore", "clip_t", "viclip_t")

PICKSCORE_MODEL = "hf:yuvalkirstain/PickScore_v1"
PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ------------------------------------------------------------------------------------------------
# The math
# ------------------------------------------------------------------------------------------------
def temporal_consistency(features: torch.Tensor, mode: str = "editverse") -> torch.Tensor:
    """Temporal consistency of a video from per-frame features ``f_1 .. f_F``.

    * ``mode="editverse"`` (EditVerse, Ju et al. 2025, ``clip_temporal_consistency.py`` /
      ``dino_temporal_consistency.py``; the frame-consistency metric of earlier video-editing work)::

          TC = 1/(F-1) * sum_{i=2..F} max(0, cos(f_i, f_{i-1}))

    * ``mode="vbench"`` (VBench subject / background consistency, Huang et al. 2024)::

          TC = 1/(F-1) * sum_{i=2..F} ( max(0, cos(f_i, f_{i-1})) + max(0, cos(f_i, f_1)) ) / 2

    Args:
        features: ``(F, D)`` or ``(B, F, D)`` frame features (normalised here; any scale works).
        mode: ``"editverse"`` or ``"vbench"``.
    Returns:
        ``()`` or ``(B,)`` float32 in [0, 1]: 1 for identical frames, 0 when every frame is the negative
        of its predecessor. NaN for a 1-frame video (no consecutive pair to compare).
    """
    if mode not in ("editverse", "vbench"):
        raise ValueError(f"unknown temporal-consistency mode {mode!r}: use 'editverse' or 'vbench'")
    if features.ndim not in (2, 3):
        raise ValueError(f"features must be (F, D) or (B, F, D), got {tuple(features.shape)}")
    f = F.normalize(features.float(), dim=-1)
    if f.shape[-2] < 2:
        return torch.full(f.shape[:-2], math.nan)
    prev = (f[..., 1:, :] * f[..., :-1, :]).sum(-1).clamp_min(0)
    if mode == "editverse":
        return prev.mean(-1)
    first = (f[..., 1:, :] * f[..., :1, :]).sum(-1).clamp_min(0)
    return (0.5 * (prev + first)).mean(-1)


def frame_text_alignment(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: float) -> torch.Tensor:
    """Frame-text alignment ("CLIP-T", EditVerse ``frame_text_alignment.py``), the CLIP score of each
    frame against the target caption, averaged over frames::

        CLIP-T = 1/F * sum_f s * cos(E_I(v_f), E_T(t_tgt)),    s = exp(logit_scale)  (100 for OpenAI CLIP)

    Args:
        image_emb: ``(F, D)`` or ``(B, F, D)`` image embeddings (normalised here).
        text_emb: ``(D,)`` or ``(B, D)`` text embedding(s).
        logit_scale: the model's ``logit_scale.exp()``.
    Returns:
        ``()`` or ``(B,)``.
    """
    img = F.normalize(image_emb.float(), dim=-1)
    txt = F.normalize(text_emb.float(), dim=-1)
    return float(logit_scale) * (img * txt.unsqueeze(-2)).sum(-1).mean(-1)


def pickscore_video(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: float) -> torch.Tensor:
    """PickScore over frames (EditVerse ``pick_score_video_quality.py``; Kirstain et al. 2023): the
    PickScore of every frame against the target caption, averaged::

        PS = 1/F * sum_f s * cos(E_I(v_f), E_T(t_tgt)),    s = exp(logit_scale) of PickScore_v1

    The same formula as :func:`frame_text_alignment` with the PickScore model (and the same as the
    Edit-GRPO reward ``rewards.pickscore``, eq. 6). Shapes as there.
    """
    return frame_text_alignment(image_emb, text_emb, logit_scale)


def video_text_alignment(video_emb: torch.Tensor, text_emb: torch.Tensor, scale: float = 100.0) -> torch.Tensor:
    """Video-text alignment ("ViCLIP-T", EditVerse ``video_text_alignment.py``; ViCLIP, Wang et al. 2023)::

        ViCLIP-T = 100 * cos(E_V(v_1..v_8), E_T(t_tgt))

    Args:
        video_emb: ``(D,)`` or ``(B, D)`` video embedding(s); ``text_emb`` the same shape.
    Returns:
        ``()`` or ``(B,)``.
    """
    return float(scale) * (F.normalize(video_emb.float(), dim=-1) * F.normalize(text_emb.float(), dim=-1)).sum(-1)


def uniform_frame_indices(num_frames: int, n: int = 8) -> list[int]:
    """The ``n`` frames ViCLIP sees (EditVerse): ``idx_i = floor(i * F / n)``, ``i = 0..n-1``
    (frames repeat when ``F < n``)."""
    if num_frames < 1 or n < 1:
        raise ValueError(f"uniform_frame_indices needs num_frames >= 1 and n >= 1, got {num_frames}, {n}")
    return [int(i * num_frames / n) for i in range(n)]


# ------------------------------------------------------------------------------------------------
# Models
# ------------------------------------------------------------------------------------------------
_CACHE: dict[tuple, Any] = {}
_CACHE_LOCK = threading.Lock()


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()).rstrip(".")


class DinoEncoder:
    """A transformers vision backbone (``Dinov2Model`` by default) that embeds frames as their CLS
    token after the final layer norm (``last_hidden_state[:, 0]``, equal to ``Dinov2Model.pooler_output``).
    Get one with :func:`load_dino`."""

    def __init__(self, model: torch.nn.Module, preprocess, device: torch.device, dtype: torch.dtype, name: str):
        self.model = model.eval().requires_grad_(False)
        self.preprocess = preprocess
        self.device = device
        self.dtype = dtype
        self.name = name

    @torch.no_grad()
    def encode(self, frames: torch.Tensor, max_batch: int | None = None) -> torch.Tensor:
        """``(N, 3, H, W)`` in [0, 1] -> ``(N, D)`` float32 features (not normalised)."""
        pixels = self.preprocess(frames.to(device=self.device, dtype=torch.float32)).to(self.dtype)
        step = max_batch or pixels.shape[0]
        out = [self.model(pixel_values=pixels[i : i + step]).last_hidden_state[:, 0]
               for i in range(0, pixels.shape[0], max(step, 1))]
        return torch.cat(out).float()


def load_dino(name: str = "facebook/dinov2-base", *, device: str | torch.device = "cpu",
              dtype: torch.dtype = torch.float32) -> DinoEncoder:
    """Load a DINO model (hub id or local folder with ``config.json`` + weights +
    ``preprocessor_config.json``) once per process."""
    from rewards.clip import ImagePreprocess, _hf_preprocess

    device = torch.device(device)
    key = ("dino", name, str(device), dtype)
    with _CACHE_LOCK:
        if key in _CACHE:
            return _CACHE[key]
        from transformers import AutoImageProcessor, AutoModel

        try:
            model = AutoModel.from_pretrained(name)
        except OSError as e:
            raise OSError(f"cannot load the DINO model {name!r}: {_one_line(e)}. Give a local folder "
                          f"(save_pretrained) with --dino, or download it first; offline runs cannot reach the hub") from e
        try:
            preprocess = _hf_preprocess(AutoImageProcessor.from_pretrained(name))
        except OSError:
            size = int(getattr(model.config, "image_size", 224))
            logger.warning("%s has no preprocessor_config.json: resizing to %d with ImageNet mean/std", name, size)
            preprocess = ImagePreprocess((size, size), IMAGENET_MEAN, IMAGENET_STD, "shortest")
        encoder = DinoEncoder(model.to(device=device, dtype=dtype), preprocess, device, dtype, name)
        _CACHE[key] = encoder
        return encoder


def make_tiny_dino(directory: str | os.PathLike, *, image_size: int = 32, patch_size: int = 8, width: int = 32,
                   layers: int = 2, heads: int = 2, seed: int = 0) -> str:
    """Save a tiny random ``Dinov2Model`` with a ``BitImageProcessor`` (the processor class of
    ``facebook/dinov2-base``) in ``directory``; returns it (use as ``dino=<dir>``). For tests and smoke runs."""
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    directory = str(directory)
    os.makedirs(directory, exist_ok=True)
    config = Dinov2Config(hidden_size=width, num_hidden_layers=layers, num_attention_heads=heads, mlp_ratio=2,
                          image_size=image_size, patch_size=patch_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Dinov2Model(config)
    model.save_pretrained(directory)
    BitImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
                      image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD), do_convert_rgb=True,
                      ).save_pretrained(directory)
    return directory


class ViclipPlugin:
    """ViCLIP, which is not part of transformers or open_clip, through user-given code.

    ``spec`` is ``"package.module:factory"``; ``factory(weights, device)`` returns a model with

    * ``encode_vision(video)``: ``video`` ``(1, T, 3, 224, 224)`` normalised with the OpenAI CLIP mean/std
      (ViCLIP's ``clip_image_transform(224)``) -> ``(1, D)``; called with ``test=True`` when it accepts it
      (the official ViCLIP code does);
    * ``encode_text(text)``: one string -> ``(1, D)`` or ``(D,)``.

    The official code (InternVideo's ``viclip`` package) fits this directly; see docs/evaluation.md.
    """

    def __init__(self, spec: str, weights: str | None, device: torch.device, num_frames: int = 8):
        from rewards.clip import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ImagePreprocess

        module_name, _, attr = spec.partition(":")
        if not module_name or not attr:
            raise ValueError(f"--viclip {spec!r}: use 'package.module:factory' (a function(weights, device) "
                             f"returning the ViCLIP model)")
        if weights is not None and not os.path.exists(weights):
            raise FileNotFoundError(f"ViCLIP weights {weights!r} not found; pass --viclip-weights "
                                    f"<path to ViClip-InternVid-10M-FLT.pth>")
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as e:
            raise ImportError(f"cannot import the ViCLIP factory {spec!r}: {_one_line(e)}; put its package on "
                              f"PYTHONPATH") from e
        self.spec, self.weights, self.device, self.num_frames = spec, weights, device, int(num_frames)
        self.model = factory(weights, device)
        if hasattr(self.model, "eval"):
            self.model.eval()
        self.preprocess = ImagePreprocess((224, 224), OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, "shortest")
        self._test_kw = "test" in inspect.signature(self.model.encode_vision).parameters

    @torch.no_grad()
    def score(self, frames: torch.Tensor, text: str) -> float:
        """:func:`video_text_alignment` of ``frames`` ``(F, 3, H, W)`` against ``text``."""
        idx = uniform_frame_indices(frames.shape[0], self.num_frames)
        video = self.preprocess(frames[idx].to(device=self.device, dtype=torch.float32))[None]
        kwargs = {"test": True} if self._test_kw else {}
        v = torch.as_tensor(self.model.encode_vision(video, **kwargs)).float().reshape(-1)
        t = torch.as_tensor(self.model.encode_text(text)).float().reshape(-1)
        return float(video_text_alignment(v, t))


def model_fingerprint(name: str | None, model: torch.nn.Module | None = None) -> dict[str, Any]:
    """What identifies a model's version in a run record: its name, the hub commit it was loaded at
    (transformers records it) and, for a local folder, a SHA-256 over its weight files' names, sizes and
    first MiB (cheap, and different for different weights)."""
    info: dict[str, Any] = {"name": name}
    commit = getattr(getattr(model, "config", None), "_commit_hash", None) if model is not None else None
    if commit:
        info["commit"] = commit
    path = name
    for prefix in ("hf:", "open_clip:local-dir:", "open_clip:", "local-dir:"):
        if path and path.startswith(prefix):
            path = path[len(prefix):]
            break
    if path and os.path.exists(path):
        files = [Path(path)] if os.path.isfile(path) else sorted(
            p for p in Path(path).rglob("*") if p.is_file() and p.suffix in (".safetensors", ".bin", ".pt", ".pth"))
        h = hashlib.sha256()
        for p in files:
            h.update(f"{p.name}:{p.stat().st_size}:".encode())
            with open(p, "rb") as fh:
                h.update(fh.read(1 << 20))
        info["weights_fingerprint"] = h.hexdigest()[:16]
    return info


# ------------------------------------------------------------------------------------------------
# The metric set used by the benchmark
# ------------------------------------------------------------------------------------------------
@dataclass
class MetricConfig:
    """Which automatic metrics to compute, and with which models (defaults: the published protocols).

    ``clip_features``: ``"pooler"`` (vision tower output before the projection, as EditVerse's
    ``CLIPVisionModel.pooler_output``; hf CLIPs only) or ``"projected"`` (the CLIP embedding).
    ``tc_mode``: ``"editverse"`` or ``"vbench"`` (see :func:`temporal_consistency`).
    ``pickscore_processor``: where the PickScore tokenizer / image-processor config live; ``None``: the
    LAION CLIP-ViT-H processor for the default model, the model's own folder otherwise.
    ``pickscore_max_side``: frames whose long side exceeds it are first scaled down to it (as EditVerse
    does before the PickScore processor); ``None`` skips that step.
    """

    metrics: tuple[str, ...] = ALL_METRICS
    clip: str = "hf:openai/clip-vit-large-patch14"
    clip_features: str = "pooler"
    dino: str = "facebook/dinov2-base"
    pickscore: str = PICKSCORE_MODEL
    pickscore_processor: str | None = None
    pickscore_max_side: int | None = 672
    viclip: str | None = None
    viclip_weights: str | None = None
    viclip_frames: int = 8
    tc_mode: str = "editverse"
    device: str = "cpu"
    dtype: str = "float32"
    max_batch: int | None = 32

    def __post_init__(self):
        self.metrics = tuple(self.metrics)
        unknown = [m for m in self.metrics if m not in ALL_METRICS]
        if unknown:
            raise ValueError(f"unknown metric(s) {', '.join(unknown)}; available: {', '.join(ALL_METRICS)}")
        if self.clip_features not in ("pooler", "projected"):
            raise ValueError(f"clip_features must be 'pooler' or 'projected', got {self.clip_features!r}")
        if self.tc_mode not in ("editverse", "vbench"):
            raise ValueError(f"tc_mode must be 'editverse' or 'vbench', got {self.tc_mode!r}")


class VideoMetrics:
    """The automatic metrics of one edited video (models loaded lazily, once per process).

    :meth:`compute` returns ``{metric: value}`` for the metrics that apply; :attr:`not_computed` says why
    a configured metric is left out (ViCLIP without code/weights). Text metrics need the target caption:
    without one they are ``None`` for that item.
    """

    def __init__(self, config: MetricConfig | None = None):
        self.config = config or MetricConfig()
        self.device = torch.device(self.config.device)
        from rewards.clip import _as_dtype

        self.dtype = _as_dtype(self.config.dtype)
        self.not_computed: dict[str, str] = {}
        self._viclip: ViclipPlugin | None = None
        if "viclip_t" in self.config.metrics and not self.config.viclip:
            self.not_computed["viclip_t"] = ("not computed: ViCLIP is not in transformers/open_clip; give its code "
                                             "with --viclip module:factory and weights with --viclip-weights")

    @property
    def active(self) -> tuple[str, ...]:
        """The metrics :meth:`compute` returns."""
        return tuple(m for m in self.config.metrics if m not in self.not_computed)

    # -- models --------------------------------------------------------------------------------------
    def clip(self):
        from rewards.clip import load_clip

        return load_clip(self.config.clip, device=self.device, dtype=self.dtype)

    def pickscore_model(self):
        from rewards.clip import load_clip

        return load_clip(self.config.pickscore, processor=self.pickscore_processor, device=self.device,
                         dtype=self.dtype)

    @property
    def pickscore_processor(self) -> str | None:
        if self.config.pickscore_processor is not None:
            return self.config.pickscore_processor
        return PICKSCORE_PROCESSOR if self.config.pickscore == PICKSCORE_MODEL else None

    def dino(self) -> DinoEncoder:
        return load_dino(self.config.dino, device=self.device, dtype=self.dtype)

    def viclip(self) -> ViclipPlugin:
        if self._viclip is None:
            self._viclip = ViclipPlugin(self.config.viclip, self.config.viclip_weights, self.device,
                                        self.config.viclip_frames)
        return self._viclip

    # -- features ------------------------------------------------------------------------------------
    @torch.no_grad()
    def clip_tc_features(self, frames: torch.Tensor) -> torch.Tensor:
        """``(F, 3, H, W)`` -> ``(F, D)``: the CLIP vision ``pooler_output`` (``clip_features="pooler"``,
        hf CLIPs) or the projected image embedding."""
        scorer = self.clip()
        if self.config.clip_features == "projected" or scorer.backend != "hf":
            return scorer.encode_images(frames, max_batch=self.config.max_batch)
        pixels = scorer.preprocess(frames.to(device=scorer.device, dtype=torch.float32)).to(scorer.dtype)
        step = self.config.max_batch or pixels.shape[0]
        out = [scorer.model.vision_model(pixel_values=pixels[i : i + step]).pooler_output
               for i in range(0, pixels.shape[0], max(step, 1))]
        return torch.cat(out).float()

    def _scaled_text_score(self, scorer, frames: torch.Tensor, text: str) -> float:
        img = scorer.encode_images(frames, max_batch=self.config.max_batch)
        txt = scorer.encode_texts([text])[0]
        return float(frame_text_alignment(img, txt, scorer.logit_scale))

    # -- the metrics ---------------------------------------------------------------------------------
    def compute(self, frames: torch.Tensor, target_caption: str | None) -> dict[str, float | None]:
        """All active metrics of an edited video ``(F, 3, H, W)`` in [0, 1]."""
        if frames.ndim != 4 or frames.shape[1] != 3:
            raise ValueError(f"frames must be (F, 3, H, W), got {tuple(frames.shape)}")
        cfg = self.config
        caption = (target_caption or "").strip()
        out: dict[str, float | None] = {}
        for name in self.active:
            if name == "clip_tc":
                value = temporal_consistency(self.clip_tc_features(frames), cfg.tc_mode)
            elif name == "dino_tc":
                value = temporal_consistency(self.dino().encode(frames, cfg.max_batch), cfg.tc_mode)
            elif not caption:
                out[name] = None
                continue
            elif name == "clip_t":
                value = self._scaled_text_score(self.clip(), frames, caption)
            elif name == "pickscore":
                value = self._scaled_text_score(self.pickscore_model(), _fit_side(frames, cfg.pickscore_max_side),
                                                caption)
            else:  # viclip_t
                value = self.viclip().score(frames, caption)
            value = float(value)
            out[name] = None if math.isnan(value) else value
        return out

    def protocol(self) -> dict[str, Any]:
        """What a run must record to be comparable later: models (with versions), feature choices, modes."""
        cfg = self.config
        record: dict[str, Any] = {k: v for k, v in asdict(cfg).items() if k not in ("device", "max_batch")}
        record["metrics"] = list(cfg.metrics)
        models: dict[str, Any] = {}
        if {"clip_tc", "clip_t"} & set(self.active):
            models["clip"] = model_fingerprint(cfg.clip, getattr(self.clip(), "model", None))
        if "dino_tc" in self.active:
            models["dino"] = model_fingerprint(cfg.dino, self.dino().model)
        if "pickscore" in self.active:
            models["pickscore"] = model_fingerprint(cfg.pickscore, getattr(self.pickscore_model(), "model", None))
            models["pickscore"]["processor"] = self.pickscore_processor
        if "viclip_t" in self.active:
            models["viclip"] = {"code": cfg.viclip, **model_fingerprint(cfg.viclip_weights)}
        record["models"] = models
        record["not_computed"] = dict(self.not_computed)
        return record


def _fit_side(frames: torch.Tensor, max_side: int | None) -> torch.Tensor:
    """Scale ``(F, 3, H, W)`` down (bicubic, antialiased) so the long side is at most ``max_side``."""
    h, w = frames.shape[-2:]
    if not max_side or max(h, w) <= max_side:
        return frames
    scale = max_side / max(h, w)
    size = (max(1, int(scale * h)), max(1, int(scale * w)))
    return F.interpolate(frames.float(), size=size, mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
