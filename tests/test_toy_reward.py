"""The toy reward model: loss math, data, caching/determinism, and held-out quality of a quick training."""
import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from editgrpo import toy_reward as tr
from rewards import CombinedReward
from viva_base.data.toyworld import caption
from viva_base.data.toyworld.render import changed_pixels, render

QUICK = dict(steps=150, batch_size=64, seed=0)  # ~35 s on one free core; the default trains 4x longer
SIMPLE = ("add", "remove", "replace", "recolour", "background")


@pytest.fixture(scope="module")
def quick_model(tmp_path_factory, one_thread):
    return tr.train_toy_clip(tmp_path_factory.mktemp("toyclip") / "model", progress=False, **QUICK)


def _videos(pairs):
    src = torch.from_numpy(np.stack([render(s) for s, _ in pairs])).permute(0, 1, 4, 2, 3).float() / 255
    tgt = torch.from_numpy(np.stack([render(t) for _, t in pairs])).permute(0, 1, 4, 2, 3).float() / 255
    texts = dict(source_captions=[caption(s) for s, _ in pairs], target_captions=[caption(t) for _, t in pairs],
                 instructions=[""] * len(pairs))
    return src, tgt, texts


# ------------------------------------------------------------------------------------------ math
def test_loss_is_open_clip_cliploss_for_distinct_captions():
    from open_clip.loss import ClipLoss

    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(6, 8, generator=g), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(6, 8, generator=g), dim=-1)
    scale = torch.tensor(7.0)
    ref = ClipLoss()(img, txt, scale)
    assert torch.allclose(tr.clip_contrastive_loss(img, txt, scale), ref, atol=1e-6)
    assert torch.allclose(tr.clip_contrastive_loss(img, txt, scale, torch.arange(6)), ref, atol=1e-6)


def test_loss_with_repeated_captions_averages_over_all_matches():
    g = torch.Generator().manual_seed(1)
    img = torch.nn.functional.normalize(torch.randn(5, 4, generator=g), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(5, 4, generator=g), dim=-1)
    ids = torch.tensor([0, 1, 0, 2, 1])
    s = 3.0
    logits = (s * img @ txt.T).double()
    ref = 0.0
    for lg in (logits, logits.T):  # -1/N sum_i 1/|P_i| sum_{j in P_i} log softmax(lg_i)_j, both directions
        logp = torch.log_softmax(lg, dim=1)
        ref += -sum(logp[i, ids == ids[i]].mean() for i in range(5)) / 5 / 2
    assert math.isclose(float(tr.clip_contrastive_loss(img, txt, torch.tensor(s), ids)), float(ref), rel_tol=1e-5)


def test_lr_schedule_warms_up_then_decays_to_zero():
    steps, lr = 100, 1e-3
    lrs = [tr.lr_at(i, steps, lr, 0.05) for i in range(steps)]
    assert lrs[:5] == pytest.approx([lr * k / 5 for k in range(1, 6)])
    assert lrs[5] == pytest.approx(lr)  # the cosine starts at the peak
    assert all(a >= b for a, b in zip(lrs[5:], lrs[6:]))
    assert lrs[-1] == pytest.approx(lr * 0.5 * (1 + math.cos(math.pi * 94 / 95)))


# ------------------------------------------------------------------------------------------ data
def test_training_batch_holds_source_target_pairs_at_one_frame():
    rng = np.random.default_rng(3)
    pixels, caps = tr.sample_training_batch(rng, 12)
    assert pixels.shape == (24, 3, 32, 32) and pixels.dtype == torch.float32
    assert 0 <= float(pixels.min()) and float(pixels.max()) <= 1
    assert all(caps[2 * i] != caps[2 * i + 1] for i in range(12))  # each pair is a hard negative
    # reproducible from the generator
    pixels2, caps2 = tr.sample_training_batch(np.random.default_rng(3), 12)
    assert caps == caps2 and torch.equal(pixels, pixels2)


@pytest.mark.parametrize("kind", list(tr.PAIR_KINDS))
def test_every_pair_kind_changes_pixels_and_caption(kind):
    for s, t in tr.heldout_pairs(kind, 3):
        assert caption(s) != caption(t)
        assert changed_pixels(render(s), render(t)).any()
    if kind == "resize":
        s, t = tr.heldout_pairs(kind, 1)[0]
        assert [o.size for o in s.objects] != [o.size for o in t.objects]
        assert [(o.shape, o.colour) for o in s.objects] == [(o.shape, o.colour) for o in t.objects]


def test_context_length_never_truncates_captions():
    from open_clip.tokenizer import SimpleTokenizer

    bound = tr.caption_token_bound()
    cfg = tr.toy_clip_config()
    assert cfg["text_cfg"]["context_length"] == bound + 2
    tok = SimpleTokenizer()
    longest = max(len(tok.encode(caption(t))) for k in tr.PAIR_KINDS for _, t in tr.heldout_pairs(k, 10))
    assert 20 <= longest <= bound
    with pytest.raises(ValueError, match="truncate"):
        tr.toy_clip_config(context_length=bound + 1)


# ------------------------------------------------------------------------------- caching, determinism
def test_a_linked_folder_is_filled_not_replaced(tmp_path, monkeypatch, one_thread):
    """Benchmark runs link their ``reward_model`` to the chain's shared folder. The atomic move used to replace the
    link with the run's own model (moving the link aside as ``.reward_model.old-<pid>``), so the shared folder
    stayed empty and every run retrained the toy CLIP; now the model lands in the shared folder, once."""
    kw = dict(steps=2, batch_size=8, seed=5, progress=False)
    shared = tmp_path / "chain" / "reward_model"
    shared.mkdir(parents=True)
    runs = [tmp_path / f"run{i}" for i in range(2)]
    for run in runs:
        run.mkdir()
        (run / "reward_model").symlink_to(shared, target_is_directory=True)
    name = tr.train_toy_clip(runs[0] / "reward_model", **kw)
    assert name == f"open_clip:local-dir:{shared.resolve()}"
    assert (runs[0] / "reward_model").is_symlink() and (shared / "open_clip_model.safetensors").is_file()
    assert not [p for d in (runs[0], shared.parent) for p in d.iterdir() if p.name.startswith(".")]

    def no_training(*args, **kwargs):
        raise AssertionError("retrained the shared model")

    monkeypatch.setattr(tr, "_train", no_training)
    assert tr.train_toy_clip(runs[1] / "reward_model", **kw) == name


def test_deterministic_cached_and_atomic(tmp_path, monkeypatch, one_thread):
    kw = dict(steps=2, batch_size=8, seed=5, progress=False)
    a = tr.train_toy_clip(tmp_path / "a", **kw)
    b = tr.train_toy_clip(tmp_path / "b", **kw)
    assert a == f"open_clip:local-dir:{(tmp_path / 'a').resolve()}" and b.endswith("/b")
    wa, wb = (load_file(str(tmp_path / d / "open_clip_model.safetensors")) for d in "ab")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left behind
    meta = json.loads((tmp_path / "a" / "toy_clip.json").read_text())
    assert meta["params"]["steps"] == 2 and meta["params"]["seed"] == 5 and meta["stats"]["seconds"] > 0

    def no_training(*args, **kwargs):
        raise AssertionError("retrained a cached model")

    monkeypatch.setattr(tr, "_train", no_training)
    assert tr.train_toy_clip(tmp_path / "a", **kw) == a  # same parameters: returned at once
    with pytest.raises(AssertionError, match="retrained"):
        tr.train_toy_clip(tmp_path / "a", **{**kw, "seed": 6})
    monkeypatch.undo()
    tr.train_toy_clip(tmp_path / "a", **{**kw, "seed": 6})  # other parameters: replaced
    wc = load_file(str(tmp_path / "a" / "open_clip_model.safetensors"))
    assert not all(torch.equal(wc[k], wb[k]) for k in wc)
    assert json.loads((tmp_path / "a" / "toy_clip.json").read_text())["params"]["seed"] == 6

    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="does not hold a toy CLIP"):
        tr.train_toy_clip(tmp_path / "other", **kw)


def test_cli_prints_the_rewards_config(tmp_path, capsys, one_thread):
    assert tr.main(["--out", str(tmp_path / "m"), "--steps", "1", "--batch-size", "4", "--eval-pairs", "0",
                    "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert f'model: "open_clip:local-dir:{tmp_path / "m"}"' in out and "clip_if" in out


@pytest.mark.parametrize("args, line", [
    (["--steps", "0"], "error: --steps 0: must be >= 1"),
    (["--batch-size", "3"], "error: --batch-size 3: must be an even number >= 2"),
    (["--lr", "-1"], "error: --lr -1.0: must be > 0"),
    (["--frames", "0"], "error: --frames 0: must be >= 1"),
    (["--size", "30"], "error: --size 30: frames must be at least 8 px and a multiple of the patch size 4"),
    (["--width", "0"], "error: --width 0: must be a positive multiple of the 2 attention heads"),
    (["--layers", "0"], "error: --layers 0: must be >= 1"),
    (["--degrade", "2"], "error: --degrade 2.0: a probability in [0, 1]"),
    (["--threads", "0"], "error: --threads 0: must be >= 1"),
    (["--out", "/proc/no/such"], "error: cannot write the toy CLIP into /proc/no/such: No such file or directory"),
])
def test_cli_refuses_a_bad_value_in_one_line_before_any_work(tmp_path, capsys, args, line):
    """Each of these was a traceback (ValueError, ZeroDivisionError, RuntimeError from torch, FileNotFoundError),
    some only after the model was built; now one line naming the flag, exit 2, nothing written."""
    assert tr.main(["--out", str(tmp_path / "m"), "--no-progress", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith(line) and err.count("\n") == 1, err
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------ quality
def test_heldout_retrieval_per_edit_type(quick_model):
    res = tr.evaluate_toy_clip(quick_model, pairs_per_kind=20, seed=0)
    assert set(res) == set(SIMPLE) | {"compound"}
    for kind, r in res.items():
        assert r["frames"] >= 40
        assert r["retrieval"] > 0.65, (kind, r)  # chance is 0.5
        assert 0 <= r["quality"] <= 1 and r["clip_sp_damaged"] < 1  # damage is measured (and visible to CLIP)
    assert np.mean([r["retrieval"] for r in res.values()]) > 0.78, res


def test_clip_if_through_registry_points_to_the_true_edit(quick_model):
    pairs = [p for k in SIMPLE + ("compound",) for p in tr.heldout_pairs(k, 8, seed=1)]
    src, tgt, texts = _videos(pairs)
    reward = CombinedReward.from_config({"clip_if": {"weight": 1, "model": quick_model}})
    r_tgt = reward(tgt, src, **texts).total
    r_src = reward(src, src, **texts).total
    assert r_tgt.shape == (len(pairs),)
    assert float((r_tgt > r_src).float().mean()) > 0.85
    assert float(r_tgt.mean()) > 0 > float(r_src.mean())
    # details agree with the eq. 4 difference
    det = reward(tgt, src, **texts).details["clip_if"]
    assert [d["c_edit"] - d["c_src"] for d in det] == pytest.approx(r_tgt.tolist(), abs=1e-6)


def test_clip_sp_identities(quick_model):
    pairs = [tr.heldout_pairs(k, 2, seed=2)[i] for k in SIMPLE for i in range(2)]
    src, tgt, texts = _videos(pairs)
    reward = CombinedReward.from_config({"clip_sp": {"weight": 1, "model": quick_model}})
    assert reward(src, src, **texts).total == pytest.approx([1.0] * len(pairs), abs=1e-5)
    assert bool((reward(tgt, src, **texts).total < 1 - 1e-4).all())


# ------------------------------------------------------------------------ quality negatives
def test_degrade_image_is_deterministic_damage_in_range():
    rng = np.random.default_rng(0)
    from viva_base.data.toyworld import random_scene

    img = render(random_scene(rng))[0].astype(np.float32) / 255.0
    a = tr.degrade_image(np.random.default_rng(7), img)
    b = tr.degrade_image(np.random.default_rng(7), img)
    assert np.array_equal(a, b) and a.shape == img.shape and a.dtype == np.float32
    assert 0 <= a.min() and a.max() <= 1
    damages = [np.abs(tr.degrade_image(np.random.default_rng(s), img) - img).mean() for s in range(20)]
    assert min(damages) > 0.002  # every draw visibly changes the frame


def test_degraded_negatives_in_the_batch_and_the_context_length():
    pixels, caps = tr.sample_training_batch(np.random.default_rng(3), 12, degrade=1.0)
    assert pixels.shape == (36, 3, 32, 32) and len(caps) == 36
    assert all(not c.startswith(tr.DEGRADED_PREFIX) for c in caps[:24])
    for i in range(24, 36):  # each damaged copy carries the prefixed caption of one image of its pair
        assert caps[i].startswith(tr.DEGRADED_PREFIX)
        assert caps[i][len(tr.DEGRADED_PREFIX):] in caps[2 * (i - 24): 2 * (i - 24) + 2]
    plain, plain_caps = tr.sample_training_batch(np.random.default_rng(3), 12)
    assert plain.shape == (24, 3, 32, 32) and plain_caps[:2] == caps[:2]  # same first pair; no damaged copies
    assert not any(c.startswith(tr.DEGRADED_PREFIX) for c in plain_caps)
    from open_clip.tokenizer import SimpleTokenizer

    cfg = tr.toy_clip_config(degraded_captions=True)
    n = len(SimpleTokenizer().encode(tr.DEGRADED_PREFIX))
    assert cfg["text_cfg"]["context_length"] == tr.toy_clip_config()["text_cfg"]["context_length"] + n
    with pytest.raises(ValueError, match="probability"):
        tr.train_toy_clip("unused", degrade=1.5)
