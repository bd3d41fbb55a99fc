"""A lossless pixel-space "VAE" for the toy world.

``PixelUnshuffleVAE`` maps a video ``(B, 3, F, H, W)`` in [-1, 1] to latents ``(B, 3 f^2, F, H/f, W/f)``
by space-to-depth (``pixel_unshuffle``) and back, exactly. It speaks the subset of the diffusers
``AutoencoderKL*`` API the editor uses (``encode(x).latent_dist.mode()``, ``decode(z).sample``,
``config.scaling_factor``), and saves/loads with ``save_pretrained``/``from_pretrained`` like any
diffusers model, so the toy editor and a real ``AutoencoderKLHunyuanVideo`` editor run the same code.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.autoencoders.vae import DecoderOutput, DiagonalGaussianDistribution
from diffusers.models.modeling_outputs import AutoencoderKLOutput
from diffusers.models.modeling_utils import ModelMixin


class PixelUnshuffleVAE(ModelMixin, ConfigMixin):
    """Exact, parameter-free space-to-depth autoencoder (no temporal compression)."""

    @register_to_config
    def __init__(self, factor: int = 2, in_channels: int = 3, scaling_factor: float = 1.0):
        super().__init__()
        # A buffer so that the (otherwise empty) state dict round-trips through safetensors.
        self.register_buffer("factor_", torch.tensor(float(factor)), persistent=True)

    @property
    def latent_channels(self) -> int:
        return self.config.in_channels * self.config.factor ** 2

    temporal_compression_ratio = 1

    @property
    def spatial_compression_ratio(self) -> int:
        return self.config.factor

    def encode(self, x: torch.Tensor, return_dict: bool = True):
        """``x``: (B, C, F, H, W) in [-1, 1] -> latent distribution with zero variance."""
        b, c, f, h, w = x.shape
        k = self.config.factor
        if h % k or w % k:
            raise ValueError(f"frame size {h}x{w} is not a multiple of the VAE factor {k}")
        z = F.pixel_unshuffle(x.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w), k)
        z = z.reshape(b, f, c * k * k, h // k, w // k).permute(0, 2, 1, 3, 4)
        dist = DiagonalGaussianDistribution(torch.cat([z, torch.full_like(z, -30.0)], dim=1), deterministic=True)
        return AutoencoderKLOutput(latent_dist=dist) if return_dict else (dist,)

    def decode(self, z: torch.Tensor, return_dict: bool = True):
        b, c, f, h, w = z.shape
        k = self.config.factor
        x = F.pixel_shuffle(z.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w), k)
        x = x.reshape(b, f, c // (k * k), h * k, w * k).permute(0, 2, 1, 3, 4)
        return DecoderOutput(sample=x) if return_dict else (x,)


def configure_vae_memory(vae, tiling: bool) -> None:
    """Bound the VAE's working memory (the real ``AutoencoderKLHunyuanVideo`` and ``AutoencoderKLWan``; the toy's
    pixel VAE has nothing to bound):

    * **slicing**, always: a batch goes through the encoder and decoder one clip at a time, the same numbers as one
      clip alone. The decoder's working set grows with the batch otherwise, and rollouts decode a whole group at
      once (measured on CPU with HunyuanVideo's VAE config, float32, 128 x 128 x 17 frames: 1.54 GB for one clip,
      3.10 GB for two, 1.58 GB for two with slicing; docs/scaling.md, "The VAE's working memory");
    * **spatial tiling** when ``tiling`` (diffusers' ``enable_tiling``: 256-pixel tiles blended over 64 pixels, as
      diffusers' HunyuanVideo examples run it): a clip's decoding working set stops growing with its resolution
      (240 x 424 x 33 frames: 9.5 GB untiled, 5.9 GB tiled). Clips of at most 256 x 256 pixels are not tiled.
    """
    if hasattr(vae, "enable_slicing"):
        vae.enable_slicing()
    if hasattr(vae, "enable_tiling"):
        if tiling:
            vae.enable_tiling()
        else:
            vae.disable_tiling()
