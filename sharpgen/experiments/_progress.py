"""Progress of `run_experiments`: bars on a terminal, plain lines in a log file.

On a terminal (the stream's ``isatty()``) every experiment gets a tqdm bar in epochs, as
before. Without one -- ``make demo > log``, a pipe, CI -- bars would write carriage returns
and cursor codes that interleave into an unreadable log, so each experiment instead prints one
plain line per finished phase (when it has more than one) and one when it is finished. tqdm
is optional: without it a terminal gets the plain lines too.
"""

from __future__ import annotations

import importlib.util
import sys
import time
from collections.abc import Sequence
from typing import Any, Literal, TextIO

from sharpgen.experiments._spec import ExperimentSpec
from sharpgen.experiments._trainer import RunResult

__all__ = ["Progress", "resolve_mode"]

ProgressMode = Literal["bars", "lines", "off"]


def resolve_mode(progress: bool | str, stream: TextIO) -> ProgressMode:
    """``"bars"``, ``"lines"`` or ``"off"`` for ``progress`` (True: bars only on a terminal).

    Examples:
        >>> import io
        >>> resolve_mode(True, io.StringIO()), resolve_mode(False, io.StringIO())
        ('lines', 'off')
    """
    if progress is False:
        return "off"
    if progress in ("bars", "lines", "off"):
        return progress
    if progress is not True:
        raise ValueError(
            f"progress={progress!r} must be True, False, 'bars', 'lines' or 'off'; True shows "
            "bars on a terminal and plain lines otherwise"
        )
    isatty = getattr(stream, "isatty", None)
    terminal = bool(isatty()) if callable(isatty) else False
    if terminal and importlib.util.find_spec("tqdm") is not None:
        return "bars"
    return "lines"


class Progress:
    """Progress of several experiments (the epochs of each, and when each finishes).

    Args:
        specs: The experiments, in the order of their bars.
        mode: ``"bars"`` (tqdm), ``"lines"`` (one plain line per finished phase and run) or
            ``"off"``.
        stream: Where to write (default ``sys.stderr``).
    """

    def __init__(
        self, specs: Sequence[ExperimentSpec], mode: ProgressMode, stream: TextIO | None = None
    ) -> None:
        self.mode = mode
        self.stream = sys.stderr if stream is None else stream
        self.specs = {spec.name: spec for spec in specs}
        self.epochs = dict.fromkeys(self.specs, 0)
        self.start = time.perf_counter()
        self.bars: dict[str, Any] = {}
        if mode == "bars":
            from tqdm.auto import tqdm

            for i, spec in enumerate(specs):
                self.bars[spec.name] = tqdm(
                    total=spec.epochs,
                    desc=spec.name,
                    unit="ep",
                    position=i,
                    leave=True,
                    file=self.stream,
                )

    def _line(self, text: str) -> None:
        self.stream.write(f"{text} [{time.perf_counter() - self.start:.1f} s]\n")
        self.stream.flush()

    def update(self, name: str, k: int) -> None:
        """``k`` more epochs of experiment ``name`` are done."""
        if self.mode == "bars":
            self.bars[name].update(k)
            return
        if self.mode == "off":
            return
        spec = self.specs[name]
        before, after = self.epochs[name], self.epochs[name] + k
        self.epochs[name] = after
        if len(spec.phases) < 2:
            return
        end = 0
        for i, phase in enumerate(spec.phases, start=1):
            end += phase.epochs
            if before < end <= after and i < len(spec.phases):  # the last: see `finished`
                self._line(
                    f"{name}: phase {i} of {len(spec.phases)} done (epoch {end} of "
                    f"{spec.epochs}, lr {phase.lr:g}"
                    + (f", rho {phase.rho:g})" if spec.method != "sgd" else ")")
                )

    def finished(self, result: RunResult) -> None:
        """Experiment ``result.spec.name`` is finished (or failed)."""
        if self.mode != "lines":
            return
        name, seeds = result.spec.name, len(result.seeds)
        if result.error is not None:
            self._line(f"{name}: FAILED ({result.error})")
        else:
            epochs = result.epochs[-1] if result.epochs else result.spec.epochs
            self._line(f"{name}: finished, {epochs} epochs x {seeds} seed(s)")

    def close(self) -> None:
        """Close the bars."""
        for bar in self.bars.values():
            bar.close()
