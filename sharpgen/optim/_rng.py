r"""Random-state replay for the second pass of a SAM step (``same_dropout=True``).

SAM's two passes see the same data; with dropout (or any other random layer) they also see
the same masks when the second pass runs with the random state the first pass started from.
`rng_snapshot` records that state (CPU and every CUDA device the parameters live on) before
the first pass and `replay_rng` runs a block with it, restoring afterwards the state the block
started from, so the global random stream continues as if only the first pass had run.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

__all__ = ["replay_rng", "rng_snapshot"]


def rng_snapshot(groups: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The CPU random state and that of each CUDA device holding a parameter of ``groups``."""
    cuda = sorted(
        {p.device.index or 0 for g in groups for p in g["params"] if p.device.type == "cuda"}
    )
    return {
        "cpu": torch.get_rng_state(),
        "cuda": {d: torch.cuda.get_rng_state(d) for d in cuda},
    }


@contextmanager
def replay_rng(snapshot: dict[str, Any]) -> Iterator[None]:
    """Run the block with the saved random state; afterwards the state is as before the block."""
    devices = list(snapshot["cuda"])
    with torch.random.fork_rng(devices=devices, device_type="cuda"):
        torch.set_rng_state(snapshot["cpu"])
        for d, state in snapshot["cuda"].items():
            torch.cuda.set_rng_state(state, d)
        yield
