"""zoo's runtime patches of vLLM internals, each guarded before it applies.

A patch of an internal is a fork zoo maintains, so each one here says why it exists,
which vLLM versions it was tested on, what it relies on (attributes and parameters,
checked by name before anything changes) and what upstream change would retire it
(docs/ARCHITECTURE.md lists them). :func:`install` applies those whose checks pass;
one that fails its checks, or raises while applying, leaves vLLM's own behaviour and
logs one line saying which patch is off and why. It never raises: vLLM calls plugins'
``register()`` without a try/except, so an exception here would kill every vLLM process.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger("zoo.serve")

TESTED_VLLM = ("0.32.0",)
Check = Callable[[], str | None]  # None when satisfied, else why not


@dataclass(frozen=True)
class Patch:
    name: str
    why: str
    retire_when: str
    apply: Callable[[], None]
    checks: tuple[Check, ...] = ()
    cpu_only: bool = False
    versions: tuple[str, ...] = TESTED_VLLM


@dataclass
class Report:
    """What :func:`install` did, by patch name: ``applied`` or the reason it is off."""

    outcome: dict[str, str] = field(default_factory=dict)

    @property
    def applied(self) -> list[str]:
        return [name for name, why in self.outcome.items() if why == "applied"]


def install(patches: list[Patch], report: Report | None = None) -> Report:
    report = report or Report()
    for patch in patches:
        reason = _refusal(patch)
        if reason is None:
            try:
                patch.apply()
            except Exception as error:  # noqa: BLE001 - never let vLLM's process die here
                reason = f"applying it raised {type(error).__name__}: {error}"
        if reason is None:
            report.outcome[patch.name] = "applied"
        else:
            report.outcome[patch.name] = reason
            logger.warning("zoo: patch %s is off (%s); vLLM's own behaviour is used",
                           patch.name, reason)
    return report


def _refusal(patch: Patch) -> str | None:
    try:
        version = vllm_version()
        if version not in patch.versions:
            return f"vLLM {version} is not a version it was tested on " \
                   f"({', '.join(patch.versions)})"
        if patch.cpu_only and not on_cpu():
            return "it is for vLLM's CPU platform only"
        for check in patch.checks:
            reason = check()
            if reason is not None:
                return reason
    except Exception as error:  # noqa: BLE001 - a check that cannot run is a failed check
        return f"its checks raised {type(error).__name__}: {error}"
    return None


def vllm_version() -> str:
    import vllm

    return str(getattr(vllm, "__version__", "unknown"))


def on_cpu() -> bool:
    from vllm.platforms import current_platform

    return bool(current_platform.is_cpu())


# -- checks: each names what it relies on ----------------------------------------------

def _lookup(module: str, path: tuple[str, ...]) -> tuple[Any, str | None]:
    """``module.path...`` (imported lazily), or None and why it is not there."""
    import importlib

    try:
        obj = importlib.import_module(module)
    except ImportError as error:
        return None, f"{module} does not import ({error})"
    for i, name in enumerate(path):
        if not hasattr(obj, name):
            return None, f"{module}.{'.'.join(path[:i + 1])} is gone"
        obj = getattr(obj, name)
    return obj, None


def has(module: str, *path: str) -> Check:
    """``module.path...`` exists (an attribute path, imported lazily)."""
    return lambda: _lookup(module, path)[1]


def parameters(module: str, *path: str, names: tuple[str, ...], exact: bool = False) -> Check:
    """The callable ``module.path`` takes parameters ``names`` in that order (after
    ``self``); with ``exact``, no others."""
    def check() -> str | None:
        obj, missing = _lookup(module, path)
        if missing:
            return missing
        found = [p for p in inspect.signature(obj).parameters if p != "self"]
        where = f"{module}.{'.'.join(path)}"
        if found[:len(names)] != list(names):
            return f"{where} takes ({', '.join(found)}), not ({', '.join(names)}, ...)"
        if exact and len(found) != len(names):
            return f"{where} takes ({', '.join(found)}), more than ({', '.join(names)})"
        return None
    return check


def mentions(module: str, *path: str, snippets: tuple[str, ...], once: bool = False) -> Check:
    """The source of ``module.path`` holds every one of ``snippets`` (what a signature
    cannot show: the attributes an ``__init__`` sets, the branch a method takes); with
    ``once``, each exactly once (a patch that answers that one use)."""
    def check() -> str | None:
        obj, missing = _lookup(module, path)
        if missing:
            return missing
        source = inspect.getsource(obj)
        absent = [s for s in snippets if s not in source]
        if absent:
            return f"{module}.{'.'.join(path)} no longer has {', '.join(absent)}"
        repeated = [s for s in snippets if once and source.count(s) > 1]
        if repeated:
            return f"{module}.{'.'.join(path)} has {', '.join(repeated)} more than once"
        return None
    return check


def _statements(source: str) -> list[str]:
    """A function's statements as syntax trees (comments, docstring and layout aside)."""
    import ast
    import textwrap

    nodes = ast.parse(textwrap.dedent(source)).body
    if len(nodes) == 1 and isinstance(nodes[0], ast.FunctionDef):
        nodes = nodes[0].body
    if nodes and isinstance(nodes[0], ast.Expr) and isinstance(nodes[0].value, ast.Constant):
        nodes = nodes[1:]  # the docstring
    return [ast.dump(node) for node in nodes]


def body_is(module: str, *path: str, body: str) -> Check:
    """The function ``module.path`` does exactly ``body`` (its statements, compared as
    syntax trees: comments, docstrings and layout aside). For a patch that does a
    function's work itself, and must not when upstream adds to it."""
    def check() -> str | None:
        obj, missing = _lookup(module, path)
        if missing:
            return missing
        if _statements(inspect.getsource(obj)) != _statements(body):
            return f"{module}.{'.'.join(path)} does more or other than: {' '.join(body.split())}"
        return None
    return check


def fingerprint(module: str, *path: str, digest: str) -> Check:
    """The function ``module.path`` is the one zoo's patch was written against: its
    statements (as :func:`body_is` compares them) hash to ``digest`` (:func:`digest_of`).
    For a body too long to restate in a check."""
    def check() -> str | None:
        obj, missing = _lookup(module, path)
        if missing:
            return missing
        if digest_of(obj) != digest:
            return f"{module}.{'.'.join(path)} changed since zoo's patch was written " \
                   f"(digest {digest_of(obj)}, not {digest})"
        return None
    return check


def digest_of(function) -> str:
    """16 hex digits of a hash of the function's statements as ``ast.dump`` writes them:
    the same source can dump otherwise on another Python minor version (zoo's is pinned
    with its venv), which turns the patch off, as any change would, and fails
    tests/test_vllm_contract.py loudly."""
    import hashlib

    text = "\n".join(_statements(inspect.getsource(function)))
    return hashlib.sha256(text.encode()).hexdigest()[:16]
