"""StudySpec, StopRule and the presets: the grid, and a clear error for every bad field."""

from __future__ import annotations

import pytest
import torch

from sharpgen.study._data import corrupt_labels, load_data, seeded, train_subset
from sharpgen.study._presets import STUDY_PRESETS, get_study
from sharpgen.study._spec import StopRule, StudySpec
from sharpgen.study._train import plan_stacks


def test_grid_is_the_product_with_sgd_ignoring_rho():
    spec = StudySpec(
        "s", "xor", d=4, seeds=(0, 1),
        axes={"width": (4, 8), "optimizer": ("sgd", "sam"), "rho": (0.05, 0.1), "train_size": (16,),
              "batch_size": (8,)},
    )  # fmt: skip
    grid = spec.grid()
    # width 2 x (sgd + sam x 2 rho) x 2 seeds
    assert len(grid) == 2 * 3 * 2 == spec.n_models()
    assert all(hp["rho"] == 0.0 for hp in grid if hp["optimizer"] == "sgd")
    assert {hp["rho"] for hp in grid if hp["optimizer"] == "sam"} == {0.05, 0.1}
    assert len({tuple(hp.items()) for hp in grid}) == len(grid)
    stacks = plan_stacks(spec, 4)
    assert [s.key for s in stacks] == [
        "w4-d1-bias-b8-n16-sgd",
        "w4-d1-bias-b8-n16-sam",
        "w8-d1-bias-b8-n16-sgd",
        "w8-d1-bias-b8-n16-sam",
    ]
    assert [len(s.indices) for s in stacks] == [2, 4, 2, 4]
    assert sorted(i for s in stacks for i in s.indices) == list(range(len(grid)))


BAD = [
    (dict(name="a b", data="xor"), ValueError, "name='a b' must be a non-empty string"),
    (dict(name="s", data="mnist"), ValueError, "unknown StudySpec data 'mnist'"),
    (dict(name="s", data="digits", model="cnn"), ValueError, "unknown StudySpec model 'cnn'"),
    (
        dict(name="s", data="digits", axes={"widht": (4,)}),
        ValueError,
        "unknown hyperparameter axis 'widht'",
    ),
    (
        dict(name="s", data="digits", axes={"width": 4}),
        TypeError,
        r"axes\['width'\] must be a tuple",
    ),
    (dict(name="s", data="digits", axes={"width": ()}), ValueError, r"axes\['width'\] is empty"),
    (
        dict(name="s", data="digits", axes={"width": (0,)}),
        ValueError,
        r"axes\['width'\] value must be an int >= 1",
    ),
    (
        dict(name="s", data="digits", axes={"lr": (-0.1,)}),
        ValueError,
        r"axes\['lr'\] value must be a finite number > 0",
    ),
    (
        dict(name="s", data="digits", axes={"dropout": (1.0,)}),
        ValueError,
        r"axes\['dropout'\] value must be in \[0, 1\)",
    ),
    (dict(name="s", data="digits", axes={"optimizer": ("adam",)}), ValueError, "unknown axes"),
    (dict(name="s", data="digits", axes={"bias": (1,)}), TypeError, "must be True or False"),
    (dict(name="s", data="digits", axes={"width": (4, 4)}), ValueError, "has duplicates"),
    (dict(name="s", data="digits", axes={"optimizer": ("sam",)}), ValueError, "rho=0 is plain SGD"),
    (dict(name="s", data="digits", seeds=()), ValueError, "seeds=\\(\\) must be a non-empty"),
    (dict(name="s", data="digits", seeds=(0, 0)), ValueError, "has duplicates"),
    (dict(name="s", data="digits", d=3), ValueError, "d and pool_size are fixed by data='digits'"),
    (dict(name="s", data="digits", test_size=1.5), ValueError, r"test_size must be in \(0, 1\)"),
    (dict(name="s", data="xor"), ValueError, "d is required for data='xor'"),
    (dict(name="s", data="xor", d=4), ValueError, "needs pool_size or an explicit train_size"),
    (
        dict(name="s", data="xor", d=4, pool_size=8, axes={"train_size": (16,)}),
        ValueError,
        "exceeds pool_size=8",
    ),
    (dict(name="s", data="digits", model="two_layer"), ValueError, "model='two_layer'.*needs data"),
    (
        dict(name="s", data="xor", d=4, pool_size=8, model="two_layer", axes={"depth": (2,)}),
        ValueError,
        "one hidden layer",
    ),
    (
        dict(name="s", data="digits", axes={"train_size": (16,), "batch_size": (32,)}),
        ValueError,
        "batch_size 32 exceeds train_size 16",
    ),
    (dict(name="s", data="digits", stop="loss"), TypeError, "stop must be a StopRule"),
    (dict(name="s", data="digits", dtype="float16"), ValueError, "unknown StudySpec dtype"),
]


@pytest.mark.parametrize(("kw", "exc", "match"), BAD)
def test_bad_spec_fields_are_named(kw, exc, match):
    with pytest.raises(exc, match=match):
        StudySpec(**kw)


@pytest.mark.parametrize(
    ("kw", "exc", "match"),
    [
        (dict(metric="acc"), ValueError, "unknown StopRule metric 'acc'"),
        (dict(metric="error", threshold=1.0), ValueError, "must be < 1"),
        (dict(threshold=-1.0), ValueError, "StopRule threshold must be a finite number >= 0"),
        (dict(max_steps=0), ValueError, "StopRule max_steps must be an int >= 1"),
        (dict(check_every=1.5), TypeError, "StopRule check_every must be an int"),
    ],
)
def test_bad_stop_rules_are_named(kw, exc, match):
    with pytest.raises(exc, match=match):
        StopRule(**kw)


def test_to_dict_round_trips_and_presets_are_valid():
    for name, spec in STUDY_PRESETS.items():
        assert StudySpec.from_dict(spec.to_dict()) == spec
        assert get_study(name) is spec
    assert get_study("quick").n_models() == 48
    assert 200 <= get_study("digits-large").n_models() <= 1000
    with pytest.raises(ValueError, match="unknown study preset 'nope'; the presets are quick"):
        get_study("nope")


def test_data_subsets_and_label_noise():
    spec = StudySpec("s", "digits", test_size=0.25)
    data = load_data(spec)
    assert data.X.shape[0] + data.X_test.shape[0] == 1797 and data.classes == 10
    assert abs(data.X_test.shape[0] - 449) <= 1
    torch.testing.assert_close(data.X.mean(0), torch.zeros(64), atol=1e-5, rtol=0)
    a = train_subset(data, 100, seeded("subset", 0, 1))
    assert torch.equal(a, train_subset(data, 100, seeded("subset", 0, 1)))  # seed fixes it
    assert len(set(a.tolist())) == 100
    y = data.y[a]
    noisy = corrupt_labels(y, 0.2, 10, seeded("noise", 0, 1))
    assert int((noisy != y).sum()) == 20  # exactly round(0.2 n) labels, each to another class
    xor = load_data(StudySpec("x", "xor", d=5, pool_size=40, test_size=30))
    assert xor.X.shape == (40, 5) and xor.X_test.shape == (30, 5) and xor.classes == 1
    flipped = corrupt_labels(xor.y, 0.25, 1, seeded("noise", 0, 0))
    assert int((flipped == -xor.y).sum()) == 10
