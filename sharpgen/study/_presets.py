"""Ready-made studies (`STUDY_PRESETS`) on data that ships inside packages.

* ``quick``: 48 MLPs on scikit-learn's digits (width, learning rate, label noise, SGD vs SAM,
  three seeds), trained to cross-entropy 0.05; end to end with every measure in minutes on
  2 CPU cores.
* ``digits-large``: 288 MLPs on digits (width, depth, learning rate, batch size, weight decay,
  SGD vs SAM, two seeds).
* ``breast-cancer``: 96 MLPs on the breast-cancer set (width, learning rate, dropout, label
  noise, SGD vs SAM, two seeds).
* ``paper-two-layer``: the paper's two-layer ReLU nets (width 256) with and without bias on
  xor data (d = 30, n = 25, 50, 100; Wen, Li & Ma 2023), trained with batch size 1 by SGD
  and by 1-SAM with three radii, to training loss 0.01 (the squared loss of the paper). By
  the paper, the flattest interpolators generalize for the no-bias net (Thm 3.1) but not
  necessarily for the bias net (Thm 4.1): sharpness should rank generalization for one
  architecture and not the other. The models stop at the loss threshold, not at the
  flattest interpolators; the study reports what comes out.
"""

from __future__ import annotations

from sharpgen.study._spec import StopRule, StudySpec

__all__ = ["STUDY_PRESETS", "get_study"]

STUDY_PRESETS: dict[str, StudySpec] = {
    "quick": StudySpec(
        "quick",
        "digits",
        axes={
            "width": (32, 128),
            "lr": (0.05, 0.3),
            "label_noise": (0.0, 0.1),
            "optimizer": ("sgd", "sam"),
            "rho": (0.05,),
            "batch_size": (32,),
            "train_size": (400,),
        },
        seeds=(0, 1, 2),
        stop=StopRule("loss", 0.05, max_steps=4000),
        description="MLPs: width, lr, label noise, SGD vs SAM, 3 seeds (~2-5 min)",
    ),
    "digits-large": StudySpec(
        "digits-large",
        "digits",
        axes={
            "width": (32, 64, 128),
            "depth": (1, 2),
            "lr": (0.03, 0.1, 0.3),
            "batch_size": (32, 128),
            "weight_decay": (0.0, 5e-4),
            "optimizer": ("sgd", "sam"),
            "rho": (0.05,),
        },
        seeds=(0, 1),
        stop=StopRule("loss", 0.02, max_steps=8000),
        description="MLPs: width, depth, lr, batch size, weight decay, SGD vs SAM",
    ),
    "breast-cancer": StudySpec(
        "breast-cancer",
        "breast_cancer",
        axes={
            "width": (16, 64),
            "lr": (0.01, 0.1),
            "dropout": (0.0, 0.3),
            "label_noise": (0.0, 0.1),
            "optimizer": ("sgd", "sam"),
            "rho": (0.05, 0.2),
            "batch_size": (32,),
        },
        seeds=(0, 1),
        stop=StopRule("error", 0.0, max_steps=6000),
        description="MLPs: width, lr, dropout, label noise, SGD vs SAM rho",
    ),
    "paper-two-layer": StudySpec(
        "paper-two-layer",
        "xor",
        model="two_layer",
        axes={
            "bias": (False, True),
            "width": (256,),
            "train_size": (25, 50, 100),
            "optimizer": ("sgd", "sam"),
            "rho": (0.02, 0.05, 0.1),
            "lr": (0.01,),
            "batch_size": (1,),
        },
        seeds=(0, 1, 2),
        d=30,
        test_size=2000,
        stop=StopRule("loss", 0.01, max_steps=30_000),
        description="the paper's two-layer nets, bias vs no bias (xor, d=30): n, SGD vs SAM rho",
    ),
}


def get_study(name: str) -> StudySpec:
    """The preset study called ``name``.

    Raises:
        ValueError: For an unknown name (the message lists the presets).

    Examples:
        >>> get_study("quick").n_models()
        48
    """
    if name not in STUDY_PRESETS:
        raise ValueError(
            f"unknown study preset {name!r}; the presets are {', '.join(STUDY_PRESETS)} "
            "(sharpgen study --list describes them)."
        )
    return STUDY_PRESETS[name]
