"""A reward computed by a reward server (``python -m rewards.serve``): the client side.

In a recipe, a reward entry that names a ``server`` is scored by that server, which computes the reward
of the same name (its own recipe's ``rewards:`` entry)::

    rewards:
      clip_if: {weight: 1.0, server: "http://10.0.0.5:8100"}      # remote
      clip_sp: {weight: 0.5, model: "hf:openai/clip-vit-large-patch14"}   # in this process

Every other key of a remote entry (``model``, ``frames``, ...) is what the recipe expects the server to
use: at the first call the client reads the server's ``/info`` and stops with a clear error when a
setting differs (so a recipe never trains silently on another model's numbers). The weight stays local.

Transport: the videos go as raw float32 (exact; ``transport: uint8`` sends a quarter of the bytes, rounded to
1/255), and only the frames the served reward uses when its ``frames`` is ``{num: n}`` (a judge's 4 frames of a
33-frame clip: 8x fewer bytes, the same score).

Failures: a request that times out, cannot connect, gets a 5xx/408/429 or a malformed answer is retried
``max_retries`` times with exponential backoff; if it still fails its samples are NaN (the trainer drops
them from their group and counts them), never a made-up score. After ``give_up_after`` failed requests
in a row the server counts as down and :class:`RemoteRewardError` stops the run (the trainer writes its
checkpoint first). A refused token (401/403), an oversized request (413), an unknown reward (404) or a
mismatched setting raise :class:`RemoteRewardError` at once: retrying cannot fix them.

The bearer token is read from the environment variable ``token_env`` at request time; it is never stored,
logged or written anywhere (configs hold the variable's name only).
"""
from __future__ import annotations

import http.client
import json
import logging
import os
import random
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from typing import Any

import torch

from .base import Reward, RewardOutput, frame_indices
from .transport import FRAME_DTYPES, encode_request, from_json_safe

logger = logging.getLogger(__name__)

__all__ = ["CLIENT_OPTIONS", "DEFAULT_TOKEN_ENV", "RemoteReward", "RemoteRewardError", "chunk_by_groups",
           "backoff_seconds"]

DEFAULT_TOKEN_ENV = "EDITGRPO_REWARD_TOKEN"
#: keys of a remote ``rewards:`` entry that configure the client (every other key is an expected server setting)
CLIENT_OPTIONS = ("server", "timeout", "max_retries", "backoff", "max_backoff", "give_up_after", "token_env",
                  "transport", "max_samples_per_request")
_RETRY_STATUS = {408, 425, 429}


class RemoteRewardError(RuntimeError):
    """The reward server is down (after retries) or refuses the requests for good; the message says which and why."""


class _Retryable(Exception):
    pass


def backoff_seconds(attempt: int, backoff: float, max_backoff: float) -> float:
    """The wait before retry ``attempt`` (0-based): ``min(max_backoff, backoff * 2**attempt)``, before jitter."""
    return min(max_backoff, backoff * 2.0 ** attempt)


def chunk_by_groups(groups: list[int] | None, batch: int, max_samples: int) -> list[list[int]]:
    """Sample indices ``0..batch-1`` in consecutive chunks of at most ``max_samples`` that never split a group
    (samples with the same id in ``groups``; ``None``: no groups). A group larger than ``max_samples`` is a
    chunk of its own (the server then refuses it with 413)."""
    if groups is None:
        return [list(range(s, min(batch, s + max_samples))) for s in range(0, batch, max_samples)]
    order: dict[int, list[int]] = {}
    for i, g in enumerate(groups):
        order.setdefault(g, []).append(i)
    chunks: list[list[int]] = []
    for members in order.values():
        if chunks and len(chunks[-1]) + len(members) <= max_samples:
            chunks[-1].extend(members)
        else:
            chunks.append(list(members))
    return chunks


class RemoteReward(Reward):
    """The reward ``name`` computed by the reward server at ``server`` (see the module doc).

    Args:
        name: the reward's name on the server (the recipe's component name).
        server: ``http://host:port`` of ``python -m rewards.serve``.
        timeout: seconds per HTTP request.
        max_retries: retries of a failed request (then its samples are NaN).
        backoff, max_backoff: the wait before retry ``k`` is ``min(max_backoff, backoff * 2**k)``, jittered +-25%.
        give_up_after: failed requests in a row after which the server counts as down (RemoteRewardError).
        token_env: environment variable holding the bearer token (unset: no Authorization header).
        transport: wire dtype of the videos, ``float32`` (exact), ``float16`` or ``uint8`` (rewards/transport.py).
        max_samples_per_request: split larger batches (default: the server's limit from ``/info``).
        **settings: the reward settings the recipe expects the server to use (checked against ``/info``).
    """

    def __init__(self, name: str, server: str, *, timeout: float = 120.0, max_retries: int = 3, backoff: float = 1.0,
                 max_backoff: float = 30.0, give_up_after: int = 2, token_env: str | None = DEFAULT_TOKEN_ENV,
                 transport: str = "float32", max_samples_per_request: int | None = None, **settings: Any):
        super().__init__()
        if not isinstance(server, str) or not server.startswith(("http://", "https://")):
            raise ValueError(f"server must be an http(s) URL such as 'http://127.0.0.1:8100', got {server!r}")
        if transport not in FRAME_DTYPES:
            raise ValueError(f"transport must be one of {', '.join(FRAME_DTYPES)}, got {transport!r}")
        if timeout <= 0 or max_retries < 0 or give_up_after < 1 or (max_samples_per_request or 1) < 1:
            raise ValueError("need timeout > 0, max_retries >= 0, give_up_after >= 1, max_samples_per_request >= 1")
        if "token" in settings or "api_key" in settings:
            raise ValueError("give token_env=<name of an environment variable>, never the token itself")
        self.name = name
        self.server = server.rstrip("/")
        self.timeout, self.max_retries = float(timeout), int(max_retries)
        self.backoff, self.max_backoff = float(backoff), float(max_backoff)
        self.give_up_after = int(give_up_after)
        self.token_env = token_env
        self.transport = transport
        self.max_samples = max_samples_per_request
        self.settings = dict(settings)
        self._info: dict[str, Any] | None = None
        self._lock = threading.Lock()
        self._consecutive_failures = 0
        self.stats = {"requests": 0, "retries": 0, "failed_requests": 0, "failed_samples": 0, "samples": 0}

    # -- HTTP --------------------------------------------------------------------------------------
    def _request(self, path: str, body: bytes | None = None) -> bytes:
        """One HTTP request; returns the body, raises _Retryable (transient) or RemoteRewardError (for good)."""
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = "application/octet-stream"
        token = os.environ.get(self.token_env) if self.token_env else None
        if token:
            headers["Authorization"] = "Bearer " + token
        req = urllib.request.Request(self.server + path, data=body, headers=headers,
                                     method="POST" if body is not None else "GET")
        with self._lock:
            self.stats["requests"] += 1
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as response:
                return response.read()
        except urllib.error.HTTPError as e:
            detail = ""
            try:
                detail = json.loads(e.read().decode("utf-8", "replace")).get("detail", "")
            except Exception:  # noqa: BLE001 - the body is only for the message
                pass
            where = f"reward server {self.server} ({self.name})"
            if e.code in (401, 403):
                hint = (f"set ${self.token_env} to the server's token" if not token else
                        f"${self.token_env} holds a token the server does not accept")
                raise RemoteRewardError(f"{where} refused the request (HTTP {e.code}): {hint}") from None
            if e.code == 413:
                raise RemoteRewardError(f"{where}: request too large (HTTP 413: {detail}); lower "
                                        f"rewards.{self.name}.max_samples_per_request or the server's limits") from None
            if e.code in _RETRY_STATUS or e.code >= 500:
                raise _Retryable(f"HTTP {e.code} from {where}: {detail}") from None
            raise RemoteRewardError(f"{where} answered HTTP {e.code}: {detail}") from None
        except (TimeoutError, socket.timeout):
            raise _Retryable(f"no answer from {self.server} within {self.timeout:g} s") from None
        except (urllib.error.URLError, http.client.HTTPException, ConnectionError, OSError) as e:
            reason = getattr(e, "reason", e)
            if isinstance(reason, (TimeoutError, socket.timeout)):
                raise _Retryable(f"no answer from {self.server} within {self.timeout:g} s") from None
            raise _Retryable(f"cannot reach {self.server}: {reason}") from None

    def _with_retries(self, what: str, fn):
        """``fn()`` with retries of transient failures; returns ``(value, None)`` or ``(None, last error)``."""
        error = "not attempted"
        for attempt in range(self.max_retries + 1):
            if attempt:
                with self._lock:
                    self.stats["retries"] += 1
                time.sleep(backoff_seconds(attempt - 1, self.backoff, self.max_backoff) * random.uniform(0.75, 1.25))
            try:
                return fn(), None
            except _Retryable as e:
                error = str(e)
                logger.debug("%s: attempt %d failed (%s)", what, attempt + 1, error)
        return None, error

    def _give_up_check(self, error: str) -> None:
        self._consecutive_failures += 1
        if self._consecutive_failures >= self.give_up_after:
            raise RemoteRewardError(
                f"reward server {self.server} ({self.name}) is down: {self._consecutive_failures} requests in a row "
                f"failed after {self.max_retries} retries each (last error: {error})")

    # -- /info -------------------------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        """The server's ``/info`` (fetched once, with retries); checks that it serves this reward with the
        recipe's settings. Raises :class:`RemoteRewardError`."""
        if self._info is not None:
            return self._info

        def fetch():
            raw = self._request("/info")
            try:
                data = json.loads(raw.decode("utf-8"))
                data["rewards"].items()
            except (ValueError, KeyError, TypeError, AttributeError):
                raise _Retryable(f"malformed /info from {self.server}: {raw[:120]!r}") from None
            return data

        data, error = self._with_retries(f"{self.name} /info", fetch)
        if data is None:
            raise RemoteRewardError(f"reward server {self.server} ({self.name}) is down: /info failed after "
                                    f"{self.max_retries} retries (last error: {error})")
        served = data["rewards"]
        if self.name not in served:
            raise RemoteRewardError(f"reward server {self.server} does not serve {self.name!r}; it serves "
                                    f"{', '.join(sorted(served)) or 'nothing'}")
        theirs = served[self.name].get("settings", {})
        for key, want in self.settings.items():
            if key not in theirs or theirs[key] != want:
                raise RemoteRewardError(f"rewards.{self.name}.{key}={want!r} but the server at {self.server} uses "
                                        f"{theirs.get(key, '<its default>')!r}; make the recipes agree")
        self._info = data
        self.group_wise = bool(served[self.name].get("group_wise", False))
        return data

    # -- scoring -----------------------------------------------------------------------------------
    def _presample(self, video: torch.Tensor) -> torch.Tensor:
        """Only the frames the served reward looks at, when sending fewer changes nothing: its sampling is
        ``{"num": n}``, which picks every frame of an n-frame video (for ``all`` or ``{"every": k}`` all frames go)."""
        spec = self._info["rewards"][self.name].get("frames") if self._info else None
        if not (isinstance(spec, Mapping) and set(spec) == {"num"}):
            return video
        return video[:, frame_indices(video.shape[1], dict(spec))]

    def _score_chunk(self, edited, source, idx: list[int], texts: dict[str, Any], groups) -> RewardOutput:
        sel = torch.tensor(idx)
        refs = texts["references"]
        body = encode_request(
            self.name, self._presample(edited[sel]), self._presample(source[sel]),
            **{k: [texts[k][i] for i in idx] for k in ("source_captions", "target_captions", "instructions")},
            references=[refs[i] for i in idx] if refs is not None else None,
            groups=[groups[i] for i in idx] if groups is not None else None, frames=self.transport)

        def post():
            raw = self._request(f"/score/{self.name}", body)
            try:
                data = json.loads(raw.decode("utf-8"))
                scores = from_json_safe(data["scores"], len(idx))
                details = data.get("details")
                if details is not None and (not isinstance(details, list) or len(details) != len(idx)):
                    raise ValueError("details do not match the batch")
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise _Retryable(f"malformed answer from {self.server}: {e}") from None
            return RewardOutput(scores, details)

        out, error = self._with_retries(f"{self.name} score", post)
        with self._lock:
            self.stats["samples"] += len(idx)
        if out is not None:
            self._consecutive_failures = 0
            return out
        with self._lock:
            self.stats["failed_requests"] += 1
            self.stats["failed_samples"] += len(idx)
        logger.warning("remote reward %s: %d samples not scored (NaN) after %d attempts: %s", self.name, len(idx),
                       self.max_retries + 1, error)
        self._give_up_check(error)
        return RewardOutput(torch.full((len(idx),), float("nan")), [{"remote_error": error} for _ in idx])

    def score_batch(self, edited, source, *, groups, **texts) -> RewardOutput:
        info = self.info()
        limit = int(info.get("server", {}).get("max_samples_per_request") or edited.shape[0] or 1)
        size = min(limit, self.max_samples or limit)
        scores = torch.empty(edited.shape[0], dtype=torch.float32)
        details: list[Any] = [None] * edited.shape[0]
        any_details = False
        for idx in chunk_by_groups(groups, edited.shape[0], size):
            out = self._score_chunk(edited, source, idx, texts, groups)
            scores[torch.tensor(idx)] = out.scores
            if out.details is not None:
                any_details = True
                for j, i in enumerate(idx):
                    details[i] = out.details[j]
        return RewardOutput(scores, [d if isinstance(d, Mapping) else {} for d in details] if any_details else None)

    def __repr__(self) -> str:
        return f"RemoteReward(name={self.name!r}, server={self.server!r}, transport={self.transport!r})"
