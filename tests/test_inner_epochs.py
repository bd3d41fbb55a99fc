"""Edit-GRPO updates: inner epochs reshuffle the samples across minibatches (seeded, resumable, independent of the
process layout); micro-batches that add exactly zero to the gradient (zero advantage, beta = 0) are not run."""
import json

import pytest
import torch
from safetensors.torch import load_file

from editgrpo import train as train_mod


def test_epoch_order_reshuffles_each_epoch_seeded_and_layout_independent():
    assert train_mod.epoch_order(0, 3, 0, 1, 0, 6, 1) == list(range(6))  # one inner epoch: the shipped order
    e0, e1 = (train_mod.epoch_order(0, 3, e, 2, 0, 8, 1) for e in (0, 1))
    assert sorted(e0) == sorted(e1) == list(range(8)) and e0 != e1 and e0 != list(range(8))
    assert e0 == train_mod.epoch_order(0, 3, 0, 2, 0, 8, 1)  # seeded by (seed, iteration, epoch): resumable
    assert e0 != train_mod.epoch_order(0, 4, 0, 2, 0, 8, 1) and e0 != train_mod.epoch_order(1, 3, 0, 2, 0, 8, 1)
    # two processes keep their own samples in the order one process has them
    r0, r1 = (train_mod.epoch_order(0, 3, 1, 2, r, 4, 2) for r in (0, 1))
    assert [i for i in e1 if i < 4] == r0 and [i - 4 for i in e1 if i >= 4] == r1
    mbs = train_mod.minibatches(8, 2, e1)
    assert mbs == [e1[:4], e1[4:]]


class _TwoRanks:
    """A stand-in accelerator whose reduce adds the other rank's flags."""
    num_processes = 2
    device = torch.device("cpu")

    def __init__(self, other):
        self.other = other

    def reduce(self, t, op):
        assert op == "sum"
        return t + self.other


def test_trained_microbatches_skip_only_zero_contributions_and_agree_over_processes():
    adv = torch.tensor([0.0, 0.0, 1.0, -1.0, 0.0, 0.0])
    valid = torch.tensor([True, True, True, True, True, False])
    micro = [[0, 1], [2, 3], [4, 5]]
    assert train_mod.trained_microbatches(micro, adv, valid, 0.0) == [[2, 3]]
    assert train_mod.trained_microbatches(micro, adv, valid, 0.004) == micro  # the KL term still trains them
    assert train_mod.trained_microbatches(micro, adv, ~valid.clone().fill_(True), 0.004) == []  # all invalid
    assert train_mod.trained_microbatches(micro, adv, valid, 0.0, deepspeed=True) == micro  # DeepSpeed: unchanged
    # another process needs micro-batch 0: every process runs it
    other = torch.tensor([1.0, 0.0, 0.0])
    assert train_mod.trained_microbatches(micro, adv, valid, 0.0, accelerator=_TwoRanks(other)) == [[0, 1], [2, 3]]


def _run(tmp_path, monkeypatch, repo_root, *, skip: bool, extra=()):
    from editgrpo.config import GRPOConfig
    from viva_base.recipe import load_recipe

    real_gather, real_step = train_mod.gather_for_advantages, train_mod.step_log_prob
    forwards = []

    def constant_group_0(acc, rewards, group_ids):  # every sample of group 0 gets the same reward
        all_r, all_g, local = real_gather(acc, rewards, group_ids)
        return torch.where(all_g == 0, torch.full_like(all_r, 0.25), all_r), all_g, local

    def counting(editor, rec, rows, *a, **kw):
        forwards.append(len(rows))
        return real_step(editor, rec, rows, *a, **kw)

    monkeypatch.setattr(train_mod, "gather_for_advantages", constant_group_0)
    monkeypatch.setattr(train_mod, "step_log_prob", counting)
    if not skip:  # the behaviour before: every micro-batch trains
        monkeypatch.setattr(train_mod, "trained_microbatches", lambda micro, *a, **kw: micro)
    monkeypatch.chdir(repo_root)
    out = tmp_path / ("skip" if skip else "all")
    train_mod.main(load_recipe(GRPOConfig, [
        "recipe=recipes/tiny.yaml", f"output_dir={out}", "report_to=none", "train.num_iterations=2",
        "train.prompts_per_iteration=2", "train.num_generations=2", "data.toy_prompts=2", "sampling.num_steps=3",
        "sampling.sde_window_size=2", "train.checkpoint_every=0", "train.beta=0", "train.train_batch_size=1",
        "train.num_inner_epochs=2", "train.minibatches_per_iteration=2", *extra]))
    lora = {f.name: load_file(f) for f in sorted((out / "lora").rglob("*.safetensors"))}
    rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
    monkeypatch.undo()
    return forwards, lora, rows


def test_zero_advantage_group_skips_its_forwards_and_gives_the_same_lora(tmp_path, monkeypatch, repo_root):
    f_all, lora_all, _ = _run(tmp_path, monkeypatch, repo_root, skip=False)
    f_skip, lora_skip, rows = _run(tmp_path, monkeypatch, repo_root, skip=True)
    # 2 iterations x 2 epochs x 4 samples (micro-batches of 1) x 2 trained steps; group 0's 2 samples are skipped
    assert len(f_all) == 32 and len(f_skip) == 16
    assert [r["skipped_forwards"] for r in rows] == [8, 8]
    assert lora_all.keys() == lora_skip.keys() and lora_all
    for name in lora_all:
        for k, v in lora_all[name].items():
            assert torch.allclose(lora_skip[name][k], v, rtol=0, atol=1e-7), (name, k)
    assert any(float(v.abs().max()) > 0 for d in lora_all.values() for k, v in d.items() if "lora_B" in k or "lora.up" in k)


def test_inner_epochs_resume_bit_exactly(tmp_path, monkeypatch, repo_root):
    from editgrpo.config import GRPOConfig
    from viva_base.recipe import load_recipe

    monkeypatch.chdir(repo_root)
    base = ["recipe=recipes/tiny.yaml", "report_to=none", "train.prompts_per_iteration=2", "train.num_generations=2",
            "data.toy_prompts=2", "sampling.num_steps=3", "sampling.sde_window_size=1", "train.checkpoint_every=1",
            "train.train_batch_size=1", "train.num_inner_epochs=3", "train.minibatches_per_iteration=2"]
    train_mod.main(load_recipe(GRPOConfig, [*base, f"output_dir={tmp_path / 'a'}", "train.num_iterations=2"]))
    train_mod.main(load_recipe(GRPOConfig, [*base, f"output_dir={tmp_path / 'b'}", "train.num_iterations=1"]))
    train_mod.main(load_recipe(GRPOConfig, [*base, f"output_dir={tmp_path / 'b'}", "train.num_iterations=2",
                                            "resume=latest"]))
    for f in sorted((tmp_path / "a" / "lora").rglob("*.safetensors")):
        a, b = load_file(f), load_file(tmp_path / "b" / "lora" / f.relative_to(tmp_path / "a" / "lora"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------- skipping on 2 processes (DDP, gloo)
CONSTANT_GROUPS = (1, 2)  # 3 prompts x 2 samples; rank 0 holds samples 0-2 (groups 0, 0, 1), rank 1 samples 3-5


def _constant_groups_and_count(forwards: list) -> None:
    """Patch the trainer: groups CONSTANT_GROUPS get constant rewards (zero advantages); count training forwards."""
    real_gather, real_step = train_mod.gather_for_advantages, train_mod.step_log_prob

    def gather(acc, rewards, group_ids):
        all_r, all_g, local = real_gather(acc, rewards, group_ids)
        const = torch.isin(all_g, torch.tensor(CONSTANT_GROUPS))
        return torch.where(const, torch.full_like(all_r, 0.25), all_r), all_g, local

    def step(editor, rec, rows, *a, **kw):
        forwards.append(len(rows))
        return real_step(editor, rec, rows, *a, **kw)

    train_mod.gather_for_advantages, train_mod.step_log_prob = gather, step


def _skip_run(argv, dump_dir) -> None:
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from test_scale_multiprocess import run_and_dump

    forwards: list = []
    real = train_mod.gather_for_advantages, train_mod.step_log_prob
    _constant_groups_and_count(forwards)
    try:
        run_and_dump(argv, dump_dir)
    finally:
        train_mod.gather_for_advantages, train_mod.step_log_prob = real
    rank = int(__import__("os").environ.get("RANK", "0"))
    (Path(dump_dir) / f"forwards-{rank}.json").write_text(json.dumps(forwards))


@pytest.mark.slow
def test_two_processes_skip_the_same_microbatches_and_match_one_process(tmp_path, repo_root):
    """Rank 1's samples all have zero advantage, rank 0's last one too: both ranks skip only the micro-batch index
    skipped on both (index 2), rank 1 still runs its others (zero contributions) and joins the gradient sync at the
    last micro-batch run; the first update equals the 1-process one, which skips 4 of its 6 micro-batches."""
    import os

    from test_scale_multiprocess import COMMON, _assert_same_update, _launch, _load, _torchrun

    argv = [*COMMON, "train.beta=0"]
    one = tmp_path / "one"
    cwd, threads = os.getcwd(), torch.get_num_threads()
    os.chdir(repo_root)
    torch.set_num_threads(1)  # like the launched processes (the rewards' last digits depend on it)
    try:
        _skip_run([*argv, f"output_dir={one}"], one)
    finally:
        os.chdir(cwd)
        torch.set_num_threads(threads)
    ref = _load(one, 0)
    assert ref["group_ids"].tolist() == [0, 0, 1, 1, 2, 2] and (ref["advantages"][2:] == 0).all()
    assert (ref["advantages"][:2].abs() > 0.1).all()
    assert json.loads((one / "forwards-0.json").read_text()) == [1] * 4  # 2 micro-batches x 2 trained steps
    two = tmp_path / "two"
    _launch(_torchrun(2), [str(two), *argv, f"output_dir={two}/run"], repo_root, script=__file__)
    for rank in (0, 1):
        assert json.loads((two / f"forwards-{rank}.json").read_text()) == [1] * 4  # micro-batches 0 and 1
        got = _load(two, rank)
        assert got["world"] == 2
        _assert_same_update(ref, got)
    row = json.loads((two / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert row["skipped_forwards"] == 2


if __name__ == "__main__":  # a rank of the 2-process run: python tests/test_inner_epochs.py DUMP_DIR key=value...
    import os
    import sys

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    _skip_run(sys.argv[2:], sys.argv[1])
