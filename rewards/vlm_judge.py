"""A VLM judge of video edits over the OpenAI-compatible chat API (paper Appendix D.4).

The judge sees frames of the source video, the same time steps of the edited video, the
instruction and, when given, a reference image, and rates 0-10:

* ``instruction_following``: the edit does what the instruction asks,
* ``source_preservation``: what the instruction does not touch is kept,
* ``editing_quality``: the result looks natural, without artifacts,
* ``subject_similarity``: the edited subject matches the reference image (only with a reference).

One client serves OpenAI (``https://api.openai.com/v1``), Gemini's compatible endpoint
(``https://generativelanguage.googleapis.com/v1beta/openai``) and a local vLLM server of an open VLM
(``http://127.0.0.1:8000/v1``): it POSTs to ``<base_url>/chat/completions`` with the images as
base64 PNG data URLs. Only the standard library is used for HTTP.

Robustness: the answer's JSON is found anywhere in the text (code fences, prose around it);
malformed answers, timeouts, connection errors, 429 and 5xx are retried with exponential backoff
(``Retry-After`` honoured); requests run ``concurrency`` at a time; successful answers are cached on
disk under the SHA-256 of the request body, so a repeat costs no request. A sample that still fails
is NaN and counted in :attr:`JudgeClient.failures`, never a made-up score.

Log-prob scores (``logprobs=True``): the request asks for the tokens' log-probabilities (``logprobs``,
``top_logprobs``; OpenAI and vLLM return them). Each criterion's score is then the expected value
``sum_v p(v) v / sum_v p(v)`` over the alternatives ``v`` in 0-10 that the server lists at the token of
that score (a continuous reward that separates an "8 at 90%" from an "8 at 51%"); a criterion whose
token the server did not describe (no ``logprobs`` in the answer, a multi-digit score split over two
tokens) keeps the parsed integer (:func:`logprob_scores`). ``scale="yes_no"`` asks one yes/no question
instead; its reward is ``P(yes) / (P(yes) + P(no))``, or 1 / 0 from the parsed word.

The API key is read from the environment variable named by ``api_key_env`` at request time; it
is never stored on the client, logged, cached or returned (error bodies are scrubbed of it).
"""
from __future__ import annotations

import base64
import concurrent.futures
import hashlib
import http.client
import io
import json
import logging
import math
import os
import random
import re
import socket
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .base import FrameSpec, Reward, RewardOutput, frame_indices
from .registry import register_reward

logger = logging.getLogger(__name__)

__all__ = [
    "CRITERIA",
    "YES_NO_PROMPT",
    "expected_value",
    "logprob_scores",
    "parse_yes_no",
    "token_probabilities",
    "yes_no_probability",
    "JUDGE_PROMPT",
    "JUDGE_PROMPT_VERSION",
    "JudgeClient",
    "JudgeParseError",
    "JudgeResult",
    "VlmJudge",
    "aggregate_judge_scores",
    "build_judge_prompt",
    "parse_judge_answer",
]

CRITERIA = ("instruction_following", "source_preservation", "editing_quality", "subject_similarity")
BASE_CRITERIA = CRITERIA[:3]

#: bump when the prompt or the message layout changes (it is part of every cache key)
JUDGE_PROMPT_VERSION = "edit-judge-v1"

#: The prompt sent with every judgement; ``{instruction}``, ``{reference_clause}``, ``{subject_line}``
#: and ``{answer_format}`` are filled by :func:`build_judge_prompt`. Recorded by evaluation.
JUDGE_PROMPT = """You are an impartial expert judge of instruction-based video editing.
You are shown frames of a SOURCE video and the frames at the same time steps of an EDITED video that an \
editing model produced from it by following an editing INSTRUCTION{reference_clause}.

Rate the edit on each criterion with an integer from 0 (worst) to 10 (best):
- instruction_following: the edited video carries out the instruction completely and precisely \
(0: ignored or wrong edit, 10: exactly what was asked).
- source_preservation: everything the instruction does not ask to change (other objects, identity, \
layout, background, camera and motion) is kept as in the source (0: unrelated video, 10: only the \
requested change).
- editing_quality: the edited video looks natural and coherent, without artifacts, blur, distortions \
or flicker (0: broken, 10: indistinguishable from a real video).
{subject_line}
INSTRUCTION: "{instruction}"

Answer with a JSON object only, no other text:
{answer_format}"""

_REFERENCE_CLAUSE = ", and a REFERENCE image of a subject that the edit should insert or match"
_SUBJECT_LINE = ("- subject_similarity: the edited subject looks like the subject of the REFERENCE image "
                 "(identity, shape, colors, details) (0: unrelated, 10: the same subject).\n")


def build_judge_prompt(instruction: str, with_reference: bool) -> str:
    """The text part of a judge request (:data:`JUDGE_PROMPT` filled in)."""
    keys = CRITERIA if with_reference else BASE_CRITERIA
    answer = "{" + ", ".join(f'"{k}": <0-10>' for k in keys) + "}"
    return JUDGE_PROMPT.format(
        instruction=instruction.replace('"', "'"),
        reference_clause=_REFERENCE_CLAUSE if with_reference else "",
        subject_line=_SUBJECT_LINE if with_reference else "",
        answer_format=answer,
    )


# ------------------------------------------------------------------------------------------------
# Parsing answers
# ------------------------------------------------------------------------------------------------
class JudgeParseError(ValueError):
    """The judge's answer holds no valid scores."""


_NUMBER = re.compile(r"^\s*([+-]?\d+(?:\.\d+)?)\s*(?:/\s*10(?:\.0+)?)?\s*$")


def _norm_key(key: Any) -> str:
    return re.sub(r"[\s\-]+", "_", str(key).strip().lower())


def _as_score(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        x = float(value)
    elif isinstance(value, str) and _NUMBER.match(value):
        x = float(_NUMBER.match(value).group(1))
    elif isinstance(value, Mapping):  # {"score": 8, "reason": ...}
        inner = {_norm_key(k): v for k, v in value.items()}
        return _as_score(inner["score"]) if "score" in inner else None
    else:
        return None
    return x if math.isfinite(x) and 0.0 <= x <= 10.0 else None


def _scores_from(obj: Any, required: Sequence[str]) -> dict[str, float] | None:
    if not isinstance(obj, Mapping):
        return None
    flat = {_norm_key(k): v for k, v in obj.items()}
    found = {k: _as_score(flat[k]) for k in required if k in flat}
    if len(found) == len(required) and all(v is not None for v in found.values()):
        return {k: float(v) for k, v in found.items()}
    for value in obj.values():  # {"scores": {...}}
        nested = _scores_from(value, required)
        if nested is not None:
            return nested
    return None



def json_objects_in(text: str):
    """Every JSON value that starts at a ``{`` of ``text``, in order (prose and code fences around them
    are skipped): what a chat model's answer may hold. Shared by the judge and the data pipeline's client."""
    decoder = json.JSONDecoder()
    for match in re.finditer(r"\{", text):
        try:
            yield decoder.raw_decode(text, match.start())[0]
        except json.JSONDecodeError:
            continue

def parse_judge_answer(text: str, required: Sequence[str] = BASE_CRITERIA) -> dict[str, float]:
    """Scores from a judge's answer: the first JSON object in ``text`` (code fences and prose around it
    are fine, keys match case- and space-insensitively, values may be numbers, ``"8"`` or ``"8/10"``)
    that has every ``required`` criterion with a value in [0, 10]. Raises :class:`JudgeParseError`."""
    if not isinstance(text, str) or not text.strip():
        raise JudgeParseError("empty answer")
    for obj in json_objects_in(text):
        scores = _scores_from(obj, required)
        if scores is not None:
            return scores
    snippet = text.strip().replace("\n", " ")[:120]
    raise JudgeParseError(f"no JSON object with {', '.join(required)} in 0-10 in the answer: {snippet!r}")


#: The yes/no question of ``scale="yes_no"`` (``{instruction}`` filled in).
YES_NO_PROMPT = """You are an impartial expert judge of instruction-based video editing.
You are shown frames of a SOURCE video and the frames at the same time steps of an EDITED video that an \
editing model produced from it by following an editing INSTRUCTION.
Does the EDITED video carry out the instruction completely, while keeping everything the instruction does not \
ask to change as in the SOURCE, without artifacts?
INSTRUCTION: "{instruction}"

Answer with one word: yes or no."""


def parse_yes_no(text: str) -> float:
    """1.0 for an answer whose first word is "yes", 0.0 for "no" (case, quotes and punctuation ignored);
    raises :class:`JudgeParseError` otherwise."""
    words = re.findall(r"[A-Za-z]+", text or "")
    if words and words[0].lower() in ("yes", "no"):
        return 1.0 if words[0].lower() == "yes" else 0.0
    raise JudgeParseError(f"not a yes/no answer: {(text or '').strip()[:80]!r}")


# ------------------------------------------------------------------------------------------------
# Log-prob scores
# ------------------------------------------------------------------------------------------------
def _norm_token(token: Any) -> str:
    return str(token).strip().strip('"\'').strip().lower()


def token_probabilities(entry: Mapping[str, Any]) -> dict[str, float]:
    """``{normalised token: probability}`` of one token position of an OpenAI ``logprobs.content`` entry: its
    ``top_logprobs`` and the sampled token itself (tokens that normalise alike, e.g. ``"8"`` and ``" 8"``, add up)."""
    probs: dict[str, float] = {}
    seen = set()
    alternatives = list(entry.get("top_logprobs") or [])
    if not any(a.get("token") == entry.get("token") for a in alternatives if isinstance(a, Mapping)):
        alternatives.append({"token": entry.get("token"), "logprob": entry.get("logprob")})
    for alt in alternatives:
        if not isinstance(alt, Mapping) or alt.get("token") in seen:
            continue
        seen.add(alt.get("token"))
        try:
            p = math.exp(float(alt["logprob"]))
        except (KeyError, TypeError, ValueError, OverflowError):
            continue
        key = _norm_token(alt["token"])
        probs[key] = probs.get(key, 0.0) + p
    return probs


def expected_value(probs: Mapping[str, float], values: Mapping[str, float]) -> float | None:
    """``sum_v p(v) values[v] / sum_v p(v)`` over the tokens of ``probs`` that ``values`` names; None if none does."""
    mass = sum(p for t, p in probs.items() if t in values)
    if mass <= 0:
        return None
    return sum(p * values[t] for t, p in probs.items() if t in values) / mass


_SCORE_VALUES = {str(v): float(v) for v in range(11)}


def _token_spans(content: Sequence[Mapping[str, Any]]) -> list[tuple[int, int, Mapping[str, Any]]]:
    spans, pos = [], 0
    for entry in content:
        token = str(entry.get("token", ""))
        spans.append((pos, pos + len(token), entry))
        pos += len(token)
    return spans


def logprob_scores(text: str, content: Any, required: Sequence[str]) -> dict[str, float]:
    """Expected 0-10 scores from an answer's token log-probs (OpenAI ``choices[0].logprobs.content``).

    For each criterion the value after its key in ``text`` (``"instruction_following": 8``) is located; when one
    token holds exactly that number, the score is :func:`expected_value` over the 0-10 alternatives listed at that
    token. Criteria that cannot be read that way are left out (the caller keeps the parsed integer); so is every
    criterion when the tokens do not spell ``text``."""
    if not isinstance(content, list) or not content or "".join(str(e.get("token", "")) for e in content
                                                                if isinstance(e, Mapping)) != text:
        return {}
    spans = _token_spans([e for e in content if isinstance(e, Mapping)])
    out = {}
    for key in required:
        pattern = r"[\s_\-]*".join(map(re.escape, key.split("_")))
        m = re.search(r'"?' + pattern + r'"?\s*:\s*"?(\d+)', text, flags=re.IGNORECASE)
        if not m:
            continue
        start, number = m.start(1), m.group(1)
        entry = next((e for a, b, e in spans if a <= start < b), None)
        if entry is None or _norm_token(entry.get("token")) != number:
            continue  # the number shares its token with other text, or is split over tokens ("1" "0")
        value = expected_value(token_probabilities(entry), _SCORE_VALUES)
        if value is not None:
            out[key] = value
    return out


def yes_no_probability(content: Any) -> float | None:
    """``P(yes) / (P(yes) + P(no))`` at the first token that reads yes or no; None without log-probs there."""
    if not isinstance(content, list):
        return None
    for entry in content:
        if isinstance(entry, Mapping) and _norm_token(entry.get("token")) in ("yes", "no"):
            return expected_value(token_probabilities(entry), {"yes": 1.0, "no": 0.0})
    return None


def aggregate_judge_scores(scores: Mapping[str, float], with_reference: bool, aggregate: str = "mean") -> float:
    """The reward from one judgement: the mean of the criteria that apply (three, four with a
    reference), or one named criterion. NaN if any needed score is NaN."""
    if aggregate == "mean":
        keys = CRITERIA if with_reference else BASE_CRITERIA
        values = [scores[k] for k in keys]
        return sum(values) / len(values)
    return float(scores[aggregate])


# ------------------------------------------------------------------------------------------------
# Images
# ------------------------------------------------------------------------------------------------
def _png_data_url(image: torch.Tensor, max_side: int | None) -> str:
    from PIL import Image

    array = (image.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy())
    pil = Image.fromarray(array)
    if max_side and max(pil.size) > max_side:
        scale = max_side / max(pil.size)
        pil = pil.resize((max(1, round(pil.width * scale)), max(1, round(pil.height * scale))), Image.BICUBIC)
    buffer = io.BytesIO()
    pil.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _as_frames(x: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.ndim not in (3, 4) or x.shape[-3] != 3:
        raise ValueError(f"{name} must be a (3, H, W) image or (F, 3, H, W) frames in [0, 1]")
    return x[None] if x.ndim == 3 else x


# ------------------------------------------------------------------------------------------------
# The client
# ------------------------------------------------------------------------------------------------
@dataclass
class JudgeResult:
    """One judgement: ``scores`` (the four criteria; NaN where not scored), ``error`` (why it
    failed, ``None`` on success), ``cached`` (served from the disk cache), ``attempts`` (HTTP requests)."""

    scores: dict[str, float]
    error: str | None = None
    cached: bool = False
    attempts: int = 0
    raw: str | None = field(default=None, repr=False)

    @property
    def ok(self) -> bool:
        return self.error is None


class _Answer(str):
    """The answer text, with the server's token log-probs (``choices[0].logprobs.content``) when it sent them."""

    logprobs: Any = None


class _Retryable(Exception):
    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class _Fatal(Exception):
    pass


_RETRY_STATUS = {408, 409, 425, 429}


class JudgeClient:
    """A VLM judge over an OpenAI-compatible ``/chat/completions`` endpoint.

    Args:
        base_url: e.g. ``https://api.openai.com/v1`` or ``http://127.0.0.1:8000/v1``.
        model: the served model name (``gpt-4o``, ``gemini-2.0-flash``, ``Qwen/Qwen2.5-VL-7B-Instruct``).
        api_key_env: name of the environment variable holding the key (read at request time; unset
            or ``None``: no ``Authorization`` header, as for a local vLLM).
        timeout: seconds per HTTP request (socket timeout).
        max_retries: retries after the first attempt (malformed answer, timeout, 429, 5xx, network).
        concurrency: at most this many requests in flight (over all threads using this client).
        cache_dir: folder of the answer cache (``None``: no cache).
        backoff, max_backoff: the wait before retry ``k`` is ``min(max_backoff, backoff * 2**k)``,
            jittered by +-50% (or the server's ``Retry-After``).
        temperature, max_tokens: sampling parameters sent (``max_tokens=None`` sends none).
        json_mode: send ``response_format={"type": "json_object"}``.
        max_image_side: downscale images whose long side is larger (``None``: send as they are).
        extra_body: more fields merged into the request body (e.g. ``{"max_completion_tokens": 300}``).
        logprobs, top_logprobs: ask for the answer's token log-probs (``top_logprobs`` alternatives per token) and
            turn each score into its expected value (:func:`logprob_scores`); answers without them keep the integers.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key_env: str | None = "OPENAI_API_KEY",
        timeout: float = 60.0,
        max_retries: int = 3,
        concurrency: int = 4,
        cache_dir: str | os.PathLike | None = None,
        *,
        backoff: float = 1.0,
        max_backoff: float = 30.0,
        temperature: float | None = 0.0,
        max_tokens: int | None = 300,
        json_mode: bool = False,
        max_image_side: int | None = 512,
        extra_body: Mapping[str, Any] | None = None,
        logprobs: bool = False,
        top_logprobs: int = 20,
    ):
        if not base_url or not isinstance(base_url, str):
            raise ValueError("JudgeClient needs base_url, e.g. 'https://api.openai.com/v1' or 'http://127.0.0.1:8000/v1'")
        if not model:
            raise ValueError("JudgeClient needs model, the name the server serves (e.g. 'gpt-4o')")
        if concurrency < 1 or max_retries < 0 or timeout <= 0:
            raise ValueError("JudgeClient needs concurrency >= 1, max_retries >= 0 and timeout > 0")
        self.base_url = base_url.rstrip("/")
        self.url = self.base_url + "/chat/completions"
        self.model = model
        self.api_key_env = api_key_env
        self.timeout = float(timeout)
        self.max_retries = int(max_retries)
        self.concurrency = int(concurrency)
        self.cache_dir = os.fspath(cache_dir) if cache_dir is not None else None
        self.backoff = float(backoff)
        self.max_backoff = float(max_backoff)
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.json_mode = bool(json_mode)
        self.max_image_side = max_image_side
        self.extra_body = dict(extra_body or {})
        self.logprobs = bool(logprobs)
        self.top_logprobs = int(top_logprobs)
        self._slots = threading.BoundedSemaphore(self.concurrency)
        self._lock = threading.Lock()
        self._stats = {"requests": 0, "retries": 0, "cache_hits": 0, "failures": 0, "successes": 0}
        if api_key_env and not os.environ.get(api_key_env):
            logger.info("judge: environment variable %s is not set; requests go without an API key", api_key_env)

    # -- counters ----------------------------------------------------------------------------------
    @property
    def failures(self) -> int:
        """Judgements that ended NaN since this client was made."""
        return self._stats["failures"]

    @property
    def stats(self) -> dict[str, int]:
        """Counters: ``requests`` (HTTP requests sent), ``retries``, ``cache_hits``, ``failures``, ``successes``."""
        with self._lock:
            return dict(self._stats)

    def _count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self._stats[key] += n

    # -- request building --------------------------------------------------------------------------
    def build_request(self, source_frames: torch.Tensor, edited_frames: torch.Tensor, instruction: str,
                      reference: torch.Tensor | None = None, prompt: str | None = None) -> dict[str, Any]:
        """The JSON body of the chat request for one judgement (no secrets in it); ``prompt`` replaces the
        0-10 rating prompt (e.g. :data:`YES_NO_PROMPT` filled in)."""
        source_frames = _as_frames(source_frames, "source_frames")
        edited_frames = _as_frames(edited_frames, "edited_frames")
        text = prompt if prompt is not None else build_judge_prompt(instruction, reference is not None)
        videos = [(f"SOURCE video, {source_frames.shape[0]} frame(s) in temporal order:", source_frames),
                  (f"EDITED video, {edited_frames.shape[0]} frame(s) at the same time steps:", edited_frames)]
        if reference is not None:
            videos.append(("REFERENCE image:", _as_frames(reference, "reference")))
        return self.request_body(self.image_content(text, videos))

    def image_content(self, text: str, videos: Sequence[tuple[str, torch.Tensor]]) -> list[dict[str, Any]]:
        """Message content: ``text``, then for each ``(label, frames)`` the label and the frames as PNG data URLs."""
        content: list[dict[str, Any]] = [{"type": "text", "text": text}]
        for label, frames in videos:
            content.append({"type": "text", "text": label})
            for frame in frames:
                content.append({"type": "image_url", "image_url": {"url": _png_data_url(frame, self.max_image_side)}})
        return content

    def request_body(self, content: list[dict[str, Any]]) -> dict[str, Any]:
        """An OpenAI-compatible chat request with one user message holding ``content`` (text and image parts)."""
        body: dict[str, Any] = {"model": self.model, "messages": [{"role": "user", "content": content}]}
        if self.temperature is not None:
            body["temperature"] = self.temperature
        if self.max_tokens is not None:
            body["max_tokens"] = self.max_tokens
        if self.json_mode:
            body["response_format"] = {"type": "json_object"}
        if self.logprobs:
            body["logprobs"] = True
            body["top_logprobs"] = self.top_logprobs
        body.update(self.extra_body)
        return body

    @staticmethod
    def cache_key(body: Mapping[str, Any], version: str = JUDGE_PROMPT_VERSION) -> str:
        """SHA-256 of the prompt version and the canonical JSON of the request body."""
        blob = json.dumps({"version": version, "body": body}, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    # -- cache ---------------------------------------------------------------------------------------
    def _cache_path(self, key: str) -> str | None:
        return os.path.join(self.cache_dir, key[:2], key + ".json") if self.cache_dir else None

    def _cache_get(self, key: str) -> dict[str, float] | None:
        path = self._cache_path(key)
        if path is None or not os.path.isfile(path):
            return None
        try:
            with open(path, encoding="utf-8") as f:
                entry = json.load(f)
            return {k: float(entry["scores"][k]) for k in entry["scores"]}
        except (OSError, ValueError, KeyError, TypeError) as e:
            logger.warning("judge: ignoring unreadable cache entry %s (%s)", path, e)
            return None

    def _cache_put(self, key: str, scores: dict[str, float], raw: str) -> None:
        path = self._cache_path(key)
        if path is None:
            return
        os.makedirs(os.path.dirname(path), exist_ok=True)
        entry = {"scores": scores, "answer": raw, "model": self.model, "version": JUDGE_PROMPT_VERSION,
                 "created": time.time()}
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(entry, f)
            os.replace(tmp, path)
        except OSError:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    # -- HTTP ------------------------------------------------------------------------------------------
    def _scrub(self, text: str) -> str:
        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        if key:
            text = text.replace(key, "***")
        return text

    def _post(self, payload: bytes) -> str:
        """One HTTP request; returns the answer text or raises _Retryable / _Fatal."""
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        if key:
            headers["Authorization"] = "Bearer " + key
        request = urllib.request.Request(self.url, data=payload, headers=headers, method="POST")
        self._count("requests")
        try:
            with self._slots:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    raw = response.read()
        except urllib.error.HTTPError as e:
            body = ""
            try:
                body = e.read().decode("utf-8", "replace")[:300]
            except Exception:  # noqa: BLE001 - the body is only for the message
                pass
            message = self._scrub(f"HTTP {e.code} from {self.url}: {body.strip()}")
            if e.code in _RETRY_STATUS or e.code >= 500:
                retry_after = None
                try:
                    retry_after = float(e.headers.get("Retry-After")) if e.headers.get("Retry-After") else None
                except ValueError:
                    pass
                raise _Retryable(message, retry_after) from None
            raise _Fatal(message) from None
        except (TimeoutError, socket.timeout) as e:
            raise _Retryable(f"no answer from {self.url} within {self.timeout:g} s") from e
        except (urllib.error.URLError, http.client.HTTPException, ConnectionError, OSError) as e:
            reason = getattr(e, "reason", e)
            if isinstance(reason, (TimeoutError, socket.timeout)):
                raise _Retryable(f"no answer from {self.url} within {self.timeout:g} s") from e
            raise _Retryable(self._scrub(f"cannot reach {self.url}: {reason}")) from e
        try:
            data = json.loads(raw.decode("utf-8"))
            message = data["choices"][0]["message"]
            content = message.get("content")
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            raise _Retryable(self._scrub(f"malformed response from {self.url}: {raw[:120]!r}")) from None
        if isinstance(content, list):  # content parts
            content = "".join(p.get("text", "") for p in content if isinstance(p, Mapping))
        if not isinstance(content, str):
            raise _Retryable(f"response from {self.url} has no text content")
        answer = _Answer(content)
        logprobs = data["choices"][0].get("logprobs")
        answer.logprobs = logprobs.get("content") if isinstance(logprobs, Mapping) else None
        return answer

    def _sleep_before_retry(self, attempt: int, retry_after: float | None) -> None:
        wait = min(self.max_backoff, self.backoff * (2 ** attempt)) * random.uniform(0.5, 1.5)
        if retry_after is not None:
            wait = max(wait, min(retry_after, self.max_backoff))
        time.sleep(wait)

    def post_with_retries(self, body: Mapping[str, Any], parse, what: str = "judge"):
        """POST ``body``, parse the answer, retry transient failures and unparseable answers with backoff.

        Returns ``(parsed, raw, attempts, None)``, or ``(None, None, attempts, error)`` once retries are
        spent or the server refused for good (e.g. 401). ``parse`` raises ``ValueError`` on a bad answer.
        """
        payload = json.dumps(body).encode("utf-8")
        error = "not attempted"
        for attempt in range(self.max_retries + 1):
            if attempt:
                self._count("retries")
            retry_after = None
            try:
                raw = self._post(payload)
                parsed = parse(raw)
            except _Fatal as e:
                return None, None, attempt + 1, str(e)
            except _Retryable as e:
                error, retry_after = str(e), e.retry_after
            except ValueError as e:
                error = self._scrub(f"unparseable answer: {e}")
            else:
                return parsed, raw, attempt + 1, None
            if attempt < self.max_retries:
                logger.debug("%s: attempt %d failed (%s); retrying", what, attempt + 1, error)
                self._sleep_before_retry(attempt, retry_after)
        return None, None, self.max_retries + 1, error

    # -- judging ---------------------------------------------------------------------------------------
    def judge_result(self, source_frames: torch.Tensor, edited_frames: torch.Tensor, instruction: str,
                     reference: torch.Tensor | None = None) -> JudgeResult:
        """Judge one edit; see :class:`JudgeResult`. Never raises for server trouble: fails to NaN."""
        body = self.build_request(source_frames, edited_frames, instruction, reference)
        required = CRITERIA if reference is not None else BASE_CRITERIA
        nan_scores = {k: float("nan") for k in CRITERIA}
        key = self.cache_key(body)
        cached = self._cache_get(key)
        if cached is not None and all(k in cached for k in required):
            self._count("cache_hits")
            self._count("successes")
            return JudgeResult({**nan_scores, **cached}, cached=True)
        scores, raw, attempts, error = self.post_with_retries(body, lambda r: parse_judge_answer(r, required), "judge")
        if error is None:
            if self.logprobs:  # expected scores where the server described the score tokens
                scores = {**scores, **logprob_scores(str(raw), getattr(raw, "logprobs", None), required)}
            self._cache_put(key, scores, raw)
            self._count("successes")
            return JudgeResult({**nan_scores, **scores}, attempts=attempts, raw=raw)
        self._count("failures")
        logger.warning("judge: giving up after %d attempt(s): %s", attempts, error)
        return JudgeResult(nan_scores, error=error, attempts=attempts)

    def judge(self, source_frames: torch.Tensor, edited_frames: torch.Tensor, instruction: str,
              reference: torch.Tensor | None = None) -> dict[str, float]:
        """The four scores (0-10) of one edit; ``subject_similarity`` is NaN without a reference; all
        NaN if the judge failed. Frames are ``(F, 3, H, W)`` (or one ``(3, H, W)`` image) in [0, 1]."""
        return self.judge_result(source_frames, edited_frames, instruction, reference).scores

    def judge_batch_results(self, items: Sequence[Mapping[str, Any]]) -> list[JudgeResult]:
        """:meth:`judge_result` over items (dicts with ``source_frames``, ``edited_frames``,
        ``instruction`` and optional ``reference``), ``concurrency`` at a time, in order."""
        if not items:
            return []
        with concurrent.futures.ThreadPoolExecutor(max_workers=min(self.concurrency, len(items))) as pool:
            futures = [pool.submit(self.judge_result, it["source_frames"], it["edited_frames"], it["instruction"],
                                   it.get("reference")) for it in items]
            return [f.result() for f in futures]

    def ask(self, body: Mapping[str, Any], parse, soft=None, what: str = "judge") -> tuple[float, str | None]:
        """One question whose answer is a number: ``parse(text)`` (raises ``ValueError`` on a bad answer), replaced
        by ``soft(token log-probs)`` when this client asks for log-probs and ``soft`` returns a number. Returns
        ``(value, None)``, or ``(NaN, error)`` after the retries (counted in :attr:`failures`)."""
        value, raw, attempts, error = self.post_with_retries(body, parse, what)
        if error is not None:
            self._count("failures")
            logger.warning("%s: giving up after %d attempt(s): %s", what, attempts, error)
            return float("nan"), error
        self._count("successes")
        if self.logprobs and soft is not None:
            better = soft(getattr(raw, "logprobs", None))
            if better is not None:
                value = better
        return float(value), None

    def ask_many(self, bodies: Sequence[Mapping[str, Any]], parse, soft=None,
                 what: str = "judge") -> list[tuple[float, str | None]]:
        """:meth:`ask` over ``bodies``, ``concurrency`` at a time, in order."""
        if not bodies:
            return []
        with concurrent.futures.ThreadPoolExecutor(max_workers=min(self.concurrency, len(bodies))) as pool:
            return list(pool.map(lambda b: self.ask(b, parse, soft, what), bodies))

    def judge_batch(self, items: Sequence[Mapping[str, Any]]) -> list[dict[str, float]]:
        """:meth:`judge` over items (see :meth:`judge_batch_results`)."""
        return [r.scores for r in self.judge_batch_results(items)]

    def __repr__(self) -> str:
        return (f"JudgeClient(base_url={self.base_url!r}, model={self.model!r}, api_key_env={self.api_key_env!r}, "
                f"cache_dir={self.cache_dir!r})")


# ------------------------------------------------------------------------------------------------
# The reward
# ------------------------------------------------------------------------------------------------
@register_reward("vlm_judge")
class VlmJudge(Reward):
    """Judge-based reward: the mean of the judge's 0-10 criteria (three, four with a reference), or
    one criterion (``aggregate="instruction_following"``...). Failed samples are NaN.

    Kwargs: those of :class:`JudgeClient` (``base_url``, ``model``, ``api_key_env``, ``timeout``,
    ``max_retries``, ``concurrency``, ``cache_dir``, ``backoff``, ...), ``aggregate``, and
    ``frames`` (default ``{"num": 4}``: 4 evenly spaced frames of each video are sent).
    Details per sample: the four scores, and ``judge_error`` when it failed.
    ``logprobs=True``: expected scores from the token log-probs (continuous; module doc). ``scale="yes_no"``:
    one yes/no question (:data:`YES_NO_PROMPT`), reward ``P(yes)`` in [0, 1] (or 1 / 0 without log-probs).
    """

    def __init__(self, *, base_url: str, model: str, api_key_env: str | None = "OPENAI_API_KEY",
                 aggregate: str = "mean", scale: str = "0-10", frames: FrameSpec = None, device: str | None = None,
                 **client_kwargs: Any):
        if "api_key" in client_kwargs:
            raise ValueError("vlm_judge takes api_key_env=<name of an environment variable>, never the key itself")
        if aggregate != "mean" and aggregate not in CRITERIA:
            raise ValueError(f"aggregate must be 'mean' or one of {', '.join(CRITERIA)}, got {aggregate!r}")
        if scale not in ("0-10", "yes_no"):
            raise ValueError(f"scale must be '0-10' (rate each criterion) or 'yes_no' (one question), got {scale!r}")
        super().__init__(frames=frames if frames is not None else {"num": 4}, device=device)
        self.aggregate, self.scale = aggregate, scale
        self.client = JudgeClient(base_url, model, api_key_env=api_key_env, **client_kwargs)

    def _yes_no(self, edited, source, instructions) -> RewardOutput:
        """``scale="yes_no"``: P(yes) from the log-probs, else 1 / 0 from the answer; NaN when the judge failed."""
        bodies = [self.client.build_request(source[i, frame_indices(source.shape[1], self.frames)],
                                            edited[i, frame_indices(edited.shape[1], self.frames)], instructions[i],
                                            prompt=YES_NO_PROMPT.format(instruction=instructions[i].replace('"', "'")))
                  for i in range(edited.shape[0])]
        results = self.client.ask_many(bodies, parse_yes_no, yes_no_probability, "vlm_judge yes/no")
        details = [{"p_yes": v} if e is None else {"p_yes": v, "judge_error": e} for v, e in results]
        return RewardOutput(torch.tensor([v for v, _ in results], dtype=torch.float32), details)

    def score(self, edited, source, *, source_captions, target_captions, instructions, references):
        if self.scale == "yes_no":
            return self._yes_no(edited, source, instructions)
        items = []
        for i in range(edited.shape[0]):
            reference = references[i] if references is not None else None
            items.append({
                "source_frames": source[i, frame_indices(source.shape[1], self.frames)],
                "edited_frames": edited[i, frame_indices(edited.shape[1], self.frames)],
                "instruction": instructions[i],
                "reference": reference,
            })
        results = self.client.judge_batch_results(items)
        scores, details = [], []
        for item, result in zip(items, results):
            if self.aggregate == "subject_similarity" and item["reference"] is None:
                value = float("nan")
            else:
                value = aggregate_judge_scores(result.scores, item["reference"] is not None, self.aggregate)
            scores.append(value)
            detail: dict[str, Any] = dict(result.scores)
            if result.error is not None:
                detail["judge_error"] = result.error
            details.append(detail)
        failed = sum(r.error is not None for r in results)
        if failed:
            logger.warning("vlm_judge: %d of %d samples failed (NaN); %d failures since start", failed, len(results),
                           self.client.failures)
        return RewardOutput(torch.tensor(scores, dtype=torch.float32), details)

    def __repr__(self) -> str:
        return f"VlmJudge(client={self.client!r}, aggregate={self.aggregate!r}, frames={self.frames!r})"
