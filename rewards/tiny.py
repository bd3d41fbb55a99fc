"""Tiny random CLIP models, built offline and saved in the same formats as real weights.

* :func:`make_tiny_hf_clip` writes a transformers ``CLIPModel`` folder (``config.json``,
  ``model.safetensors``, ``tokenizer.json`` + ``tokenizer_config.json``, ``preprocessor_config.json``):
  ``CLIPModel.from_pretrained(dir)``, ``AutoTokenizer`` / ``AutoProcessor.from_pretrained(dir)`` and
  ``load_clip("hf:" + dir)`` all work without network. The tokenizer is a byte-level BPE trained in
  memory on a small fixed corpus (deterministic), so any text tokenizes.
* :func:`make_tiny_open_clip` writes an open_clip ``local-dir`` folder (``open_clip_config.json`` with
  ``model_cfg`` + ``preprocess_cfg``, ``open_clip_model.safetensors``), loadable with
  ``open_clip.create_model("local-dir:" + dir)`` and ``load_clip("open_clip:local-dir:" + dir)``. open_clip's
  BPE vocabulary ships inside the package. :func:`save_open_clip` saves any (e.g. trained) open_clip
  ``CLIP`` the same way.

Used by the tests, the tiny GRPO recipe and the toy world.
"""
from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = ["make_tiny_hf_clip", "make_tiny_hf_tokenizer", "make_tiny_open_clip", "save_open_clip",
           "tiny_open_clip_config"]

BOS, EOS, PAD = "<|startoftext|>", "<|endoftext|>", "<|pad|>"

_CORPUS = [
    "a photo of a red cat sitting on a blue sofa",
    "a dog running on the green grass in the park",
    "make the car yellow and add snow on the road",
    "replace the ball with a white cube on the table",
    "a person walking on the beach at sunset with the sea behind",
    "turn the sky purple and the trees orange in autumn",
    "remove the bird from the picture and keep the background",
    "a black and white video of a city street at night",
    "change the color of the shirt to pink, keep everything else",
    "a small square moves from left to right over a gray background",
    "circle triangle square star shape red green blue yellow cyan magenta",
    "add a hat to the man; the woman wears glasses. 0 1 2 3 4 5 6 7 8 9",
]


def make_tiny_hf_tokenizer(max_length: int = 32, vocab_size: int = 512, corpus: Sequence[str] | None = None):
    """A CLIP-style tokenizer (``<|startoftext|> ... <|endoftext|>``, right padding with ``<|pad|>``),
    a byte-level BPE trained in memory on ``corpus`` (default: a small built-in one; any text still
    tokenizes, byte by byte at worst); returned as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # BOS=0, EOS=1: transformers' CLIP pools at the first EOS unless eos_token_id == 2 (a legacy path).
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS, EOS, PAD], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(corpus) if corpus is not None else _CORPUS, trainer)
    bos, eos = tok.token_to_id(BOS), tok.token_to_id(EOS)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A {EOS}", special_tokens=[(BOS, bos), (EOS, eos)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   model_max_length=max_length, padding_side="right")


def make_tiny_hf_clip(
    directory: str | os.PathLike,
    *,
    image_size: int = 32,
    patch_size: int = 8,
    width: int = 32,
    layers: int = 2,
    heads: int = 2,
    projection_dim: int = 16,
    max_length: int = 32,
    seed: int = 0,
    corpus: Sequence[str] | None = None,
) -> str:
    """Save a tiny random transformers ``CLIPModel`` with its tokenizer and image processor in
    ``directory``; returns the directory (use it as ``model="hf:<dir>"``). ``corpus``: texts the
    tokenizer's BPE is trained on (see :func:`make_tiny_hf_tokenizer`)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    directory = str(directory)
    os.makedirs(directory, exist_ok=True)
    tokenizer = make_tiny_hf_tokenizer(max_length=max_length, corpus=corpus)
    text = dict(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
                num_attention_heads=heads, max_position_embeddings=max_length,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)
    vision = dict(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers, num_attention_heads=heads,
                  image_size=image_size, patch_size=patch_size)
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection_dim)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(config)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
                       ).save_pretrained(directory)
    return directory


def tiny_open_clip_config(
    *,
    image_size: int = 32,
    patch_size: int = 8,
    width: int = 32,
    layers: int = 2,
    heads: int = 2,
    embed_dim: int = 16,
    context_length: int = 32,
) -> dict[str, Any]:
    """An open_clip ``model_cfg`` (ViT image tower, transformer text tower, open_clip's 49408-token BPE)."""
    return {
        "embed_dim": embed_dim,
        "vision_cfg": {"image_size": image_size, "layers": layers, "width": width, "head_width": width // heads,
                       "patch_size": patch_size},
        "text_cfg": {"context_length": context_length, "vocab_size": 49408, "width": width, "heads": heads,
                     "layers": layers},
    }


def save_open_clip(model: torch.nn.Module, model_cfg: dict[str, Any], directory: str | os.PathLike,
                   preprocess_cfg: dict[str, Any] | None = None) -> tuple[str, str]:
    """Save an open_clip ``CLIP`` as a ``local-dir`` folder; returns ``("local-dir:<dir>", weights_file)``.

    ``preprocess_cfg`` defaults to open_clip's (OpenAI mean/std, bicubic, shortest side) at the
    model's image size.
    """
    from open_clip.transform import PreprocessCfg
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if preprocess_cfg is None:
        pp = PreprocessCfg(size=model_cfg["vision_cfg"]["image_size"])
        preprocess_cfg = {"size": pp.size, "mode": pp.mode, "mean": list(pp.mean), "std": list(pp.std),
                          "interpolation": pp.interpolation, "resize_mode": pp.resize_mode}
    config_file = directory / "open_clip_config.json"
    tmp = config_file.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}, indent=2))
    os.replace(tmp, config_file)
    weights = directory / "open_clip_model.safetensors"
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(weights.with_suffix(".tmp")))
    os.replace(weights.with_suffix(".tmp"), weights)
    return f"local-dir:{directory}", str(weights)


def make_tiny_open_clip(directory: str | os.PathLike, *, seed: int = 0, **config: Any) -> tuple[str, str]:
    """Save a tiny random open_clip model in ``directory`` (see :func:`tiny_open_clip_config` for the
    size options); returns ``("local-dir:<dir>", weights_file)``: use it as
    ``model="open_clip:local-dir:<dir>"``, or ``open_clip.create_model("local-dir:<dir>")``."""
    from open_clip.model import CLIP

    model_cfg = tiny_open_clip_config(**config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIP(**model_cfg)
    return save_open_clip(model, model_cfg, directory)
