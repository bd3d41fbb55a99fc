"""The recipes that ship with the package: list them, or copy them to edit.

    python -m editgrpo.recipes                      # every shipped recipe, with its first comment line
    python -m editgrpo.recipes copy                 # all of them into ./recipes (the layout the docs use)
    python -m editgrpo.recipes copy viva accelerate/zero3.yaml --to my_recipes [--force]

Outside a clone (``pip install`` of the package alone), ``recipe=recipes/<name>.yaml`` already reads the shipped file
(``viva_base.recipe.resolve_recipe_path``; a file of that path in the working directory wins). ``accelerate launch
--config_file`` reads files only, and the accelerate configs name their DeepSpeed file relative to the working
directory (``recipes/accelerate/ds_zero3.json``): ``copy`` keeps that layout, so every command in the docs runs
from the folder ``copy`` was run in. The torchtune counterpart is ``tune ls`` / ``tune cp``.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from viva_base.errors import UserError
from viva_base.recipe import packaged_recipes

KINDS = ("*.yaml", "accelerate/*.yaml", "accelerate/*.json")


def shipped() -> list[Path]:
    """Every shipped recipe file, relative to the shipped folder (``tiny.yaml``, ``accelerate/zero3.yaml``, ...)."""
    root = packaged_recipes()
    return sorted({p.relative_to(root) for kind in KINDS for p in root.glob(kind) if p.is_file()},
                  key=lambda p: (len(p.parts), str(p)))


def summary(path: Path, width: int = 100) -> str:
    """What a recipe is: the first line of its opening comment that is not a command, cut to ``width``; or ''."""
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        text = line.lstrip("#").strip()
        if text and not text.startswith(("accelerate launch", "python -m", "huggingface-cli", "hf ")):
            return text if len(text) <= width else text[:width - 3].rstrip() + "..."
    return ""


def select(names: list[str]) -> list[Path]:
    """The shipped files ``names`` denote: ``viva``, ``viva.yaml``, ``recipes/viva.yaml``, ``accelerate`` (the folder);
    none: every file. A UserError names an unknown one and the choices."""
    files = shipped()
    if not names:
        return files
    chosen: list[Path] = []
    for name in names:
        rel = Path(*Path(name).parts[1:]) if Path(name).parts[:1] == ("recipes",) else Path(name)
        hits = [f for f in files if f == rel or f == rel.with_suffix(".yaml") or rel in f.parents]
        if not hits:
            raise UserError(f"no shipped recipe {name!r}: choose from {', '.join(str(f) for f in files)}")
        chosen += [f for f in hits if f not in chosen]
    return chosen


def copy(names: list[str], to: str | Path = "recipes", force: bool = False) -> list[Path]:
    """Copy the shipped files ``names`` (all by default) into ``to``, keeping their layout. Refuses, before writing
    anything, to overwrite a file unless ``force``. Returns the files written."""
    root, dest = packaged_recipes(), Path(to)
    files = select(names)
    clash = [dest / f for f in files if (dest / f).exists()]
    if clash and not force:
        raise UserError(f"{', '.join(map(str, clash))} already exist{'s' if len(clash) == 1 else ''}: keep your "
                        "edits, or pass --force to overwrite")
    written = []
    for f in files:
        (dest / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(root / f, dest / f)
        written.append(dest / f)
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m editgrpo.recipes", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd")
    sub.add_parser("list", help="every shipped recipe (the default)")
    c = sub.add_parser("copy", help="copy shipped recipes to edit them")
    c.add_argument("names", nargs="*",
                   help="recipes (tiny, viva.yaml, accelerate/zero3.yaml, accelerate); default: all")
    c.add_argument("--to", default="recipes", help="destination folder (default: ./recipes, the docs' layout)")
    c.add_argument("--force", action="store_true", help="overwrite files that exist")
    args = p.parse_args(argv)
    try:
        if args.cmd == "copy":
            for path in copy(args.names, args.to, args.force):
                print(path)
            return 0
        root = packaged_recipes()
        files = shipped()
        if not files:
            raise UserError(f"no recipes shipped in {root}: reinstall the package")
        width = max(len(str(f)) for f in files)
        print(f"recipes shipped in {root} (recipe=recipes/<name>.yaml reads them):")
        for f in files:
            print(f"  {str(f):<{width}}  {summary(root / f) if f.suffix == '.yaml' else ''}".rstrip())
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    from viva_base.errors import exit_with

    exit_with(main)
