"""Load a base optimizer's state dict only if it can belong to that optimizer (private).

`SAM` and `GSAM` save the state dict of their base optimizer (with the SAM options in its param
groups). A state saved with another base optimizer class (``SAM(..., Adam)`` loaded into
``SAM(..., SGD)``) used to be accepted and the next ``step()`` died with ``KeyError:
'momentum'``. `load_base_state` loads it, checks that every param group holds every option the
base optimizer uses (after torch's own defaults for options added in newer versions were
filled in, as torch's ``__setstate__`` does on load) and, if not, raises a `ValueError` before
anything is loaded that names the base optimizer class, the missing and the foreign options,
and the class the state most likely came from.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from typing import Any

import torch
from torch.optim import Optimizer

__all__ = ["load_base_state"]


def _option_names(cls: type) -> set[str]:
    try:
        sig = inspect.signature(cls)
    except (TypeError, ValueError):
        return set()
    skip = {"params"}
    kinds = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    return {n for n, p in sig.parameters.items() if n not in skip and p.kind not in kinds}


def _likely_sources(keys: set[str]) -> list[str]:
    """torch.optim classes whose options are exactly ``keys`` (where a state came from)."""
    out = []
    for name in dir(torch.optim):
        cls = getattr(torch.optim, name)
        if isinstance(cls, type) and issubclass(cls, Optimizer) and cls is not Optimizer:
            options = _option_names(cls)
            if options and options == keys:
                out.append(f"torch.optim.{name}")
    return out


def _group_keys(groups: Iterable[dict[str, Any]], ignore: set[str]) -> set[str]:
    keys: set[str] = set()
    for group in groups:
        keys.update(k for k in group if k not in ignore)
    return keys


def _with_torch_defaults(base: Optimizer, saved: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The saved groups after the base class's ``__setstate__`` filled in newer options."""
    groups = [dict(g) for g in saved]
    dummy = object.__new__(type(base))
    state = {"defaults": dict(base.defaults), "state": {}, "param_groups": groups}
    try:
        type(base).__setstate__(dummy, state)
    except Exception:  # a class whose __setstate__ needs more: check the groups as saved
        return groups
    return groups


def load_base_state(
    base: Optimizer, state_dict: Any, *, sam_options: Iterable[str], owner: str
) -> None:
    """``base.load_state_dict(state_dict)``, refusing a state of another optimizer class.

    Args:
        base: The base optimizer of a SAM-family optimizer.
        state_dict: The state dict to load.
        sam_options: Names of the SAM options in the param groups (filled in by the caller).
        owner: The SAM class name, for the message.

    Raises:
        ValueError: A param group of ``state_dict`` lacks options ``base`` uses; nothing is
            loaded.
    """
    ignore = {"params", *sam_options}
    needed = set(base.defaults) - ignore
    saved = state_dict.get("param_groups") if isinstance(state_dict, dict) else None
    if not isinstance(saved, list) or not all(isinstance(g, dict) for g in saved):
        base.load_state_dict(state_dict)  # torch's own error for a malformed state dict
        return
    filled = _with_torch_defaults(base, saved)
    missing = sorted({k for g in filled for k in needed if k not in g})
    if not missing:
        base.load_state_dict(state_dict)
        return
    saved_keys = _group_keys(saved, ignore)
    foreign = sorted(saved_keys - needed)
    cls = type(base).__name__
    sources = _likely_sources(saved_keys - {"initial_lr"})
    came_from = f" It looks like a state of {' or '.join(sources)}." if sources else ""
    raise ValueError(
        f"{owner}.load_state_dict: this state dict cannot belong to {owner}(..., {cls}): its "
        f"param groups lack the {cls} options {missing}"
        + (f" and carry options {cls} does not have {foreign}" if foreign else "")
        + f".{came_from} Load a state saved by {owner} with the same base optimizer class "
        f"({cls}), or build {owner} with the base optimizer the state was saved from. The "
        "optimizer's state is unchanged."
    )
