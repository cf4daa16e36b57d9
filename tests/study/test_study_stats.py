"""Rank statistics against scipy / sklearn and hand-computed cases; bootstrap coverage."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from scipy.stats import kendalltau
from sklearn.metrics import mutual_info_score

from sharpgen.study import (
    StudyTable,
    analyze,
    conditional_mutual_information,
    granulated_kendall,
    kendall_tau,
    sign_errors,
)


@pytest.mark.parametrize("seed", range(5))
def test_kendall_tau_equals_scipy_without_ties(seed):
    rng = np.random.default_rng(seed)
    x, y = rng.normal(size=30), rng.normal(size=30)
    y = y + 0.7 * x
    assert kendall_tau(x, y) == pytest.approx(kendalltau(x, y).statistic, abs=1e-12)


def test_kendall_tau_with_ties_and_resample_by_hand():
    # pairs (0,1) tie in x -> 0; (0,2) and (1,2) concordant: (0 + 1 + 1) / 3
    assert kendall_tau(np.array([1.0, 1.0, 2.0]), np.array([1.0, 2.0, 3.0])) == pytest.approx(2 / 3)
    x, y = np.array([1.0, 2.0, 3.0]), np.array([1.0, 3.0, 2.0])
    # resample [0, 0, 1, 2]: the two copies of model 0 are not a pair; the other 5 pairs are
    # (0,1) x2 concordant, (0,2) x2 concordant, (1,2) discordant
    assert kendall_tau(x, y, np.array([0, 0, 1, 2])) == pytest.approx((2 + 2 - 1) / 5)
    assert math.isnan(kendall_tau(x, y, np.array([1, 1, 1])))


def test_granulated_kendall_is_the_mean_of_scipy_taus_over_groups():
    rng = np.random.default_rng(0)
    grid = list(itertools.product(range(4), range(3)))  # axis 0: 4 values, axis 1: 3 values
    codes = np.array(grid)
    x, y = rng.normal(size=12), rng.normal(size=12)
    for axis in (0, 1):
        other = 1 - axis
        taus = []
        for v in np.unique(codes[:, other]):
            rows = codes[:, other] == v
            taus.append(kendalltau(x[rows], y[rows]).statistic)
        assert granulated_kendall(x, y, codes, axis) == pytest.approx(np.mean(taus), abs=1e-12)


def test_granulated_kendall_ignores_pairs_with_the_same_axis_value():
    # two seeds of each width in one group: pairs of equal width do not count
    codes = np.array([[0], [0], [1], [1]])
    x = np.array([1.0, 5.0, 2.0, 0.0])
    y = np.array([1.0, 0.0, 2.0, 3.0])
    pairs = [(0, 2), (0, 3), (1, 2), (1, 3)]
    truth = np.mean([np.sign(x[i] - x[j]) * np.sign(y[i] - y[j]) for i, j in pairs])
    assert granulated_kendall(x, y, codes, 0) == pytest.approx(truth)


def _pairs(x, y, codes, subset):
    vm, vg, u = [], [], []
    for i, j in itertools.permutations(range(len(x)), 2):
        if y[i] == y[j]:
            continue
        vm.append(int(np.sign(x[i] - x[j])))
        vg.append(int(np.sign(y[i] - y[j])))
        u.append(tuple(codes[i, list(subset)]) + tuple(codes[j, list(subset)]))
    return np.array(vm), np.array(vg), u


def _entropy(labels):
    _, counts = np.unique(labels, return_counts=True)
    p = counts / counts.sum()
    return float(-(p * np.log(p)).sum())


@pytest.mark.parametrize("subset", [(), (0,), (1,), (0, 1)])
def test_cmi_equals_sklearn_mutual_information_per_condition(subset):
    rng = np.random.default_rng(1)
    codes = np.array(list(itertools.product(range(3), range(2), range(2))))
    x = rng.integers(0, 4, size=len(codes)).astype(float)  # ties in the measure
    y = codes[:, 0] + rng.normal(size=len(codes))
    vm, vg, u = _pairs(x, y, codes, subset)
    keys = sorted(set(u))
    info = ent = 0.0
    for key in keys:
        rows = np.array([k == key for k in u])
        w = rows.mean()
        info += w * mutual_info_score(vg[rows], vm[rows])
        ent += w * _entropy(vg[rows])
    got = conditional_mutual_information(x, y, codes, subset)
    assert got == pytest.approx(info / ent, abs=1e-12)


def test_cmi_extremes():
    codes = np.array(list(itertools.product(range(3), range(3))))
    y = codes[:, 0] * 10 + codes[:, 1] + 0.0
    assert conditional_mutual_information(y, y, codes, (1,)) == pytest.approx(1.0)
    # a measure that only knows axis 0 tells nothing once axis 0 is conditioned on
    x = codes[:, 0].astype(float)
    assert conditional_mutual_information(x, y, codes, (0,)) == pytest.approx(0.0, abs=1e-12)
    assert conditional_mutual_information(x, y, codes, ()) > 0.3


def test_sign_errors_by_hand_with_seed_coupling_and_filter():
    # axes (lr, seed): lr in {0, 1}, seeds {0, 1}; coupled pairs (0, 1) and (2, 3)
    codes = np.array([[0, 0], [1, 0], [0, 1], [1, 1]])
    y = np.array([0.1, 0.3, 0.2, 0.25])
    x = np.array([1.0, 2.0, 5.0, 4.0])  # agrees on seed 0, disagrees on seed 1
    se = sign_errors(x, y, codes, seed_axis=1)
    assert se.values.tolist() == [0.5] and se.axes.tolist() == [0]
    se = sign_errors(x, y, codes, seed_axis=1, min_gap_diff=0.1)  # seed-1 pair is noise
    assert se.values.tolist() == [0.0]
    tie = sign_errors(np.array([1.0, 1.0, 5.0, 4.0]), y, codes, seed_axis=1)
    assert tie.values.tolist() == [0.75]  # (1/2 + 1) / 2
    # without a seed axis, settings differing in two axes are no environment
    two = sign_errors(x, y, codes)
    assert len(two.values) == 4 and set(two.axes.tolist()) == {0, 1}


def _table(gaps, measures, axes_values):
    rows = []
    for i, g in enumerate(gaps):
        row = {"name": f"m{i}", **axes_values[i], "gap": g}
        row.update({k: v[i] for k, v in measures.items()})
        rows.append(row)
    return StudyTable(tuple(rows), tuple(axes_values[0]), tuple(measures))


def test_analyze_perfect_and_reversed_measures():
    grid = list(itertools.product([8, 16, 32], [0.1, 0.01], [0, 1]))
    hp = [{"width": w, "lr": lr, "seed": s} for w, lr, s in grid]
    rng = np.random.default_rng(0)
    gap = rng.uniform(size=len(grid))
    noisy = gap + rng.normal(scale=0.2, size=len(grid))
    noisy[3] = np.nan
    table = _table(gap, {"good": gap, "bad": -gap, "noisy": noisy}, hp)
    res = analyze(table, generator=torch.Generator().manual_seed(0), n_boot=50)
    good, bad = res["good"], res["bad"]
    assert (good.tau, good.psi, good.cmi, good.sign_error_max) == (1.0, 1.0, 1.0, 0.0)
    assert (bad.tau, bad.psi, bad.sign_error_mean) == (-1.0, -1.0, 1.0)
    assert bad.cmi == pytest.approx(1.0)  # the reversed order is as informative
    assert set(good.granulated) == {"width", "lr"} and res.seed_axis == "seed"
    assert good.n_environments == 3 * 1 + 3 * 2  # width pairs per lr, lr pairs per width
    assert res["noisy"].n_models == len(grid) - 1
    lo, hi = res["noisy"].tau_ci
    assert lo <= res["noisy"].tau <= hi
    assert [s.name for s in res.ranking("tau")][-1] == "noisy"
    again = analyze(table, generator=torch.Generator().manual_seed(0), n_boot=50)
    assert again["noisy"].tau_ci == res["noisy"].tau_ci
    assert len(res.to_rows()) == 3


def test_tau_bootstrap_interval_covers_the_population_tau():
    # bivariate normal with correlation rho: population tau = 2/pi * arcsin(rho)
    rho, n, reps = 0.5, 40, 60
    truth = 2 / np.pi * np.arcsin(rho)
    rng = np.random.default_rng(123)
    hits = 0
    for r in range(reps):
        z = rng.multivariate_normal([0, 0], [[1, rho], [rho, 1]], size=n)
        table = _table(z[:, 1], {"m": z[:, 0]}, [{"k": i} for i in range(n)])
        res = analyze(table, axes=(), generator=torch.Generator().manual_seed(r), n_boot=200)
        lo, hi = res["m"].tau_ci
        hits += lo <= truth <= hi
    # nominal 95%: 57 of 60 expected; fewer than 51 has probability < 1e-3 if calibrated
    assert hits >= 51


def test_analyze_bad_input():
    table = _table([0.1, 0.2], {"m": [1.0, 2.0]}, [{"k": 0}, {"k": 1}])
    with pytest.raises(ValueError, match="target must be one of"):
        analyze(table, target="acc")
    with pytest.raises(ValueError, match="not axes"):
        analyze(table, axes=("depth",))
    with pytest.raises(ValueError, match="confidence"):
        analyze(table, confidence=1.0)
    with pytest.raises(TypeError, match="StudyTable"):
        analyze([1, 2])


def test_analyze_leaves_the_global_rng_alone_with_a_generator():
    table = _table([0.1, 0.3, 0.2, 0.4], {"m": [1.0, 2.0, 4.0, 3.0]}, [{"k": i} for i in range(4)])
    state = torch.get_rng_state()
    analyze(table, generator=torch.Generator().manual_seed(0), n_boot=20)
    assert torch.equal(torch.get_rng_state(), state)
