"""Config values a user can get wrong fail at once: one line, exit code 2, before any data, editor or reward model."""
import os
import subprocess
import sys

import pytest

from editgrpo.config import GRPOConfig, validate_config
from viva_base.errors import UserError
from viva_base.recipe import load_recipe


def test_unknown_reward_is_one_line_exit_2_before_any_work(repo_root, tmp_path, timed_run):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc, seconds, wall = timed_run([sys.executable, "-m", "editgrpo.train", "recipe=recipes/tiny.yaml",
                                     f"output_dir={tmp_path / 'run'}", "rewards.no_such_reward.weight=1"],
                                    cwd=repo_root, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "no_such_reward" in errors[0]
    for builtin in ("clip_if", "clip_sp", "pickscore", "hps", "vlm_judge", "pixel_sp", "toy_oracle"):
        assert builtin in errors[0]
    assert not (tmp_path / "run" / "data").exists()  # no toy prompts were built
    assert seconds < 10 and wall < 60, (seconds, wall)  # CPU seconds: see the timed_run fixture


_IMPORTED = """
import sys
from viva_base.errors import UserError
from viva_base.recipe import load_recipe
if sys.argv[1] == "sft":
    from viva_base.sft import SFTConfig
    from viva_base.sft_checks import validate_sft_config as validate
    cls = SFTConfig
else:
    from editgrpo.config import GRPOConfig as cls, validate_config as validate
try:
    validate(load_recipe(cls, sys.argv[2:]))
    print("passed", end=" ")
except UserError as e:
    print("refused", end=" ")
print(",".join(m for m in ("diffusers", "torch._dynamo") if m in sys.modules))
"""


@pytest.mark.parametrize("command, args, expected", [
    ("grpo", ["recipe=recipes/toy.yaml", "toy.sft_overrides=[train.batch_size=0]"], "refused "),
    ("grpo", ["recipe=recipes/toy.yaml", "rewards.no_such_reward.weight=1"], "refused "),
    ("grpo", ["recipe=recipes/tiny.yaml", "rewards.no_such_reward.weight=1"], "refused "),
    ("sft", ["recipe=recipes/sft_toy.yaml", "train.batch_size=0"], "refused "),
    ("grpo", ["recipe=recipes/toy.yaml", "train.lr_scheduler=cosinus"], "refused diffusers,torch._dynamo"),
    ("grpo", ["recipe=recipes/toy.yaml"], "passed diffusers,torch._dynamo"),
])
def test_a_mistyped_value_is_refused_before_importing_diffusers_or_inductor(repo_root, command, args, expected):
    """The checks that need diffusers (the lr schedule names) or inductor (the C++ compiler) cost 1.5-3 s each on a
    CPU, more under load: they ran first and a one-line error took 10.5 s on a busy 2-core CI machine (over the
    10 s this project promises). Now they run after every check that reads the recipe only."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", _IMPORTED, command, *args], cwd=repo_root, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == expected.strip(), proc.stdout


@pytest.mark.parametrize("override, key", [
    ("rewards.clip_if.bogus_arg=1", "bogus_arg"),
    ("rewards.clip_if.weight=abc", "weight"),
    ("rewards.clip_if.text=instruction", "clip_if has no text option"),
    ("rewards.pickscore={weight: 1, text: caption}", "text one of target_caption, instruction"),
    ("rewards.clip_dir={weight: 1, text: target_caption}", "text one of captions, instruction"),
    # values of the built-in rewards, checked by building them (they load nothing): before, a traceback after
    # config.yaml and the data were written
    ("rewards.clip_if.max_batch=0", "rewards.clip_if: max_batch must be a positive integer"),
    ("rewards.clip_sp.aspect=stretch", "rewards.clip_sp: aspect must be one of crop, pad"),
    ("rewards.clip_sp.frames={num: 0}", "rewards.clip_sp: invalid frame sampling"),
    ("train.scale_rewards=bogus", "train.scale_rewards"),
    ("train.lr_scheduler=cosine_warm", "train.lr_scheduler"),
    ("train.lr_scheduler=piecewise_constant", "train.lr_scheduler"),  # needs step_rules, which no recipe gives
    ("sampling.method=ddim", "sampling.method"),
    ("train.epsilon=2", "train.epsilon"),
    ("sampling.sde_window_size=9", "sampling.sde_window_size"),
    ("sampling.guidance_interval=[0.9,0.1]", "sampling.guidance_interval"),
    ("sampling.guidance_interval=[0.5]", "sampling.guidance_interval"),
    ("eval.guidance_interval=[-1,1]", "eval.guidance_interval"),
    ("eval.shift=0", "eval.shift"),
    ("model.tiny_kind=foo", "model.tiny_kind"),  # once only when the editor was built, after the data
    # these once failed with a traceback at the first evaluation (after the editor and the reward models; eval.seeds=[]
    # after the whole training), or were taken silently (max_items 0: every item; every -1; guidance 0)
    ("eval.num_steps=0", "eval.num_steps"),
    ("eval.seeds=[]", "eval.seeds"),
    ("eval.seeds=[3,3]", "eval.seeds"),
    ("eval.max_items=0", "eval.max_items"),
    ("eval.batch_size=0", "eval.batch_size"),
    ("eval.every=-1", "eval.every"),
    ("eval.save_videos=-1", "eval.save_videos"),
    ("eval.guidance_scale=0", "eval.guidance_scale"),
    ("sampling.guidance_scale=0", "sampling.guidance_scale"),
    ("data.frames=0", "data.frames"),  # a traceback once the clips were cut
    ("data.size=[0,0]", "data.size"),
    ("data.size=[32]", "data.size"),
    ("data.toy_prompts=0", "data.toy_prompts"),  # after config.yaml and the data folder were written
    ("data.toy_frames=8", "data.toy_frames=8: use 4k"),
    ("data.toy_size=20", "data.toy_size=20: use a side"),
    ("lora.alpha=0", "lora.alpha"),  # an adapter scaled to nothing: it never trained
    ("model.shift=0", "model.shift"),
    ("train.adam_beta1=1", "train.adam_beta1"),  # AdamW's ValueError, after the editor was built
    ("train.adam_beta2=-0.5", "train.adam_beta2"),
    ("train.keep_checkpoints=-1", "train.keep_checkpoints"),
])
def test_cheap_checks_name_the_key(override, key):
    cfg = load_recipe(GRPOConfig, ["recipe=recipes/tiny.yaml", override])
    with pytest.raises(UserError, match=key):
        validate_config(cfg)


@pytest.mark.parametrize("recipe", ["tiny", "toy", "viva", "lucy_grpo", "lucy_tiny"])
def test_shipped_recipes_pass_the_checks(recipe, tmp_path):
    """Every shipped recipe passes; those that name a prompts manifest (the real-size ones: data/grpo/prompts.jsonl,
    not here) pass with the user's manifest and are refused, naming data.manifest, without one."""
    cfg = load_recipe(GRPOConfig, [f"recipe=recipes/{recipe}.yaml"])
    if cfg.data.manifest is not None and not os.path.exists(cfg.data.manifest):
        with pytest.raises(UserError, match=r"data\.manifest: manifest 'data/grpo/prompts\.jsonl' not found"):
            validate_config(cfg)
        (tmp_path / "a.mp4").write_bytes(b"")
        cfg.data.manifest = str(tmp_path / "prompts.jsonl")
        (tmp_path / "prompts.jsonl").write_text('{"id": "a", "source": "a.mp4", "instruction": "make it red", '
                                                '"source_caption": "a cat", "target_caption": "a red cat"}\n')
    validate_config(cfg)


@pytest.mark.parametrize("override, key", [
    ("toy.open_place=1.5", "toy.open_place"),
    ("toy.grpo_types=[paint]", "toy.grpo_types"),
    ("toy.eval_simple_types=[]", "toy.eval_simple_types"),
    ("toy.sft_noop_clause=1.5", "toy.sft_noop_clause"),
    # these were refused by the stage that used them, after the data (toy.reward_*) or the toy CLIP (toy.instructor_*)
    # had been built, or not at all (toy.reward_steps=0: an untrained reward model)
    ("toy.frames=8", "toy.frames=8: use 4k"),
    ("toy.size=20", "toy.size=20"),
    ("toy.n_grpo=0", "toy.n_grpo"),
    ("toy.n_sft_video=-1", "toy.n_sft_video"),
    ("toy.n_eval_simple=-2", "toy.n_eval_simple"),
    ("toy.reward_steps=0", "toy.reward_steps"),
    ("toy.reward_degrade=-1", "toy.reward_degrade"),
    ("toy.instructor_steps=-1", "toy.instructor_steps"),
    ("toy.instructor_compound=-1", "toy.instructor_compound"),
])
def test_toy_chain_open_edit_checks_name_the_key(override, key):
    cfg = load_recipe(GRPOConfig, ["recipe=recipes/toy.yaml", override])
    with pytest.raises(UserError, match=key):
        validate_config(cfg)
    validate_config(load_recipe(GRPOConfig, ["recipe=recipes/toy.yaml", "toy.open_place=0.5", "toy.grpo_types=[add]"]))


@pytest.mark.parametrize("override, words", [
    ("toy.sft_overrides=[train.compile=fast]", ["toy.sft_overrides", "train.compile='fast'", "full, regional"]),
    ("toy.sft_overrides=[train.learnig_rate=1]", ["toy.sft_overrides", "train.learnig_rate", "train.learning_rate"]),
    ("toy.sft_overrides=[train.batch_size=0]", ["toy.sft_overrides", "train.batch_size=0"]),
    ("toy.sft_recipe=recipes/no_such.yaml", ["toy.sft_recipe", "no such file"]),
])
def test_the_toy_chains_sft_stage_recipe_is_checked_before_any_stage(repo_root, tmp_path, override, words, timed_run):
    """A wrong SFT override used to fail after the data, toy CLIP and instructor stages (minutes on 2 cores); now the
    chain checks its SFT stage's recipe with the GRPO recipe: one line, exit 2, nothing built."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc, seconds, wall = timed_run([sys.executable, "-m", "editgrpo.train", "recipe=recipes/toy.yaml",
                                     f"output_dir={tmp_path / 'run'}", override],
                                    cwd=repo_root, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and all(w in errors[0] for w in words), errors
    assert not (tmp_path / "run" / "data").exists()
    assert seconds < 10 and wall < 60, (seconds, wall)  # CPU seconds: see the timed_run fixture


@pytest.mark.parametrize("key, line, words", [
    ("eval.manifest", '{"id": "a", "source": "nope.mp4", "instruction": "x"}', ["eval.manifest", ":1:", "nope.mp4",
                                                                                "not found"]),
    ("data.manifest", '{"id": "a", "source": "nope.mp4"', ["data.manifest", ":1:", "not valid JSON"]),
    ("data.manifest", '{"id": "a", "source": "a.png", "instruction": "x"}', ["data.manifest", ":1:", "source_caption"]),
    ("eval.manifest", None, ["eval.manifest", ":1:", "not UTF-8"]),
])
def test_a_bad_manifest_is_one_line_before_anything_is_built_or_written(repo_root, tmp_path, key, line, words,
                                                                         timed_run):
    """A held-out manifest was read after the editor was built and the reward models loaded (minutes at real size),
    when config.yaml, the tensorboard logs, metrics.jsonl and the toy prompts were written; a prompts manifest after
    config.yaml; a file that is not text was a UnicodeDecodeError traceback. Now each is one line naming the key, the
    file and the line, exit 2, with no output folder (the command itself for the first; the checks for the rest)."""
    manifest = tmp_path / "m.jsonl"
    if line is None:
        manifest.write_bytes(bytes(range(128, 256)) * 4)
    else:
        manifest.write_text(line + "\n")
    (tmp_path / "a.png").write_bytes(b"")
    overrides = ["recipe=recipes/tiny.yaml", f"output_dir={tmp_path / 'run'}", f"{key}={manifest}"]
    if key == "eval.manifest" and line is not None:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
        proc, seconds, wall = timed_run([sys.executable, "-m", "editgrpo.train", *overrides], cwd=repo_root, env=env,
                                        capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr
        errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
        assert len(errors) == 1 and all(w in errors[0] for w in words), errors
        assert seconds < 10 and wall < 60, (seconds, wall)  # CPU seconds: see the timed_run fixture
    else:
        with pytest.raises(UserError) as info:
            validate_config(load_recipe(GRPOConfig, overrides))
        assert all(w in str(info.value) for w in words) and "\n" not in str(info.value), str(info.value)
    assert not (tmp_path / "run").exists()


def test_prompt_and_evaluation_clips_a_causal_vae_cannot_encode_whole_are_refused_before_any_rollout(repo_root,
                                                                                                      tmp_path):
    """8-frame source clips with a causal video VAE (the tiny Hunyuan VAE, r = 4): the rollouts decoded 5 frames and
    the first reward comparing them with the 8-frame source stopped the run with a traceback, after the first
    rollouts. Now one line names a prompt and the fix before any rollout: data.frames for the prompts (which then
    trains), trimming for the held-out evaluation, which reads its clips whole."""
    import json

    import torch

    from editgrpo.train import main
    from viva_base.video import write_video

    records = []
    for i in range(2):
        write_video(tmp_path / f"s{i}.mp4", torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(i)), 8.0)
        records.append({"id": f"p{i}", "source": f"s{i}.mp4", "instruction": "make the square red",
                        "source_caption": "a square", "target_caption": "a red square"})
    manifest = tmp_path / "prompts.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in records))
    common = ["recipe=recipes/tiny.yaml", "model.tiny_spec.vae=hunyuan", f"data.manifest={manifest}", "report_to=none",
              "train.num_iterations=1", "train.prompts_per_iteration=2", "train.num_generations=2",
              "sampling.num_steps=3", "sampling.sde_window_size=1"]
    cwd = os.getcwd()
    os.chdir(repo_root)
    try:
        with pytest.raises(UserError, match=r"2 of the 2 prompts .* p0 has 8, .* the last 3; set data\.frames=5"):
            main(load_recipe(GRPOConfig, [*common, f"output_dir={tmp_path / 'a'}"]))
        assert not (tmp_path / "a" / "metrics.jsonl").exists()
        with pytest.raises(UserError, match=r"2 of the 2 evaluation prompts .* trim the clips to 5 frames"):
            main(load_recipe(GRPOConfig, [*common, f"output_dir={tmp_path / 'b'}", "data.frames=5",
                                          f"eval.manifest={manifest}"]))
        main(load_recipe(GRPOConfig, [*common, f"output_dir={tmp_path / 'c'}", "data.frames=5"]))
        assert len((tmp_path / "c" / "metrics.jsonl").read_text().splitlines()) == 1
    finally:
        os.chdir(cwd)


def test_check_output_dir_refuses_what_no_run_could_write_and_leaves_nothing(tmp_path):
    from viva_base.recipe import check_output_dir, check_output_file

    (tmp_path / "a_file").write_text("x")
    before = sorted(tmp_path.rglob("*"))
    check_output_dir("output_dir", tmp_path / "new" / "deeper")  # to be created: fine
    check_output_dir("output_dir", tmp_path)                     # exists: fine
    assert sorted(tmp_path.rglob("*")) == before                 # the probe folders are gone
    with pytest.raises(UserError, match=r"^output_dir=.*a_file: that is a file, not a folder"):
        check_output_dir("output_dir", tmp_path / "a_file")
    with pytest.raises(UserError, match=r"a_file is a file, so no folder can be made under it"):
        check_output_dir("output_dir", tmp_path / "a_file" / "run")
    with pytest.raises(UserError, match=r"^--out /proc/no/such: cannot create folders in /proc \("):
        check_output_dir("--out", "/proc/no/such")
    with pytest.raises(UserError, match=r"^--out /sys/no/such: cannot create folders in /sys \("):  # EPERM / EROFS
        check_output_dir("--out", "/sys/no/such")
    with pytest.raises(UserError, match=r"that is a folder; give a file name"):
        check_output_file("--out", tmp_path)
    with pytest.raises(UserError, match=r"^--out /proc/x.json: cannot create folders in /proc \("):
        check_output_file("--out", "/proc/x.json")
    check_output_file("--out", tmp_path / "new" / "x.json")
    assert sorted(tmp_path.rglob("*")) == before


@pytest.mark.parametrize("command", [
    ["editgrpo.train", "recipe=recipes/tiny.yaml"],
    ["editgrpo.train", "recipe=recipes/toy.yaml"],
    ["viva_base.sft", "recipe=recipes/sft_tiny.yaml"],
    ["viva_base.data.build", "recipe=recipes/data_build.yaml", "inputs=tests", "generator.model.tiny=true"],
])
def test_an_output_dir_no_folder_can_be_made_in_is_one_line_before_any_work(repo_root, timed_run, command):
    """It was an OSError traceback at the first mkdir (the toy chain's data stage; the trainers' accelerator)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc, seconds, wall = timed_run([sys.executable, "-m", *command, "output_dir=/proc/no/such"], cwd=repo_root,
                                    env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == ("error: output_dir=/proc/no/such: cannot create folders in /proc "
                                                    "(No such file or directory); give a writable folder")
    assert seconds < 10 and wall < 60, (seconds, wall)


@pytest.mark.parametrize("overrides, words", [
    (["toy.n_sft_video=0", "toy.n_sft_image=0"], "no SFT pairs"),
    (["toy.n_eval_simple=0", "toy.n_eval_compound=0"], "held-out prompts"),
])
def test_toy_chain_stages_need_their_data(overrides, words):
    with pytest.raises(UserError, match=words):
        validate_config(load_recipe(GRPOConfig, ["recipe=recipes/toy.yaml", *overrides]))
