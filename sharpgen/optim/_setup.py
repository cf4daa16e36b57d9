r"""Construction of a SAM-family optimizer: options, param groups, parameter selection.

`SAMSetup` is the half of `SAMBase` that runs before the first step: the checks shared by
every variant (``norm``, ``normalize``, ``model``, ``same_dropout``, the base optimizer),
the param groups shared with the base optimizer (the variant's options are stored in them),
the parameter selection of ``perturb`` and a variant's private random generator. The step
itself is `SAMBase`'s (``_base.py``).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from sharpgen._validation import check_bool, check_generator, check_rho
from sharpgen.optim._groups import (
    PerturbSelector,
    check_base_kwargs,
    check_base_optimizer,
    check_perturb,
    check_same_groups,
    select_parameters,
)
from sharpgen.optim._state import _IDLE, SAMStepInfo
from sharpgen.sharpness._sam_kernel import check_norm

__all__ = ["SAMSetup"]

# the constructor arguments that are not options of the variant
_NOT_OPTIONS = ("self", "params", "base_optimizer")


class SAMSetup(Optimizer):
    """The construction half of `SAMBase` (not used directly).

    A variant's ``__init__`` calls `_init_common` (shared checks), sets its own attributes and
    calls `_build` with its per-group defaults; `_check_group` and `_after_groups_ready` are
    its hooks on the param groups. A variant with a private random generator calls
    `_own_generator` and names the state-dict key of the generator's state in
    ``_generator_key``.
    """

    _norm: str
    _normalize: bool
    _selected: set[int] | None
    _generator: torch.Generator
    _generator_key: str | None = None

    def _init_common(
        self,
        norm: str,
        normalize: bool,
        perturb: PerturbSelector,
        model: nn.Module | None,
        same_dropout: bool,
        base_optimizer: type[Optimizer] | Optimizer,
    ) -> None:
        self._norm = check_norm(norm)
        self._normalize = check_bool("normalize", normalize)
        self._same_dropout = check_bool("same_dropout", same_dropout)
        if not normalize and self._norm != "l2":
            raise ValueError(
                f"normalize=False (unnormalized SAM) is only defined for norm='l2', got "
                f"norm={norm!r}."
            )
        if model is not None and not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module or None, got {type(model).__name__}.")
        self._model = model
        self._perturb_spec = check_perturb(perturb, model)
        check_base_optimizer(base_optimizer, SAMSetup)
        self._interval = 1  # SAM every `_interval` steps (SAM's and LookSAM's option)
        self._phase = _IDLE
        self._saved: dict[Tensor, Tensor] = {}
        self._g0: dict[Tensor, Tensor] = {}
        self._acc: dict[Tensor, Tensor] = {}
        self._micro = 0
        self._any_perturbed = False
        self._nonfinite_reason: str | None = None
        self._pending: dict[str, Any] = {}
        self._last_info: SAMStepInfo | None = None
        self._base_ready = False

    def _own_generator(self, generator: torch.Generator | None) -> None:
        """Keep ``generator`` (checked), or a private CPU generator seeded with 0."""
        gen = check_generator(generator)
        self._generator = gen if gen is not None else torch.Generator().manual_seed(0)

    def _mark_rng(self) -> None:
        """Note the private generator's state at the start of a step (variants that have one)."""
        if self._generator_key is not None:
            self._rng_mark = self._generator.get_state()

    def _rewind_rng(self) -> None:
        """Back to the noted state: a skipped or aborted step leaves the generator as it was."""
        mark = getattr(self, "_rng_mark", None)
        if mark is not None:
            self._generator.set_state(mark)

    def _build(
        self,
        params: Iterable[Any],
        base_optimizer: type[Optimizer] | Optimizer,
        defaults: dict[str, Any],
        base_kwargs: dict[str, Any],
    ) -> None:
        self._sam_defaults = dict(defaults)
        if isinstance(base_optimizer, Optimizer):
            if base_kwargs:
                raise TypeError(
                    f"options {sorted(base_kwargs)} were given with a base optimizer instance; "
                    "pass them when building the instance, or pass its class instead."
                )
        else:
            owner = type(self).__name__
            check_base_kwargs(base_optimizer, base_kwargs, self._sam_option_names(), owner)
        super().__init__(params, dict(defaults))
        if isinstance(base_optimizer, Optimizer):
            check_same_groups(self.param_groups, base_optimizer.param_groups, type(self).__name__)
            for mine, theirs in zip(self.param_groups, base_optimizer.param_groups, strict=True):
                for key in defaults:
                    theirs[key] = mine[key]
                if "param_names" in mine and "param_names" not in theirs:
                    theirs["param_names"] = mine["param_names"]
            self.base_optimizer = base_optimizer
        else:
            self.base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state
        self.defaults = {**self.base_optimizer.defaults, **defaults}
        self._base_ready = True
        self._after_groups_ready()
        self._build_selection()

    def _sam_option_names(self) -> tuple[str, ...]:
        """The variant's own options (its constructor's arguments, named in an error)."""
        sig = inspect.signature(type(self).__init__)
        kinds = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
        return tuple(
            name
            for name, p in sig.parameters.items()
            if name not in _NOT_OPTIONS and p.kind not in kinds
        )

    def _after_groups_ready(self) -> None:
        """Hook for subclasses: the groups now carry the base optimizer's options."""

    def _check_group(self, group: dict[str, Any]) -> None:
        """Hook for subclasses: validate (and normalize) the variant's options of a group."""
        if "rho" in group:
            group["rho"] = check_rho(group["rho"])

    def _check_loaded_groups(self, state_dict: Any) -> None:
        """Validate the SAM options of a state dict's param groups on copies, before loading.

        The same rule as the constructor and `add_param_group` (`_check_group`), so a bad
        value (``rho=-1``) is refused while the optimizer is still as it was.
        """
        if not isinstance(state_dict, dict):
            raise TypeError(
                f"{type(self).__name__}.load_state_dict: state_dict must be a dict (from "
                f"state_dict()), got {type(state_dict).__name__}."
            )
        groups = state_dict.get("param_groups")
        if not isinstance(groups, list):
            return  # torch's own error for a malformed state dict (nothing loaded)
        for i, group in enumerate(groups):
            if not isinstance(group, dict):
                continue
            try:
                self._check_group({**self._sam_defaults, **group})
            except (TypeError, ValueError) as err:
                raise type(err)(
                    f"{type(self).__name__}.load_state_dict: param group {i} of the state dict: "
                    f"{err} Nothing was loaded; the optimizer's state is unchanged."
                ) from err

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group (to this optimizer and the base optimizer, which share them)."""
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}.")
        self._check_group(param_group)
        if not self._base_ready:
            super().add_param_group(param_group)
            return
        for key, value in self._sam_defaults.items():
            param_group.setdefault(key, value)
        self.base_optimizer.add_param_group(param_group)
        self._after_groups_ready()
        self._build_selection()

    def _build_selection(self) -> None:
        self._selected = select_parameters(self._perturb_spec, self._model, self.param_groups)

    def _is_selected(self, p: Tensor) -> bool:
        return self._selected is None or id(p) in self._selected
