"""Edit a video file with an instruction: ``viva-edit`` / ``python -m viva_base.edit``.

::

    python -m viva_base.edit --model DIR_OR_HUB_ID [--lora DIR] --video in.mp4 \\
        --instruction "make the sky night" [--reference img.png] --out out.mp4 \\
        [--steps 50 --guidance 2.0 --seed 0 --frames N --size WxH --device cuda --dtype bf16]

Defaults follow the paper (Appendix B): 50 steps, classifier-free guidance 2.0 on the instruction only.
Any container PyAV reads (mp4, webm, mov, mkv, gif), an image, or a folder of images is accepted; the
output has the input's frame count, size and fps, and its codec follows the extension (H.264 for .mp4).
How a clip is adapted to the model (frames ``4k + 1``, sides multiple of 16, the config's max length
and side) is described in :mod:`viva_base.pipeline`.

A problem with the input (missing, empty, corrupt or zero-frame video; unreadable reference; empty
instruction; missing output folder or unsupported extension; unknown model directory or hub id while
offline; a LoRA that does not match the model) prints one line ``error: ...`` and exits with status 2,
leaving no output file. Cheap checks run before the (slow) model load.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

logger = logging.getLogger("viva_base.edit")

EXIT_USER_ERROR = 2


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def _size(text: str) -> tuple[int, int]:
    from .errors import UserError
    from .pipeline import parse_size

    try:
        return parse_size(text)
    except UserError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="viva-edit", description="Edit a video with an instruction (VIVA).")
    p.add_argument("--model", required=True, help="editor directory (save_pretrained) or hub repo id")
    p.add_argument("--lora", help="LoRA directory (pytorch_lora_weights.safetensors) to load into the DiT")
    p.add_argument("--video", required=True, help="input video file, image, or folder of images")
    p.add_argument("--instruction", required=True, help="what to change, e.g. \"make the sky night\"")
    p.add_argument("--reference", help="optional reference image")
    p.add_argument("--out", required=True, help="output path (.mp4 .mov .mkv .webm .gif, or no extension: PNG folder)")
    p.add_argument("--num-steps", "--steps", dest="num_steps", type=_positive_int, default=50,
                   help="denoising steps (default 50; --steps is its old name)")
    p.add_argument("--guidance-scale", "--guidance", dest="guidance_scale", type=float, default=2.0,
                   help="CFG scale on the instruction (default 2.0; 1 = off; --guidance is its old name)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial noise (same seed, same edit)")
    p.add_argument("--frames", type=_positive_int, help="frames the model edits (snapped to 4k+1); default: the input's, "
                   "capped by the model config")
    p.add_argument("--size", type=_size, help="WxH the model edits at (snapped to multiples of 16); default: the "
                   "input's, capped by the model config")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "fp32", "bf16", "bfloat16", "fp16", "float16"],
                   help="model weights dtype (default: bf16 on GPU, float32 on CPU)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    return p


def check_inputs(args) -> None:
    """The cheap checks, before the model loads: each raises a UserError naming the problem."""
    from .errors import CheckpointError
    from .pipeline import check_instruction, check_output_path, probe_clip
    from .video import read_image

    check_instruction(args.instruction)
    info = probe_clip(args.video)
    check_output_path(args.out, info.num_frames)
    if args.reference is not None:
        read_image(args.reference)
    if args.lora is not None and not Path(args.lora).is_dir():
        raise CheckpointError(f"{args.lora}: LoRA folder not found")


def run(args) -> Path:
    import torch

    from .errors import UserError
    from .peft_utils import load_lora
    from .pipeline import EditPipeline
    from .training import DTYPES, load_editor

    check_inputs(args)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except RuntimeError:
        raise UserError(f"--device {args.device!r} is not a device (cpu, cuda, cuda:0, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU is available here; use --device cpu")
    dtype = (torch.bfloat16 if device.type == "cuda" else torch.float32) if args.dtype == "auto" else DTYPES[args.dtype]

    logger.info("loading %s (%s, %s)", args.model, device, str(dtype).removeprefix("torch."))
    editor = load_editor(args.model, torch_dtype=dtype)
    editor.to(device=device, dtype=dtype)
    if args.lora:
        load_lora(editor.transformer, args.lora)
        logger.info("loaded LoRA %s", args.lora)
    return EditPipeline(editor).edit_file(
        args.video, args.instruction, args.out, args.reference, num_inference_steps=args.num_steps,
        guidance_scale=args.guidance_scale, seed=args.seed, num_frames=args.frames, size=args.size,
        progress=not args.no_progress)


def main(argv: list[str] | None = None) -> int:
    """Run the command; returns the exit status (0 ok, 2 user error, 130 interrupted)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse already printed usage + the problem
        return int(exc.code or 0)
    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.INFO),
                        format="%(levelname)s: %(message)s")
    from .errors import UserError
    from .recipe import warn_deprecated_flags

    warn_deprecated_flags(sys.argv[1:] if argv is None else argv, ("--steps", "--guidance"))

    try:
        out = run(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("error: interrupted; no output written", file=sys.stderr)
        return 130
    except MemoryError:
        print("error: out of memory; edit a smaller clip with --size and/or --frames", file=sys.stderr)
        return EXIT_USER_ERROR
    except Exception as exc:
        import torch

        if isinstance(exc, torch.OutOfMemoryError):
            print("error: out of GPU memory; edit a smaller clip with --size and/or --frames, or use --dtype bf16",
                  file=sys.stderr)
            return EXIT_USER_ERROR
        raise
    from .video import probe_video

    n, h, w, fps = probe_video(out)
    print(f"wrote {out} ({n} frames, {w}x{h}, {fps:g} fps)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
