"""Drawing of `SharpnessTracker` histories (matplotlib, imported only when drawing)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

__all__ = ["plot_history"]


def plot_history(
    tracker: Any,
    keys: str | Sequence[str] | None = None,
    *,
    axes: Any = None,
    label: str | None = None,
    **plot_kwargs: Any,
) -> Any:
    """Draw ``tracker``'s history, one panel per key (see `SharpnessTracker.plot`)."""
    try:
        import matplotlib.pyplot as plt
    except ImportError as exc:  # matplotlib is an optional dependency
        raise ImportError(
            "SharpnessTracker.plot needs matplotlib; install it with `pip install matplotlib`."
        ) from exc
    if not tracker.history:
        raise ValueError("nothing to plot yet: the history is empty (call step() first).")
    if keys is None:
        keys = list(tracker.measures)
    keys = [keys] if isinstance(keys, str) else list(keys)
    columns = tracker.to_dict()
    for key in keys:
        if key not in columns:
            raise ValueError(f"unknown key {key!r}; recorded keys are {list(columns)}.")
    if axes is None:
        fig, grid = plt.subplots(
            len(keys), 1, figsize=(5, 2.2 * len(keys)), sharex=True, squeeze=False
        )
        axes = list(grid[:, 0])
    else:
        axes = _as_axes_list(axes)
        if len(axes) != len(keys):
            raise ValueError(
                f"axes has {len(axes)} entries for {len(keys)} keys {keys}; pass one Axes "
                "per key (e.g. fig.axes of an earlier plot with the same keys)."
            )
        fig = axes[0].figure
    plot_kwargs = {"marker": ".", **plot_kwargs}
    steps = columns["step"]
    for ax, key in zip(axes, keys, strict=True):
        rows = [(s, float(v)) for s, v in zip(steps, columns[key], strict=True) if v is not None]
        (line,) = ax.plot([s for s, _ in rows], [v for _, v in rows], label=label, **plot_kwargs)
        stderr = columns.get(f"{key}_stderr")
        if stderr is not None:
            _stderr_band(ax, steps, columns[key], stderr, line.get_color())
        ax.set_ylabel(key)
        if tracker.lr is not None and tracker.measures.get(key) == "top_eigenvalue":
            ax.axhline(2 / tracker.lr, color="k", ls="--", lw=1, label=f"2/lr = {2 / tracker.lr:g}")
            ax.legend()
        if label is not None:
            ax.legend()
    axes[-1].set_xlabel("step")
    return fig


def _as_axes_list(axes: Any) -> list[Any]:
    """One ``Axes``, a sequence of them or a numpy array of them -> a flat list."""
    if hasattr(axes, "plot"):
        return [axes]
    if hasattr(axes, "ravel"):  # the array plt.subplots returns
        return list(axes.ravel())
    return list(axes)


def _stderr_band(
    ax: Any, steps: list[Any], values: list[Any], stderr: list[Any], color: Any
) -> None:
    """Fill ``value +- 2 stderr`` over the points where both are recorded and finite."""
    rows = [
        (s, float(v), 2.0 * float(e))
        for s, v, e in zip(steps, values, stderr, strict=True)
        if v is not None and e is not None and math.isfinite(float(e))
    ]
    if not rows:
        return
    ax.fill_between(
        [s for s, _, _ in rows],
        [v - w for _, v, w in rows],
        [v + w for _, v, w in rows],
        color=color,
        alpha=0.2,
        linewidth=0,
    )
