"""Log-prob judge scores and the pairwise (group-wise) judge reward, against a local fake OpenAI-compatible server
that returns token log-probs: exact expected numbers."""
from __future__ import annotations

import base64
import io
import json
import math
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch
from PIL import Image

from rewards import CombinedReward, build_reward
from rewards.vlm_judge import expected_value, logprob_scores, parse_yes_no, token_probabilities, yes_no_probability
from rewards.vlm_pairwise import parse_winner, soft_winner, win_rates

LN = math.log


def tok(token, p, top=None):
    """A logprobs.content entry: the sampled token with probability p and alternatives {token: p}."""
    alts = [{"token": token, "logprob": LN(p)}] + [{"token": t, "logprob": LN(q)} for t, q in (top or {}).items()]
    return {"token": token, "logprob": LN(p), "top_logprobs": alts}


# The rating answer, tokenised; instruction_following 8 (alternatives 9, 7), source_preservation 7 (6), editing_quality
# 10 split into "1" "0" (no single token holds it: the parsed 10 is kept).
RATING = [tok('{"', 1), tok("instruction", 1), tok("_following", 1), tok('":', 1), tok(" ", 1),
          tok("8", 0.6, {"9": 0.3, " 7": 0.1}), tok(', "', 1), tok("source", 1), tok("_preservation", 1), tok('":', 1),
          tok(" ", 1), tok("7", 0.5, {"6": 0.5, "x": 0.2}), tok(', "', 1), tok("editing", 1), tok("_quality", 1),
          tok('":', 1), tok(" ", 1), tok("1", 0.9, {"9": 0.1}), tok("0", 1), tok("}", 1)]
RATING_TEXT = "".join(t["token"] for t in RATING)


class FakeJudge(ThreadingHTTPServer):
    """/chat/completions: rates (RATING), answers yes/no, or compares edits A and B by brightness (the brighter wins;
    with log-probs the winner's token has probability 0.7). Instruction tags: BIASED (always "A", P(A) = 0.9),
    NOPE (answers "No."); a comparison that shows an edit of brightness 0.5 fails with HTTP 500 under FAILMID."""

    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.bodies: list[dict] = []
        self.lock = threading.Lock()

    def handle_error(self, request, client_address):
        pass

    @property
    def url(self):
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


def _brightness(url):
    im = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    return float(np.asarray(im).mean() / 255)


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def _send(self, status, payload):
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _answer(self, text, logprobs):
        choice = {"index": 0, "message": {"role": "assistant", "content": text}}
        if logprobs is not None:
            choice["logprobs"] = {"content": logprobs}
        self._send(200, {"choices": [choice]})

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with self.server.lock:
            self.server.bodies.append(body)
        parts = body["messages"][0]["content"]
        prompt = parts[0]["text"]
        want = body.get("logprobs", False)
        if "Which edit is better" in prompt:
            first, label = {}, None
            for p in parts[1:]:
                if p["type"] == "text":
                    label = p["text"].split(",")[0]
                elif label not in first:
                    first[label] = _brightness(p["image_url"]["url"])
            a, b = first["EDIT A"], first["EDIT B"]
            if "FAILMID" in prompt and (abs(a - 0.5) < 0.01 or abs(b - 0.5) < 0.01):
                return self._send(500, {"error": "overloaded"})
            if "BIASED" in prompt:
                winner, p = "A", 0.9
            else:
                winner, p = ("A" if a > b else "B"), 0.7
            other = "B" if winner == "A" else "A"
            return self._answer(f'{{"winner": "{winner}"}}', [tok('{"', 1), tok("winner", 1), tok('": "', 1),
                                                                tok(winner, p, {other: 1 - p}), tok('"}', 1)]
                                if want else None)
        if "Answer with one word: yes or no" in prompt:
            if "NOPE" in prompt:
                return self._answer("No.", [tok("No", 0.7, {"yes": 0.3}), tok(".", 1)] if want else None)
            return self._answer("yes", [tok("yes", 0.6, {"Yes": 0.2, "no": 0.2})] if want else None)
        return self._answer(RATING_TEXT, RATING if want else None)


@pytest.fixture()
def judge_server(monkeypatch):
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    srv = FakeJudge()
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield srv
    srv.shutdown()
    srv.server_close()


def _judge(kind, server, **kw):
    return build_reward(kind, base_url=server.url, model="fake", api_key_env=None, max_retries=0, backoff=0.01, **kw)


def flat_videos(levels, f=2, size=8):
    """Videos of constant brightness, one per level: (B, F, 3, size, size)."""
    return torch.tensor(levels, dtype=torch.float32).view(-1, 1, 1, 1, 1).expand(-1, f, 3, size, size).contiguous()


def texts(n, instruction="make it brighter"):
    return dict(source_captions=["s"] * n, target_captions=["t"] * n, instructions=[instruction] * n)


# ---------------------------------------------------------------------------------------------- pure functions
def test_expected_scores_from_token_logprobs():
    assert token_probabilities(tok("8", 0.6, {"9": 0.3, " 7": 0.1})) == pytest.approx({"8": 0.6, "9": 0.3, "7": 0.1})
    assert expected_value({"8": 0.6, "9": 0.3, "7": 0.1, "x": 5.0}, {str(v): v for v in range(11)}) == \
        pytest.approx(8.2)
    assert expected_value({"x": 1.0}, {"1": 1.0}) is None
    keys = ("instruction_following", "source_preservation", "editing_quality")
    got = logprob_scores(RATING_TEXT, RATING, keys)
    assert got == pytest.approx({"instruction_following": 8.2, "source_preservation": 6.5})  # 10 is split: left out
    assert logprob_scores(RATING_TEXT + " ", RATING, keys) == {}                         # tokens do not spell the text
    assert logprob_scores(RATING_TEXT, None, keys) == {}
    assert yes_no_probability([tok("yes", 0.6, {"Yes": 0.2, "no": 0.2})]) == pytest.approx(0.8)
    assert yes_no_probability([tok("maybe", 1)]) is None
    assert parse_yes_no("Yes, it does.") == 1.0 and parse_yes_no('"no"') == 0.0


def test_pairwise_pure_functions():
    assert parse_winner('Sure. {"winner": "B"}') == 0.0 and parse_winner(" A.") == 1.0
    with pytest.raises(ValueError):
        parse_winner("both are fine")
    assert soft_winner([tok('{"', 1), tok("A", 0.7, {"B": 0.3})]) == pytest.approx(0.7)
    # 3 samples, the brighter wins every comparison in both orders
    hard = {(a, b): float(a > b) for a in range(3) for b in range(3) if a != b}
    assert win_rates(3, hard) == [0.0, 0.5, 1.0]
    # a judge that always says "A": the swapped orders cancel it
    assert win_rates(3, {(a, b): 1.0 for a in range(3) for b in range(3) if a != b}) == [0.5, 0.5, 0.5]
    # missing answers: sample 1's comparisons all failed
    partial = {k: (math.nan if 1 in k else v) for k, v in hard.items()}
    rates = win_rates(3, partial)
    assert rates[0] == 0.0 and rates[2] == 1.0 and math.isnan(rates[1])
    assert math.isnan(win_rates(1, {})[0])


# ---------------------------------------------------------------------------------------------- against the server
def test_rating_judge_turns_logprobs_into_expected_scores(judge_server):
    e, s = flat_videos([0.3]), flat_videos([0.6])
    soft = _judge("vlm_judge", judge_server, logprobs=True, top_logprobs=5)(e, s, **texts(1))
    assert soft.scores.item() == pytest.approx((8.2 + 6.5 + 10) / 3, abs=1e-6)
    assert soft.details[0]["instruction_following"] == pytest.approx(8.2)
    assert judge_server.bodies[-1]["logprobs"] is True and judge_server.bodies[-1]["top_logprobs"] == 5
    hard = _judge("vlm_judge", judge_server)(e, s, **texts(1))              # no logprobs asked: the integers
    assert hard.scores.item() == pytest.approx((8 + 7 + 10) / 3, abs=1e-6) and "logprobs" not in judge_server.bodies[-1]


def test_yes_no_judge(judge_server):
    e, s = flat_videos([0.3, 0.3]), flat_videos([0.6, 0.6])
    r = _judge("vlm_judge", judge_server, scale="yes_no", logprobs=True)
    out = r(e, s, source_captions=["s", "s"], target_captions=["t", "t"], instructions=["ok", "NOPE"])
    assert out.scores.tolist() == pytest.approx([0.8, 0.3])
    assert "Answer with one word: yes or no" in judge_server.bodies[-1]["messages"][0]["content"][0]["text"]
    plain = _judge("vlm_judge", judge_server, scale="yes_no")
    assert plain(e, s, source_captions=["s", "s"], target_captions=["t", "t"],
                 instructions=["ok", "NOPE"]).scores.tolist() == [1.0, 0.0]
    with pytest.raises(ValueError, match="scale must be"):
        _judge("vlm_judge", judge_server, scale="1-5")


def test_pairwise_judge_win_rates_per_group(judge_server):
    """Two groups of 3 (brightness 0.2/0.5/0.8 and 0.8/0.2/0.5): win rates 0, 0.5, 1 within each group; 6
    comparisons (both orders of 3 pairs) per group; with log-probs soft wins of 0.7 give 0.3, 0.5, 0.7."""
    levels = [0.2, 0.5, 0.8, 0.8, 0.2, 0.5]
    e, s = flat_videos(levels), flat_videos([0.4] * 6)
    r = _judge("vlm_pairwise", judge_server, concurrency=4)
    assert r.group_wise
    out = r(e, s, **texts(6), groups=[0, 0, 0, 1, 1, 1])
    assert out.scores.tolist() == [0.0, 0.5, 1.0, 1.0, 0.0, 0.5] and len(judge_server.bodies) == 12
    assert out.details[0] == {"comparisons": 4, "failed": 0}
    soft = _judge("vlm_pairwise", judge_server, logprobs=True)(e, s, **texts(6), groups=[0, 0, 0, 1, 1, 1])
    assert soft.scores.tolist() == pytest.approx([0.3, 0.5, 0.7, 0.7, 0.3, 0.5], abs=1e-6)
    biased = r(e, s, **texts(6, "BIASED"), groups=[0, 0, 0, 1, 1, 1])
    assert biased.scores.tolist() == [0.5] * 6                           # position swapping cancels the bias
    failing = r(e, s, **texts(6, "FAILMID"), groups=[0, 0, 0, 1, 1, 1])
    got = failing.scores.tolist()
    assert got[0] == 0.0 and got[2] == 1.0 and math.isnan(got[1]) and failing.details[1] == {"comparisons": 0,
                                                                                            "failed": 4}
    alone = r(e[:2], s[:2], **texts(2))                                # no groups: each edit alone, NaN
    assert torch.isnan(alone.scores).all()


def test_pairwise_reward_in_a_combined_reward_and_its_normalisation(judge_server):
    """Combined with another component: the win rate's group mean is 0.5, and per-component normalisation turns
    0 / 0.5 / 1 into -sqrt(3/2), 0, +sqrt(3/2)."""
    from editgrpo.grpo import component_advantages

    combo = CombinedReward.from_config({"pair": {"type": "vlm_pairwise", "weight": 1.0, "base_url": judge_server.url,
                                                 "model": "fake", "api_key_env": None, "max_retries": 0},
                                        "pixel_sp": {"weight": 0.0}})
    e, s = flat_videos([0.2, 0.5, 0.8]), flat_videos([0.4] * 3)
    out = combo(e, s, **texts(3), groups=[5, 5, 5])
    assert out.components["pair"].tolist() == [0.0, 0.5, 1.0] and out.total.tolist() == [0.0, 0.5, 1.0]
    adv = component_advantages(out.components, out.weights, torch.tensor([5, 5, 5]), scale="group", eps=0.0,
                               clip=None).advantages
    assert adv.tolist() == pytest.approx([-math.sqrt(1.5), 0.0, math.sqrt(1.5)], abs=1e-5)
