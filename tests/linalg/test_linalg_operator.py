import numpy as np
import pytest
import torch
from scipy.sparse.linalg import eigsh

from sharpgen.linalg import LinearOperator, as_linear_operator


def _sym(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, n, generator=g, dtype=torch.float64)
    return (A + A.T) / 2


def test_dense_matvec_matmat_and_count():
    A = _sym(5)
    op = as_linear_operator(A)
    v = torch.arange(5, dtype=torch.float64)
    torch.testing.assert_close(op.matvec(v), A @ v, rtol=0, atol=1e-14)
    V = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(op @ V, A @ V, rtol=0, atol=1e-14)
    assert op.num_matvecs == 4
    assert op.shape == (5, 5) and op.dtype == torch.float64


def test_callable_operator_and_batched():
    A = _sym(4)
    op = as_linear_operator(lambda v: A @ v, size=4)
    op_b = as_linear_operator(lambda V: A @ V, size=4, batched=True)
    V = torch.eye(4, dtype=torch.float64)
    torch.testing.assert_close(op.matmat(V), A)
    torch.testing.assert_close(op_b.to_dense(), A)


def test_to_scipy_eigsh_matches_eigh():
    A = _sym(12, seed=3)
    w = torch.linalg.eigvalsh(A)
    vals = eigsh(as_linear_operator(A).to_scipy(), k=2, which="LA")[0]
    np.testing.assert_allclose(np.sort(vals), w[-2:].numpy(), rtol=1e-10)


def test_wrapped_foreign_operator_is_adapted():
    A = _sym(3)

    class Foreign:
        shape = (3, 3)
        dtype = torch.float64
        device = torch.device("cpu")

        def matmat(self, V):
            return A @ V

    op = as_linear_operator(Foreign())
    assert isinstance(op, LinearOperator)
    torch.testing.assert_close(op.to_dense(), A)


def test_bad_inputs_have_clear_errors():
    with pytest.raises(ValueError, match="square"):
        as_linear_operator(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="size is required"):
        as_linear_operator(lambda v: v)
    with pytest.raises(ValueError, match="symmetric"):
        as_linear_operator(torch.tensor([[1.0, 2.0], [0.0, 1.0]]), check_symmetric=True)
    with pytest.raises(TypeError, match="floating-point"):
        as_linear_operator(torch.eye(2, dtype=torch.int64))
    with pytest.raises(TypeError, match="must be a square tensor"):
        as_linear_operator(3)
    op = as_linear_operator(torch.eye(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="operator has size 3"):
        op.matvec(torch.ones(4, dtype=torch.float64))
    with pytest.raises(TypeError, match="dtype"):
        op.matvec(torch.ones(3, dtype=torch.float32))
    with pytest.raises(ValueError, match="1-D"):
        op.matvec(torch.ones(3, 1, 1, dtype=torch.float64))


def test_non_finite_product_raises():
    op = as_linear_operator(lambda v: v * float("nan"), size=2)
    with pytest.raises(FloatingPointError, match="NaN or Inf"):
        op.matvec(torch.ones(2, dtype=torch.float64))
