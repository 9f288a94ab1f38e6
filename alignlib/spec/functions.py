"""Reward functions named in a spec (`module:function`): checked and imported without evaluating anything."""

from __future__ import annotations

import importlib
import inspect
import re
from collections.abc import Callable
from typing import Any

_MODULE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")
_PUBLIC_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*")


def resolve_function(ref: str) -> Callable[..., Any]:
    """`module:function` -> the callable; ValueError with the reason if it cannot be had.

    Only a public function of a module importable by its dotted name is accepted: never a file path
    (which would run whatever file a spec points at), a private name, a class or another non-function.
    Nothing here evaluates the string; it is split, checked and looked up with getattr.
    """
    module_name, sep, attr = ref.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"expected `module:function` (e.g. alignlib.rewards:exact_match), got {ref!r}")
    if "/" in module_name or "\\" in module_name or module_name.endswith(".py"):
        raise ValueError(f"{module_name!r} is a file path; name an importable module (dotted, on the Python path)")
    if not _MODULE.fullmatch(module_name):
        raise ValueError(f"{module_name!r} is not a module name (dotted Python identifiers)")
    if not _PUBLIC_NAME.fullmatch(attr):
        raise ValueError(f"{attr!r} is not a public function name (private `_` names and attribute paths are refused)")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"cannot import module {module_name!r}: {err}") from err
    fn = getattr(module, attr, None)
    if fn is None:
        raise ValueError(f"module {module_name!r} has no callable {attr!r}")
    if isinstance(fn, type) or not callable(fn):
        raise ValueError(f"{module_name}:{attr} is a {type(fn).__name__}, not a function")
    return fn


def resolve_reward(ref: str) -> Callable[..., Any]:
    """`module:function` of a function reward -> the callable, once its signature takes what it is given.

    A reward is called as fn(prompt=, completion=, gold=). The gold answer used to be passed as
    `reference=`; a function still written that way is refused here, when the spec is validated, instead
    of failing on its first row after generation.
    """
    fn = resolve_function(ref)
    try:
        parameters = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # no inspectable signature (some builtins): nothing to check
        return fn
    if "reference" in parameters and "gold" not in parameters:
        raise ValueError(
            f"reward function {ref} has a parameter `reference`; the gold answer is now passed as `gold` "
            "(fn(prompt=, completion=, gold=)): rename the parameter to `gold`"
        )
    if hasattr(fn, "needs_reference") and not hasattr(fn, "needs_gold"):
        raise ValueError(f"reward function {ref} sets `needs_reference`, which is now called `needs_gold`; rename it")
    return fn
