"""Which wheels a GPU machine without network needs (docs/scaling.md, "Checking a GPU machine").

``python -m benchmarks.gpu_wheels`` prints one ``name==version`` per line: every distribution that this project's
GPU path needs beyond what a PyTorch GPU machine is assumed to have, pinned to the version installed here (the
versions the tests passed with). ``bash benchmarks/gpu_wheels.sh download`` fetches exactly those as Python 3.12
manylinux wheels.

The set is the dependency closure of ``NEEDED`` (read from the metadata installed here, markers evaluated for the
target Python) minus the closure of ``THERE``: a package that torch, transformers or timm already require is on the
GPU machine with them. A hand-kept list missed ``lazy-importer``, a new requirement of ``importlib_metadata``, which
would have stopped the offline install there.
"""
from __future__ import annotations

import argparse
import importlib.metadata as md
from collections.abc import Callable, Iterable

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name as canonical  # PEP 503's normalised distribution name

NEEDED = ("diffusers", "omegaconf", "av", "open_clip_torch", "ftfy")
THERE = ("torch", "torchvision", "transformers", "timm", "accelerate", "peft", "safetensors", "tokenizers",
         "matplotlib", "tensorboard")


def target_environment(python: str = "3.12") -> dict[str, str]:
    """PEP 508 marker variables of CPython ``python`` on manylinux x86_64."""
    env = dict(default_environment())
    env.update(python_version=python, python_full_version=f"{python}.0", implementation_name="cpython",
               platform_python_implementation="CPython", sys_platform="linux", platform_system="Linux",
               platform_machine="x86_64", os_name="posix")
    return env


def closure(roots: Iterable[str], requires: Callable[[str], list[str] | None], env: dict[str, str]) -> set[str]:
    """The canonical names of ``roots`` and of everything they require, transitively: ``requires(name)`` gives a
    distribution's ``Requires-Dist`` strings (None if unknown); a requirement counts where its marker holds in
    ``env`` with no extra selected."""
    seen: set[str] = set()
    todo = [canonical(r) for r in roots]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for spec in requires(name) or ():
            req = Requirement(spec)
            if req.marker is None or req.marker.evaluate({**env, "extra": ""}):
                todo.append(canonical(req.name))
    return seen


def installed_requires(name: str) -> list[str] | None:
    try:
        return md.requires(name) or []
    except md.PackageNotFoundError:
        return None


def to_fetch(requires=installed_requires, env: dict[str, str] | None = None) -> list[str]:
    """The distributions to carry, sorted: the closure of NEEDED minus the closure of THERE."""
    env = env or target_environment()
    return sorted(closure(NEEDED, requires, env) - closure(THERE, requires, env))


def pinned(names: Iterable[str]) -> list[str]:
    """``name==version`` where ``name`` is installed here, else ``name``."""
    out = []
    for n in names:
        try:
            out.append(f"{n}=={md.version(n)}")
        except md.PackageNotFoundError:
            out.append(n)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_wheels", description=__doc__.split("\n\n")[0])
    p.add_argument("--python", default="3.12", help="the GPU machine's Python version, for markers (default 3.12)")
    args = p.parse_args(argv)
    print("\n".join(pinned(to_fetch(env=target_environment(args.python)))))
    return 0


if __name__ == "__main__":
    from viva_base.errors import exit_with

    exit_with(main)
