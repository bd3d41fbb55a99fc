"""Oracle metrics of the toy benchmark (benchmarks/toybench.py) on hand-made and toy-world cases."""
import math

import numpy as np
import pytest
import torch

from benchmarks.toybench import average_ranks, bootstrap_ci, oracle_scores, spearman
from viva_base.data.toyworld.pairs import example_rng, sample_example


def _toy_batch(n=4):
    items = [sample_example(example_rng(9, "fresh", i), [("remove", "recolour", "background", "add")[i % 4]]).render()
             for i in range(n)]
    return {k: torch.stack([it[k] for it in items]) for k in ("source", "target", "mask")}


def test_hand_made_numbers():
    src = torch.zeros(1, 1, 3, 2, 2)
    tgt = src.clone()
    tgt[0, 0, :, 0, 0] = 1.0
    mask = torch.zeros(1, 1, 1, 2, 2)
    mask[0, 0, 0, 0, 0] = 1
    edited = src.clone()
    edited[0, 0, :, 0, 0] = 0.5  # halfway to the target inside
    edited[0, 0, 0, 1, 1] = 0.2  # one channel of one outside pixel disturbed
    s = oracle_scores(edited, src, tgt, mask)
    assert s["if_error"].item() == pytest.approx(0.5)
    assert s["sp_error"].item() == pytest.approx(0.2 / 9)  # 3 outside pixels x 3 channels
    assert s["oracle"].item() == pytest.approx(1 - 0.5 * (0.5 + 0.2 / 9))
    assert s["if_identity"].item() == pytest.approx(1.0)
    assert s["if_progress"].item() == pytest.approx(0.5)
    assert s["full_error"].item() == pytest.approx((3 * 0.5 + 0.2) / 12)
    # a 3-channel mask counts like the 1-channel one
    s3 = oracle_scores(edited, src, tgt, mask.expand(-1, -1, 3, -1, -1))
    assert all(torch.equal(s[k], s3[k]) for k in s if k != "if_progress")


def test_perfect_edit_scores_best_and_identity_edit_pays_inside():
    b = _toy_batch()
    perfect = oracle_scores(b["target"], b["source"], b["target"], b["mask"])
    assert torch.all(perfect["if_error"] == 0) and torch.all(perfect["sp_error"] == 0)
    assert torch.all(perfect["oracle"] == 1) and torch.all(perfect["if_progress"] == 1)
    identity = oracle_scores(b["source"], b["source"], b["target"], b["mask"])
    assert torch.all(identity["if_error"] > 0) and torch.all(identity["sp_error"] == 0)
    assert torch.all(identity["if_progress"] == 0) and torch.all(identity["oracle"] < 1)
    # independent reference: numpy boolean indexing of the changed pixels
    for i in range(len(b["mask"])):
        inside = np.repeat(b["mask"][i].numpy() > 0.5, 3, axis=1)
        ref = np.abs(b["source"][i].numpy().astype(np.float64) - b["target"][i].numpy())[inside].mean()
        assert identity["if_error"][i].item() == pytest.approx(float(ref), rel=1e-9)
    # scrambling outside the mask costs preservation only
    noise = torch.rand(b["source"].shape, generator=torch.Generator().manual_seed(0))
    scrambled = torch.where(b["mask"] > 0.5, b["target"], noise)
    s = oracle_scores(scrambled, b["source"], b["target"], b["mask"])
    assert torch.all(s["if_error"] == 0) and torch.all(s["sp_error"] > 0.1)


def test_samples_are_scored_independently():
    b = _toy_batch()
    edited = 0.5 * (b["source"] + b["target"])
    whole = oracle_scores(edited, b["source"], b["target"], b["mask"])
    for i in range(len(edited)):
        one = oracle_scores(edited[i:i + 1], b["source"][i:i + 1], b["target"][i:i + 1], b["mask"][i:i + 1])
        for k in whole:
            assert whole[k][i].item() == pytest.approx(one[k].item(), rel=1e-12)
    assert torch.allclose(whole["if_progress"], torch.full((len(edited),), 0.5, dtype=torch.float64))


def test_empty_and_full_masks_are_defined():
    x = torch.rand(2, 3, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    y = torch.rand(2, 3, 3, 4, 4, generator=torch.Generator().manual_seed(2))
    empty = oracle_scores(x, y, y, torch.zeros(2, 3, 1, 4, 4))
    assert torch.all(empty["if_error"] == 0) and torch.all(empty["if_progress"].isnan())
    assert torch.allclose(empty["sp_error"], (x - y).abs().double().flatten(1).mean(1))
    full = oracle_scores(x, y, y, torch.ones(2, 3, 1, 4, 4))
    assert torch.all(full["sp_error"] == 0)
    assert not any(torch.isnan(v).any() for k, v in full.items() if k != "if_progress")


def test_shape_errors_name_the_problem():
    v = torch.zeros(1, 2, 3, 4, 4)
    with pytest.raises(ValueError, match="B, F, 3, H, W"):
        oracle_scores(v[0], v[0], v[0], torch.zeros(2, 1, 4, 4))
    with pytest.raises(ValueError, match="target"):
        oracle_scores(v, v, v[:, :1], torch.zeros(1, 2, 1, 4, 4))
    with pytest.raises(ValueError, match="mask"):
        oracle_scores(v, v, v, torch.zeros(1, 2, 1, 4, 5))


def test_bootstrap_ci():
    assert bootstrap_ci([0.25] * 10) == (0.25, 0.25, 0.25)
    assert bootstrap_ci([1.5]) == (1.5, 1.5, 1.5)
    d = torch.randn(400, generator=torch.Generator().manual_seed(0), dtype=torch.float64) + 0.3
    mean, lo, hi = bootstrap_ci(d, n=4000, seed=1)
    assert mean == pytest.approx(d.mean().item()) and lo < mean < hi
    # the percentile interval of a mean of 400 values matches the normal one, mean +- 1.96 sd / sqrt(n)
    half = 1.96 * d.std().item() / math.sqrt(len(d))
    assert lo == pytest.approx(mean - half, abs=0.2 * half) and hi == pytest.approx(mean + half, abs=0.2 * half)
    assert lo > 0  # a true shift of 0.3 with sd 1 over 400 prompts is significant
    assert bootstrap_ci(d, n=4000, seed=1) == (mean, lo, hi)
    assert bootstrap_ci(d, n=4000, seed=2) != (mean, lo, hi)
    with pytest.raises(ValueError, match="NaN"):
        bootstrap_ci([0.1, float("nan")])
    with pytest.raises(ValueError, match="at least one"):
        bootstrap_ci([])


def test_spearman_and_ranks():
    assert average_ranks(torch.tensor([3.0, 1.0, 2.0, 2.0])).tolist() == [4.0, 1.0, 2.5, 2.5]
    a = torch.tensor([0.1, 0.4, 0.2, 0.9])
    assert spearman(a, a * 10 + 3) == pytest.approx(1.0)
    assert spearman(a, -a) == pytest.approx(-1.0)
    # ranks (1, 2.5, 2.5, 4) vs (1, 2, 3, 4): 4.5 / sqrt(4.5 * 5)
    assert spearman(torch.tensor([1.0, 2, 2, 3]), torch.tensor([1.0, 2, 3, 4])) == pytest.approx(4.5 / math.sqrt(22.5))
    assert math.isnan(spearman(torch.ones(3), a[:3]))
    with pytest.raises(ValueError):
        spearman(a, a[:3])


def test_toybench_pools_paired_deltas_over_runs(tmp_path):
    import json

    from benchmarks.toybench import pooled_delta

    def write(run, step, oracles):
        d = tmp_path / run / "eval" / f"step-{step}"
        d.mkdir(parents=True)
        rows = [{"id": f"p{i}", "split": "compound" if i < 3 else "simple", "open": i in (1, 2),
                 "mean": {"oracle": o, "if_error": 1 - o}} for i, o in enumerate(oracles)]
        (d / "items.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (d / "summary.json").write_text("{}")

    write("a", 0, [0.5, 0.5, 0.5, 0.5]); write("a", 24, [0.6, 0.5, 0.4, 0.7])
    write("b", 0, [0.5, 0.5, 0.5, 0.5]); write("b", 8, [0.5, 0.5, 0.6, 0.5]); write("b", 24, [0.8, 0.4, 0.4, 0.5])
    out = pooled_delta([tmp_path / "a", tmp_path / "b"], n_boot=500)
    want = [0.2, -0.05, -0.1, 0.1]  # per prompt: mean over runs of last - first (step 8 is ignored)
    assert out["n_runs"] == 2 and out["n_prompts"] == 4 and out["improved"] == 2
    assert out["all"]["mean"] == pytest.approx(sum(want) / 4)
    assert out["all"]["ci95"][0] <= out["all"]["mean"] <= out["all"]["ci95"][1]
    assert out["compound"]["n"] == 3 and out["compound"]["mean"] == pytest.approx(sum(want[:3]) / 3)
    assert out["simple"]["mean"] == pytest.approx(0.1)
    # per evaluation group, with the if_error delta beside (here if_error = 1 - oracle: exactly its negative)
    groups = out["by_group"]
    assert groups["open/compound"]["n"] == 2 and groups["open/compound"]["oracle"]["mean"] == pytest.approx(-0.075)
    assert groups["open/compound"]["if_error"]["mean"] == pytest.approx(0.075)
    assert groups["split/simple"]["oracle"]["mean"] == pytest.approx(0.1) and groups["all"]["n"] == 4
    write("c", 0, [0.5, 0.5, 0.5]); write("c", 24, [0.5, 0.5, 0.5])
    with pytest.raises(ValueError, match="different prompts"):
        pooled_delta([tmp_path / "a", tmp_path / "c"])
    (tmp_path / "d" / "eval" / "step-0").mkdir(parents=True)
    with pytest.raises(ValueError, match="first and last"):
        pooled_delta([tmp_path / "d"])


def test_toybench_arguments_as_its_usage_line_shows():
    """`--seeds 0 1 2 key=value` (the module's usage line): the overrides are not read as seeds."""
    from benchmarks.toybench import parse_args

    a = parse_args(["--out", "o", "--seeds", "0", "1", "2", "train.num_iterations=2", "toy.n_grpo=8"])
    assert a.seeds == [0, 1, 2] and a.overrides == ["train.num_iterations=2", "toy.n_grpo=8"]
    b = parse_args(["train.lr=1", "--seeds", "3"])
    assert b.seeds == [3] and b.overrides == ["train.lr=1"]
    with pytest.raises(SystemExit):
        parse_args(["--seeds", "x"])


def test_preservation_split_hand_made_numbers():
    """One 8x8 frame, tokens of 4x4 pixels: a single edited pixel in the top-left token makes that token's other 15
    pixels boundary pixels; the three other tokens' 48 pixels are interior."""
    from viva_base.data.toyworld.oracle import preservation_split

    src = torch.zeros(1, 3, 8, 8)
    mask = torch.zeros(1, 1, 8, 8)
    mask[0, 0, 1, 2] = 1
    edited = src.clone()
    edited[:, :, :4, :4] = 0.5                  # the whole top-left token off by 0.5 (the edited pixel too)
    edited[:, :, 6, 6] = 0.3                    # one interior pixel off by 0.3
    s = preservation_split(edited, src, mask, token=4)
    assert s["sp_boundary"] == pytest.approx(0.5)
    assert s["sp_interior"] == pytest.approx(0.3 / 48)
    assert s["sp_boundary_share"] == pytest.approx(15 / 63)
    sp = oracle_scores(edited[None], src[None], src[None], mask[None])["sp_error"].item()
    share = s["sp_boundary_share"]
    assert sp == pytest.approx(share * s["sp_boundary"] + (1 - share) * s["sp_interior"])


def test_preservation_split_decomposes_sp_error_exactly():
    """sp_error = share * sp_boundary + (1 - share) * sp_interior for random videos, masks, token sizes and frame
    sides that are not multiples of the token; with 1-pixel tokens nothing is at the boundary."""
    from viva_base.data.toyworld.oracle import preservation_split

    g = torch.Generator().manual_seed(0)
    for token, (h, w) in ((2, (8, 8)), (4, (10, 7)), (3, (9, 12))):
        e, s = torch.rand(3, 3, h, w, generator=g), torch.rand(3, 3, h, w, generator=g)
        m = (torch.rand(3, 1, h, w, generator=g) > 0.8).float()
        split = preservation_split(e, s, m, token)
        sp = oracle_scores(e[None], s[None], s[None], m[None])["sp_error"].item()
        share = split["sp_boundary_share"]
        assert 0 < share < 1
        assert sp == pytest.approx(share * split["sp_boundary"] + (1 - share) * split["sp_interior"], rel=1e-12)
    one = preservation_split(e, s, m, 1)
    assert one["sp_boundary_share"] == 0 and "sp_boundary" not in one
    assert one["sp_interior"] == pytest.approx(oracle_scores(e[None], s[None], s[None], m[None])["sp_error"].item())
    assert preservation_split(e, s, torch.ones_like(m), 4) == {}  # nothing to keep: nothing to report
    with pytest.raises(ValueError, match="token"):
        preservation_split(e, s, m, 0)
