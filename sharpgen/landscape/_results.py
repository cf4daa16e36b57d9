"""Frozen results of the landscape functions, with matplotlib plots."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = ["Landscape1D", "Landscape2D"]


def _axes(ax: Any, projection: str | None = None) -> Any:
    import matplotlib.pyplot as plt

    if ax is not None:
        return ax
    fig = plt.figure(figsize=(5.5, 4))
    return fig.add_subplot(111, projection=projection) if projection else fig.add_subplot(111)


@dataclass(frozen=True, repr=False, kw_only=True)
class _Landscape:
    """The fields and checks that 1-D and 2-D landscapes share (see their docs)."""

    loss: Tensor
    metric: Tensor | None
    center_loss: float
    direction: str
    normalization: str
    num_loss_evals: int

    def _values(self, metric: bool) -> Tensor:
        """The loss, or the metric when asked (a clear error if none was computed)."""
        if not metric:
            return self.loss
        if self.metric is None:
            raise ValueError("this landscape has no metric; pass metric=... when computing it.")
        return self.metric


@dataclass(frozen=True, repr=False, kw_only=True)
class Landscape1D(_Landscape):
    r"""Loss (and metric) along a line $\theta + t\,d$ (or an interpolation path).

    Attributes:
        coords: The grid $t$, shape ``(n,)`` float64 (for `linear_interpolation` the
            mixing weight $\alpha$, $\theta(\alpha) = (1-\alpha)\theta_A + \alpha\theta_B$).
        loss: Loss at each grid point, shape ``(n,)`` float64 on the CPU.
        metric: Metric at each grid point, or None.
        center_loss: Loss at $t = 0$ (at $\theta_A$ for an interpolation).
        direction: How the direction was made: ``"random"``, ``"hessian"``, ``"given"``
            or ``"interpolation"``.
        normalization: ``"filter"``, ``"layer"`` or ``"none"``.
        num_loss_evals: Parameter points evaluated (each a pass over the data).
        bn_stats: For interpolations, how BatchNorm statistics were handled (else None).
    """

    coords: Tensor
    bn_stats: str | None = None

    @property
    def argmin(self) -> float:
        """Grid coordinate of the smallest loss."""
        return float(self.coords[int(torch.argmin(self.loss))])

    def __repr__(self) -> str:
        return (
            f"Landscape1D(points={self.coords.numel()}, direction={self.direction!r}, "
            f"normalization={self.normalization!r}, min loss {float(self.loss.min()):.6g} at "
            f"{self.argmin:.3g}, center loss {self.center_loss:.6g})"
        )

    def plot(self, ax: Any = None, *, metric: bool = False, label: str | None = None) -> Any:
        """Line plot of the loss (or the metric) with the grid minimum marked.

        Args:
            ax: Matplotlib axes to draw into (default: a new figure).
            metric: Plot the metric instead of the loss.
            label: Legend label of the curve.

        Returns:
            The matplotlib Figure.
        """
        values = self._values(metric)
        ax = _axes(ax)
        x = self.coords.numpy()
        (line,) = ax.plot(x, values.numpy(), label=label)
        i = int(torch.argmin(self.loss))
        ax.plot([x[i]], [float(values[i])], "*", ms=10, color=line.get_color())
        ax.set_xlabel("alpha" if self.direction == "interpolation" else "t")
        ax.set_ylabel("metric" if metric else "loss")
        if label is not None:
            ax.legend()
        return ax.figure


@dataclass(frozen=True, repr=False, kw_only=True)
class Landscape2D(_Landscape):
    r"""Loss (and metric) on the plane $\theta + x\,d_1 + y\,d_2$.

    Attributes:
        x: First grid axis, shape ``(nx,)`` float64.
        y: Second grid axis, shape ``(ny,)`` float64.
        loss: Loss, shape ``(nx, ny)`` float64 on the CPU (``loss[i, j]`` at ``(x[i], y[j])``).
        metric: Metric of the same shape, or None.
        center_loss: Loss at $\theta$.
        direction: ``"random"``, ``"hessian"`` or ``"given"``.
        normalization: ``"filter"``, ``"layer"`` or ``"none"``.
        num_loss_evals: Parameter points evaluated.
        eigenvalues: The Hessian eigenvalues of the directions (``"hessian"``), else None.
    """

    x: Tensor
    y: Tensor
    eigenvalues: Tensor | None = None

    @property
    def argmin(self) -> tuple[float, float]:
        """Grid coordinates ``(x, y)`` of the smallest loss."""
        i, j = divmod(int(torch.argmin(self.loss)), self.loss.shape[1])
        return float(self.x[i]), float(self.y[j])

    def __repr__(self) -> str:
        xm, ym = self.argmin
        return (
            f"Landscape2D(grid={tuple(self.loss.shape)}, direction={self.direction!r}, "
            f"normalization={self.normalization!r}, min loss {float(self.loss.min()):.6g} at "
            f"({xm:.3g}, {ym:.3g}), center loss {self.center_loss:.6g})"
        )

    def plot(
        self,
        kind: str = "contour",
        ax: Any = None,
        *,
        metric: bool = False,
        levels: int = 30,
        log: bool = False,
    ) -> Any:
        r"""Contour (``kind="contour"``) or 3-D surface (``"surface"``) with the minimum marked.

        Args:
            kind: ``"contour"`` or ``"surface"``.
            ax: Axes to draw into (a 3-D axes for ``"surface"``); default a new figure.
            metric: Plot the metric instead of the loss.
            levels: Number of contour levels.
            log: Plot $\log_{10}$ of the values (losses spanning decades).

        Returns:
            The matplotlib Figure.
        """
        if kind not in ("contour", "surface"):
            raise ValueError(f"kind must be 'contour' or 'surface', got {kind!r}.")
        Z = self._values(metric).clone()
        if log:
            Z = Z.clamp_min(torch.finfo(torch.float64).tiny).log10()
        X, Y = torch.meshgrid(self.x, self.y, indexing="ij")
        xm, ym = self.argmin
        i, j = divmod(int(torch.argmin(self.loss)), self.loss.shape[1])
        name = ("log10 " if log else "") + ("metric" if metric else "loss")
        if kind == "contour":
            ax = _axes(ax)
            cs = ax.contourf(X.numpy(), Y.numpy(), Z.numpy(), levels=levels, cmap="viridis")
            ax.contour(X.numpy(), Y.numpy(), Z.numpy(), levels=levels, colors="k",
                       linewidths=0.3)  # fmt: skip
            ax.figure.colorbar(cs, ax=ax, label=name)
            ax.plot([xm], [ym], "r*", ms=12, label="grid minimum")
            ax.plot([0.0], [0.0], "w+", ms=10, label="theta")
            ax.legend(loc="upper right", fontsize="small")
        else:
            ax = _axes(ax, projection="3d")
            ax.plot_surface(X.numpy(), Y.numpy(), Z.numpy(), cmap="viridis", alpha=0.85,
                            linewidth=0)  # fmt: skip
            ax.scatter([xm], [ym], [float(Z[i, j])], color="r", marker="*", s=80)
            ax.set_zlabel(name)
        ax.set_xlabel("d1")
        ax.set_ylabel("d2")
        return ax.figure
