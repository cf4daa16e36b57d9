"""Uniform initialization of the model builders, as ``nn.Linear`` draws it (private)."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _weight_bound(fan_in: int) -> float:
    """``nn.init.kaiming_uniform_(a=sqrt(5))``'s bound, computed the same way (= 1/sqrt(fan_in))."""
    gain = math.sqrt(2.0 / (1 + math.sqrt(5) ** 2))
    return math.sqrt(3.0) * (gain / math.sqrt(fan_in))


def _uniform(shape: tuple[int, ...], bound: float, generator, dtype, device) -> Tensor:
    draw_device = generator.device if generator is not None else torch.device("cpu")
    out = torch.empty(shape, dtype=dtype, device=draw_device)
    out.uniform_(-bound, bound, generator=generator)
    return out.to(device) if device is not None else out
