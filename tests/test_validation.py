"""SFT validation (viva_base/validation.py): the held-out loss against an independent computation of eq. 3, the edit
errors by hand, the sharing of pairs over processes, the recipe checks, a run that validates (and trains exactly as
one that does not), and ZeRO-3 on 2 processes giving one process's numbers."""
import json
import math

import pytest
import torch

from viva_base.data.toy import ensure_toy_dataset
from viva_base.errors import UserError
from viva_base.distributed import share_out
from viva_base.validation import ValidationConfig, Validator, check_validation, edit_errors


@pytest.fixture(scope="module")
def held_out(tmp_path_factory) -> str:
    """Toy pairs of another world seed than the tiny recipe's (seed 0): 3 video and 2 image pairs."""
    root = tmp_path_factory.mktemp("held_out")
    return str(ensure_toy_dataset(root, seed=5, n_sft_video=3, n_sft_image=2, n_grpo=0, n_eval_compound=0,
                                  n_eval_simple=0, frames=9, size=32)["sft"])


@pytest.mark.parametrize("n, world", [(5, 2), (3, 2), (1, 3), (6, 3), (0, 2)])
def test_each_pair_is_validated_once_and_zero3_processes_run_as_many_forwards(n, world):
    shares = [share_out(n, r, world, lockstep=False) for r in range(world)]
    assert sorted(i for mine, _ in shares for i in mine) == list(range(n))
    locked = [share_out(n, r, world, lockstep=True) for r in range(world)]
    assert [mine[:k] for mine, k in locked] == [mine for mine, _ in shares]  # the counted ones: the same pairs
    if n:
        assert {len(mine) for mine, _ in locked} == {math.ceil(n / world)}  # as many forwards on every process


def test_edit_errors_inside_and_outside_the_mask():
    target = torch.zeros(1, 3, 2, 2)
    edited = torch.tensor([[0.4, 0.0], [0.2, 0.0]]).expand(1, 3, 2, 2)
    mask = torch.tensor([[1.0, 0.0], [1.0, 0.0]]).view(1, 1, 2, 2)
    assert edit_errors(edited, target, mask) == pytest.approx((0.3, 0.0))
    err_in, err_out = edit_errors(edited, target, torch.zeros(1, 1, 2, 2))  # no edited pixel
    assert math.isnan(err_in) and err_out == pytest.approx(0.15)


def test_recipe_values_are_checked_before_any_work(held_out, tmp_path):
    check_validation(ValidationConfig())  # no manifest: nothing to check
    check_validation(ValidationConfig(manifest=held_out))
    bad = [(dict(sigmas=[0.0, 0.5]), "validation.sigmas"), (dict(sigmas=[]), "validation.sigmas"),
           (dict(every=-1), "validation.every"), (dict(max_items=0), "validation.max_items"),
           (dict(edits=2, num_steps=0), "validation.num_steps"), (dict(guidance_scale=0), "validation.guidance_scale"),
           (dict(manifest=str(tmp_path / "none.jsonl")), "validation.manifest")]
    for kwargs, key in bad:
        with pytest.raises(UserError, match=key):
            check_validation(ValidationConfig(**{"manifest": held_out, **kwargs}))


def test_the_sft_recipe_checks_validation_and_a_resume_may_change_it(held_out, repo_root, monkeypatch):
    """validation.* is checked with the rest of the SFT recipe (before any work), and is not part of what a run is:
    a checkpoint resumes with validation added or changed, and the toy chain's SFT stage keeps its fingerprint."""
    from viva_base.recipe import load_recipe
    from viva_base.sft import SFTConfig
    from viva_base.sft_checks import validate_sft_config
    from viva_base.training import resume_config

    monkeypatch.chdir(repo_root)
    with pytest.raises(UserError, match="validation.sigmas"):
        validate_sft_config(load_recipe(SFTConfig, ["recipe=recipes/sft_tiny.yaml", f"validation.manifest={held_out}",
                                                    "validation.sigmas=[1.5]"]))
    plain = load_recipe(SFTConfig, ["recipe=recipes/sft_tiny.yaml"])
    validated = load_recipe(SFTConfig, ["recipe=recipes/sft_tiny.yaml", f"validation.manifest={held_out}",
                                        "validation.every=3"])
    assert resume_config(plain) == resume_config(validated)


def test_the_held_out_loss_is_eq3_of_each_pair_at_each_level(held_out, tmp_path):
    """val/loss, computed independently: per pair and level, the pair alone (batch of 1), z_t = (1 - s) z + s n with
    the validation's noise, eq. 3 through masked_flow_matching_loss; the mean over levels and pairs."""
    from accelerate import Accelerator

    from viva_base.losses import masked_flow_matching_loss
    from viva_base.sft import encode_pairs
    from viva_base.tiny import make_tiny_editor
    from viva_base.validation import _seed

    editor = make_tiny_editor(seed=1)
    cfg = ValidationConfig(manifest=held_out, sigmas=[0.3, 0.8], edits=0, seed=7)
    options = {"w_m": 2.0, "loss_weighting": "none", "loss_weight_cap": 25.0, "mask_normalization": "none"}
    v = Validator(cfg, frames=None, size=None, out_dir=tmp_path, loss_options=options)
    with torch.no_grad():
        got = [float(v.pair_loss(editor, i)) for i in range(5)]
    want = []
    with torch.no_grad():
        for i in range(5):
            item = v.dataset[i]
            one = {"source": item["source"][None], "target": item["target"][None], "mask": item["mask"][None],
                   "instruction": [item["instruction"]], "reference": [item["reference"]]}
            cond, z, mask = encode_pairs(editor, one, torch.tensor([False]))
            g = torch.Generator().manual_seed(_seed(7, i))
            torch.rand(2, generator=g)  # the CFG-dropout draw (probability 0) precedes the noise
            noise = torch.randn((2, *z.shape[1:]), generator=g)
            per_level = []
            for j, s in enumerate(cfg.sigmas):
                z_t = (1 - s) * z + s * noise[j: j + 1]
                pred = editor.velocity(z_t, torch.tensor([s]), cond)
                per_level.append(float(masked_flow_matching_loss(pred, noise[j: j + 1] - z, mask, 2.0)))
            want.append(sum(per_level) / 2)
    assert got == pytest.approx(want, rel=1e-5)
    summary = v.run(editor, editor.transformer, step=3, accelerator=Accelerator(cpu=True), lockstep=False)
    assert summary["loss"] == pytest.approx(sum(want) / 5, rel=1e-5)
    assert json.loads((tmp_path / "step-3" / "summary.json").read_text())["loss"] == summary["loss"]


@pytest.mark.slow
def test_sft_validates_on_schedule_and_trains_exactly_as_without_validation(held_out, tmp_path, repo_root,
                                                                             monkeypatch):
    """validation.every=10 over 20 steps of the tiny recipe: validations at steps 0, 10 and 20, each with its edits
    written; the held-out loss falls as the editor trains; and the final editor is bit-identical to the one a run
    without validation writes (validation draws from generators of its own and restores train mode)."""
    from safetensors.torch import load_file

    from test_sft import _cfg
    from viva_base.sft import main

    monkeypatch.chdir(repo_root)
    steps = ["train.max_steps=20", "train.checkpoint_every=0", "data.toy.n_video=6", "data.toy.n_image=4"]
    validation = [f"validation.manifest={held_out}", "validation.every=10", "validation.edits=2",
                  "validation.num_steps=3"]
    main(_cfg(tmp_path / "plain", *steps))
    main(_cfg(tmp_path / "val", *steps, *validation))
    folders = sorted((tmp_path / "val" / "validation").iterdir(), key=lambda p: int(p.name.split("-")[1]))
    assert [p.name for p in folders] == ["step-0", "step-10", "step-20"]
    summaries = [json.loads((p / "summary.json").read_text()) for p in folders]
    assert all(len(list(p.glob("*.gif"))) == 2 and len(s["edits"]) == 2 and s["pairs"] == 5
               for p, s in zip(folders, summaries))
    losses = [s["loss"] for s in summaries]
    assert losses[2] < losses[1] < losses[0], losses
    card = (tmp_path / "val" / "final" / "README.md").read_text()  # the model card shows the first and last
    assert f"{losses[0]:.4g} at step 0 -> {losses[2]:.4g} at step 20" in card, card
    weights = lambda run: load_file(str(tmp_path / run / "final" / "transformer" /  # noqa: E731
                                        "diffusion_pytorch_model.safetensors"))
    a, b = weights("plain"), weights("val")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_with_an_ema_the_ema_weights_are_validated_and_training_is_untouched(held_out, tmp_path, repo_root,
                                                                           monkeypatch):
    """train.ema_decay: the last validation scores the EMA weights, which final/ holds (the same loss, recomputed
    from final/ alone), and the trained weights are put back after each validation: final/ is bit-identical to a
    run's without validation."""
    from accelerate import Accelerator
    from safetensors.torch import load_file

    from test_sft import _cfg
    from viva_base.sft import main
    from viva_base.training import load_editor

    monkeypatch.chdir(repo_root)
    steps = ["train.max_steps=12", "train.checkpoint_every=0", "data.toy.n_video=6", "data.toy.n_image=4",
             "train.ema_decay=0.9"]
    validation = [f"validation.manifest={held_out}", "validation.every=6", "validation.edits=0"]
    main(_cfg(tmp_path / "plain", *steps))
    cfg = _cfg(tmp_path / "val", *steps, *validation)
    main(cfg)
    weights = lambda run: load_file(str(tmp_path / run / "final" / "transformer" /  # noqa: E731
                                        "diffusion_pytorch_model.safetensors"))
    a, b = weights("plain"), weights("val")
    assert all(torch.equal(a[k], b[k]) for k in a)
    last = json.loads((tmp_path / "val" / "validation" / "step-12" / "summary.json").read_text())
    tc = cfg.train
    v = Validator(cfg.validation, frames=None, size=None, out_dir=tmp_path / "again",
                  loss_options={"w_m": tc.w_m, "loss_weighting": tc.loss_weighting,
                                "loss_weight_cap": tc.loss_weight_cap, "mask_normalization": tc.mask_normalization})
    editor = load_editor(tmp_path / "val" / "final")
    again = v.run(editor, editor.transformer, step=12, accelerator=Accelerator(cpu=True), lockstep=False)
    assert again["loss"] == pytest.approx(last["loss"], rel=1e-6)
    mid = json.loads((tmp_path / "val" / "validation" / "step-6" / "summary.json").read_text())
    assert mid["loss"] != last["loss"]


@pytest.mark.slow
def test_zero3_validation_on_two_processes_gives_ddp_and_one_process_numbers(held_out, tmp_path, repo_root):
    """ZeRO-3 (every parameter partitioned) on 2 processes, 3 pairs and 3 edits: one process runs a repeat of its
    own pair in each, as every DiT forward needs both. val/loss and the edit errors at steps 0, 2 and 4 are those of
    DDP on 2 processes (no padding; the same training to 1e-6), and at step 0 (the same weights) one process's."""
    import sys

    from test_scale_multiprocess import SFT_TOL, _deepspeed, _sft, _torchrun, _zero_config

    args = [f"validation.manifest={held_out}", "validation.every=2", "validation.max_items=3", "validation.edits=3",
            "validation.num_steps=2"]
    config = _zero_config(tmp_path, repo_root, "zero3", stage3_param_persistence_threshold=0)
    _sft(_deepspeed(config, 2), [*args, f"output_dir={tmp_path / 'zero3'}"])
    _sft(_torchrun(2), [*args, f"output_dir={tmp_path / 'ddp'}"], ACCELERATE_USE_CPU="1")
    _sft([sys.executable], [*args, f"output_dir={tmp_path / 'one'}", "train.max_steps=1"])

    def summary(run, step):
        return json.loads((tmp_path / run / "validation" / f"step-{step}" / "summary.json").read_text())

    for step, ref in ((0, "one"), (0, "ddp"), (2, "ddp"), (4, "ddp")):
        got, want = summary("zero3", step), summary(ref, step)
        assert got["pairs"] == want["pairs"] == 3
        assert [e["id"] for e in got["edits"]] == [e["id"] for e in want["edits"]]
        assert got["loss"] == pytest.approx(want["loss"], rel=SFT_TOL), (step, ref)
        for key in ("edit_error_in", "edit_error_out"):
            assert got[key] == pytest.approx(want[key], rel=1e-5), (step, ref, key)
