"""Editing one video with any edit policy: adapt the clip to the model, sample, map the result back.

``EditPipeline(policy)`` turns a clip of any length and size into what the model accepts, runs the
probability-flow ODE with classifier-free guidance, and returns (or writes) the edited clip at the
input's frame count, size and fps. It knows no backbone: it uses the :class:`~viva_base.policy.EditPolicy`
methods (``encode_condition``, ``latent_shape``, ``velocity``, ``decode``) plus these attributes, which
every editor has:

* ``scheduler`` (a diffusers ``FlowMatchEulerDiscreteScheduler``) and ``config.shift`` (its shift);
* ``temporal_ratio`` (frames must be ``r k + 1``), ``spatial_ratio`` (sides must be multiples of it:
  VAE factor x DiT patch);
* ``config.max_frames``, ``config.max_side`` (the largest clip edited without being shrunk);
* ``device``.

Adapting a clip (:func:`plan_clip`, :func:`resample_indices`, :func:`resize_frames`):

* **frames**: the model clip has the valid count (``r k + 1``) nearest the input's frame count (ties
  go down; never above ``max_frames``). Model frame ``j`` is the source frame nearest in time
  (:func:`resample_indices`, both clips spanning the same first-to-last interval).
* **longer than max_frames**: the clip is *uniformly subsampled* over its whole length (not
  truncated), so the edit covers every part of it. Each output frame is the edited frame nearest in
  time; frames between two sampled ones repeat the nearest edited frame, so motion is held at an
  effective rate of ``fps * frames / num_frames`` while the output keeps the input's frame count and
  fps. A warning says so.
* **size**: scaled down (never up) so the longer side is at most ``max_side``, then each side rounded
  to the nearest multiple of ``spatial_ratio`` (ties go down; at least one multiple). A warning says
  when an input is shrunk.
* **mapping back**: the edited clip is resized to the input size (bicubic, antialiased) and each
  output frame takes the nearest edited frame in time; exactly the identity when nothing was adapted.

``frames=`` / ``size=`` (CLI ``--frames`` / ``--size WxH``) choose the model clip explicitly; they are
snapped to valid values and may exceed the config's limits (with a warning).

Reading a file (:meth:`EditPipeline.load_clip`) never holds much more than the model clip: it probes
the length, keeps every ``k``-th decoded frame (:func:`read_stride`: at most ``2 f - 1`` frames) and
shrinks frames while decoding to at most twice the model's longer side (then one antialiased resize
to the exact model size). The output is written atomically at the end (``viva_base.video.write_video``), so a failed
edit leaves no file, and one frame at a time (:class:`MappedBack`): beyond the model clip, writing holds one output
frame (a 1000-frame 160 x 120 edit raised the peak memory by 660 MB when the whole output clip was made first, by
about 2 MB now).

Sampling (paper Appendix B: 50 steps, CFG 2.0 on the instruction only): a fresh copy of the policy's
``FlowMatchEulerDiscreteScheduler`` with ``shift = config.shift``, ``set_timesteps(num_inference_steps)``
and its ``step`` (Euler: ``z' = z + (sigma_next - sigma) v``, equal to ``editgrpo.sampling.ode_step``).
Each step runs ONE forward on ``[z ; z]`` with ``Condition.cat([cond, uncond])`` (the unconditional
condition drops the instruction and keeps the source video) and combines
``v = v_u + g (v_c - v_u)``; ``g = 1`` skips the unconditional half. The initial noise is drawn on the
CPU from ``seed`` (or the given generator), so a seed gives the same edit on any device.
"""
from __future__ import annotations

import logging
import math
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .errors import UserError
from .guidance import check_sampler_options, guided
from .policy import Condition
from .video import (DEFAULT_IMAGE_FPS, IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, VideoError, frame_times, probe_video,
                    read_image, read_video, variable_rate_times, write_video)

logger = logging.getLogger(__name__)

# Extensions viva_base.video.write_video encodes (see its table); "" is a folder of PNGs; an image
# extension holds a 1-frame clip only.
VIDEO_OUTPUT_EXTENSIONS = VIDEO_EXTENSIONS


# ---------------------------------------------------------------------------------------------- clip math
def snap_frames(n: int, temporal_ratio: int, max_frames: int | None = None) -> int:
    """The frame count ``r k + 1`` nearest ``n`` (ties go down), at least 1 and at most the largest
    valid count ``<= max_frames`` (when given)."""
    r = int(temporal_ratio)
    if n < 1:
        raise UserError(f"a clip needs at least 1 frame, got {n}")
    lo = ((n - 1) // r) * r + 1
    hi = lo + r
    best = hi if (hi - n) < (n - lo) else lo
    if max_frames is not None:
        best = min(best, ((max(int(max_frames), 1) - 1) // r) * r + 1)
    return best


def snap_side(x: float, multiple: int) -> int:
    """The multiple of ``multiple`` nearest ``x`` (ties go down), at least ``multiple``."""
    m = int(multiple)
    k = math.ceil(x / m - 0.5)  # round half down
    return max(1, k) * m


def parse_size(size: str | Sequence[int] | None) -> tuple[int, int] | None:
    """``"WxH"`` or ``(width, height)`` -> ``(width, height)`` of positive ints (``None`` stays ``None``)."""
    if size is None:
        return None
    if isinstance(size, str):
        parts = size.lower().split("x")
        if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
            raise UserError(f"size {size!r} is not WIDTHxHEIGHT (e.g. 640x352)")
        size = (int(parts[0]), int(parts[1]))
    w, h = (int(v) for v in size)
    if w < 1 or h < 1:
        raise UserError(f"size {w}x{h}: width and height must be positive")
    return w, h


def plan_clip(num_frames: int, height: int, width: int, *, temporal_ratio: int, spatial_multiple: int,
              max_frames: int | None, max_side: int | None, frames: int | None = None,
              size: str | Sequence[int] | None = None) -> tuple[int, int, int]:
    """The model clip ``(frames, h, w)`` for an input of ``num_frames`` frames of ``height x width``.

    frames = snap_frames(frames or num_frames), capped at max_frames unless ``frames`` is given;
    (h, w) = each side of ``size`` (width, height) -- or of the input scaled by
    ``min(1, max_side / max(height, width))`` -- rounded to the nearest multiple of ``spatial_multiple``;
    without ``size`` the result is also capped at the largest multiple ``<= max_side``.
    """
    if num_frames < 1 or height < 1 or width < 1:
        raise UserError(f"empty clip ({num_frames} frames of {width}x{height})")
    if frames is not None and frames < 1:
        raise UserError(f"frames={frames}: must be at least 1")
    f = snap_frames(frames, temporal_ratio) if frames is not None else \
        snap_frames(num_frames, temporal_ratio, max_frames)
    wh = parse_size(size)
    m = int(spatial_multiple)
    if wh is not None:
        return f, snap_side(wh[1], m), snap_side(wh[0], m)
    scale = 1.0 if not max_side else min(1.0, max_side / max(height, width))
    h, w = snap_side(height * scale, m), snap_side(width * scale, m)
    if max_side:
        cap = max(m, (int(max_side) // m) * m)
        h, w = min(h, cap), min(w, cap)
    return f, h, w


def resample_indices(n_from: int, n_to: int) -> torch.Tensor:
    """Nearest-neighbour temporal resampling: index ``i`` of ``n_to`` frames takes frame
    ``round(i (n_from - 1) / (n_to - 1))`` of ``n_from`` (halves round up; both clips span the same
    first-to-last interval; ``n_to = 1`` takes frame 0). The identity when ``n_from == n_to``."""
    if n_from < 1 or n_to < 1:
        raise ValueError(f"resample_indices needs positive counts, got {n_from} -> {n_to}")
    i = torch.arange(n_to, dtype=torch.long)
    if n_to == 1:
        return i
    # exact integer rounding: floor((2 i (n_from - 1) + (n_to - 1)) / (2 (n_to - 1)))
    return (2 * i * (n_from - 1) + (n_to - 1)) // (2 * (n_to - 1))


def read_stride(num_frames: int, model_frames: int) -> int:
    """Decode every ``k``-th frame, ``k = max(1, floor((n - 1) / (m - 1)))``: no sampled frame is lost
    (``k`` is at most the spacing of the sampled indices) and at most ``~2 m`` frames are decoded."""
    if model_frames <= 1:
        return 1
    return max(1, (num_frames - 1) // (model_frames - 1))


def resize_frames(frames: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``(F, 3, H, W)`` -> ``(F, 3, h, w)``, bicubic with antialiasing, clamped to [0, 1]; the
    identity (same tensor) when the size already matches."""
    if tuple(frames.shape[-2:]) == tuple(size):
        return frames
    out = F.interpolate(frames.float(), size=tuple(size), mode="bicubic", antialias=True, align_corners=False)
    return out.clamp_(0, 1)


def map_back(edited: torch.Tensor, num_frames: int, size: tuple[int, int]) -> torch.Tensor:
    """The edited model clip ``(f, 3, h, w)`` at the input's ``num_frames`` and ``size = (H, W)``:
    resized (:func:`resize_frames`), then each output frame the nearest edited one in time."""
    return resize_frames(edited, size).index_select(0, resample_indices(edited.shape[0], num_frames).to(edited.device))


class MappedBack:
    """:func:`map_back` one frame at a time: ``len`` and indexing give the same frames (bit for bit), each made
    when asked (the last one kept, since neighbours repeat it). :func:`~viva_base.video.write_video` takes it, so
    an edit of a long clip is written without the whole clip at the input's size in memory (a minute of 1080p at
    30 fps is 45 GB as float32)."""

    def __init__(self, edited: torch.Tensor, num_frames: int, size: tuple[int, int]):
        self.edited, self.size = edited, tuple(size)
        self.index = resample_indices(edited.shape[0], num_frames).tolist()
        self._last: tuple[int, torch.Tensor] | None = None

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> torch.Tensor:
        j = self.index[i]
        if self._last is None or self._last[0] != j:
            self._last = (j, resize_frames(self.edited[j:j + 1], self.size)[0])
        return self._last[1]


@dataclass(frozen=True)
class ClipInfo:
    """What the output must match: the input's frame count, size and fps."""

    num_frames: int
    height: int
    width: int
    fps: float


def probe_clip(path: str | os.PathLike) -> ClipInfo:
    """Frame count, size and fps of a video file, image, or folder of images, decoding as little as
    possible (a folder: its first image only). :class:`VideoError` names the problem."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise VideoError(f"{path}: folder holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
        first = read_image(files[0])
        return ClipInfo(len(files), int(first.shape[1]), int(first.shape[2]), DEFAULT_IMAGE_FPS)
    n, h, w, fps = probe_video(path)
    if n < 1:
        raise VideoError(f"{path}: video has no frames")
    return ClipInfo(int(n), int(h), int(w), float(fps))


def check_output_path(path: str | os.PathLike, num_frames: int | None = None) -> Path:
    """Fail early (before any model work) on an output the writer would refuse."""
    path = Path(path)
    if not path.parent.exists():
        raise VideoError(f"{path}: output folder {path.parent} does not exist; create it first")
    if not path.parent.is_dir():
        raise VideoError(f"{path}: {path.parent} is a file, not a folder; give an output in a folder")
    try:  # the writers write a temporary file next to the output, then rename it
        fd, probe = tempfile.mkstemp(prefix=".write-check-", dir=path.parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise VideoError(f"{path}: cannot write in {path.parent} ({exc.strerror}); give a writable folder") from None
    ext = path.suffix.lower()
    if ext in IMAGE_EXTENSIONS:
        if num_frames is not None and num_frames != 1:
            raise VideoError(f"{path}: an image file holds one frame, the input has {num_frames}; "
                             f"use {', '.join(VIDEO_OUTPUT_EXTENSIONS)}")
    elif ext and ext not in VIDEO_OUTPUT_EXTENSIONS:
        raise VideoError(f"{path}: unsupported output extension {ext!r} "
                         f"(use {', '.join(VIDEO_OUTPUT_EXTENSIONS)}, or no extension for a folder of PNGs)")
    if path.is_dir() and ext:
        raise VideoError(f"{path}: is a folder; give a file name")
    if not ext and path.exists():  # a PNG-sequence output replaces the folder: only ever replace our own
        if not path.is_dir():
            raise VideoError(f"{path}: exists and is a file; give the output an extension such as .mp4")
        if any(not re.fullmatch(r"\d{5}\.png", p.name) for p in path.iterdir()):
            raise VideoError(f"{path}: folder exists and holds other files; give a new folder name")
    return path


def check_instruction(instruction) -> str:
    if not isinstance(instruction, str) or not instruction.strip():
        raise UserError("the instruction is empty; say what to change, e.g. \"make the sky night\"")
    return instruction.strip()


# ---------------------------------------------------------------------------------------------- pipeline
class EditPipeline:
    """Edit a clip with any :class:`~viva_base.policy.EditPolicy` (see the module docstring)."""

    def __init__(self, policy):
        self.policy = policy

    # -- adapting ------------------------------------------------------------------------------------
    def plan(self, num_frames: int, height: int, width: int, *, num_frames_model: int | None = None,
             size=None) -> tuple[int, int, int]:
        cfg = self.policy.config
        f, h, w = plan_clip(num_frames, height, width, temporal_ratio=self.policy.temporal_ratio,
                            spatial_multiple=self.policy.spatial_ratio, max_frames=cfg.max_frames,
                            max_side=cfg.max_side, frames=num_frames_model, size=size)
        if num_frames_model is None and num_frames > cfg.max_frames:
            logger.warning("the clip has %d frames, more than the model's %d: it is subsampled uniformly to %d "
                           "frames and each output frame repeats the nearest edited one (motion is held)",
                           num_frames, cfg.max_frames, f)
        elif num_frames_model is not None and f > cfg.max_frames:
            logger.warning("%d frames exceed the model's max_frames=%d; expect slow, untested results", f, cfg.max_frames)
        if size is None and max(height, width) > cfg.max_side:
            logger.warning("the clip is %dx%d, larger than the model's max side %d: it is edited at %dx%d and "
                           "scaled back up", width, height, cfg.max_side, w, h)
        elif size is not None and max(h, w) > cfg.max_side:
            logger.warning("size %dx%d exceeds the model's max side %d; expect slow, untested results", w, h, cfg.max_side)
        return f, h, w

    def adapt(self, frames: torch.Tensor, *, num_frames=None, size=None) -> torch.Tensor:
        """An in-memory clip ``(F, 3, H, W)`` -> the model clip ``(f, 3, h, w)``."""
        f, h, w = self.plan(frames.shape[0], frames.shape[-2], frames.shape[-1], num_frames_model=num_frames, size=size)
        return resize_frames(frames.index_select(0, resample_indices(frames.shape[0], f).to(frames.device)), (h, w))

    def load_clip(self, path: str | os.PathLike, *, num_frames=None, size=None,
                  info: ClipInfo | None = None) -> tuple[torch.Tensor, ClipInfo]:
        """Read ``path`` straight into the model clip ``(f, 3, h, w)``, decoding every ``k``-th frame
        (:func:`read_stride`) and shrinking frames while decoding; returns it with the input's :class:`ClipInfo`
        (``info``: a :func:`probe_clip` result already at hand)."""
        info = info or probe_clip(path)
        f, h, w = self.plan(info.num_frames, info.height, info.width, num_frames_model=num_frames, size=size)
        k = read_stride(info.num_frames, f)
        wanted = -(-info.num_frames // k) if f > 1 else 1
        side = 2 * max(h, w) if max(info.height, info.width) > 2 * max(h, w) else None
        video = read_video(path, max_frames=wanted, max_side=side, frame_step=k)
        decoded = video.frames
        dh, dw = decoded.shape[-2:]
        if dh != dw and info.height != info.width and (dh > dw) != (info.height > info.width):
            # the probe (the MP4 boxes) and the decoder (FFmpeg's display matrix) disagree on the orientation:
            # trust the decoder, as for the frame count below
            logger.warning("%s: probed %dx%d, decoded %dx%d frames: taking the decoder's orientation", path,
                           info.width, info.height, dw, dh)
            info = ClipInfo(info.num_frames, info.width, info.height, info.fps)
            f, h, w = self.plan(info.num_frames, info.height, info.width, num_frames_model=num_frames, size=size)
        n = info.num_frames
        if k == 1 and decoded.shape[0] != n:  # the container's frame count was off: trust the decoder
            logger.warning("%s: the container says %d frames, %d decoded", path, n, decoded.shape[0])
            n = decoded.shape[0]
            f, h, w = self.plan(n, info.height, info.width, num_frames_model=num_frames, size=size)
        src = resample_indices(n, f)
        idx = torch.clamp(torch.div(src + k // 2, k, rounding_mode="floor"), max=decoded.shape[0] - 1)
        clip = resize_frames(decoded.index_select(0, idx), (h, w))
        return clip, ClipInfo(n, info.height, info.width, info.fps)

    def load_reference(self, reference) -> torch.Tensor | None:
        """The reference image as ``(3, H, W)`` in [0, 1] (``None`` stays ``None``): a path (read, at most the
        model's max side) or a tensor; a UserError names what is wrong with it."""
        if reference is None:
            return None
        if isinstance(reference, (str, os.PathLike)):
            return read_image(reference, max_side=self.policy.config.max_side)
        if not torch.is_tensor(reference) or reference.ndim != 3 or reference.shape[0] != 3:
            raise UserError(f"the reference must be an image path or a (3, H, W) tensor, got "
                            f"{tuple(reference.shape) if torch.is_tensor(reference) else type(reference).__name__}")
        return _as_unit_float(reference)

    # -- sampling ------------------------------------------------------------------------------------
    def make_scheduler(self, num_inference_steps: int, shift: float | None = None):
        """A fresh copy of the policy's scheduler with ``shift`` (None: the policy's); the policy's own is never
        mutated."""
        shift = float(self.policy.config.shift if shift is None else shift)
        sched = type(self.policy.scheduler).from_config(self.policy.scheduler.config, shift=shift,
                                                        use_dynamic_shifting=False)
        sched.set_timesteps(num_inference_steps, device=self.policy.device)
        return sched

    @torch.no_grad()
    def sample(self, clip: torch.Tensor, instruction: str, reference: torch.Tensor | None = None, *,
               num_inference_steps: int = 50, guidance_scale: float = 2.0, seed: int = 0,
               generator: torch.Generator | None = None, progress: bool = True,
               on_step: Callable[[int, int], None] | None = None,
               guidance_interval: tuple[float, float] | None = None, shift: float | None = None) -> torch.Tensor:
        """Edit a model-sized clip ``(f, 3, h, w)`` -> ``(f, 3, h, w)`` in [0, 1] (no adapting).
        ``on_step(done, total)``, when given, is called after each of the ``total`` denoising steps (a progress
        bar of a caller's own, e.g. the web demo's). ``guidance_interval=(lo, hi)``: CFG only on the steps with
        ``lo < sigma <= hi`` (the others run the conditional forward alone; Kynkaenniemi et al. 2024). ``shift``:
        the schedule shift (None: the editor's)."""
        instruction = check_instruction(instruction)
        if int(num_inference_steps) < 1:
            raise UserError(f"num_inference_steps={num_inference_steps}: need at least 1 step")
        if not float(guidance_scale) > 0:  # (NaN too) 0 would drop the instruction, < 0 steer away from it
            raise UserError(f"guidance_scale={guidance_scale}: must be > 0 (1: no CFG)")
        guidance_interval = check_sampler_options(guidance_interval, shift)
        policy = self.policy
        cond, uncond = policy.encode_condition(clip[None], [instruction], [reference])
        if generator is None:
            generator = torch.Generator("cpu").manual_seed(int(seed))
        shape = (1, *policy.latent_shape(cond))
        latents = torch.randn(shape, generator=generator, dtype=torch.float32, device=generator.device)
        latents = latents.to(policy.device)
        use_cfg = float(guidance_scale) != 1.0
        both = Condition.cat([cond, uncond]) if use_cfg else cond
        sched = self.make_scheduler(int(num_inference_steps), shift)
        for i, t in enumerate(tqdm(sched.timesteps, desc="denoising", disable=not progress, leave=False)):
            sigma = sched.sigmas[i].to(device=policy.device, dtype=torch.float32)
            if use_cfg and bool(guided(sigma, guidance_interval)):
                v = policy.velocity(torch.cat([latents, latents]), sigma.expand(2), both)
                v_c, v_u = v.float().chunk(2)
                v = v_u + float(guidance_scale) * (v_c - v_u)
            else:
                v = policy.velocity(latents, sigma.expand(1), cond).float()
            latents = sched.step(v, t, latents, return_dict=False)[0]
            if on_step is not None:
                on_step(i + 1, len(sched.timesteps))
        out = policy.decode(latents)[0].float().cpu()
        if out.shape[0] != clip.shape[0]:
            raise RuntimeError(f"the policy decoded {out.shape[0]} frames for a {clip.shape[0]}-frame clip")
        return out

    # -- entry points --------------------------------------------------------------------------------
    def __call__(self, video, instruction: str, reference=None, *, num_inference_steps: int = 50,
                 guidance_scale: float = 2.0, seed: int = 0, num_frames: int | None = None, size=None,
                 progress: bool = True, generator: torch.Generator | None = None,
                 on_step: Callable[[int, int], None] | None = None,
                 guidance_interval: tuple[float, float] | None = None, shift: float | None = None) -> torch.Tensor:
        """Edit ``video`` (a ``(F, 3, H, W)`` tensor in [0, 1], uint8 allowed, or a path) with ``instruction``
        and an optional reference image (``(3, H, W)`` tensor or path).

        Returns the edited frames ``(F, 3, H, W)`` float32 in [0, 1] on the CPU, at the input's frame count
        and size. ``num_frames`` / ``size`` ("WxH" or (width, height)) set the model clip explicitly;
        ``on_step(done, total)`` is called after each denoising step (see :meth:`sample`).
        """
        instruction = check_instruction(instruction)
        ref = self.load_reference(reference)
        clip, n, hw = self.prepare(video, num_frames=num_frames, size=size)
        edited = self.sample(clip, instruction, ref, num_inference_steps=num_inference_steps,
                             guidance_scale=guidance_scale, seed=seed, generator=generator, progress=progress,
                             on_step=on_step, guidance_interval=guidance_interval, shift=shift)
        return map_back(edited, n, hw)

    def prepare(self, video, *, num_frames: int | None = None, size=None) -> tuple[torch.Tensor, int, tuple[int, int]]:
        """``video`` (a path, or a ``(F, 3, H, W)`` tensor in [0, 1], uint8 allowed) -> ``(clip, F, (H, W))``: the
        model clip to :meth:`sample` and what :func:`map_back` restores. Editing one clip several ways (other
        seeds, adapters) prepares it once."""
        if isinstance(video, (str, os.PathLike)):
            clip, info = self.load_clip(video, num_frames=num_frames, size=size)
            return clip, info.num_frames, (info.height, info.width)
        if not torch.is_tensor(video) or video.ndim != 4 or video.shape[1] != 3 or video.shape[0] < 1:
            raise UserError("the video must be a path or a (F, 3, H, W) tensor, got "
                            + (str(tuple(video.shape)) if torch.is_tensor(video) else type(video).__name__))
        video = _as_unit_float(video)
        return self.adapt(video, num_frames=num_frames, size=size), video.shape[0], tuple(video.shape[-2:])

    def edit_file(self, video: str | os.PathLike, instruction: str, out: str | os.PathLike, reference=None, *,
                  audio: bool = True, **kwargs) -> Path:
        """Edit the video file (or image folder) ``video`` and write the result to ``out`` atomically, at
        the input's frame count, size and fps (a variable frame rate: each frame at its source frame's time); the
        codec follows ``out``'s extension (H.264 for .mp4). With ``audio`` the input's sound goes along, in sync
        (:func:`~viva_base.video.write_video`).
        Keyword arguments are those of :meth:`__call__`. Returns ``out``."""
        info = probe_clip(video)
        out = check_output_path(out, info.num_frames)
        instruction = check_instruction(instruction)
        ref = self.load_reference(reference)
        keys = {"num_frames", "size"}
        clip, info = self.load_clip(video, info=info, **{k: v for k, v in kwargs.items() if k in keys})
        edited = self.sample(clip, instruction, ref, **{k: v for k, v in kwargs.items() if k not in keys})
        times = variable_rate_times(frame_times(video), info.fps, info.num_frames)  # None: a constant rate
        return write_video(out, MappedBack(edited, info.num_frames, (info.height, info.width)), fps=info.fps,
                           audio=video if audio else None, times=times)


def _as_unit_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 in [0, 255] or float in [0, 1] -> float32 in [0, 1]."""
    if x.dtype == torch.uint8:
        return x.float() / 255.0
    x = x.float()
    if x.numel() and (x.min() < -1e-3 or x.max() > 1 + 1e-3):
        raise UserError(f"pixel values must lie in [0, 1] (got [{x.min():.3g}, {x.max():.3g}]); divide by 255?")
    return x.clamp(0, 1)
