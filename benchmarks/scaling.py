"""The scaling plan of Edit-GRPO and of the VIVA SFT at paper scale, computed from the real model configs
(docs/scaling.md).

    python -m benchmarks.scaling                          # writes docs/scaling.md and outputs/scaling.json
    python -m benchmarks.scaling --perf outputs/perf/perf.json   # + the measured CPU table of benchmarks.perf

Nothing is estimated from rules of thumb where the real code can say it: the models are the library classes
(diffusers ``HunyuanVideoTransformer3DModel`` widened to 2C input channels as the editor has it, with the
recipe's LoRA added through ``viva_base.peft_utils.add_lora``; transformers ``LlamaModel`` and
``CLIPVisionModel``; diffusers ``AutoencoderKLHunyuanVideo``) built on PyTorch's ``meta`` device, so a 13B model
costs no memory, and run there:

* parameters are counted;
* FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` on the real forward (and backward) at the
  real shapes: matmuls, convolutions and attention;
* activation memory is the bytes autograd saves for backward (``saved_tensors_hooks``), per DiT block, without
  the attention score matrices (FlashAttention / memory-efficient SDPA on GPUs never stores them; they are
  reported apart as what naive attention would need). With gradient checkpointing a block keeps only its inputs,
  plus one block's activations while it is recomputed.

What is assumed (and said in the document): H100-class GPUs (989 dense bf16 TFLOP/s, 80 GB), 40% model FLOPs
utilisation, rollouts and updates split evenly over the GPUs (data parallel), bf16 weights and activations.
The SFT section (:func:`sft_plan`, recipes/sft_viva.yaml) fully fine-tunes the DiT: its training state per
parameter is the ZeRO paper's model of mixed-precision Adam (:func:`sft_memory`), not a measurement.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger("benchmarks.scaling")

GPU = {"name": "H100 SXM", "bf16_tflops": 989.4, "memory_gb": 80.0}
MFU = 0.40
GIB = 2 ** 30

# hunyuanvideo-community/HunyuanVideo transformer/config.json (the diffusers defaults: a test checks they agree);
# the editor widens the patch embedding to 2 x 16 input channels (viva_base.model.widen_patch_embedding).
HUNYUAN_DIT_13B = dict(in_channels=32, out_channels=16, num_attention_heads=24, attention_head_dim=128, num_layers=20,
                       num_single_layers=40, num_refiner_layers=2, mlp_ratio=4.0, patch_size=2, patch_size_t=1,
                       qk_norm="rms_norm", guidance_embeds=True, text_embed_dim=4096, pooled_projection_dim=768,
                       rope_theta=256.0, rope_axes_dim=(16, 56, 56))
# hunyuanvideo-community/HunyuanVideo vae/config.json (= the diffusers defaults of AutoencoderKLHunyuanVideo)
HUNYUAN_VAE = dict(latent_channels=16, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                   spatial_compression_ratio=8, temporal_compression_ratio=4)
# xtuner/llava-llama-3-8b-v1_1-transformers config.json: Llama-3-8B text model + CLIP ViT-L/14-336 vision tower
LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=128320, max_position_embeddings=8192, rope_theta=500000.0)
CLIP_L14_336_VISION = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                           image_size=336, patch_size=14)
# reward models: openai/clip-vit-large-patch14 (clip_if, clip_sp) and PickScore_v1 (CLIP ViT-H/14)
CLIP_L14_VISION = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                       image_size=224, patch_size=14)
CLIP_L14_TEXT = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                     max_position_embeddings=77)
CLIP_H14_VISION = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                       image_size=224, patch_size=14)
CLIP_H14_TEXT = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                     max_position_embeddings=77)

# Resolutions x frame counts of the plan: HunyuanVideo's 480p / 540p / 720p 16:9 buckets; 33 frames is
# recipes/viva.yaml's training clip, 129 frames HunyuanVideo's full length (frames 4k + 1).
SETTINGS = [(480, 848, 33), (480, 848, 65), (544, 960, 65), (720, 1280, 33), (720, 1280, 129)]
IMAGE_TOKENS = 576         # LLaVA's tokens for one image: CLIP ViT-L/14 at 336 px, (336 / 14)^2
# The DiT's text tokens: the instructor's hidden states of the first frame's image tokens plus at most 256
# instruction tokens (viva_base.instructor.InstructorConfig.max_sequence_length caps the instruction only)
TEXT_TOKENS = IMAGE_TOKENS + 256
VLM_TOKENS = 680           # LLaVA sequence: system prompt + 576 image tokens (336 / 14 = 24^2) + instruction
REWARD_FRAMES = 8          # frames each reward scores (recipes/viva.yaml: frames: {num: 8})
ZERO3_LIVE_PARAMS = int(1e9)  # recipes/accelerate/ds_zero3*.json: stage3_max_live_parameters (bf16 while gathered)
CLIP_L_TEXT_PARAMS = 123_000_000  # the editor's second text encoder (CLIP ViT-L/14 text model, pooled vector)
FIT = 0.9                  # a configuration fits when its total is at most 90% of the GPU's memory


# ---------------------------------------------------------------------------- pure functions
def latent_grid(frames: int, height: int, width: int, temporal: int = 4, spatial: int = 8) -> tuple[int, int, int]:
    """The VAE latent grid ``(f, h, w)`` of a ``4k+1``-frame clip: ``f = (F - 1) / 4 + 1``, ``h = H / 8``, ``w = W / 8``."""
    if (frames - 1) % temporal or height % (2 * spatial) or width % (2 * spatial):
        raise ValueError(f"{frames} frames of {height}x{width}: frames must be {temporal}k+1 and sides multiples "
                         f"of {2 * spatial}")
    return (frames - 1) // temporal + 1, height // spatial, width // spatial


def video_tokens(frames: int, height: int, width: int, patch: int = 2) -> int:
    """DiT video tokens: the latent grid patchified by ``patch x patch`` (time patch 1)."""
    f, h, w = latent_grid(frames, height, width)
    return f * (h // patch) * (w // patch)


def seconds_at_mfu(flops: float, gpus: int, mfu: float = MFU, peak_tflops: float = GPU["bf16_tflops"]) -> float:
    """Wall time of ``flops`` spread evenly over ``gpus`` GPUs running at ``mfu`` of their peak."""
    return flops / (gpus * mfu * peak_tflops * 1e12)


def achieved_mfu(flops: float, seconds: float, peak_tflops: float = GPU["bf16_tflops"]) -> float:
    """The MFU one GPU reached doing ``flops`` in ``seconds`` (the inverse of ``seconds_at_mfu``)."""
    return flops / seconds / (peak_tflops * 1e12)


def training_state_bytes(trainable: int, gpus: int, zero: int) -> dict[str, float]:
    """Per-GPU bytes of the trainable parameters' training state under ZeRO stage ``zero``, by part.

    DeepSpeed (the mixed-precision Adam of the ZeRO paper): bf16 weights (2 B, partitioned from stage 3), bf16
    gradients (2 B, from stage 2), fp32 master weights plus Adam's two moments (12 B, from stage 1). Plain DDP
    (``zero=0``, our trainers without DeepSpeed: trainable weights are float32 whatever the model dtype): fp32
    weights (4 B), fp32 gradients (4 B), Adam's moments (8 B). 16 B per parameter either way."""
    if zero == 0:
        return {"weights": 4.0 * trainable, "grads": 4.0 * trainable, "optim": 8.0 * trainable}
    return {"weights": 2 * trainable / (gpus if zero >= 3 else 1), "grads": 2 * trainable / (gpus if zero >= 2 else 1),
            "optim": 12 * trainable / gpus}


def adam_state_bytes(trainable: int, gpus: int, zero: int) -> float:
    """Per-GPU bytes of the trainable parameters' training state under ZeRO stage ``zero`` (0 = plain DDP), all
    parts together (:func:`training_state_bytes`)."""
    return sum(training_state_bytes(trainable, gpus, zero).values())


# ---------------------------------------------------------------------------- counting on the meta device
def count_flops(fn) -> dict[str, float]:
    """Run ``fn()`` under FlopCounterMode: total FLOPs and the attention part.

    Run on the meta device: there ``scaled_dot_product_attention`` decomposes into two batched matmuls
    (``Q K^T`` and ``P V``), the only ``bmm`` of these models, so ``attention`` = the ``bmm`` FLOPs (plus any fused
    attention op). (On CPUs the fused SDPA kernel is not counted by FlopCounterMode at all: count on meta.)
    """
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    total = counter.get_total_flops()
    attention = sum(n for op, n in counter.get_flop_counts().get("Global", {}).items()
                    if "bmm" in str(op) or "scaled_dot_product" in str(op) or "attention" in str(op))
    return {"total": float(total), "attention": float(attention)}


def meta_like(dit: torch.nn.Module) -> torch.nn.Module:
    """A meta-device copy of a diffusers DiT (same config, same LoRA rank/alpha/targets if it has one)."""
    from viva_base.peft_utils import add_lora

    with torch.device("meta"):
        copy = type(dit).from_config(dit.config).to(next(dit.parameters()).dtype)
        peft = getattr(dit, "peft_config", {}).get("default")
        if peft is not None:
            add_lora(copy, rank=peft.r, alpha=peft.lora_alpha, init="gaussian", targets=peft.target_modules)
    return copy


def pass_flops(meta_dit: torch.nn.Module, kwargs: dict, train: bool) -> dict[str, float]:
    """FLOPs of one recorded DiT call (its kwargs' shapes) on a meta model; ``train`` adds the backward."""
    kw = {k: (torch.empty(v.shape, dtype=v.dtype, device="meta") if isinstance(v, torch.Tensor) else v)
          for k, v in kwargs.items()}
    if train:
        return count_flops(lambda: meta_dit(**kw)[0].float().sum().backward())
    with torch.no_grad():
        return count_flops(lambda: meta_dit(**kw))


@contextlib.contextmanager
def saved_bytes(module: torch.nn.Module, blocks: list[torch.nn.Module], attention_len: int | None):
    """Bytes autograd saves for backward during the block, split per entry of ``blocks`` (plus "other"),
    excluding parameters; a saved ``[..., N, N]`` tensor with ``N = attention_len`` counts as attention scores."""
    params = {id(p) for p in module.parameters()}
    current = ["other"]
    stats = {"per_block": [0] * len(blocks), "other": 0, "attention_scores": 0}
    keep, seen = [], set()

    def pack(t):
        if id(t) in params or (t._base is not None and id(t._base) in params) or id(t) in seen:
            return t
        seen.add(id(t))
        keep.append(t)
        n = t.numel() * t.element_size()
        if attention_len and t.dim() >= 2 and t.shape[-1] == t.shape[-2] == attention_len:
            stats["attention_scores"] += n
            stats.setdefault("score_blocks", set()).add(current[0])
        elif current[0] == "other":
            stats["other"] += n
        else:
            stats["per_block"][current[0]] += n
        return t

    hooks = []
    for i, b in enumerate(blocks):
        hooks.append(b.register_forward_pre_hook(lambda m, a, i=i: current.__setitem__(0, i)))
        hooks.append(b.register_forward_hook(lambda m, a, o: current.__setitem__(0, "other")))
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield stats
    finally:
        for h in hooks:
            h.remove()


def meta_editor_dit(config: dict, lora_rank: int | None = 64, lora_alpha: int = 128,
                    dtype: torch.dtype = torch.bfloat16):
    """The editor's DiT on the meta device (no memory), with the recipe's LoRA on the editor's targets."""
    from diffusers import HunyuanVideoTransformer3DModel

    from viva_base.model import HUNYUAN_LORA_TARGETS
    from viva_base.peft_utils import add_lora

    with torch.device("meta"):
        dit = HunyuanVideoTransformer3DModel(**config).to(dtype)
        if lora_rank:
            add_lora(dit, rank=lora_rank, alpha=lora_alpha, init="gaussian", targets=HUNYUAN_LORA_TARGETS)
    return dit


def dit_inputs(config: dict, batch: int, grid: tuple[int, int, int], text_tokens: int, dtype=torch.bfloat16,
               device="meta") -> dict:
    f, h, w = grid
    kw = dict(hidden_states=torch.zeros(batch, config["in_channels"], f, h, w, device=device, dtype=dtype),
              timestep=torch.full((batch,), 500.0, device=device, dtype=dtype),
              encoder_hidden_states=torch.zeros(batch, text_tokens, config["text_embed_dim"], device=device, dtype=dtype),
              encoder_attention_mask=torch.ones(batch, text_tokens, device=device, dtype=torch.long),
              pooled_projections=torch.zeros(batch, config["pooled_projection_dim"], device=device, dtype=dtype),
              return_dict=False)
    if config.get("guidance_embeds"):
        kw["guidance"] = torch.full((batch,), 6000.0, device=device, dtype=dtype)
    return kw


def dit_pass(dit, config: dict, batch: int, grid: tuple[int, int, int], text_tokens: int, *, train: bool) -> dict:
    """FLOPs of one DiT pass (``train``: forward + backward with the LoRA trainable) and, for ``train``, the
    activation bytes saved for backward: total, per block, and with gradient checkpointing."""
    kw = dit_inputs(config, batch, grid, text_tokens, dtype=next(dit.parameters()).dtype,
                    device=next(dit.parameters()).device)
    blocks = list(dit.transformer_blocks) + list(dit.single_transformer_blocks)
    n_tokens = grid[0] * (grid[1] // config["patch_size"]) * (grid[2] // config["patch_size"]) + text_tokens
    if not train:
        with torch.no_grad():
            return {"flops": count_flops(lambda: dit(**kw))}
    with saved_bytes(dit, blocks, n_tokens) as saved:
        flops = count_flops(lambda: dit(**kw)[0].float().sum().backward())
    heads = config["num_attention_heads"]
    d = heads * config["attention_head_dim"]
    elt = kw["hidden_states"].element_size()
    block_inputs = sum(batch * n_tokens * d * elt for _ in blocks)  # what a checkpointed block keeps
    per_block = list(saved["per_block"])
    # Where attention ran as explicit matmuls (the meta device), it saved Q, K, V and the scores; a fused kernel
    # (FlashAttention / memory-efficient SDPA) saves Q, K, V, its output, the row log-sum-exp (fp32) and the
    # padding mask instead (a test checks this equals what the CPU's fused SDPA saves).
    for i in saved.get("score_blocks", ()):
        if i != "other":
            per_block[i] += batch * n_tokens * d * elt + batch * heads * n_tokens * 4 + batch * n_tokens * 4
    return {"flops": flops, "activations": {
        "no_checkpointing": sum(per_block) + saved["other"],
        "checkpointing": block_inputs + max(per_block) + saved["other"],
        "per_block_max": max(per_block), "outside_blocks": saved["other"],
        "attention_scores_saved_on_meta_per_block": saved["attention_scores"] / len(blocks)}}


def meta_count(build, fn) -> dict:
    """Parameters and FLOPs of a module built on the meta device (``fn(model)`` runs it under no_grad)."""
    with torch.device("meta"):
        model = build().to(torch.bfloat16)
    with torch.no_grad():
        flops = count_flops(lambda: fn(model))
    return {"params": sum(p.numel() for p in model.parameters()), "flops": flops["total"]}


def vlm_cost(batch: int = 2) -> dict:
    """LLaVA-Llama-3-8B on one prompt (cond + uncond in one batch of 2): vision tower + language model."""
    from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaModel

    vision = meta_count(lambda: CLIPVisionModel(CLIPVisionConfig(**CLIP_L14_336_VISION)),
                        lambda m: m(pixel_values=torch.zeros(batch, 3, 336, 336, device="meta", dtype=torch.bfloat16)))
    lm = meta_count(lambda: LlamaModel(LlamaConfig(**LLAMA3_8B)),
                    lambda m: m(inputs_embeds=torch.zeros(batch, VLM_TOKENS, LLAMA3_8B["hidden_size"], device="meta",
                                                          dtype=torch.bfloat16)))
    projector = 1024 * 4096 + 4096 * 4096 + 2 * 4096  # LLaVA's 2-layer MLP projector
    lm_head = LLAMA3_8B["vocab_size"] * LLAMA3_8B["hidden_size"]  # loaded with the checkpoint, unused (hidden states)
    return {"params": vision["params"] + lm["params"] + projector + lm_head,
            "flops": vision["flops"] + lm["flops"] + 2 * projector * 576 * batch}


def vae_cost(frames: int, height: int, width: int) -> dict:
    """AutoencoderKLHunyuanVideo: encoding one source clip and decoding one edited clip."""
    from diffusers import AutoencoderKLHunyuanVideo

    f, h, w = latent_grid(frames, height, width)
    enc = meta_count(lambda: AutoencoderKLHunyuanVideo(**HUNYUAN_VAE),
                     lambda m: m.encode(torch.zeros(1, 3, frames, height, width, device="meta", dtype=torch.bfloat16)))
    dec = meta_count(lambda: AutoencoderKLHunyuanVideo(**HUNYUAN_VAE),
                     lambda m: m.decode(torch.zeros(1, 16, f, h, w, device="meta", dtype=torch.bfloat16)))
    return {"params": enc["params"], "encode_flops": enc["flops"], "decode_flops": dec["flops"]}


def reward_cost(frames: int = REWARD_FRAMES) -> dict:
    """clip_if + clip_sp (CLIP ViT-L/14: edited and source frames, two captions) and PickScore (ViT-H/14) per sample."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModel

    def vision(cfg, n):
        return meta_count(lambda: CLIPVisionModel(CLIPVisionConfig(**cfg)),
                          lambda m: m(pixel_values=torch.zeros(n, 3, 224, 224, device="meta", dtype=torch.bfloat16)))

    def text(cfg, n):
        return meta_count(lambda: CLIPTextModel(CLIPTextConfig(**cfg)),
                          lambda m: m(input_ids=torch.zeros(n, 77, device="meta", dtype=torch.long)))

    parts = [vision(CLIP_L14_VISION, 2 * frames), text(CLIP_L14_TEXT, 2), vision(CLIP_H14_VISION, frames),
             text(CLIP_H14_TEXT, 1)]
    params = parts[0]["params"] + parts[1]["params"] + parts[2]["params"] + parts[3]["params"]
    return {"params": params, "flops": sum(p["flops"] for p in parts)}


# ---------------------------------------------------------------------------- the plan
@dataclass
class Recipe:
    """The recipe quantities the plan needs (from recipes/viva.yaml)."""

    prompts: int = 16
    group: int = 8
    steps: int = 16
    trained_steps: int = 4
    train_batch: int = 1
    rollout_batch: int = 8
    beta: float = 0.004
    lora_rank: int = 64
    lora_alpha: int = 128

    @classmethod
    def from_yaml(cls, path: str | Path) -> "Recipe":
        from editgrpo.config import GRPOConfig
        from viva_base.recipe import load_recipe

        c = load_recipe(GRPOConfig, [f"recipe={path}"])
        trained = c.sampling.train_steps or c.sampling.sde_window_size or c.sampling.num_steps - 1
        return cls(prompts=c.train.prompts_per_iteration, group=c.train.num_generations, steps=c.sampling.num_steps,
                   trained_steps=trained, train_batch=c.train.train_batch_size or 1,
                   rollout_batch=c.sampling.rollout_batch_size or c.train.num_generations, beta=c.train.beta,
                   lora_rank=c.lora.rank, lora_alpha=c.lora.alpha)


def plan(recipe: Recipe, settings=SETTINGS, gpus=(8, 32)) -> dict:
    """Parameters, memory per GPU, FLOPs and iteration times for each resolution x frames setting."""
    dit = meta_editor_dit(HUNYUAN_DIT_13B, recipe.lora_rank, recipe.lora_alpha)
    n_dit = sum(p.numel() for p in dit.parameters() if not p.requires_grad)
    n_lora = sum(p.numel() for p in dit.parameters() if p.requires_grad)
    vlm = vlm_cost()
    rewards = reward_cost()
    d = HUNYUAN_DIT_13B["num_attention_heads"] * HUNYUAN_DIT_13B["attention_head_dim"]
    rows = []
    for height, width, frames in settings:
        grid = latent_grid(frames, height, width)
        n_vid = video_tokens(frames, height, width)
        cfg_batch = 2  # CFG: cond and uncond in one forward
        sample = dit_pass(dit, HUNYUAN_DIT_13B, cfg_batch, grid, TEXT_TOKENS, train=False)
        train = dit_pass(dit, HUNYUAN_DIT_13B, cfg_batch * recipe.train_batch, grid, TEXT_TOKENS, train=True)
        vae = vae_cost(frames, height, width)
        n = recipe.prompts * recipe.group
        rollout_flops = recipe.steps * sample["flops"]["total"]                     # one sample, all steps, CFG
        update_flops = recipe.trained_steps * (train["flops"]["total"] / recipe.train_batch
                                               + (sample["flops"]["total"] if recipe.beta > 0 else 0))  # + KL ref
        recompute = recipe.trained_steps * sample["flops"]["total"]  # gradient checkpointing: one more forward
        fixed = recipe.prompts * (vlm["flops"] + vae["encode_flops"]) + n * (vae["decode_flops"] + rewards["flops"])
        iteration = n * (rollout_flops + update_flops) + fixed
        iteration_ckpt = iteration + n * recompute
        n_tok = n_vid + TEXT_TOKENS
        frozen = 2 * (n_dit + vlm["params"] + vae["params"] + rewards["params"] + CLIP_L_TEXT_PARAMS)
        memory = {}
        for g in gpus:
            for zero in (0, 2, 3):
                for ckpt in (False, True):
                    dit_w = 2 * n_dit / (g if zero >= 3 else 1)
                    other = frozen - 2 * n_dit
                    act = train["activations"]["checkpointing" if ckpt else "no_checkpointing"]
                    state = adam_state_bytes(n_lora, g, zero)
                    if zero >= 3:  # parameters gathered for the blocks in flight (stage3_max_live_parameters)
                        state += 2 * ZERO3_LIVE_PARAMS
                    # rollout forwards are transient (no grad): a block's working set at the rollout batch
                    rollout = 2 * recipe.rollout_batch * n_tok * d * 2 * 10
                    total = dit_w + other + state + max(act, rollout)
                    memory[f"{g}gpu_zero{zero}_{'ckpt' if ckpt else 'nockpt'}"] = {
                        "dit_weights": dit_w, "frozen_other": other, "lora_state": state, "train_activations": act,
                        "rollout_working_set": rollout, "total": total, "fits_80gb": total <= FIT * GPU["memory_gb"] * 1e9}
        rows.append({
            "height": height, "width": width, "frames": frames, "latent_grid": grid, "video_tokens": n_vid,
            "text_tokens": TEXT_TOKENS, "dit_forward_cfg_flops": sample["flops"],
            "dit_train_step_flops": train["flops"], "activations": train["activations"],
            "qkv_bytes_per_block": 3 * cfg_batch * n_tok * d * 2,
            "score_matrix_bytes_per_block": cfg_batch * HUNYUAN_DIT_13B["num_attention_heads"] * n_tok ** 2 * 2,
            "vae": vae, "rollout_flops_per_sample": rollout_flops, "update_flops_per_sample": update_flops,
            "fixed_flops_per_iteration": fixed, "iteration_flops": iteration, "iteration_flops_ckpt": iteration_ckpt,
            "iteration_seconds": {g: seconds_at_mfu(iteration, g) for g in gpus},
            "iteration_seconds_ckpt": {g: seconds_at_mfu(iteration_ckpt, g) for g in gpus}, "memory": memory})
    return {"gpu": GPU, "mfu": MFU, "recipe": recipe.__dict__, "params": {
        "dit": n_dit, "lora": n_lora, "vlm": vlm["params"], "rewards": rewards["params"]},
        "vlm_flops_per_prompt": vlm["flops"], "reward_flops_per_sample": rewards["flops"], "settings": rows}


# ---------------------------------------------------------------------------- the SFT plan (full fine-tuning)
SFT_LAYOUTS = (("DDP", 0, False), ("ZeRO-2", 2, False), ("ZeRO-3", 3, False), ("ZeRO-3 + offload", 3, True))


def sft_memory(trainable: int, frozen_bytes: float, activations: float, gpus: int, zero: int,
               offload: bool = False) -> dict:
    """Per-GPU bytes of fully fine-tuning ``trainable`` parameters under ZeRO stage ``zero`` (0 = DDP).

    The training state is 16 B per parameter (:func:`training_state_bytes`), partitioned by the stage. ZeRO-3 adds
    the parameters gathered for the blocks in flight (``stage3_max_live_parameters``, bf16). With offload
    (``zero3_offload.yaml``: parameters and optimizer state in CPU memory) only those gathered parameters stay on
    the GPU. ``frozen_bytes`` (the instructor, VAE, text encoder) are replicated; ``activations`` are the
    training micro-batch's."""
    if offload and zero < 3:
        raise ValueError("offload here means ZeRO-3 with offload_param and offload_optimizer")
    state = {"weights": 0.0, "grads": 0.0, "optim": 0.0} if offload else training_state_bytes(trainable, gpus, zero)
    live = 2 * min(ZERO3_LIVE_PARAMS, trainable) if zero >= 3 else 0
    total = sum(state.values()) + live + frozen_bytes + activations
    return {**state, "live_params": live, "frozen": frozen_bytes, "activations": activations, "total": total,
            "fits": total <= FIT * GPU["memory_gb"] * 1e9}


@dataclass
class SFTRecipe:
    """The SFT recipe quantities the plan needs (from recipes/sft_viva.yaml)."""

    frames: int = 33
    height: int = 480
    width: int = 848
    batch_size: int = 128
    accumulation: int = 16
    gpus: int = 8
    p_video: float = 0.4
    max_steps: int = 12000
    gradient_checkpointing: bool = True

    @property
    def micro_batch(self) -> int:
        """Samples per GPU per forward (viva_base.sft.micro_batch_size)."""
        from viva_base.sft import micro_batch_size

        return micro_batch_size(self.batch_size, self.accumulation, self.gpus)

    @classmethod
    def from_yaml(cls, path: str | Path, gpus: int = 8) -> "SFTRecipe":
        from viva_base.recipe import load_recipe
        from viva_base.sft import SFTConfig

        c = load_recipe(SFTConfig, [f"recipe={path}"])
        if c.train.trainable != "full" or not c.data.frames or not c.data.size:
            raise ValueError(f"{path}: the SFT plan is for train.trainable=full with data.frames and data.size set")
        return cls(frames=c.data.frames, height=c.data.size[0], width=c.data.size[1], batch_size=c.train.batch_size,
                   accumulation=c.train.gradient_accumulation_steps, gpus=gpus, p_video=c.data.p_video,
                   max_steps=c.train.max_steps, gradient_checkpointing=c.model.gradient_checkpointing)


def sft_plan(recipe: SFTRecipe, settings=SETTINGS) -> dict:
    """Memory per GPU (DDP, ZeRO-2, ZeRO-3, ZeRO-3 + offload; with and without gradient checkpointing) and time per
    optimizer step of the SFT's full fine-tuning, at the recipe's size and at each of ``settings``."""
    dit = meta_editor_dit(HUNYUAN_DIT_13B, lora_rank=None)  # train.trainable=full: every parameter trains
    n_dit = sum(p.numel() for p in dit.parameters())
    assert all(p.requires_grad for p in dit.parameters())
    vlm = vlm_cost(batch=1)  # the instruction's condition only (SFT has no unconditional branch; cfg_dropout
    # replaces the instruction by an empty one in the same single forward)
    mb = recipe.micro_batch
    own = (recipe.height, recipe.width, recipe.frames)
    rows = []
    for height, width, frames in [own] + [s for s in settings if s != own]:
        parts = {}
        for kind, f in (("video", frames), ("image", 1)):  # image pairs: 1-frame clips at the same size
            grid = latent_grid(f, height, width)
            train = dit_pass(dit, HUNYUAN_DIT_13B, mb, grid, TEXT_TOKENS, train=True)
            forward = dit_pass(dit, HUNYUAN_DIT_13B, mb, grid, TEXT_TOKENS, train=False)
            vae = vae_cost(f, height, width)
            # per sample: the DiT step (+ the recomputed forward with checkpointing), the VLM, 2 VAE encodings
            # (source and target)
            fixed = vlm["flops"] + 2 * vae["encode_flops"]
            parts[kind] = {"grid": grid, "activations": train["activations"],
                           "train_flops": train["flops"]["total"] / mb, "forward_flops": forward["flops"]["total"] / mb,
                           "fixed_flops": fixed, "vae_params": vae["params"]}
        frozen = 2 * (vlm["params"] + parts["video"]["vae_params"] + CLIP_L_TEXT_PARAMS)
        memory = {}
        for name, zero, offload in SFT_LAYOUTS:
            for ckpt in (False, True):
                act = parts["video"]["activations"]["checkpointing" if ckpt else "no_checkpointing"]
                memory[f"{name}|{'ckpt' if ckpt else 'nockpt'}"] = sft_memory(n_dit, frozen, act, recipe.gpus, zero,
                                                                              offload)
        per_sample = {k: v["train_flops"] + v["fixed_flops"] + (v["forward_flops"] if recipe.gradient_checkpointing
                                                               else 0) for k, v in parts.items()}
        step = recipe.batch_size * (recipe.p_video * per_sample["video"] + (1 - recipe.p_video) * per_sample["image"])
        rows.append({"height": height, "width": width, "frames": frames, "recipe": (height, width, frames) == own,
                     "video_tokens": video_tokens(frames, height, width), "parts": parts, "memory": memory,
                     "flops_per_sample": per_sample, "step_flops": step,
                     "step_seconds": seconds_at_mfu(step, recipe.gpus),
                     "run_hours": seconds_at_mfu(step, recipe.gpus) * recipe.max_steps / 3600})
    return {"recipe": {**recipe.__dict__, "micro_batch": mb}, "params": {"dit": n_dit, "vlm": vlm["params"]},
            "frozen_bytes": rows[0]["memory"]["DDP|ckpt"]["frozen"], "settings": rows}


# ---------------------------------------------------------------------------- the document
RUNNING = """## Running on many processes

    accelerate launch --config_file recipes/accelerate/multi_gpu.yaml -m editgrpo.train recipe=...   # DDP
    accelerate launch --config_file recipes/accelerate/zero3.yaml -m editgrpo.train recipe=recipes/viva.yaml
    torchrun --nproc_per_node 2 -m editgrpo.train recipe=recipes/tiny.yaml      # CPUs: gloo, found by itself
    accelerate launch --config_file recipes/accelerate/zero3.yaml -m viva_base.sft recipe=recipes/sft_viva.yaml ...
    ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 -m viva_base.sft recipe=recipes/sft_tiny.yaml

The toy chain (`recipe=recipes/toy.yaml`) runs under `torchrun` too: its stages are built by the main process while
the others wait by polling a file, not in a barrier (the SFT stage outlasts gloo's 30-minute timeout on CPUs), and
the SFT stage trains as a process of its own, as a 1-process chain trains it (tests/test_toy_multiprocess.py). The
data build's processes never wait for each other: each rebuilds the manifest when its own shard is done
(docs/data_pipeline.md). At the end of the SFT and of Edit-GRPO the other processes wait for the main one's final
save and report the same way, so a 13B editor's save cannot meet NCCL's 10-minute timeout, and then all of them
tear the process group down together.

What makes N processes train exactly like one (tests/test_scale_multiprocess.py checks it to 1e-5, 1 against 2
processes, including a group split between processes):

* the `P x G` samples of an iteration are numbered globally and split contiguously over the processes; every
  sample's noise comes from its own generator seeded by `(seed, iteration, global sample index)`;
* each process builds the conditions of its own prompts once (a prompt whose group is split is encoded by both);
* rewards and group ids are gathered before the advantages (`editgrpo.grpo.gather_for_advantages`), so a group
  split over processes is normalised over all its members; every tensor that reaches a collective (gather, pad,
  reduce) is moved to `accelerator.device` first (NCCL rejects CPU tensors; gloo, used on CPUs, accepts them);
* each backward pass is weighted by `valid samples / valid samples of the minibatch on all processes x world`, so
  the averaged gradients (DDP or DeepSpeed) are the mean over the global minibatch.
* the lr schedule advances once per optimizer step, whatever the number of processes and under DeepSpeed too
  (`step_scheduler_with_optimizer=False`: accelerate's default advances it once per process per step).
* with `train.num_inner_epochs > 1` every inner epoch reshuffles the samples across minibatches: one permutation of
  the iteration's global samples seeded by `(seed, iteration, epoch)`, each process keeping its own samples in
  that order (resumes exactly; the order does not depend on the number of processes);
* a micro-batch that adds exactly zero to the gradient (all its samples with zero advantage and `beta = 0`, or
  NaN rewards) skips its forwards and backward, decided identically on every process (a reduced flag: skipped only
  where skipped on all), so every process runs the same backward passes and the same final gradient sync; under
  DeepSpeed nothing is skipped (its engine counts a fixed number of backward passes per optimizer step).

DeepSpeed (`recipes/accelerate/zero{2,3,3_offload}.yaml` + `ds_*.json`): the trainer fills the configs' "auto"
batch keys (micro-batch = `train.train_batch_size`, gradient accumulation = micro-batches x trained steps of an
update, clipping = `train.max_grad_norm`); the engine steps the optimizer at the last backward pass of each update.
A checkpoint keeps the usual files (LoRA, scheduler, state) plus `deepspeed/` with every rank's ZeRO partition of
the optimizer state (`engine.save_checkpoint`), and resumes from it exactly. Under ZeRO-3 only the DiT is
partitioned (the VLM, VAE and reward models are built whole), the LoRA is gathered for saving, and every process must
run the same number of DiT forwards: a batch that mixes prompts with and without a reference image runs two, so a
prompt manifest that mixes them is refused unless rollouts and training micro-batches hold one sample each
(`sampling.rollout_batch_size=1`, `train.train_batch_size=1`).
Held-out evaluation shares its batches out over the processes and gathers the scores on the main process (the same
scores as one process: tests/test_evaluate_distributed.py); a main process evaluating alone while the others wait
would meet NCCL's 10-minute timeout at the real recipe's size. Its batches never mix items with and without a
reference, and under ZeRO-3 a process with fewer batches than another runs a repeat of one of its own (dropped), so
the processes' forwards stay in step.
On CPUs, ZeRO-2 and ZeRO-3 ran for real (2 processes, gloo, the tiny editor). Not run anywhere: bf16 under
DeepSpeed, CPU offload, NCCL, multi-node; these are checked as configurations by DeepSpeed's own config classes.

The SFT (`viva_base.sft`) uses the same configs and helpers (`viva_base.distributed`): it fills the "auto" keys
(micro-batch per GPU = `train.batch_size / (train.gradient_accumulation_steps x processes)`, accumulation =
`train.gradient_accumulation_steps`, clipping = `train.max_grad_norm`; a value the DeepSpeed config fixes otherwise,
or a `bf16`/`fp16` setting against `train.mixed_precision`, is a one-line error), and the engine accumulates,
clips and steps at the last micro-batch of each step (the lr schedule steps once per optimizer step). Under ZeRO-3
only the DiT is partitioned, every process runs the same DiT forwards (a micro-batch mixing pairs with and without a
reference image is refused unless each process takes one pair), and `final/` is written from the whole float32
master weights, gathered one parameter at a time (`viva_base.distributed.full_parameters`), so it loads like any
editor folder. Checkpoints carry `deepspeed/` and record the ZeRO stage and the number of processes; a resume
under another layout (DeepSpeed or not, another stage, other processes) is refused in one line.
"""

VAE_MEMORY = """### The VAE's working memory

The counts above leave out the VAE's decoding working set, and it is not small. Measured on CPU (float32, the
HunyuanVideo VAE config with random weights, the rise of the peak resident memory while decoding, `getrusage`):
one clip of 128 x 128 x 17 frames 1.54 GB, two clips at once 3.10 GB, two clips one at a time 1.58 GB;
one clip of 240 x 424 x 33 frames 9.5 GB (355 s on 2 cores), in 256-pixel tiles 5.9 GB (474 s). Untiled, the set
grows with the pixels: a 480 x 848 x 33 clip would take about 4 x 9.5 = 38 GB in float32, about 19 GB in bf16;
measured on an H200 in bf16 (`gpu_check`'s `vae` check, the last section): 22.0 GiB. Edit-GRPO decodes its rollouts
a group at a time (`sampling.rollout_batch_size`, G = 8 in recipes/viva.yaml): 8 such clips at once, about 150 GB,
would not have fit on an 80 GB or a 141 GB GPU. The editor now sends a batch through the VAE one clip at a time
(diffusers' `enable_slicing`: the same numbers as each clip alone) and, by default (`editor_config.json`'s
`vae_tiling`, recipe key `model.vae_tiling`), in 256-pixel spatial tiles blended over 64 pixels (`enable_tiling`, as
diffusers' HunyuanVideo examples run it), so a clip's working set stops growing with its resolution
(`viva_base.vae.configure_vae_memory`, tests/test_vae_memory.py). On the H200, a 480 x 848 x 33 clip decodes sliced
and tiled in 3.19 s with a 3.7 GiB peak, against 1.76 s and 22.0 GiB untiled: the tiles cost 81% more time (+34% on
CPU at 240 x 424). With recipes/viva.yaml on 8 GPUs each GPU decodes 16 rollouts an iteration, about 51 s tiled, 5%
of the plan's 17.4 min (more than the 0.4%-1.6% of an iteration that the FLOPs of the VAE and the rewards suggest);
on a 141 GB GPU with room for the untiled working set, `model.vae_tiling=false` saves about 23 s of it.
"""


CHECKING = """## Checking a GPU machine

    python -m benchmarks.gpu_check                                        # on a CUDA machine, a few minutes
    python -m benchmarks.gpu_check --frames 33 --height 480 --width 848   # the 13B DiT step at recipes/viva.yaml's clip
    python -m benchmarks.gpu_check --checks dit --frames 33 --dit-compile regional   # that step compiled
    python -m benchmarks.gpu_check --device cpu --tiny-only               # the same code paths on CPU, tiny shapes

The first command to run on a GPU machine. Each check reports ok, FAIL or skipped, and a failing one does not
stop the others:

* `kernels`: a bf16 matmul and bf16 SDPA attention on the GPU against float32 references, and FlashAttention alone;
* `sft`: `viva_base.sft recipe=recipes/sft_tiny.yaml`, 4 steps with `model.dtype=bf16 train.mixed_precision=bf16`;
* `sft_compile`: the same SFT run with `train.compile=regional train.fused_optimizer=true` (below); it must run and
  its losses must be the `sft` check's to 2% (bf16);
* `grpo`: `editgrpo.train recipe=recipes/tiny.yaml`, 2 iterations in bf16 with the held-out evaluation before and
  after; the first minibatch's mean importance ratio (`ratio_mean` of iteration 1 in metrics.jsonl: every forward
  there precedes the first optimizer step) must be within 1e-3 of 1, i.e. the training forward reproduces the
  rollout's log-probs in bf16;
* `grpo_compile`: the `grpo` run (without the evaluation) with `train.compile=regional train.fused_optimizer=true`:
  the rollouts (no grad), training forwards and KL reference forwards (LoRA off) run separately compiled graphs, and
  the first minibatch's ratio must still be within 1e-3 of 1; its first-iteration reward is shown next to `grpo`'s;
* `grpo_2proc`: the same under `torchrun --nproc_per_node 2` (NCCL); "skipped: 1 GPU" on one GPU;
* `dit`: the real-size HunyuanVideo DiT (the 13B config above, widened to 32 input channels, random weights, no
  download) with LoRA r64 and gradient checkpointing, at `--frames x --height x --width` (default 9 x 480 x 848):
  one sampling forward and one training forward + backward (CFG batch 2, bf16 autocast), timed, with the peak GPU
  memory, each next to what this document's counting predicts for that shape (FLOPs at 40% MFU of 989 TFLOP/s;
  memory = bf16 weights + fp32 LoRA and its gradients + checkpointed activations) and the ratio measured / predicted.
  At the default shape (3 x 60 x 106 latent, 4,770 video + 832 text tokens) the prediction is 201 TFLOP and 0.51 s
  for the forward, 650 TFLOP and 1.64 s for forward + backward with the recomputed forward, and 30.4 GiB.
  `--dit-compile regional` compiles the DiT as `train.compile=regional` does (the first call of each pass, which
  compiles, is reported apart); the table gives the MFU measured (counted FLOPs per second over 989.4 TFLOP/s);
* `vae`: the real-size HunyuanVideo VAE (random weights, bf16) decoding 2 clips of `--vae-frames x --height x
  --width` (default 33 x 480 x 848, recipes/viva.yaml's clip) as the editor runs it (one clip at a time, 256-pixel
  tiles), then one clip untiled: the peak GPU memory of each and the seconds a clip (below, "The VAE's working
  memory").

It prints a table, writes it as JSON (`--out`, default `outputs/gpu_check/gpu_check.json`) and, next to it, a
markdown snippet; `python -m benchmarks.scaling --perf outputs/perf/perf.json --gpu-check
outputs/gpu_check/gpu_check.json [more.json ...]` puts it at the end of this document (the first file's checks in
full, every file's DiT step in one table). The files are written again after each check, so a run stopped by a time
limit keeps what it measured (the report names the checks not run). Without CUDA it says so in one line and exits 0
with nothing run; with `--device cpu --tiny-only` every check runs on CPU at tiny sizes, the DiT step on a
scaled-down config through the same function (tests/test_gpu_check.py, about 2 min with the compiled SFT on a cold
inductor cache).

**Run on a lent H200 (2026-12-04; the last section).** Every check passed on the first try, with no change to the
code: the offline install of the carried wheels, the bf16 kernels (FlashAttention available), the tiny SFT and
Edit-GRPO recipes in bf16 eager and compiled (first minibatch ratio 1.000000 eager, 0.999996 compiled; compiled SFT
losses within 8.5e-5 of eager), the held-out evaluation, the 13B DiT step at 9, 33 and 65 frames (peak memory
within 2-4% of the count above; time x1.27-1.36 of the 40%-MFU prediction eager, x0.99 compiled) and the VAE. The
machine had one GPU, so `grpo_2proc` (NCCL) was skipped. The runs' JSON files are kept in
`docs/gpu_check/h200-2026-12-04/` (`--gpu-check docs/gpu_check/h200-2026-12-04/{gpu_check,dit33,dit33c,dit65}.json`
renders the last section again). The two calls, 6.3 and 4.6 minutes of the machine:

    bash benchmarks/gpu_wheels.sh install && python3 -m benchmarks.gpu_check \\
        --checks kernels,dit,vae,sft,grpo,sft_compile,grpo_compile,grpo_2proc --out /tmp/gc/gpu_check.json
    python3 -m benchmarks.gpu_check --checks dit --frames 33 --out /tmp/gc/dit33.json
    python3 -m benchmarks.gpu_check --checks dit --frames 33 --dit-compile regional --out /tmp/gc/dit33c.json
    python3 -m benchmarks.gpu_check --checks dit --frames 65 --out /tmp/gc/dit65.json

A GPU machine without network needs the packages it lacks (diffusers, omegaconf, av, open_clip_torch, ftfy; torch,
torchvision, transformers, timm, accelerate, peft, safetensors, tokenizers, matplotlib and tensorboard are assumed
there). Where a package index is reachable:

    bash benchmarks/gpu_wheels.sh download   # Python 3.12 manylinux x86_64 wheels, no torch: 43 MB in gpu_wheels/

It fetches what `python -m benchmarks.gpu_wheels` lists: the dependency closure of those five packages (markers
evaluated for Python 3.12) less the closure of the packages assumed there, pinned to the versions installed here.
The hand-kept list it replaces had missed `lazy-importer`, which `importlib_metadata` 10 requires: the offline
install stopped at "No matching distribution found for lazy-importer" (`tests/test_gpu_wheels.py`).
`gpu_wheels/` is git-ignored; copy it with the working tree (it fits the 64 MiB a lent machine's tree may
have: name it in `carry`), then there, from the repository root (no install of this project is needed):

    bash benchmarks/gpu_wheels.sh install && python3 -m benchmarks.gpu_check --out "$OUT/gpu_check.json"

**Rehearsed on CPU (2026-12-01)** in a fresh Python 3.12 virtual environment holding the lent H200 machine's
versions as its workplace lists them (torch 2.11.0 CUDA build, torchvision 0.26.0, transformers 5.17.0, accelerate
1.15.0, huggingface_hub 1.33.0, safetensors 0.8.0, tokenizers 0.23.2, numpy 2.5.2, with peft, timm, matplotlib and
tensorboard), pip's configuration and local wheel folders switched off, from a copy of the tracked files: the
offline install succeeded (`pip check`: no broken requirements), `python -m benchmarks.gpu_check` said "no CUDA
device here" and exited 0, and `--device cpu --tiny-only` passed every check (kernels, sft, grpo with a first ratio
of 1.000000, grpo_2proc on gloo, the DiT step); the 13B DiT with LoRA r64 builds on the meta device there and its
count gives the prediction above (12.82 B frozen parameters, 110 M LoRA in float32). The test suite in that
environment (`-n 2`, the checkout on `PYTHONPATH`): 602 passed; the 68 others need the optional extras that
environment lacks (deepspeed, fastapi/uvicorn, gradio, scikit-image), so no failure came from the older torch and
the newer transformers.

"""


COMPILING = """### Compiling the DiT (`train.compile`, `train.fused_optimizer`)

    accelerate launch --config_file recipes/accelerate/zero3.yaml -m viva_base.sft recipe=recipes/sft_viva.yaml \\
        train.compile=regional train.fused_optimizer=true ...
    accelerate launch --config_file recipes/accelerate/zero3.yaml -m editgrpo.train recipe=recipes/viva.yaml \\
        train.compile=regional train.fused_optimizer=true ...

`train.compile=regional` compiles each block class diffusers lists in the DiT's `_repeated_blocks`
(`ModelMixin.compile_repeated_blocks`: the 20 dual-stream and 40 single-stream blocks of HunyuanVideo share two
compiled graphs, so the cold start costs about as much as two blocks), `full` the whole forward (best for small
models: the toy). The DiT is compiled in place before `accelerator.prepare`, so parameter names, checkpoints, EMA and
`final/` are those of the eager module; the kernels are not part of what a run is (`resume=latest` continues a
compiled run eagerly and the other way round). Inputs whose size changes between batches (text length,
frames, image vs video pairs) are marked dynamic after their first change: a run compiles a few graphs, not one per
batch. `train.fused_optimizer=true` takes torch's fused AdamW kernel (CPU or CUDA).
In Edit-GRPO the compiled DiT carries its LoRA: rollouts (no grad, eval mode), training forwards (grad) and the KL
reference forwards (the adapter switched off, no grad) differ in what dynamo guards on, so each is a graph of its
own, compiled once (the tiny recipe with evaluation: about six graphs, under dynamo's limit of 8 per function;
a run past that limit would fall back to eager silently, which tests/test_grpo_compile.py turns into a failure).
Not through accelerate's `dynamo_backend`: that setting lives in the process-wide `AcceleratorState`, which the
first `Accelerator` of a process fixes, and the toy chain's SFT stage (run in the Edit-GRPO process) was silently
left uncompiled that way (docs/toy_world.md, seventeenth pass).
What ran, all on CPU: the toy SFT (steps 32% faster, the same losses to 1e-6); the tiny SFT with both modes, a
compiled run stopped and resumed bit-identically (tests/test_sft.py); the tiny SFT under DeepSpeed on 2 processes,
ZeRO-3 with gradient checkpointing and `full` (DDP's losses and weights to 1e-6, tests/test_scale_multiprocess.py)
and ZeRO-2 with `regional` + fused AdamW (losses within 1e-7 of eager, by hand); Edit-GRPO's tiny recipe compiled,
with its KL reference and held-out evaluation (eager's rewards, losses and LoRA, tests/test_grpo_compile.py), and
the toy chain's Edit-GRPO stage (below).
On an H200 (2026-12-04, the last section): the 13B DiT's LoRA step at recipes/viva.yaml's 480x848x33 with
`regional`: forward 1.61 s against 2.25 s eager (-28%), forward + backward 6.54 s against 8.68 s (-25%, 40% MFU
against 30%), peak memory 39.2 GiB against 41.2; the two block graphs compile in the first calls (33.9 s for the
forward, 53.2 s for forward + backward: about 80 s in all, repaid after about 40 training steps, well inside one
iteration's 64 trained steps a GPU). The tiny recipes compiled in bf16: SFT losses within 8.5e-5 of eager, the first
step 38.8 s (compiling) and the third and fourth 43.5 s and 40.8 s (batches of new shapes, image or video pairs and
instruction lengths: recompiles until those sizes are dynamic; on CPU the same run recompiled 9 times in its first 4
steps and not once in the next 12); Edit-GRPO's first ratio 0.999996 and the eager run's first reward, its first
iteration 60 s (compiling its graphs) and the second 0.37 s against eager's 0.41 s. Not run: compiling under
DeepSpeed or on several GPUs, and the full fine-tuning step of the 13B DiT.

The toy chain's Edit-GRPO stage (24 iterations of 4 x 8 rollouts, evaluation before and after; the faster 2-core
machine, 2026-12-02), `train.compile=full train.fused_optimizer=true` against eager: iterations 7.25 s against
8.66 s (16% less), the first iteration's rewards bit-identical and the held-out delta the same to 2e-7; but the cold
compile of 5 graphs takes 49 s in the first iteration and 56 s in the first evaluation, so the stage took 339 s
against 272 s. Compiling pays after about 75 iterations here, so `recipes/toy.yaml` leaves Edit-GRPO eager (its SFT
stage, 32000 steps, compiles). Real runs have hundreds of iterations of minutes each."""  # after the SFT section: train.compile on real runs


def _gb(b: float) -> str:
    return f"{b / 1e9:.1f}"


def _tf(f: float) -> str:
    return f"{f / 1e12:,.0f}"


def render_sft(sp: dict) -> str:
    """The SFT section of the document (:func:`sft_plan`)."""
    r, rows = sp["recipe"], sp["settings"]
    own = next(s for s in rows if s["recipe"])
    name = f"{own['height']}x{own['width']} x {own['frames']}"
    ck = "ckpt" if r["gradient_checkpointing"] else "nockpt"
    m = {n: own["memory"][f"{n}|{ck}"] for n, _, _ in SFT_LAYOUTS}
    v = own["parts"]["video"]
    out = ["## SFT: full fine-tuning of the 13B DiT (`recipes/sft_viva.yaml`)",
           "",
           "    accelerate launch --config_file recipes/accelerate/zero3.yaml -m viva_base.sft recipe=recipes/sft_viva.yaml \\",
           "        model.t2v_base=hunyuanvideo-community/HunyuanVideo \\",
           "        model.instructor=xtuner/llava-llama-3-8b-v1_1-transformers data.manifest=/data/pairs.jsonl",
           "",
           f"Recipe: global batch {r['batch_size']} = {r['gpus']} GPUs x micro-batch {r['micro_batch']} x "
           f"{r['accumulation']} accumulation steps, {r['height']}x{r['width']}, {r['frames']}-frame video pairs "
           f"({r['p_video']:.0%} of the batches) and 1-frame image pairs, {r['max_steps']:,} steps, every DiT parameter "
           f"trained ({sp['params']['dit'] / 1e9:.2f} B: the DiT with its widened projector and token refiner), bf16 "
           f"compute with float32 master weights, AdamW, gradient checkpointing "
           f"{'on' if r['gradient_checkpointing'] else 'off'}. One SFT sample is one row (no CFG batch: the instruction "
           "is dropped in place).",
           "",
           "What is counted and what is modelled: parameters are counted on the meta device (the DiT as above, "
           "llava-llama-3-8b, the VAE; the CLIP-L text encoder is taken as 123 M), the activations are the bytes "
           "autograd saves in the real forward + backward of the fully trainable DiT at the micro-batch (bf16, "
           "FlashAttention: no score matrices), and FLOPs are counted the same way. The training state is the ZeRO "
           "paper's mixed-precision Adam, 16 B per trained parameter (bf16 weights 2 + bf16 gradients 2 + fp32 master "
           "weights and Adam's two moments 12), partitioned over the GPUs by the stage (ZeRO-2: gradients and "
           "optimizer state; ZeRO-3: the weights too); plain DDP (our trainer without DeepSpeed) holds float32 "
           "weights, float32 gradients and the moments (4 + 4 + 8): 16 B as well, all replicated. ZeRO-3 adds the parameters "
           "gathered for the blocks in flight (up to `stage3_max_live_parameters` = 1e9, bf16: 2 GB); with "
           "`zero3_offload.yaml` the partitions and the optimizer live in CPU memory (about 16 B x "
           f"{sp['params']['dit'] / 1e9:.1f} B = {_gb(16 * sp['params']['dit'])} GB of RAM per node, plus pinned "
           "buffers) and only the gathered parameters stay on the GPU. Not counted: communication buckets "
           "(`reduce_bucket_size` 5e7 elements: about 0.1 GB each), the CUDA context and allocator fragmentation "
           "(hence the 90% margin), and the VAE's encoding working set, which is transient and runs before the DiT "
           "forward (without grad). Fits: at most 90% of 80 GB.",
           "",
           f"Per GPU at the recipe's {name} ({v['grid'][0]}x{v['grid'][1]}x{v['grid'][2]} latent, "
           f"{own['video_tokens']:,} video + {TEXT_TOKENS} text tokens), gradient checkpointing "
           f"{'on' if r['gradient_checkpointing'] else 'off'}, {r['gpus']} GPUs:",
           "",
           "| | " + " | ".join(n for n, _, _ in SFT_LAYOUTS) + " |",
           "|---|" + "---|" * len(SFT_LAYOUTS)]
    for label, key in (("DiT weights (DeepSpeed: bf16; DDP: fp32)", "weights"),
                       ("gradients (DeepSpeed: bf16; DDP: fp32)", "grads"),
                       ("fp32 master weights + Adam moments (DDP: the moments)", "optim"),
                       ("ZeRO-3 parameters gathered in flight", "live_params"),
                       ("frozen instructor + VAE + text encoder (bf16)", "frozen"),
                       ("activations (micro-batch)", "activations")):
        out.append(f"| {label} | " + " | ".join(f"{_gb(m[n][key])} GB" for n, _, _ in SFT_LAYOUTS) + " |")
    out.append("| **total** | " + " | ".join(f"{_gb(m[n]['total'])} GB {'fits' if m[n]['fits'] else '**no**'}"
                                           for n, _, _ in SFT_LAYOUTS) + " |")
    out += ["",
            f"Every setting of this plan, {r['gpus']} GPUs, micro-batch {r['micro_batch']} (per GPU; no ckpt / with "
            "gradient checkpointing):",
            "",
            "| resolution x frames | " + " | ".join(f"{n} | {n} + ckpt" for n, _, _ in SFT_LAYOUTS) + " |",
            "|---|" + "---|" * (2 * len(SFT_LAYOUTS))]
    for s in rows:
        cells = []
        for n, _, _ in SFT_LAYOUTS:
            for c in ("nockpt", "ckpt"):
                mm = s["memory"][f"{n}|{c}"]
                cells.append(f"{_gb(mm['total'])} GB {'fits' if mm['fits'] else '**no**'}")
        mark = " (recipe)" if s["recipe"] else ""
        out.append(f"| {s['height']}x{s['width']} x {s['frames']}{mark} | " + " | ".join(cells) + " |")
    fits3 = [f"{s['height']}x{s['width']}x{s['frames']}" for s in rows if s["memory"]["ZeRO-3|ckpt"]["fits"]]
    out += ["",
            f"At the recipe's size only ZeRO-3 (+ offload) with gradient checkpointing fits: {_gb(m['ZeRO-3']['total'])} "
            f"GB. ZeRO-2 ({_gb(m['ZeRO-2']['total'])} GB) still replicates the {_gb(m['ZeRO-2']['weights'])} GB of bf16 "
            f"DiT weights on every GPU; DDP needs {_gb(m['DDP']['total'])} GB (16 B per parameter, replicated). "
            "Without checkpointing the saved activations of the 60 blocks alone "
            f"({_gb(v['activations']['no_checkpointing'])} GB for one sample) exceed a GPU. ZeRO-3 with checkpointing "
            f"fits at {', '.join(fits3) or 'none'}; at 720p x 129 frames even one sample's checkpointed block inputs "
            "need sequence parallelism (not implemented). `zero3_offload.yaml` trades speed for memory where "
            "ZeRO-3 does not fit.",
            "",
            "| resolution x frames | DiT train step, video sample (TFLOP) | image sample (TFLOP) | per sample with "
            "recompute, VLM, 2 VAE encodings: video / image (TFLOP) | optimizer step (PFLOP) | step time | "
            f"{r['max_steps']:,} steps |",
            "|---|---|---|---|---|---|---|"]
    for s in rows:
        pv, pi = s["parts"]["video"], s["parts"]["image"]
        out.append(f"| {s['height']}x{s['width']} x {s['frames']} | {_tf(pv['train_flops'])} | {_tf(pi['train_flops'])} | "
                   f"{_tf(s['flops_per_sample']['video'])} / {_tf(s['flops_per_sample']['image'])} | "
                   f"{s['step_flops'] / 1e15:,.0f} | {s['step_seconds']:.0f} s | {s['run_hours'] / 24:.1f} days |")
    ratio = v["train_flops"] / v["forward_flops"]
    out += ["",
            f"Times on {r['gpus']} GPUs at {MFU:.0%} MFU of {GPU['bf16_tflops']} TFLOP/s; an optimizer step is "
            f"{r['batch_size']} samples, {r['p_video']:.0%} of them video. Full fine-tuning's step costs "
            f"{ratio:.1f}x a forward (counted: weight gradients for every layer), plus one forward recomputed with "
            "checkpointing; encoding the source and target clips with the VAE is a sizeable part of a video sample.",
            "",
            "Precision: in DeepSpeed's bf16 mode the engine computes with bf16 copies of the DiT and keeps the float32 "
            "master weights in the optimizer partitions; checkpoints and `final/` are written from those masters "
            "(`final/` in `model.dtype`). The engine makes its masters from the module after casting it to bf16, so "
            "they start from bf16-rounded weights: exact here, since `model.dtype: bf16` already built the editor in "
            "bf16. Before `accelerator.prepare` partitions the DiT, every process holds it whole, upcast to float32 "
            f"for training ({_gb(4 * sp['params']['dit'])} GB), next to the frozen models: "
            f"{_gb(4 * sp['params']['dit'] + sp['frozen_bytes'])} GB, under the 90% margin (counted, not measured).",
            "",
            "What ran: `viva_base.sft` with the tiny editor on 2 CPU processes (gloo; tests/test_scale_multiprocess.py), "
            "under ZeRO-3 (every parameter partitioned, gradient checkpointing on, float32): the same losses, gradient "
            "norms, lr and final weights as DDP to 1e-6, and a run resumed from its mid-run DeepSpeed checkpoint ends "
            "with identical weights; under ZeRO-2 in bf16 (DeepSpeed's bf16 mode on the CPU): float32 master weights in "
            "the checkpoint, `final/` exactly those rounded to bf16, losses within 1% of DDP's float32 run. Not run: "
            "full fine-tuning on a GPU (the tiny SFT recipe ran on an H200, and the 13B DiT's LoRA step: the last "
            "section), NCCL, CPU offload, the 13B SFT; the recipe's filled DeepSpeed configs pass DeepSpeed's own "
            "config validation (tests/test_scale.py)."]
    return "\n".join(out)


def render(p: dict, perf: dict | None = None, gpu_check: list[dict] | None = None,
           sft: dict | None = None) -> str:
    r, pr = p["recipe"], p["params"]
    out = ["# Scaling plan: Edit-GRPO and VIVA SFT at paper scale",
           "",
           "Generated by `python -m benchmarks.scaling` from the real model configs (HunyuanVideo-13B DiT widened to 32 "
           "input channels with the recipe's LoRA, llava-llama-3-8b, the HunyuanVideo VAE, the reward CLIPs) built on "
           "PyTorch's meta device: parameters are counted, FLOPs counted by `FlopCounterMode` on the real forward and "
           "backward, activation memory is what autograd saves (see the module docstring). The last sections are "
           "measured: `python -m benchmarks.perf` on CPU and `python -m benchmarks.gpu_check` on a GPU, then "
           "`python -m benchmarks.scaling --perf outputs/perf/perf.json --gpu-check outputs/gpu_check/gpu_check.json "
           "...`. Do not edit by hand.",
           "",
           f"Recipe (`recipes/viva.yaml`): {r['prompts']} prompts x G={r['group']} rollouts per iteration, "
           f"{r['steps']} sampling steps with CFG batched (batch 2 per sample), {r['trained_steps']} trained steps per "
           f"rollout (SDE window), train micro-batch {r['train_batch']}, rollout batch {r['rollout_batch']} samples, "
           f"LoRA r={r['lora_rank']}/alpha={r['lora_alpha']}, KL to the adapter-disabled DiT (beta={r['beta']}: one "
           f"extra no-grad forward per trained step). GPU: {p['gpu']['name']}, {p['gpu']['bf16_tflops']} dense bf16 "
           f"TFLOP/s, {p['gpu']['memory_gb']:.0f} GB; times assume {p['mfu']:.0%} MFU and an even data-parallel split.",
           "",
           RUNNING,
           "",
           CHECKING,
           "",
           "## Parameters",
           "",
           "| model | parameters | bf16 bytes |",
           "|---|---|---|",
           f"| DiT (HunyuanVideo-13B, frozen base) | {pr['dit'] / 1e9:.2f} B | {_gb(2 * pr['dit'])} GB |",
           f"| LoRA r={r['lora_rank']} on self/cross attention (trained) | {pr['lora'] / 1e6:.1f} M | "
           f"{_gb(2 * pr['lora'])} GB (+ {_gb(14 * pr['lora'])} GB grads, fp32 master, Adam moments) |",
           f"| VLM instructor (llava-llama-3-8b, frozen) | {pr['vlm'] / 1e9:.2f} B | {_gb(2 * pr['vlm'])} GB |",
           f"| reward models (CLIP ViT-L/14 + PickScore ViT-H/14) | {pr['rewards'] / 1e9:.2f} B | "
           f"{_gb(2 * pr['rewards'])} GB |",
           "",
           "With LoRA on a frozen base, ZeRO-2 only partitions the LoRA's gradients and optimizer state (a few GB); "
           "ZeRO-3 is what removes the 25.6 GB of frozen DiT weights from each GPU (it partitions them). The VLM, VAE "
           "and reward models are replicated on every GPU (they could be offloaded between phases; not done).",
           "",
           "## FLOPs and iteration time",
           "",
           "| resolution x frames | video tokens | DiT forward, CFG (TFLOP) | attention share | train step fwd+bwd "
           "(TFLOP) | per rollout (TFLOP) | per update of a sample (TFLOP) | per iteration (PFLOP) | + checkpointing "
           "| 8 GPUs | 32 GPUs |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in p["settings"]:
        f = s["dit_forward_cfg_flops"]
        out.append(f"| {s['height']}x{s['width']} x {s['frames']} | {s['video_tokens']:,} | {_tf(f['total'])} | "
                   f"{f['attention'] / f['total']:.0%} | {_tf(s['dit_train_step_flops']['total'])} | "
                   f"{_tf(s['rollout_flops_per_sample'])} | {_tf(s['update_flops_per_sample'])} | "
                   f"{s['iteration_flops'] / 1e15:,.0f} | {s['iteration_flops_ckpt'] / 1e15:,.0f} | "
                   f"{_dur(s['iteration_seconds_ckpt'][8])} | {_dur(s['iteration_seconds_ckpt'][32])} |")
    ratios = [s["dit_train_step_flops"]["total"] / s["dit_forward_cfg_flops"]["total"] for s in p["settings"]]
    fixed = [s["fixed_flops_per_iteration"] / s["iteration_flops"] for s in p["settings"]]
    out += ["",
            "Times are for the configuration that fits in memory (gradient checkpointing on; see below). A training "
            f"step with LoRA on a frozen base costs {min(ratios):.1f}-{max(ratios):.1f}x a forward (counted), not 3x: "
            "the backward computes the gradients of the activations through the frozen weights (and of attention, "
            "about twice its forward) but no weight gradients except the LoRA's. Gradient checkpointing adds one "
            "forward per trained step. Condition encoding (VLM on cond + uncond, VAE encoder) runs once per prompt, "
            f"VAE decoding and the rewards once per rollout: together {min(fixed):.1%}-{max(fixed):.1%} of an "
            "iteration. Attention's share of the DiT FLOPs grows with the tokens (quadratic against linear). "
            + measured_mfu(gpu_check),
            "",
            "## Memory per GPU (training micro-batch: 1 sample = 2 CFG rows)",
            "",
            "Activations are what autograd saves for backward, without attention score matrices (FlashAttention). "
            "Naive attention would also keep every block's bf16 score matrix, 2 x heads x N^2 x 2 bytes (last "
            "column): FlashAttention (or PyTorch's memory-efficient SDPA) is required at these lengths.",
            "",
            "| resolution x frames | activations, no checkpointing | with checkpointing | largest block "
            "| QKV of one block | naive attention scores per block |",
            "|---|---|---|---|---|---|"]
    for s in p["settings"]:
        a = s["activations"]
        out.append(f"| {s['height']}x{s['width']} x {s['frames']} | {_gb(a['no_checkpointing'])} GB | "
                   f"{_gb(a['checkpointing'])} GB | {_gb(a['per_block_max'])} GB | {_gb(s['qkv_bytes_per_block'])} GB | "
                   f"{_gb(s['score_matrix_bytes_per_block'])} GB |")
    out += ["",
            "Total per GPU = DiT weights (partitioned under ZeRO-3, plus up to 1e9 gathered parameters in flight, "
            "`stage3_max_live_parameters`) + frozen VLM/VAE/reward weights + LoRA training state (ZeRO stage) + the "
            "larger of the training activations and the rollout working set (one block at the rollout batch of "
            f"{p['recipe']['rollout_batch']} samples x 2 CFG rows, estimated as 10 hidden-size tensors per token: the "
            "one number here that is an estimate, not a count). Fits: at most 90% of 80 GB.",
            "",
            "| resolution x frames | GPUs | DDP | DDP + ckpt | ZeRO-2 | ZeRO-2 + ckpt | ZeRO-3 | ZeRO-3 + ckpt |",
            "|---|---|---|---|---|---|---|---|"]
    for s in p["settings"]:
        for g in (8, 32):
            cells = []
            for zero in (0, 2, 3):
                for ckpt in ("nockpt", "ckpt"):
                    m = s["memory"][f"{g}gpu_zero{zero}_{ckpt}"]
                    cells.append(f"{_gb(m['total'])} GB {'fits' if m['fits_80gb'] else '**no**'}")
            out.append(f"| {s['height']}x{s['width']} x {s['frames']} | {g} | " + " | ".join(cells) + " |")
    fits = [f"{s['height']}x{s['width']}x{s['frames']}" for s in p["settings"]
            if s["memory"]["8gpu_zero3_ckpt"]["fits_80gb"]]
    out += ["",
            f"Settings that fit on 8 GPUs with ZeRO-3 and gradient checkpointing: {', '.join(fits) or 'none'}. "
            "Without checkpointing the saved activations of 60 blocks at 10^4+ tokens exceed 80 GB for every setting "
            "but the smallest; with it, each block keeps only its input. `recipes/accelerate/zero3.yaml` + "
            "`model.gradient_checkpointing: true` is the configuration recipes/viva.yaml is written for; "
            "`zero3_offload.yaml` moves parameters and optimizer state to CPU memory when even that does not fit. "
            "At 720p x 129 frames (119k tokens) even the checkpointed block inputs (60 blocks x 2 CFG rows x N x "
            "3072 x 2 bytes) exceed a GPU: that length needs sequence parallelism (splitting the tokens of a sample "
            "over GPUs), which this project does not implement.",
            "",
            "What was measured on a GPU: the LoRA training step's peak memory on one H200 (the last section), within "
            "2-4% of this count at 9, 33 and 65 frames of 480x848. Not run on a GPU: DeepSpeed, several processes, "
            "NCCL. On the CPU machines of this project the DeepSpeed path ran "
            "for real with the tiny editor (ZeRO-2 and ZeRO-3, 2 processes, gloo: tests/test_scale_multiprocess.py); "
            "bf16 DeepSpeed mode, CPU offload (`zero3_offload.yaml`) and NCCL were validated as configurations only "
            "(DeepSpeed's config classes, tests/test_scale.py).", "", VAE_MEMORY.rstrip("\n")]
    if sft:
        out += ["", render_sft(sft), "", COMPILING]
    if perf:
        from .perf import format_passes, format_sweeps, format_table

        out += ["", "## Measured: the trainer on CPU (`python -m benchmarks.perf`)", "",
                f"Device: {perf['device']}, {perf['torch_threads']} torch threads; a shared machine (other jobs ran "
                "at the same time), so timings vary by 10-20% between runs.", "", format_table(perf["results"]), ""]
        for res in perf["results"]:
            out += ["```", format_passes(res), "```", ""]
        out += ["The iteration already runs only the passes it must: each prompt's condition once (VLM and VAE "
                "calls per iteration = prompts), CFG's two branches in one forward (DiT batch = 2 x samples), "
                "rollouts batched over the whole group, one KL reference forward per trained forward. What remains "
                "of the overhead is the sampler's float32 math and bookkeeping between DiT calls (the rollout phase "
                "is the largest part), the optimizer step and logging.", ""]
        if perf.get("sweeps"):
            share = {axis: [p_["flops"]["attention"] / p_["flops"]["total"] for p_ in sw["points"]]
                     for axis, sw in perf["sweeps"].items()}
            out += ["How iteration time grows (tiny recipe; exponent k of t ~ x^k, least squares in log-log), next to "
                    "the exponent of the DiT FLOPs (attention + linear/MLP) counted on the same passes:", "",
                    format_sweeps(perf["sweeps"]), "",
                    "Group size scales linearly, as FLOPs do. Frames and frame size add tokens, and attention grows "
                    "quadratically in tokens: its share of the FLOPs goes from "
                    f"{share['size'][0]:.0%} to {share['size'][-1]:.0%} over the size sweep, which is why the FLOPs "
                    "exponent exceeds the linear one (1 in frames, 2 in side). CPU time grows more slowly than FLOPs "
                    "at these tiny sizes: fixed per-call costs weigh more on the small settings, and larger matmuls "
                    "run at a higher fraction of the CPU's peak.", ""]
    if gpu_check:
        out += ["", gpu_check_section(gpu_check)]
    return "\n".join(out) + "\n"


def measured_mfu(runs: list[dict] | None) -> str:
    """What the GPU runs (``--gpu-check``) say of this page's MFU assumption: the DiT step's measured MFU and its
    time against the prediction, eager and compiled (a sentence; the numbers are in the last section's table)."""
    rows = [r["results"]["dit"] for r in runs or () if r["results"].get("dit", {}).get("train_ratio") is not None]
    if not rows:
        return f"The {MFU:.0%} MFU is an assumption: no GPU run has been recorded here (`benchmarks.gpu_check`)."

    def span(values, fmt):
        lo, hi = fmt(min(values)), fmt(max(values))
        return lo if lo == hi else f"{lo}-{hi}"

    pct = lambda v: f"{v:.0%}"  # noqa: E731
    times = lambda v: f"{v:.2f}"  # noqa: E731
    parts = []
    for mode in sorted({d.get("compile", "none") for d in rows}, key=lambda m: m != "none"):  # eager first
        got = [d for d in rows if d.get("compile", "none") == mode]
        mfu = [achieved_mfu(d["train_tflops"] * 1e12, d["train_seconds"]) for d in got]
        label = "eager" if mode == "none" else f"with `train.compile={mode}`"
        parts.append(f"{span(mfu, pct)} MFU {label} (x{span([d['train_ratio'] for d in got], times)} the predicted "
                     "time)")
    names = sorted({r["meta"]["device_name"] for r in runs if "dit" in r["results"]})
    shapes = ", ".join(f"{f}x{h}x{w}" for f, h, w in sorted({(d["frames"], d["height"], d["width"]) for d in rows}))
    same = ("; an H200 computes as fast as the H100 assumed here (the same dense bf16 peak)"
            if all("H200" in n or "H100" in n for n in names) else "")
    return (f"Measured on one {' / '.join(names)} (the last section), the 13B DiT's LoRA training step at "
            f"{shapes} (frames x H x W) ran at {' and '.join(parts)}{same}. Several GPUs' communication was not "
            "measured.")


def gpu_check_section(runs: list[dict]) -> str:
    """The measured section from the ``gpu_check.json`` files of benchmarks.gpu_check: the first run's checks, the
    other runs' commands and results in a line each, and every run's DiT step in one table."""
    from .gpu_check import check_table, dit_table, measured_by

    first, *more = runs
    out = ["## Measured: checking a GPU machine (`python -m benchmarks.gpu_check`)", "",
           f"Measured by {measured_by(first['meta'])}:", "", *check_table(first["results"], first["meta"])]
    if more:
        out += ["", "Then, on the same kind of machine:", ""]
        out += [f"* {measured_by(r['meta'])}: "
                + "; ".join(f"{name} {res['status']}" for name, res in r["results"].items()) for r in more]
    dits = [r["results"]["dit"] for r in runs if "train_seconds" in r["results"].get("dit", {})]
    if dits:
        out += ["", *dit_table(dits)]
    return "\n".join(out)


def _dur(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.scaling", description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipe", default="recipes/viva.yaml")
    ap.add_argument("--sft-recipe", default="recipes/sft_viva.yaml", help="the SFT recipe of the SFT section")
    ap.add_argument("--perf", default=None, help="a perf.json of benchmarks.perf to include (measured CPU table)")
    ap.add_argument("--gpu-check", nargs="+", default=None, metavar="FILE",
                    help="gpu_check.json files of benchmarks.gpu_check to include (the first one's checks in full, "
                         "every run's DiT step in one table)")
    ap.add_argument("--out", default="docs/scaling.md")
    ap.add_argument("--json", default="outputs/scaling.json")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    from viva_base.errors import UserError
    from viva_base.recipe import RecipeError, check_output_file

    try:  # every input read, the cheap ones first, and the page rendered before anything is written
        perf = _read_json("--perf", a.perf)
        gpu = [_read_json("--gpu-check", path) for path in a.gpu_check or ()] or None
        if not Path(a.out).parent.is_dir():
            raise ValueError(f"--out {a.out}: no folder {Path(a.out).parent} (run from the clone's root, where "
                             "docs/ is, or give --out)")
        check_output_file("--out", a.out)
        check_output_file("--json", a.json)
        recipe, sft_recipe = Recipe.from_yaml(a.recipe), SFTRecipe.from_yaml(a.sft_recipe)
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.set_verbosity_error()  # its warning at every meta-device .to() of the plan's models
        p = plan(recipe)
        p["sft"] = sft_plan(sft_recipe)
        page = render(p, perf, gpu, sft=p["sft"])
    except (RecipeError, UserError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(p, indent=2, default=str))
    Path(a.out).write_text(page)
    print(f"written {a.out} and {a.json}")
    return 0


def _read_json(option: str, path: str | None) -> dict | None:
    """The JSON file an option names (None: not given); a ValueError naming the option when it cannot be read."""
    if not path:
        return None
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ValueError(f"{option} {path}: no such file") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{option} {path}: {exc}") from None


if __name__ == "__main__":
    from viva_base.errors import exit_with

    exit_with(main)
