"""SharpnessTracker with the invariant / per-layer measures and the edge-of-stability line."""

from __future__ import annotations

import pytest
import torch

from sharpgen import (
    SharpnessTracker,
    block_traces,
    fisher_rao_norm,
    ggn_trace,
    pac_bayes_sigma,
    relative_flatness,
)


def _g(seed):
    return torch.Generator().manual_seed(seed)


def test_tracker_records_the_new_measures_like_direct_calls(h, state_check):
    model = h.make_mlp(0)
    batch = h.regression_data()
    check = state_check(model)
    tracker = SharpnessTracker(
        model, h.mse, batch, every=1, generator=_g(0),
        measures=("ggn_trace", "fisher_rao", "relative_flatness", "pac_bayes", "block_traces"),
        options={"relative_flatness": {"layer": "2"},
                 "pac_bayes": {"target": 0.05, "num_samples": 4, "max_samples": 8}},
    )  # fmt: skip
    rec = tracker.step(0)
    check()
    assert rec["ggn_trace"] == pytest.approx(ggn_trace(model, h.mse, batch).value, rel=1e-10)
    assert rec["fisher_rao"] == pytest.approx(fisher_rao_norm(model, h.mse, batch).value, rel=1e-10)
    assert rec["relative_flatness"] == pytest.approx(
        relative_flatness(model, h.mse, batch, layer="2").value, rel=1e-10
    )
    blocks = block_traces(model, h.mse, batch)
    assert rec["block_traces"] == pytest.approx(blocks.total, rel=1e-10)
    assert rec["block_traces/0"] == pytest.approx(blocks.traces["0"], rel=1e-10)
    g = _g(0)  # the exact measures before it draw nothing from the tracker's generator
    direct = pac_bayes_sigma(model, h.mse, batch, target=0.05, num_samples=4, max_samples=8,
                             generator=g)  # fmt: skip
    assert rec["pac_bayes"] == direct.sigma
    assert rec["matvecs"] > 0 and rec["loss_evals"] > 0


def test_relative_flatness_needs_a_layer_when_built(h):
    model = h.make_mlp(0)
    with pytest.raises(ValueError, match="needs a layer"):
        SharpnessTracker(model, h.mse, h.regression_data(), every=1,
                         measures=("relative_flatness",))  # fmt: skip


def test_plot_draws_the_edge_of_stability_line(h):
    model = h.make_mlp(0)
    tracker = SharpnessTracker(model, h.mse, h.regression_data(), every=1, lr=0.5,
                               measures=("loss", "top_eigenvalue"), generator=_g(0))  # fmt: skip
    tracker.step(0)
    fig = tracker.plot()
    eig_ax = fig.axes[1]
    ys = [line.get_ydata() for line in eig_ax.lines if line.get_linestyle() == "--"]
    assert len(ys) == 1 and float(ys[0][0]) == pytest.approx(4.0)
    assert not any(line.get_linestyle() == "--" for line in fig.axes[0].lines)
    with pytest.raises(ValueError, match="lr"):
        SharpnessTracker(model, h.mse, h.regression_data(), lr=0.0)
