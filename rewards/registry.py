"""The reward registry: built-ins by name, third-party rewards by entry point, and the weighted sum.

* :func:`register_reward` registers a built-in (or an in-process) reward class or factory.
* Installed packages add rewards through the entry-point group ``editgrpo.rewards``
  (``name = "package.module:ClassOrFactory"``); see docs/rewards.md for a complete plugin.
* The recipe's ``rewards:`` section, ``{name: {weight: w, ...kwargs}}``, becomes a
  :class:`CombinedReward` that returns the weighted total (paper eq. 7:
  ``R = w_IF R_IF + w_SP R_SP + w_PS R_PS``) and every component.
* An entry with ``server: http://host:port`` is computed by a reward server (``python -m rewards.serve``,
  :class:`rewards.remote.RemoteReward`); local and remote components mix freely.
"""
from __future__ import annotations

import difflib
import importlib
import importlib.metadata
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .base import Reward, RewardOutput

logger = logging.getLogger(__name__)

__all__ = [
    "ENTRY_POINT_GROUP",
    "CombinedOutput",
    "CombinedReward",
    "UnknownRewardError",
    "available_rewards",
    "build_reward",
    "check_rewards_config",
    "register_reward",
    "weighted_total",
]

ENTRY_POINT_GROUP = "editgrpo.rewards"

_REGISTRY: dict[str, Callable[..., Reward]] = {}


class UnknownRewardError(KeyError):
    """A reward name that is neither built in, registered nor installed; the message lists the available ones."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""

# Modules of the ``rewards`` package that define no reward (imported anyway by what needs them).
_NOT_REWARD_MODULES = {"registry", "base", "tiny", "transport", "remote", "serve"}


def register_reward(name: str) -> Callable[[Callable[..., Reward]], Callable[..., Reward]]:
    """Decorator registering a :class:`Reward` subclass (or a factory returning one) under ``name``."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"a reward name must be a non-empty string, got {name!r}")

    def decorator(obj: Callable[..., Reward]) -> Callable[..., Reward]:
        existing = _REGISTRY.get(name)
        if existing is not None and existing is not obj and _qualname(existing) != _qualname(obj):
            raise ValueError(f"reward {name!r} is already registered by {_qualname(existing)}; pick another name")
        _REGISTRY[name] = obj
        if isinstance(obj, type) and issubclass(obj, Reward) and "name" not in obj.__dict__:
            obj.name = name
        return obj

    return decorator


def _qualname(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"


def _builtin_modules() -> list[str]:
    """Every module of the ``rewards`` package (so a module added there with ``@register_reward`` is found without
    being listed anywhere), in name order."""
    import pkgutil

    import rewards

    return sorted(f"rewards.{m.name}" for m in pkgutil.iter_modules(rewards.__path__)
                  if not m.name.startswith("_") and m.name not in _NOT_REWARD_MODULES)


def _load_builtins() -> None:
    for module in _builtin_modules():
        importlib.import_module(module)


def _entry_points() -> dict[str, list[importlib.metadata.EntryPoint]]:
    importlib.invalidate_caches()  # see packages installed after this process started
    found: dict[str, list[importlib.metadata.EntryPoint]] = {}
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if ep.value not in [e.value for e in found.get(ep.name, [])]:
            found.setdefault(ep.name, []).append(ep)
    return found


def available_rewards() -> list[str]:
    """Names of the built-in, registered and installed (entry point ``editgrpo.rewards``) rewards, sorted."""
    _load_builtins()
    return sorted(set(_REGISTRY) | set(_entry_points()))


def _resolve(name: str) -> Callable[..., Reward]:
    _load_builtins()
    if name in _REGISTRY:
        return _REGISTRY[name]
    eps = _entry_points().get(name)
    if not eps:
        names = available_rewards()
        close = difflib.get_close_matches(name, names, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UnknownRewardError(f"unknown reward {name!r}{hint}; available: {', '.join(names)}. Third-party rewards "
                       f"register under the entry-point group {ENTRY_POINT_GROUP!r}")
    if len(eps) > 1:
        raise KeyError(f"reward {name!r} is provided by several installed entry points "
                       f"({', '.join(e.value for e in eps)}); uninstall one")
    try:
        obj = eps[0].load()
    except Exception as e:  # an installed plugin that cannot be imported
        raise ImportError(f"cannot load reward plugin {name!r} ({eps[0].value}): {e}") from e
    if not callable(obj):
        raise TypeError(f"reward plugin {name!r} ({eps[0].value}) must be a Reward subclass or a factory "
                        f"callable, got {type(obj).__name__}")
    return obj


def build_reward(name: str, **kwargs: Any) -> Reward:
    """Instantiate the reward registered (or installed) as ``name`` with ``kwargs``."""
    factory = _resolve(name)
    try:
        reward = factory(**kwargs)
    except TypeError as e:
        raise TypeError(f"reward {name!r}: {e}") from e
    if not isinstance(reward, Reward):
        raise TypeError(f"reward {name!r} ({_qualname(factory)}) returned {type(reward).__name__}, not a "
                        f"rewards.Reward; subclass rewards.base.Reward")
    if type(reward).name == Reward.name and "name" not in reward.__dict__:
        reward.name = name
    return reward


def _entries(cfg: Any) -> list[tuple[str, str, float, dict[str, Any]]]:
    """``(component, registered name, weight, kwargs)`` of a ``rewards:`` mapping, with its shape and weights checked."""
    cfg = _to_plain(cfg)
    if not isinstance(cfg, Mapping) or not cfg:
        raise ValueError(f"rewards config must be a non-empty mapping {{name: {{weight: w, ...}}}}, got {cfg!r}")
    out = []
    for name, entry in cfg.items():
        if entry is None:
            entry = {}
        elif isinstance(entry, (int, float)) and not isinstance(entry, bool):
            entry = {"weight": entry}
        if not isinstance(entry, Mapping):
            raise ValueError(f"rewards.{name} must be a mapping {{weight: w, ...kwargs}}, got {entry!r}")
        kwargs = dict(entry)
        weight = kwargs.pop("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise ValueError(f"rewards.{name}.weight must be a finite number, got {weight!r}")
        out.append((str(name), str(kwargs.pop("type", name)), float(weight), kwargs))
    return out


def check_rewards_config(cfg: Mapping[str, Any]) -> None:
    """Check a ``rewards:`` mapping without building anything (no model is loaded): every name (or ``type``) is
    a known reward, every weight a finite number, and the keyword arguments fit the reward's signature (when it
    names them). Raises :class:`UnknownRewardError`, ``ValueError`` or ``TypeError`` with one-line messages."""
    import inspect

    entries = _entries(cfg)
    for name, kind, _, kwargs in entries:
        if "server" in kwargs:  # computed by a reward server: the client's options are checked when built
            from .remote import RemoteReward

            try:
                RemoteReward(name, **kwargs)
            except (TypeError, ValueError) as e:
                raise type(e)(f"rewards.{name}: {e}") from None
            continue
        factory = _resolve(kind)
        try:
            sig = inspect.signature(factory)
        except (TypeError, ValueError):  # a builtin or C callable: nothing to check
            continue
        if any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
            continue
        try:
            sig.bind(**kwargs)
        except TypeError as e:
            raise TypeError(f"rewards.{name}: {e}; {kind} takes {', '.join(sig.parameters) or 'no arguments'}") from None
        choices = getattr(factory, "TEXTS", None)  # the CLIP rewards' ``text`` option (rewards.clip)
        if choices is not None and "text" in kwargs and kwargs["text"] not in choices:
            raise ValueError(f"rewards.{name}: text={kwargs['text']!r}; " +
                             (f"{kind} takes text one of {', '.join(choices)}" if choices else f"{kind} has no text option"))
        if getattr(factory, "checked_by_building", False):  # its values too: building it loads nothing
            try:
                factory(**kwargs)
            except (TypeError, ValueError) as e:
                raise ValueError(f"rewards.{name}: {str(e).splitlines()[0]}") from None


# ------------------------------------------------------------------------------------------------
# Weighted combination (eq. 7)
# ------------------------------------------------------------------------------------------------
def weighted_total(components: Mapping[str, torch.Tensor], weights: Mapping[str, float]) -> torch.Tensor:
    """Eq. 7: ``R = sum_k w_k R_k`` over the components with ``w_k != 0``.

    A NaN in any weighted component makes that sample's total NaN; components with weight 0 are
    only logged and never affect the total.
    """
    total = None
    for name, scores in components.items():
        w = float(weights[name])
        if w == 0.0:
            continue
        term = w * scores.to(torch.float32)
        total = term if total is None else total + term
    if total is None:
        batch = next(iter(components.values())).shape[0] if components else 0
        total = torch.zeros(batch, dtype=torch.float32)
    return total


@dataclass
class CombinedOutput:
    """``total`` [B] (the weighted sum), ``components`` {name: [B]} (unweighted), ``details``
    {name: per-sample dicts or None}, ``weights`` {name: w}."""

    total: torch.Tensor
    components: dict[str, torch.Tensor]
    details: dict[str, list[dict] | None] = field(default_factory=dict)
    weights: dict[str, float] = field(default_factory=dict)


def _to_plain(cfg: Any) -> Any:
    try:
        from omegaconf import OmegaConf
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        return cfg
    if OmegaConf.is_config(cfg):
        return OmegaConf.to_container(cfg, resolve=True)
    return cfg


class CombinedReward:
    """Several rewards with weights; called like a :class:`Reward`, returns a :class:`CombinedOutput`.

    Build it from the recipe's ``rewards:`` mapping with :meth:`from_config`.
    """

    def __init__(self, rewards: Mapping[str, Reward], weights: Mapping[str, float]):
        if not rewards:
            raise ValueError("a combined reward needs at least one reward")
        if set(rewards) != set(weights):
            raise ValueError(f"rewards and weights name different components: {sorted(rewards)} vs {sorted(weights)}")
        self.rewards = dict(rewards)
        self.weights = {k: float(weights[k]) for k in self.rewards}

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "CombinedReward":
        """Build from ``{name: {weight: w, ...kwargs}}`` (a dict or an OmegaConf DictConfig).

        ``weight`` defaults to 1.0; a bare number is shorthand for ``{weight: number}``; ``type``
        picks the registered reward when the component name differs from it (e.g. two judges).
        """
        rewards: dict[str, Reward] = {}
        weights: dict[str, float] = {}
        for name, kind, weight, kwargs in _entries(cfg):
            try:
                if "server" in kwargs:
                    from .remote import RemoteReward

                    rewards[name] = RemoteReward(name, **kwargs)
                    weights[name] = weight
                    continue
                rewards[name] = build_reward(kind, **kwargs)
            except (TypeError, ValueError, OSError) as e:
                raise type(e)(f"rewards.{name}: {e}") from e
            weights[name] = weight
        return cls(rewards, weights)

    def __call__(
        self,
        edited: torch.Tensor,
        source: torch.Tensor,
        *,
        source_captions: Sequence[str],
        target_captions: Sequence[str],
        instructions: Sequence[str],
        references: Sequence[torch.Tensor | None] | None = None,
        groups: Sequence[int] | None = None,
    ) -> CombinedOutput:
        """Score every component; ``groups`` (one id per sample: the prompt's group) is passed to every reward
        (group-wise rewards score each group together; the others ignore it)."""
        components: dict[str, torch.Tensor] = {}
        details: dict[str, list[dict] | None] = {}
        extra = {"groups": groups} if groups is not None else {}
        for name, reward in self.rewards.items():
            out: RewardOutput = reward(edited, source, source_captions=source_captions,
                                       target_captions=target_captions, instructions=instructions,
                                       references=references, **extra)
            components[name] = out.scores
            details[name] = out.details
            failed = int(torch.isnan(out.scores).sum())
            if failed:
                logger.warning("reward %s: %d of %d samples could not be scored (NaN)", name, failed,
                               out.scores.numel())
        return CombinedOutput(weighted_total(components, self.weights), components, details, dict(self.weights))

    @staticmethod
    def concat(parts: Sequence[CombinedOutput]) -> CombinedOutput:
        """The outputs of consecutive slices of a batch as one output (components, totals and details in order)."""
        if not parts:
            raise ValueError("nothing to concatenate")
        names = list(parts[0].components)
        details: dict[str, list[dict] | None] = {}
        for k in names:
            got = [p.details.get(k) for p in parts]
            details[k] = None if all(d is None for d in got) else [
                x for p, d in zip(parts, got) for x in (d if d is not None else [{}] * p.total.shape[0])]
        return CombinedOutput(torch.cat([p.total for p in parts]),
                              {k: torch.cat([p.components[k] for p in parts]) for k in names}, details,
                              dict(parts[0].weights))

    def load(self, device="cpu") -> None:
        """Load every component's model now (:meth:`Reward.load`); a model that cannot be loaded (not downloaded,
        offline, a wrong path) is one :class:`~viva_base.errors.UserError` naming the component."""
        from viva_base.errors import UserError

        for name, reward in self.rewards.items():
            try:
                reward.load(device)
            except OSError as exc:
                raise UserError(f"rewards.{name}: {str(exc).splitlines()[0]}") from None

    def __repr__(self) -> str:
        parts = ", ".join(f"{k}: {self.weights[k]:g} x {v!r}" for k, v in self.rewards.items())
        return f"CombinedReward({parts})"
