r"""Parameter groups of the SAM family: the base optimizer, its options, the perturbed subset.

Construction-time rules shared by every SAM-family optimizer (no maths here): the base
optimizer must be a `torch.optim.Optimizer` class or an instance built on the same groups,
its options must be known to it, and ``perturb`` selects the perturbed parameters by name
predicate or by module type.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

from torch import Tensor, nn
from torch.optim import Optimizer

__all__ = [
    "PerturbSelector",
    "check_base_kwargs",
    "check_base_optimizer",
    "check_perturb",
    "check_same_groups",
    "select_parameters",
]

PerturbSelector = Callable[[str | None, Tensor], bool] | type | tuple[type, ...] | None


def check_base_optimizer(base_optimizer: object, sam_class: type) -> None:
    """Refuse anything but a `torch.optim.Optimizer` subclass or instance (and SAM itself)."""
    if isinstance(base_optimizer, type):
        if not issubclass(base_optimizer, Optimizer):
            raise TypeError(
                f"base_optimizer must be a torch.optim.Optimizer subclass or instance, got "
                f"the class {base_optimizer.__name__}."
            )
        if issubclass(base_optimizer, sam_class):
            raise TypeError(
                f"base_optimizer cannot itself be a SAM-family optimizer, got the class "
                f"{base_optimizer.__name__}; pass a torch.optim optimizer (e.g. torch.optim.SGD)."
            )
    elif not isinstance(base_optimizer, Optimizer):
        raise TypeError(
            "base_optimizer must be a torch.optim.Optimizer subclass (e.g. torch.optim.SGD) "
            f"or an instance, got {type(base_optimizer).__name__}."
        )
    elif isinstance(base_optimizer, sam_class):
        raise TypeError(
            f"base_optimizer cannot itself be a SAM-family optimizer, got a "
            f"{type(base_optimizer).__name__}; pass a torch.optim optimizer (e.g. torch.optim.SGD)."
        )


def check_perturb(
    perturb: PerturbSelector, model: nn.Module | None
) -> Callable[[str | None, Tensor], bool] | tuple[type, ...] | None:
    """Normalize ``perturb`` to ``None``, a predicate or a tuple of module types."""
    if perturb is None:
        return None
    if isinstance(perturb, type):
        perturb = (perturb,)
    if isinstance(perturb, tuple):
        if not perturb or not all(
            isinstance(t, type) and issubclass(t, nn.Module) for t in perturb
        ):
            raise TypeError(
                f"perturb as module types must be nn.Module subclasses, got {perturb!r}."
            )
        if model is None:
            raise ValueError(
                f"perturb={perturb!r} selects parameters by module type, which needs the "
                "model: pass model=model."
            )
        return perturb
    if callable(perturb):
        return perturb
    raise TypeError(
        "perturb must be None, a predicate (name, param) -> bool, or nn.Module types, got "
        f"{type(perturb).__name__}."
    )


def select_parameters(
    spec: Callable[[str | None, Tensor], bool] | tuple[type, ...] | None,
    model: nn.Module | None,
    groups: Sequence[dict[str, Any]],
) -> set[int] | None:
    """The ids of the perturbed parameters (``None``: all of them)."""
    if spec is None:
        return None
    selected: set[int] = set()
    if isinstance(spec, tuple):  # module types
        assert model is not None
        for module in model.modules():
            if isinstance(module, spec):
                selected.update(id(p) for p in module.parameters(recurse=False))
    else:
        model_names = {id(p): n for n, p in model.named_parameters()} if model else {}
        for group in groups:
            names = group.get("param_names")
            for i, p in enumerate(group["params"]):
                name = names[i] if names is not None else model_names.get(id(p))
                if spec(name, p):
                    selected.add(id(p))
    optimized = {id(p) for group in groups for p in group["params"]}
    if not selected & optimized:
        raise ValueError(
            f"perturb={spec!r} selected none of the optimized parameters; check the "
            "predicate / module types (names are None unless named parameters or model= "
            "are given)."
        )
    return selected


def check_base_kwargs(
    cls: type[Optimizer], kwargs: dict[str, Any], sam_names: Sequence[str], owner: str = "SAM"
) -> None:
    """Refuse options that neither the SAM variant ``owner`` nor the base optimizer accepts."""
    try:
        sig = inspect.signature(cls.__init__)
    except (TypeError, ValueError):  # builtins without a signature: let the class decide
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values()):
        return
    accepted = [n for n in sig.parameters if n not in ("self", "params")]
    unknown = sorted(k for k in kwargs if k not in accepted)
    if unknown:
        raise TypeError(
            f"unknown option(s) {unknown}: not an option of {owner} ({', '.join(sam_names)}) "
            f"nor of {cls.__name__} ({', '.join(accepted)})."
        )


def check_same_groups(
    mine: Sequence[dict[str, Any]], theirs: Sequence[dict[str, Any]], owner: str = "SAM"
) -> None:
    """A base optimizer instance must hold the same parameters in the same groups as ``owner``."""

    def describe(groups: Sequence[dict[str, Any]]) -> list[int]:
        return [len(g["params"]) for g in groups]

    same = len(mine) == len(theirs) and all(
        len(a["params"]) == len(b["params"])
        and all(x is y for x, y in zip(a["params"], b["params"], strict=True))
        for a, b in zip(mine, theirs, strict=True)
    )
    if not same:
        raise ValueError(
            "the base optimizer instance was built on different parameters or param groups "
            f"(group sizes {describe(theirs)}) than those given to {owner} (group sizes "
            f"{describe(mine)}); build both from the same params, or pass the class "
            f"(e.g. {owner}(params, torch.optim.SGD, lr=0.1))."
        )
