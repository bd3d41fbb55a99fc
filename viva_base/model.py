"""The VIVA editor: a frozen LLaVA instructor + a HunyuanVideo DiT conditioned on the source video.

Data flow (paper Figure 2; docs/architecture.md)::

    instruction, first frame [, reference] --LLaVA (frozen)--> tokens + mask ---------------+
    instruction --CLIP text (frozen)--> pooled vector --------------------------------------+
    source video --VAE (frozen)--> z_src                                                    v
    z_t ++ z_src (channels) --projector (patch embedding, 2C in)--> HunyuanVideo DiT --> velocity

The reference image, when given, is seen by the VLM and also enters the DiT: its latent (the image
resized to the video's size, encoded as a 1-frame video) is appended as one extra latent frame at the
end of the time axis, in both channel halves (the clean reference in the noisy half, the reference in
the source half); the model's output for that frame is dropped. RoPE gives it its own time position.

An editor directory (``save_pretrained``) holds one subfolder per component, each loadable by its
library class, and ``editor_config.json``::

    transformer/  vae/  instructor/ (LLaVA model + processor)  text_encoder_2/  tokenizer_2/  scheduler/
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from .atomic import atomic_dir
from .errors import CheckpointError
from .hub import PushToHubMixin
from .instructor import InstructorConfig, encode_instructions, encode_pooled
from .policy import Condition
from .vae import configure_vae_memory

logger = logging.getLogger(__name__)

EDITOR_CONFIG = "editor_config.json"
# peft target_modules (a full-match regex): self- and cross-attention projections of the dual- and
# single-stream blocks. The token refiner (trained in full by SFT) is not targeted.
HUNYUAN_LORA_TARGETS = (
    r".*transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
)


@dataclass
class EditorConfig:
    """Settings of a :class:`VivaEditor` that are not weights (saved as ``editor_config.json``)."""

    instructor: InstructorConfig = field(default_factory=InstructorConfig)
    embedded_guidance_scale: float = 6.0   # HunyuanVideo's distilled guidance input (used if the DiT has one)
    shift: float = 7.0                     # flow-matching schedule shift (HunyuanVideo's default)
    max_frames: int = 129                  # what the edit command adapts inputs to (HunyuanVideo's length)
    # the longer side (inputs larger are shrunk to it): recipes/sft_viva.yaml's 480 x 848 (HunyuanVideo's 480p
    # bucket), as LucyEditor's is its 480 x 832. It was 720, which shrank an input of the training size to 720 x 400.
    max_side: int = 848
    pooled_max_length: int = 77
    # What the DiT's output means. "velocity": v itself (HunyuanVideo and every pretrained flow DiT).
    # "source_residual": the clean latent's difference from the source latent, x0 = z_src + out, and
    # v = (z_t - x0) / sigma: copying the source is the zero output, exactly, at every noise level (for DiTs
    # trained from scratch, like the toy editor; docs/toy_world.md measures why).
    prediction: str = "velocity"
    # Whether the VLM instructor sees images (paper eq. 1: the source's first frame and the reference). False: it
    # reads the instruction only (the text-only "Vanilla" row of the paper's ablation, benchmarks/ablation.py); the
    # source video still enters the DiT as the source latent and the reference as its extra latent frame.
    instructor_images: bool = True
    # The VAE decodes and encodes in 256-pixel spatial tiles (diffusers' enable_tiling, as its HunyuanVideo examples
    # run it): a clip's working memory stops growing with its resolution (viva_base.vae.configure_vae_memory).
    # Batches always go through the VAE one clip at a time.
    vae_tiling: bool = True

    @classmethod
    def from_dict(cls, d: dict) -> "EditorConfig":
        d = dict(d)
        d["instructor"] = InstructorConfig(**d.get("instructor", {}))
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


def widen_patch_embedding(transformer):
    """Widen a text-to-video ``HunyuanVideoTransformer3DModel`` to take ``[z_t ; z_src]`` (2C channels).

    The new patch embedding ("projector") copies the pretrained kernel into the noisy half and zeros
    into the source half, so that before any training the editor equals the T2V model on the noisy
    input whatever the source latent is. Output channels stay C.
    """
    from diffusers import HunyuanVideoTransformer3DModel

    cfg = dict(transformer.config)
    c = cfg["in_channels"]
    if cfg.get("out_channels") not in (None, c):
        raise CheckpointError(f"transformer has in_channels={c} != out_channels={cfg['out_channels']}: already widened?")
    cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
    cfg.update(in_channels=2 * c, out_channels=c)
    wide = HunyuanVideoTransformer3DModel.from_config(cfg)
    if transformer.dtype != wide.dtype:
        wide = wide.to(dtype=transformer.dtype)
    state = transformer.state_dict()
    old = state["x_embedder.proj.weight"]
    new = torch.zeros(old.shape[0], 2 * c, *old.shape[2:], dtype=old.dtype)
    new[:, :c] = old
    state["x_embedder.proj.weight"] = new
    wide.load_state_dict(state)
    return wide


def source_residual_velocity(z_t: torch.Tensor, z_src: torch.Tensor, delta: torch.Tensor,
                             sigma: torch.Tensor) -> torch.Tensor:
    """The velocity of a source-residual prediction: ``x0 = z_src + delta``, ``v = (z_t - x0) / sigma``.

    From ``z_t = (1 - sigma) x0 + sigma noise`` and ``v = noise - x0`` (DESIGN.md's convention), ``v = (z_t - x0) /
    sigma`` exactly; the flow-matching loss on ``v`` is unchanged (it equals the x0 error weighted by
    ``1 / sigma^2``). ``sigma`` ([B]) is floored at 1e-4 for the division only (samplers never evaluate 0).
    """
    s = sigma.float().clamp_min(1e-4).reshape(-1, *([1] * (z_t.ndim - 1)))
    return (z_t - z_src - delta) / s


class VivaEditor(PushToHubMixin):
    """The VIVA editor; implements :class:`~viva_base.policy.EditPolicy`."""

    def __init__(self, *, instructor, processor, text_encoder_2, tokenizer_2, transformer, vae, scheduler,
                 config: EditorConfig | None = None, **overrides):
        self.instructor = instructor.eval().requires_grad_(False)
        self.processor = processor
        self.text_encoder_2 = text_encoder_2.eval().requires_grad_(False)
        self.tokenizer_2 = tokenizer_2
        self.transformer = transformer
        self.vae = vae.eval().requires_grad_(False)
        self.scheduler = scheduler
        self.config = config or EditorConfig(shift=float(scheduler.config.get("shift", 1.0)))
        for k, v in overrides.items():
            setattr(self.config, k, v)
        configure_vae_memory(self.vae, self.config.vae_tiling)
        if transformer.config.in_channels != 2 * transformer.config.out_channels:
            raise CheckpointError("the transformer is not an editor DiT (in_channels must be 2 x out_channels); "
                                  "load a text-to-video checkpoint with VivaEditor.from_t2v(...) to widen it")
        # How many prompts/videos each frozen encoder has processed (tests and benchmarks check that
        # rollouts encode each prompt once, never once per sample).
        self.calls = {"instructor": 0, "vae_encode": 0, "text_encoder_2": 0}
        # The module the velocity forward goes through: the transformer itself, or the wrapper a
        # trainer made of it (DDP / DeepSpeed from accelerator.prepare) so gradients sync.
        self.dit_forward: torch.nn.Module | None = None

    # ------------------------------------------------------------------ device / dtype
    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.transformer.parameters()).dtype

    def to(self, device=None, dtype=None) -> "VivaEditor":
        for m in (self.instructor, self.text_encoder_2, self.transformer, self.vae):
            if device is not None and next(m.parameters(), torch.empty(0)).device != torch.device(device):
                m.to(device=device)
            if dtype is not None and next(m.parameters(), torch.empty(0, dtype=dtype)).dtype != dtype:
                m.to(dtype=dtype)
        return self

    @property
    def latent_channels(self) -> int:
        return int(self.transformer.config.out_channels)

    @property
    def temporal_ratio(self) -> int:
        return int(getattr(self.vae.config, "temporal_compression_ratio", None) or
                   getattr(self.vae, "temporal_compression_ratio", 1))

    @property
    def spatial_ratio(self) -> int:
        r = getattr(self.vae.config, "spatial_compression_ratio", None) or getattr(self.vae, "spatial_compression_ratio", 1)
        return int(r) * int(self.transformer.config.patch_size)

    @property
    def lora_targets(self) -> str:
        return HUNYUAN_LORA_TARGETS

    def valid_num_frames(self, n: int) -> int:
        """The largest frame count <= n the VAE accepts (``r k + 1``)."""
        r = self.temporal_ratio
        return n if r == 1 else ((n - 1) // r) * r + 1

    # ------------------------------------------------------------------ encoders (frozen, once per prompt)
    @torch.no_grad()
    def encode_video(self, videos: torch.Tensor) -> torch.Tensor:
        """(B, F, 3, H, W) in [0, 1] -> normalised latents (B, C, f, h, w) (distribution mode, deterministic)."""
        self.calls["vae_encode"] += videos.shape[0]
        return self._encode(videos)

    def _encode(self, videos: torch.Tensor) -> torch.Tensor:
        x = videos.to(self.vae.device, self.vae.dtype).permute(0, 2, 1, 3, 4) * 2 - 1
        z = self.vae.encode(x).latent_dist.mode()
        return z * float(self.vae.config.scaling_factor)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        z = latents.to(self.vae.device, self.vae.dtype) / float(self.vae.config.scaling_factor)
        x = self.vae.decode(z).sample
        return ((x.float() + 1) / 2).clamp(0, 1).permute(0, 2, 1, 3, 4).contiguous()

    @torch.no_grad()
    def encode_condition(self, videos: torch.Tensor, instructions: Sequence[str],
                         references: Sequence[torch.Tensor | None] | None = None, *,
                         with_uncond: bool = True) -> tuple[Condition, Condition | None]:
        """Conditions for B prompts and their unconditional twins (empty instruction, same source).

        One batched call each of the VLM (cond and uncond together), the CLIP text encoder and the VAE.
        ``with_uncond=False`` (SFT) skips the unconditional half and returns ``(cond, None)``.
        """
        b = videos.shape[0]
        if len(instructions) != b:
            raise ValueError(f"{len(instructions)} instructions for {b} videos")
        references = list(references) if references is not None else [None] * b
        first = [videos[i, 0] for i in range(b)]
        images = [[first[i]] + ([references[i]] if references[i] is not None else []) for i in range(b)]
        if not self.config.instructor_images:  # text only (EditorConfig.instructor_images)
            images = [[] for _ in range(b)]
        texts = list(instructions) + ([""] * b if with_uncond else [])
        self.calls["instructor"] += b  # prompts encoded (cond and uncond of a prompt: one batched pass)
        hidden, mask = encode_instructions(self.instructor, self.processor, texts,
                                           images + (images if with_uncond else []), self.config.instructor)
        self.calls["text_encoder_2"] += b
        pooled = encode_pooled(self.text_encoder_2, self.tokenizer_2, texts, self.config.pooled_max_length)
        src = self.encode_video(videos)
        has_ref = torch.tensor([r is not None for r in references], device=src.device)
        ref = torch.zeros_like(src[:, :, :1])
        if has_ref.any():
            h, w = videos.shape[-2:]
            imgs = torch.stack([
                F.interpolate(r[None].float(), size=(h, w), mode="bilinear", antialias=True, align_corners=False)[0]
                if r is not None else torch.zeros(3, h, w) for r in references]).clamp(0, 1)
            ref = self._encode(imgs[:, None].to(videos))  # part of the same per-prompt pass
        dt = self.dtype
        common = {"source_latents": src.to(dt), "ref_latents": ref.to(dt), "has_ref": has_ref}
        cond = Condition({"prompt_embeds": hidden[:b].to(dt), "prompt_mask": mask[:b],
                          "pooled": pooled[:b].to(dt), **common})
        if not with_uncond:
            return cond, None
        uncond = Condition({"prompt_embeds": hidden[b:].to(dt), "prompt_mask": mask[b:],
                            "pooled": pooled[b:].to(dt), **common})
        return cond, uncond

    def latent_shape(self, cond: Condition) -> tuple[int, ...]:
        return tuple(cond["source_latents"].shape[1:])

    # ------------------------------------------------------------------ the DiT
    def velocity(self, latents: torch.Tensor, sigma: torch.Tensor | float, cond: Condition) -> torch.Tensor:
        """v(z_t, sigma, cond) in float32. ``sigma`` is a float or a [B] tensor (timestep = 1000 sigma)."""
        b = latents.shape[0]
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=latents.device)
        sigma = sigma.expand(b) if sigma.ndim == 0 else sigma
        has_ref = cond["has_ref"]
        if bool(has_ref.any()) and not bool(has_ref.all()):  # never mix token counts in one forward
            out = torch.empty(latents.shape, dtype=torch.float32, device=latents.device)
            for sel in (has_ref, ~has_ref):
                idx = sel.nonzero().flatten()
                out[idx] = self.velocity(latents[idx], sigma[idx], cond.select(idx))
            return out
        dt = self.dtype
        x = torch.cat([latents.to(dt), cond["source_latents"]], dim=1)
        frames = latents.shape[2]
        if bool(has_ref.any()):
            ref = cond["ref_latents"]
            x = torch.cat([x, torch.cat([ref, ref], dim=1)], dim=2)
        guidance = None
        if self.transformer.config.guidance_embeds:
            guidance = torch.full((b,), self.config.embedded_guidance_scale * 1000.0, device=x.device, dtype=dt)
        dit = self.transformer if self.dit_forward is None else self.dit_forward
        out = dit(
            hidden_states=x, timestep=(sigma * 1000.0).to(dt), encoder_hidden_states=cond["prompt_embeds"],
            encoder_attention_mask=cond["prompt_mask"], pooled_projections=cond["pooled"], guidance=guidance,
            return_dict=False,
        )[0]
        out = out[:, :, :frames].float()
        if self.config.prediction == "velocity":
            return out
        if self.config.prediction == "source_residual":
            return source_residual_velocity(latents.float(), cond["source_latents"].float(), out, sigma)
        raise CheckpointError(f"editor_config.json: prediction={self.config.prediction!r} is not 'velocity' or "
                              "'source_residual'")

    # ------------------------------------------------------------------ save / load
    def save_pretrained(self, path: str | os.PathLike, *, files: dict[str, str] | None = None) -> Path:
        """Write the whole editor to ``path`` atomically (a temporary folder renamed at the end); ``files``: text
        files written with it (name -> text: a model card, the training recipe; viva_base.hub)."""
        path = Path(path)
        if hasattr(self.transformer, "peft_config"):
            raise CheckpointError("save the LoRA with editgrpo's checkpoint functions, or merge it first")
        with atomic_dir(path) as tmp:
            self.transformer.save_pretrained(tmp / "transformer")
            self.vae.save_pretrained(tmp / "vae")
            self.instructor.save_pretrained(tmp / "instructor")
            self.processor.save_pretrained(tmp / "instructor")
            self.text_encoder_2.save_pretrained(tmp / "text_encoder_2")
            self.tokenizer_2.save_pretrained(tmp / "tokenizer_2")
            self.scheduler.save_pretrained(tmp / "scheduler")
            meta = {"_class_name": "VivaEditor", "vae_class": type(self.vae).__name__, **asdict(self.config)}
            (tmp / EDITOR_CONFIG).write_text(json.dumps(meta, indent=2))
            for name, text in (files or {}).items():
                (tmp / name).write_text(text)
        return path

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, torch_dtype: torch.dtype | None = None,
                        device: str | torch.device | None = None, **overrides) -> "VivaEditor":
        """Load an editor directory written by :meth:`save_pretrained` (a local folder or a hub repo id)."""
        root = _resolve(path, EDITOR_CONFIG)
        meta = json.loads((root / EDITOR_CONFIG).read_text())
        if meta.get("_class_name") != "VivaEditor":
            raise CheckpointError(f"{path}: not a VivaEditor directory ({EDITOR_CONFIG} names {meta.get('_class_name')})")
        config = EditorConfig.from_dict(meta)
        comps = _load_components(root, root, root / "instructor", meta.get("vae_class"), torch_dtype)
        editor = cls(**comps, config=config, **overrides)
        return editor.to(device=device) if device else editor

    @classmethod
    def from_t2v(cls, base: str | os.PathLike, instructor: str | os.PathLike, *,
                 torch_dtype: torch.dtype | None = None, **overrides) -> "VivaEditor":
        """Start an editor from a HunyuanVideo text-to-video checkpoint and a LLaVA checkpoint.

        ``base`` has the layout of ``hunyuanvideo-community/HunyuanVideo``; ``instructor`` the layout of
        ``xtuner/llava-llama-3-8b-v1_1-transformers``. The DiT is widened (:func:`widen_patch_embedding`).
        """
        base_root = _resolve(base, "transformer/config.json")
        instr_root = _resolve(instructor, "config.json")
        comps = _load_components(base_root, base_root, instr_root, None, torch_dtype, widen=True)
        return cls(**comps, **overrides)

    def edit(self, video, instruction, reference=None, **kwargs):
        """Edit one clip (tensor or path); see :class:`viva_base.pipeline.EditPipeline` for the arguments."""
        from .pipeline import EditPipeline

        return EditPipeline(self)(video, instruction, reference, **kwargs)


def _resolve(path: str | os.PathLike, probe: str) -> Path:
    """A local folder, or a hub repo id resolved through the local Hugging Face cache (offline-safe)."""
    p = Path(path)
    if p.is_dir():
        if not (p / probe).exists():
            raise CheckpointError(f"{p}: missing {probe}; is this the right directory?")
        return p
    if p.exists():
        raise CheckpointError(f"{p}: is a file, expected a model directory")
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import HFValidationError

    try:
        return Path(snapshot_download(str(path)))
    except HFValidationError:
        raise CheckpointError(f"{path}: no such directory, and not a valid hub repo id") from None
    except Exception as exc:  # offline, unknown repo, no network
        raise CheckpointError(f"{path}: no such directory, and the hub repo could not be fetched "
                              f"({exc.__class__.__name__}; offline? download it first with "
                              f"`hf download {path}`)") from None


def complete_processor(processor, instructor):
    """Fill in what a LLaVA processor saved before transformers 4.45 lacks, from the model it belongs to.

    Such a processor (``xtuner/llava-llama-3-8b-v1_1-transformers``, converted with transformers 4.40, holds only
    the tokenizer and the image processor) has no ``patch_size``, so transformers 5 cannot expand ``<image>`` into
    one token per image feature and fails at the first instruction (``int // NoneType``). The values follow from the
    instructor: its vision tower's patch size, its ``vision_feature_select_strategy``, and the positions the tower
    adds to the patches (CLIP's class token: 1; SigLIP: 0). LLaVA itself checks that the image tokens and its image
    features then agree in number. Returns ``processor``."""
    if getattr(processor, "patch_size", None) is not None or not hasattr(processor, "patch_size"):
        return processor
    config = instructor.config
    processor.patch_size = int(config.vision_config.patch_size)
    if getattr(processor, "vision_feature_select_strategy", None) is None:
        processor.vision_feature_select_strategy = config.vision_feature_select_strategy
    tower = getattr(getattr(instructor, "model", instructor), "vision_tower", None)
    emb = getattr(getattr(tower, "vision_model", tower), "embeddings", None)
    if emb is not None and hasattr(emb, "num_positions") and hasattr(emb, "num_patches"):
        processor.num_additional_image_tokens = int(emb.num_positions - emb.num_patches)
    else:
        processor.num_additional_image_tokens = int("clip" in config.vision_config.model_type)
    logger.info("the instructor's processor had no patch_size (saved before transformers 4.45): taken from the model "
                "(patch_size=%d, vision_feature_select_strategy=%s, num_additional_image_tokens=%d)",
                processor.patch_size, processor.vision_feature_select_strategy, processor.num_additional_image_tokens)
    return processor


def _load_components(root: Path, base: Path, instructor_dir: Path, vae_class: str | None,
                     torch_dtype: torch.dtype | None, widen: bool = False) -> dict:
    from diffusers import AutoencoderKLHunyuanVideo, FlowMatchEulerDiscreteScheduler, HunyuanVideoTransformer3DModel
    from transformers import AutoProcessor, AutoTokenizer, CLIPTextModel, LlavaForConditionalGeneration

    from .vae import PixelUnshuffleVAE

    kw = {"torch_dtype": torch_dtype} if torch_dtype else {}
    try:
        transformer = HunyuanVideoTransformer3DModel.from_pretrained(base / "transformer", **kw)
        if widen:
            transformer = widen_patch_embedding(transformer)
        vae_cls = PixelUnshuffleVAE if (vae_class or json.loads((base / "vae" / "config.json").read_text())
                                        .get("_class_name")) == "PixelUnshuffleVAE" else AutoencoderKLHunyuanVideo
        instructor = LlavaForConditionalGeneration.from_pretrained(
            instructor_dir, **({"dtype": torch_dtype} if torch_dtype else {}))
        return dict(
            transformer=transformer,
            vae=vae_cls.from_pretrained(base / "vae", **kw),
            text_encoder_2=CLIPTextModel.from_pretrained(base / "text_encoder_2", **({"dtype": torch_dtype} if torch_dtype else {})),
            tokenizer_2=AutoTokenizer.from_pretrained(base / "tokenizer_2"),
            scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(base / "scheduler"),
            instructor=instructor,
            processor=complete_processor(AutoProcessor.from_pretrained(instructor_dir), instructor),
        )
    except CheckpointError:
        raise
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{root}: cannot load the editor components ({exc.__class__.__name__}: "
                              f"{str(exc).splitlines()[0][:200]})") from None
