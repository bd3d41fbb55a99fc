"""argparse ``type=`` checks for the numeric options of the commands (edit, app, diagnose, toy_preference,
VIE-Bench): a value out of range is argparse's own error naming the option (``error: argument --num-steps: 0 must be
at least 1``, exit code 2), before any model or data loads, instead of a traceback after them or a silent misuse."""
from __future__ import annotations

import argparse
import math


def _number(text: str, kind: type):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def count(minimum: int = 1):
    """An integer ``>= minimum`` (steps, sizes, items: 1; counts where 0 means "none" or "all": 0)."""
    def parse(text: str) -> int:
        value = _number(text, int)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} must be at least {minimum}")
        return value

    parse.__name__ = f"integer >= {minimum}"  # argparse names the type in some messages
    return parse


def positive(text: str) -> float:
    """A finite number ``> 0`` (a guidance scale: 1 is no CFG; a learning rate; a noise level's eta)."""
    value = _number(text, float)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{value:g} must be > 0")
    return value


def nonnegative(text: str) -> float:
    """A finite number ``>= 0`` (a margin, a weight decay, seconds)."""
    value = _number(text, float)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value:g} must be >= 0")
    return value


def noise_level(text: str) -> float:
    """A flow noise level sigma in ``(0, 1]`` (1 is pure noise; at 0 there is nothing to denoise)."""
    value = _number(text, float)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{value:g} is not a noise level in (0, 1]")
    return value


def clip_frames(text: str) -> int:
    """A frame count a causal video VAE with temporal ratio 4 encodes whole: ``4k + 1`` (1, 5, 9, ..., 33)."""
    value = _number(text, int)
    if value < 1 or (value - 1) % 4:
        raise argparse.ArgumentTypeError(f"{value}: use 4k + 1 frames (1, 5, 9, 13, ..., 33)")
    return value


def side(text: str) -> int:
    """A frame side in pixels the VAE (8x) and the DiT's 2 x 2 patches divide: a multiple of 16."""
    value = _number(text, int)
    if value < 16 or value % 16:
        raise argparse.ArgumentTypeError(f"{value}: use a multiple of 16 pixels (e.g. 480, 848)")
    return value
