"""The VLM instructor: LLaVA reads the instruction, the source video's first frame and an optional
reference image, and its hidden states become the DiT's text tokens (VIVA paper eq. 1).

Prompt layout (right-padded; see docs/architecture.md)::

    <system prompt>\n<image>\n[<image>\n]Instruction: <instruction>

The system prompt's tokens are cropped from the output (as HunyuanVideo crops its template with
``crop_start``), so the DiT sees the image tokens and the instruction tokens, valid tokens first and
padding after; the mask counts them.

Images: a frame that is not square is padded to a square of the image processor's mean colour before the
processor's resize (``InstructorConfig.image_aspect="pad"``, how LLaVA-1.5 and xtuner's LLaVA-Llama-3 were trained),
so the VLM sees the whole frame; ``"crop"`` leaves the processor's centre crop, which keeps the middle 56% of a 16:9
frame.

Which layer: HunyuanVideo's DiT was pretrained on the *third-from-last* hidden states of its LLaMA
text encoder (diffusers' ``num_hidden_layers_to_skip=2``); the VIVA paper says "last hidden states".
We default to ``hidden_layer=-3`` because a DiT (and its token refiner) initialised from HunyuanVideo
expects that distribution; set ``hidden_layer=-1`` to follow the paper's wording.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

logger = logging.getLogger(__name__)

DEFAULT_SYSTEM_PROMPT = (
    "You are a video editing assistant. Read the instruction and the images, and describe the edited video."
)


IMAGE_ASPECTS = ("pad", "crop")


@dataclass
class InstructorConfig:
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    hidden_layer: int = -3
    max_sequence_length: int = 256      # instruction tokens the DiT sees at most, besides every image token
    crop_system_prompt: bool = True
    # How a frame that is not square reaches the VLM's square input. "pad": centred on a square of the image
    # processor's mean colour, so the VLM sees the whole frame, as LLaVA-1.5 and xtuner's LLaVA-Llama-3 were trained
    # (pad_image_to_square=True). "crop": the image processor's own resize and centre crop, which cuts a 16:9 frame to
    # its middle 56% (an object near the left or right edge never reaches the VLM). Square frames: the same.
    image_aspect: str = "pad"

    def __post_init__(self):
        if self.image_aspect not in IMAGE_ASPECTS:
            raise ValueError(f"instructor.image_aspect={self.image_aspect!r}: use one of {', '.join(IMAGE_ASPECTS)}")


def _to_uint8_hwc(image: torch.Tensor) -> np.ndarray:
    """(3, H, W) float in [0, 1] -> (H, W, 3) uint8, what image processors take."""
    return image.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()


def pad_to_square(image: np.ndarray, fill) -> np.ndarray:
    """An ``(H, W, 3)`` uint8 image centred on a ``max(H, W)`` square of colour ``fill`` (LLaVA-1.5's
    ``expand2square``); a square image is returned as it is."""
    h, w = image.shape[:2]
    if h == w:
        return image
    side = max(h, w)
    out = np.empty((side, side, 3), dtype=np.uint8)
    out[:] = np.asarray(fill, dtype=np.uint8)
    top, left = (side - h) // 2, (side - w) // 2
    out[top:top + h, left:left + w] = image
    return out


def build_texts(instructions: list[str], num_images: list[int], cfg: InstructorConfig, image_token: str) -> list[str]:
    return [
        f"{cfg.system_prompt}\n" + "".join(f"{image_token}\n" for _ in range(n)) + f"Instruction: {text}"
        for text, n in zip(instructions, num_images)
    ]


@torch.no_grad()
def encode_instructions(model, processor, instructions: list[str], images: list[list[torch.Tensor]],
                        cfg: InstructorConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the frozen VLM once on a batch.

    Args:
        instructions: B strings (an empty string gives the unconditional condition).
        images: B lists of (3, H, W) tensors in [0, 1]: the first source frame, then the reference (if any).
    Returns:
        ``hidden`` (B, L, D) from ``cfg.hidden_layer`` and ``mask`` (B, L) long, valid tokens first.
    """
    tokenizer = processor.tokenizer
    image_token = processor.image_token
    texts = build_texts(instructions, [len(im) for im in images], cfg, image_token)
    flat = [_to_uint8_hwc(im) for item in images for im in item]
    if cfg.image_aspect == "pad":
        mean = getattr(processor.image_processor, "image_mean", None) or (0.5, 0.5, 0.5)
        flat = [pad_to_square(im, [round(255 * m) for m in mean]) for im in flat]
    inputs = processor(text=texts, images=flat or None, padding="longest", return_tensors="pt")
    if tokenizer.padding_side != "right":
        raise ValueError("the instructor's tokenizer must pad on the right (set padding_side='right')")
    device = next(model.parameters()).device
    inputs = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in inputs.items()}
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    out = model(**inputs, output_hidden_states=True)
    hidden = out.hidden_states[cfg.hidden_layer]
    mask = inputs["attention_mask"].long()
    ids = inputs["input_ids"]
    if cfg.crop_system_prompt:
        prefix = tokenizer(f"{cfg.system_prompt}\n", add_special_tokens=True)["input_ids"]
        n = len(prefix)
        if ids.shape[1] <= n or not bool((ids[:, :n] == torch.tensor(prefix, device=ids.device)).all()):
            raise ValueError("the system prompt does not tokenize as a fixed prefix; end it with punctuation "
                             "or set crop_system_prompt=false")
        hidden, mask, ids = hidden[:, n:], mask[:, n:], ids[:, n:]
    mask = cap_text_tokens(mask, (ids == _image_token_id(processor)).sum(1), cfg.max_sequence_length)
    length = int(mask.sum(1).max().clamp(min=1))
    return hidden[:, :length].contiguous(), mask[:, :length].contiguous()


def _image_token_id(processor) -> int:
    token_id = getattr(processor, "image_token_id", None)
    return int(token_id if token_id is not None else processor.tokenizer.convert_tokens_to_ids(processor.image_token))


def cap_text_tokens(mask: torch.Tensor, image_tokens: torch.Tensor, max_text: int) -> torch.Tensor:
    """The mask ``(B, L)`` (valid tokens first) with each row cut to its image tokens plus at most ``max_text``
    others (``InstructorConfig.max_sequence_length``): every image token is kept, and only an instruction longer than
    ``max_text`` tokens loses its end (with a warning). A real LLaVA gives 576 tokens per image (CLIP ViT-L/14 at
    336), so a cap on the whole sequence, as before, kept the first frame's tokens and cut the instruction away."""
    keep = torch.arange(mask.shape[1], device=mask.device)[None] < (image_tokens + int(max_text))[:, None]
    capped = mask * keep
    if bool((capped != mask).any()) and max_text not in _WARNED_CAPS:
        _WARNED_CAPS.add(max_text)
        logger.warning("an instruction longer than %d tokens was cut to its first %d (instructor.max_sequence_length; "
                       "said once)", max_text, max_text)
    return capped


_WARNED_CAPS: set[int] = set()


@torch.no_grad()
def encode_pooled(text_encoder, tokenizer, texts: list[str], max_length: int = 77) -> torch.Tensor:
    """HunyuanVideo's pooled text vector: the CLIP text model's pooled output (``pooled_projections``)."""
    device = next(text_encoder.parameters()).device
    inputs = tokenizer(texts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
    return text_encoder(input_ids=inputs.input_ids.to(device),
                        attention_mask=inputs.attention_mask.to(device)).pooler_output
