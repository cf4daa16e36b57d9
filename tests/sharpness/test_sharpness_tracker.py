"""SharpnessTracker: schedule, records equal to the direct calls, cost, plots, never alters."""

from __future__ import annotations

import pytest
import torch

from sharpgen.sharpness import (
    SharpnessTracker,
    average_sharpness,
    hessian_trace,
    sam_sharpness,
    top_eigenvalues,
)


def test_records_equal_the_direct_calls_and_the_model_is_untouched(h, state_check):
    model = h.make_mlp(0)
    batch = h.regression_data(8)
    tracker = SharpnessTracker(
        model, h.mse, batch, every=3,
        measures=("loss", "trace", "top_eigenvalue", "sam", "average"),
        options={"trace": {"method": "hutchpp", "num_matvecs": 9}, "average": {"num_samples": 4}},
        generator=h.g(0),
    )  # fmt: skip
    check = state_check(model)
    returned = [tracker.step(i) for i in range(7)]
    check()
    assert [r is not None for r in returned] == [i % 3 == 0 for i in range(7)]
    assert [r["step"] for r in tracker.history] == [0, 3, 6]
    # the first record, recomputed directly with the same generator sequence
    g = h.g(0)
    trace = hessian_trace(model, h.mse, batch, method="hutchpp", num_matvecs=9, generator=g)
    eig = top_eigenvalues(model, h.mse, batch, 1, tol=1e-3, generator=g)
    sam = sam_sharpness(model, h.mse, batch, 0.05, generator=g)
    avg = average_sharpness(model, h.mse, batch, 0.01, num_samples=4, generator=g)
    first = tracker.history[0]
    assert first["loss"] == pytest.approx(
        float(h.mse(model(batch[0]).detach(), batch[1])), rel=1e-12
    )
    assert first["trace"] == trace.value and first["trace_stderr"] == trace.stderr
    assert first["top_eigenvalue"] == float(eig.eigenvalues[0])
    assert first["top_eigenvalue_converged"] == eig.converged
    assert first["sam"] == sam.value
    assert first["average"] == avg.value and first["average_stderr"] == avg.stderr
    assert first["matvecs"] == trace.num_matvecs + eig.num_matvecs
    assert first["gradient_evals"] == sam.num_gradient_evals
    assert first["loss_evals"] == 1 + sam.num_loss_evals + avg.num_loss_evals
    totals = tracker.total_cost
    for key in ("matvecs", "gradient_evals", "loss_evals"):
        assert totals[key] == sum(r[key] for r in tracker.history)
    cols = tracker.to_dict()
    assert cols["step"] == [0, 3, 6] and len(cols["trace"]) == 3


def test_counter_custom_callables_and_plot(h, state_check):
    model = h.make_mlp(1)
    batch = h.regression_data(6)

    def weight_norm(model, loss_fn, batch):
        # a custom measure that (wrongly) writes to the model: the tracker restores it
        with torch.no_grad():
            model[0].weight.mul_(2.0)
        return float(model[0].weight.detach().norm())

    tracker = SharpnessTracker(
        model, h.mse, batch, every=2, measures={"wn": weight_norm, "tr": "trace"}
    )
    check = state_check(model)
    for _ in range(5):
        tracker()  # internal counter 0..4
    check()
    assert [r["step"] for r in tracker.history] == [0, 2, 4]
    assert tracker.history[0]["wn"] == tracker.history[1]["wn"]  # every call saw the same model
    assert tracker.history[0]["tr"] == hessian_trace(model, h.mse, batch).value
    fig = tracker.plot()
    assert len(fig.axes) == 2
    assert list(fig.axes[1].lines[0].get_xdata()) == [0, 2, 4]
    import matplotlib.pyplot as plt

    plt.close(fig)
    record = tracker.measure(11)  # forced, whatever `every` says
    assert record["step"] == 11 and len(tracker.history) == 4
    assert "records=4" in repr(tracker)


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"every": 0}, ValueError, r"every must be an int >= 1, got 0"),
        ({"measures": ("trace", "hessian")}, ValueError,
         r"unknown measure 'hessian'; valid choices are 'loss', 'trace', 'top_eigenvalue'"),
        ({"measures": ()}, ValueError, r"measures is empty"),
        ({"measures": {"x": 3}}, TypeError, r"measure 'x' must be a built-in name or a callable"),
        ({"measures": {"step": "trace"}}, ValueError, r"measure name 'step' is reserved"),
        ({"measures": ("trace",), "options": {"sam": {"rho": 0.1}}}, ValueError,
         r"options given for 'sam', which is not a tracked built-in measure"),
        ({"generator": 1}, TypeError, r"generator must be a torch.Generator"),
    ],
)  # fmt: skip
def test_bad_input(h, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        SharpnessTracker(h.make_mlp(0), h.mse, h.regression_data(4), **kwargs)


def test_plot_before_any_record(h):
    tracker = SharpnessTracker(h.make_mlp(0), h.mse, h.regression_data(4), measures=("loss",))
    with pytest.raises(ValueError, match="history is empty"):
        tracker.plot()
    with pytest.raises(ValueError, match="step_index must be an int >= 0"):
        tracker.step(-1)


def test_state_dict_round_trip(h):
    model = h.make_mlp(2)
    batch = h.regression_data(6)
    a = SharpnessTracker(model, h.mse, batch, every=1, measures=("loss", "trace"))
    a()
    a()
    state = a.state_dict()
    b = SharpnessTracker(model, h.mse, batch, every=1, measures=("loss", "trace"))
    b.load_state_dict(state)
    assert b.history == a.history and b.total_cost == a.total_cost
    assert a() == b()  # both continue at step 2
    assert b.history[-1]["step"] == 2
    with pytest.raises(ValueError, match="state must be a dict from SharpnessTracker.state_dict"):
        b.load_state_dict({"history": []})


def test_plot_overlays_two_runs_with_stderr_bands(h):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batch = h.regression_data(6)
    options = {"trace": {"method": "hutchinson", "num_matvecs": 4}}
    runs = []
    for seed in (0, 1):
        tracker = SharpnessTracker(
            h.make_mlp(seed), h.mse, batch, every=1, measures=("loss", "trace"),
            options=options, generator=h.g(seed),
        )  # fmt: skip
        for _ in range(3):
            tracker()
        runs.append(tracker)
    fig = runs[0].plot(label="run 0")
    assert runs[1].plot(axes=fig.axes, label="run 1", linestyle="--") is fig
    loss_ax, trace_ax = fig.axes
    assert len(fig.axes) == 2
    assert len(loss_ax.lines) == 2 and len(trace_ax.lines) == 2
    assert len(loss_ax.collections) == 0  # no loss_stderr: no band
    assert len(trace_ax.collections) == 2  # one +-2 stderr band per run
    assert trace_ax.lines[1].get_linestyle() == "--"
    assert [t.get_text() for t in trace_ax.get_legend().get_texts()] == ["run 0", "run 1"]
    # the band of run 1 spans value +- 2 * stderr, in its line's colour
    cols = runs[1].to_dict()
    assert min(cols["trace_stderr"]) > 0
    ys = trace_ax.collections[1].get_paths()[0].vertices[:, 1]
    lows = [v - 2 * e for v, e in zip(cols["trace"], cols["trace_stderr"], strict=True)]
    highs = [v + 2 * e for v, e in zip(cols["trace"], cols["trace_stderr"], strict=True)]
    assert ys.min() == pytest.approx(min(lows), rel=1e-12)
    assert ys.max() == pytest.approx(max(highs), rel=1e-12)
    band_rgba = trace_ax.collections[1].get_facecolor()[0][:3]
    line_rgb = matplotlib.colors.to_rgb(trace_ax.lines[1].get_color())
    assert tuple(band_rgba) == pytest.approx(line_rgb)
    plt.close(fig)
    # one key into one given Axes; a wrong number of axes is refused before drawing
    fig2, ax = plt.subplots()
    assert runs[0].plot("trace", axes=ax) is fig2
    assert len(ax.lines) == 1 and len(ax.collections) == 1
    with pytest.raises(ValueError, match=r"axes has 1 entries for 2 keys"):
        runs[0].plot(axes=[ax])
    plt.close(fig2)


def test_top_eigenvalue_is_warm_started_from_the_previous_measurement(h, monkeypatch):
    import sharpgen.sharpness._tracker as tracker_module

    seen = []
    real = tracker_module.top_eigenvalues

    def spy(*args, **kwargs):
        seen.append(kwargs.get("start"))
        out = real(*args, **kwargs)
        seen.append(out.eigenvectors[:, 0].clone())
        return out

    monkeypatch.setattr(tracker_module, "top_eigenvalues", spy)
    model, batch = h.make_mlp(0), h.regression_data(8)
    tracker = SharpnessTracker(model, h.mse, batch, every=1, measures=("top_eigenvalue",),
                               generator=h.g(0))  # fmt: skip
    first, second = tracker.step(0), tracker.step(1)
    assert seen[0] is None  # the first measurement: the default start
    assert torch.equal(seen[2], seen[1])  # the second: the first one's top eigenvector
    direct = top_eigenvalues(model, h.mse, batch, 1, tol=1e-6, generator=h.g(9))
    for record in (first, second):
        assert record["top_eigenvalue"] == pytest.approx(float(direct.eigenvalues[0]), rel=2e-3)
    options = {"top_eigenvalue": {"start": "auto"}}
    cold = SharpnessTracker(model, h.mse, batch, every=1, measures=("top_eigenvalue",),
                            options=options, generator=h.g(0))  # fmt: skip
    seen.clear()
    cold.step(0)
    cold.step(1)
    assert seen[0] == "auto" and seen[2] == "auto"
