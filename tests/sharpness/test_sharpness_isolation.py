"""The caller's world after a measure: global RNG and autograd version counters untouched.

Every public measure and operator is called (a) with a `DataLoader`, shuffled and not, and must
leave `torch.get_rng_state()` exactly as it was while visiting the batches in the order the
loader's own sampler produces; (b) between building a loss graph and calling ``backward`` on
it, which must still succeed (no restored tensor may have its version counter moved).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from sharpgen import (
    GGNOperator,
    HessianOperator,
    ModelObjective,
    SharpnessTracker,
    average_sharpness,
    hessian_trace,
    sam_sharpness,
    spectral_density,
    top_eigenvalues,
)

DT = torch.float64


def _g(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _model() -> nn.Module:
    g = _g(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2)).to(DT)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, dtype=DT, generator=g))
    model.train()
    model(torch.randn(8, 3, dtype=DT, generator=g))  # move the running statistics
    return model.eval()


def _mse(out, y):
    return nn.functional.mse_loss(out, y)


class _Recording(Dataset):
    """A tensor dataset that records which indices were read, in order."""

    def __init__(self) -> None:
        g = _g(1)
        self.x = torch.randn(12, 3, dtype=DT, generator=g)
        self.y = torch.randn(12, 2, dtype=DT, generator=g)
        self.seen: list[int] = []

    def __len__(self) -> int:
        return 12

    def __getitem__(self, i: int):
        self.seen.append(int(i))
        return self.x[i], self.y[i]


def _passes(seen: list[int], start: int) -> list[list[int]]:
    """Split the read indices into passes (each pass begins with the sampler's first index)."""
    out: list[list[int]] = []
    for i in seen:
        if i == start:
            out.append([])
        out[-1].append(i)
    return out


def _vectors(model: nn.Module, k: int = 2) -> dict[str, torch.Tensor]:
    g = _g(5)
    return {
        n: torch.randn((k, *p.shape), dtype=DT, generator=g) for n, p in model.named_parameters()
    }


def _tracker(m, f, d):
    tracker = SharpnessTracker(
        m, f, d, measures=("loss", "trace", "top_eigenvalue", "sam", "average"),
        options={"trace": {"method": "hutchinson", "num_matvecs": 4},
                 "average": {"num_samples": 2}},
        generator=_g(3),
    )  # fmt: skip
    return tracker.step(0)


P = 3 * 4 + 4 + 2 * 4 + 4 * 2 + 2  # parameters of _model()

CALLS = {
    "trace_exact": lambda m, f, d: hessian_trace(m, f, d, method="exact"),
    "trace_auto": lambda m, f, d: hessian_trace(m, f, d, generator=_g(), max_matvecs=20),
    "trace_hutchinson": lambda m, f, d: hessian_trace(
        m, f, d, method="hutchinson", num_matvecs=3, generator=_g()
    ),
    "eigen": lambda m, f, d: top_eigenvalues(m, f, d, k=1, tol=1e-2, generator=_g()),
    "density": lambda m, f, d: spectral_density(m, f, d, num_probes=2, num_steps=3, generator=_g()),
    "sam": lambda m, f, d: sam_sharpness(m, f, d, 0.05, steps=2, restarts=1, generator=_g()),
    "average": lambda m, f, d: average_sharpness(m, f, d, 0.05, num_samples=2, generator=_g()),
    "tracker": _tracker,
    "hessian_operator": lambda m, f, d: HessianOperator(m, f, d) @ torch.ones(P, dtype=DT),
    "hessian_operator_cached": lambda m, f, d: HessianOperator(
        m, f, d, backend="autograd", cache_graph=True
    ).matmat(torch.ones(P, 2, dtype=DT)),
    "ggn_operator": lambda m, f, d: GGNOperator(m, f, d).matmat(torch.ones(P, 2, dtype=DT)),
    "objective": lambda m, f, d: (
        ModelObjective(m, f, d).loss_and_gradient(),
        ModelObjective(m, f, d).hvp(_vectors(m)),
        ModelObjective(m, f, d).hvp(_vectors(m), backend="autograd", cache=True),
        ModelObjective(m, f, d).ggn_vp(_vectors(m)),
    ),
}  # fmt: skip


@pytest.mark.parametrize("shuffle", [False, True], ids=["ordered", "shuffled"])
@pytest.mark.parametrize("name", list(CALLS))
def test_global_rng_untouched_with_a_dataloader(name, shuffle):
    model = _model()
    ds = _Recording()
    loader = DataLoader(ds, batch_size=4, shuffle=shuffle, num_workers=0)
    torch.manual_seed(1234)
    rng = torch.get_rng_state()
    for _ in loader:
        pass
    expected_order = list(ds.seen)  # the order the loader's own sampler yields right now
    torch.set_rng_state(rng)
    ds.seen.clear()
    CALLS[name](model, _mse, loader)
    assert torch.equal(torch.get_rng_state(), rng), "the global RNG moved"
    # every pass of the call (full, or up to the first batch) followed the loader's own order
    passes = _passes(ds.seen, expected_order[0])
    assert len(passes) >= 2 and any(p == expected_order for p in passes)
    assert all(p == expected_order[: len(p)] and len(p) % 4 == 0 for p in passes)
    # and the caller's next random draw is the one it would have been without the call
    after = torch.rand(3)
    torch.set_rng_state(rng)
    assert torch.equal(after, torch.rand(3))


def test_dataset_drawing_from_the_global_rng_is_isolated_and_consistent():
    """Augmentation with the global RNG: draws continue within a pass, the caller sees none."""

    class Noisy(_Recording):
        def __getitem__(self, i):
            x, y = super().__getitem__(i)
            return x + 0.01 * torch.randn(3, dtype=DT), y

    loader = DataLoader(Noisy(), batch_size=6, shuffle=True)
    model = _model()
    torch.manual_seed(0)
    rng = torch.get_rng_state()
    x_user = torch.cat([x for x, _ in loader])  # what the caller's own loop would see now
    torch.set_rng_state(rng)
    obj = ModelObjective(model, _mse, loader)
    seen = torch.cat([x for x, _ in obj.batches()])
    assert torch.equal(seen, x_user)
    assert torch.equal(torch.get_rng_state(), rng)


def test_rng_restored_when_the_data_raises():
    class Broken(_Recording):
        def __getitem__(self, i):
            if i == 5:
                raise RuntimeError("bad sample")
            return super().__getitem__(i)

    loader = DataLoader(Broken(), batch_size=4, shuffle=True)
    model = _model()
    rng = torch.get_rng_state()
    with pytest.raises(RuntimeError, match="bad sample"):
        hessian_trace(model, _mse, loader, method="exact")
    assert torch.equal(torch.get_rng_state(), rng)


@pytest.mark.parametrize("name", list(CALLS))
@pytest.mark.parametrize("data_kind", ["batch", "loader"])
def test_a_graph_built_before_the_call_still_backpropagates(name, data_kind):
    model = _model()
    ds = _Recording()
    data = (ds.x, ds.y) if data_kind == "batch" else DataLoader(ds, batch_size=4)
    loss = _mse(model(ds.x), ds.y)  # eval mode: BatchNorm saves its running statistics
    tensors = [*model.parameters(), *model.buffers()]
    versions = [t._version for t in tensors]
    CALLS[name](model, _mse, data)
    assert [t._version for t in tensors] == versions
    loss.backward()  # raises "modified by an inplace operation" if a saved tensor was bumped
    assert all(p.grad is not None for p in model.parameters())


def test_gradients_present_before_the_call_keep_their_versions():
    model = _model()
    ds = _Recording()
    _mse(model(ds.x), ds.y).backward()
    grads = {n: (p.grad, p.grad._version, p.grad.clone()) for n, p in model.named_parameters()}
    sam_sharpness(model, _mse, (ds.x, ds.y), 0.05, steps=2)
    for n, p in model.named_parameters():
        obj, version, value = grads[n]
        assert p.grad is obj and p.grad._version == version and torch.equal(p.grad, value)
