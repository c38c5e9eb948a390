"""Which plugins are installed, and how one is loaded: Python entry points
(:mod:`importlib.metadata`) in four groups.

==================  ==========================================================
``ccc.coders``      a coder backend, chosen by ``--coder NAME``
``ccc.forges``      a forge (clone, push, pull requests), ``--forge NAME``
``ccc.analysers``   an issue analyser, ``--analyser NAME``
``ccc.hooks``       events and policy points (:mod:`actors.plugins`), enabled
                    by ``CCC_PLUGINS`` / ``--plugin NAME``
==================  ==========================================================

An entry point names a factory, called with the plugin's options (a read-only mapping;
:func:`options_for`). Installed is not enabled: a coder, forge or analyser plugin is
used when its name is chosen (a built-in name wins), a hook plugin when configuration
names it. What a factory returns must satisfy the Protocol its consumers declare
(:func:`protocol_gaps`; the composition root passes the Protocol, this package does not
import the actors).
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Iterable, Mapping
from importlib import metadata
from types import MappingProxyType
from typing import Any

import msgspec

from events.errors import ConfigError

GROUPS = {"coder": "ccc.coders", "forge": "ccc.forges", "analyser": "ccc.analysers", "hook": "ccc.hooks"}
# the guard's options (infra.adapters.plugins.host), not the plugin's
RESERVED_OPTIONS = ("timeout", "event_timeout", "queue", "failures", "cooldown")


class Installed(msgspec.Struct, frozen=True, kw_only=True):
    """One entry point of a ``ccc.*`` group."""

    group: str
    name: str
    value: str  # "module:attribute"
    distribution: str = ""
    version: str = ""


def installed_of(ep: metadata.EntryPoint) -> Installed:
    dist = getattr(ep, "dist", None)
    return Installed(group=ep.group, name=ep.name, value=ep.value,
                     distribution=(dist.metadata["Name"] or "") if dist is not None else "",
                     version=(dist.version or "") if dist is not None else "")


def entry_points(group: str) -> list[metadata.EntryPoint]:
    """The group's entry points, one per name (the first installed wins, as import would)."""
    seen: dict[str, metadata.EntryPoint] = {}
    for ep in metadata.entry_points(group=group):
        seen.setdefault(ep.name, ep)
    return sorted(seen.values(), key=lambda ep: ep.name)


def installed(groups: Iterable[str] = GROUPS.values()) -> list[Installed]:
    """Every plugin installed in ``groups``, by group then name."""
    return [installed_of(ep) for group in groups for ep in entry_points(group)]


def find(group: str, name: str) -> metadata.EntryPoint | None:
    for ep in entry_points(group):
        if ep.name == name:
            return ep
    return None


def names(group: str) -> list[str]:
    return [ep.name for ep in entry_points(group)]


# -- options ---------------------------------------------------------------------------------
def env_name(plugin: str) -> str:
    """The plugin's part of ``CCC_PLUGIN_<NAME>_<KEY>``: upper case, anything but
    letters and digits as ``_`` (``example-notifier`` -> ``EXAMPLE_NOTIFIER``)."""
    return re.sub(r"[^A-Za-z0-9]", "_", plugin).upper()


def options_for(plugin: str, plugin_env: Iterable[tuple[str, str]],
                known: Iterable[str] = ()) -> dict[str, str]:
    """The options of ``plugin`` among the ``CCC_PLUGIN_*`` variables (settings'
    ``plugin_env``: ``(NAME_KEY, value)``), keys lower case. ``known``: the other plugin
    names, so that ``A_B_URL`` goes to plugin ``a-b``, not to ``a`` (the longest name
    that fits wins)."""
    mine = env_name(plugin) + "_"
    longer = [env_name(n) + "_" for n in known if len(env_name(n)) > len(env_name(plugin))]
    options: dict[str, str] = {}
    for suffix, value in plugin_env:
        if not suffix.startswith(mine) or any(suffix.startswith(other) for other in longer):
            continue
        key = suffix[len(mine):].lower()
        if key:
            options[key] = value
    return options


def plugin_options(options: Mapping[str, str]) -> Mapping[str, str]:
    """What the plugin's factory is given: its options without the guard's own keys."""
    return MappingProxyType({k: v for k, v in options.items() if k not in RESERVED_OPTIONS})


# -- loading ------------------------------------------------------------------------------------
def load(ep: metadata.EntryPoint) -> Any:
    """The factory the entry point names. Anything an import can raise becomes a
    :class:`ConfigError` naming the plugin."""
    try:
        return ep.load()
    except Exception as e:  # noqa: BLE001 - a plugin's import may raise anything
        raise ConfigError(f"cannot load {ep.value} (plugin {ep.name}, {ep.group}): "
                          f"{type(e).__name__}: {e}") from None


def protocol_members(proto: type) -> dict[str, Any]:
    """The members a ``typing.Protocol`` declares (methods and annotated attributes),
    with the attribute as the Protocol defines it (None for a bare annotation)."""
    members: dict[str, Any] = {}
    for base in reversed(proto.__mro__):
        if base is object or not getattr(base, "_is_protocol", False) or base.__module__ == "typing":
            continue
        for name in getattr(base, "__annotations__", {}):
            if not name.startswith("_"):
                members.setdefault(name, None)
        for name, value in vars(base).items():
            if not name.startswith("_"):
                members[name] = value
    return members


def protocol_gaps(obj: Any, proto: type) -> list[str]:
    """What ``obj`` lacks to satisfy ``proto``: missing members, a method that is not
    callable, a coroutine method that is a plain one (the actor would ``await`` it)."""
    gaps = []
    for name, declared in protocol_members(proto).items():
        if isinstance(declared, property) or declared is None:
            if not hasattr(obj, name):
                gaps.append(f"no attribute {name!r}")
            continue
        attr = getattr(obj, name, None)
        if attr is None:
            gaps.append(f"no method {name}()")
        elif not callable(attr):
            gaps.append(f"{name} is not callable")
        elif inspect.iscoroutinefunction(declared) and not inspect.iscoroutinefunction(attr):
            gaps.append(f"{name}() must be async")
    return gaps


def build(kind: str, name: str, proto: type, plugin_env: Iterable[tuple[str, str]] = ()) -> Any:
    """The ``kind`` (``coder``, ``forge``, ``analyser``) plugin ``name``, built with its
    options and checked against ``proto``; a :class:`ConfigError` saying what is wrong
    otherwise (not installed, not loadable, the factory raised, the object does not fit)."""
    group = GROUPS[kind]
    ep = find(group, name)
    if ep is None:
        raise ConfigError(f"no {kind} plugin {name!r} installed (entry point group {group}: "
                          f"{', '.join(names(group)) or 'none'})")
    factory = load(ep)
    options = options_for(name, plugin_env, [n for n in names(group) if n != name])
    try:
        obj = factory(plugin_options(options))
    except Exception as e:  # noqa: BLE001 - the plugin's own failure, named
        raise ConfigError(f"{kind} plugin {name}: its factory {ep.value} raised "
                          f"{type(e).__name__}: {e}") from None
    gaps = protocol_gaps(obj, proto)
    if gaps:
        raise ConfigError(f"{kind} plugin {name}: {type(obj).__name__} is not a {proto.__name__}: "
                          f"{'; '.join(gaps)}")
    return obj
