"""Optional integrations: PyTorch Lightning, Hugging Face Transformers, TensorBoard, pandas.

Every name is imported lazily, on first access, from the module that needs its framework,
so ``import sharpgen`` and ``import sharpgen.integrations`` need none of them. Install what
you use with the extras ``sharpgen[lightning]``, ``sharpgen[hf]``, ``sharpgen[tensorboard]``,
``sharpgen[pandas]`` or all of them with ``sharpgen[integrations]``.

* Lightning (``lightning.pytorch``): `SharpnessMonitor`, a callback that measures on a
  schedule and logs through the trainer's loggers; `lightning_sam_step`, one SAM / GSAM step
  in a manual-optimization ``training_step`` (AMP-aware).
* Hugging Face Transformers: `SharpnessTrainerCallback`; `SAMTrainer`, a ``Trainer`` whose
  training step runs both SAM passes (gradient accumulation, clipping and AMP included).
* Tables and logs (pandas / TensorBoard / CSV): `history_to_dataframe`, `history_to_csv`,
  `log_history`, `results_to_dataframe`; `sharpgen.SharpnessTracker` has the shortcuts
  ``to_dataframe()``, ``to_csv(path)`` and ``log_to(writer)``.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "SharpnessMonitor": "sharpgen.integrations._lightning",
    "lightning_sam_step": "sharpgen.integrations._lightning",
    "SharpnessTrainerCallback": "sharpgen.integrations._huggingface",
    "SAMTrainer": "sharpgen.integrations._huggingface",
    "history_to_dataframe": "sharpgen.integrations._tables",
    "history_to_csv": "sharpgen.integrations._tables",
    "log_history": "sharpgen.integrations._tables",
    "results_to_dataframe": "sharpgen.integrations._tables",
}

__all__ = [
    # PyTorch Lightning
    "SharpnessMonitor",
    "lightning_sam_step",
    # Hugging Face Transformers
    "SharpnessTrainerCallback",
    "SAMTrainer",
    # tables and logs
    "history_to_dataframe",
    "history_to_csv",
    "log_history",
    "results_to_dataframe",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'sharpgen.integrations' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
