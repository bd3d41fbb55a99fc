"""Pretraining the tiny LLaVA instructor (viva_base/instructor_pretrain.py) and its SFT stage."""
import json

import pytest
import torch
from safetensors.torch import load_file

from viva_base.errors import UserError
from viva_base.instructor_pretrain import (ANSWER_PREFIX, InstructorPretrainConfig, caption_batch,
                                           pretrain_instructor, summary_loss)
from viva_base.tiny import make_tiny_editor

ANSWERS = ["a small green diamond on a plain background", "a large red circle on a night background",
           "a small blue square and a large yellow cross on a sky striped background", "a purple triangle"]
INSTRUCTIONS = ["make the small red diamond green", "make it night", "add a large yellow cross on the right",
                "replace the purple square with a triangle"]


def _examples():
    g = torch.Generator().manual_seed(0)
    return [{"image": torch.rand(3, 32, 32, generator=g), "instruction": i, "answer": a}
            for i, a in zip(INSTRUCTIONS, ANSWERS)]


def test_caption_batch_labels_only_the_answer_after_the_exact_encoder_prompt():
    ed = make_tiny_editor(seed=0)
    ex = _examples()
    b = caption_batch(ed.processor, ed.config.instructor, [e["instruction"] for e in ex], [[e["image"]] for e in ex],
                      [e["answer"] for e in ex])
    tok = ed.processor.tokenizer
    for i, e in enumerate(ex):
        labelled = b["labels"][i][b["labels"][i] != -100]
        assert tok.decode(labelled, skip_special_tokens=False) == " " + e["answer"] + tok.eos_token
        n = int(b["prompt_length"][i])
        # everything before the answer is the prompt encode_instructions builds, then ANSWER_PREFIX
        prompt = tok.decode(b["input_ids"][i][:n])
        assert prompt.endswith(f"Instruction: {e['instruction']}")
        first = int((b["labels"][i] != -100).nonzero()[0])
        assert tok.decode(b["input_ids"][i][n:first]) == ANSWER_PREFIX


def test_summary_loss_matches_a_loop():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 6, 4, generator=g)
    head = torch.nn.Linear(4, 9, bias=False)
    labels = torch.tensor([[-100, -100, -100, 3, 5, 2], [-100, -100, 7, 7, 1, -100]])
    plen = torch.tensor([3, 2])
    ref = 0.0
    for i in range(2):
        logp = torch.log_softmax(head(hidden[i, plen[i] - 1]), -1)
        toks = [t for t in labels[i].tolist() if t != -100]
        ref += -sum(logp[t].item() for t in toks) / len(toks) / 2
    assert summary_loss(hidden, head, labels, plen).item() == pytest.approx(ref, rel=1e-5)


def test_pretraining_lowers_the_answer_loss_is_deterministic_and_freezes(one_thread):
    cfg = InstructorPretrainConfig(steps=40, batch_size=4, learning_rate=3e-3, warmup_steps=0, seed=3)

    def run():
        ed = make_tiny_editor(seed=0)
        before = _answer_loss(ed)
        rows = pretrain_instructor(ed, _examples(), cfg, progress=False)
        return ed, before, _answer_loss(ed), rows

    a, before, after, rows = run()
    assert after < 0.5 * before, (before, after)
    assert rows[-1]["step"] == 40
    assert not any(p.requires_grad for p in a.instructor.parameters()) and not a.instructor.training
    assert a.config.instructor.hidden_layer == -1
    b = run()[0]
    sa, sb = a.instructor.state_dict(), b.instructor.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def _answer_loss(ed):
    ex = _examples()
    b = caption_batch(ed.processor, ed.config.instructor, [e["instruction"] for e in ex], [[e["image"]] for e in ex],
                      [e["answer"] for e in ex])
    b.pop("prompt_length")
    with torch.no_grad():
        return ed.instructor(**b).loss.item()


@pytest.mark.slow
def test_sft_pretrains_the_instructor_once_and_resumes_with_it(tmp_path, repo_root, monkeypatch, one_thread):
    from viva_base.recipe import load_recipe
    from viva_base.sft import SFTConfig, main
    from viva_base.training import load_editor

    monkeypatch.chdir(repo_root)

    def cfg(out, *extra):
        return load_recipe(SFTConfig, ["recipe=recipes/sft_tiny.yaml", f"output_dir={out}", "report_to=none",
                                       "data.toy.n_video=4", "data.toy.n_image=4", "train.checkpoint_every=2",
                                       "instructor_pretrain.steps=6", "instructor_pretrain.batch_size=4", *extra])

    final = main(cfg(tmp_path / "a", "train.max_steps=4"))
    saved = json.loads((tmp_path / "a" / "instructor" / "pretrain.json").read_text())
    assert [r["step"] for r in saved["log"]] == [6]
    ed = load_editor(final)
    random_llava = make_tiny_editor(seed=0).instructor.state_dict()
    trained = ed.instructor.state_dict()
    assert any(not torch.equal(trained[k], random_llava[k]) for k in trained)  # the final editor carries it
    assert ed.config.instructor.hidden_layer == -1
    cached = load_file(str(tmp_path / "a" / "instructor" / "model.safetensors"))
    assert all(torch.equal(cached[k], trained[k]) for k in cached)
    # stop at step 2, resume to 4: the cached instructor is loaded, the DiT ends identical to the uninterrupted run
    main(cfg(tmp_path / "b", "train.max_steps=2"))
    mtime = (tmp_path / "b" / "instructor" / "pretrain.json").stat().st_mtime_ns
    main(cfg(tmp_path / "b", "train.max_steps=4", "resume=latest"))
    assert (tmp_path / "b" / "instructor" / "pretrain.json").stat().st_mtime_ns == mtime  # not retrained
    ta = load_file(str(tmp_path / "a" / "final" / "transformer" / "diffusion_pytorch_model.safetensors"))
    tb = load_file(str(tmp_path / "b" / "final" / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(ta[k], tb[k]) for k in ta)


def test_instructor_pretraining_is_refused_for_a_real_checkpoint(tmp_path):
    from viva_base.recipe import load_recipe
    from viva_base.sft import SFTConfig
    from viva_base.sft_checks import validate_sft_config

    c = load_recipe(SFTConfig, [f"output_dir={tmp_path}", "model.pretrained=some/editor", "instructor_pretrain.steps=10"])
    with pytest.raises(UserError, match=r"instructor_pretrain.steps.*steps=0"):
        validate_sft_config(c)
    c = load_recipe(SFTConfig, [f"output_dir={tmp_path}", "model.tiny=true", "instructor_pretrain.steps=10",
                                "instructor_pretrain.learning_rate=0"])
    with pytest.raises(UserError, match=r"instructor_pretrain.learning_rate"):
        validate_sft_config(c)
