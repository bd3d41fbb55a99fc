"""The recipes ship with the package: ``recipe=recipes/<name>.yaml`` works outside a clone, ``python -m
editgrpo.recipes`` lists and copies them, and the wheel holds every file of ``recipes/``."""
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from editgrpo.config import GRPOConfig, validate_config
from editgrpo.recipes import main as recipes_cli
from viva_base.recipe import RecipeError, load_recipe, packaged_recipes, resolve_recipe_path


def _tracked_recipes(repo_root) -> list[str]:
    out = subprocess.run(["git", "ls-files", "recipes"], cwd=repo_root, capture_output=True, text=True)
    if out.returncode != 0 or not out.stdout.strip():
        pytest.skip("not a git checkout")
    return sorted(line[len("recipes/"):] for line in out.stdout.splitlines())


def test_the_shipped_folder_is_the_clones_recipes(repo_root):
    assert packaged_recipes().resolve() == (Path(repo_root) / "recipes").resolve()


def test_a_recipe_path_outside_a_clone_reads_the_shipped_recipe(repo_root, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no recipes/ here
    shipped = packaged_recipes() / "tiny.yaml"
    for name in ("recipes/tiny.yaml", "tiny.yaml", "tiny", "recipes/tiny"):
        assert resolve_recipe_path(name) == shipped, name
    assert resolve_recipe_path("recipes/accelerate/zero3.yaml") == packaged_recipes() / "accelerate" / "zero3.yaml"
    with pytest.raises(RecipeError, match=r"'recipes/tiniest\.yaml' not found.*sft_tiny, sft_toy, sft_viva, tiny, toy"):
        resolve_recipe_path("recipes/tiniest.yaml")
    with pytest.raises(RecipeError, match="not found"):
        resolve_recipe_path(str(tmp_path / "tiny.yaml"))  # an absolute path is only that file
    # a file of that path in the working directory wins
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "tiny.yaml").write_text("train:\n  num_iterations: 1\n")
    assert resolve_recipe_path("recipes/tiny.yaml") == Path("recipes/tiny.yaml")
    assert load_recipe(GRPOConfig, ["recipe=recipes/tiny.yaml"]).train.num_iterations == 1


def test_the_toy_chain_loads_and_checks_from_any_folder(tmp_path, monkeypatch):
    """recipes/toy.yaml names its SFT stage's recipe (toy.sft_recipe: recipes/sft_toy.yaml): read from the package
    too, so the main command's checks pass outside a clone."""
    monkeypatch.chdir(tmp_path)
    cfg = load_recipe(GRPOConfig, ["recipe=recipes/toy.yaml"])
    assert cfg.toy.enabled and cfg.toy.sft_recipe == "recipes/sft_toy.yaml"
    validate_config(cfg)


def test_list_and_copy(repo_root, tmp_path, monkeypatch, capsys):
    tracked = _tracked_recipes(repo_root)
    monkeypatch.chdir(tmp_path)
    assert recipes_cli([]) == 0
    listing = capsys.readouterr().out
    for name in tracked:
        assert f"  {name}" in listing
    assert "The main job: the whole VIVA + Edit-GRPO method on the toy world" in listing  # toy.yaml's first line
    # copy: all of them into ./recipes, byte for byte, in the layout the docs use
    assert recipes_cli(["copy"]) == 0
    copied = sorted(str(p.relative_to("recipes")) for p in Path("recipes").rglob("*") if p.is_file())
    assert copied == tracked
    for name in tracked:
        assert (tmp_path / "recipes" / name).read_bytes() == (Path(repo_root) / "recipes" / name).read_bytes()
    capsys.readouterr()
    # an edited copy is never overwritten without --force, and a refused copy writes nothing
    (tmp_path / "recipes" / "tiny.yaml").write_text("# mine\n")
    assert recipes_cli(["copy", "tiny", "viva"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: recipes/tiny.yaml, recipes/viva.yaml already exist") and "--force" in err
    assert (tmp_path / "recipes" / "tiny.yaml").read_text() == "# mine\n"
    assert recipes_cli(["copy", "recipes/tiny.yaml", "--force"]) == 0
    assert (tmp_path / "recipes" / "tiny.yaml").read_bytes() == (Path(repo_root) / "recipes" / "tiny.yaml").read_bytes()
    # a folder takes its files (an accelerate config with the DeepSpeed file it names); an unknown name is one line
    assert recipes_cli(["copy", "accelerate", "--to", "mine"]) == 0
    assert sorted(p.name for p in (tmp_path / "mine" / "accelerate").iterdir()) == sorted(
        Path(t).name for t in tracked if t.startswith("accelerate/"))
    capsys.readouterr()
    assert recipes_cli(["copy", "tiniest", "--to", "other"]) == 2
    assert "no shipped recipe 'tiniest': choose from" in capsys.readouterr().err and not (tmp_path / "other").exists()


@pytest.mark.slow
def test_the_wheel_holds_every_recipe(repo_root, tmp_path):
    """``pip wheel`` of the project (the package-data globs through the editgrpo/recipe_files link): every tracked
    file of recipes/ is in the wheel under editgrpo/recipe_files/, byte for byte."""
    tracked = _tracked_recipes(repo_root)
    src = tmp_path / "src"
    listed = subprocess.run(["git", "ls-files"], cwd=repo_root, capture_output=True, text=True).stdout.splitlines()
    for rel in listed:
        target = src / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if os.path.islink(Path(repo_root) / rel):
            os.symlink(os.readlink(Path(repo_root) / rel), target)
        else:
            shutil.copyfile(Path(repo_root) / rel, target)
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                           str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    with zipfile.ZipFile(wheel) as z:
        inside = {n[len("editgrpo/recipe_files/"):]: n for n in z.namelist() if n.startswith("editgrpo/recipe_files/")}
        assert sorted(inside) == tracked
        for name in tracked:
            assert z.read(inside[name]) == (Path(repo_root) / "recipes" / name).read_bytes()
