"""Video and image I/O with PyAV and Pillow.

Conventions (docs/architecture.md): a pixel video is a float32 tensor ``(F, 3, H, W)`` in ``[0, 1]``;
batches add a leading ``B``.

Readable inputs: any container/codec PyAV decodes (mp4, webm, mov, mkv, gif, ...), a single image
file (a 1-frame video), or a folder of images (an image sequence, sorted by name).
Writable outputs, chosen by the extension of the path:

=========  ==========================================  =========
extension  codec                                       lossless
=========  ==========================================  =========
.mp4 .mov  H.264 (yuv420p, yuv444p for odd sizes)      no
.mkv       FFV1 (RGB)                                   yes
.webm      VP9                                          no
.gif       GIF (palette)                                no
.png ...   one image (1-frame videos only)              yes
(folder)   PNG image sequence ``00000.png``...         yes
=========  ==========================================  =========

Frames are read as players show them: a video's display matrix (phones store portrait clips as landscape
frames plus a quarter turn, front cameras add a mirror) and an image's EXIF orientation are applied, and a video's
colour tags (BT.601 / BT.709 matrix, limited or full range) choose the YUV -> RGB conversion (PyAV >= 17; older
versions converted BT.709 video with the BT.601 matrix: green (32, 224, 64) read as (46, 253, 67)). Written H.264 and
VP9 carry their colour tags: BT.709 for HD frames (at least 1280 wide or taller than 576 lines, where players assume
BT.709 for untagged video), BT.601 below, limited range.

Every write is atomic: the file is written under a temporary name in the same folder and renamed.
Every user-caused failure raises :class:`VideoError` with one line naming the file and the problem.
"""
from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .atomic import atomic_dir
from .errors import UserError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"}
VIDEO_EXTENSIONS = (".mp4", ".mov", ".m4v", ".mkv", ".webm", ".gif")
DEFAULT_IMAGE_FPS = 8.0


class VideoError(UserError, ValueError):
    """A video or image that cannot be read or written; the message names the path and the fix."""


@dataclass
class Video:
    frames: torch.Tensor  # (F, 3, H, W) float32 in [0, 1]
    fps: float

    @property
    def num_frames(self) -> int:
        return int(self.frames.shape[0])

    @property
    def size(self) -> tuple[int, int]:
        """(height, width)."""
        return int(self.frames.shape[-2]), int(self.frames.shape[-1])


def _to_tensor(arrays: list[np.ndarray]) -> torch.Tensor:
    stacked = np.stack(arrays).astype(np.float32) / 255.0  # F, H, W, 3
    return torch.from_numpy(stacked).permute(0, 3, 1, 2).contiguous()


class _Uint8Frames:
    """``(H, W, 3)`` uint8 arrays, one at a time, of ``(F, 3, H, W)`` frames in [0, 1]: a tensor, or any sequence of
    ``(3, H, W)`` frames (``len`` and indexing), such as :class:`viva_base.pipeline.MappedBack`, which makes each
    on demand, so a long clip is written without ever being held whole."""

    def __init__(self, frames):
        if torch.is_tensor(frames) and (frames.ndim != 4 or frames.shape[1] != 3):
            raise VideoError(f"expected frames of shape (F, 3, H, W), got {tuple(frames.shape)}")
        self.frames = frames
        first = frames[0] if len(frames) else None
        if first is None or first.ndim != 3 or first.shape[0] != 3:
            raise VideoError(f"expected (3, H, W) frames, got {len(frames)} frames"
                             + (f" of shape {tuple(first.shape)}" if first is not None else ""))
        self.height, self.width = int(first.shape[1]), int(first.shape[2])

    def __len__(self) -> int:
        return len(self.frames)

    def __getitem__(self, i: int) -> np.ndarray:
        frame = self.frames[i]
        if tuple(frame.shape) != (3, self.height, self.width):
            raise VideoError(f"frame {i} has shape {tuple(frame.shape)}, frame 0 (3, {self.height}, {self.width})")
        return frame.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()

    def __iter__(self):
        return (self[i] for i in range(len(self)))


def _fit(img: Image.Image, max_side: int | None) -> Image.Image:
    if max_side is None or max(img.size) <= max_side:
        return img
    scale = max_side / max(img.size)
    new = (max(1, round(img.size[0] * scale)), max(1, round(img.size[1] * scale)))
    return img.resize(new, Image.BICUBIC)


def read_image(path: str | os.PathLike, *, max_side: int | None = None) -> torch.Tensor:
    """Read one image as ``(3, H, W)`` float32 in [0, 1]; :class:`VideoError` if it is not an image."""
    path = Path(path)
    if not path.is_file():
        raise VideoError(f"{path}: image not found")
    try:
        with Image.open(path) as img:
            img = _fit(ImageOps.exif_transpose(img).convert("RGB"), max_side)
            return _to_tensor([np.asarray(img)])[0]
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise VideoError(f"{path}: not a readable image ({exc.__class__.__name__})") from None


def display_matrix(frame) -> tuple[int, int, int, int] | None:
    """The linear part ``(a, b, c, d)`` of a decoded frame's display matrix (FFmpeg's
    ``AV_FRAME_DATA_DISPLAYMATRIX``, the ISO/IEC 14496-12 ``tkhd`` matrix: 16.16 fixed point, native byte
    order), or None when the frame has none."""
    for sd in frame.side_data:
        if "DISPLAYMATRIX" in getattr(sd.type, "name", str(sd.type)):
            m = np.frombuffer(bytes(sd), dtype=np.int32)
            return int(m[0]), int(m[1]), int(m[3]), int(m[4])
    return None


def upright_transposes(matrix: tuple[int, int, int, int] | None) -> list:
    """The Pillow transposes that show a coded frame as its display matrix says.

    The matrix maps the coded pixel ``(x, y)`` to ``(a x + c y, b x + d y)`` (libavutil/display.h). For the eight
    quarter turns and mirrors each of ``a, b, c, d`` is 0 or +-1: with ``a = d = 0`` the axes swap (a transpose),
    then a negative entry mirrors that output axis. ``av_display_rotation_set(90)`` (a quarter turn counter-clockwise,
    ffmpeg's ``transpose=cclock``) is ``(0, -1, 1, 0)``: transpose, then flip top to bottom. Any other angle is left
    as coded, with a warning (ffmpeg's CLI rotates those by interpolation)."""
    if matrix is None:
        return []
    a, b, c, d = (0 if abs(v) < 1 << 15 else (1 if v > 0 else -1) for v in matrix)
    if a == d == 0 and b and c:
        return [Image.Transpose.TRANSPOSE, *([Image.Transpose.FLIP_TOP_BOTTOM] if b < 0 else []),
                *([Image.Transpose.FLIP_LEFT_RIGHT] if c < 0 else [])]
    if b == c == 0 and a and d:
        return [*([Image.Transpose.FLIP_LEFT_RIGHT] if a < 0 else []),
                *([Image.Transpose.FLIP_TOP_BOTTOM] if d < 0 else [])]
    logger.warning("display matrix %s is not a quarter turn or a mirror: frames are read as coded", matrix)
    return []


# AVColorTransferCharacteristic of HDR video: SMPTE ST 2084 (PQ, HDR10 / Dolby Vision) and ARIB STD-B67 (HLG,
# what phones record as "HDR")
HDR_TRANSFERS = {16: "PQ (SMPTE ST 2084)", 18: "HLG (ARIB STD-B67)"}


def _warn_if_hdr(path: Path, frame) -> None:
    trc = getattr(frame, "color_trc", None)
    if trc in HDR_TRANSFERS:
        logger.warning("%s: HDR video (%s) is read as 8-bit SDR without tone mapping, so its colours look flat; "
                       "for a faithful edit convert it to SDR first (e.g. ffmpeg's zscale and tonemap filters)",
                       path, HDR_TRANSFERS[trc])


def _upright_image(frame, transposes: list, max_side: int | None) -> Image.Image:
    img = _fit(frame.to_image(), max_side)  # to RGB by the frame's colour tags (PyAV >= 17)
    for t in transposes:
        img = img.transpose(t)
    return img


MP4_FAMILY = (".mp4", ".mov", ".m4v", ".3gp")


def mp4_display_matrix(path: str | os.PathLike) -> tuple[int, int, int, int] | None:
    """The linear part ``(a, b, c, d)`` of an MP4/MOV file's display matrix, read from its boxes without decoding:
    the video track's ``tkhd`` matrix times the movie's ``mvhd`` matrix (ISO/IEC 14496-12 8.3.2, 8.2.2; what
    FFmpeg's demuxer attaches to the decoded frames). None when the file cannot be parsed (the caller then
    decodes a frame). Reading it this way keeps :func:`probe_video` at the container's cost: decoding the first
    frame took 5.6 ms more per 480 x 848 clip, 9 minutes more for a 100k-pair manifest."""
    import struct

    def boxes(f, start: int, end: int):
        pos = start
        while pos + 8 <= end:
            f.seek(pos)
            size, kind = struct.unpack(">I4s", f.read(8))
            head = 8
            if size == 1:
                size, head = struct.unpack(">Q", f.read(8))[0], 16
            elif size == 0:
                size = end - pos
            if size < head:
                return
            yield kind, pos + head, pos + size
            pos += size

    def matrix(f, start: int, offsets: tuple[int, int]) -> tuple[float, float, float, float]:
        f.seek(start)
        version = f.read(1)[0]
        f.seek(start + offsets[version == 1])
        a, b, _, c, d = struct.unpack(">5i", f.read(20))
        return a / 65536, b / 65536, c / 65536, d / 65536

    try:
        with open(path, "rb") as f:
            end = f.seek(0, os.SEEK_END)
            moov = next(((s, e) for k, s, e in boxes(f, 0, end) if k == b"moov"), None)
            if moov is None:
                return None
            movie, track = (1.0, 0.0, 0.0, 1.0), None
            for kind, s, e in boxes(f, *moov):
                if kind == b"mvhd":
                    movie = matrix(f, s, (36, 48))
                elif kind == b"trak" and track is None:
                    inner = {k: (ks, ke) for k, ks, ke in boxes(f, s, e)}
                    mdia = {k: (ks, ke) for k, ks, ke in boxes(f, *inner[b"mdia"])} if b"mdia" in inner else {}
                    if b"hdlr" in mdia and b"tkhd" in inner:
                        f.seek(mdia[b"hdlr"][0] + 8)
                        if f.read(4) == b"vide":
                            track = matrix(f, inner[b"tkhd"][0], (40, 52))
            if track is None:
                return None
    except (OSError, struct.error, IndexError, StopIteration):
        return None
    (ta, tb, tc, td), (ma, mb, mc, md) = track, movie
    return tuple(round(v * 65536) for v in (ta * ma + tb * mc, ta * mb + tb * md, tc * ma + td * mc, tc * mb + td * md))


def probe_video(path: str | os.PathLike) -> tuple[int, int, int, float]:
    """``(num_frames, height, width, fps)`` without decoding the whole video where the container says."""
    path = Path(path)
    if path.is_dir() or path.suffix.lower() in IMAGE_EXTENSIONS:
        v = read_video(path)
        return v.num_frames, *v.size, v.fps
    import av

    _check_file(path)
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise VideoError(f"{path}: has no video stream")
            stream = container.streams.video[0]
            fps = float(stream.average_rate or stream.guessed_rate or DEFAULT_IMAGE_FPS)
            matrix = mp4_display_matrix(path) if path.suffix.lower() in MP4_FAMILY else None
            decoded = container.decode(stream)
            first = None
            if matrix is None or not stream.frames:  # the display matrix of another container: its first frame's
                first = next(decoded, None)
                matrix = display_matrix(first) if first is not None else None
            n = stream.frames or (first is not None) + sum(1 for _ in decoded)
            h, w = int(stream.height), int(stream.width)
            if Image.Transpose.TRANSPOSE in upright_transposes(matrix):  # shown with height and width swapped
                h, w = w, h
            return int(n), h, w, fps
    except av.error.FFmpegError as exc:
        raise VideoError(f"{path}: not a readable video ({exc.__class__.__name__})") from None


def _check_file(path: Path) -> None:
    if not path.exists():
        raise VideoError(f"{path}: video not found")
    if path.is_file() and path.stat().st_size == 0:
        raise VideoError(f"{path}: file is empty")


def read_video(
    path: str | os.PathLike,
    *,
    max_frames: int | None = None,
    max_side: int | None = None,
    frame_step: int = 1,
) -> Video:
    """Decode a video, an image (1 frame) or a folder of images.

    Args:
        max_frames: stop decoding after this many (kept) frames: long inputs are never decoded whole.
        max_side: frames whose longer side exceeds this are resized down while decoding.
        frame_step: keep every ``frame_step``-th frame (fps is divided accordingly).
    """
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        files = files[::frame_step][:max_frames] if max_frames else files[::frame_step]
        if not files:
            raise VideoError(f"{path}: folder holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
        frames = [read_image(f, max_side=max_side) for f in files]
        if len({tuple(f.shape) for f in frames}) != 1:
            raise VideoError(f"{path}: images of the sequence differ in size")
        return Video(torch.stack(frames), DEFAULT_IMAGE_FPS / frame_step)
    _check_file(path)
    if path.suffix.lower() in IMAGE_EXTENSIONS:
        return Video(read_image(path, max_side=max_side)[None], DEFAULT_IMAGE_FPS)

    import av

    arrays: list[np.ndarray] = []
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise VideoError(f"{path}: has no video stream")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            fps = float(stream.average_rate or stream.guessed_rate or DEFAULT_IMAGE_FPS)
            transposes = None
            for i, frame in enumerate(container.decode(stream)):
                if transposes is None:  # the stream's orientation, from its first frame
                    transposes = upright_transposes(display_matrix(frame))
                    _warn_if_hdr(path, frame)
                if i % frame_step:
                    continue
                img = _upright_image(frame, transposes, max_side)
                arrays.append(np.asarray(img.convert("RGB")))
                if max_frames and len(arrays) >= max_frames:
                    break
    except av.error.FFmpegError as exc:
        raise VideoError(f"{path}: not a readable video ({exc.__class__.__name__}: {exc})") from None
    if not arrays:
        raise VideoError(f"{path}: video has no frames")
    return Video(_to_tensor(arrays), fps / frame_step)


def _atomic_target(path: Path) -> Path:
    if not path.parent.exists():
        raise VideoError(f"{path}: output folder {path.parent} does not exist; create it first")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    return Path(tmp)


def frame_times(path: str | os.PathLike) -> list[float] | None:
    """The presentation time of every frame of a video file, in seconds from its first frame, read from the
    packets (no decoding); None for an image, a folder, or a file whose packets do not all carry a time."""
    path = Path(path)
    if not path.is_file() or path.suffix.lower() in IMAGE_EXTENSIONS:
        return None
    import av

    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            time_base = Fraction(stream.time_base)  # read while the container is open (after, it is freed memory)
            pts = [p.pts for p in container.demux(stream) if p.size]
    except (av.error.FFmpegError, IndexError):
        return None
    if not pts or any(t is None for t in pts):
        return None
    pts.sort()
    return [float((t - pts[0]) * time_base) for t in pts]


def variable_rate_times(times: list[float] | None, fps: float, num_frames: int) -> list[float] | None:
    """``times`` when they are those of a variable-frame-rate clip of ``num_frames`` frames (a frame more than half a
    frame away from ``i / fps``: phones drop frames in low light), else None (constant rate: written as such)."""
    if not times or len(times) != num_frames or fps <= 0:
        return None
    return times if max(abs(t - i / fps) for i, t in enumerate(times)) > 0.5 / fps else None


def write_video(path: str | os.PathLike, frames, fps: float = DEFAULT_IMAGE_FPS, *,
                audio: str | os.PathLike | None = None, times: Sequence[float] | None = None) -> Path:
    """Write ``(F, 3, H, W)`` frames in [0, 1] to ``path`` atomically; the codec follows the extension.

    ``frames``: a tensor, or a sequence of ``(3, H, W)`` frames that makes each when indexed (the edit writes
    :class:`viva_base.pipeline.MappedBack`): video files and folders are written one frame at a time.

    ``audio``: a video file whose first audio stream goes into the output with the frames (its packets as they
    are where the container takes the codec, else re-encoded: :data:`AUDIO_COPY`, :data:`AUDIO_ENCODER`), timed
    from that file's first video frame, so an edit of it keeps its sound in sync. A file without sound adds none;
    an output that holds no sound (.gif, images) or a sound that cannot be read drops it with a warning.

    ``times``: each frame's presentation time in seconds (a variable frame rate, :func:`variable_rate_times`), for
    .mp4/.mov/.mkv/.webm; ``fps`` is then only the nominal rate. Without it, frame ``i`` is shown at ``i / fps``."""
    path = Path(path)
    data = _Uint8Frames(frames)
    if times is not None and len(times) != len(data):
        raise VideoError(f"{path}: {len(times)} frame times for {len(data)} frames")
    ext = path.suffix.lower()
    if ext and ext not in IMAGE_EXTENSIONS and ext not in VIDEO_EXTENSIONS:
        raise VideoError(f"{path}: unsupported output extension {ext!r} (use {', '.join(VIDEO_EXTENSIONS)}, "
                         ".png or a folder)")
    sound = Path(audio) if audio is not None and has_audio(audio) else None  # the source's, if it has any
    if sound is not None and ext not in AUDIO_ENCODER:
        logger.warning("%s: a %s output holds no sound; the sound of %s is dropped (write .mp4, .mov, .mkv or "
                       ".webm to keep it)", path, ext or "folder", sound)
    if ext == "":
        return _write_folder(path, data)
    if ext in IMAGE_EXTENSIONS:
        if len(data) != 1:
            raise VideoError(f"{path}: an image file holds one frame, got {len(data)}; use .mp4/.mkv or a folder")
        tmp = _atomic_target(path)
        try:
            Image.fromarray(data[0]).save(tmp, format=Image.registered_extensions()[ext])
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return path
    tmp = _atomic_target(path)
    try:
        if ext == ".gif":  # Pillow builds the palette (libswscale cannot convert rgb24 -> pal8)
            frames_pil = [Image.fromarray(a) for a in data]
            frames_pil[0].save(tmp, format="GIF", save_all=True, append_images=frames_pil[1:],
                               duration=max(1, round(1000 / fps)), loop=0, optimize=False)
        else:
            try:
                _encode(tmp, data, fps, ext, sound, times)
            except _AudioError as exc:
                logger.warning("%s: the sound of %s cannot be carried over (%s); written without sound",
                               path, audio, exc)
                _encode(tmp, data, fps, ext, None, times)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


# Output extension -> the audio codecs its muxer takes as they are; any other is re-encoded to AUDIO_ENCODER's.
_MP4_AUDIO = frozenset({"aac", "mp3", "alac", "ac3", "eac3", "opus", "flac"})
AUDIO_COPY = {".mp4": _MP4_AUDIO, ".m4v": _MP4_AUDIO,
              ".mov": frozenset({"aac", "mp3", "alac", "ac3", "eac3", "pcm_s16le", "pcm_s24le", "pcm_f32le"}),
              ".mkv": None, ".webm": frozenset({"opus", "vorbis"})}  # None: any codec
AUDIO_ENCODER = {".mp4": "aac", ".m4v": "aac", ".mov": "aac", ".mkv": "flac", ".webm": "libopus"}


class _AudioError(Exception):
    """The source's sound could not be read or re-encoded (the frames are then written without it)."""


def has_audio(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a video file with an audio stream (folders and images have none)."""
    path = Path(path)
    if not path.is_file() or path.suffix.lower() in IMAGE_EXTENSIONS:
        return False
    import av

    try:
        with av.open(str(path)) as container:
            return bool(container.streams.audio)
    except av.error.FFmpegError:
        return False


def _audio_packets(container, source: Path, ext: str) -> list:
    """``(seconds, packet)`` for the first audio stream of ``source``, ready to mux into ``container`` (whose
    audio stream this adds), in time order, timed relative to the source's first video frame (copied packets
    exactly, re-encoded sound to the encoder's frame); sound wholly before that frame is dropped."""
    import av

    try:
        with av.open(str(source)) as src:
            a_in = src.streams.audio[0]
            v_in = src.streams.video[0] if src.streams.video else None
            start = float(v_in.start_time * v_in.time_base) if v_in is not None and v_in.start_time is not None else 0.0
            allowed = AUDIO_COPY[ext]
            out = []
            if allowed is None or a_in.codec_context.name in allowed:
                a_out = container.add_stream_from_template(a_in)
                shift = round(start / a_in.time_base)
                for packet in src.demux(a_in):
                    if packet.pts is None or packet.dts is None:
                        continue
                    packet.pts -= shift
                    packet.dts -= shift
                    if packet.pts + (packet.duration or 0) <= 0:
                        continue
                    seconds = float(packet.pts * a_in.time_base)
                    packet.stream = a_out
                    out.append((seconds, packet))
                return out
            rate = 48000 if AUDIO_ENCODER[ext] == "libopus" else a_in.codec_context.sample_rate  # Opus: 48 kHz
            a_out = container.add_stream(AUDIO_ENCODER[ext], rate=rate)
            a_out.layout = a_in.codec_context.layout.name if a_in.codec_context.layout.nb_channels <= 2 else "stereo"
            for frame in src.decode(a_in):
                if frame.pts is not None:
                    frame.pts -= round(start / frame.time_base)
                    if float(frame.pts * frame.time_base) + frame.samples / frame.sample_rate <= 0:
                        continue  # wholly before the first video frame
                out.extend(a_out.encode(frame))
            out.extend(a_out.encode(None))
            return [(float(p.pts * p.time_base) if p.pts is not None else 0.0, p) for p in out]
    except (av.error.FFmpegError, ValueError, IndexError) as exc:
        raise _AudioError(f"{exc.__class__.__name__}: {exc}") from None


VFR_TIME_BASE = Fraction(1, 90000)  # frame times of a variable-rate output (MPEG's 90 kHz clock)


def _encode(path: Path, data: _Uint8Frames, fps: float, ext: str, audio: Path | None = None,
            times: Sequence[float] | None = None) -> None:
    import av

    h, w = data.height, data.width
    rate = Fraction(fps).limit_denominator(1001)
    # +bitexact: no random muxer ids, so the same frames give byte-identical files (reproducible datasets)
    with av.open(str(path), mode="w", options={"fflags": "+bitexact"}) as container:
        if ext in (".mp4", ".mov", ".m4v"):
            stream = container.add_stream("libx264", rate=rate)
            stream.pix_fmt = "yuv420p" if h % 2 == 0 and w % 2 == 0 else "yuv444p"
            # byte-identical files for identical frames (reproducible outputs): one encoder thread, and no
            # macroblock tree: x264's AVX-512 mbtree code reads uninitialised memory, so with it the same
            # frames gave different files in 216 of 300 encodes (docs/data.md, "Video files"). Cost: ~15%
            # larger files at crf 18.
            stream.options = {"crf": "18", "preset": "medium", "threads": "1", "x264-params": "mbtree=0"}
        elif ext == ".mkv":
            stream = container.add_stream("ffv1", rate=rate)
            stream.pix_fmt = "bgr0"
        elif ext == ".webm":
            stream = container.add_stream("libvpx-vp9", rate=rate)
            stream.pix_fmt = "yuv420p" if h % 2 == 0 and w % 2 == 0 else "yuv444p"
        else:
            raise VideoError(f"{path}: unsupported output extension {ext!r} (use .mp4, .mov, .mkv, .webm, .gif, .png or a folder)")
        stream.width, stream.height = w, h
        if times is not None:  # variable frame rate: each frame at its own time
            stream.codec_context.time_base = VFR_TIME_BASE
        convert = _tag_colour(stream, h, w) if ext != ".mkv" else {}
        sound = _audio_packets(container, audio, ext) if audio is not None else []
        k = 0
        for i, arr in enumerate(data):
            shown = times[i] if times is not None else i / fps
            while k < len(sound) and sound[k][0] < shown:  # interleave: the sound up to this frame first
                container.mux(sound[k][1])
                k += 1
            frame = av.VideoFrame.from_ndarray(arr, format="rgb24")
            if convert:
                frame = frame.reformat(format=stream.pix_fmt, **convert)
            if times is not None:
                frame.pts, frame.time_base = round(times[i] / VFR_TIME_BASE), VFR_TIME_BASE
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
        for _, packet in sound[k:]:
            container.mux(packet)


def _tag_colour(stream, height: int, width: int) -> dict:
    """Tag a YUV stream's colours and return the RGB -> YUV conversion that matches the tags.

    Untagged, a player guesses the matrix from the size (mpv: BT.709 from 1280 wide or above 576 lines): an HD
    clip converted with swscale's default BT.601 matrix and left untagged decodes that way as green (32, 224, 64)
    shown as (16, 193, 58). So HD frames are converted with BT.709 and every stream says which matrix,
    primaries, transfer and range it holds (BT.601 below HD, as before, with the same pixels).
    """
    from av.video.reformatter import ColorRange, Colorspace

    hd = width >= 1280 or height > 576
    ctx = stream.codec_context
    # AVColorSpace / AVColorPrimaries / AVColorTransferCharacteristic: 1 = BT.709, 6 = SMPTE 170M (BT.601 525)
    ctx.colorspace = ctx.color_primaries = ctx.color_trc = 1 if hd else 6
    ctx.color_range = int(ColorRange.MPEG)
    return {"dst_colorspace": Colorspace.ITU709 if hd else Colorspace.ITU601, "dst_color_range": ColorRange.MPEG}


def _write_folder(path: Path, data: _Uint8Frames) -> Path:
    if not path.parent.exists():
        raise VideoError(f"{path}: output folder {path.parent} does not exist; create it first")
    with atomic_dir(path) as tmp:
        for i, arr in enumerate(data):
            Image.fromarray(arr).save(tmp / f"{i:05d}.png")
    return path
