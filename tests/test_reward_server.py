"""The reward server (rewards.serve) and its client (rewards.remote) on 127.0.0.1: the wire format, the same
numbers as in-process scoring, dynamic batching under load, tokens, limits, and every failure a client meets
(a slow server, malformed answers, a server that is down)."""
from __future__ import annotations

import concurrent.futures
import json
import math
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from rewards import CombinedReward, Reward, register_reward
from rewards.remote import RemoteReward, RemoteRewardError, backoff_seconds, chunk_by_groups
from rewards.serve import ServeConfig, Served, build_served, cli, merge_requests, start_server
from rewards.transport import TransportError, decode_request, encode_request, from_json_safe, to_json_safe


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")


@register_reward("test_sleepy")
class Sleepy(Reward):
    """Test reward: the mean pixel of the edit, after sleeping ``seconds`` per call."""

    def __init__(self, seconds: float = 0.0, **kw):
        super().__init__(**kw)
        self.seconds = seconds

    def score(self, edited, source, *, source_captions, target_captions, instructions, references):
        time.sleep(self.seconds)
        return edited.mean(dim=(1, 2, 3, 4))


@register_reward("test_group_rank")
class GroupRank(Reward):
    """Test group-wise reward: a sample's rank by mean pixel within its group, divided by (group size - 1)."""

    group_wise = True

    def score_group(self, edited, source, *, source_captions, target_captions, instructions, references):
        m = edited.mean(dim=(1, 2, 3, 4))
        ranks = m.argsort().argsort().float()
        return ranks / max(len(m) - 1, 1)


def videos(b, f=2, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, f, 3, size, size, generator=g), torch.rand(b, f, 3, size, size, generator=g)


def texts(b):
    return dict(source_captions=[f"src {i}" for i in range(b)], target_captions=[f"tgt {i}" for i in range(b)],
                instructions=[f"do {i}" for i in range(b)])


@pytest.fixture()
def serve():
    handles = []

    def start(rewards_cfg, **cfg):
        h = start_server(build_served(rewards_cfg), ServeConfig(port=0, log_level="warning", **cfg))
        handles.append(h)
        return h

    yield start
    for h in handles:
        h.stop()


# ---------------------------------------------------------------------------------------------- wire format
def test_transport_round_trip_is_exact_in_float32_and_bounded_when_compact():
    e, s = videos(3, f=9, size=32)
    refs = [None, torch.rand(3, 16, 16), None]
    body = encode_request("clip_if", e, s, **texts(3), references=refs, groups=[0, 0, 1])
    req = decode_request(body)
    assert req.reward == "clip_if" and req.groups == [0, 0, 1] and req.instructions == ["do 0", "do 1", "do 2"]
    assert torch.equal(req.edited, e) and torch.equal(req.source, s)
    assert req.references[0] is None and torch.equal(req.references[1], refs[1])
    # bytes per sample: two 9-frame 32x32 RGB videos = 2 * 9 * 3 * 32 * 32 values, plus a small JSON header
    values = 2 * 9 * 3 * 32 * 32
    sizes = {d: len(encode_request("r", e, s, **texts(3), frames=d)) for d in ("float32", "float16", "uint8")}
    for d, per_value in (("float32", 4), ("float16", 2), ("uint8", 1)):
        assert 3 * values * per_value < sizes[d] < 3 * values * per_value + 1000
    for d, bound in (("float16", 2.5e-4), ("uint8", 1 / 510 + 1e-7)):
        err = (decode_request(encode_request("r", e, s, **texts(3), frames=d)).edited - e).abs().max().item()
        assert 0 < err <= bound, (d, err)


def test_transport_refuses_malformed_bodies():
    e, s = videos(2)
    good = encode_request("r", e, s, **texts(2))
    for bad, match in [(b"\x00\x00", "shorter"), (b"\xff\xff\xff\xff{}", "does not fit"),
                       (good[:-10], "do not fit"), (b"\x00\x00\x00\x02[]", "must be an object")]:
        with pytest.raises(TransportError, match=match):
            decode_request(bad)
    header = json.loads(good[4:4 + int.from_bytes(good[:4], "big")])
    header["instructions"] = ["only one"]
    head = json.dumps(header).encode()
    with pytest.raises(TransportError, match="instructions must be a list of 2"):
        decode_request(len(head).to_bytes(4, "big") + head + good[4 + int.from_bytes(good[:4], "big"):])


def test_json_nan_and_small_pure_functions():
    assert to_json_safe({"a": [1.0, float("nan")], "b": torch.tensor([2.0, float("inf")])}) == \
        {"a": [1.0, None], "b": [2.0, None]}
    t = from_json_safe([0.5, None], 2)
    assert t[0] == 0.5 and math.isnan(t[1])
    with pytest.raises(ValueError, match="2 scores"):
        from_json_safe([1.0], 2)
    assert [backoff_seconds(k, 0.5, 3.0) for k in range(4)] == [0.5, 1.0, 2.0, 3.0]
    assert chunk_by_groups(None, 5, 2) == [[0, 1], [2, 3], [4]]
    assert chunk_by_groups([0, 0, 1, 1, 1, 2], 6, 4) == [[0, 1], [2, 3, 4, 5]]
    assert chunk_by_groups([0, 0, 0, 1], 4, 2) == [[0, 1, 2], [3]]   # a group is never split


def test_merge_keeps_groups_apart():
    e, s = videos(4)
    a = decode_request(encode_request("r", e[:2], s[:2], **texts(2), groups=[7, 7]))
    b = decode_request(encode_request("r", e[2:], s[2:], **texts(2), groups=[7, 8]))
    c = decode_request(encode_request("r", e[:2], s[:2], **texts(2)))
    merged, sizes = merge_requests([a, b, c])
    assert sizes == [2, 2, 2] and merged.groups == [0, 0, 1, 2, 3, 4] and merged.batch == 6


# ---------------------------------------------------------------------------------------------- numbers
def test_remote_scores_equal_in_process_and_mix_with_local(serve):
    cfg = {"clip_if": {"weight": 1.0, "model": "tiny:hf"}, "clip_sp": {"weight": 0.5, "model": "tiny:hf"},
           "pixel_sp": {"weight": 0.25}}
    h = serve({k: v for k, v in cfg.items() if k != "pixel_sp"}, max_samples_per_request=3)
    remote_cfg = {"clip_if": {**cfg["clip_if"], "server": h.url}, "clip_sp": {"weight": 0.5, "server": h.url},
                  "pixel_sp": {"weight": 0.25}}
    e, s = videos(5, f=3, size=32, seed=1)
    local, remote = CombinedReward.from_config(cfg)(e, s, **texts(5)), CombinedReward.from_config(remote_cfg)(e, s, **texts(5))
    for k in cfg:
        assert torch.allclose(local.components[k], remote.components[k], atol=1e-6, rtol=0), k
    assert torch.allclose(local.total, remote.total, atol=1e-6, rtol=0)
    assert remote.details["clip_if"][0].keys() == local.details["clip_if"][0].keys()
    info = json.loads(urllib.request.urlopen(h.url + "/info").read())
    assert info["rewards"]["clip_if"]["settings"] == {"model": "tiny:hf"} and info["rewards"]["clip_if"]["version"]
    assert info["rewards"]["clip_if"]["class"] == "rewards.clip.ClipInstructionFollowing" and not info["rewards"]["clip_if"]["group_wise"]
    assert info["server"]["max_samples_per_request"] == 3
    assert info["stats"]["samples"] == 10 and info["stats"]["requests"] == 4    # 5 samples in requests of 3 + 2, x2
    assert json.loads(urllib.request.urlopen(h.url + "/health").read()) == {"status": "ok"}


def test_a_setting_that_differs_from_the_server_is_an_error(serve):
    h = serve({"clip_if": {"model": "tiny:hf"}})
    e, s = videos(1)
    with pytest.raises(RemoteRewardError, match=r"rewards.clip_if.model='tiny:hf:3' but the server .* uses 'tiny:hf'"):
        RemoteReward("clip_if", h.url, model="tiny:hf:3")(e, s, **texts(1))
    with pytest.raises(RemoteRewardError, match="does not serve 'clip_sp'; it serves clip_if"):
        RemoteReward("clip_sp", h.url)(e, s, **texts(1))


def test_group_wise_reward_served_keeps_each_request_s_groups(serve):
    h = serve({"test_group_rank": {}})
    e, s = videos(6, seed=3)
    groups = [0, 0, 0, 1, 1, 1]
    want = GroupRank()(e, s, **texts(6), groups=groups).scores
    assert sorted(want[:3].tolist()) == [0.0, 0.5, 1.0]
    r = RemoteReward("test_group_rank", h.url)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:   # concurrent requests land in one server batch
        outs = list(pool.map(lambda _: r(e, s, **texts(6), groups=groups).scores, range(4)))
    assert r.group_wise and all(torch.equal(o, want) for o in outs)
    assert h.stats["samples"] == 24
    # without groups every sample is its own group: a group of one has rank 0
    assert GroupRank()(e, s, **texts(6)).scores.tolist() == [0.0] * 6


def test_load_32_clients_x_20_requests_all_correct_and_batched(serve):
    h = serve({"test_sleepy": {}}, max_batch_size=64, max_wait_ms=20)
    r = RemoteReward("test_sleepy", h.url, max_retries=0)

    def client(k):
        bad = 0
        for j in range(20):
            e, s = videos(1 + (k + j) % 3, f=1, size=4, seed=1000 * k + j)
            got = r(e, s, **texts(e.shape[0])).scores
            bad += not torch.allclose(got, e.mean(dim=(1, 2, 3, 4)), atol=1e-6, rtol=0)
        return bad

    t = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        bad = sum(pool.map(client, range(32)))
    seconds = time.perf_counter() - t
    stats = h.stats
    assert bad == 0 and stats["requests"] == 640 and stats["errors"] == 0
    assert stats["samples"] == sum(1 + (k + j) % 3 for k in range(32) for j in range(20))
    assert stats["batches"] < stats["requests"] / 2 and stats["max_batch"] > 4      # dynamic batching at work
    assert sum(int(k) * v for k, v in stats["batch_sizes"].items()) == stats["samples"]
    print(f"load: 640 requests in {seconds:.2f} s, {stats['batches']} batches, mean {stats['mean_batch']:.1f} "
          f"samples, max {stats['max_batch']}")


# ---------------------------------------------------------------------------------------------- refusals
def test_token_missing_or_wrong_is_401_and_nothing_is_scored(serve, monkeypatch):
    monkeypatch.setenv("TEST_SERVER_TOKEN", "s3cret-token")
    h = serve({"test_sleepy": {}}, token_env="TEST_SERVER_TOKEN")
    e, s = videos(2)
    with pytest.raises(RemoteRewardError, match=r"refused the request \(HTTP 401\): set \$TEST_CLIENT_TOKEN"):
        RemoteReward("test_sleepy", h.url, token_env="TEST_CLIENT_TOKEN")(e, s, **texts(2))
    monkeypatch.setenv("TEST_CLIENT_TOKEN", "wrong")
    with pytest.raises(RemoteRewardError, match="HTTP 401.*does not accept") as err:
        RemoteReward("test_sleepy", h.url, token_env="TEST_CLIENT_TOKEN")(e, s, **texts(2))
    assert "wrong" not in str(err.value) and "s3cret" not in str(err.value)
    with pytest.raises(urllib.error.HTTPError) as raw:   # straight to /score without /info: 401 too
        urllib.request.urlopen(urllib.request.Request(h.url + "/score/test_sleepy",
                                                      data=encode_request("test_sleepy", e, s, **texts(2))))
    assert raw.value.code == 401
    assert h.stats["samples"] == 0 and h.stats["batches"] == 0          # nothing scored
    assert json.loads(urllib.request.urlopen(h.url + "/health").read()) == {"status": "ok"}
    monkeypatch.setenv("TEST_CLIENT_TOKEN", "s3cret-token")
    got = RemoteReward("test_sleepy", h.url, token_env="TEST_CLIENT_TOKEN")(e, s, **texts(2)).scores
    assert torch.allclose(got, e.mean(dim=(1, 2, 3, 4)))


def test_oversized_requests_are_413_and_bad_bodies_400(serve):
    h = serve({"test_sleepy": {}}, max_samples_per_request=2, max_request_mb=0.01)
    e, s = videos(3)
    with pytest.raises(urllib.error.HTTPError) as raw:
        urllib.request.urlopen(urllib.request.Request(h.url + "/score/test_sleepy",
                                                      data=encode_request("test_sleepy", e, s, **texts(3))))
    assert raw.value.code == 413 and "3 samples exceed max_samples_per_request=2" in raw.value.read().decode()
    big_e, big_s = videos(1, f=4, size=32)       # 2 x 4 x 3 x 32 x 32 x 4 bytes = 98 KB > 10 KB
    with pytest.raises(RemoteRewardError, match="HTTP 413: request of .* bytes exceeds max_request_mb=0.01"):
        RemoteReward("test_sleepy", h.url)(big_e, big_s, **texts(1))
    with pytest.raises(urllib.error.HTTPError) as raw:
        urllib.request.urlopen(urllib.request.Request(h.url + "/score/test_sleepy", data=b"\x00\x00\x00\x05hello"))
    assert raw.value.code == 400 and "malformed request" in raw.value.read().decode()
    assert h.stats["samples"] == 0
    # within the limits: split into requests of the server's max_samples_per_request
    got = RemoteReward("test_sleepy", h.url)(e, s, **texts(3)).scores
    assert torch.allclose(got, e.mean(dim=(1, 2, 3, 4))) and h.stats["requests"] == 2


# ---------------------------------------------------------------------------------------------- failures
def test_slow_server_times_out_retries_then_nan_then_gives_up(serve):
    h = serve({"test_sleepy": {"seconds": 1.0}})
    e, s = videos(2)
    r = RemoteReward("test_sleepy", h.url, timeout=0.3, max_retries=1, backoff=0.01, give_up_after=2)
    out = CombinedReward({"test_sleepy": r}, {"test_sleepy": 1.0})(e, s, **texts(2))
    assert torch.isnan(out.total).all() and "within 0.3 s" in out.details["test_sleepy"][0]["remote_error"]
    assert r.stats["retries"] == 1 and r.stats["failed_samples"] == 2 and r.stats["failed_requests"] == 1
    with pytest.raises(RemoteRewardError, match="is down: 2 requests in a row failed after 1 retries each"):
        r(e, s, **texts(2))


class _BadServer(ThreadingHTTPServer):
    """Answers /info correctly and every /score with the next of ``answers`` (status, body), then the last."""

    daemon_threads = True

    def __init__(self, answers):
        super().__init__(("127.0.0.1", 0), _BadHandler)
        self.answers, self.posts = list(answers), 0

    def handle_error(self, request, client_address):
        pass


class _BadHandler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def _send(self, status, body: bytes):
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):  # noqa: N802
        self._send(200, json.dumps({"rewards": {"r": {"settings": {}}}, "server": {}}).encode())

    def do_POST(self):  # noqa: N802
        self.rfile.read(int(self.headers["Content-Length"]))
        srv = self.server
        status, body = srv.answers[min(srv.posts, len(srv.answers) - 1)]
        srv.posts += 1
        self._send(status, body)


@pytest.mark.parametrize("answers", [
    [(200, b"<html>proxy hiccup</html>")],
    [(200, b'{"scores": [1.0]}')],                      # one score for two samples
    [(200, b'{"scores": ["high", 2]}')],
    [(503, b'{"detail": "busy"}')],
])
def test_malformed_or_failing_answers_are_retried_then_nan(answers):
    srv = _BadServer(answers)
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{srv.server_address[1]}"
        e, s = videos(2)
        r = RemoteReward("r", url, max_retries=2, backoff=0.01, give_up_after=3)
        out = r(e, s, **texts(2))
        assert torch.isnan(out.scores).all() and srv.posts == 3 and r.stats["failed_samples"] == 2
        # a good answer after a bad one: the retry succeeds, nothing is NaN
        srv.answers, srv.posts = [answers[0], (200, b'{"scores": [0.25, null], "details": null}')], 0
        out = r(e, s, **texts(2))
        assert out.scores[0] == 0.25 and math.isnan(out.scores[1]) and srv.posts == 2
    finally:
        srv.shutdown()


def test_a_server_that_is_not_there():
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    r = RemoteReward("clip_if", f"http://127.0.0.1:{port}", max_retries=1, backoff=0.01)
    e, s = videos(1)
    with pytest.raises(RemoteRewardError, match=r"is down: /info failed after 1 retries \(last error: cannot reach"):
        r(e, s, **texts(1))


def test_recipe_checks_and_cli_errors(capsys, monkeypatch, repo_root):
    monkeypatch.chdir(repo_root)
    from rewards.registry import check_rewards_config

    check_rewards_config({"clip_if": {"server": "http://10.0.0.5:8100", "model": "anything", "timeout": 5}})
    with pytest.raises(ValueError, match="rewards.clip_if: server must be an http"):
        check_rewards_config({"clip_if": {"server": "10.0.0.5:8100"}})
    with pytest.raises(ValueError, match="transport must be one of float32, float16, uint8"):
        check_rewards_config({"clip_if": {"server": "http://h:1", "transport": "jpeg"}})
    assert cli(["recipe=recipes/tiny.yaml", "rewards.bogus={weight: 1}", "port=0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: unknown reward 'bogus'") and "\n" not in err
    assert cli(["recipe=recipes/tiny.yaml", "max_batch_size=0"]) == 2
    assert "max_batch_size=0 must be >= 1" in capsys.readouterr().err
    assert cli(["recipe=recipes/tiny.yaml", "prot=1"]) == 2
    assert "did you mean 'port'" in capsys.readouterr().err
    assert cli(["recipe=recipes/tiny.yaml", "only=[clip_xx]"]) == 2
    assert "only=['clip_xx'] names no reward of the recipe" in capsys.readouterr().err
    # a model that cannot load stops the server before it listens (models load at start, on the server's device)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert cli(["recipe=recipes/tiny.yaml", "rewards.clip_sp.model=hf:nobody/no-such-clip", "port=0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: rewards.clip_sp:") and "no-such-clip" in err


def test_served_rewards_report_their_types():
    served = build_served({"judge_a": {"type": "test_sleepy", "seconds": 0.0}, "pixel_sp": 1.0}, only=["judge_a"])
    assert list(served) == ["judge_a"] and isinstance(served["judge_a"], Served)
    assert served["judge_a"].kind == "test_sleepy" and served["judge_a"].settings == {"seconds": 0.0}


def test_only_the_frames_a_reward_samples_are_sent(serve):
    """A reward with frames {num: 3} looks at 3 of 9 frames: the client sends those 3 (a third of the bytes) and the
    score is the in-process one; with frames 'all' every frame goes."""
    from rewards import build_reward

    h = serve({"pixel_sp": {"frames": {"num": 3}}, "test_sleepy": {}})
    e, s = videos(2, f=9, size=8, seed=5)
    sent = []
    real = RemoteReward._request

    def spy(self, path, body=None):
        if body is not None:
            sent.append(decode_request(body).edited.shape[1])
        return real(self, path, body)

    RemoteReward._request = spy
    try:
        got = RemoteReward("pixel_sp", h.url, frames={"num": 3})(e, s, **texts(2)).scores
        RemoteReward("test_sleepy", h.url)(e, s, **texts(2))
    finally:
        RemoteReward._request = real
    assert sent == [3, 9]
    assert torch.allclose(got, build_reward("pixel_sp", frames={"num": 3})(e, s, **texts(2)).scores, atol=1e-7, rtol=0)


def test_an_unknown_reward_stops_the_server_before_any_model_loads(monkeypatch):
    """A recipe with one good reward and one unknown: the error comes before the good one's model is loaded (the
    server's one-line error had a model-loading progress bar in front of it)."""
    from rewards.base import Reward
    from rewards.registry import UnknownRewardError
    from rewards.serve import build_served

    loaded = []
    monkeypatch.setattr(Reward, "load", lambda self, device=None: loaded.append(type(self).__name__))
    with pytest.raises(UnknownRewardError, match="bogus"):
        build_served({"pixel_sp": {"weight": 1.0}, "bogus": {"weight": 1.0}})
    assert loaded == []
    with pytest.raises(TypeError, match="rewards.pixel_sp"):  # a reward's options too
        build_served({"pixel_sp": {"weight": 1.0, "no_such_option": 3}})
    assert loaded == []
    assert list(build_served({"pixel_sp": {"weight": 1.0}})) == ["pixel_sp"] and loaded
