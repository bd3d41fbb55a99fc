"""Model cards in every result folder, the upload to the Hugging Face Hub, and LoRAs by hub repo id (viva_base/hub.py).

No network here: the hub's API is replaced by a recorder (``FakeHub``) where a test pushes, and a repo id is
resolved from a local Hugging Face cache laid out as ``snapshot_download`` leaves it."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from viva_base.data.toy import ensure_toy_dataset
from viva_base.errors import UserError
from viva_base.hub import CARD, TRAINING_CONFIG, HubConfig, check_hub, eval_results, hub_ids, push_folder
from viva_base.recipe import load_recipe

SFT_STEPS = ["recipe=recipes/sft_tiny.yaml", "report_to=none", "train.max_steps=3", "train.checkpoint_every=0",
             "data.toy.n_video=4", "data.toy.n_image=2"]
GRPO_STEPS = ["recipe=recipes/tiny.yaml", "report_to=none", "train.num_iterations=2", "train.checkpoint_every=0",
              "train.prompts_per_iteration=2", "train.num_generations=2", "data.toy_prompts=2", "sampling.num_steps=3",
              "sampling.sde_window_size=1", "model.tiny=false", "eval.num_steps=2", "eval.seeds=[1]",
              "eval.save_videos=0"]


@pytest.fixture(scope="module")
def eval_manifest(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy_eval")
    return str(ensure_toy_dataset(root, seed=3, n_sft_video=0, n_sft_image=0, n_grpo=0, n_eval_compound=2,
                                  n_eval_simple=2)["eval"])


def _sft(out, *extra):
    from viva_base.sft import SFTConfig, main

    return main(load_recipe(SFTConfig, [*SFT_STEPS, f"output_dir={out}", *extra]))


def _grpo(out, model, eval_manifest, *extra):
    from editgrpo.config import GRPOConfig
    from editgrpo.train import main

    return main(load_recipe(GRPOConfig, [*GRPO_STEPS, f"output_dir={out}", f"model.pretrained={model}",
                                         f"eval.manifest={eval_manifest}", *extra]))


def _card_table(text: str) -> dict[str, str]:
    """The card's two-column training table as {row: value}."""
    rows = {}
    for line in text.split("## Training", 1)[1].splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 2 and cells[0] and not set(cells[0]) <= {"-"}:
            rows[cells[0]] = cells[1]
    return rows


def _run_card_usage(text: str, tmp_path: Path, repo_root: Path, shell: bool = False) -> None:
    """Run the card's Python snippet (and with ``shell`` its command) on a toy clip: each writes the edited clip."""
    from viva_base.video import read_video, write_video

    src = tmp_path / "in.mp4"
    if not src.exists():
        write_video(src, torch.rand(9, 3, 32, 32, generator=torch.Generator().manual_seed(0)), fps=8)
    code = text.split("```python\n", 1)[1].split("```", 1)[0]
    out = tmp_path / "out-python.mp4"
    exec(compile(code.replace('"in.mp4"', repr(str(src))).replace('"out.mp4"', repr(str(out))), "card", "exec"), {})
    assert read_video(out).frames.shape == (9, 3, 32, 32)
    if shell:
        command = text.split("```bash\n", 1)[1].split("```", 1)[0].replace("\\\n", " ").strip()
        out = tmp_path / "out-cli.mp4"
        command = command.replace("python -m", f"{sys.executable} -m", 1)
        run = subprocess.run(command.replace("in.mp4", str(src)).replace("out.mp4", str(out)) + " --no-progress",
                             shell=True, cwd=repo_root, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-2000:]
        assert read_video(out).frames.shape == (9, 3, 32, 32)


class FakeHub:
    """Stands in for ``huggingface_hub.HfApi``: records each call, and what the uploaded folder held then."""

    calls: list = []
    fail_upload = False

    def __init__(self, *args, **kwargs):
        pass

    def create_repo(self, repo_id, *, private=None, exist_ok=False, **kw):
        FakeHub.calls.append(("create_repo", repo_id, {"private": private, "exist_ok": exist_ok}))
        return type("RepoUrl", (), {"repo_id": repo_id if "/" in repo_id else f"me/{repo_id}"})()

    def create_branch(self, repo_id, *, branch, exist_ok=False, **kw):
        FakeHub.calls.append(("create_branch", repo_id, {"branch": branch, "exist_ok": exist_ok}))

    def upload_folder(self, *, repo_id, folder_path, revision=None, commit_message=None, ignore_patterns=None, **kw):
        if FakeHub.fail_upload:
            raise ConnectionError("Connection reset by peer")
        files = sorted(str(p.relative_to(folder_path)) for p in Path(folder_path).rglob("*") if p.is_file())
        card = (Path(folder_path) / CARD).read_text()
        FakeHub.calls.append(("upload_folder", repo_id, {"folder": str(folder_path), "files": files,
                                                         "revision": revision, "card": card,
                                                         "message": commit_message}))
        return type("CommitInfo", (), {"commit_url": f"https://huggingface.co/{repo_id}/commit/0"})()


@pytest.fixture
def fake_hub(monkeypatch):
    import huggingface_hub
    from huggingface_hub import constants

    FakeHub.calls, FakeHub.fail_upload = [], False
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHub)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    return FakeHub


def test_hub_ids_are_owner_name_and_never_a_local_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs" / "final").mkdir(parents=True)
    (tmp_path / "x").mkdir()
    assert hub_ids("hunyuanvideo-community/HunyuanVideo", None, "", "x", "outputs/final", "a/b/c", "bad id/x!",
                   "/abs/path", "xtuner/llava-llama-3-8b-v1_1-transformers") == [
        "hunyuanvideo-community/HunyuanVideo", "xtuner/llava-llama-3-8b-v1_1-transformers"]


@pytest.mark.slow
def test_sft_final_and_grpo_lora_carry_a_model_card_and_their_recipe(tmp_path, repo_root, monkeypatch, eval_manifest):
    """SFT's final/ and Edit-GRPO's lora/ each get README.md (a model card the hub library reads back, its numbers
    the run's own) and training_config.yaml (a recipe that loads back to the run's config)."""
    from huggingface_hub import ModelCard

    from editgrpo.config import GRPOConfig
    from viva_base.sft import SFTConfig

    monkeypatch.chdir(repo_root)
    final = _sft(tmp_path / "sft")
    card = ModelCard.load(final / CARD)
    assert card.data.library_name == "edit-grpo" and card.data.pipeline_tag == "video-to-video"
    assert {"video-editing", "edit-grpo", "sft", "viva"} <= set(card.data.tags)
    assert card.data.base_model is None  # the tiny editor: no hub model to name
    rows = _card_table(card.text)
    last = json.loads((tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()[-1])
    assert rows["steps"] == "3 x global batch 4 on 1 process" and rows["data"] == "toy-world pairs (6)"
    assert rows["last loss"] == f"{last['loss']:.4g}" and rows["trained"] == "the whole DiT"
    assert f"--model {final}" in card.text  # the usage names the folder until the result has a hub repo
    _run_card_usage(card.text, tmp_path, repo_root)
    again = load_recipe(SFTConfig, [f"recipe={final / TRAINING_CONFIG}"])
    assert again == load_recipe(SFTConfig, [*SFT_STEPS, f"output_dir={tmp_path / 'sft'}"])

    out = _grpo(tmp_path / "grpo", final, eval_manifest)
    lora = out / "lora"
    card = ModelCard.load(lora / CARD)
    assert {"lora", "peft", "grpo"} <= set(card.data.tags) and card.data.base_model is None
    assert json.loads((lora / "adapter_config.json").read_text())["base_model_name_or_path"] == str(final)
    rows = _card_table(card.text)
    metrics = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows["iterations"] == "2 on 1 process" and rows["last iteration's reward"] == f"{metrics[-1]['reward']:.4g}"
    assert rows["rewards"] == "clip_if x 1, clip_sp x 0.5" and rows["LoRA"] == "r4 / alpha 8, gaussian init"
    # the evaluation table holds each summary's numbers, start and end, and the report's oracle delta
    start, end = (json.loads((out / "eval" / f"step-{s}" / "summary.json").read_text())["groups"]["all"]
                  for s in (0, 2))
    table = {c[0]: c[1:] for c in ([x.strip() for x in l.strip().strip("|").split("|")]
                                   for l in card.text.split("## Evaluation", 1)[1].splitlines() if l.startswith("| "))}
    for key in ("oracle", "if_error", "sp_error", "reward/clip_sp"):
        assert table[key] == [f"{start[key]:.4g}", f"{end[key]:.4g}"]
    report = json.loads((out / "report.json").read_text())
    assert f"delta {report['delta_oracle']['mean']:+.4f}" in card.text
    assert load_recipe(GRPOConfig, [f"recipe={lora / TRAINING_CONFIG}"]).train.num_iterations == 2
    _run_card_usage(card.text, tmp_path, repo_root, shell=True)  # the editor + this LoRA, as the card says


def test_eval_results_without_evaluation_or_report_is_empty_or_a_single_column(tmp_path):
    assert eval_results(tmp_path / "none") == ""
    step = tmp_path / "eval" / "step-5"
    step.mkdir(parents=True)
    groups = {"all": {"n": 3, "reward": 0.25, "reward/pickscore": 0.5}}
    (step / "summary.json").write_text(json.dumps({"seeds": [1], "sampler": {"num_steps": 4, "shift": None},
                                                   "groups": groups}))
    text = eval_results(tmp_path / "eval")
    assert "| metric | step 5 |" in text and "| reward | 0.25 |" in text and "| reward/pickscore | 0.5 |" in text
    assert "shift" not in text and "oracle" not in text


@pytest.mark.slow
def test_push_to_hub_creates_the_repo_first_then_uploads_the_result_with_its_card(tmp_path, repo_root, monkeypatch,
                                                                                 fake_hub, eval_manifest):
    monkeypatch.chdir(repo_root)
    final = _sft(tmp_path / "sft", "hub.push_to_hub=true", "hub.repo_id=me/toy-editor", "hub.license=apache-2.0")
    (create, repo, kw), (upload, repo2, up) = fake_hub.calls
    assert (create, repo, kw) == ("create_repo", "me/toy-editor", {"private": True, "exist_ok": True})
    assert (upload, repo2, up["folder"], up["revision"]) == ("upload_folder", "me/toy-editor", str(final), None)
    assert {CARD, TRAINING_CONFIG, "editor_config.json", "transformer/config.json"} <= set(up["files"])
    assert "--model me/toy-editor" in up["card"] and "license: apache-2.0" in up["card"]
    assert "# me/toy-editor: a video editor (SFT)" in up["card"]

    # the Edit-GRPO run: no repo id -> the output folder's name under the token's account, on a branch
    fake_hub.calls.clear()
    out = _grpo(tmp_path / "my-lora", final, eval_manifest, "hub.push_to_hub=true", "hub.private=false",
                "hub.revision=dev")
    (create, repo, kw), branch, (upload, repo2, up) = fake_hub.calls
    assert (create, repo, kw) == ("create_repo", "my-lora", {"private": False, "exist_ok": True})
    assert branch == ("create_branch", "me/my-lora", {"branch": "dev", "exist_ok": True})
    assert (repo2, up["folder"], up["revision"]) == ("me/my-lora", str(out / "lora"), "dev")
    assert {CARD, TRAINING_CONFIG, "pytorch_lora_weights.safetensors", "adapter_model.safetensors",
            "adapter_config.json"} <= set(up["files"])
    assert "--lora me/my-lora" in up["card"] and "## Evaluation" in up["card"]


def test_hub_settings_fail_in_one_line_before_anything_is_built(tmp_path, monkeypatch, fake_hub):
    def fails(hub, match):
        with pytest.raises(UserError, match=match):
            check_hub(hub, tmp_path / "run")

    fails(HubConfig(push_to_hub=True, repo_id="me/bad name!"), r"hub.repo_id='me/bad name!' is not a valid")
    fails(HubConfig(push_to_hub=True, repo_id="a/b/c"), r"hub.repo_id='a/b/c' is not a valid")
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    fails(HubConfig(push_to_hub=True, repo_id="me/x"), "HF_HUB_OFFLINE is set")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))  # no stored login either
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "hf_home" / "token"))
    fails(HubConfig(push_to_hub=True, repo_id="me/x"), "needs a Hugging Face token")
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")

    def refused(self, repo_id, **kw):
        raise PermissionError("401 Client Error: Unauthorized\nmore")

    monkeypatch.setattr(FakeHub, "create_repo", refused)
    fails(HubConfig(push_to_hub=True, repo_id="me/x"), r"cannot create the hub repo 'me/x' \(PermissionError: 401 "
                                                       r"Client Error: Unauthorized\); check the token")
    assert check_hub(HubConfig(), tmp_path) is None  # no push: nothing checked, no call
    assert check_hub(HubConfig(push_to_hub=True, repo_id="me/x"), tmp_path, create=False) == "me/x"
    monkeypatch.setenv("RANK", "1")  # not the main process: checks only, the main process creates the repo
    assert check_hub(HubConfig(push_to_hub=True, repo_id="me/x"), tmp_path) == "me/x"
    assert fake_hub.calls == []


def test_a_failed_upload_keeps_the_folder_and_says_how_to_upload_it(tmp_path, fake_hub):
    folder = tmp_path / "lora"
    folder.mkdir()
    (folder / CARD).write_text("card")
    fake_hub.fail_upload = True
    with pytest.raises(UserError) as err:
        push_folder(HubConfig(push_to_hub=True, revision="dev"), "me/x", folder, "Edit-GRPO LoRA")
    assert str(err.value) == (f"the Edit-GRPO LoRA is saved in {folder}, but uploading it to the hub repo 'me/x' "
                              f"failed (ConnectionError: Connection reset by peer); upload it with "
                              f"`hf upload me/x {folder} --revision dev`")
    assert (folder / CARD).read_text() == "card"


@pytest.mark.parametrize("module,recipe", [("viva_base.sft", "recipes/sft_tiny.yaml"),
                                           ("editgrpo.train", "recipes/toy.yaml")])
def test_push_to_hub_offline_is_one_line_exit_2_in_seconds(tmp_path, repo_root, module, recipe, timed_run):
    run, seconds, wall = timed_run([sys.executable, "-m", module, f"recipe={recipe}", f"output_dir={tmp_path / 'run'}",
                          "hub.push_to_hub=true", "hub.repo_id=me/x"], cwd=repo_root, capture_output=True, text=True,
                         timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr[-2000:]
    assert run.stderr.strip().splitlines()[-1].startswith("error: hub.push_to_hub=true, but HF_HUB_OFFLINE is set")
    assert not (tmp_path / "run").exists()
    assert seconds < 30 and wall < 120, (seconds, wall)  # CPU seconds: see the timed_run fixture


def _cache_repo(cache: Path, repo_id: str, files: Path) -> Path:
    """Lay ``files`` out as ``snapshot_download`` leaves a model repo in the Hugging Face cache."""
    import shutil

    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(files, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return repo / "snapshots" / commit


def test_a_lora_loads_by_hub_repo_id_from_the_cache(tmp_path, monkeypatch):
    """``load_lora`` and ``viva_base.edit --lora`` take ``owner/name`` as editors do: offline, from the cache."""
    from huggingface_hub import constants

    from viva_base.edit import check_lora_dirs
    from viva_base.errors import CheckpointError
    from viva_base.peft_utils import add_lora, lora_state_dict, load_lora, save_lora
    from viva_base.tiny import make_tiny_editor

    trained = make_tiny_editor(seed=0)
    add_lora(trained.transformer, rank=2, alpha=4, targets=trained.lora_targets)
    with torch.no_grad():
        for name, p in trained.transformer.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    save_lora(trained.transformer, tmp_path / "lora")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    _cache_repo(tmp_path / "cache", "me/toy-lora", tmp_path / "lora")
    monkeypatch.chdir(tmp_path)
    check_lora_dirs(["me/toy-lora", str(tmp_path / "lora")])
    fresh = make_tiny_editor(seed=0)
    load_lora(fresh.transformer, "me/toy-lora")
    want = load_file(str(tmp_path / "lora" / "pytorch_lora_weights.safetensors"))
    got = lora_state_dict(fresh.transformer)
    assert want and all(torch.equal(want[f"transformer.{k}"], v) for k, v in got.items()) and len(got) == len(want)
    with pytest.raises(CheckpointError, match="nolora: LoRA folder not found"):
        check_lora_dirs(["nolora"])
    with pytest.raises(CheckpointError, match="me/absent: no such directory, and the hub repo could not be fetched"):
        load_lora(fresh.transformer, "me/absent")
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="is a file; --lora takes the LoRA's folder"):
        check_lora_dirs([str(tmp_path / "file")])


@pytest.mark.parametrize("kind", ["viva", "lucy"])
def test_an_editor_pushes_itself_with_a_card_from_python(tmp_path, fake_hub, kind):
    """``editor.push_to_hub(repo_id)`` (diffusers' convention): the repo is created, then the folder
    ``save_pretrained`` writes, with a model card, is uploaded from a temporary folder that is gone afterwards."""
    from huggingface_hub import ModelCard

    from viva_base.tiny import make_tiny_editor
    from viva_base.tiny_lucy import make_tiny_lucy_editor

    editor = make_tiny_editor(seed=0) if kind == "viva" else make_tiny_lucy_editor(seed=0)
    url = editor.push_to_hub("me/tiny-editor", private=False, license="apache-2.0", commit_message="first")
    (create, repo, kw), (upload, repo2, up) = fake_hub.calls
    assert (create, repo, kw) == ("create_repo", "me/tiny-editor", {"private": False, "exist_ok": True})
    assert (upload, repo2) == ("upload_folder", "me/tiny-editor") and url.startswith("https://huggingface.co/me/")
    assert {CARD, "editor_config.json"} <= set(up["files"]) and not Path(up["folder"]).exists()
    assert up["message"] == "first"
    card = ModelCard(up["card"])
    assert card.data.license == "apache-2.0" and "load_editor(\"me/tiny-editor\")" in card.text
    assert ("LucyEditor" in card.text) == (kind == "lucy") and "## Training" not in card.text
    with pytest.raises(UserError, match=r"push_to_hub\('not a repo id'\): not a valid hub repo id"):
        editor.push_to_hub("not a repo id")
    fake_hub.fail_upload = True
    with pytest.raises(UserError, match=r"^uploading the editor to the hub repo 'me/tiny-editor' failed "
                                        r"\(ConnectionError: Connection reset by peer\)$"):
        editor.push_to_hub("me/tiny-editor")
