"""Presets mirror the paper's Table 2; Table 1 verdicts follow the stated criteria."""

from __future__ import annotations

import math

import pytest

from sharpgen.experiments import (
    PRESET_GROUPS,
    PRESETS,
    ExperimentSpec,
    Phase,
    RunResult,
    get_preset,
    markdown_report,
    table1,
)


def test_paper_presets_match_table_2():
    p = PRESETS
    assert p["paper-fig1b"].phases == (Phase(100_000, 0.01, 0.05),)
    assert (p["paper-fig1a"].batch_size, p["paper-fig1a"].weight_decay) == (100, 0.05)
    assert p["paper-fig2a"].phases == (Phase(100_000, 0.005, 0.1), Phase(100_000, 0.003, 1.0))
    assert p["paper-fig4b"].phases == (Phase(200_000, 0.01, 0.05), Phase(400_000, 0.01, 0.1))
    assert p["paper-fig6a"].first_layer_init_scale == 0.01
    assert p["paper-fig6a"].phases == (Phase(100_000, 0.1, 0.1),)
    assert [p[f"paper-fig6b-rho{r}"].phases[0].rho for r in ("0.1", "0.5", "1")] == [0.1, 0.5, 1]
    assert p["paper-fig7b"].data == "uniform_ball" and p["paper-fig7b"].d == 10
    assert (p["paper-fig5a"].activation, p["paper-fig5a"].batch_size) == ("softplus", 1)
    assert p["paper-fig5a"].weight_decay == 0.05 and p["paper-fig5a"].phases[0].lr == 0.001
    assert p["paper-fig5b"].phases == (
        Phase(100_000, 0.0005, 0.05),
        Phase(100_000, 0.001, 0.1),
        Phase(5000, 0.005, 1.0),
    )
    assert (p["paper-fig11a"].depth, p["paper-fig11a"].weight_decay) == (3, 0.05)
    assert p["paper-fig11b"].phases == (Phase(100_000, 0.01, 0.05),)
    for name in PRESET_GROUPS["paper"]:
        spec = p[name]
        assert (spec.n, spec.width) == (100, 500)
        assert spec.d == (10 if spec.data == "uniform_ball" else 30)


def test_quick_preset_covers_all_four_rows_with_notes():
    specs = get_preset("quick")
    sam_archs = {s.arch for s in specs if s.method != "sgd"}
    assert sam_archs == {"no_bias", "bias", "simplified_bn", "simplified_ln"}
    assert any(s.arch == "bias" and s.method == "sgd" for s in specs)
    assert all(s.notes for s in specs)


def test_get_preset_deduplicates_and_rejects_unknown_names():
    specs = get_preset("paper-fig1b", "paper", "paper-fig1b")
    assert [s.name for s in specs].count("paper-fig1b") == 1
    with pytest.raises(ValueError, match="unknown preset 'nope'; valid presets: quick, paper"):
        get_preset("nope")
    with pytest.raises(ValueError, match="no preset given"):
        get_preset()


def _result(arch, method, acc, trace, bound=math.nan):
    extra = {"projection_radius": 10.0} if method == "projected_sam1" else {}
    spec = ExperimentSpec(f"{arch}-{method}", arch, method, (Phase(1, 0.1),), **extra)
    metrics = {
        "test_accuracy": [[0.5, a] for a in acc],
        "trace_gn": [[100.0, t] for t in trace],
        "trace_ratio": [[100.0 / bound, t / bound] for t in trace],
        "train_loss": [[1.0, 0.0] for _ in acc],
        "trace": [[100.0, t] for t in trace],
    }
    return RunResult(spec, tuple(range(len(acc))), (0, 1), metrics, (bound,) * len(acc), 1.0, 100)


def test_table1_verdicts():
    nb = _result("no_bias", "sam1", [1.0, 0.99, 0.98], [30, 31, 29])
    b = _result("bias", "sam1", [0.7, 0.75, 0.72], [23, 23.5, 23.2], bound=22.27)
    gd = _result("bias", "sgd", [1.0, 1.0, 1.0], [80, 78, 79], bound=22.27)
    ln = _result("simplified_ln", "projected_sam1", [0.99, 0.94, 0.99], [2.1, 2.0, 2.05], 2.0)
    bn = _result("simplified_bn", "sam1", [0.9, 0.93, 0.95], [10, 11, 12])
    rows = {r.arch: r for r in table1([nb, b, gd, ln, bn])}
    assert rows["no_bias"].reproduced is True
    assert rows["bias"].reproduced is True
    assert rows["simplified_ln"].reproduced is True and "1 of 3 seeds below" in (
        rows["simplified_ln"].verdict
    )
    assert rows["simplified_bn"].reproduced is False
    assert rows["simplified_bn"].verdict.startswith("NOT reproduced here")
    # bias net that generalizes as well as the no-bias one: not reproduced
    b_good = _result("bias", "sam1", [0.99, 0.99, 0.99], [23, 23, 23], bound=22.27)
    assert {r.arch: r for r in table1([nb, b_good, gd])}["bias"].reproduced is False
    # trace above the baseline: not reproduced
    gd_flat = _result("bias", "sgd", [1.0, 1.0, 1.0], [20, 20, 20], bound=22.27)
    assert {r.arch: r for r in table1([nb, b, gd_flat])}["bias"].reproduced is False
    # no baseline: undecided
    assert {r.arch: r for r in table1([nb, b])}["bias"].reproduced is None
    report = markdown_report([nb, b, gd, ln, bn])
    assert "**no**: NOT reproduced here" in report
    assert "23.23 ± 0.25 [23.00, 23.50] / 22.27 = 1.043" in report


def test_medium_preset_shows_what_quick_cannot():
    medium = {s.name: s for s in get_preset("medium")}
    archs = {(s.arch, s.data) for s in medium.values()}
    assert ("simplified_bn", "xor_cube") in archs
    assert {("no_bias", "uniform_ball"), ("bias", "uniform_ball")} <= archs  # Figs. 7a/b
    assert {s.paper for s in medium.values() if s.data == "uniform_ball"} == {"Fig. 7a", "Fig. 7b"}
    bn = medium["medium-sim-bn-sam"]
    assert bn.width == 500  # the paper's width, unlike quick
    ln = medium["medium-sim-ln-sam"]
    assert ln.method == "sam1" and ln.first_layer_init_scale == 0.01  # Fig. 6a, not 6b
    assert ln.phases == (Phase(6000, 0.1, 0.1),)  # the paper's lr and rho
    bias = medium["medium-bias-sam"]
    assert bias.phases == (Phase(8000, 0.01, 0.05),)  # Fig. 4b's first phase ...
    assert bias.epochs >= 2 * 4000  # ... to twice the epoch where the paper sees degradation
    assert bias.epochs // bias.eval_every >= 40  # a curve, not two points
    assert medium["medium-bias-gd"].epochs == bias.epochs
    for spec in medium.values():
        assert (spec.n, spec.width) == (100, 500)
        assert spec.notes.startswith("medium preset")


def test_logistic_presets_follow_the_papers_table_2():
    p = {s.paper: s for s in get_preset("paper-logistic")}
    assert sorted(p) == ["Fig. 10a", "Fig. 10b", "Fig. 8a", "Fig. 8b", "Fig. 9a", "Fig. 9b"]
    assert (p["Fig. 8a"].method, p["Fig. 8a"].batch_size, p["Fig. 8a"].weight_decay) == (
        "sgd",
        10,
        0.01,
    )
    assert p["Fig. 8a"].phases == (Phase(100_000, 0.1),)
    assert p["Fig. 8b"].phases == (Phase(100_000, 0.1, 0.2),) and p["Fig. 8b"].arch == "no_bias"
    assert (p["Fig. 9a"].batch_size, p["Fig. 9a"].weight_decay) == (1, 0.05)
    assert p["Fig. 9a"].phases == (Phase(100_000, 0.01),)
    assert p["Fig. 9b"].phases == (Phase(100_000, 0.1, 0.2),) and p["Fig. 9b"].arch == "bias"
    assert p["Fig. 10a"].phases == (Phase(40_000, 0.1, 0.2),)
    assert p["Fig. 10a"].arch == "simplified_bn"
    assert p["Fig. 10b"].phases == (Phase(1000, 1.0, 0.5), Phase(100_000, 1.0, 1.0))
    assert p["Fig. 10b"].first_layer_init_scale == 0.01
    for spec in p.values():
        assert spec.loss == "logistic" and (spec.d, spec.n, spec.width) == (30, 100, 500)
        assert "p = 0.2" in spec.notes
    # what the paper does not state stays marked
    for fig in ("Fig. 8a", "Fig. 10a", "Fig. 10b"):
        assert "ASSUMED" in p[fig].notes


def test_logistic_smoothing_matches_the_papers_p():
    """The paper's p = 0.2: the per-example loss is minimal at logit y * ln((1 - p) / p)."""
    import torch

    from sharpgen.experiments._batched import loss_derivatives

    (spec,) = get_preset("paper-fig8b")
    opt = math.log((1 - 0.2) / 0.2)  # ln 4
    f = torch.tensor([opt, -opt, opt + 0.1, opt - 0.1], dtype=torch.float64)
    y = torch.tensor([1.0, -1.0, 1.0, 1.0], dtype=torch.float64)
    _, d1, d2 = loss_derivatives(f, y, "logistic", spec.label_smoothing)
    assert torch.allclose(d1[:2], torch.zeros(2, dtype=torch.float64), atol=1e-15)
    assert d1[2] > 0 > d1[3]  # a minimum, not a maximum
    assert float(d2[0]) == pytest.approx(0.2 * 0.8, rel=1e-12)  # p (1 - p), Lemma A.13


def test_sweep_preset_same_steps_at_every_n():
    sweep = get_preset("sweep-n")
    assert sorted({s.n for s in sweep}) == [25, 50, 100, 200, 400]
    assert {s.arch for s in sweep} == {"no_bias", "bias"}
    assert {(s.d, s.width, s.method) for s in sweep} == {(30, 500, "sam1")}
    assert {s.phases[0].lr for s in sweep} == {0.01} and {s.phases[0].rho for s in sweep} == {0.05}
    # the same number of 1-SAM steps at every n, and ten recorded points per run
    assert {s.epochs * s.steps_per_epoch for s in sweep} == {40_000}
    assert {s.epochs // s.eval_every for s in sweep} == {10}
    assert set(PRESET_GROUPS["sweep-n"]) == {s.name for s in sweep}


def _shrunk(spec: ExperimentSpec) -> ExperimentSpec:
    """The same experiment (model, loss, method, data, first phase) at toy size, one epoch."""
    first = spec.phases[0]
    return spec.replace(
        d=min(spec.d, 6),
        n=12,
        width=16,
        test_size=20,
        batch_size=min(spec.batch_size, 12),
        eval_every=1,
        phases=(Phase(1, first.lr, first.rho),),
    )


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_trains_one_epoch_at_toy_size(name):
    """Every option combination a preset uses runs end to end (closed-form or autograd)."""
    from sharpgen.experiments import train

    spec = _shrunk(PRESETS[name])
    result = train(spec, [0, 1])
    assert result.epochs == (0, 1) and result.steps == spec.steps_per_epoch
    for metric in ("train_loss", "test_mse", "trace_gn"):
        assert all(math.isfinite(v) for row in result.metrics[metric] for v in row), metric


@pytest.mark.parametrize("group", ["medium", "sweep-n"])
def test_medium_and_sweep_presets_run_at_full_size(group):
    """The first epoch of the group's experiments, at their real size."""
    from sharpgen.experiments import train

    specs = get_preset(group)
    if group == "sweep-n":  # the smallest and the largest training set
        specs = [s for s in specs if s.n in (min(x.n for x in specs), max(x.n for x in specs))]
    for spec in specs:
        result = train(spec, [0], stop_after_epochs=1)
        assert result.steps == spec.steps_per_epoch
        assert math.isfinite(result.metrics["train_loss"][0][-1])


def test_sweep_plot_and_table1_ignore_each_other(tmp_path):
    from sharpgen.experiments import plot_sweep, table1, train

    runs = [
        train(
            ExperimentSpec(
                f"sweep-n{n}-{arch.replace('_', '-')}",
                arch,
                "sam1",
                (Phase(2, 0.05, 0.05),),
                d=5,
                n=n,
                width=8,
                test_size=20,
            ),
            [0, 1],
        )
        for n in (8, 16)
        for arch in ("no_bias", "bias")
    ]
    assert table1(runs) == []
    path = plot_sweep(runs, tmp_path / "sweep.png")
    assert path is not None and path.stat().st_size > 5_000
    assert plot_sweep(runs[:0], tmp_path / "none.png") is None
    # a sweep-only report has no (empty) Table 1; one Table-1 run brings it back
    report = markdown_report(runs)
    assert "## Table 1" not in report and "Table 1," not in report
    assert "generalizes? |" not in report  # no Table 1 header row either
    assert "## Sample-complexity sweep" in report and "| 8 | 0.625 |" in report
    with_row = markdown_report([*runs, _result("no_bias", "sam1", [1.0, 1.0], [30, 31])])
    assert "## Table 1" in with_row and "Table 1," in with_row
    assert with_row.count("| 2-layer, no bias |") == 1
