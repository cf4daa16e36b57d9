"""The paper's experiments: a fast batched 1-SAM / SGD trainer, presets, reports and plots.

Wen, Li & Ma (2023), "Sharpness Minimization Algorithms Do Not Only Minimize Sharpness To
Achieve Better Generalization", arXiv:2307.11007.
"""

from sharpgen.experiments._checkpoint import load_checkpoint, save_checkpoint
from sharpgen.experiments._measure import (
    ConstructionRow,
    constructions_table,
    measure_constructions,
)
from sharpgen.experiments._presets import PRESET_GROUPS, PRESETS, get_preset, preset_names
from sharpgen.experiments._report import (
    Table1Row,
    load_results,
    markdown_report,
    plot_results,
    plot_sweep,
    save_results,
    sweep_table,
    table1,
)
from sharpgen.experiments._runner import run_experiments
from sharpgen.experiments._spec import ExperimentSpec, Phase
from sharpgen.experiments._trainer import RunResult, lower_bound, make_runs, train

__all__ = [
    # specification
    "ExperimentSpec",
    "Phase",
    # training
    "train",
    "make_runs",
    "lower_bound",
    "RunResult",
    "run_experiments",
    # presets
    "PRESETS",
    "PRESET_GROUPS",
    "get_preset",
    "preset_names",
    # reports
    "table1",
    "Table1Row",
    "markdown_report",
    "plot_results",
    "plot_sweep",
    "sweep_table",
    "save_results",
    "load_results",
    # flattest constructions (sharpgen measure)
    "measure_constructions",
    "constructions_table",
    "ConstructionRow",
    # checkpoints
    "save_checkpoint",
    "load_checkpoint",
]
