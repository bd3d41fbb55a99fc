"""Tiny offline components for the Lucy-Edit editor (:class:`~viva_base.lucy.LucyEditor`).

Every component is the *same* library class as ``decart-ai/Lucy-Edit-Dev`` (diffusers'
``WanTransformer3DModel`` and ``AutoencoderKLWan``, transformers' ``UMT5EncoderModel``), built from a
small config with random weights, so that every code path -- including diffusers' own
``LucyEditPipeline`` -- runs on a CPU with no network. The tokenizer is the in-memory byte-level BPE of
:func:`viva_base.tiny.make_tiny_tokenizer` with ``</s>`` appended (what T5 tokenizers do), padding id 0.

The tiny model keeps the Wan 2.2 TI2V structure that matters to the editor:

* VAE: the Wan 2.2 layout (``patch_size=2`` patchify of RGB into 12 channels, residual down/up blocks,
  per-channel ``latents_mean`` / ``latents_std``), temporal factor 4 (frames ``4k + 1``); spatial factor
  8 here (16 in the real VAE) so 32-pixel toy clips still give a 4 x 4 latent grid.
* transformer: patch ``(1, 2, 2)``, ``in_channels = 2 z`` (noisy latent ++ source latent on channels),
  ``out_channels = z``, text width = the UMT5 width.
* pipeline config: ``expand_timesteps=True`` (Wan 2.2 TI2V: one timestep per video token).

``make_tiny_lucy_checkpoint(dir)`` writes a directory in the ``decart-ai/Lucy-Edit-Dev`` layout
(``model_index.json``, transformer/, vae/, text_encoder/, tokenizer/, scheduler/) with no
``editor_config.json``, so tests load it through exactly the path a downloaded checkpoint takes.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch


@dataclass
class TinyLucySpec:
    """Sizes of the tiny Lucy editor (defaults: a 2-layer, 32-wide DiT; CPU forward in milliseconds)."""

    latent_channels: int = 8         # z_dim of the VAE (48 in Wan 2.2)
    vae_base_dim: int = 8
    vae_dim_mult: tuple = (1, 2, 2)  # 2 spatial down-samplings x patchify 2 -> spatial factor 8
    heads: int = 2
    head_dim: int = 16
    num_layers: int = 2
    ffn_dim: int = 64
    freq_dim: int = 32
    text_dim: int = 32               # UMT5 d_model (the DiT's text_dim)
    text_layers: int = 1             # UMT5 layers (each computes its own relative-position bias)
    max_sequence_length: int = 32    # prompt tokens the editor pads to (512 in the real pipeline)
    shift: float = 5.0               # flow shift of the scheduler (Wan 2.2 TI2V's value)
    expand_timesteps: bool = True
    extra: dict = field(default_factory=dict)


def make_tiny_lucy_tokenizer():
    """The in-memory BPE tokenizer, T5-style: ``</s>`` appended, ``<pad>`` = id 0, right padding."""
    from .tiny import make_tiny_tokenizer

    tok = make_tiny_tokenizer(add_eos=True, model_max_length=512)
    if tok.pad_token_id != 0:
        raise RuntimeError("the tiny tokenizer's <pad> must be id 0 (UMT5's pad_token_id)")
    return tok


def make_tiny_umt5(spec: TinyLucySpec, tokenizer, seed: int = 0):
    """A tiny ``UMT5EncoderModel`` (random weights) over ``tokenizer``'s vocabulary."""
    from transformers import UMT5Config, UMT5EncoderModel

    config = UMT5Config(vocab_size=len(tokenizer), d_model=spec.text_dim, d_kv=spec.text_dim // 2,
                        d_ff=2 * spec.text_dim, num_layers=spec.text_layers, num_heads=2, relative_attention_num_buckets=8,
                        relative_attention_max_distance=32, pad_token_id=tokenizer.pad_token_id,
                        eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed + 11)
    return UMT5EncoderModel(config).eval()


def make_tiny_wan_transformer(spec: TinyLucySpec, seed: int = 0):
    """A tiny ``WanTransformer3DModel`` editor DiT: ``in_channels = 2 z``, ``out_channels = z``."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed + 12)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=spec.heads, attention_head_dim=spec.head_dim,
        in_channels=2 * spec.latent_channels, out_channels=spec.latent_channels, text_dim=spec.text_dim,
        freq_dim=spec.freq_dim, ffn_dim=spec.ffn_dim, num_layers=spec.num_layers, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024,
    )


def make_tiny_wan_vae(spec: TinyLucySpec, seed: int = 0):
    """A tiny Wan 2.2-style ``AutoencoderKLWan`` with non-trivial per-channel latent statistics."""
    from diffusers import AutoencoderKLWan

    z = spec.latent_channels
    g = torch.Generator().manual_seed(seed + 13)
    mean = (0.5 * torch.randn(z, generator=g)).tolist()
    std = (0.5 + torch.rand(z, generator=g)).tolist()
    n_down = len(spec.vae_dim_mult) - 1
    torch.manual_seed(seed + 14)
    return AutoencoderKLWan(
        base_dim=spec.vae_base_dim, z_dim=z, dim_mult=list(spec.vae_dim_mult), num_res_blocks=1, attn_scales=[],
        temperal_downsample=[True] * 2 + [False] * (n_down - 2), latents_mean=mean, latents_std=std,
        is_residual=True, in_channels=12, out_channels=12, patch_size=2, scale_factor_temporal=4,
        scale_factor_spatial=2 * 2 ** n_down,
    ).eval()


def make_tiny_lucy_editor(spec: TinyLucySpec | None = None, seed: int = 0, **overrides):
    """A complete tiny :class:`~viva_base.lucy.LucyEditor` (random weights), in about a second."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from .lucy import LucyConfig, LucyEditor

    spec = spec or TinyLucySpec()
    tokenizer = make_tiny_lucy_tokenizer()
    config = LucyConfig(shift=spec.shift, expand_timesteps=spec.expand_timesteps,
                        max_sequence_length=spec.max_sequence_length, max_frames=33, max_side=64)
    return LucyEditor(
        text_encoder=make_tiny_umt5(spec, tokenizer, seed=seed), tokenizer=tokenizer,
        transformer=make_tiny_wan_transformer(spec, seed=seed), vae=make_tiny_wan_vae(spec, seed=seed),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=spec.shift), config=config, **overrides,
    )


def make_tiny_lucy_checkpoint(path: str | os.PathLike, spec: TinyLucySpec | None = None, seed: int = 0) -> Path:
    """Write a tiny checkpoint in the ``decart-ai/Lucy-Edit-Dev`` layout, as diffusers'
    ``LucyEditPipeline.save_pretrained`` writes it: no ``editor_config.json``, and the Wan 2.2 scheduler
    (``UniPCMultistepScheduler`` with flow sigmas and ``flow_shift = spec.shift``)."""
    from diffusers import UniPCMultistepScheduler

    spec = spec or TinyLucySpec()
    pipe = make_tiny_lucy_editor(spec, seed=seed).to_pipeline()
    pipe.scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                             flow_shift=spec.shift, num_train_timesteps=1000)
    path = Path(path)
    pipe.save_pretrained(path)
    return path
