"""Edit a video file with an instruction: ``viva-edit`` / ``python -m viva_base.edit``.

::

    python -m viva_base.edit --model DIR_OR_HUB_ID [--lora DIR] --video in.mp4 \\
        --instruction "make the sky night" [--reference img.png] --out out.mp4 \\
        [--steps 50 --guidance 2.0 --seed 0 --frames N --size WxH --device cuda --dtype bf16]

Defaults follow the paper (Appendix B): 50 steps, classifier-free guidance 2.0 on the instruction only.
Any container PyAV reads (mp4, webm, mov, mkv, gif), an image, or a folder of images is accepted, upright
as players show it (a phone's portrait clip included); the output has the input's frame count, size and fps,
its codec follows the extension (H.264 for .mp4), and it keeps the input's sound (``--no-audio`` drops it).
How a clip is adapted to the model (frames ``4k + 1``, sides multiple of 16, the config's max length
and side) is described in :mod:`viva_base.pipeline`.

A problem with the input (missing, empty, corrupt or zero-frame video; unreadable reference; empty
instruction; missing output folder or unsupported extension; unknown model directory or hub id while
offline; a LoRA that does not match the model) prints one line ``error: ...`` and exits with status 2,
leaving no output file. Cheap checks run before the (slow) model load. The web demo (:mod:`viva_base.app`)
runs the same checks (:func:`check_request`) and shows the same messages (:func:`explain`) in its page.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

logger = logging.getLogger("viva_base.edit")

EXIT_USER_ERROR = 2


def _size(text: str) -> tuple[int, int]:
    from .errors import UserError
    from .pipeline import parse_size

    try:
        return parse_size(text)
    except UserError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    from .cli_args import count, positive
    from .guidance import add_sampler_arguments

    p = argparse.ArgumentParser(prog="viva-edit", description="Edit a video with an instruction (VIVA).")
    p.add_argument("--model", required=True, help="editor directory (save_pretrained) or hub repo id")
    p.add_argument("--lora", help="LoRA folder (pytorch_lora_weights.safetensors) or hub repo id to load into the DiT")
    p.add_argument("--video", required=True, help="input video file, image, or folder of images")
    p.add_argument("--instruction", required=True, help="what to change, e.g. \"make the sky night\"")
    p.add_argument("--reference", help="optional reference image")
    p.add_argument("--out", required=True, help="output path (.mp4 .mov .mkv .webm .gif, or no extension: PNG folder)")
    p.add_argument("--no-audio", action="store_true",
                   help="write the edit without the input's sound (default: kept, in sync, where the output holds "
                        "sound: .mp4 .mov .mkv .webm)")
    p.add_argument("--num-steps", "--steps", dest="num_steps", type=count(1), default=50,
                   help="denoising steps (default 50; --steps is its old name)")
    p.add_argument("--guidance-scale", "--guidance", dest="guidance_scale", type=positive, default=2.0,
                   help="CFG scale on the instruction (default 2.0; 1 = off; --guidance is its old name)")
    add_sampler_arguments(p)
    p.add_argument("--seed", type=int, default=0, help="seed of the initial noise (same seed, same edit)")
    p.add_argument("--frames", type=count(1), help="frames the model edits (snapped to 4k+1); default: the input's, "
                   "capped by the model config")
    p.add_argument("--size", type=_size, help="WxH the model edits at (snapped to multiples of 16); default: the "
                   "input's, capped by the model config")
    add_runtime_arguments(p)
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p


def add_runtime_arguments(p: argparse.ArgumentParser) -> None:
    """--device, --dtype, --log-level: shared by the edit command and the web demo (viva_base.app)."""
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "fp32", "bf16", "bfloat16", "fp16", "float16"],
                   help="model weights dtype (default: bf16 on GPU, float32 on CPU)")
    p.add_argument("--log-level", default="INFO", help="logging level (default INFO)")


def check_request(video, instruction: str, reference=None):
    """The cheap checks of one edit, before any model work (the edit command and the web demo run the same
    ones): the instruction, the input clip (a path: probed, not decoded; an in-memory clip: nothing to probe)
    and the reference image. Each raises a UserError naming the problem; returns the clip's
    :class:`~viva_base.pipeline.ClipInfo` (``None`` for an in-memory clip)."""
    import os

    from .pipeline import check_instruction, probe_clip
    from .video import read_image

    check_instruction(instruction)
    info = probe_clip(video) if isinstance(video, (str, os.PathLike)) else None
    if reference is not None:
        read_image(reference)
    return info


def check_lora_dirs(loras) -> None:
    """Each LoRA is a local folder or a hub repo id (``owner/name``: resolved, from the cache or downloaded, when it
    loads); anything else is one line now, before the model loads."""
    from .errors import CheckpointError
    from .hub import hub_ids

    for lora in loras:
        if Path(lora).exists() and not Path(lora).is_dir():
            raise CheckpointError(f"{lora}: is a file; --lora takes the LoRA's folder "
                                  "(pytorch_lora_weights.safetensors)")
        if not Path(lora).is_dir() and not hub_ids(str(lora)):
            raise CheckpointError(f"{lora}: LoRA folder not found (and not a hub repo id, owner/name)")


def check_inputs(args) -> None:
    """The cheap checks, before the model loads: each raises a UserError naming the problem."""
    from .guidance import checked_sampler_arguments
    from .pipeline import check_output_path

    checked_sampler_arguments(args)
    info = check_request(args.video, args.instruction, args.reference)
    check_output_path(args.out, info.num_frames)
    check_lora_dirs([args.lora] if args.lora is not None else [])


def resolve_device(device: str | None, dtype: str = "auto"):
    """``--device`` / ``--dtype`` -> ``(torch.device, torch.dtype)``: cuda when available, bf16 on GPU and
    float32 on CPU for ``auto``; a UserError for a device that is not one or not here."""
    import torch

    from .errors import UserError
    from .training import DTYPES

    name = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {device!r} is not a device (cpu, cuda, cuda:0, ...)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU is available here; use --device cpu")
    dt = (torch.bfloat16 if dev.type == "cuda" else torch.float32) if dtype == "auto" else DTYPES[dtype]
    return dev, dt


def load_model(model: str, loras: dict | None = None, *, device, dtype):
    """Load the editor ``model`` on ``device`` in ``dtype`` and each LoRA of ``loras`` (adapter name -> folder)
    into its DiT. With several, the last one loaded is active; choose with ``transformer.set_adapters``."""
    from .peft_utils import load_lora
    from .training import load_editor

    loras = loras or {}
    check_lora_dirs(loras.values())
    logger.info("loading %s (%s, %s)", model, device, str(dtype).removeprefix("torch."))
    editor = load_editor(model, torch_dtype=dtype)
    editor.to(device=device, dtype=dtype)
    for name, path in loras.items():
        load_lora(editor.transformer, path, adapter_name=name)
        logger.info("loaded LoRA %s", path)
    return editor


def run(args) -> Path:
    from .peft_utils import ADAPTER
    from .pipeline import EditPipeline

    check_inputs(args)
    device, dtype = resolve_device(args.device, args.dtype)
    editor = load_model(args.model, {ADAPTER: args.lora} if args.lora else None, device=device, dtype=dtype)
    return EditPipeline(editor).edit_file(
        args.video, args.instruction, args.out, args.reference, num_inference_steps=args.num_steps,
        guidance_scale=args.guidance_scale, seed=args.seed, num_frames=args.frames, size=args.size,
        progress=not args.no_progress, guidance_interval=args.guidance_interval, shift=args.shift,
        audio=not args.no_audio)


def explain(exc: BaseException, smaller: str = "--size and/or --frames") -> str | None:
    """The one-line message for an error the user can act on (a UserError, running out of memory), or
    None for a bug. ``smaller`` names the knobs that shrink the clip where the message is shown."""
    from .errors import UserError

    if isinstance(exc, UserError):
        return str(exc)
    if isinstance(exc, MemoryError):
        return f"out of memory; edit a smaller clip with {smaller}"
    import torch

    if isinstance(exc, torch.OutOfMemoryError):
        return f"out of GPU memory; edit a smaller clip with {smaller}, or use --dtype bf16"
    return None


def guarded(fn, *args, interrupted: str | None = "interrupted; no output written"):
    """``fn(*args)`` for a command's ``main``: ``(0, its result)``, or, after one line ``error: ...`` on stderr,
    ``(2, None)`` for an error the user can act on (:func:`explain`) and ``(130, None)`` for Ctrl-C (the line
    is ``interrupted``; ``None``: no line). A bug propagates with its traceback."""
    try:
        return 0, fn(*args)
    except KeyboardInterrupt:
        if interrupted:
            print(f"error: {interrupted}", file=sys.stderr)
        return 130, None
    except Exception as exc:
        message = explain(exc)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return EXIT_USER_ERROR, None


def main(argv: list[str] | None = None) -> int:
    """Run the command; returns the exit status (0 ok, 2 user error, 130 interrupted)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse already printed usage + the problem
        return int(exc.code or 0)
    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.INFO),
                        format="%(levelname)s: %(message)s")
    from .recipe import warn_deprecated_flags

    warn_deprecated_flags(sys.argv[1:] if argv is None else argv, ("--steps", "--guidance"))

    code, out = guarded(run, args)
    if code:
        return code
    from .video import has_audio, probe_video

    n, h, w, fps = probe_video(out)
    sound = ", with the input's sound" if has_audio(out) else ""
    print(f"wrote {out} ({n} frames, {w}x{h}, {fps:g} fps{sound})")
    return 0


def cli() -> None:
    """The ``viva-edit`` console script: :func:`main`, ended as every ``python -m`` command is
    (:func:`viva_base.errors.exit_with`: a reader of the output that stops early ends it quietly)."""
    from viva_base.errors import exit_with

    exit_with(main)


if __name__ == "__main__":
    cli()
