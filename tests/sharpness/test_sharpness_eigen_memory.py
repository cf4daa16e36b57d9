"""What top_eigenvalues holds: the product written in place, the gradient's values freed, the
graph counted for the plan and freed before the eigenvectors, all without changing a number."""

from __future__ import annotations

import pytest
import torch

import sharpgen.curvature._kernels as kernels
import sharpgen.sharpness._eigen as eigen
from sharpgen.curvature import HessianOperator, ModelObjective
from sharpgen.curvature._columns import SavedBytes
from sharpgen.curvature._products import build_kept, kept_graph_bytes, release_gradients
from sharpgen.linalg import lanczos
from sharpgen.linalg._probes import random_unit_vector
from sharpgen.sharpness import top_eigenvalues


def _problem(h):
    model = h.make_mlp(0, d=4, h=6, out=2)
    x, y = h.regression_data(16, d=4, out=2)
    return model, (x, y), h.dense_hessian(model, h.mse, x, y)


def _applies(obj):
    return [apply for apply, _ in obj._graph_cache[1]]


def test_the_start_vectors_are_the_same_numbers_in_fewer_vectors(h):
    g = torch.randn(50, dtype=h.DT, generator=h.g(3))
    r = torch.randn(50, 1, dtype=h.DT, generator=h.g(0)).squeeze(1)
    r_unit = r / torch.linalg.vector_norm(r)
    assert torch.equal(random_unit_vector(50, generator=h.g(0), dtype=h.DT, device="cpu"), r_unit)
    want = g / torch.linalg.vector_norm(g) + eigen.GRADIENT_MIX * r_unit
    assert torch.equal(eigen.gradient_start(g, h.g(0)), want)
    assert torch.equal(g, torch.randn(50, dtype=h.DT, generator=h.g(3)))  # untouched


@pytest.mark.parametrize("flat_limit", [0, 1 << 26])
def test_the_product_into_one_buffer_is_the_dense_hessian(h, monkeypatch, state_check, flat_limit):
    # above FLAT_GRADIENT_BYTES (monkeypatched to 0) a kept graph writes each product
    # straight into its result through the leaves' .grad; below it the flat path
    monkeypatch.setattr(kernels, "FLAT_GRADIENT_BYTES", flat_limit)
    model, data, dense = _problem(h)
    check = state_check(model)
    calls = []
    real = kernels.product_into

    def spy(outputs, seeds, params):
        into = real(outputs, seeds, params)

        def counted(v, out):
            calls.append(out.data_ptr())
            into(v, out)

        return counted

    monkeypatch.setattr(kernels, "product_into", spy)
    H = HessianOperator(model, h.mse, data)
    for seed in range(3):
        v = torch.randn(dense.shape[0], dtype=h.DT, generator=h.g(seed))
        torch.testing.assert_close(H.matvec(v), dense @ v, rtol=1e-12, atol=1e-12)
    assert len(calls) == (2 if flat_limit == 0 else 0)  # the first product builds the graph
    leaves = _applies(H.objective)[0]
    assert all(t.grad is None for t in H.objective.params.values())
    assert leaves.into is not None
    check()


def test_the_product_resets_the_leaves_grads_after_an_exception(h, monkeypatch, state_check):
    monkeypatch.setattr(kernels, "FLAT_GRADIENT_BYTES", 0)
    model, data, dense = _problem(h)
    check = state_check(model)
    H = HessianOperator(model, h.mse, data)
    H.matvec(torch.ones(dense.shape[0], dtype=h.DT))
    apply = _applies(H.objective)[0]
    seen = []

    def boom(*args, **kwargs):
        seen.extend(kwargs["inputs"])
        raise RuntimeError("boom")

    monkeypatch.setattr(torch.autograd, "backward", boom)
    with pytest.raises(RuntimeError, match="boom"):
        apply.into([torch.ones_like(t) for t in H.objective.params.values()],
                   torch.zeros(dense.shape[0], dtype=h.DT))  # fmt: skip
    assert seen and all(t.grad is None for t in seen)
    check()


def test_freed_gradient_values_leave_the_products_and_the_gradient_exact(h, monkeypatch):
    monkeypatch.setattr(kernels, "FLAT_GRADIENT_BYTES", 0)
    model, (x, y), dense = _problem(h)
    obj = ModelObjective(model, h.mse, (x, y))
    H = HessianOperator(obj)
    g_kept = H.gradient()
    apply = _applies(obj)[0]
    before = kept_graph_bytes(obj)
    freed = release_gradients(obj)
    assert freed == 8 * dense.shape[0]  # the float64 gradient, every parameter live
    assert kept_graph_bytes(obj) == before - freed
    assert apply.gradient is None and release_gradients(obj) == 0
    v = torch.randn(dense.shape[0], dtype=h.DT, generator=h.g(0))
    torch.testing.assert_close(H.matvec(v), dense @ v, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(H.gradient(), g_kept, rtol=1e-12, atol=0)  # now a pass


@pytest.mark.parametrize("how", ["saved", "held"])
def test_a_gradient_the_graph_saved_or_the_model_holds_is_never_freed(h, monkeypatch, how):
    monkeypatch.setattr(kernels, "FLAT_GRADIENT_BYTES", 0)
    model, data, dense = _problem(h)
    H = HessianOperator(model, h.mse, data)
    H.gradient()
    apply = _applies(H.objective)[0]
    if how == "saved":  # as if an op of the graph had saved this gradient
        counter = SavedBytes()
        counter.pack(apply._outputs[1])
    else:  # as if a custom backward had returned a tensor of the model as the gradient
        counter = SavedBytes(held=[apply._outputs[1]])
    apply.account(counter, 0)
    assert apply.release_gradient() == 0 and apply.gradient is not None
    v = torch.randn(dense.shape[0], dtype=h.DT, generator=h.g(1))
    torch.testing.assert_close(H.matvec(v), dense @ v, rtol=1e-12, atol=1e-12)


def test_the_flat_path_keeps_its_gradient(h):
    model, data, _ = _problem(h)  # small: the flat path reads the gradient values
    H = HessianOperator(model, h.mse, data)
    H.gradient()
    assert release_gradients(H.objective) == 0


def _walked_bytes(roots, held):
    """Distinct storages of the tensors saved in the graph behind ``roots`` (less ``held``)."""
    seen, total, stack, done = set(held), 0, [r.grad_fn for r in roots], set()
    while stack:
        node = stack.pop()
        if node is None or node in done:
            continue
        done.add(node)
        for name in dir(node):
            if name.startswith("_saved_"):
                value = getattr(node, name)
                for t in value if isinstance(value, tuple | list) else (value,):
                    if isinstance(t, torch.Tensor):
                        ptr = t.untyped_storage().data_ptr()
                        if ptr not in seen:
                            seen.add(ptr)
                            total += t.untyped_storage().nbytes()
        stack.extend(fn for fn, _ in node.next_functions)
    return total


@pytest.mark.parametrize("n", [16, 64])
def test_the_graph_estimate_is_what_the_graph_holds(h, monkeypatch, n):
    # the count while building equals a walk over the finished graph's saved tensors
    # (another way to the same bytes), plus the gradient the graph ends in
    monkeypatch.setattr(kernels, "FLAT_GRADIENT_BYTES", 0)
    model = h.make_mlp(0, d=4, h=32, out=2)
    x, y = h.regression_data(n, d=4, out=2)
    obj = ModelObjective(model, h.mse, (x, y))
    counted = build_kept(obj, kernels.HESSIAN, "autograd")
    apply = _applies(obj)[0]
    held = {t.untyped_storage().data_ptr() for t in [*model.parameters(), x, y,
                                                    *obj.params.values()]}  # fmt: skip
    walked = _walked_bytes(apply._outputs, held)
    p = sum(t.numel() for t in model.parameters())
    assert counted == walked + 8 * p
    # the activations grow with the batch: 4 x the samples, more than 2 x the bytes
    assert walked > 8 * n * 32


def test_the_graph_of_a_validated_forward_is_counted_too(h, monkeypatch):
    # top_eigenvalues builds its graph from the validation's forward pass: the plan's
    # graph estimate is the same as for a graph built from scratch
    monkeypatch.setattr(kernels, "FLAT_GRADIENT_BYTES", 0)
    model = h.make_mlp(0, d=4, h=32, out=2)
    data = h.regression_data(32, d=4, out=2)
    fresh = build_kept(ModelObjective(model, h.mse, data), kernels.HESSIAN, "autograd")
    res = top_eigenvalues(model, h.mse, data, k=1, generator=h.g(0))
    assert res.memory.graph_bytes == fresh > 0
    assert res.memory.work_vectors == eigen.WORK_VECTORS and res.memory.result_vectors == 1


def test_top_eigenvalues_frees_only_a_graph_it_built(h, monkeypatch):
    monkeypatch.setattr(kernels, "FLAT_GRADIENT_BYTES", 0)
    model, data, dense = _problem(h)
    truth = torch.linalg.eigvalsh(dense).flip(0)
    obj = ModelObjective(model, h.mse, data)
    for k in (1, 3):
        res = top_eigenvalues(obj, k=k, tol=1e-10, generator=h.g(k))
        torch.testing.assert_close(res.eigenvalues, truth[:k], rtol=1e-9, atol=0)
        assert obj._graph_cache is not None  # the caller's objective keeps its graph
        assert _applies(obj)[0].gradient is not None  # and its free gradient
        mine = top_eigenvalues(model, h.mse, data, k=k, tol=1e-10, generator=h.g(k))
        torch.testing.assert_close(mine.eigenvalues, res.eigenvalues, rtol=1e-12, atol=0)


def test_on_finish_runs_once_after_the_last_product(h):
    A = torch.diag(torch.arange(1.0, 31.0, dtype=h.DT))
    for basis_dtype in (None, torch.float16):
        done: list[int] = []
        counted: list[int] = []

        def mv(v, done=done, counted=counted):
            assert not done  # no product after on_finish
            counted.append(1)
            return A @ v

        res = lanczos(mv, k=2, size=30, generator=h.g(0), on_finish=lambda d=done: d.append(1),
                      basis_dtype=basis_dtype, tol=1e-3 if basis_dtype else 1e-8)  # fmt: skip
        assert done == [1] and res.num_matvecs == len(counted) and res.converged
        torch.testing.assert_close(res.eigenvalues, torch.tensor([30.0, 29.0], dtype=h.DT),
                                   rtol=1e-3, atol=0)  # fmt: skip


@pytest.mark.parametrize("which", ["largest", "smallest", "magnitude", "both_ends"])
def test_the_eigenvectors_come_in_the_order_of_the_values(h, which):
    A = torch.diag(torch.tensor([-5.0, -1.0, 0.5, 2.0, 3.0, 4.0, 7.0], dtype=h.DT))
    res = lanczos(A, k=3, which=which, tol=1e-10, generator=h.g(0))
    for i in range(3):
        x = res.eigenvectors[:, i]
        torch.testing.assert_close(A @ x, res.eigenvalues[i] * x, rtol=0, atol=1e-8)
    assert torch.allclose(torch.linalg.vector_norm(res.eigenvectors, dim=0),
                          torch.ones(3, dtype=h.DT))  # fmt: skip


def test_the_plan_counts_the_result_after_the_graph():
    from sharpgen.curvature import plan_memory

    v = 4 * 10**6
    cpu = torch.device("cpu")
    common = {"numel": 10**6, "dtype": torch.float32, "device": cpu, "memory_budget": 100 * v}
    # steady state G + 2v above k v: the graph and the two working vectors decide
    plan = plan_memory("m", graph_bytes=5 * v, work_vectors=2, k=1, result_vectors=1,
                       basis_storage="disk", **common)  # fmt: skip
    assert plan.planned_bytes == 7 * v and plan.result_vectors == 1
    # five eigenvectors outweigh G + 2v = 3v; on a CPU the heap still holds the freed
    # graph (G = v) while they are formed; a basis of 8 in memory comes on top
    plan = plan_memory("m", graph_bytes=v, work_vectors=2, k=5, result_vectors=5,
                       max_basis=8, basis_storage="device", **common)  # fmt: skip
    assert plan.planned_bytes == (5 + 1 + 8) * v
    # with a product term P = 2v: G + P + 2w = 5v against 5v + G + P = 8v
    plan = plan_memory("m", graph_bytes=v, work_vectors=2, k=5, result_vectors=5,
                       basis_storage="disk", product_bytes=2 * v, **common)  # fmt: skip
    assert plan.planned_bytes == 8 * v
    # no result vectors: nothing is formed after the graph is freed
    plan = plan_memory("m", graph_bytes=v, work_vectors=2, k=5, result_vectors=0,
                       basis_storage="disk", **common)  # fmt: skip
    assert plan.planned_bytes == 3 * v
