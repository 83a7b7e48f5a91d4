"""Where the metrics rows go besides the run folder: one :class:`Logger` per name in :data:`LOGGERS`.

``metrics.csv`` is the run folder's own (``csv``, always on): it is written with every checkpoint and
rebuilt from ``last.pt``'s rows, so no logger can lose or advance a row. A logger receives every row
after its checkpoint is saved, and is opened with the rows so far, so it can rebuild what a kill or an
earlier run without it left out. Another logger is a class taking ``(run_dir, rows)`` added to
:data:`LOGGERS`; a module it needs, named in its ``needs`` attribute, is checked before training.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol

from metashot.errors import ConfigError

Row = dict[str, Any]  # a metrics row: step, episodes, minutes, lr, train_loss, ... (numbers)
CSV = "csv"


class Logger(Protocol):
    def log(self, step: int, scalars: Mapping[str, float]) -> None:
        """The numbers of the metrics row of training step ``step``."""

    def close(self) -> None: ...


class TensorBoardLogger:
    """TensorBoard event files in ``RUN/tensorboard/``: every number of the rows, tagged by its column,
    and ``steps_per_s``, the training steps per second of training time since the previous row.

    Each opening writes a new event file holding every row so far, which starts with TensorBoard's
    purge marker at step 0 (readers drop what earlier files hold), then removes the earlier files: a
    resumed run shows each step once.
    """

    needs = ("torch.utils.tensorboard", 'pip install "metashot[tensorboard]"')

    def __init__(self, run_dir: str | Path, rows: list[Row]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        folder = Path(run_dir) / "tensorboard"
        earlier = list(folder.glob("events.out.tfevents.*"))
        self.writer = SummaryWriter(str(folder), purge_step=0)
        self.previous = (0, 0.0)  # (step, training minutes) of the previous row
        for row in rows:
            self.log(int(row["step"]), {k: v for k, v in row.items() if k != "step"})
        for path in earlier:
            path.unlink()

    def log(self, step: int, scalars: Mapping[str, float]) -> None:
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, float(value), step)
        minutes = float(scalars["minutes"])
        if minutes > self.previous[1]:
            steps_per_s = (step - self.previous[0]) / (60 * (minutes - self.previous[1]))
            self.writer.add_scalar("steps_per_s", steps_per_s, step)
        self.previous = (step, minutes)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


LOGGERS: dict[str, Callable[[Path, list[Row]], Logger]] = {"tensorboard": TensorBoardLogger}


def check(names: Iterable[str]) -> tuple[str, ...]:
    """The loggers ``names`` (``csv`` being the run folder's own), each known and its ``needs``
    importable, else a :class:`ConfigError`; returns the names of :data:`LOGGERS` among them."""
    chosen = tuple(dict.fromkeys(n for n in names if n != CSV))
    for name in chosen:
        if name not in LOGGERS:
            raise ConfigError(f"--log {name}: no such logger; choose from {', '.join([CSV, *LOGGERS])}")
        module, install = getattr(LOGGERS[name], "needs", (None, ""))
        if module is not None:
            try:
                importlib.import_module(module)
            except ImportError as e:
                raise ConfigError(f"--log {name} needs {module}, which does not import ({e}): "
                                  f"{install}") from None
    return chosen


class Loggers:
    """Several loggers as one."""

    def __init__(self, loggers: list[Logger]) -> None:
        self.loggers = loggers

    def log(self, step: int, scalars: Mapping[str, float]) -> None:
        for logger in self.loggers:
            logger.log(step, scalars)

    def close(self) -> None:
        for logger in self.loggers:
            logger.close()


def open_loggers(names: Iterable[str], run_dir: str | Path, rows: list[Row], writer: bool) -> Loggers:
    """The loggers ``names`` (checked by :func:`check`) on the run in ``run_dir`` with its ``rows`` so
    far; none where the process does not write the run (``writer``: rank 0 alone)."""
    return Loggers([LOGGERS[name](Path(run_dir), rows) for name in names] if writer else [])
