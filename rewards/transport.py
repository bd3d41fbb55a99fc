"""The wire format of the reward server (``rewards.serve``) and its client (``rewards.remote``).

One scoring request is one binary body::

    4 bytes   big-endian length N of the header
    N bytes   the header, UTF-8 JSON: reward name, batch size, texts, group ids, and one entry per array
              {"name", "dtype", "shape", "offset", "nbytes"} (offsets into the payload)
    payload   the arrays' raw bytes, C order, little-endian, back to back

The videos travel as raw arrays in the ``frames`` dtype the client picks:

* ``float32`` (default): exact, 4 bytes per pixel value; the server scores the very tensors the trainer
  decoded, so a remote reward returns the in-process numbers;
* ``float16``: 2 bytes, rounding error below 2.5e-4 on [0, 1];
* ``uint8``: 1 byte, ``round(255 x)``; the error is up to 1/510 (what saving the video as PNG frames costs).

A ``(F, 3, H, W)`` video is ``F * 3 * H * W`` values; a sample carries its edited and its source video
(and its reference image, if any). JSON answers carry the scores (``null`` for NaN) and the details.
No compression: decoded video frames are noise-like floats, and the raw copy is the cheapest encoding
(``tests/test_reward_server.py`` measures bytes per sample and the encode / decode cost).
"""
from __future__ import annotations

import json
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

__all__ = ["FRAME_DTYPES", "ScoreRequest", "TransportError", "decode_request", "encode_request", "from_json_safe",
           "to_json_safe"]

FRAME_DTYPES = ("float32", "float16", "uint8")
_HEADER = struct.Struct(">I")
_MAX_HEADER = 64 * 2**20
_TEXT_KEYS = ("source_captions", "target_captions", "instructions")


class TransportError(ValueError):
    """A request body that does not follow the wire format (the message says what is wrong)."""


@dataclass
class ScoreRequest:
    """A decoded scoring request: what :meth:`rewards.base.Reward.__call__` takes, plus the reward's name."""

    reward: str
    edited: torch.Tensor
    source: torch.Tensor
    source_captions: list[str]
    target_captions: list[str]
    instructions: list[str]
    references: list[torch.Tensor | None] | None = None
    groups: list[int] | None = None

    @property
    def batch(self) -> int:
        return int(self.edited.shape[0])

    def kwargs(self) -> dict[str, Any]:
        """The keyword arguments of a reward call (texts, references, groups)."""
        return {"source_captions": self.source_captions, "target_captions": self.target_captions,
                "instructions": self.instructions, "references": self.references, "groups": self.groups}


def quantize(x: torch.Tensor, dtype: str) -> np.ndarray:
    """``[0, 1]`` floats to the wire dtype: float32 / float16 as they are, uint8 as ``round(255 x)``."""
    x = x.detach().to("cpu", torch.float32)
    if dtype == "uint8":
        return x.clamp(0, 1).mul(255).round().to(torch.uint8).numpy()
    if dtype in ("float32", "float16"):
        return x.numpy().astype(dtype, copy=False)
    raise TransportError(f"frames dtype must be one of {', '.join(FRAME_DTYPES)}, got {dtype!r}")


def dequantize(a: np.ndarray) -> torch.Tensor:
    """The inverse of :func:`quantize`: float32 ``[0, 1]`` (uint8 divided by 255)."""
    t = torch.from_numpy(a.copy())
    return t.float().div_(255) if a.dtype == np.uint8 else t.float()


def encode_request(reward: str, edited: torch.Tensor, source: torch.Tensor, *, source_captions: Sequence[str],
                   target_captions: Sequence[str], instructions: Sequence[str],
                   references: Sequence[torch.Tensor | None] | None = None, groups: Sequence[int] | None = None,
                   frames: str = "float32") -> bytes:
    """One scoring request as bytes (see the module doc); ``frames`` is the videos' wire dtype."""
    arrays: list[tuple[str, np.ndarray]] = [("edited", quantize(edited, frames)), ("source", quantize(source, frames))]
    refs = None
    if references is not None:
        refs = []
        for i, r in enumerate(references):
            if r is None:
                refs.append(None)
            else:
                refs.append(len(arrays))
                arrays.append((f"reference{i}", quantize(r, frames)))
    entries, offset = [], 0
    for name, a in arrays:
        a = np.ascontiguousarray(a)
        entries.append({"name": name, "dtype": a.dtype.str, "shape": list(a.shape), "offset": offset,
                        "nbytes": a.nbytes})
        offset += a.nbytes
    header = {"reward": reward, "batch": int(edited.shape[0]), "arrays": entries, "references": refs,
              "groups": [int(g) for g in groups] if groups is not None else None,
              **{k: list(v) for k, v in zip(_TEXT_KEYS, (source_captions, target_captions, instructions))}}
    head = json.dumps(header, separators=(",", ":")).encode("utf-8")
    return b"".join([_HEADER.pack(len(head)), head, *(np.ascontiguousarray(a).tobytes() for _, a in arrays)])


_WIRE_DTYPES = {np.dtype(d).str: np.dtype(d) for d in FRAME_DTYPES}


def _array(entry: Any, payload: memoryview) -> np.ndarray:
    if not isinstance(entry, dict) or not {"dtype", "shape", "offset", "nbytes"} <= set(entry):
        raise TransportError("an array entry needs dtype, shape, offset and nbytes")
    dtype = _WIRE_DTYPES.get(entry["dtype"])
    if dtype is None:
        raise TransportError(f"array dtype {entry['dtype']!r} is not one of {', '.join(FRAME_DTYPES)}")
    shape = entry["shape"]
    if not isinstance(shape, list) or not all(isinstance(s, int) and s >= 0 for s in shape):
        raise TransportError(f"bad array shape {shape!r}")
    offset, nbytes = entry["offset"], entry["nbytes"]
    if nbytes != math.prod(shape) * dtype.itemsize or offset < 0 or offset + nbytes > len(payload):
        raise TransportError(f"array {entry.get('name')!r}: {nbytes} bytes at {offset} do not fit its shape "
                             f"{shape} or the body ({len(payload)} payload bytes)")
    return np.frombuffer(payload[offset:offset + nbytes], dtype=dtype).reshape(shape)


def decode_request(body: bytes) -> ScoreRequest:
    """Parse a body written by :func:`encode_request`; raises :class:`TransportError` on anything malformed."""
    if len(body) < _HEADER.size:
        raise TransportError("the body is shorter than its 4-byte header length")
    (n,) = _HEADER.unpack_from(body)
    if n > min(_MAX_HEADER, len(body) - _HEADER.size):
        raise TransportError(f"header length {n} does not fit the {len(body)}-byte body")
    try:
        header = json.loads(bytes(body[_HEADER.size:_HEADER.size + n]).decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise TransportError(f"the header is not UTF-8 JSON: {e}") from None
    if not isinstance(header, dict) or not isinstance(header.get("reward"), str) or not isinstance(header.get("arrays"), list):
        raise TransportError("the header must be an object with reward (a string) and arrays (a list)")
    payload = memoryview(body)[_HEADER.size + n:]
    arrays = [_array(e, payload) for e in header["arrays"]]
    if len(arrays) < 2:
        raise TransportError("a request carries at least the edited and the source videos")
    batch = header.get("batch")
    texts = {k: header.get(k) for k in _TEXT_KEYS}
    for k, v in texts.items():
        if not isinstance(v, list) or len(v) != batch or not all(isinstance(t, str) for t in v):
            raise TransportError(f"{k} must be a list of {batch} strings")
    refs = header.get("references")
    references = None
    if refs is not None:
        if not isinstance(refs, list) or len(refs) != batch:
            raise TransportError(f"references must be null or a list of {batch} items")
        references = []
        for r in refs:
            if r is not None and not (isinstance(r, int) and 2 <= r < len(arrays)):
                raise TransportError(f"reference index {r!r} names no array")
            references.append(None if r is None else dequantize(arrays[r]))
    groups = header.get("groups")
    if groups is not None and (not isinstance(groups, list) or len(groups) != batch
                               or not all(isinstance(g, int) for g in groups)):
        raise TransportError(f"groups must be null or a list of {batch} integers")
    edited, source = dequantize(arrays[0]), dequantize(arrays[1])
    if edited.ndim != 5 or source.ndim != 5 or edited.shape[0] != batch or source.shape[0] != batch:
        raise TransportError(f"edited and source must be (B, F, 3, H, W) with B = {batch}, got "
                             f"{tuple(edited.shape)} and {tuple(source.shape)}")
    return ScoreRequest(header["reward"], edited, source, texts["source_captions"], texts["target_captions"],
                        texts["instructions"], references, groups)


def to_json_safe(value: Any) -> Any:
    """``value`` with every non-finite float replaced by ``None`` (JSON has no NaN), recursively."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): to_json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json_safe(v) for v in value]
    if isinstance(value, torch.Tensor):
        return to_json_safe(value.tolist())
    if isinstance(value, np.generic):
        return to_json_safe(value.item())
    return value


def from_json_safe(scores: Any, batch: int) -> torch.Tensor:
    """A JSON list of ``batch`` numbers or ``null`` as a float32 tensor (``null`` -> NaN); raises ``ValueError``."""
    if not isinstance(scores, list) or len(scores) != batch:
        raise ValueError(f"expected a list of {batch} scores, got {type(scores).__name__}"
                         f"{f' of {len(scores)}' if isinstance(scores, list) else ''}")
    out = []
    for s in scores:
        if s is None:
            out.append(float("nan"))
        elif isinstance(s, (int, float)) and not isinstance(s, bool):
            out.append(float(s))
        else:
            raise ValueError(f"a score must be a number or null, got {s!r}")
    return torch.tensor(out, dtype=torch.float32)
