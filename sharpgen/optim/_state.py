"""The phases of a SAM-family step and the report of the last one (`SAMStepInfo`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["SAMStepInfo", "all_finite", "copy_back"]

_IDLE = "idle"  # no step in progress
_PERTURBED = "perturbed"  # weights are w + eps, waiting for the second pass
_RESTORED = "restored"  # weights restored, .grad holds the final gradient
_UNPERTURBED = "unperturbed"  # no perturbation (zero gradient / rho = 0): .grad is final
_NONFINITE = "nonfinite"  # non-finite gradient at w: the base step will be skipped
_ACCUMULATING = "accumulating"  # m-SAM micro-batches collected in a buffer


@dataclass(frozen=True)
class SAMStepInfo:
    r"""What the last SAM step did (`SAM.last_step_info`).

    Attributes:
        perturbed: The weights were perturbed for the second pass (in at least one micro-batch
            when accumulating).
        stepped: The base optimizer's step was taken (``False`` when a gradient was NaN/Inf).
        grad_norm: $\|T_w g\|_2$ at the unperturbed weights over the perturbed parameters
            (of the last micro-batch), divided by ``grad_scale``; ``None`` when no perturbed
            parameter had a gradient.
        reason: Why the perturbation or the step was skipped, else ``None``.
        micro_batches: Number of (first pass, second pass) pairs that went into the step.
    """

    perturbed: bool
    stepped: bool
    grad_norm: float | None
    reason: str | None
    micro_batches: int = 1


def copy_back(saved: dict[Tensor, Tensor]) -> None:
    """Copy each saved tensor back into its parameter (exactly, in place)."""
    if saved:
        params = list(saved)
        torch._foreach_copy_(params, [saved[p] for p in params])


def all_finite(tensors: list[Tensor]) -> bool:
    """Whether every tensor is finite (one host synchronization)."""
    if not tensors:
        return True
    norms = torch._foreach_norm(tensors)
    device = norms[0].device
    return bool(torch.isfinite(torch.stack([n.to(device) for n in norms])).all())
