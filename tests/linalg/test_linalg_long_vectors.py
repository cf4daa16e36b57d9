"""Estimators on float32 vectors of 2e6..1e7 numbers: every number as float64 gives it.

On a CPU torch's float32 ``dot``, ``vector_norm``, ``X.T @ Y`` and QR over so many numbers
are 5e-5..7e-3 off (see `sharpgen.linalg._reduce`), and so was every estimator that used them.
The operators here have closed-form answers (a diagonal of positive entries: a Rademacher
probe's quadratic form is the sum of the diagonal, a sum of terms of one sign, where the
defect is largest), or the estimator's formula is evaluated in float64 on the same float32
numbers. Relative errors must stay below 1e-5; each test takes about a second and under 1 GB.
"""

import torch

from sharpgen.linalg import (
    LinearOperator,
    hutchinson_trace,
    power_iteration,
    stochastic_lanczos_quadrature,
)
from sharpgen.linalg._hutchpp import deflated_samples
from sharpgen.linalg._sketch import extend_basis
from sharpgen.linalg._xtrace import sketch_coordinates

TOL = 1e-5


class Diagonal(LinearOperator):
    """``diag(d)`` in float32."""

    def __init__(self, d):
        super().__init__(d.numel(), d.dtype, d.device)
        self.d = d

    def _matmat(self, V):
        return self.d.unsqueeze(1) * V


def _sum64(f, n, chunk=1 << 20):
    """``sum f(rows)`` in float64, chunk by chunk (no float64 copy of a long vector)."""
    return sum(float(f(slice(c, c + chunk))) for c in range(0, n, chunk))


def _gram64(X, Y, chunk=1 << 18):
    """``X.T @ Y`` in float64, chunk by chunk of rows."""
    out = 0
    for c in range(0, X.shape[0], chunk):
        out = out + X[c : c + chunk].double().T @ Y[c : c + chunk].double()
    return out


def _rel(value, truth):
    return abs(float(value) - float(truth)) / abs(float(truth))


def _positive(n):
    """A float32 vector of ``n`` numbers in [1, 2), cheap to make."""
    return (torch.arange(n) % 997).float().div_(997).add_(1.0)


def test_hutchinson_quadratic_forms_of_a_probe_block_of_10m_positive_terms():
    n = 10_000_000
    d = torch.rand(n, generator=torch.Generator().manual_seed(0)).add_(1.0)
    est = hutchinson_trace(Diagonal(d), num_matvecs=2, generator=torch.Generator().manual_seed(1))
    # z_i^2 = 1: z^T D z = tr(D) and ||D z||^2 = ||d||^2 exactly, for each probe of the block
    # (torch.dot on the block's strided columns: 2e-5 and 2e-2 off)
    trace = _sum64(lambda s: d[s].double().sum(), n)
    assert max(_rel(v, trace) for v in est.samples) < TOL
    assert _rel(est.frobenius_sq, _sum64(lambda s: (d[s].double() ** 2).sum(), n)) < TOL


def test_power_iteration_rayleigh_quotient_at_10m():
    n = 10_000_000
    op = Diagonal(torch.full((n,), 3.0))
    res = power_iteration(op, tol=1e-4, generator=torch.Generator().manual_seed(0))
    assert res.converged and res.num_matvecs == 1
    assert _rel(res.eigenvalues[0], 3.0) < TOL
    assert _rel(torch.linalg.vector_norm(res.eigenvectors.double()), 1.0) < TOL


def test_slq_lanczos_coefficients_at_4m():
    n = 4_000_000
    d = torch.ones(n)
    d[1::2] = 2.0  # two eigenvalues: two Lanczos steps from any start are exact
    res = stochastic_lanczos_quadrature(
        Diagonal(d), num_probes=1, num_steps=2, generator=torch.Generator().manual_seed(0)
    )
    nodes, order = res.nodes[0].sort()
    assert float((nodes - torch.tensor([1.0, 2.0], dtype=nodes.dtype)).abs().max()) < TOL
    # Rademacher start: weight n/2 / n on each eigenvalue
    assert float((res.weights[0][order] - 0.5).abs().max()) < TOL


def test_hutchpp_and_xtrace_coordinates_match_float64_at_4m():
    n = 4_000_000
    d = _positive(n)
    Q = torch.stack([d, d.flip(0)], dim=1).div_(d.double().norm().float())
    Z = d.unsqueeze(1) * Q
    G = torch.stack([d.flip(0), d], dim=1)
    AG = d.unsqueeze(1) * G
    trace_q, samples = deflated_samples(Q, Z, G, AG)
    H64, C64, ZG64 = _gram64(Q, Z), _gram64(Q, G), _gram64(Z, G)
    H64 = (H64 + H64.T) / 2
    quad64 = torch.tensor([_sum64(lambda s, j=j: (G[s, j].double() * AG[s, j]).sum(), n)
                           for j in range(2)], dtype=torch.float64)  # fmt: skip
    truth = quad64 - 2 * (ZG64 * C64).sum(0) + (C64 * (H64 @ C64)).sum(0)
    assert _rel(trace_q, torch.trace(H64)) < TOL
    assert float(((samples.double() - truth).abs() / truth.abs()).max()) < TOL
    H, Gx, W, _, _ = sketch_coordinates(G, AG, Q, Z)
    for out, ref in [(H, H64), (Gx, _gram64(Q, AG)), (W, C64)]:
        assert float(((out - ref).abs() / ref.abs()).max()) < TOL


def test_extend_basis_is_orthonormal_at_2m():
    g = torch.Generator().manual_seed(0)
    Y = torch.randn(2_000_000, 4, generator=g)
    Q = extend_basis(Y[:, :0], Y[:, :2], 1.0)
    Q = torch.cat([Q, extend_basis(Q, Y[:, 2:], 1.0)], dim=1)
    assert float((_gram64(Q, Q) - torch.eye(4, dtype=torch.float64)).abs().max()) < TOL


def test_slq_keeps_small_real_betas_of_a_clustered_spectrum():
    # 10 + 1e-2 u on 4e6 numbers: beta_0 = std = 2.9e-3 is real, not a breakdown
    n = 4_000_000
    d = _positive(n).sub_(1.0).mul_(1e-2).add_(10.0)
    res = stochastic_lanczos_quadrature(
        Diagonal(d), num_probes=1, num_steps=3, generator=torch.Generator().manual_seed(0)
    )
    w, t = res.weights[0], res.nodes[0]
    assert int((w > 0).sum()) == 3
    # Gauss quadrature is exact for degrees < 6: the mean and the variance of d (z_i^2 = 1)
    mean = _sum64(lambda s: d[s].double().sum(), n) / n
    var = _sum64(lambda s: (d[s].double() - mean).square().sum(), n) / n
    assert _rel((w * t).sum(), mean) < TOL
    assert _rel((w * (t - mean) ** 2).sum(), var) < 1e-3
