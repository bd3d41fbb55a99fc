"""The Lucy-Edit editor: diffusers' Wan 2.2 transformer + ``AutoencoderKLWan`` + a UMT5 text encoder,
behind the same :class:`~viva_base.policy.EditPolicy` interface as :class:`~viva_base.model.VivaEditor`.

Lucy-Edit (``decart-ai/Lucy-Edit-Dev``, ``diffusers.LucyEditPipeline``) is an open instruction video
editor: a Wan 2.2 TI2V-5B DiT whose input is the noisy latent concatenated on channels with the
source video's latent::

    instruction --UMT5 (frozen)--> token embeddings, zero-padded to max_sequence_length ------+
    source video --Wan VAE (frozen)--> (z - latents_mean) / latents_std = z_src               v
    z_t ++ z_src (channels, 2 z) --WanTransformer3DModel--> velocity v = noise - z_data

Everything here follows ``LucyEditPipeline`` so that an ODE edit with Edit-GRPO's sampler reproduces
the pipeline (configured with ``FlowMatchEulerDiscreteScheduler``, same shift, same seed and steps):

* **text**: ``prompt_clean`` (ftfy, HTML unescape, whitespace), tokenised to ``max_sequence_length``
  tokens, UMT5 hidden states with the padded positions set to zero. The DiT gets no text mask: it
  attends to the zero rows too, so every condition has exactly ``max_sequence_length`` rows (the
  pipeline's default is 512).
* **latents**: the VAE's distribution mode, normalised per channel with the VAE config's
  ``latents_mean`` / ``latents_std`` (:func:`normalize_latents`); decoding inverts it.
* **timesteps**: ``t = 1000 sigma`` (``num_train_timesteps * sigma``, float32). With the pipeline's
  ``expand_timesteps`` (Wan 2.2 TI2V; read from ``model_index.json``), the DiT gets one timestep per
  video token, shape ``[B, f h w / (p_t p_h p_w)]`` (:func:`lucy_timesteps`).
* **frames and size**: frames ``4k + 1`` (the VAE's temporal factor); sides multiples of the VAE's
  spatial factor times the DiT's patch (16 x 2 = 32 for Lucy-Edit-Dev).
* **CFG**: ``uncond`` is the *negative prompt* (``LucyConfig.negative_prompt``, default ``""`` as in the
  pipeline's example) with the same source latents, so guidance acts on the instruction only:
  ``v = v_neg + g (v_cond - v_neg)``.

The pipeline's own scheduler (UniPC in the published checkpoint) is replaced by
``FlowMatchEulerDiscreteScheduler`` with the checkpoint's flow shift: Edit-GRPO's samplers (Euler ODE,
Flow-SDE, CPS) and the edit command use that convention. ``LucyEditPipeline`` has no reference-image
input, so neither has this editor.

An editor directory is a ``LucyEditPipeline`` directory (``model_index.json``, transformer/, vae/,
text_encoder/, tokenizer/, scheduler/), loadable by diffusers, plus our ``editor_config.json``;
:meth:`LucyEditor.from_pretrained` also loads a downloaded ``decart-ai/Lucy-Edit-Dev`` as it is.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch

from .atomic import atomic_dir
from .errors import CheckpointError, UserError
from .hub import PushToHubMixin
from .policy import Condition
from .vae import configure_vae_memory

logger = logging.getLogger(__name__)

EDITOR_CONFIG = "editor_config.json"
MODEL_INDEX = "model_index.json"
PIPELINE_CLASS = "LucyEditPipeline"
# peft target_modules (a full-match regex): the self- (attn1) and cross-attention (attn2) projections of
# every Wan block (the modules diffusers' Wan LoRA training targets).
WAN_LORA_TARGETS = r".*blocks\.\d+\.attn[12]\.(to_q|to_k|to_v|to_out\.0)"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LucyConfig:
    """Settings of a :class:`LucyEditor` that are not weights (saved as ``editor_config.json``)."""

    shift: float = 5.0                 # flow-matching shift (the checkpoint scheduler's flow_shift)
    expand_timesteps: bool = False     # one timestep per token (Wan 2.2 TI2V); from model_index.json
    max_sequence_length: int = 512     # prompt rows the DiT sees (LucyEditPipeline.__call__ default)
    negative_prompt: str = ""          # the unconditional prompt of CFG
    vae_dtype: str | None = "float32"  # VAE weights (diffusers' Lucy example keeps them float32); None: follow .to()
    max_frames: int = 81               # what the edit command adapts inputs to (Lucy-Edit-Dev: 81 x 480 x 832)
    max_side: int = 832

    @classmethod
    def from_dict(cls, d: dict) -> "LucyConfig":
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


# ---------------------------------------------------------------------------------------------- math
def normalize_latents(z: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """``(z - mean) / std`` per channel (dim 1), as ``LucyEditPipeline.prepare_latents`` (which multiplies by
    ``1 / std``)."""
    m = torch.tensor(mean, dtype=z.dtype, device=z.device).view(1, -1, *([1] * (z.ndim - 2)))
    inv = 1.0 / torch.tensor(std, dtype=z.dtype, device=z.device).view(1, -1, *([1] * (z.ndim - 2)))
    return (z - m) * inv


def denormalize_latents(z: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """The inverse of :func:`normalize_latents`: ``z / (1 / std) + mean``, as the pipeline decodes."""
    m = torch.tensor(mean, dtype=z.dtype, device=z.device).view(1, -1, *([1] * (z.ndim - 2)))
    inv = 1.0 / torch.tensor(std, dtype=z.dtype, device=z.device).view(1, -1, *([1] * (z.ndim - 2)))
    return z / inv + m


def lucy_timesteps(sigma: torch.Tensor, num_train_timesteps: int, num_tokens: int | None) -> torch.Tensor:
    """The DiT's ``timestep`` for per-sample noise levels ``sigma`` [B]: ``t = num_train_timesteps * sigma``
    (float32; the scheduler's ``timesteps``), shape [B]; with ``expand_timesteps`` (``num_tokens`` given) the
    same value for every video token, shape [B, num_tokens] (the pipeline's ``mask * t`` with an all-ones mask).
    """
    t = sigma.to(torch.float32) * num_train_timesteps
    return t if num_tokens is None else t[:, None].expand(t.shape[0], num_tokens)


def zero_padded_embeddings(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Text-encoder states with every position past a prompt's length set to zero (the pipeline trims each
    prompt to ``mask.sum()`` tokens and pads with zeros; right padding makes that a masked multiply)."""
    lengths = mask.gt(0).sum(dim=1)
    keep = torch.arange(hidden.shape[1], device=hidden.device)[None, :] < lengths[:, None].to(hidden.device)
    return hidden * keep[..., None].to(hidden.dtype)


# ---------------------------------------------------------------------------------------------- editor
class LucyEditor(PushToHubMixin):
    """Lucy-Edit (Wan 2.2 + UMT5); implements :class:`~viva_base.policy.EditPolicy` (see the module docstring)."""

    def __init__(self, *, text_encoder, tokenizer, transformer, vae, scheduler, config: LucyConfig | None = None,
                 **overrides):
        self.text_encoder = text_encoder.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.transformer = transformer
        self.vae = vae.eval().requires_grad_(False)
        configure_vae_memory(self.vae, tiling=False)  # one clip at a time; Wan's causal VAE decodes in frame chunks
        self.scheduler = scheduler
        self.config = config or LucyConfig(shift=float(scheduler.config.get("shift", 5.0)))
        for k, v in overrides.items():
            if k not in LucyConfig.__dataclass_fields__:
                raise TypeError(f"LucyEditor: unknown setting {k!r} "
                                f"(settings: {', '.join(LucyConfig.__dataclass_fields__)})")
            setattr(self.config, k, v)
        tc = transformer.config
        if tc.in_channels != 2 * tc.out_channels or tc.out_channels != vae.config.z_dim:
            raise CheckpointError(
                f"the transformer (in_channels={tc.in_channels}, out_channels={tc.out_channels}) is not a Lucy-Edit "
                f"editor DiT for this VAE (z_dim={vae.config.z_dim}): in_channels must be 2 x z_dim; load a "
                "decart-ai/Lucy-Edit-Dev-layout directory")
        if self.config.vae_dtype is not None and self.config.vae_dtype not in _DTYPES:
            raise UserError(f"LucyConfig.vae_dtype={self.config.vae_dtype!r} is not one of {sorted(_DTYPES)} or None")
        if self.config.vae_dtype is not None and self.vae.dtype != _DTYPES[self.config.vae_dtype]:
            self.vae.to(dtype=_DTYPES[self.config.vae_dtype])
        # Prompts / videos each frozen encoder has processed (rollouts encode a prompt once, not per sample).
        self.calls = {"text_encoder": 0, "vae_encode": 0}
        # The module the velocity forward goes through (the transformer, or a trainer's DDP/DeepSpeed wrapper).
        self.dit_forward: torch.nn.Module | None = None

    # ------------------------------------------------------------------ device / dtype / sizes
    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.transformer.parameters()).dtype

    def to(self, device=None, dtype=None) -> "LucyEditor":
        """Move every component; ``dtype`` applies to the text encoder and the DiT, the VAE keeps
        ``config.vae_dtype`` (unless that is None)."""
        vae_dtype = _DTYPES[self.config.vae_dtype] if self.config.vae_dtype is not None else dtype
        for m, dt in ((self.text_encoder, dtype), (self.transformer, dtype), (self.vae, vae_dtype)):
            p = next(m.parameters())
            if device is not None and p.device != torch.device(device):
                m.to(device=device)
            if dt is not None and p.dtype != dt:
                m.to(dtype=dt)
        return self

    @property
    def latent_channels(self) -> int:
        return int(self.transformer.config.out_channels)

    @property
    def temporal_ratio(self) -> int:
        return int(self.vae.config.scale_factor_temporal)

    @property
    def spatial_ratio(self) -> int:
        """Sides must be multiples of this: the VAE's spatial factor x the DiT's spatial patch."""
        return int(self.vae.config.scale_factor_spatial) * int(self.transformer.config.patch_size[1])

    @property
    def lora_targets(self) -> str:
        return WAN_LORA_TARGETS

    @property
    def num_train_timesteps(self) -> int:
        return int(self.scheduler.config.get("num_train_timesteps", 1000))

    def valid_num_frames(self, n: int) -> int:
        """The largest frame count <= n the VAE accepts (``r k + 1``)."""
        r = self.temporal_ratio
        return ((n - 1) // r) * r + 1

    # ------------------------------------------------------------------ encoders (frozen, once per prompt)
    @torch.no_grad()
    def encode_prompt(self, texts: Sequence[str]) -> torch.Tensor:
        """UMT5 embeddings ``(B, max_sequence_length, D)`` of ``texts``, zero past each prompt's tokens (the
        pipeline's ``_get_t5_prompt_embeds``), in the DiT's dtype. One batched text-encoder call."""
        from diffusers.pipelines.lucy.pipeline_lucy_edit import prompt_clean

        inputs = self.tokenizer([prompt_clean(t) for t in texts], padding="max_length",
                                max_length=self.config.max_sequence_length, truncation=True, add_special_tokens=True,
                                return_attention_mask=True, return_tensors="pt")
        dev = self.text_encoder.device
        hidden = self.text_encoder(inputs.input_ids.to(dev), inputs.attention_mask.to(dev)).last_hidden_state
        return zero_padded_embeddings(hidden, inputs.attention_mask).to(self.device, self.dtype)

    @torch.no_grad()
    def encode_video(self, videos: torch.Tensor) -> torch.Tensor:
        """(B, F, 3, H, W) in [0, 1] -> normalised latents (B, z, f, h, w) float32 (distribution mode).
        Videos are encoded one at a time, as the pipeline does (bounded memory on long clips)."""
        b, f, _, h, w = videos.shape
        if (f - 1) % self.temporal_ratio:
            raise UserError(f"{f} frames: Lucy-Edit needs {self.temporal_ratio}k + 1 frames "
                            f"(e.g. {self.valid_num_frames(f)}); the edit command adapts clips for you")
        if h % self.spatial_ratio or w % self.spatial_ratio:
            raise UserError(f"frames of {w}x{h}: Lucy-Edit needs sides that are multiples of {self.spatial_ratio}")
        self.calls["vae_encode"] += b
        cfg = self.vae.config
        out = []
        for i in range(b):
            x = videos[i:i + 1].to(self.vae.device, self.vae.dtype).permute(0, 2, 1, 3, 4) * 2 - 1
            z = self.vae.encode(x).latent_dist.mode().float()
            out.append(normalize_latents(z, cfg.latents_mean, cfg.latents_std))
        return torch.cat(out)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents -> pixel videos (B, F, 3, H, W) float32 in [0, 1]."""
        cfg = self.vae.config
        z = denormalize_latents(latents.to(self.vae.device, self.vae.dtype), cfg.latents_mean, cfg.latents_std)
        x = self.vae.decode(z, return_dict=False)[0]
        return (x.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 1, 3, 4).contiguous()

    @torch.no_grad()
    def encode_condition(self, videos: torch.Tensor, instructions: Sequence[str],
                         references: Sequence[torch.Tensor | None] | None = None, *,
                         with_uncond: bool = True) -> tuple[Condition, Condition | None]:
        """Conditions for B prompts and their unconditional twins (the negative prompt, same source latents).

        One batched UMT5 call (instructions and negative prompts together) and one VAE pass per video.
        ``with_uncond=False`` returns ``(cond, None)``.
        """
        b = videos.shape[0]
        if len(instructions) != b:
            raise ValueError(f"{len(instructions)} instructions for {b} videos")
        if references is not None and any(r is not None for r in references):
            raise UserError("Lucy-Edit takes no reference image; drop the reference (--reference / the manifest's "
                            "reference column) or use a VIVA editor")
        texts = list(instructions) + ([self.config.negative_prompt] * b if with_uncond else [])
        self.calls["text_encoder"] += b  # prompts encoded (instruction and negative prompt: one batched pass)
        embeds = self.encode_prompt(texts)
        src = self.encode_video(videos).to(self.dtype)
        cond = Condition({"prompt_embeds": embeds[:b], "source_latents": src})
        if not with_uncond:
            return cond, None
        return cond, Condition({"prompt_embeds": embeds[b:], "source_latents": src})

    def latent_shape(self, cond: Condition) -> tuple[int, ...]:
        return tuple(cond["source_latents"].shape[1:])

    # ------------------------------------------------------------------ the DiT
    def velocity(self, latents: torch.Tensor, sigma: torch.Tensor | float, cond: Condition) -> torch.Tensor:
        """v(z_t, sigma, cond) in float32; ``sigma`` is a float or a [B] tensor (see :func:`lucy_timesteps`)."""
        b = latents.shape[0]
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=latents.device)
        sigma = sigma.expand(b) if sigma.ndim == 0 else sigma
        dt = self.dtype
        x = torch.cat([latents.to(dt), cond["source_latents"].to(dt)], dim=1)
        tokens = None
        if self.config.expand_timesteps:
            p_t, p_h, p_w = self.transformer.config.patch_size
            tokens = (x.shape[2] // p_t) * (x.shape[3] // p_h) * (x.shape[4] // p_w)
        dit = self.transformer if self.dit_forward is None else self.dit_forward
        out = dit(hidden_states=x, timestep=lucy_timesteps(sigma, self.num_train_timesteps, tokens),
                  encoder_hidden_states=cond["prompt_embeds"].to(dt), return_dict=False)[0]
        return out.float()

    # ------------------------------------------------------------------ diffusers interop
    def to_pipeline(self):
        """A ``diffusers.LucyEditPipeline`` over the same modules (not copies), with an Euler flow-matching
        scheduler of this editor's shift (the sampler the editor's ODE equals)."""
        from diffusers import FlowMatchEulerDiscreteScheduler, LucyEditPipeline

        sched = FlowMatchEulerDiscreteScheduler.from_config(self.scheduler.config, shift=float(self.config.shift),
                                                           use_dynamic_shifting=False)
        return LucyEditPipeline(tokenizer=self.tokenizer, text_encoder=self.text_encoder, vae=self.vae,
                                scheduler=sched, transformer=self.transformer,
                                expand_timesteps=bool(self.config.expand_timesteps))

    def edit(self, video, instruction, reference=None, **kwargs):
        """Edit one clip (tensor or path); see :class:`viva_base.pipeline.EditPipeline` for the arguments."""
        from .pipeline import EditPipeline

        return EditPipeline(self)(video, instruction, reference, **kwargs)

    # ------------------------------------------------------------------ save / load
    def save_pretrained(self, path: str | os.PathLike, *, files: dict[str, str] | None = None) -> Path:
        """Write a ``LucyEditPipeline`` directory + ``editor_config.json`` to ``path`` atomically; ``files``: text
        files written with it (name -> text: a model card, the training recipe; viva_base.hub)."""
        if hasattr(self.transformer, "peft_config"):
            raise CheckpointError("save the LoRA with editgrpo's checkpoint functions, or merge it first")
        path = Path(path)
        with atomic_dir(path) as tmp:
            self.to_pipeline().save_pretrained(tmp)
            (tmp / EDITOR_CONFIG).write_text(json.dumps({"_class_name": "LucyEditor", **asdict(self.config)}, indent=2))
            for name, text in (files or {}).items():
                (tmp / name).write_text(text)
        return path

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, torch_dtype: torch.dtype | None = None,
                        device: str | torch.device | None = None, **overrides) -> "LucyEditor":
        """Load a ``decart-ai/Lucy-Edit-Dev``-layout directory (or hub id, from the local cache), or one written
        by :meth:`save_pretrained`. ``overrides`` set :class:`LucyConfig` fields."""
        from .model import _resolve

        root = _resolve(path, MODEL_INDEX)
        index = json.loads((root / MODEL_INDEX).read_text())
        if index.get("_class_name") != PIPELINE_CLASS:
            raise CheckpointError(f"{path}: {MODEL_INDEX} names {index.get('_class_name')!r}, not {PIPELINE_CLASS}")
        if (index.get("transformer_2") or [None])[0] is not None or index.get("boundary_ratio") is not None:
            raise CheckpointError(f"{path}: two-stage checkpoints (transformer_2 / boundary_ratio) are not supported; "
                                  "use a single-transformer Lucy-Edit checkpoint such as decart-ai/Lucy-Edit-Dev")
        meta = json.loads((root / EDITOR_CONFIG).read_text()) if (root / EDITOR_CONFIG).exists() else None
        try:
            sched_cfg = json.loads((root / "scheduler" / "scheduler_config.json").read_text())
            if meta is not None:
                config = LucyConfig.from_dict(meta)
            else:
                shift = sched_cfg.get("shift", sched_cfg.get("flow_shift"))
                config = LucyConfig(expand_timesteps=bool(index.get("expand_timesteps", False)),
                                    **({"shift": float(shift)} if shift is not None else {}))
                logger.info("%s: %s with flow shift %g is sampled as FlowMatchEulerDiscreteScheduler(shift=%g)",
                            path, sched_cfg.get("_class_name"), config.shift, config.shift)
            for k, v in overrides.items():
                if k not in LucyConfig.__dataclass_fields__:
                    raise TypeError(f"unknown setting {k!r}")
                setattr(config, k, v)
            comps = _load_components(root, sched_cfg, torch_dtype, config)
        except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{path}: cannot load the Lucy-Edit components ({exc.__class__.__name__}: "
                                  f"{str(exc).splitlines()[0][:200]})") from None
        editor = cls(**comps, config=config)
        return editor.to(device=device) if device else editor


def _load_components(root: Path, sched_cfg: dict, torch_dtype: torch.dtype | None, config: LucyConfig) -> dict:
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanTransformer3DModel
    from transformers import AutoTokenizer, UMT5EncoderModel

    kw = {"torch_dtype": torch_dtype} if torch_dtype else {}
    vae_kw = {"torch_dtype": _DTYPES[config.vae_dtype]} if config.vae_dtype is not None else kw
    if sched_cfg.get("_class_name") == "FlowMatchEulerDiscreteScheduler":
        scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(root / "scheduler")
    else:
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=int(sched_cfg.get("num_train_timesteps", 1000)),
                                                    shift=float(config.shift))
    return dict(
        transformer=WanTransformer3DModel.from_pretrained(root / "transformer", **kw),
        vae=AutoencoderKLWan.from_pretrained(root / "vae", **vae_kw),
        text_encoder=UMT5EncoderModel.from_pretrained(root / "text_encoder",
                                                      **({"dtype": torch_dtype} if torch_dtype else {})),
        tokenizer=AutoTokenizer.from_pretrained(root / "tokenizer"),
        scheduler=scheduler,
    )
