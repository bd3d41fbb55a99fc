"""Tiny offline components for the VIVA editor.

Every component is the *same* library class as the real checkpoint (transformers' LLaVA and CLIP text
model, diffusers' HunyuanVideo transformer and VAE), built from a small config with random weights,
so that every code path runs on a CPU with no network. Tokenizers are trained in memory with the
``tokenizers`` library (byte-level BPE) and wrapped as :class:`transformers.PreTrainedTokenizerFast`.

``make_tiny_t2v_checkpoint(dir)`` writes a directory in the layout of
``hunyuanvideo-community/HunyuanVideo`` (transformer/, vae/, text_encoder_2/, tokenizer_2/,
scheduler/) plus an ``instructor/`` LLaVA directory in the layout of
``xtuner/llava-llama-3-8b-v1_1-transformers``, so tests load tiny weights through exactly the loader
that hub ids use.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>", "<image>")
CLIP_SPECIAL_TOKENS = ("<pad>", "<s>", "<unk>", "</s>", "<image>")  # </s> at id 3 (make_tiny_text_encoder_2)

# Words the toy world and the tests use, plus common English, so the BPE has whole-word tokens for them.
DEFAULT_CORPUS = """
You are a video editing assistant. Read the instruction and the images, and describe the edited video.
Instruction: remove delete get rid of erase take out add insert put place a an the with and on in of to
replace swap change turn make recolour recolor paint colour color into background scene sky night day snow
snowy dark bright sunny evening morning winter red green blue yellow purple white orange black grey pink cyan
square circle triangle diamond cross star small large big tiny moving left right up down object objects
shape shapes gradient stripes striped plain texture video frame frames edit edited source target image
a red square and a small blue circle on a night sky. make the background night and remove the green triangle.
Describe the video by detailing the following aspects: content, colour, shape, size, motion, background.
""" * 4


def make_tiny_tokenizer(corpus: str = DEFAULT_CORPUS, vocab_size: int = 600, *, add_eos: bool = False,
                        model_max_length: int = 256, special_tokens: tuple[str, ...] = SPECIAL_TOKENS):
    """A byte-level BPE tokenizer trained in memory, wrapped as a transformers fast tokenizer.

    Padding side is right (docs/architecture.md: the DiT's mask counts tokens). ``add_eos`` appends
    ``</s>`` after every sequence (what CLIP text models need to pool on the end token).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(special_tokens), initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus.splitlines(), trainer=trainer)
    if add_eos:
        eos = tok.token_to_id("</s>")
        tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                           special_tokens=[("</s>", eos)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        padding_side="right", model_max_length=model_max_length, extra_special_tokens={"image_token": "<image>"},
    )


@dataclass
class TinySpec:
    """Sizes of the tiny editor. Defaults: the measured 'width 64' configuration (docs/toy_world.md)."""

    latent_channels: int = 12        # pixel-unshuffle x2 of RGB (toy) / tiny Hunyuan VAE latent channels
    heads: int = 2
    head_dim: int = 32
    num_layers: int = 1              # dual-stream blocks
    num_single_layers: int = 2
    num_refiner_layers: int = 1
    text_dim: int = 64               # LLaVA hidden size (text_embed_dim of the DiT)
    pooled_dim: int = 32             # CLIP text hidden size (pooled_projection_dim)
    rope_axes_dim: tuple = (8, 12, 12)
    patch_size: int = 2              # the DiT's spatial patch: a token covers 2 x patch_size pixels a side with the pixel
                                     # VAE (1: 2 x 2-pixel tokens, 4x the tokens; docs/toy_world.md, twentieth pass)
    image_size: int = 32             # LLaVA vision input
    vision_patch: int = 8
    guidance_embeds: bool = False
    vae: str = "pixel"               # "pixel" (lossless pixel-unshuffle) or "hunyuan" (tiny AutoencoderKLHunyuanVideo)
    init: str = "default"            # "default" (diffusers' init) or "adaln_zero" (DiT: every block starts as the identity)
    prediction: str = "velocity"     # the editor's EditorConfig.prediction: velocity | source_residual
    instructor_init_std: float = 0.02  # LLaMA's initializer_range (0.02: hidden states ~0.1 per token)
    # which LLaVA hidden states the DiT reads (InstructorConfig.hidden_layer). -3 is HunyuanVideo's choice for a
    # 32-layer LLaMA; in the 3-layer tiny LLaMA it is the output of the first layer, nearly a bag of word
    # embeddings. -1 ("last hidden states", the paper's wording) mixes context through all 3 layers
    # (docs/toy_world.md: a recolour-only SFT reaches if_progress 0.30 with -1 and -0.05 with -3)
    instructor_hidden_layer: int = -3
    extra: dict = field(default_factory=dict)


def make_tiny_instructor(spec: TinySpec, tokenizer=None, seed: int = 0):
    """(LlavaForConditionalGeneration, LlavaProcessor) with random weights from a tiny config."""
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor)

    tokenizer = tokenizer or make_tiny_tokenizer()
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=spec.image_size, patch_size=spec.vision_patch, projection_dim=32)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=spec.text_dim, intermediate_size=2 * spec.text_dim,
                       num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=2,
                       max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id,
                       initializer_range=spec.instructor_init_std,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_token_id,
                         vision_feature_layer=-2, vision_feature_select_strategy="default",
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    image_processor = CLIPImageProcessor(size={"shortest_edge": spec.image_size},
                                         crop_size={"height": spec.image_size, "width": spec.image_size})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=spec.vision_patch,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1)
    return model, processor


def make_tiny_text_encoder_2(spec: TinySpec, seed: int = 0):
    """(CLIPTextModel, tokenizer): the pooled text vector HunyuanVideo takes as ``pooled_projections``."""
    from transformers import CLIPTextConfig, CLIPTextModel

    # </s> must not get id 2: transformers' CLIPTextTransformer treats eos_token_id == 2 as the legacy OpenAI config
    # and pools at argmax(input_ids), which is the end token only when it has the highest id (49407 in real CLIP
    # vocabularies). Here it would pool at the highest-id *word*, whose causal state never sees the rest of the
    # instruction ("make the red diamond green" and "... blue" pooled identically). With </s> at id 3 CLIP pools
    # at the first </s>, the end of the text, as real checkpoints do.
    tokenizer = make_tiny_tokenizer(add_eos=True, model_max_length=77, special_tokens=CLIP_SPECIAL_TOKENS)
    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=spec.pooled_dim, intermediate_size=64,
                            num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
                            pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed + 1)
    return CLIPTextModel(config).eval(), tokenizer


def make_tiny_transformer(spec: TinySpec, in_channels: int | None = None, seed: int = 0):
    """A tiny ``HunyuanVideoTransformer3DModel``; ``in_channels`` defaults to the T2V value ``C``."""
    from diffusers import HunyuanVideoTransformer3DModel

    torch.manual_seed(seed + 2)
    model = HunyuanVideoTransformer3DModel(
        in_channels=in_channels or spec.latent_channels, out_channels=spec.latent_channels,
        num_attention_heads=spec.heads, attention_head_dim=spec.head_dim, num_layers=spec.num_layers,
        num_single_layers=spec.num_single_layers, num_refiner_layers=spec.num_refiner_layers, patch_size=spec.patch_size,
        patch_size_t=1, guidance_embeds=spec.guidance_embeds, text_embed_dim=spec.text_dim,
        pooled_projection_dim=spec.pooled_dim, rope_axes_dim=tuple(spec.rope_axes_dim),
    )
    if spec.init == "adaln_zero":
        adaln_zero_init(model)
    elif spec.init != "default":
        raise ValueError(f"TinySpec.init={spec.init!r}: use 'default' or 'adaln_zero'")
    return model


def adaln_zero_init(transformer) -> None:
    """DiT's adaLN-Zero initialisation (Peebles & Xie 2023, section 3.2) of a ``HunyuanVideoTransformer3DModel``.

    The modulation layers of every dual- and single-stream block (``norm1``, ``norm1_context``, ``norm``) and of
    the output layer (``norm_out``), and the output projection ``proj_out``, start at zero: every residual
    branch is gated off (gate = 0), so each block is the identity, and the model's output starts at 0. A
    from-scratch DiT then starts with a clean path from the patch embedding to the output instead of random
    residual branches on top of it (docs/toy_world.md measures what this changes). Used only for DiTs trained
    from scratch (the toy editor); pretrained checkpoints keep their weights.
    """
    zero = [transformer.norm_out.linear, transformer.proj_out]
    for block in transformer.transformer_blocks:
        zero += [block.norm1.linear, block.norm1_context.linear]
    for block in transformer.single_transformer_blocks:
        zero.append(block.norm.linear)
    with torch.no_grad():
        for layer in zero:
            layer.weight.zero_()
            if layer.bias is not None:
                layer.bias.zero_()


def make_tiny_vae(spec: TinySpec, seed: int = 0):
    from .vae import PixelUnshuffleVAE

    if spec.vae == "pixel":
        if spec.latent_channels != 12:
            raise ValueError("the pixel VAE has 12 latent channels (RGB x 2x2); set latent_channels=12")
        return PixelUnshuffleVAE(factor=2)
    from diffusers import AutoencoderKLHunyuanVideo

    torch.manual_seed(seed + 3)
    return AutoencoderKLHunyuanVideo(
        in_channels=3, out_channels=3, latent_channels=spec.latent_channels,
        block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4,
        spatial_compression_ratio=8, temporal_compression_ratio=4, mid_block_add_attention=False,
    ).eval()


def make_tiny_t2v_checkpoint(path: str | os.PathLike, spec: TinySpec | None = None, seed: int = 0) -> Path:
    """Write a tiny *text-to-video* HunyuanVideo checkpoint + LLaVA instructor in the hub layouts.

    ``path/base`` mirrors ``hunyuanvideo-community/HunyuanVideo`` (transformer with ``in_channels = C``,
    vae, text_encoder_2, tokenizer_2, scheduler); ``path/instructor`` mirrors
    ``xtuner/llava-llama-3-8b-v1_1-transformers``: the model, the tokenizer and the image processor
    (``preprocessor_config.json``) in one folder, and no ``processor_config.json``, as its conversion with
    transformers 4.40 wrote them (:func:`viva_base.model.complete_processor` fills in the rest).
    """
    from diffusers import FlowMatchEulerDiscreteScheduler

    spec = spec or TinySpec()
    path = Path(path)
    base = path / "base"
    make_tiny_transformer(spec, seed=seed).save_pretrained(base / "transformer")
    make_tiny_vae(spec, seed=seed).save_pretrained(base / "vae")
    te2, tok2 = make_tiny_text_encoder_2(spec, seed=seed)
    te2.save_pretrained(base / "text_encoder_2")
    tok2.save_pretrained(base / "tokenizer_2")
    FlowMatchEulerDiscreteScheduler(shift=1.0).save_pretrained(base / "scheduler")
    llava, processor = make_tiny_instructor(spec, seed=seed)
    llava.save_pretrained(path / "instructor")
    processor.tokenizer.save_pretrained(path / "instructor")
    processor.image_processor.save_pretrained(path / "instructor")
    return path


def make_tiny_editor(spec: TinySpec | None = None, seed: int = 0, **editor_kwargs):
    """A complete tiny :class:`~viva_base.model.VivaEditor` (widened DiT, random weights), in seconds."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from .model import VivaEditor, widen_patch_embedding

    spec = spec or TinySpec()
    llava, processor = make_tiny_instructor(spec, seed=seed)
    te2, tok2 = make_tiny_text_encoder_2(spec, seed=seed)
    transformer = widen_patch_embedding(make_tiny_transformer(spec, seed=seed))
    editor_kwargs.setdefault("prediction", spec.prediction)
    editor = VivaEditor(
        instructor=llava, processor=processor, text_encoder_2=te2, tokenizer_2=tok2, transformer=transformer,
        vae=make_tiny_vae(spec, seed=seed), scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0), **editor_kwargs,
    )
    if "config" not in editor_kwargs:  # a caller's own EditorConfig wins
        editor.config.instructor.hidden_layer = spec.instructor_hidden_layer
    return editor
