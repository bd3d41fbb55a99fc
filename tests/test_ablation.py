"""benchmarks.ablation (the paper's Table 2 on the toy world) and the text-only instructor option it needs."""
import json

import pytest
import torch
from omegaconf import OmegaConf

from viva_base.model import VivaEditor


def _frames(seed, b=1, f=5, size=32):
    return torch.rand(b, f, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture()
def editor():
    from viva_base.tiny import make_tiny_editor

    return make_tiny_editor(seed=0)


def test_text_only_instructor_ignores_the_frames(editor):
    """instructor_images=false: two different first frames, same instruction -> identical VLM tokens (the source
    latent still differs); with images (the default) the tokens differ."""
    a, b = _frames(1), _frames(2)
    text = ["add a red square"]
    on_a, _ = editor.encode_condition(a, text, with_uncond=False)
    on_b, _ = editor.encode_condition(b, text, with_uncond=False)
    assert not torch.allclose(on_a["prompt_embeds"], on_b["prompt_embeds"])
    editor.config.instructor_images = False
    off_a, un_a = editor.encode_condition(a, text)
    off_b, un_b = editor.encode_condition(b, text)
    assert torch.equal(off_a["prompt_embeds"], off_b["prompt_embeds"]) and torch.equal(un_a["prompt_embeds"], un_b["prompt_embeds"])
    assert not torch.equal(off_a["source_latents"], off_b["source_latents"])  # the DiT still sees the source
    assert off_a["prompt_embeds"].shape[1] < on_a["prompt_embeds"].shape[1]  # no image tokens


def test_instructor_images_round_trips_and_recipe_key(editor, tmp_path):
    from viva_base.training import ModelConfig, build_editor

    editor.config.instructor_images = False
    editor.save_pretrained(tmp_path / "ed")
    assert json.loads((tmp_path / "ed" / "editor_config.json").read_text())["instructor_images"] is False
    loaded = VivaEditor.from_pretrained(tmp_path / "ed")
    assert loaded.config.instructor_images is False
    c1, _ = loaded.encode_condition(_frames(1), ["remove the blue circle"], with_uncond=False)
    c2, _ = loaded.encode_condition(_frames(2), ["remove the blue circle"], with_uncond=False)
    assert torch.equal(c1["prompt_embeds"], c2["prompt_embeds"])
    # the recipe key: unset keeps the editor's setting, true/false sets it
    assert build_editor(ModelConfig(pretrained=str(tmp_path / "ed"))).config.instructor_images is False
    assert build_editor(ModelConfig(pretrained=str(tmp_path / "ed"), instructor_images=True)).config.instructor_images
    assert build_editor(ModelConfig(tiny=True, instructor_images=False)).config.instructor_images is False


def test_unknown_row_and_bad_recipe_are_one_line_errors(capsys, tmp_path):
    from benchmarks.ablation import main

    assert main(["recipe=recipes/toy.yaml", "rows=Vanilla,+X", f"output_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown row '+X'" in err and "+V+M+I+E" in err
    assert main([f"recipe={tmp_path / 'missing.yaml'}"]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["recipe=recipes/tiny.yaml", f"output_dir={tmp_path}"]) == 2
    assert "toy.enabled" in capsys.readouterr().err
    assert main(["recipe=recipes/toy.yaml", "output_dir=/proc/no/such"]) == 2  # an OSError traceback before
    assert "output_dir=/proc/no/such: cannot create folders in /proc" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:  # argparse's own errors: usage and one line, exit 2
        main(["recipe=recipes/toy.yaml", "--sft-steps", "x"])
    assert exc.value.code == 2


def _flat(d, prefix=""):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


@pytest.mark.slow
def test_quick_ablation_table_and_row_configs(tmp_path, repo_root, monkeypatch, one_thread):
    """--quick runs every row at tiny sizes: the table has every row, group and metric column with intervals, the
    md/json/html and the plots are written, each row's editor is kept, and the rows' resolved SFT recipes differ from
    the previous row's in exactly the keys that row ablates."""
    from benchmarks.ablation import GROUPS, ROWS, main

    monkeypatch.chdir(repo_root)
    assert main(["recipe=recipes/toy.yaml", "--quick", f"output_dir={tmp_path}"]) == 0
    root = tmp_path / "ablation-quick"
    for name in ("ablation.md", "ablation.json", "ablation.html", "ablation_oracle.png", "ablation_clip_tc.png"):
        assert (root / name).exists(), name
    res = json.loads((root / "ablation.json").read_text())
    assert res["rows"] == [r.name for r in ROWS] == ["Vanilla", "+V", "+V+M", "+V+M+I", "+V+M+I+E"]
    assert res["groups"] == [g for g, _ in GROUPS]
    assert {"add", "remove", "replace", "recolour", "background", "compound", "compound-novel"} <= set(res["groups"])
    assert res["metrics"] == ["oracle", "if_error", "sp_error", "if_progress", "reward/clip_if", "reward/clip_sp",
                              "reward/pixel_sp", "reward/clip_tc"]
    for i, row in enumerate(res["rows"]):
        for g in res["groups"]:
            for m in res["metrics"]:
                cell = res["table"][row][g][m]
                assert cell["n"] >= 1 and cell["mean"] is not None, (row, g, m)
                if i == 0:
                    assert cell["delta"] is None
                else:
                    lo, hi = cell["delta"]["ci95"]
                    assert lo <= cell["delta"]["mean"] <= hi, (row, g, m)
    assert set(res["compute"]) >= set(res["rows"]) and res["compute"]["Vanilla"]["sft_s"] > 0
    md = (root / "ablation.md").read_text()
    assert "## oracle" in md and "## clip_tc" in md and "compound-novel" in md and "[" in md
    assert "<table" in (root / "ablation.html").read_text()
    # each row keeps its editor and resolved recipe; rows differ in exactly what they ablate
    cfg = {r.folder: _flat(OmegaConf.to_container(OmegaConf.load(root / "rows" / r.folder / "sft" / "config.yaml")))
           for r in ROWS if not r.grpo}
    expect = {("Vanilla", "V"): {"model.instructor_images"},
              ("V", "V+M"): {"train.w_m", "train.mask_normalization"},
              ("V+M", "V+M+I"): {"data.p_video"}}
    for (a, b), keys in expect.items():
        diff = {k for k in cfg[a].keys() | cfg[b].keys() if cfg[a].get(k) != cfg[b].get(k)} - {"output_dir"}
        assert diff == keys, (a, b, diff)
    assert cfg["Vanilla"]["model.instructor_images"] is False and cfg["V"]["model.instructor_images"] is True
    assert cfg["Vanilla"]["data.p_video"] == 1.0 and cfg["V+M+I"]["data.p_video"] == 0.1  # sft_toy.yaml's
    # a smoke run does not compile its 3 SFT steps per row (inductor took ~30 s a row on 2 cores, 170 s in all)
    assert {c["train.compile"] for c in cfg.values()} == {"none"}
    for r in ROWS[:4]:
        meta = json.loads((root / "rows" / r.folder / "sft" / "final" / "editor_config.json").read_text())
        assert meta["instructor_images"] is (r.name != "Vanilla")
    # +E: Edit-GRPO on the +V+M+I editor, its LoRA kept
    grpo = OmegaConf.load(root / "rows" / "V+M+I+E" / "grpo" / "config.yaml")
    assert grpo.model.pretrained == str(root / "rows" / "V+M+I" / "sft" / "final")
    assert (root / "rows" / "V+M+I+E" / "grpo" / "lora").is_dir()
    # a rerun reuses every stage and evaluation (nothing retrained)
    stamp = (root / "rows" / "V" / "sft" / "final" / "editor_config.json").stat().st_mtime_ns
    evals = (root / "rows" / "V" / "eval" / "key.json").stat().st_mtime_ns
    assert main(["recipe=recipes/toy.yaml", "--quick", f"output_dir={tmp_path}", "rows=V,+V+M"]) == 0
    assert (root / "rows" / "V" / "sft" / "final" / "editor_config.json").stat().st_mtime_ns == stamp
    assert (root / "rows" / "V" / "eval" / "key.json").stat().st_mtime_ns == evals
    assert json.loads((root / "ablation.json").read_text())["rows"] == ["+V", "+V+M"]
