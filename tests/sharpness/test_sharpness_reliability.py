"""Reliability of the measures: non-finite values in any batch, signed Gauss-Newton curvature."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import sharpgen as sg

DT = torch.float64


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(DT)


def _batches(bad: bool = True):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 3, dtype=DT, generator=g), torch.randn(8, 2, dtype=DT, generator=g)
    if bad:
        x[6, 1] = float("nan")  # in the second batch only
    return [(x[:4], y[:4]), (x[4:], y[4:])]


mse = nn.functional.mse_loss

LATER_BATCH = {
    "empirical_fisher_trace": lambda m, d: sg.empirical_fisher_trace(m, mse, d),
    "empirical_fisher_chunks": lambda m, d: sg.empirical_fisher_trace(m, mse, d, chunk_size=1),
    "ggn_trace": lambda m, d: sg.ggn_trace(m, mse, d, method="exact"),
    "fisher_rao_ggn": lambda m, d: sg.fisher_rao_norm(m, mse, d),
    "fisher_rao_empirical": lambda m, d: sg.fisher_rao_norm(m, mse, d, fisher="empirical"),
    "hessian_trace": lambda m, d: sg.hessian_trace(m, mse, d, method="exact"),
    "block_traces": lambda m, d: sg.block_traces(m, mse, d),
    "hessian_diagonal": lambda m, d: sg.hessian_diagonal(m, mse, d),
    "relative_flatness": lambda m, d: sg.relative_flatness(m, mse, d, layer="2"),
}


@pytest.mark.parametrize("name", list(LATER_BATCH))
def test_non_finite_value_in_a_later_batch_raises(state_check, name):
    model = _mlp()
    LATER_BATCH[name](model, _batches(bad=False))  # finite data: a number
    check = state_check(model)
    with pytest.raises(FloatingPointError, match="not finite|NaN or Inf"):
        LATER_BATCH[name](model, _batches())
    check()


def test_empirical_fisher_names_the_batch():
    with pytest.raises(FloatingPointError, match="batch 1"):
        sg.empirical_fisher_trace(_mlp(), mse, _batches())


def _concave(out, y):
    """A loss concave in the outputs: its Gauss-Newton matrix is negative semi-definite."""
    return -((out - y) ** 2).mean()


def test_fisher_rao_norm_refuses_a_negative_curvature_and_ggn_trace_reports_it():
    model, data = _mlp(), _batches(bad=False)
    trace = sg.ggn_trace(model, _concave, data, method="exact")
    assert trace.value < 0  # the signed value
    with pytest.raises(ValueError, match=r"theta\^T G theta = -.*not convex in the model outputs"):
        sg.fisher_rao_norm(model, _concave, data)
    # the empirical Fisher is a sum of squares: defined for any loss
    emp = sg.fisher_rao_norm(model, _concave, data, fisher="empirical")
    assert emp.squared > 0 and emp.value == pytest.approx(emp.squared**0.5)


def test_fisher_rao_norm_is_exact_and_signed_value_kept_for_a_convex_loss():
    model, data = _mlp(), _batches(bad=False)
    x = torch.cat([b[0] for b in data])
    theta = dict(model.named_parameters())

    def f(p):
        return torch.func.functional_call(model, p, (x,))

    _, jt = torch.func.jvp(f, ({n: p.detach() for n, p in theta.items()},),
                           ({n: p.detach() for n, p in theta.items()},))  # fmt: skip
    want = float(2 * (jt**2).sum() / jt.numel())  # MSE: H_l = 2/(n k) I
    res = sg.fisher_rao_norm(model, mse, data)
    assert res.squared == pytest.approx(want, rel=1e-10)
    assert res.value == pytest.approx(want**0.5, rel=1e-10)


# -- blocks: empty, a string instead of a list -------------------------------------------------
@pytest.mark.parametrize("fn", [sg.block_traces, sg.block_top_eigenvalues])
@pytest.mark.parametrize(
    ("blocks", "error", "match"),
    [
        ({}, ValueError, "blocks is an empty dict"),
        ({"a": []}, ValueError, r"blocks\['a'\] is empty"),
        ({"a": "0.weight"}, TypeError, r"got the string '0.weight'; write \{'a': \['0.weight'\]\}"),
        ({"a": 3}, TypeError, r"blocks\['a'\] must be a list of parameter names, got int"),
        ({"a": [3]}, TypeError, r"blocks\['a'\] must hold parameter names \(str\), got 3"),
        ({1: ["0.weight"]}, TypeError, "block names must be str"),
        ("layer", ValueError, "unknown blocks 'layer'"),
    ],
)
def test_bad_blocks_are_refused_before_any_work(monkeypatch, fn, blocks, error, match):
    from sharpgen.sharpness import _blocks

    def never(*_a, **_k):
        raise AssertionError("an objective was built before blocks was checked")

    monkeypatch.setattr(_blocks, "resolve_objective", never)
    with pytest.raises(error, match=match):
        fn(_mlp(), mse, _batches(bad=False), blocks=blocks)


@pytest.mark.parametrize(
    "call",
    [
        lambda m, d: sg.block_traces(m, mse, d, exact_threshold="big"),
        lambda m, d: sg.hessian_diagonal(m, mse, d, exact_threshold=None),
        lambda m, d: sg.ggn_trace(m, mse, d, exact_threshold=1.5),
        lambda m, d: sg.relative_flatness(m, mse, d, layer="2", exact_threshold="x"),
    ],
)
def test_exact_threshold_must_be_an_int(call):
    with pytest.raises(TypeError, match="exact_threshold must be an int"):
        call(_mlp(), _batches(bad=False))


@pytest.mark.parametrize(
    ("history", "match"),
    [
        ({"step": 3, "trace": 1.0}, r"history\['step'\] must be a list"),
        ({"step": "abc"}, r"history\['step'\] must be a list .* got str"),
        ("", "history must be a SharpnessTracker"),
        ([{"step": 0}, 5], r"history\[1\] must be a record dict"),
        ([{0: 1.0}], r"history\[0\] keys must be str"),
    ],
)
def test_history_export_refuses_malformed_histories(history, match):
    from sharpgen.integrations import history_to_csv, history_to_dataframe

    with pytest.raises(TypeError, match=match):
        history_to_dataframe(history)
    with pytest.raises(TypeError, match=match):
        history_to_csv(history, "unused.csv")


# -- the tracker checks its measures' options when it is built --------------------------------
BAD_OPTIONS = [
    ({"trace": {"num_matvecs": -1}}, ValueError, r"options\['trace'\]\['num_matvecs'\]"),
    ({"trace": {"numm_matvecs": 5}}, TypeError, r"\['numm_matvecs'\], which the 'trace' measure"),
    ({"top_eigenvalue": {"k": 3}}, TypeError, r"\['k'\] is set by the tracker"),
    ({"top_eigenvalue": {"tol": "small"}}, TypeError, r"\['tol'\] must be a real number"),
    ({"sam": {"rho": -0.1}}, ValueError, r"options\['sam'\]\['rho'\] must be a finite number"),
    ({"average": {"num_samples": 0}}, ValueError, r"\['num_samples'\] must be an int >= 1"),
    ({"fisher_rao": {"fisher": "emp"}}, ValueError, "unknown options"),
    ({"block_traces": {"blocks": {}}}, ValueError, "blocks is an empty dict"),
    ({"relative_flatness": {}}, ValueError, "needs a layer"),
    ({"relative_flatness": {"layer": "9"}}, ValueError, "neither a parameter nor a module"),
    ({"trace": {"bn": "train"}}, ValueError, "bn"),
    ({"pac_bayes": {"target": 0}}, ValueError, r"\['target'\] must be a finite number > 0"),
]


def _measures(options):
    return tuple(options)


@pytest.mark.parametrize(("options", "error", "match"), BAD_OPTIONS)
def test_tracker_refuses_bad_measure_options_when_built(options, error, match):
    with pytest.raises(error, match=match):
        sg.SharpnessTracker(_mlp(), mse, _batches(bad=False)[0], measures=_measures(options),
                            options=options)  # fmt: skip


@pytest.mark.parametrize(("options", "error", "match"), BAD_OPTIONS[:-3] + BAD_OPTIONS[-2:])
def test_callbacks_refuse_bad_measure_options_when_built(options, error, match):
    from sharpgen.integrations import SharpnessMonitor, SharpnessTrainerCallback

    batch = _batches(bad=False)[0]
    with pytest.raises(error, match=match):
        SharpnessMonitor(mse, batch, every_n_steps=1, measures=_measures(options), options=options)
    with pytest.raises(error, match=match):
        SharpnessTrainerCallback(batch, every_n_steps=1, measures=_measures(options),
                                 options=options)  # fmt: skip


def test_good_options_still_measure():
    tracker = sg.SharpnessTracker(
        _mlp(), mse, _batches(bad=False)[0], every=1,
        measures=("trace", "relative_flatness", "block_traces"),
        options={"trace": {"method": "exact"}, "relative_flatness": {"layer": "2"},
                 "block_traces": {"blocks": {"first": ["0.weight", "0.bias"]}}},
    )  # fmt: skip
    record = tracker.step(0)
    assert record["trace"] > 0 and "block_traces/first" in record


def test_a_model_without_parameters_is_a_clear_error():
    batch = _batches(bad=False)[0]
    with pytest.raises(ValueError, match="the model \\(Tanh\\) has no parameters"):
        sg.SharpnessTracker(nn.Tanh(), mse, batch)
    from sharpgen.integrations import SharpnessTrainerCallback

    callback = SharpnessTrainerCallback(batch, every_n_steps=1, measures=("loss",))
    state = type("State", (), {"global_step": 0, "epoch": 0.0, "log_history": []})()
    with pytest.raises(ValueError, match="has no parameters"):
        callback.on_train_begin(None, state, None, model=nn.Tanh())


# -- a classic autograd.Function: torch.func cannot trace it, double backward can -------------
class _ClassicSquare(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):  # the classic form: no setup_context, so no torch.func support
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 2 * x * g


class _SquareNet(nn.Module):
    def __init__(self, classic: bool) -> None:
        super().__init__()
        self.classic = classic
        self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x):
        h = self.a(x)
        return self.b(_ClassicSquare.apply(h) if self.classic else h * h)


FIRST_ORDER = {
    "hessian_diagonal": lambda m, d: sg.hessian_diagonal(m, mse, d, second_order="warn").values,
    "ggn_trace": lambda m, d: sg.ggn_trace(m, mse, d, second_order="warn").value,
    "fisher_rao": lambda m, d: sg.fisher_rao_norm(m, mse, d, second_order="warn").squared,
    "fisher_rao_emp": lambda m, d: sg.fisher_rao_norm(m, mse, d, fisher="empirical").squared,
    "empirical_fisher": lambda m, d: sg.empirical_fisher_trace(m, mse, d).value,
    "relative_flatness": lambda m, d: sg.relative_flatness(
        m, mse, d, layer="b", second_order="warn").value,
    "block_top_eig": lambda m, d: {k: r.eigenvalues for k, r in sg.block_top_eigenvalues(
        m, mse, d, blocks={"a": ["a.bias"], "b": ["b.bias"]}, k=4,  # dense blocks: exact
        second_order="warn").items()},
}  # fmt: skip


@pytest.mark.parametrize("name", list(FIRST_ORDER))
def test_classic_function_falls_back_to_double_backward_with_the_same_values(name):
    torch.manual_seed(0)
    classic = _SquareNet(classic=True).to(DT)
    plain = _SquareNet(classic=False).to(DT)
    plain.load_state_dict(classic.state_dict())
    data = _batches(bad=False)
    want = FIRST_ORDER[name](plain, data)
    with pytest.warns(RuntimeWarning, match="falling back to double backward"):
        got = FIRST_ORDER[name](classic, data)
    flat = torch.utils._pytree.tree_leaves
    for a, b in zip(flat(got), flat(want), strict=True):
        torch.testing.assert_close(torch.as_tensor(a), torch.as_tensor(b), rtol=1e-9, atol=1e-12)


def test_block_traces_take_double_backward_on_a_cpu_with_the_same_values():
    # like hessian_trace: the Hessian operator's products, double backward from the start
    torch.manual_seed(0)
    classic = _SquareNet(classic=True).to(DT)
    plain = _SquareNet(classic=False).to(DT)
    plain.load_state_dict(classic.state_dict())
    data = _batches(bad=False)
    want = sg.block_traces(plain, mse, data, second_order="warn").traces
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = sg.block_traces(classic, mse, data, second_order="warn").traces
    assert got.keys() == want.keys()
    for name, value in want.items():
        assert got[name] == pytest.approx(value, rel=1e-9, abs=1e-12)


def test_tracker_load_state_dict_is_all_or_nothing():
    tracker = sg.SharpnessTracker(_mlp(), mse, _batches(bad=False)[0], every=1, measures=("loss",))
    tracker.step(0)
    good = tracker.state_dict()
    bad = {**good, "history": [{"step": 7}], "totals": {"matvecs": "many"}}
    with pytest.raises(ValueError, match="the tracker is unchanged"):
        tracker.load_state_dict(bad)
    assert tracker.state_dict() == good
