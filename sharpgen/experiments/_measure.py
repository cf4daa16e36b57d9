"""The flattest-minimizer side of Table 1: the paper's constructions, measured."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["ConstructionRow", "measure_constructions", "constructions_table"]


@dataclass(frozen=True)
class ConstructionRow:
    r"""One closed-form flattest interpolator of the paper, measured on one data set.

    Attributes:
        arch: Architecture.
        kind: ``"memorizer"``, ``"generalizer"`` or ``"near-flattest generalizer"`` (Sim-BN:
            the infimum of the trace is not attained; the construction approaches it as its
            first-layer scale grows).
        trace: Exact Hessian trace at interpolation, $\frac2n\sum_i\lVert\nabla f(x_i)
            \rVert^2$ (`sharpgen.theory.interpolation_trace`).
        lower_bound: `sharpgen.theory.trace_lower_bound` on the same training set.
        train_residual: $\max_i |f(x_i) - y_i|$ (0 up to rounding: it interpolates).
        test_error: Zero-one error on fresh test points (output 0 counts wrong).
    """

    arch: str
    kind: str
    trace: float
    lower_bound: float
    train_residual: float
    test_error: float

    @property
    def ratio(self) -> float:
        """``trace / lower_bound``."""
        return self.trace / self.lower_bound


def measure_constructions(
    d: int = 30, n: int = 100, *, seed: int = 0, test_size: int = 2000
) -> list[ConstructionRow]:
    """Build every construction on one xor training set and measure it (float64).

    Args:
        d: Input dimension.
        n: Training points (distinct, drawn with `sharpgen.data.xor_cube`).
        seed: Seed of the data generator.
        test_size: Fresh test points.

    Returns:
        One `ConstructionRow` per (architecture, construction).

    Examples:
        >>> rows = measure_constructions(d=8, n=20, test_size=200)
        >>> [(r.arch, r.kind, round(r.ratio, 6)) for r in rows][:2]
        [('no_bias', 'generalizer', 1.0), ('bias', 'memorizer', 1.0)]
    """
    from sharpgen.data import xor_cube
    from sharpgen.models import flattest_generalizer, flattest_memorizer
    from sharpgen.theory import interpolation_trace, trace_lower_bound, zero_one_error

    g = torch.Generator().manual_seed(seed)
    data = xor_cube(d, n, generator=g, unique=True, test_size=test_size, dtype=torch.float64)
    X, y, Xt, yt = data.X, data.y, data.X_test, data.y_test
    assert Xt is not None and yt is not None  # test_size >= 1 was asked for
    builds = [
        ("no_bias", "generalizer", lambda: flattest_generalizer(d, "no_bias", dtype=torch.float64)),
        ("bias", "memorizer", lambda: flattest_memorizer(X, y, "bias", dtype=torch.float64)),
        ("bias", "generalizer", lambda: flattest_generalizer(d, "bias", dtype=torch.float64)),
        (
            "simplified_bn",
            "near-flattest generalizer",
            lambda: flattest_generalizer(d, "simplified_bn", reference=X, dtype=torch.float64),
        ),
        (
            "simplified_ln",
            "memorizer",
            lambda: flattest_memorizer(X, y, "simplified_ln", dtype=torch.float64),
        ),
        (
            "simplified_ln",
            "generalizer",
            lambda: flattest_generalizer(d, "simplified_ln", dtype=torch.float64),
        ),
    ]
    rows = []
    for arch, kind, build in builds:
        net = build()
        with torch.no_grad():
            residual = float((net(X) - y).abs().max())
        rows.append(
            ConstructionRow(
                arch=arch,
                kind=kind,
                trace=float(interpolation_trace(net, X)),
                lower_bound=float(
                    trace_lower_bound(
                        X, y, arch, eps=_eps(net) if arch == "simplified_ln" else None
                    )
                ),
                train_residual=residual,
                test_error=float(zero_one_error(net, Xt, yt)),
            )
        )
    return rows


def constructions_table(rows: list[ConstructionRow]) -> str:
    """A Markdown table of `measure_constructions`' rows."""
    lines = [
        "| architecture | construction | trace at interpolation | lower bound | ratio | "
        "max train residual | test zero-one error |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.arch} | {r.kind} | {r.trace:.4f} | {r.lower_bound:.4f} | {r.ratio:.4f} | "
            f"{r.train_residual:.1e} | {r.test_error:.3f} |"
        )
    return "\n".join(lines)


def _eps(net: torch.nn.Module) -> float:
    """The normalization offset of a simplified-LN construction."""
    value: Any = net.eps
    return float(value)
