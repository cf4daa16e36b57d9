"""Random probe blocks, drawn only from an explicit generator."""

from __future__ import annotations

import torch
from torch import Tensor

from sharpgen.linalg._reduce import norm

DISTRIBUTIONS = ("rademacher", "gaussian")


def draw_probes(
    n: int,
    k: int,
    *,
    distribution: str,
    generator: torch.Generator | None,
    dtype: torch.dtype,
    device: torch.device,
) -> Tensor:
    """Return an ``(n, k)`` block of Rademacher (±1) or standard Gaussian probes.

    With a generator the numbers are drawn on the generator's device (so a CPU generator
    gives the same numbers whatever the operator's device) and moved to ``device``; the
    global RNG is not touched. Without one, the global RNG of ``device`` is used. On a CPU
    the Rademacher signs are drawn straight into the block (the same numbers as
    ``torch.randint(0, 2, (n, k))``, without its int64 copy).
    """
    draw_device = generator.device if generator is not None else device
    if distribution == "rademacher" and draw_device.type == "cpu":
        # the numbers of ``torch.randint(0, 2, (n, k))``, drawn straight into the block:
        # no int64 copy (two parameter-sized vectors per probe in float32)
        out = torch.empty((n, k), dtype=dtype, device=draw_device)
        out.random_(0, 2, generator=generator).mul_(2).sub_(1)
    elif distribution == "rademacher":
        bits = torch.randint(0, 2, (n, k), generator=generator, device=draw_device)
        out = bits.to(dtype).mul_(2).sub_(1)
    elif distribution == "gaussian":
        out = torch.randn(n, k, generator=generator, device=draw_device, dtype=dtype)
    else:  # validated by the callers
        raise ValueError(f"unknown distribution {distribution!r}.")
    return out.to(device)


def random_unit_vector(
    n: int, *, generator: torch.Generator | None, dtype: torch.dtype, device: torch.device
) -> Tensor:
    """A Gaussian vector of unit norm."""
    v = draw_probes(n, 1, distribution="gaussian", generator=generator, dtype=dtype, device=device)
    v = v.squeeze(1)
    return v.div_(norm(v).to(v.dtype))  # in place: one vector, not two; accurate norm
