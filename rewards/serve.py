"""Serve rewards over HTTP: any registered reward (built-in or plugin) out of the trainer's process.

    python -m rewards.serve recipe=recipes/tiny.yaml [host=127.0.0.1] [port=8100] [key=value ...]
    EDITGRPO_REWARD_TOKEN=... python -m rewards.serve recipe=recipes/viva.yaml host=0.0.0.0 only=[clip_if]

The recipe's ``rewards:`` block (a training recipe's is fine; nothing else of it is read) says what is
served: each component by its name, built as the trainer would build it. A trainer uses it with
``rewards.<name>.server=http://host:port`` (rewards/remote.py, docs/rewards.md "Serving rewards").

* ``POST /score/<name>``: a binary scoring request (rewards/transport.py); answers
  ``{"scores": [...], "details": [...]}`` (``null`` = NaN, a sample the reward could not score).
* ``GET /health``: ``{"status": "ok"}`` (no token needed), ``GET /info``: the rewards with their class,
  version, settings and whether they are group-wise; the server's limits and batching; its stats.
* Dynamic batching: requests for the same reward (and video shape) that arrive within ``max_wait_ms`` are
  scored in one call of up to ``max_batch_size`` samples; one batch runs at a time. ``/info`` counts
  the batches and their sizes.
* Binds ``127.0.0.1`` unless told otherwise. With the environment variable ``token_env`` set, every
  request but ``/health`` needs ``Authorization: Bearer <token>`` (401 otherwise, nothing scored); the
  token is never logged or written. Requests above ``max_request_mb`` or ``max_samples_per_request``
  get 413; malformed ones 400; unknown rewards 404.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import hmac
import importlib.metadata
import json
import logging
import os
import socket
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from .base import Reward, RewardOutput
from .transport import ScoreRequest, TransportError, decode_request, to_json_safe

try:  # the serve extra: pip install "edit-grpo[serve]"
    from fastapi import FastAPI, Request
    from fastapi.responses import Response
except ImportError:  # pragma: no cover - checked where the app is built
    FastAPI = Request = Response = None

logger = logging.getLogger("rewards.serve")

__all__ = ["Batcher", "ServeConfig", "ServerHandle", "build_app", "build_served", "main", "merge_requests",
           "start_server"]

DEFAULT_TOKEN_ENV = "EDITGRPO_REWARD_TOKEN"


@dataclass
class ServeConfig:
    """The reward server's settings (``python -m rewards.serve recipe=... key=value``)."""

    rewards: Any = None                  # the recipe's rewards block: {name: {weight, ...kwargs}} (weights unused)
    only: Optional[list[str]] = None     # serve only these components of it (None: all)
    host: str = "127.0.0.1"              # bind address; 0.0.0.0 serves other machines (set a token then)
    port: int = 8100                     # 0: any free port (the URL is printed)
    max_batch_size: int = 32             # samples per reward call (dynamic batching)
    max_wait_ms: float = 5.0             # how long a batch waits for more requests
    max_samples_per_request: int = 64    # larger requests get 413
    max_request_mb: float = 512.0        # larger bodies get 413
    token_env: str = DEFAULT_TOKEN_ENV   # env var of the bearer token; unset or empty: no token needed
    device: Optional[str] = None         # where models load and frames are scored (None: cuda if available, else cpu;
                                         # a reward's own device setting wins)
    log_level: str = "info"              # uvicorn and server log level


# ------------------------------------------------------------------------------------------------
# What is served
# ------------------------------------------------------------------------------------------------
@dataclass
class Served:
    """One served reward: the instance, its registered type and the recipe settings it was built with."""

    reward: Reward
    kind: str
    settings: dict[str, Any] = field(default_factory=dict)


def _version(obj: Any) -> str | None:
    version = getattr(obj, "version", None)
    if isinstance(version, str):
        return version
    top = type(obj).__module__.split(".")[0]
    for dist in importlib.metadata.packages_distributions().get(top, []):
        try:
            return f"{dist} {importlib.metadata.version(dist)}"
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _frames_spec(reward: Reward) -> Any:
    """The reward's frame sampling as JSON (clients send only those frames when that is exact: ``{"num": n}``)."""
    frames = getattr(reward, "frames", "all")
    return dict(frames) if isinstance(frames, dict) or hasattr(frames, "items") else frames


def serve_device(device: str | None) -> torch.device:
    """The server's device: ``device``, else cuda when available, else cpu."""
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def build_served(rewards_cfg: Any, only: list[str] | None = None, device: str | None = None) -> dict[str, Served]:
    """Build the rewards of a ``rewards:`` block (all, or the ``only`` ones) as the trainer would, and load their
    models on ``device`` (:meth:`Reward.load`), so that a missing model stops the server at start."""
    from .registry import _entries, _to_plain, build_reward, check_rewards_config

    entries = _entries(rewards_cfg)
    names = [e[0] for e in entries]
    unknown = sorted(set(only or []) - set(names))
    if unknown:
        raise ValueError(f"only={unknown} names no reward of the recipe (it has {', '.join(names)})")
    selected = [e for e in entries if only is None or e[0] in only]
    for name, _, _, kwargs in selected:
        if "server" in kwargs:
            raise ValueError(f"rewards.{name} names a server itself; a reward server computes its rewards locally")
    plain = _to_plain(rewards_cfg)
    check_rewards_config({name: plain[name] for name, *_ in selected})  # all known and well-formed before a model loads
    served = {}
    for name, kind, _, kwargs in selected:
        try:
            served[name] = Served(build_reward(kind, **kwargs), kind, kwargs)
            served[name].reward.load(serve_device(device))
        except (TypeError, ValueError, OSError) as e:
            raise type(e)(f"rewards.{name}: {e}") from e
    return served


# ------------------------------------------------------------------------------------------------
# Batching
# ------------------------------------------------------------------------------------------------
def merge_requests(requests: list[ScoreRequest]) -> tuple[ScoreRequest, list[int]]:
    """Concatenate requests for one reward (same video shapes) into one batch; returns it and each request's
    size. Group ids are renumbered so that two requests' groups never merge; a request without groups makes
    every sample a group of its own."""
    sizes = [r.batch for r in requests]
    refs = None
    if any(r.references is not None for r in requests):
        refs = [x for r in requests for x in (r.references if r.references is not None else [None] * r.batch)]
    ids: dict[tuple, int] = {}
    groups = []
    for k, r in enumerate(requests):
        for i in range(r.batch):
            key = (k, r.groups[i]) if r.groups is not None else (k, "sample", i)
            groups.append(ids.setdefault(key, len(ids)))
    merged = ScoreRequest(
        requests[0].reward, torch.cat([r.edited for r in requests]), torch.cat([r.source for r in requests]),
        [t for r in requests for t in r.source_captions], [t for r in requests for t in r.target_captions],
        [t for r in requests for t in r.instructions], refs, groups)
    return merged, sizes


def _batch_key(r: ScoreRequest) -> tuple:
    return (r.reward, tuple(r.edited.shape[1:]), tuple(r.source.shape[1:]))


class Batcher:
    """Collects scoring requests and runs them in batches (up to ``max_batch_size`` samples, waiting at most
    ``max_wait`` seconds for more) on one worker thread; counts batches and their sizes."""

    def __init__(self, served: dict[str, Served], max_batch_size: int, max_wait: float, device: str | None = "cpu"):
        self.served = served
        self.device = serve_device(device)
        self.max_batch_size = int(max_batch_size)
        self.max_wait = float(max_wait)
        self.queue: asyncio.Queue | None = None
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="reward")
        self.batch_sizes: Counter = Counter()
        self.stats = {"requests": 0, "samples": 0, "batches": 0, "errors": 0, "score_seconds": 0.0}
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self.queue = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self.pool.shutdown(wait=False, cancel_futures=True)

    async def submit(self, request: ScoreRequest) -> RewardOutput:
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((request, future))
        return await future

    def _score(self, requests: list[ScoreRequest]) -> list[RewardOutput]:
        merged, sizes = merge_requests(requests)
        t = time.perf_counter()
        with torch.no_grad():  # frames on the server's device (a reward with its own device setting moves them)
            out = self.served[merged.reward].reward(merged.edited.to(self.device), merged.source.to(self.device),
                                                    **merged.kwargs())
        self.stats["score_seconds"] += time.perf_counter() - t
        results, start = [], 0
        for n in sizes:
            details = out.details[start:start + n] if out.details is not None else None
            results.append(RewardOutput(out.scores[start:start + n], details))
            start += n
        return results

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        pending: list[tuple[ScoreRequest, asyncio.Future]] = []
        while True:
            if not pending:
                pending.append(await self.queue.get())
            deadline = loop.time() + self.max_wait
            while sum(r.batch for r, _ in pending) < self.max_batch_size:
                try:
                    pending.append(await asyncio.wait_for(self.queue.get(), max(0.0, deadline - loop.time())))
                except asyncio.TimeoutError:
                    break
            # the first request's kind goes now, with every compatible request that fits in the batch
            key, take, size, rest = _batch_key(pending[0][0]), [], 0, []
            for item in pending:
                if _batch_key(item[0]) == key and (not take or size + item[0].batch <= self.max_batch_size):
                    take.append(item)
                    size += item[0].batch
                else:
                    rest.append(item)
            pending = rest
            take = [(r, f) for r, f in take if not f.cancelled()]
            if not take:
                continue
            self.batch_sizes[sum(r.batch for r, _ in take)] += 1
            self.stats["batches"] += 1
            try:
                outs = await loop.run_in_executor(self.pool, self._score, [r for r, _ in take])
            except Exception as e:  # noqa: BLE001 - the reward's own error goes back to the clients
                self.stats["errors"] += 1
                logger.warning("reward %s failed on a batch of %d: %s", key[0], size, e)
                for _, f in take:
                    if not f.done():
                        f.set_exception(e)
                continue
            for (_, f), out in zip(take, outs):
                if not f.done():
                    f.set_result(out)

    def snapshot(self) -> dict[str, Any]:
        """Counters: requests, samples, batches, errors, seconds in the rewards, and the batch-size histogram."""
        batches = self.stats["batches"]
        return {**self.stats, "batch_sizes": {str(k): v for k, v in sorted(self.batch_sizes.items())},
                "max_batch": max(self.batch_sizes, default=0),
                "mean_batch": (sum(k * v for k, v in self.batch_sizes.items()) / batches) if batches else 0.0}


# ------------------------------------------------------------------------------------------------
# The app
# ------------------------------------------------------------------------------------------------
def _json(payload: Any, status: int = 200):
    return Response(json.dumps(to_json_safe(payload), separators=(",", ":")), status_code=status,
                    media_type="application/json")


def build_app(served: dict[str, Served], cfg: ServeConfig):
    """The FastAPI app serving ``served`` with ``cfg``'s batching, limits and token."""
    from contextlib import asynccontextmanager

    if FastAPI is None:
        raise ImportError("the reward server needs fastapi and uvicorn: pip install 'edit-grpo[serve]'")
    token = os.environ.get(cfg.token_env) if cfg.token_env else None
    max_bytes = int(cfg.max_request_mb * 2**20)
    batcher = Batcher(served, cfg.max_batch_size, cfg.max_wait_ms / 1000.0, getattr(cfg, "device", None))
    rejected: Counter = Counter()

    @asynccontextmanager
    async def lifespan(app):
        batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(title="Edit-GRPO reward server", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.batcher = batcher

    def refuse(status: int, detail: str):
        rejected[str(status)] += 1
        return _json({"detail": detail}, status)

    def authorised(request: Request) -> bool:
        if not token:
            return True
        given = request.headers.get("authorization", "")
        return given.startswith("Bearer ") and hmac.compare_digest(given[7:].encode(), token.encode())

    described = {name: {"type": s.kind, "class": f"{type(s.reward).__module__}.{type(s.reward).__qualname__}",
                        "version": _version(s.reward), "settings": s.settings,
                        "group_wise": bool(getattr(s.reward, "group_wise", False)),
                        "frames": _frames_spec(s.reward)}
                 for name, s in served.items()}  # once: looking up package versions takes a while

    def info() -> dict[str, Any]:
        return {
            "rewards": described,
            "server": {"max_batch_size": cfg.max_batch_size, "max_wait_ms": cfg.max_wait_ms,
                       "max_samples_per_request": cfg.max_samples_per_request, "max_request_mb": cfg.max_request_mb,
                       "auth": bool(token), "torch": torch.__version__},
            "stats": {**batcher.snapshot(), "rejected": dict(rejected)},
        }

    @app.get("/health")
    async def health():
        return _json({"status": "ok"})

    @app.get("/info")
    async def get_info(request: Request):
        if not authorised(request):
            return refuse(401, f"missing or wrong bearer token (the server reads it from ${cfg.token_env})")
        return _json(info())

    @app.post("/score/{name}")
    async def score(name: str, request: Request):
        if not authorised(request):
            return refuse(401, f"missing or wrong bearer token (the server reads it from ${cfg.token_env})")
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > max_bytes:
            return refuse(413, f"request of {int(length)} bytes exceeds max_request_mb={cfg.max_request_mb:g}")
        chunks, total = [], 0
        async for chunk in request.stream():
            total += len(chunk)
            if total > max_bytes:
                return refuse(413, f"request exceeds max_request_mb={cfg.max_request_mb:g}")
            chunks.append(chunk)
        try:
            req = decode_request(b"".join(chunks))
        except TransportError as e:
            return refuse(400, f"malformed request: {e}")
        if req.reward != name or name not in served:
            return refuse(404, f"no reward {name!r} here (served: {', '.join(served)})")
        if req.batch > cfg.max_samples_per_request:
            return refuse(413, f"{req.batch} samples exceed max_samples_per_request={cfg.max_samples_per_request}")
        batcher.stats["requests"] += 1
        batcher.stats["samples"] += req.batch
        try:
            out = await batcher.submit(req)
        except ValueError as e:  # the reward's input check (shapes, range): the client's request
            return refuse(400, f"reward {name}: {str(e).splitlines()[0]}")
        except Exception as e:  # noqa: BLE001
            return _json({"detail": f"reward {name} failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"},
                         500)
        return _json({"scores": out.scores.tolist(), "details": out.details})

    return app


# ------------------------------------------------------------------------------------------------
# Running it
# ------------------------------------------------------------------------------------------------
def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


@dataclass
class ServerHandle:
    """A server running on a thread of this process (tests, benchmarks): its ``url``; ``stop()`` ends it."""

    url: str
    server: Any
    thread: threading.Thread
    app: Any

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)

    @property
    def stats(self) -> dict[str, Any]:
        return self.app.state.batcher.snapshot()


def _uvicorn_server(app, cfg: ServeConfig):
    import uvicorn

    return uvicorn.Server(uvicorn.Config(app, log_level=cfg.log_level.lower(), access_log=False, lifespan="on",
                                         timeout_keep_alive=30))


def start_server(served: dict[str, Served], cfg: ServeConfig | None = None, **overrides: Any) -> ServerHandle:
    """Serve ``served`` on a background thread (port 0 = any free port); returns once it accepts requests."""
    cfg = cfg or ServeConfig()
    for k, v in overrides.items():
        setattr(cfg, k, v)
    sock = _bind(cfg.host, cfg.port)
    app = build_app(served, cfg)
    server = _uvicorn_server(app, cfg)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name="reward-server")
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        if not thread.is_alive() or time.time() > deadline:
            raise RuntimeError("the reward server did not start")
        time.sleep(0.01)
    host, port = sock.getsockname()[:2]
    return ServerHandle(f"http://{host}:{port}", server, thread, app)


def main(cfg) -> None:
    from viva_base.errors import UserError

    from .registry import UnknownRewardError, _to_plain

    if cfg.rewards is None:
        raise UserError("the recipe has no rewards: block; pass recipe=<a recipe with one> or rewards.<name>.model=...")
    for key in ("max_batch_size", "max_samples_per_request"):
        if getattr(cfg, key) < 1:
            raise UserError(f"{key}={getattr(cfg, key)!r} must be >= 1")
    if cfg.max_wait_ms < 0 or cfg.max_request_mb <= 0 or not 0 <= cfg.port < 65536:
        raise UserError("need max_wait_ms >= 0, max_request_mb > 0 and 0 <= port < 65536")
    if FastAPI is None:
        raise UserError("the reward server needs fastapi and uvicorn: pip install 'edit-grpo[serve]'")
    plain = ServeConfig(**{k: _to_plain(getattr(cfg, k)) for k in ServeConfig.__dataclass_fields__})
    try:
        served = build_served(plain.rewards, plain.only, plain.device)
    except UnknownRewardError as e:
        raise UserError(str(e)) from None
    except (TypeError, ValueError, OSError) as e:
        raise UserError(str(e).splitlines()[0]) from None
    try:
        sock = _bind(plain.host, plain.port)
    except OSError as e:
        raise UserError(f"cannot listen on {plain.host}:{plain.port}: {e.strerror or e}") from None
    token = bool(plain.token_env and os.environ.get(plain.token_env))
    if plain.host not in ("127.0.0.1", "localhost", "::1") and not token:
        logger.warning("serving on %s without a token: anyone who reaches this port can use it (set $%s)",
                       plain.host, plain.token_env)
    host, port = sock.getsockname()[:2]
    logger.info("serving %s; batches of up to %d samples (%g ms wait); %s", ", ".join(served), plain.max_batch_size,
                plain.max_wait_ms, f"bearer token required (from ${plain.token_env})" if token else "no token")
    print(f"reward server listening on http://{host}:{port}", flush=True)
    _uvicorn_server(build_app(served, plain), plain).run(sockets=[sock])


def load_config(argv) -> Any:
    """The server's config: the recipe's ``rewards:`` block only (the rest of a training recipe is ignored),
    then ``key=value`` overrides of :class:`ServeConfig`."""
    from omegaconf import OmegaConf

    from viva_base.recipe import load_recipe, parse_args, read_recipe_file

    path, overrides = parse_args(argv)
    if path is None:
        return load_recipe(ServeConfig, overrides)
    loaded = read_recipe_file(path)
    with tempfile.TemporaryDirectory() as tmp:
        only = os.path.join(tmp, "rewards.yaml")
        OmegaConf.save(OmegaConf.create({"rewards": loaded.get("rewards")}), only)
        return load_recipe(ServeConfig, overrides, recipe=only)


def cli(argv=None) -> int:
    """``python -m rewards.serve``: user errors are one line on stderr and exit code 2."""
    import sys

    from viva_base.errors import UserError
    from viva_base.recipe import RecipeError

    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        from viva_base.recipe import recipe_reference

        print("usage: python -m rewards.serve recipe=PATH [host=127.0.0.1] [port=8100] [key=value ...]\n")
        print(__doc__.strip().split("\n\n")[0])
        print("\nArguments: recipe=PATH (its rewards: block), key=value for the keys below.\n")
        print(recipe_reference(ServeConfig))
        return 0
    logging.basicConfig(level=os.environ.get("LOGLEVEL", "INFO"), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        main(load_config(argv))
    except (RecipeError, UserError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    from viva_base.errors import exit_with

    exit_with(cli)
