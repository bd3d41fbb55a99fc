"""Recipe loading shared by every command line (``viva_base.sft``, ``editgrpo.train``, ...).

A recipe is a dataclass schema (typed defaults) + a YAML file + ``key=value`` overrides, the torchtune
style::

    python -m viva_base.sft recipe=recipes/sft_tiny.yaml train.max_steps=50 data.p_video=0.5

Unknown keys and wrong types are errors that name the key and the closest valid one. The resolved
config is logged and saved next to the outputs (``output_dir/config.yaml``).
"""
from __future__ import annotations

import dataclasses
import difflib
import inspect
import logging
import os
import re
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence, TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

logger = logging.getLogger(__name__)
T = TypeVar("T")

SECRET_MARKERS = ("api_key", "secret", "password", "token_value")


class RecipeError(ValueError):
    """A user error in a recipe or an override: the message says which key and how to fix it."""


def _dotted_keys(cfg: Any, prefix: str = "") -> list[str]:
    keys = []
    if isinstance(cfg, DictConfig):
        for k in cfg.keys():
            full = f"{prefix}{k}"
            keys.append(full)
            try:
                child = cfg._get_node(k)
            except Exception:  # pragma: no cover
                child = None
            if isinstance(child, DictConfig):
                keys.extend(_dotted_keys(child, full + "."))
    return keys


def _closest(key: str, schema: DictConfig) -> str:
    candidates = _dotted_keys(schema)
    leaf = key.rsplit(".", 1)[-1]
    match = difflib.get_close_matches(key, candidates, n=1, cutoff=0.5)
    if not match:
        by_leaf = {c.rsplit(".", 1)[-1]: c for c in candidates}
        leaf_match = difflib.get_close_matches(leaf, list(by_leaf), n=1, cutoff=0.5)
        match = [by_leaf[leaf_match[0]]] if leaf_match else []
    return f"; did you mean '{match[0]}'?" if match else ""


def _describe(exc: OmegaConfBaseException, schema: DictConfig, source: str) -> str:
    key = getattr(exc, "full_key", None) or getattr(exc, "key", None) or ""
    if isinstance(exc, ConfigKeyError) or "not in struct" in str(exc) or "Key '" in str(exc):
        return f"unknown recipe key '{key}' in {source}{_closest(str(key), schema)}"
    if isinstance(exc, ValidationError):
        msg = str(exc).splitlines()[0]
        return f"bad value for recipe key '{key}' in {source}: {msg}"
    return f"invalid recipe ({source}): {str(exc).splitlines()[0]}"


def parse_args(argv: Sequence[str]) -> tuple[str | None, list[str]]:
    """Split ``recipe=PATH`` (also ``--recipe=PATH`` and ``--recipe PATH``) from the ``key=value`` overrides."""
    recipe, overrides = None, []
    argv = list(argv)
    for i, arg in enumerate(argv):
        if arg in ("--recipe", "--config"):
            if i + 1 >= len(argv) or "=" in argv[i + 1]:
                raise RecipeError(f"{arg} needs a path: {arg} PATH")
            argv[i + 1] = f"recipe={argv[i + 1]}"
            continue
        if "=" not in arg:
            raise RecipeError(f"argument '{arg}' is not key=value (use recipe=PATH and key=value overrides)")
        key, value = arg.split("=", 1)
        if key in ("recipe", "--recipe", "--config"):
            recipe = value
        else:
            overrides.append(f"{key.lstrip('-')}={value}")
    return recipe, overrides


_SIZE = re.compile(r"^\s*(\d+)\s*[xX]\s*(\d+)\s*$")


def size_hw(value) -> Any:
    """A ``size`` value as ``[H, W]``: the recipes' list form passes through; the command lines' ``"WxH"`` string
    (``--size 848x480``, the way video sizes are written) becomes ``[480, 848]``."""
    if isinstance(value, str):
        m = _SIZE.match(value)
        if m:
            return [int(m.group(2)), int(m.group(1))]
    return value


def _canonical_key(key: str, aliases: dict[str, str], source: str) -> str:
    """``key`` with a deprecated prefix (``aliases``: old dotted prefix -> new one) renamed, with a warning."""
    for old, new in aliases.items():
        if key == old or key.startswith(old + "."):
            renamed = new + key[len(old):]
            logger.warning("recipe key '%s' (%s) is a deprecated spelling of '%s': it still works, but use the new "
                           "name", key, source, renamed)
            return renamed
    return key


def _normalise_tree(tree: dict, aliases: dict[str, str], source: str) -> dict:
    """A YAML recipe (plain containers) with deprecated keys moved to their current place and ``size: WxH``
    strings made ``[H, W]``."""
    for old, new in aliases.items():
        *parents, leaf = old.split(".")
        node = tree
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict) or leaf not in node:
            continue
        value = node.pop(leaf)
        logger.warning("recipe key '%s' (%s) is a deprecated spelling of '%s': it still works, but use the new name",
                       old, source, new)
        *parents, leaf = new.split(".")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        if isinstance(node.get(leaf), dict) and isinstance(value, dict):
            value = {**node[leaf], **value}
        node[leaf] = value

    def sizes(node):
        if isinstance(node, dict):
            return {k: size_hw(v) if k == "size" else sizes(v) for k, v in node.items()}
        return node

    return sizes(tree)


def _normalise_override(item: str, aliases: dict[str, str]) -> str:
    key, value = item.split("=", 1)
    key = _canonical_key(key, aliases, f"override '{item}'")
    if key.rsplit(".", 1)[-1] == "size":
        hw = size_hw(value)
        value = f"[{hw[0]},{hw[1]}]" if isinstance(hw, list) else value
    return f"{key}={value}"


# Old spellings of command-line flags: one name per knob across commands and recipes (``--num-steps`` and
# ``--guidance-scale`` as ``sampling.num_steps`` / ``sampling.guidance_scale``); the old ones still parse.
DEPRECATED_FLAGS = {"--steps": "--num-steps", "--guidance": "--guidance-scale"}


def warn_deprecated_flags(argv: Sequence[str], flags: Sequence[str]) -> list[str]:
    """Log a deprecation warning for each old flag spelling (of ``flags``) used in ``argv``; returns them."""
    used = [a.split("=", 1)[0] for a in argv if a.split("=", 1)[0] in flags and a.split("=", 1)[0] in DEPRECATED_FLAGS]
    for flag in used:
        logger.warning("%s is the old name of %s: it still works, but use %s", flag, DEPRECATED_FLAGS[flag],
                       DEPRECATED_FLAGS[flag])
    return used


def recipe_aliases(schema: type) -> dict[str, str]:
    """The schema's deprecated key spellings (``RECIPE_ALIASES``: old dotted prefix -> the current one)."""
    return dict(getattr(schema, "RECIPE_ALIASES", {}) or {})


def recipe_replaced(schema) -> tuple[str, ...]:
    """The schema's keys whose mapping in a recipe *replaces* the default (``RECIPE_REPLACE``): a recipe's
    ``rewards:`` block is the whole set of rewards, not an addition to the default ones."""
    return tuple(getattr(schema, "RECIPE_REPLACE", ()) or ())


def packaged_recipes() -> Path:
    """The recipes that ship with the package (``editgrpo/recipe_files``, a link to the clone's ``recipes/``), found
    without importing ``editgrpo``."""
    import importlib.util

    spec = importlib.util.find_spec("editgrpo")
    return Path(list(spec.submodule_search_locations)[0]) / "recipe_files"


def resolve_recipe_path(path: str | Path) -> Path:
    """A recipe file: ``path`` itself where it is a file; else, for ``recipes/<name>`` (as every command in the docs
    writes it) or a bare recipe name (``tiny``, ``tiny.yaml``), the one shipped with the package, so the documented
    commands work outside a clone too (``pip install`` without the repository). A file in the working directory
    always wins. Raises :class:`RecipeError` naming the shipped recipes."""
    p = Path(path)
    if p.is_file():
        return p
    shipped = packaged_recipes()
    if not p.is_absolute():
        rel = Path(*p.parts[1:]) if p.parts[:1] == ("recipes",) and len(p.parts) > 1 else p
        for candidate in (shipped / rel, shipped / f"{rel}.yaml"):
            if candidate.is_file():
                return candidate
    names = ", ".join(sorted(f.stem for f in shipped.glob("*.yaml")))
    raise RecipeError(f"recipe file '{path}' not found: pass recipe=PATH to a YAML file, or a shipped recipe "
                      f"(recipes/<name>.yaml: {names or 'none found'}; `python -m editgrpo.recipes` lists and copies "
                      "them)")


def read_recipe_file(path: str | Path) -> dict:
    """A recipe file's YAML as plain containers (interpolations unresolved), found by :func:`resolve_recipe_path`;
    for commands that read one block of a recipe (a rewards block). Raises :class:`RecipeError` (no such file, not
    YAML, not a mapping)."""
    path = resolve_recipe_path(path)
    try:
        loaded = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except Exception as exc:  # yaml errors come in many classes
        raise RecipeError(f"recipe file '{path}' is not valid YAML: {str(exc).splitlines()[0]}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise RecipeError(f"recipe file '{path}' is not a mapping of recipe keys")
    return loaded


def load_recipe(schema: type[T], argv: Sequence[str] | None = None, *, recipe: str | None = None) -> T:
    """Build the typed config: schema defaults <- YAML recipe <- ``key=value`` overrides.

    A mapping the schema lists in ``RECIPE_REPLACE`` (e.g. ``rewards``) replaces its default when the recipe
    gives one (OmegaConf would merge the two); ``key=value`` overrides still merge into it.

    Deprecated key spellings (the schema's ``RECIPE_ALIASES``) are renamed with a warning, and a ``size`` may be
    written ``WxH`` as on the command lines (``data.size=848x480`` is ``[480, 848]``).
    Returns an OmegaConf structured config (attribute access, typed); raises :class:`RecipeError`.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    path, overrides = parse_args(argv)
    path = path or recipe
    aliases = recipe_aliases(schema)
    base = OmegaConf.structured(schema)
    cfg = base
    if path:
        path = str(resolve_recipe_path(path))  # (the messages below name the file read)
        loaded = read_recipe_file(path)
        try:
            loaded = OmegaConf.create(_normalise_tree(loaded, aliases, path))
            for key in recipe_replaced(schema):
                if OmegaConf.select(loaded, key) is not None:
                    cfg = OmegaConf.structured(schema) if cfg is base else cfg
                    OmegaConf.update(cfg, key, {}, merge=False)
            cfg = OmegaConf.merge(cfg, loaded)
        except OmegaConfBaseException as exc:
            raise RecipeError(_describe(exc, base, path)) from None
    for item in overrides:
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([_normalise_override(item, aliases)]))
        except OmegaConfBaseException as exc:
            raise RecipeError(_describe(exc, base, f"override '{item}'")) from None
    try:
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as exc:
        raise RecipeError(f"recipe key '{getattr(exc, 'full_key', '')}' has no value: set it with key=value") from None
    return cfg  # type: ignore[return-value]


def redacted(cfg: Any) -> dict:
    """The config as a plain dict with secret-looking values replaced (configs hold env-var names, not keys)."""
    data = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dataclasses.asdict(cfg)

    def walk(node):
        if isinstance(node, dict):
            return {k: ("***" if any(m in str(k).lower() for m in SECRET_MARKERS) and v else walk(v))
                    for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    return walk(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def resolved_yaml(cfg: Any) -> str:
    """The resolved, redacted config as YAML (a recipe that loads back to it)."""
    return OmegaConf.to_yaml(OmegaConf.create(redacted(cfg)))


def save_resolved(cfg: Any, output_dir: str | os.PathLike, name: str = "config.yaml") -> Path:
    """Write the resolved, redacted config next to the outputs and log it."""
    text = resolved_yaml(cfg)
    logger.info("resolved config:\n%s", text)
    path = Path(output_dir) / name
    atomic_write_text(path, text)
    return path


_FIELD_COMMENT = re.compile(r"^\s*(\w+)\s*:[^#]*#\s*(.*)$")


def _field_docs(cls: type) -> dict[str, str]:
    """``{field: comment}`` from the ``name: type = default  # comment`` lines of a dataclass's source."""
    try:
        lines = inspect.getsource(cls).splitlines()
    except (OSError, TypeError):  # pragma: no cover (no source: a frozen install)
        return {}
    return {m.group(1): m.group(2).strip() for m in map(_FIELD_COMMENT.match, lines) if m}


def _type_name(tp) -> str:
    name = getattr(tp, "__name__", None) if isinstance(tp, type) else None
    return name or str(tp).replace("typing.", "").replace("NoneType", "None")


def recipe_rows(schema: type, cfg: Any = None) -> list[tuple[str, str, str, str]]:
    """``(key, type, value, doc)`` for every recipe key of ``schema`` (a dataclass, nested ones flattened with dots):
    the value is the default, or the resolved one of ``cfg``; the doc is the field's comment in the schema's source."""
    import typing

    rows = []

    def walk(cls, prefix: str, node) -> None:
        docs = _field_docs(cls)
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            key, tp = f"{prefix}{f.name}", hints.get(f.name, f.type)
            value = node.get(f.name) if node is not None else None
            if dataclasses.is_dataclass(tp):
                walk(tp, key + ".", value)
                continue
            if node is None:
                value = (f.default if f.default is not dataclasses.MISSING else
                         f.default_factory() if f.default_factory is not dataclasses.MISSING else "???")
            elif isinstance(value, DictConfig) or OmegaConf.is_list(value):
                value = OmegaConf.to_container(value)
            rows.append((key, _type_name(tp), repr(value), docs.get(f.name, "")))

    walk(schema, "", cfg)
    return rows


def recipe_reference(schema: type, cfg: Any = None) -> str:
    """Every recipe key of ``schema`` with its type, value and one-line doc, as text (``--help``)."""
    rows = recipe_rows(schema, cfg)
    width = max(len(r[0]) for r in rows)
    text = "\n".join(f"  {k:<{width}}  {t}  = {v}" + (f"\n  {'':<{width}}    {d}" if d else "") for k, t, v, d in rows)
    aliases = recipe_aliases(schema)
    if aliases:
        text += "\n\nOld spellings still accepted: " + ", ".join(f"{o}.* -> {n}.*" for o, n in aliases.items())
    return text


def run_cli(main, schema: type, argv: Sequence[str] | None = None, interrupted=None) -> int:
    """Load the recipe and run ``main(cfg)``; user errors become one line on stderr and exit code 2.

    Ctrl-C (SIGINT) stops with one line and exit code 130, not a traceback: ``interrupted(cfg)``, where given, says
    what the run leaves to continue from (the last checkpoint and how to resume). Under torchrun / accelerate every
    process receives the signal (torchrun's workers twice: the terminal's and the one torchrun forwards; a
    second one while the line is written is ignored); the first process (``RANK`` 0) prints the line.

    ``-h`` / ``--help`` prints the command's usage and every recipe key (type, default, doc) and exits 0; with a
    recipe (``--help recipe=PATH``) the values shown are the resolved ones."""
    from .errors import UserError

    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        rest = [a for a in argv if a not in ("-h", "--help")]
        try:
            cfg = load_recipe(schema, rest) if rest else None
        except RecipeError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        doc = (sys.modules.get(getattr(main, "__module__", ""), None).__doc__ or "").strip()
        print(doc.split("\n\n")[0] if doc else "")
        print("\nArguments: recipe=PATH (or --recipe PATH) loads a YAML recipe; key=value overrides any key below.\n")
        print(f"Recipe keys ({'resolved from ' + ' '.join(rest) if cfg is not None else 'defaults'}):")
        print(recipe_reference(schema, cfg))
        return 0
    logging.basicConfig(level=os.environ.get("LOGLEVEL", "INFO"), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = None
    try:
        cfg = load_recipe(schema, argv)
        main(cfg)
    except (RecipeError, UserError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # a second SIGINT while the line is written (torchrun forwards the terminal's Ctrl-C to workers that got it
        # already) must not turn it into a traceback: ignored until the line is out
        previous = _ignore_sigint()
        try:
            if os.environ.get("RANK", "0") == "0":
                hint = interrupted(cfg) if interrupted is not None and cfg is not None else ""
                print(f"error: interrupted{'; ' + hint if hint else ''}", file=sys.stderr)
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)
        return 130
    return 0


def _ignore_sigint():
    """Ignore SIGINT; returns the handler before, or None where none can be set (not the main thread)."""
    try:
        return signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:
        return None


def check_one_of(key: str, value, allowed) -> None:
    """Config check: ``value`` is one of ``allowed``, else a one-line ``UserError`` naming ``key`` and the choices."""
    from .errors import UserError

    if value not in allowed:
        raise UserError(f"{key}={value!r}: use one of {', '.join(map(str, allowed))}")


def check_positive(key: str, value, strict: bool = True) -> None:
    """Config check: ``value`` is > 0 (``strict``) or >= 0; None passes (an optional value left unset)."""
    from .errors import UserError

    if value is not None and not (value > 0 if strict else value >= 0):
        raise UserError(f"{key}={value!r} must be {'> 0' if strict else '>= 0'}")


def check_fraction(key: str, value, what: str = "a probability") -> None:
    """Config check: ``value`` is in [0, 1] (a probability, a fraction of a frame, a threshold on a score)."""
    from .errors import UserError

    if not 0 <= value <= 1:
        raise UserError(f"{key}={value!r}: {what}, in [0, 1]")


def check_size(key: str, size) -> None:
    """Config check: a clip size ``[height, width]``, both > 0; None passes (the input's own size)."""
    from .errors import UserError

    if size is not None and (len(size) != 2 or min(size) <= 0):
        raise UserError(f"{key}={list(size)!r}: give [height, width], both > 0")


def check_output_dir(key: str, path: str | os.PathLike) -> None:
    """Config check: ``path`` is a folder this process can write in, or one it can create.

    The nearest existing folder on the way to ``path`` gets an empty temporary folder, removed at once: permissions, a
    read-only file system, a file in the way, or a place no folder can be made in (``/proc``) are one ``UserError``
    line naming ``key``, before any data or model is built (an ``OSError`` traceback at the first ``mkdir`` before).
    Nothing is left behind."""
    from .errors import UserError

    target = Path(path).expanduser().absolute()
    if target.exists() and not target.is_dir():
        raise UserError(f"{_named(key, path)}: that is a file, not a folder; give a folder")
    _check_folder_can_be_made(key, path, target)


def check_output_file(key: str, path: str | os.PathLike) -> None:
    """Config check: a file can be written at ``path``: it is not a folder, and its folder exists and can be written
    in or can be created (:func:`check_output_dir`'s probe, nothing left behind)."""
    from .errors import UserError

    target = Path(path).expanduser().absolute()
    if target.is_dir():
        raise UserError(f"{_named(key, path)}: that is a folder; give a file name")
    _check_folder_can_be_made(key, path, target.parent)


def _named(key: str, path) -> str:
    return f"{key} {path}" if key.startswith("-") else f"{key}={path}"  # a flag (--out DIR) or a recipe key


def _check_folder_can_be_made(key: str, path, folder: Path) -> None:
    from .errors import UserError

    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{_named(key, path)}: {existing} is a file, so no folder can be made under it; give another "
                        "folder")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".write-check-", dir=existing))
    except OSError as exc:
        raise UserError(f"{_named(key, path)}: cannot create folders in {existing} ({exc.strerror}); give a writable "
                        "folder") from None
