"""The VLM judge against a real HTTP server on 127.0.0.1 that answers well, with malformed JSON, with
errors and too slowly."""
from __future__ import annotations

import base64
import io
import json
import math
import secrets
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch
from PIL import Image

from rewards import CombinedReward
from rewards.vlm_judge import (
    BASE_CRITERIA,
    CRITERIA,
    JUDGE_PROMPT,
    JudgeClient,
    JudgeParseError,
    build_judge_prompt,
    parse_judge_answer,
)

KEY_ENV = "EDITGRPO_TEST_JUDGE_KEY"


class FakeVLM(ThreadingHTTPServer):
    """An OpenAI-compatible /chat/completions server. What it answers depends on a tag in the
    instruction: GOOD (scores 8, 7, 6 [, 5]), FENCED (the JSON inside prose and a code fence),
    MALFORMED (not JSON), BADBODY (a non-JSON HTTP body), ERROR (HTTP 500 echoing the auth header),
    DENIED (HTTP 401 echoing the auth header), SLOW (answers after 1 s), FLAKY (500 once, then GOOD)."""

    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), Handler)
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        self.in_flight = 0
        self.max_in_flight = 0
        self.delay = 0.0
        self.linger = 0.0
        self.flaky_seen: set[str] = set()

    def handle_error(self, request, client_address):  # a client that timed out closed the socket
        pass

    @property
    def url(self):
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


def _answer(content):
    return {"id": "x", "object": "chat.completion", "choices": [{"index": 0, "finish_reason": "stop",
                                                                 "message": {"role": "assistant", "content": content}}]}


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def _send(self, status, payload):
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        # the request stops counting as in flight before its answer leaves: once the client has read the answer
        # it may start the next request, while this thread is still on its way out (counting after the write
        # let a 4th request overlap under concurrency=3 now and then)
        self._finish()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        self.wfile.flush()
        time.sleep(self.server.linger)  # a slow handler exit (widens the window the old count raced in)

    def _finish(self):
        if not self._finished:
            self._finished = True
            with self.server.lock:
                self.server.in_flight -= 1

    def do_POST(self):  # noqa: N802
        server: FakeVLM = self.server
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        auth = self.headers.get("Authorization")
        with server.lock:
            server.requests.append({"path": self.path, "auth": auth, "body": body})
            server.in_flight += 1
            server.max_in_flight = max(server.max_in_flight, server.in_flight)
        self._finished = False
        try:
            time.sleep(server.delay)
            prompt = body["messages"][0]["content"][0]["text"]
            with_ref = "subject_similarity" in prompt
            good = {"instruction_following": 8, "source_preservation": 7, "editing_quality": 6}
            if with_ref:
                good["subject_similarity"] = 5
            if "SLOW" in prompt:
                time.sleep(1.0)
                self._send(200, _answer(json.dumps(good)))
            elif "MALFORMED" in prompt:
                self._send(200, _answer("The edit looks great, I would say {instruction_following: eight"))
            elif "BADBODY" in prompt:
                self._send(200, b"<html>gateway hiccup</html>")
            elif "ERROR" in prompt:
                self._send(500, {"error": f"internal error; your header was {auth}"})
            elif "DENIED" in prompt:
                self._send(401, {"error": f"invalid key {auth}"})
            elif "FLAKY" in prompt and prompt not in server.flaky_seen:
                server.flaky_seen.add(prompt)
                self._send(503, {"error": "busy"})
            elif "FENCED" in prompt:
                self._send(200, _answer("Here is my rating.\n```json\n" + json.dumps(
                    {"Instruction Following": "9/10", "source-preservation": 4, "editing_quality": 7.5}) + "\n```"))
            else:
                self._send(200, _answer(json.dumps(good)))
        finally:
            self._finish()


@pytest.fixture()
def server(monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    srv = FakeVLM()
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture()
def key(monkeypatch):
    value = "sk-test-" + secrets.token_hex(16)
    monkeypatch.setenv(KEY_ENV, value)
    return value


def client(server, tmp_path, **kw):
    opts = dict(api_key_env=KEY_ENV, timeout=5.0, max_retries=2, concurrency=2, cache_dir=tmp_path / "cache",
                backoff=0.01, max_backoff=0.05)
    opts.update(kw)
    return JudgeClient(server.url, "fake-vlm", **opts)


def frames(n=2, seed=0):
    return torch.rand(n, 3, 24, 32, generator=torch.Generator().manual_seed(seed))


def decode_images(body):
    urls = [p["image_url"]["url"] for p in body["messages"][0]["content"] if p["type"] == "image_url"]
    assert all(u.startswith("data:image/png;base64,") for u in urls)
    return [Image.open(io.BytesIO(base64.b64decode(u.split(",", 1)[1]))) for u in urls]


# ------------------------------------------------------------------------------------------------
def test_parse_judge_answer():
    assert parse_judge_answer('{"instruction_following": 8, "source_preservation": 7, "editing_quality": 6}') == {
        "instruction_following": 8.0, "source_preservation": 7.0, "editing_quality": 6.0}
    text = 'Sure!\n```json\n{"scores": {"Instruction Following": "9/10", "Source-Preservation": "3", ' \
           '"editing quality": {"score": 10, "reason": "clean"}}}\n```\nThanks'
    assert parse_judge_answer(text) == {"instruction_following": 9.0, "source_preservation": 3.0,
                                        "editing_quality": 10.0}
    # the first object that has every criterion wins; earlier partial objects are skipped
    text = '{"note": 1} then {"instruction_following": 1, "source_preservation": 2, "editing_quality": 3, ' \
           '"subject_similarity": 4}'
    assert parse_judge_answer(text, CRITERIA)["subject_similarity"] == 4.0
    for bad in ("", "no json here", '{"instruction_following": 8, "source_preservation": 7}',
                '{"instruction_following": 11, "source_preservation": 7, "editing_quality": 6}',
                '{"instruction_following": true, "source_preservation": 7, "editing_quality": 6}',
                '{"instruction_following": "good", "source_preservation": 7, "editing_quality": 6}'):
        with pytest.raises(JudgeParseError):
            parse_judge_answer(bad)
    with pytest.raises(JudgeParseError):  # a reference requires subject_similarity
        parse_judge_answer('{"instruction_following": 8, "source_preservation": 7, "editing_quality": 6}', CRITERIA)


def test_prompt_is_a_recorded_constant():
    prompt = build_judge_prompt('turn the "cat" blue', with_reference=False)
    assert "turn the 'cat' blue" in prompt and "subject_similarity" not in prompt
    assert all(k in prompt for k in BASE_CRITERIA)
    assert "subject_similarity" in build_judge_prompt("x", with_reference=True)
    assert "{instruction}" in JUDGE_PROMPT


def test_valid_answers_parsed_and_request_format(server, tmp_path, key):
    judge = client(server, tmp_path)
    src, edt, ref = frames(2, 0), frames(2, 1), torch.rand(3, 20, 20)
    scores = judge.judge(src, edt, "GOOD make the cat blue")
    assert scores["instruction_following"] == 8.0 and scores["source_preservation"] == 7.0
    assert scores["editing_quality"] == 6.0 and math.isnan(scores["subject_similarity"])
    with_ref = judge.judge(src, edt, "GOOD add this dog", reference=ref)
    assert with_ref == {"instruction_following": 8.0, "source_preservation": 7.0, "editing_quality": 6.0,
                        "subject_similarity": 5.0}
    fenced = judge.judge(src, edt, "FENCED")
    assert (fenced["instruction_following"], fenced["source_preservation"], fenced["editing_quality"]) == (9, 4, 7.5)

    first = server.requests[0]
    assert first["path"] == "/v1/chat/completions" and first["auth"] == f"Bearer {key}"
    assert first["body"]["model"] == "fake-vlm"
    images = decode_images(first["body"])
    assert len(images) == 4 and all(im.size == (32, 24) and im.format == "PNG" for im in images)
    # the PNGs carry the frames' pixels (8-bit)
    sent = torch.from_numpy(np.array(images[2].convert("RGB"))).float().permute(2, 0, 1) / 255
    torch.testing.assert_close(sent, edt[0], atol=1 / 255, rtol=0)
    assert len(decode_images(server.requests[1]["body"])) == 5  # + the reference
    assert judge.failures == 0 and judge.stats["requests"] == 3


@pytest.mark.parametrize("tag,timeout", [("MALFORMED", 5.0), ("BADBODY", 5.0), ("ERROR", 5.0), ("SLOW", 0.3)])
def test_failures_are_retried_then_nan_and_counted(server, tmp_path, key, tag, timeout, caplog):
    judge = client(server, tmp_path, max_retries=2, timeout=timeout)
    result = judge.judge_result(frames(), frames(seed=1), f"{tag} do something")
    assert all(math.isnan(v) for v in result.scores.values())
    assert result.attempts == 3 and len(server.requests) == 3  # 1 + max_retries, all on the wire
    assert judge.failures == 1 and judge.stats["retries"] == 2
    assert result.error and key not in result.error
    assert "giving up after 3 attempt(s)" in caplog.text
    # nothing was cached: the next call asks the server again
    judge.judge(frames(), frames(seed=1), f"{tag} do something")
    assert len(server.requests) == 6 and judge.failures == 2


def test_client_errors_are_not_retried(server, tmp_path, key):
    judge = client(server, tmp_path)
    scores = judge.judge(frames(), frames(seed=1), "DENIED")
    assert all(math.isnan(v) for v in scores.values())
    assert len(server.requests) == 1 and judge.failures == 1


def test_transient_error_recovers(server, tmp_path, key):
    judge = client(server, tmp_path)
    scores = judge.judge(frames(), frames(seed=1), "FLAKY once")
    assert scores["instruction_following"] == 8.0
    assert len(server.requests) == 2 and judge.failures == 0 and judge.stats["retries"] == 1


def test_cache_serves_a_repeat_without_http(server, tmp_path, key):
    judge = client(server, tmp_path)
    src, edt = frames(2, 0), frames(2, 1)
    first = judge.judge(src, edt, "GOOD make it blue")
    assert len(server.requests) == 1
    again = judge.judge(src, edt, "GOOD make it blue")
    fresh = client(server, tmp_path)  # a new process would see the same cache on disk
    result = fresh.judge_result(src.clone(), edt.clone(), "GOOD make it blue")
    assert len(server.requests) == 1
    assert result.cached and judge.stats["cache_hits"] == 1
    assert again.keys() == first.keys() and all(
        (math.isnan(first[k]) and math.isnan(again[k])) or first[k] == again[k] for k in first)
    assert result.scores["instruction_following"] == first["instruction_following"]
    # any change of content is a new request
    judge.judge(src, edt, "GOOD make it red")
    judge.judge(src, frames(2, 2), "GOOD make it blue")
    JudgeClient(server.url, "other-vlm", api_key_env=KEY_ENV, cache_dir=tmp_path / "cache").judge(src, edt,
                                                                                                 "GOOD make it blue")
    client(server, tmp_path, temperature=0.5).judge(src, edt, "GOOD make it blue")
    assert len(server.requests) == 5


def test_bounded_concurrency(server, tmp_path, key):
    server.delay = 0.15
    server.linger = 0.05  # each handler thread lingers after its answer is out: the client must not count it
    judge = client(server, tmp_path, concurrency=3, cache_dir=None)
    items = [{"source_frames": frames(1, i), "edited_frames": frames(1, i + 100), "instruction": f"GOOD {i}"}
             for i in range(8)]
    start = time.perf_counter()
    results = judge.judge_batch(items)
    elapsed = time.perf_counter() - start
    assert [r["instruction_following"] for r in results] == [8.0] * 8
    assert server.max_in_flight == 3
    assert elapsed < 8 * 0.15  # it did run in parallel


def test_key_never_appears_in_outputs(server, tmp_path, key, caplog, capsys):
    caplog.set_level("DEBUG")
    reward = CombinedReward.from_config({"vlm_judge": {
        "weight": 1.0, "base_url": server.url, "model": "fake-vlm", "api_key_env": KEY_ENV, "max_retries": 1,
        "backoff": 0.01, "cache_dir": str(tmp_path / "cache"), "frames": {"num": 2}}})
    video = torch.rand(4, 5, 3, 16, 16)
    out = reward(video, video, source_captions=["a"] * 4, target_captions=["b"] * 4,
                 instructions=["GOOD one", "ERROR two", "DENIED three", "GOOD four"],
                 references=[None, None, None, torch.rand(3, 16, 16)])
    scores = out.components["vlm_judge"]
    assert scores[0].item() == pytest.approx((8 + 7 + 6) / 3)
    assert scores[3].item() == pytest.approx((8 + 7 + 6 + 5) / 4)
    assert torch.isnan(scores[1:3]).all() and torch.isnan(out.total[1:3]).all()
    judge = reward.rewards["vlm_judge"].client
    assert judge.failures == 2
    assert "judge_error" in out.details["vlm_judge"][1] and "judge_error" not in out.details["vlm_judge"][0]
    # frames={"num": 2} of source and edit (requests run concurrently: pick item 0's by its instruction)
    first = next(r for r in server.requests if "GOOD one" in json.dumps(r["body"]))
    assert len(decode_images(first["body"])) == 4
    # the server saw the key (and echoed it in its error bodies) ...
    assert any(r["auth"] == f"Bearer {key}" for r in server.requests)
    # ... but it is nowhere in what we log, print, return, cache or represent
    captured = capsys.readouterr()
    cache_text = "".join(p.read_text() for p in (tmp_path / "cache").rglob("*.json"))
    haystacks = [caplog.text, captured.out, captured.err, json.dumps(out.details), repr(reward), repr(judge),
                 cache_text, json.dumps(vars(judge), default=str)]
    assert "ERROR two" in caplog.text or "HTTP 500" in caplog.text  # the failures were logged
    for text in haystacks:
        assert key not in text


def test_judge_refuses_a_literal_key():
    with pytest.raises(ValueError, match="api_key_env"):
        CombinedReward.from_config({"vlm_judge": {"base_url": "http://127.0.0.1:1/v1", "model": "m",
                                                  "api_key": "sk-oops"}})
