"""The models of the paired-data pipeline, each behind a small wrapper.

* :class:`ChatClient`: "prompt (+ images) -> JSON object" over an OpenAI-compatible chat endpoint. It
  is :class:`rewards.vlm_judge.JudgeClient` (same HTTP, retries with backoff, ``Retry-After``, secret
  scrubbing, concurrency limit and SHA-256 disk cache) with a generic JSON answer instead of scores.
* :class:`GroundingDetector`: open-vocabulary boxes on a frame with Grounding DINO
  (``transformers.GroundingDinoForObjectDetection``).
* :class:`Sam2Tracker`: masks of boxed objects through a clip with SAM 2 (``transformers.Sam2VideoModel``).
* :func:`synthesize`: the mask-conditioned generator: any edit policy (``VivaEditor``) conditioned on a
  (masked or structure) video and a caption, sampled with the policy's diffusers scheduler and CFG
  against a negative prompt.

``model: tiny`` builds each network from a tiny config with random weights, offline (tests and smoke
runs: outputs are meaningless, shapes and files are real).
"""
from __future__ import annotations

import json
import logging
import os
import warnings
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from rewards.vlm_judge import JudgeClient, _png_data_url, json_objects_in

from ...errors import CheckpointError, UserError
from ...recipe import atomic_write_text

logger = logging.getLogger(__name__)

#: part of every chat cache key: bump when a prompt or the request layout changes
DATA_PROMPT_VERSION = "data-build-v1"


# ---------------------------------------------------------------------------------------------- chat
class ChatError(RuntimeError):
    """The chat endpoint gave no usable answer after all retries (the message says why)."""


def parse_json_answer(text: str, required: Sequence[str]) -> dict:
    """The first JSON object in ``text`` (prose and code fences around it are fine) that has every key
    in ``required``; :class:`ValueError` if there is none."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError("empty answer")
    for obj in json_objects_in(text):
        if isinstance(obj, dict) and all(k in obj for k in required):
            return obj
    snippet = text.strip().replace("\n", " ")[:120]
    raise ValueError(f"no JSON object with {', '.join(required)} in the answer: {snippet!r}")


class ChatClient(JudgeClient):
    """A :class:`rewards.vlm_judge.JudgeClient` that answers ``chat_json(prompt, required, images=())``
    with a JSON object. Constructor arguments are JudgeClient's (``base_url``, ``model``, ``api_key_env``,
    ``timeout``, ``max_retries``, ``concurrency``, ``cache_dir``, ``backoff``, ``max_tokens``, ``json_mode``,
    ``max_image_side``, ...). Uses JudgeClient's transport (``_post``: errors classified as retryable or
    fatal, key scrubbed), backoff (``_sleep_before_retry``), counters and cache layout."""

    def build_chat_request(self, prompt: str, images: Sequence[tuple[str, torch.Tensor]] = ()) -> dict[str, Any]:
        """The JSON body: the prompt, then for each ``(label, frames)`` the label and its frames as PNG data URLs."""
        content: list[dict[str, Any]] = [{"type": "text", "text": prompt}]
        for label, frames in images:
            frames = frames[None] if frames.ndim == 3 else frames
            content.append({"type": "text", "text": label})
            for frame in frames:
                content.append({"type": "image_url", "image_url": {"url": _png_data_url(frame, self.max_image_side)}})
        return self.request_body(content)

    def chat_cache_key(self, body: Mapping[str, Any]) -> str:
        """SHA-256 of :data:`DATA_PROMPT_VERSION` and the canonical JSON of the request body."""
        return self.cache_key(body, DATA_PROMPT_VERSION)

    def chat_json(self, prompt: str, required: Sequence[str], images: Sequence[tuple[str, torch.Tensor]] = ()) -> dict:
        """Ask and return the answer's JSON object (with the ``required`` keys); answers are cached on disk.

        Malformed answers, timeouts, connection errors, 429 and 5xx are retried with backoff; raises
        :class:`ChatError` when no attempt succeeded (or at once on a 4xx such as 401)."""
        body = self.build_chat_request(prompt, images)
        path = self._cache_path(self.chat_cache_key(body))
        if path is not None and os.path.isfile(path):
            try:
                with open(path, encoding="utf-8") as f:
                    cached = json.load(f)["json"]
                if isinstance(cached, dict) and all(k in cached for k in required):
                    self._count("cache_hits")
                    return cached
            except (OSError, ValueError, KeyError, TypeError) as exc:
                logger.warning("chat: ignoring unreadable cache entry %s (%s)", path, exc)
        answer, raw, _, error = self.post_with_retries(body, lambda r: parse_json_answer(r, required), "chat")
        if error is None:
            if path is not None:
                atomic_write_text(path, json.dumps({"json": answer, "answer": raw, "model": self.model,
                                                    "version": DATA_PROMPT_VERSION}))
            self._count("successes")
            return answer
        self._count("failures")
        raise ChatError(f"{self.model} at {self.base_url}: {error}")

    def __repr__(self) -> str:
        return f"ChatClient(base_url={self.base_url!r}, model={self.model!r}, cache_dir={self.cache_dir!r})"


# ---------------------------------------------------------------------------------------------- tiny text
TINY_VOCAB_CORPUS = """
a an the and with on in of at to is are near by from under over front behind small large big red green blue
man woman boy girl person child people dog cat horse cow sheep bird duck bear elephant zebra giraffe lion tiger
rabbit deer fox monkey car truck bus motorcycle bicycle boat train airplane van ball cup bottle bag backpack
umbrella hat book laptop phone chair bench table lamp vase clock guitar kite skateboard toy apple banana cake
pizza tree flower plant bush street road grass field park beach sea sky room kitchen snow rain fog night day
runs walks sits stands plays rides flies swims moves running walking sitting standing playing
"""


def make_tiny_bert_tokenizer(corpus: str = TINY_VOCAB_CORPUS, vocab_size: int = 300):
    """A BERT-style WordPiece tokenizer (lower-cased, ``[CLS] ... [SEP]``) trained in memory, as
    :class:`transformers.BertTokenizerFast` (what Grounding DINO's processor expects)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(corpus.split("\n") * 2, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials,
                                                                               show_progress=False))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
                                                       special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return BertTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                             sep_token="[SEP]", mask_token="[MASK]", model_max_length=256)


# ---------------------------------------------------------------------------------------------- detector
@dataclass
class Detection:
    name: str
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 in pixels of the frame
    score: float

    def to_json(self) -> dict:
        return {"name": self.name, "box": [round(float(v), 2) for v in self.box], "score": round(float(self.score), 4)}


class GroundingDetector:
    """The best box of each named object on one frame (Grounding DINO, one text query per name)."""

    def __init__(self, model, processor, *, box_threshold: float = 0.35, text_threshold: float = 0.25):
        self.model = model.eval().requires_grad_(False)
        self.processor = processor
        self.box_threshold = float(box_threshold)
        self.text_threshold = float(text_threshold)

    @classmethod
    def load(cls, name: str, *, device=None, dtype=None, seed: int = 0, **kwargs) -> "GroundingDetector":
        """``name``: a checkpoint folder or hub id (``IDEA-Research/grounding-dino-tiny``), or ``tiny``."""
        if name == "tiny":
            model, processor = make_tiny_grounding_dino(seed)
        else:
            from transformers import AutoProcessor, GroundingDinoForObjectDetection

            try:
                model = GroundingDinoForObjectDetection.from_pretrained(name, **({"dtype": dtype} if dtype else {}))
                processor = AutoProcessor.from_pretrained(name)
            except (OSError, ValueError) as exc:
                raise CheckpointError(f"detector.model={name!r} cannot be loaded ({exc.__class__.__name__}: "
                                      f"{str(exc).splitlines()[0][:160]}); give a Grounding DINO folder or hub id, "
                                      "or 'tiny'") from None
        return cls(model.to(device) if device is not None else model, processor, **kwargs)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def detect(self, image: torch.Tensor, names: Sequence[str]) -> list[Detection | None]:
        """For each name, its highest-scoring box on ``image`` ``(3, H, W)`` in [0, 1] above the thresholds
        (``None`` if nothing passes). One batched forward (the frame once per name, text ``"<name>."``)."""
        if not names:
            return []
        h, w = image.shape[-2:]
        pil = _to_pil(image)
        inputs = self.processor(images=[pil] * len(names), text=[f"{n.strip().lower()}." for n in names],
                                return_tensors="pt", padding=True)
        dtype = next(self.model.parameters()).dtype
        inputs = {k: (v.to(self.device, dtype) if v.is_floating_point() else v.to(self.device)) for k, v in inputs.items()}
        outputs = self.model(**inputs)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            results = self.processor.post_process_grounded_object_detection(
                outputs, inputs["input_ids"], threshold=self.box_threshold, text_threshold=self.text_threshold,
                target_sizes=[(h, w)] * len(names))
        found: list[Detection | None] = []
        for name, res in zip(names, results):
            if len(res["scores"]) == 0:
                found.append(None)
                continue
            best = int(res["scores"].argmax())
            x0, y0, x1, y1 = (float(v) for v in res["boxes"][best].float().cpu())
            box = (max(0.0, x0), max(0.0, y0), min(float(w), x1), min(float(h), y1))
            found.append(Detection(name, box, float(res["scores"][best])) if box[2] > box[0] and box[3] > box[1] else None)
        return found


def make_tiny_grounding_dino(seed: int = 0, image_size: int = 64):
    """(GroundingDinoForObjectDetection, GroundingDinoProcessor): tiny Swin + BERT, random weights, offline."""
    from transformers import (BertConfig, GroundingDinoConfig, GroundingDinoForObjectDetection,
                              GroundingDinoImageProcessor, GroundingDinoProcessor, SwinConfig)

    tokenizer = make_tiny_bert_tokenizer()
    swin = SwinConfig(image_size=image_size, patch_size=4, embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1],
                      window_size=4, out_features=["stage2", "stage3", "stage4"])
    bert = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=37, max_position_embeddings=64)
    config = GroundingDinoConfig(backbone_config=swin, text_config=bert, d_model=32, num_queries=10, encoder_layers=1,
                                 decoder_layers=2, encoder_ffn_dim=32, decoder_ffn_dim=32, encoder_attention_heads=2,
                                 decoder_attention_heads=2, num_feature_levels=3, encoder_n_points=2,
                                 decoder_n_points=2, max_text_len=32)
    torch.manual_seed(seed)
    model = GroundingDinoForObjectDetection(config).eval()
    image_processor = GroundingDinoImageProcessor(size={"shortest_edge": image_size, "longest_edge": image_size})
    return model, GroundingDinoProcessor(image_processor=image_processor, tokenizer=tokenizer)


# ---------------------------------------------------------------------------------------------- tracker
class Sam2Tracker:
    """Masks of boxed objects through a clip: SAM 2 prompted with the boxes on frame 0, propagated forward."""

    def __init__(self, model, processor, *, mask_threshold: float = 0.0):
        self.model = model.eval().requires_grad_(False)
        self.processor = processor
        self.mask_threshold = float(mask_threshold)

    @classmethod
    def load(cls, name: str, *, device=None, dtype=None, seed: int = 0, **kwargs) -> "Sam2Tracker":
        """``name``: a checkpoint folder or hub id (``facebook/sam2.1-hiera-tiny``), or ``tiny``."""
        if name == "tiny":
            model, processor = make_tiny_sam2_video(seed)
        else:
            from transformers import Sam2VideoModel, Sam2VideoProcessor

            try:
                model = Sam2VideoModel.from_pretrained(name, **({"dtype": dtype} if dtype else {}))
                processor = Sam2VideoProcessor.from_pretrained(name)
            except (OSError, ValueError) as exc:
                raise CheckpointError(f"tracker.model={name!r} cannot be loaded ({exc.__class__.__name__}: "
                                      f"{str(exc).splitlines()[0][:160]}); give a SAM 2 folder or hub id, or 'tiny'") from None
        return cls(model.to(device) if device is not None else model, processor, **kwargs)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def track(self, video: torch.Tensor, boxes: Sequence[Sequence[float]]) -> torch.Tensor:
        """``video`` ``(F, 3, H, W)`` in [0, 1], ``boxes`` ``[(x0, y0, x1, y1)]`` on frame 0 -> bool masks
        ``(N, F, H, W)``: mask logit (at the video's resolution) above ``mask_threshold``."""
        f, _, h, w = video.shape
        if not boxes:
            return torch.zeros(0, f, h, w, dtype=torch.bool)
        frames = list(video.mul(255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy())
        dtype = next(self.model.parameters()).dtype
        session = self.processor.init_video_session(video=frames, inference_device=self.device, dtype=dtype)
        ids = list(range(1, len(boxes) + 1))
        self.processor.add_inputs_to_inference_session(
            inference_session=session, frame_idx=0, obj_ids=ids,
            input_boxes=[[[float(v) for v in b] for b in boxes]])
        masks = torch.zeros(len(boxes), f, h, w, dtype=torch.bool)
        for out in self.model.propagate_in_video_iterator(session, start_frame_idx=0):
            logits = self.processor.post_process_masks([out.pred_masks], original_sizes=[[h, w]], binarize=False)[0]
            masks[:, out.frame_idx] = (logits[:, 0].float() > self.mask_threshold).cpu()
        return masks


def make_tiny_sam2_video(seed: int = 0, image_size: int = 32):
    """(Sam2VideoModel, Sam2VideoProcessor) from a tiny config, random weights, offline.

    Constraints of the transformers implementation this respects: the memory encoder's output is 64
    channels and the hidden size must be a multiple of it (and larger); a global-attention block must
    not be the first block of a pooling stage."""
    from transformers import (Sam2HieraDetConfig, Sam2ImageProcessor, Sam2VideoConfig, Sam2VideoModel,
                              Sam2VideoProcessor, Sam2VideoVideoProcessor, Sam2VisionConfig)

    s = image_size
    hiera = Sam2HieraDetConfig(hidden_size=8, num_attention_heads=1, image_size=[s, s], blocks_per_stage=[1, 1, 2, 1],
                               embed_dim_per_stage=[8, 16, 32, 64], num_attention_heads_per_stage=[1, 1, 1, 1],
                               window_size_per_stage=[4, 4, 4, 4], global_attention_blocks=[3],
                               window_positional_embedding_background_size=[2, 2])
    vision = Sam2VisionConfig(backbone_config=hiera, backbone_channel_list=[64, 32, 16, 8],
                              backbone_feature_sizes=[[s // 4, s // 4], [s // 8, s // 8], [s // 16, s // 16]],
                              fpn_hidden_size=128)
    config = Sam2VideoConfig(
        vision_config=vision, image_size=s, num_maskmem=2, max_object_pointers_in_encoder=2,
        prompt_encoder_config=dict(hidden_size=128, image_size=s, patch_size=16, mask_input_channels=4),
        mask_decoder_config=dict(hidden_size=128, mlp_dim=32, num_attention_heads=2, iou_head_hidden_dim=32),
        memory_attention_hidden_size=128, memory_attention_num_layers=1, memory_attention_feed_forward_hidden_size=32,
        memory_attention_rope_feat_sizes=[s // 16, s // 16], memory_encoder_hidden_size=128,
        memory_encoder_output_channels=64, mask_downsampler_embed_dim=128, memory_fuser_embed_dim=128,
        memory_fuser_intermediate_dim=32)
    torch.manual_seed(seed)
    model = Sam2VideoModel(config).eval()
    processor = Sam2VideoProcessor(
        image_processor=Sam2ImageProcessor(size={"height": s, "width": s}, mask_size={"height": s // 4, "width": s // 4}),
        video_processor=Sam2VideoVideoProcessor(size={"height": s, "width": s}), target_size=s)
    return model, processor


# ---------------------------------------------------------------------------------------------- generator
def check_clip_for_editor(editor, frames: int, height: int, width: int) -> None:
    """The working clip must suit the editor's VAE: ``r k + 1`` frames, sides multiples of its spatial ratio."""
    r, m = int(editor.temporal_ratio), int(editor.spatial_ratio)
    if frames < 1 or (frames - 1) % r:
        raise UserError(f"clip.frames={frames}: the editor needs {r}k + 1 frames (e.g. {((max(frames, 2) - 1) // r) * r + 1})")
    if height % m or width % m:
        raise UserError(f"clip.size=[{height}, {width}]: the editor needs sides that are multiples of {m}")


def masked_source(video: torch.Tensor, mask: torch.Tensor, fill: float = 0.5) -> torch.Tensor:
    """The inpainting condition ``V (1 - M) + fill M``: the masked region replaced by a flat grey."""
    m = mask.to(video.dtype)
    return video * (1 - m) + fill * m


def paste_back(generated: torch.Tensor, video: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``M G + (1 - M) V``: outside the mask the result is exactly the real video."""
    m = mask.to(generated.dtype)
    return generated * m + video * (1 - m)


@torch.no_grad()
def synthesize(editor, condition_video: torch.Tensor, caption: str, negative: str = "", *, num_inference_steps: int = 8,
               guidance_scale: float = 5.0, seed: int = 0) -> torch.Tensor:
    """Generate a clip ``(F, 3, H, W)`` in [0, 1] from a condition video (the masked real video for
    inpainting, an edge video for structure guidance) and a caption, with any edit policy.

    The caption plays the instruction and the condition video the source (``encode_condition`` of the
    pair ``[caption, negative]`` in one batched call). Sampling: a copy of the policy's
    ``FlowMatchEulerDiscreteScheduler`` with its shift, Euler steps ``z' = z + (sigma' - sigma) v`` and
    classifier-free guidance against the negative prompt, ``v = v_neg + g (v_pos - v_neg)`` (one forward
    on ``[z ; z]`` per step; ``g = 1`` skips the negative half). Noise is drawn on the CPU from ``seed``.
    """
    if not caption or not caption.strip():
        raise UserError("synthesize: the caption is empty")
    use_cfg = float(guidance_scale) != 1.0
    texts = [caption, negative] if use_cfg else [caption]
    src = condition_video[None].expand(len(texts), *condition_video.shape).to(editor.device)
    both, _ = editor.encode_condition(src, texts, with_uncond=False)
    cond = both.select([0])
    g = torch.Generator("cpu").manual_seed(int(seed))
    latents = torch.randn((1, *editor.latent_shape(cond)), generator=g, dtype=torch.float32).to(editor.device)
    sched = type(editor.scheduler).from_config(editor.scheduler.config, shift=float(editor.config.shift),
                                               use_dynamic_shifting=False)
    sched.set_timesteps(int(num_inference_steps), device=editor.device)
    for i, t in enumerate(sched.timesteps):
        sigma = sched.sigmas[i].to(device=editor.device, dtype=torch.float32)
        if use_cfg:
            v_pos, v_neg = editor.velocity(torch.cat([latents, latents]), sigma.expand(2), both).float().chunk(2)
            v = v_neg + float(guidance_scale) * (v_pos - v_neg)
        else:
            v = editor.velocity(latents, sigma.expand(1), cond).float()
        latents = sched.step(v, t, latents, return_dict=False)[0]
    out = editor.decode(latents)[0].float().cpu()
    if out.shape != condition_video.shape:
        raise RuntimeError(f"the editor decoded {tuple(out.shape)} for a {tuple(condition_video.shape)} clip")
    return out


def _to_pil(image: torch.Tensor):
    from PIL import Image

    arr = image.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(np.ascontiguousarray(arr))


__all__ = ["ChatClient", "ChatError", "DATA_PROMPT_VERSION", "Detection", "GroundingDetector",
           "Sam2Tracker", "check_clip_for_editor", "make_tiny_bert_tokenizer", "make_tiny_grounding_dino",
           "make_tiny_sam2_video", "masked_source", "parse_json_answer", "paste_back", "synthesize"]
