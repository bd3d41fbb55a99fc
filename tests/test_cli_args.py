"""Numeric options of the commands (viva_base/cli_args.py): a value out of range is argparse's one-line error naming
the option, exit code 2, before the editor or any data loads. Before, these ran and ended in a traceback after loading
the editor (diagnose --num-steps 0, --group-size 0, --eta -1), or ran silently with a meaningless value (a guidance
scale of 0 drops the instruction; a negative one steers away from it; --sigmas 0, --groups -1)."""
import argparse

import pytest
import torch

from viva_base.cli_args import clip_frames, count, noise_level, nonnegative, positive, side


def test_the_types_accept_their_range_and_refuse_the_rest():
    assert count(1)("3") == 3 and count(0)("0") == 0
    assert positive("1e-4") == 1e-4 and nonnegative("0") == 0.0 and noise_level("1") == 1.0
    assert clip_frames("33") == 33 and clip_frames("1") == 1 and side("848") == 848
    for parse, text, words in [(count(1), "0", "0 must be at least 1"), (count(2), "1", "1 must be at least 2"),
                               (count(0), "-1", "must be at least 0"), (count(1), "2.5", "'2.5' is not an integer"),
                               (positive, "0", "0 must be > 0"), (positive, "-2", "-2 must be > 0"),
                               (positive, "nan", "not a finite number"), (positive, "inf", "not a finite number"),
                               (positive, "x", "'x' is not a number"), (nonnegative, "-0.5", "-0.5 must be >= 0"),
                               (noise_level, "0", "not a noise level in (0, 1]"), (noise_level, "1.5", "(0, 1]"),
                               (clip_frames, "8", "use 4k + 1 frames"), (clip_frames, "0", "4k + 1"),
                               (side, "500", "a multiple of 16"), (side, "0", "a multiple of 16")]:
        with pytest.raises(argparse.ArgumentTypeError) as info:
            parse(text)
        assert words in str(info.value), (text, str(info.value))


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_editor):
    from viva_base.data.toy import ensure_toy_dataset

    root = tmp_path_factory.mktemp("cli_args")
    tiny_editor.save_pretrained(root / "editor")
    paths = ensure_toy_dataset(root / "toy", seed=3, n_sft_video=0, n_sft_image=0, n_grpo=0, n_eval_compound=0,
                               n_eval_simple=2)
    return {"editor": str(root / "editor"), "eval": str(paths["eval"]), "root": root}


def _run(main, argv):
    try:
        return main(argv)
    except SystemExit as e:  # argparse's error
        return e.code


@pytest.mark.parametrize("command, argv, option", [
    ("diagnose", ["--num-steps", "0", "--groups", "1"], "--num-steps"),
    ("diagnose", ["--group-size", "0", "--groups", "1"], "--group-size"),
    ("diagnose", ["--group-size", "1", "--groups", "1"], "--group-size"),
    ("diagnose", ["--eta", "-1", "--groups", "1"], "--eta"),
    ("diagnose", ["--guidance-scale", "0", "--groups", "1"], "--guidance-scale"),
    ("diagnose", ["--sigmas", "0.5", "0"], "--sigmas"),
    ("diagnose", ["--max-items", "0"], "--max-items"),
    ("diagnose", ["--groups", "-1"], "--groups"),
    ("collect", ["--eta", "0"], "--eta"),  # (--group-size 1 is its own one-line error: tests/test_toy_preference.py)
    ("collect", ["--num-steps", "0"], "--num-steps"),
    ("collect", ["--prompts-per-batch", "0"], "--prompts-per-batch"),
    ("edit", ["--guidance-scale", "0"], "--guidance-scale"),
    ("edit", ["--guidance-scale", "-1"], "--guidance-scale"),
    ("viebench", ["--num-steps", "0"], "--num-steps"),
    ("viebench", ["--guidance-scale", "0"], "--guidance-scale"),
    ("viebench", ["--limit", "0"], "--limit"),
    ("viebench", ["--judge-concurrency", "0"], "--judge-concurrency"),
    ("gpu_check", ["--frames", "8"], "--frames"),
    ("gpu_check", ["--height", "500"], "--height"),
])
def test_an_option_out_of_range_is_argparses_one_line_exit_2(files, tmp_path, capsys, command, argv, option):
    if command == "diagnose":
        from editgrpo.diagnose import main

        base = ["--model", files["editor"], "--manifest", files["eval"], "--num-steps", "1", "--group-size", "2"]
    elif command == "collect":
        from editgrpo.toy_preference import main

        base = ["collect", "--model", files["editor"], "--manifest", files["eval"], "--out", str(tmp_path / "c.st"),
                "--num-steps", "1", "--group-size", "2"]
    elif command == "edit":
        from viva_base.edit import main

        base = ["--model", files["editor"], "--video", str(next((files["root"] / "toy").rglob("*.mkv"))),
                "--instruction", "make it red", "--out", str(tmp_path / "e.mp4"), "--num-steps", "1", "--no-progress"]
    elif command == "viebench":
        from benchmarks.viebench import main

        base = ["--manifest", files["eval"], "--model", files["editor"], "--out", str(tmp_path / "vb"),
                "--metrics", "none", "--num-steps", "1"]
    else:
        from benchmarks.gpu_check import main

        base = ["--device", "cpu", "--tiny-only", "--checks", "kernels", "--out", str(tmp_path / "g.json")]
    assert _run(main, base + argv) == 2
    err = capsys.readouterr().err
    assert f"error: argument {option}" in err.splitlines()[-1] and "Traceback" not in err, err
    assert not list(tmp_path.iterdir())  # nothing written (argparse stops the command before it loads anything)


def test_the_pipeline_refuses_a_guidance_scale_that_is_not_positive(tiny_editor):
    """The Python API (``EditPipeline.sample``) as the commands: 0 would edit without the instruction."""
    from viva_base.errors import UserError
    from viva_base.pipeline import EditPipeline

    pipe = EditPipeline(tiny_editor)
    clip = torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(UserError, match="guidance_scale=.*must be > 0"):
            pipe.sample(clip, "make it red", num_inference_steps=1, guidance_scale=bad, progress=False)
    assert pipe.sample(clip, "make it red", num_inference_steps=1, guidance_scale=1.0, progress=False).shape == \
        clip.shape
