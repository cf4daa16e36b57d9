r"""Studies: do sharpness and complexity measures rank many trained models by generalization?

A study is a list of `TrainedModel` records (trained by `sharpgen.study`'s runner or by the
user from their own checkpoints). `measure_models` computes every measure of `MEASURES`
(sharpgen's sharpness measures and the classical complexity measures of Jiang et al. 2020
and Dziugaite et al. 2020) on every model into a `StudyTable`. `run_study` trains the grid
of a `StudySpec` (or a preset of `STUDY_PRESETS`), the models of one architecture stacked
and trained together, then measures, analyses and reports them.

References:
    Jiang, Neyshabur, Mobahi, Krishnan & Bengio (2020), "Fantastic Generalization Measures
    and Where to Find Them", ICLR, arXiv:1912.02178.
    Dziugaite et al. (2020), "In Search of Robust Measures of Generalization", NeurIPS,
    arXiv:2010.11924.
    Andriushchenko, Croce, Müller, Hein & Flammarion (2023), "A Modern Look at the
    Relationship between Sharpness and Generalization", ICML, arXiv:2302.07011.
"""

from sharpgen.study._analysis import MeasureStats, StudyAnalysis, analyze
from sharpgen.study._measures import MEASURES, Measure, measure_models
from sharpgen.study._presets import STUDY_PRESETS, get_study
from sharpgen.study._record import METRICS, StudyTable, TrainedModel, evaluate
from sharpgen.study._report import write_report
from sharpgen.study._runner import StudyResult, run_study
from sharpgen.study._spec import HYPERPARAMETERS, StopRule, StudySpec
from sharpgen.study._stats import (
    SignErrors,
    conditional_mutual_information,
    granulated_kendall,
    kendall_tau,
    sign_errors,
)

__all__ = [
    # records
    "TrainedModel",
    "StudyTable",
    "METRICS",
    "evaluate",
    # measures
    "Measure",
    "MEASURES",
    "measure_models",
    # analysis
    "analyze",
    "StudyAnalysis",
    "MeasureStats",
    "write_report",
    # rank statistics (pure functions on arrays)
    "kendall_tau",
    "granulated_kendall",
    "conditional_mutual_information",
    "sign_errors",
    "SignErrors",
    # specifying and running a study
    "StudySpec",
    "StopRule",
    "HYPERPARAMETERS",
    "STUDY_PRESETS",
    "get_study",
    "run_study",
    "StudyResult",
]
