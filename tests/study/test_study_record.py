"""TrainedModel, evaluate, StudyTable and measure_models' bookkeeping."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from sharpgen.study import StudyTable, TrainedModel, evaluate, measure_models

F64 = torch.float64


def _linear(w: list[float]) -> nn.Linear:
    net = nn.Linear(len(w), 1, bias=False).to(F64)
    with torch.no_grad():
        net.weight.copy_(torch.tensor([w], dtype=F64))
    return net


def _mse(out, y):
    return ((out.reshape(-1) - y.reshape(-1)) ** 2).mean()


def test_evaluate_loss_and_sign_error_by_hand():
    net = _linear([1.0, 0.0])
    x = torch.tensor([[1.0, 5.0], [-2.0, 1.0], [3.0, 0.0]], dtype=F64)
    y = torch.tensor([1.0, 1.0, -1.0], dtype=F64)
    loss, err = evaluate(net, _mse, (x, y))
    assert loss == pytest.approx(((1 - 1) ** 2 + (-2 - 1) ** 2 + (3 + 1) ** 2) / 3)
    assert err == pytest.approx(2 / 3)
    # batches: the same numbers, weighted by batch size
    loss2, err2 = evaluate(net, _mse, [(x[:1], y[:1]), (x[1:], y[1:])])
    assert (loss2, err2) == pytest.approx((loss, err))


def test_evaluate_argmax_zero_one_labels_and_restores_mode():
    net = nn.Linear(2, 3).to(F64).train()
    x = torch.randn(10, 2, dtype=F64, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 3, (10,), generator=torch.Generator().manual_seed(1))
    _, err = evaluate(net, nn.functional.cross_entropy, (x, y))
    with torch.no_grad():
        truth = float((net(x).argmax(-1) != y).double().mean())
    assert err == truth and net.training
    one = _linear([1.0])
    xs = torch.tensor([[1.0], [-1.0], [2.0]], dtype=F64)
    _, err01 = evaluate(one, _mse, (xs, torch.tensor([1.0, 1.0, 0.0], dtype=F64)))
    assert err01 == pytest.approx(2 / 3)


def test_trained_model_checks_its_fields():
    net = _linear([1.0])
    d = (torch.zeros(2, 1, dtype=F64), torch.zeros(2, dtype=F64))
    with pytest.raises(TypeError, match="hparams"):
        TrainedModel("a", [1], net, _mse, d, d)
    with pytest.raises(TypeError, match="nn.Module"):
        TrainedModel("a", {}, "net", _mse, d, d)
    with pytest.raises(ValueError, match="metrics has unknown keys"):
        TrainedModel("a", {}, net, _mse, d, d, metrics={"acc": 1.0})
    with pytest.raises(ValueError, match="init_params"):
        TrainedModel("a", {}, net, _mse, d, d, init_params={"weight": torch.zeros(3)})


def _models():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(12, 2, dtype=F64, generator=gen)
    y = torch.sign(x[:, 0])
    out = []
    for i, w in enumerate([[1.0, 0.0], [1.0, 1.0], [-1.0, 0.5]]):
        out.append(TrainedModel(f"m{i}", {"w": i, "lr": 0.1}, _linear(w), _mse, (x, y), (x, -y)))
    return out


def test_measure_models_rows_gaps_and_user_measures():
    models = _models()

    def first_weight(tm):
        return float(tm.model.weight[0, 0].detach())

    def with_gen(tm, generator=None):
        return float(torch.rand((), generator=generator))

    table = measure_models(
        models, ["param_norm", first_weight, with_gen], generator=torch.Generator().manual_seed(3)
    )
    assert table.measures == ("param_norm", "first_weight", "with_gen")
    assert table.axes == ("w", "lr")
    assert table.column("first_weight").tolist() == [1.0, 1.0, -1.0]
    assert table.column("param_norm").tolist() == pytest.approx([1.0, 2.0, 1.25])
    for row, tm in zip(table, models, strict=True):
        tr = evaluate(tm.model, _mse, tm.train_data)
        te = evaluate(tm.model, _mse, tm.test_data)
        assert row["gap"] == pytest.approx(te[1] - tr[1])
        assert row["loss_gap"] == pytest.approx(te[0] - tr[0])
    again = measure_models(
        models, [with_gen, "param_norm"], generator=torch.Generator().manual_seed(3)
    )
    # a measure's randomness does not depend on which other measures run
    assert again.column("with_gen").tolist() == table.column("with_gen").tolist()


def test_given_metrics_are_used_and_failures_become_nan():
    tm = _models()[0]
    given = TrainedModel(
        tm.name,
        tm.hparams,
        tm.model,
        tm.loss_fn,
        tm.train_data,
        tm.test_data,
        metrics={"train_error": 0.1, "test_error": 0.4},
    )
    with pytest.warns(RuntimeWarning, match="1 measure"):
        table = measure_models([given], {"boom": lambda tm: 1 / 0})
    row = table.rows[0]
    assert row["gap"] == pytest.approx(0.3) and math.isnan(row["boom"])
    assert table.failures[0][:2] == (tm.name, "boom")
    no_init = measure_models([given], ["frob_distance"])
    assert math.isnan(no_init.rows[0]["frob_distance"]) and not no_init.failures


def test_measure_models_bad_input():
    models = _models()
    with pytest.raises(TypeError, match="list of TrainedModel"):
        measure_models(models[0])
    with pytest.raises(ValueError, match="unknown measure 'nope'"):
        measure_models(models, ["nope"])
    with pytest.raises(ValueError, match="unique"):
        measure_models([models[0], models[0]])
    with pytest.raises(ValueError, match="lambda"):
        measure_models(models, [lambda tm: 1.0])


def test_table_csv_round_trip_and_pandas(tmp_path):
    table = measure_models(_models(), ["param_norm"])
    path = table.to_csv(tmp_path / "t.csv")
    back = StudyTable.read_csv(path, axes=("w", "lr"))
    assert back.measures == ("param_norm",)
    assert back.column("param_norm").tolist() == pytest.approx(table.column("param_norm").tolist())
    assert back.column("gap").tolist() == pytest.approx(table.column("gap").tolist())
    df = table.to_pandas()
    assert list(df.columns) == list(table.columns) and len(df) == 3


def test_same_seed_same_table_and_the_global_rng_untouched():
    models = _models()
    names = ["average_sharpness", "adaptive_average_sharpness", "worst_case_sharpness"]
    state = torch.get_rng_state()
    a = measure_models(models, names, generator=torch.Generator().manual_seed(5))
    b = measure_models(models, names, generator=torch.Generator().manual_seed(5))
    assert torch.equal(torch.get_rng_state(), state)
    for name in names:
        assert a.column(name).tolist() == b.column(name).tolist()
    c = measure_models(models, names[:1], generator=torch.Generator().manual_seed(6))
    assert c.column(names[0]).tolist() != a.column(names[0]).tolist()
