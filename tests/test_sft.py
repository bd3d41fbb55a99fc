"""Masked SFT: overfitting a fixed batch, the recipe end to end, resume, CLI errors."""
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from viva_base.model import VivaEditor
from viva_base.recipe import load_recipe
from viva_base.sft import SFTConfig, TrainConfig, main, set_trainable, sft_loss
from viva_base.tiny import make_tiny_editor


def test_sft_overfits_a_fixed_batch():
    torch.manual_seed(0)
    editor = make_tiny_editor(seed=1)
    params = set_trainable(editor, TrainConfig(trainable="full"))
    g = torch.Generator().manual_seed(0)
    batch = {"source": torch.rand(2, 5, 3, 16, 16, generator=g), "target": torch.rand(2, 5, 3, 16, 16, generator=g),
             "mask": (torch.rand(2, 5, 1, 16, 16, generator=g) > 0.7).float(),
             "instruction": ["remove the red square", "make the background night"], "reference": [None, None]}
    noise, sigma = torch.randn(2, 12, 5, 8, 8, generator=g), torch.tensor([0.3, 0.7])
    opt = torch.optim.Adam(params, lr=2e-3)
    losses = []
    for i in range(60):
        loss = sft_loss(editor, batch, torch.Generator().manual_seed(i), w_m=1.0, cfg_dropout=0.0,
                        timestep_sampling="uniform", shift=1.0, noise=noise, sigma=sigma)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 10, losses[::10]


def test_pooled_dropout_zeroes_the_pooled_vector_of_the_drawn_samples(monkeypatch):
    """train.pooled_dropout: with probability 1 the loss is the one of an editor whose pooled text vector is zero
    (an independent route: the encoder patched), with 0 it is the plain loss, and only the pooled vector changes."""
    from viva_base import model as model_module
    from viva_base.policy import Condition
    from viva_base.sft import drop_pooled

    editor = make_tiny_editor(seed=1)
    g = torch.Generator().manual_seed(0)
    batch = {"source": torch.rand(2, 5, 3, 16, 16, generator=g), "target": torch.rand(2, 5, 3, 16, 16, generator=g),
             "mask": (torch.rand(2, 5, 1, 16, 16, generator=g) > 0.7).float(),
             "instruction": ["remove the red square", "make the background night"], "reference": [None, None]}
    noise, sigma = torch.randn(2, 12, 5, 8, 8, generator=g), torch.tensor([0.3, 0.7])
    kw = dict(w_m=1.0, cfg_dropout=0.0, timestep_sampling="uniform", shift=1.0, noise=noise, sigma=sigma)
    with torch.no_grad():
        plain = sft_loss(editor, batch, torch.Generator().manual_seed(5), **kw)
        off = sft_loss(editor, batch, torch.Generator().manual_seed(5), pooled_dropout=0.0, **kw)
        dropped = sft_loss(editor, batch, torch.Generator().manual_seed(5), pooled_dropout=1.0, **kw)
        encode = model_module.encode_pooled
        monkeypatch.setattr(model_module, "encode_pooled", lambda *a, **k: torch.zeros_like(encode(*a, **k)))
        zero_encoder = sft_loss(editor, batch, torch.Generator().manual_seed(5), **kw)
    assert torch.equal(off, plain)
    assert torch.equal(dropped, zero_encoder)
    assert not torch.allclose(dropped, plain)  # the pooled vector matters to this editor
    cond = Condition({"pooled": torch.ones(3, 4), "prompt_embeds": torch.ones(3, 2, 4)})
    out = drop_pooled(cond, torch.tensor([True, False, True]))
    assert out["pooled"].tolist() == [[1.0] * 4, [0.0] * 4, [1.0] * 4]
    assert out["prompt_embeds"] is cond["prompt_embeds"]


def test_set_trainable_modes():
    editor = make_tiny_editor()
    pr = set_trainable(editor, TrainConfig(trainable="projector_refiner"))
    names = {n for n, p in editor.transformer.named_parameters() if p.requires_grad}
    assert names and all(n.startswith(("x_embedder", "context_embedder")) for n in names)
    assert len(pr) == len(names)
    editor = make_tiny_editor()
    set_trainable(editor, TrainConfig(trainable="lora"))
    names = {n for n, p in editor.transformer.named_parameters() if p.requires_grad}
    assert any("lora_A" in n for n in names) and any(n.startswith("x_embedder") for n in names)
    assert not any(n.startswith("transformer_blocks") and "lora_" not in n for n in names)


def _cfg(tmp_path, *overrides):
    return load_recipe(SFTConfig, ["recipe=recipes/sft_tiny.yaml", f"output_dir={tmp_path}", "report_to=none",
                                   *overrides])


@pytest.mark.slow
def test_sft_recipe_end_to_end_and_exact_resume(tmp_path, repo_root, monkeypatch):
    monkeypatch.chdir(repo_root)
    steps = ["train.max_steps=8", "train.checkpoint_every=4", "data.toy.n_video=6", "data.toy.n_image=4"]
    final = main(_cfg(tmp_path / "a", *steps))
    editor = VivaEditor.from_pretrained(final)
    assert editor.transformer.config.in_channels == 24
    rows = [json.loads(l) for l in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 9)) and all(r["loss"] > 0 for r in rows)
    assert (tmp_path / "a" / "config.yaml").exists() and (tmp_path / "a" / "checkpoint-4").is_dir()
    # stop after the checkpoint at step 4, then resume to 8: identical weights to the uninterrupted run
    main(_cfg(tmp_path / "b", *steps[:1], "train.max_steps=4", *steps[1:]))
    main(_cfg(tmp_path / "b", *steps, "resume=latest"))
    a = load_file(str(tmp_path / "a" / "final" / "transformer" / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(tmp_path / "b" / "final" / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows_b = [json.loads(l) for l in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in rows_b] == [r["loss"] for r in rows]
    # resume=latest refuses a checkpoint written by a different recipe (one line naming the keys), nothing changed
    from viva_base.errors import UserError

    before = sorted(p.name for p in (tmp_path / "b").iterdir())
    saved = (tmp_path / "b" / "config.yaml").read_text()
    with pytest.raises(UserError, match=r"different recipe \(train.learning_rate: 0.0005 -> 0.001\).*resume=null"):
        main(_cfg(tmp_path / "b", *steps, "train.max_steps=12", "resume=latest", "train.learning_rate=1e-3"))
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == before
    assert (tmp_path / "b" / "config.yaml").read_text() == saved
    # ... but continues the same recipe for longer (train.max_steps is free)
    main(_cfg(tmp_path / "b", *steps, "train.max_steps=9", "resume=latest"))
    assert json.loads((tmp_path / "b" / "checkpoint-9" / "trainer_state.json").read_text())["config"]["train.w_m"] == 2.0


def test_sft_starts_from_the_hub_layouts_of_a_t2v_model_and_a_llava(tmp_path, repo_root, monkeypatch):
    """`model.t2v_base` + `model.instructor` (the README's real-checkpoint command) on tiny copies of the hub layouts:
    the instructor folder, like xtuner's LLaVA, has no processor_config.json. The run trains, and its final/ editor
    loads and edits."""
    from viva_base.tiny import make_tiny_t2v_checkpoint

    monkeypatch.chdir(repo_root)
    hub = make_tiny_t2v_checkpoint(tmp_path / "hub")
    final = main(_cfg(tmp_path / "run", "model.tiny=false", f"model.t2v_base={hub / 'base'}",
                      f"model.instructor={hub / 'instructor'}", "train.max_steps=2", "train.checkpoint_every=0",
                      "data.toy.n_video=2", "data.toy.n_image=2"))
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(r["loss"] > 0 for r in rows)
    editor = VivaEditor.from_pretrained(final)
    assert editor.transformer.config.in_channels == 24
    assert editor.edit(torch.rand(5, 3, 16, 16), "make it blue", num_inference_steps=1, progress=False).shape == \
        (5, 3, 16, 16)


@pytest.mark.slow
def test_sft_cli_runs_and_rejects_unknown_keys(tmp_path, repo_root):
    run = subprocess.run([sys.executable, "-m", "viva_base.sft", "recipe=recipes/sft_tiny.yaml",
                          f"output_dir={tmp_path}/run", "report_to=none"], cwd=repo_root, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert VivaEditor.from_pretrained(tmp_path / "run" / "final") is not None
    bad = subprocess.run([sys.executable, "-m", "viva_base.sft", "recipe=recipes/sft_tiny.yaml",
                          f"output_dir={tmp_path}/bad", "train.learnig_rate=1"], cwd=repo_root, capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode != 0
    err = bad.stderr.strip().splitlines()
    assert err[-1].startswith("error: unknown recipe key 'train.learnig_rate'") and "train.learning_rate" in err[-1]
    assert "Traceback" not in bad.stderr and not (tmp_path / "bad" / "final").exists()


@pytest.mark.slow
def test_max_grad_norm_zero_means_no_clipping(tmp_path, repo_root, monkeypatch):
    """train.max_grad_norm=0 turns clipping off, as DeepSpeed reads gradient_clipping 0 (filled from it): the DDP
    path once clipped to norm 0, i.e. zeroed every gradient, and AdamW then left the weights unchanged."""
    monkeypatch.chdir(repo_root)
    from viva_base.training import build_editor

    cfg = _cfg(tmp_path, "train.max_steps=1", "train.warmup_steps=0", "train.max_grad_norm=0", "data.toy.n_video=2",
               "data.toy.n_image=2")
    final = VivaEditor.from_pretrained(main(cfg)).transformer.state_dict()
    init = build_editor(cfg.model).transformer.state_dict()
    assert max(float((final[k] - init[k]).abs().max()) for k in init) > 1e-4  # lr 5e-4: one Adam step moves
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["grad_norm"] > 0


def test_ema_follows_the_documented_update():
    """make_ema: w_ema <- d_k w_ema + (1 - d_k) w after optimizer step k, d_k = min(decay, (1 + k') / (10 + k'))
    with k' = k - 1 (the first step copies the weights)."""
    from viva_base.sft import make_ema

    lin = torch.nn.Linear(1, 1, bias=False)
    assert make_ema(lin, 0.0) is None
    ema = make_ema(lin, 0.6)
    values, expected, avg = [2.0, -1.0, 4.0, 0.5], [], None
    for k, v in enumerate(values, start=1):
        with torch.no_grad():
            lin.weight.fill_(v)
        ema.step(list(lin.parameters()))
        kk = k - 1
        d = 0.0 if kk <= 0 else min(0.6, (1 + kk) / (10 + kk))
        avg = v if avg is None else d * avg + (1 - d) * v
        expected.append(avg)
        assert float(ema.shadow_params[0]) == pytest.approx(avg, abs=1e-6)
    assert expected[-1] != values[-1]


@pytest.mark.slow
def test_sft_ema_final_holds_the_average_and_resumes_exactly(tmp_path, repo_root, monkeypatch):
    monkeypatch.chdir(repo_root)
    steps = ["train.max_steps=6", "train.checkpoint_every=3", "data.toy.n_video=4", "data.toy.n_image=4",
             "train.ema_decay=0.8", "train.keep_checkpoints=3"]
    final = main(_cfg(tmp_path / "a", *steps))
    ckpt = tmp_path / "a" / "checkpoint-6"
    ema, raw = load_file(str(ckpt / "ema.safetensors")), load_file(str(ckpt / "trainable.safetensors"))
    saved = load_file(str(final / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert ema.keys() == raw.keys()
    assert all(torch.equal(saved[k], ema[k]) for k in ema)  # final/ is the EMA ...
    assert max(float((ema[k] - raw[k]).abs().max()) for k in ema) > 1e-5  # ... not the last weights
    # stop at step 3, resume to 6: the same EMA as the uninterrupted run
    main(_cfg(tmp_path / "b", *steps, "train.max_steps=3"))
    main(_cfg(tmp_path / "b", *steps, "resume=latest"))
    b = load_file(str(tmp_path / "b" / "final" / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(saved[k], b[k]) for k in saved)
    # a checkpoint written without the EMA cannot continue one with it (one clear line)
    from viva_base.errors import UserError

    main(_cfg(tmp_path / "c", *steps[:-2], "train.max_steps=3"))
    with pytest.raises(UserError, match="ema"):
        main(_cfg(tmp_path / "c", *steps, "resume=latest"))


class _Pairs:
    """An in-memory PairDataset stand-in: videos and 1-frame images, some with a reference image."""

    def __init__(self, n_video=5, n_image=4, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.items = []
        for i in range(n_video + n_image):
            f = 5 if i < n_video else 1
            self.items.append({
                "id": str(i), "source": torch.rand(f, 3, 16, 16, generator=g),
                "target": torch.rand(f, 3, 16, 16, generator=g),
                "mask": (torch.rand(f, 1, 16, 16, generator=g) > 0.6).float(),
                "instruction": ["remove the red square", "make the background a night sky with stars",
                                "recolour it blue"][i % 3],
                "reference": torch.rand(3, 16, 16, generator=g) if i % 4 == 1 else None, "is_image": f == 1})
        self.is_image = [it["is_image"] for it in self.items]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def test_precomputed_pairs_give_the_on_the_fly_loss():
    """data.precompute: the same conditions, latents and masks as encoding each batch, so the same loss (up to
    float rounding of a different batch composition), with CFG dropout and mixed reference images."""
    from viva_base.data.pairs import collate_pairs
    from viva_base.precompute import PrecomputedPairs
    from viva_base.sft import encode_pairs

    editor = make_tiny_editor(seed=1)
    data = _Pairs()
    features = PrecomputedPairs(editor, data, chunk_size=3, progress=False)
    for idx, drop in [([0, 3, 1, 4], [False, True, False, False]), ([2, 1], [True, True]), ([5, 8, 6], [False] * 3)]:
        drop = torch.tensor(drop)
        want = encode_pairs(editor, collate_pairs([data[i] for i in idx]), drop)
        got = features.batch(idx, drop)
        assert set(got[0].keys()) == set(want[0].keys())
        valid = want[0]["prompt_mask"][..., None].bool()  # padding is zeros here, the VLM's pad states there
        assert torch.equal(got[0]["prompt_mask"], want[0]["prompt_mask"])
        for k in want[0]:
            assert got[0][k].shape == want[0][k].shape, k
            g, w = got[0][k].float(), want[0][k].float()
            if k == "prompt_embeds":
                g, w = g * valid, w * valid
            if k == "ref_latents":  # read only where has_ref (a batch without references holds zeros)
                g, w = g[want[0]["has_ref"]], w[want[0]["has_ref"]]
            assert torch.allclose(g, w, atol=1e-5), k
        assert torch.equal(got[1], want[1]) and torch.equal(got[2], want[2])
        kw = dict(w_m=2.0, cfg_dropout=0.5, timestep_sampling="uniform", shift=1.0, mask_normalization="balanced")
        a = sft_loss(editor, collate_pairs([data[i] for i in idx]), torch.Generator().manual_seed(3), **kw)
        b = sft_loss(editor, {"index": idx}, torch.Generator().manual_seed(3), features=features, **kw)
        assert torch.allclose(a, b, rtol=1e-5), (a, b)
    # the empty-instruction twin differs from the instruction's, the images and latents are shared
    c0, c1 = features.batch([0], torch.tensor([False])), features.batch([0], torch.tensor([True]))
    assert not torch.equal(c0[0]["prompt_embeds"][:, :1], c1[0]["prompt_embeds"][:, :1]) or \
        c0[0]["prompt_embeds"].shape != c1[0]["prompt_embeds"].shape
    assert torch.equal(c0[0]["source_latents"], c1[0]["source_latents"])


@pytest.mark.slow
def test_sft_with_precomputed_features_matches_and_resumes_exactly(tmp_path, repo_root, monkeypatch):
    monkeypatch.chdir(repo_root)
    steps = ["train.max_steps=6", "train.checkpoint_every=3", "data.toy.n_video=6", "data.toy.n_image=4"]
    main(_cfg(tmp_path / "plain", *steps))
    main(_cfg(tmp_path / "a", *steps, "data.precompute=true"))
    rows = lambda d: [json.loads(l)["loss"] for l in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
    assert rows("a") == pytest.approx(rows("plain"), rel=1e-4)
    main(_cfg(tmp_path / "b", *steps[:1], "train.max_steps=3", *steps[1:], "data.precompute=true"))
    main(_cfg(tmp_path / "b", *steps, "data.precompute=true", "resume=latest"))
    a = load_file(str(tmp_path / "a" / "final" / "transformer" / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(tmp_path / "b" / "final" / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert rows("b") == rows("a")


def _spy_on_compile(monkeypatch, backend=None) -> list[str]:
    """The class names of the modules compiled (``nn.Module.compile``, which ``compile_dit`` uses) from now on;
    ``backend`` replaces inductor (``aot_eager``: dynamo's tracing, guards and recompiles, no C++ build)."""
    compiled = []
    real_compile = torch.nn.Module.compile

    def spy(module, *args, **kwargs):
        compiled.append(type(module).__name__)
        if backend is not None:
            kwargs["backend"] = backend
        return real_compile(module, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "compile", spy)
    return compiled


@pytest.mark.slow
def test_compiled_sft_with_fused_adamw_matches_eager_and_resumes_exactly(tmp_path, repo_root, monkeypatch):
    """``train.compile=full`` + ``train.fused_optimizer``: the DiT is really compiled (in place), the losses and
    weights are eager's to float rounding, ``final/`` is the plain diffusers model (the same keys), and a stopped,
    recompiled, resumed run is bit-identical to the uninterrupted compiled one."""
    monkeypatch.chdir(repo_root)
    compiled = _spy_on_compile(monkeypatch)
    # image pairs only: one frame count, so two compiles (the text length turns dynamic at its first change); the
    # toy chain runs the video shape too (docs/toy_world.md, seventeenth pass)
    steps = ["train.max_steps=6", "train.checkpoint_every=3", "data.toy.n_video=0", "data.toy.n_image=8",
             "data.precompute=true"]
    fast = ["train.compile=full", "train.fused_optimizer=true"]
    main(_cfg(tmp_path / "eager", *steps))
    assert compiled == []
    main(_cfg(tmp_path / "a", *steps, *fast))
    assert compiled == ["HunyuanVideoTransformer3DModel"]
    rows = lambda d: [json.loads(l)["loss"] for l in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
    assert rows("a") == pytest.approx(rows("eager"), rel=1e-4)
    weights = lambda d: load_file(str(tmp_path / d / "final" / "transformer" / "diffusion_pytorch_model.safetensors"))
    e, a = weights("eager"), weights("a")
    assert a.keys() == e.keys()
    assert all(torch.allclose(a[k], e[k], rtol=1e-3, atol=1e-5) for k in a)
    main(_cfg(tmp_path / "b", *steps[:1], "train.max_steps=3", *steps[1:], *fast))
    main(_cfg(tmp_path / "b", *steps, *fast, "resume=latest"))
    b = weights("b")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert rows("b") == rows("a")
    assert VivaEditor.from_pretrained(tmp_path / "b" / "final").transformer.config.in_channels == 24


@pytest.mark.slow
def test_regional_compile_compiles_each_repeated_block_and_matches_eager(monkeypatch):
    """``train.compile=regional`` compiles, in place, each module whose class diffusers lists in the DiT's
    ``_repeated_blocks`` (not the whole model), and an SFT loss and its gradients are eager's to float rounding.
    Compiled with ``aot_eager`` (dynamo's graphs of each block, forward and backward, no C++ build: 50 s less);
    inductor's kernels for the same blocks are tested by the full compile above."""
    from diffusers import HunyuanVideoTransformer3DModel

    from viva_base.training import compile_dit

    compiled = _spy_on_compile(monkeypatch, backend="aot_eager")
    g = torch.Generator().manual_seed(0)
    batch = {"source": torch.rand(2, 5, 3, 16, 16, generator=g), "target": torch.rand(2, 5, 3, 16, 16, generator=g),
             "mask": (torch.rand(2, 5, 1, 16, 16, generator=g) > 0.7).float(),
             "instruction": ["remove the red square", "make the background night"], "reference": [None, None]}
    noise, sigma = torch.randn(2, 12, 5, 8, 8, generator=g), torch.tensor([0.3, 0.7])
    results = []
    for mode in ("none", "regional"):
        editor = make_tiny_editor(seed=1)
        params = set_trainable(editor, TrainConfig(trainable="full"))
        names = [n for n, _ in editor.transformer.named_parameters()]
        compile_dit(editor.transformer, mode)
        assert [n for n, _ in editor.transformer.named_parameters()] == names  # in place: the same parameter names
        loss = sft_loss(editor, batch, torch.Generator().manual_seed(0), w_m=1.0, cfg_dropout=0.0,
                        timestep_sampling="uniform", shift=1.0, noise=noise, sigma=sigma)
        loss.backward()
        results.append((loss.item(), [p.grad.clone() for p in params]))
    assert set(compiled) <= set(HunyuanVideoTransformer3DModel._repeated_blocks)
    assert compiled.count("HunyuanVideoSingleTransformerBlock") == 2  # the tiny DiT: 1 dual + 2 single blocks
    assert compiled.count("HunyuanVideoTransformerBlock") == 1 and "HunyuanVideoTransformer3DModel" not in compiled
    (l0, g0), (l1, g1) = results
    assert l1 == pytest.approx(l0, rel=1e-5)
    assert all(torch.allclose(a, b, rtol=1e-3, atol=1e-6) for a, b in zip(g0, g1))
