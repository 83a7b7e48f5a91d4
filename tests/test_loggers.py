"""The loggers of the metrics rows: TensorBoard read back with TensorBoard's own reader equals the rows,
a resumed run shows each step once, a new logger needs only a registry entry, and a missing package or
an unknown name is a one-line error. Every run is MAML on sinusoids (no data needed)."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Mapping
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from metashot import cli, loggers
from metashot.config import Config
from metashot.errors import ConfigError
from metashot.runs import CSV_FIELDS, load_checkpoint
from metashot.train import Trainer

SCALARS = [f for f in CSV_FIELDS if f != "step"]


def _cfg(**kw: object) -> Config:
    base = dict(method="maml", task="sinusoid", ways=1, shots=5, queries=10, meta_batch=4, steps=30,
                val_every=10, val_episodes=8, test_episodes=8, schedule="cosine",
                method_args={"inner_lr": 0.01, "inner_steps": 1}, backbone_args={"hidden": 8})
    return Config(**{**base, **kw})


def _rows(run: Path) -> list[dict]:
    return load_checkpoint(run / "last.pt")["rows"]


def _events(run: Path) -> EventAccumulator:
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    return events


def _f32(value: float) -> float:
    return torch.tensor(float(value), dtype=torch.float32).item()


def _assert_tensorboard_is_the_rows(run: Path) -> None:
    rows, events = _rows(run), _events(run)
    assert sorted(events.Tags()["scalars"]) == sorted([*SCALARS, "steps_per_s"])
    for tag in SCALARS:
        logged = events.Scalars(tag)
        assert [e.step for e in logged] == [r["step"] for r in rows], tag
        assert [e.value for e in logged] == [_f32(r[tag]) for r in rows], tag
    previous = [{"step": 0, "minutes": 0.0}, *rows[:-1]]
    speeds = [(r["step"] - p["step"]) / (60 * (r["minutes"] - p["minutes"])) for r, p in zip(rows, previous)]
    logged = events.Scalars("steps_per_s")
    assert [e.step for e in logged] == [r["step"] for r in rows]
    assert [e.value for e in logged] == pytest.approx(speeds, rel=1e-6)


def test_tensorboard_holds_the_metrics_rows_lr_and_steps_per_second(tmp_path: Path) -> None:
    Trainer(_cfg(), tmp_path, progress=False, log=["csv", "tensorboard"]).fit()
    assert [r["step"] for r in _rows(tmp_path)] == [10, 20, 30]
    assert len({r["lr"] for r in _rows(tmp_path)}) == 3  # the cosine schedule: three learning rates
    _assert_tensorboard_is_the_rows(tmp_path)
    assert (tmp_path / "metrics.csv").read_text().count("\n") == 4


def test_a_resumed_run_shows_each_step_once(tmp_path: Path) -> None:
    """Stopped by SIGTERM at step 14, then resumed: the new event file holds every row and the
    earlier one is gone, so no step appears twice."""
    first = Trainer(_cfg(), tmp_path, progress=False, log=["tensorboard"])
    hook = first.method.on_step
    first.method.on_step = lambda s: (s == 13 and os.kill(os.getpid(), signal.SIGTERM)) or hook(s)
    first.fit()
    assert first.step == 14 and [e.step for e in _events(tmp_path).Scalars("val_metric")] == [10]
    Trainer(None, tmp_path, resume=True, progress=False, log=["tensorboard"]).fit()
    assert len(list((tmp_path / "tensorboard").iterdir())) == 1
    _assert_tensorboard_is_the_rows(tmp_path)


def test_tensorboard_taken_up_on_resume_holds_the_earlier_rows(tmp_path: Path) -> None:
    Trainer(_cfg(steps=20), tmp_path, progress=False).fit()
    assert not (tmp_path / "tensorboard").exists()
    Trainer(_cfg(), tmp_path, resume=True, progress=False, log=["csv", "tensorboard"]).fit()
    _assert_tensorboard_is_the_rows(tmp_path)


class _Memory:
    """A logger added by a registry entry alone."""

    opened: list[tuple[Path, list[dict]]] = []
    logged: list[tuple[int, dict]] = []

    def __init__(self, run_dir: Path, rows: list[dict]) -> None:
        _Memory.opened.append((run_dir, list(rows)))

    def log(self, step: int, scalars: Mapping[str, float]) -> None:
        _Memory.logged.append((step, dict(scalars)))

    def close(self) -> None:
        _Memory.logged.append((-1, {}))


def test_a_registered_logger_gets_every_row_and_the_rows_so_far(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(loggers.LOGGERS, "memory", _Memory)
    monkeypatch.setattr(_Memory, "opened", [])
    monkeypatch.setattr(_Memory, "logged", [])
    Trainer(_cfg(steps=20), tmp_path, progress=False, log=["memory"]).fit()
    Trainer(_cfg(), tmp_path, resume=True, progress=False, log=["memory"]).fit()
    rows = _rows(tmp_path)
    assert _Memory.opened == [(tmp_path, []), (tmp_path, rows[:2])]
    assert _Memory.logged == [(r["step"], {k: r[k] for k in SCALARS}) for r in rows[:2]] + [(-1, {})] + [
        (rows[2]["step"], {k: rows[2][k] for k in SCALARS}), (-1, {})]


def test_only_the_writing_process_opens_loggers(tmp_path: Path) -> None:
    assert loggers.open_loggers(["tensorboard"], tmp_path, [], writer=False).loggers == []
    assert not (tmp_path / "tensorboard").exists()
    assert len(loggers.open_loggers(["tensorboard"], tmp_path, [], writer=True).loggers) == 1


def test_csv_is_the_run_folders_own(tmp_path: Path) -> None:
    assert loggers.check(["csv"]) == ()
    assert loggers.check(["tensorboard", "csv", "tensorboard"]) == ("tensorboard",)


def _error(argv: list[str], capsys: pytest.CaptureFixture) -> str:
    code = cli.main(argv)
    out, err = capsys.readouterr()
    assert code == 2 and out == "" and err.count("\n") == 1 and "Traceback" not in err, (code, out, err)
    return err.strip()


def test_an_unknown_logger_is_a_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    err = _error(["train", "maml", "--task", "sinusoid", "--no-progress", "--log", "csv,wandb",
                  "--run-dir", str(tmp_path / "run")], capsys)
    assert err == "metashot: error: --log wandb: no such logger; choose from csv, tensorboard"
    assert not (tmp_path / "run").exists()


def test_a_missing_tensorboard_is_a_one_line_error_before_training(
        tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    err = _error(["train", "maml", "--task", "sinusoid", "--no-progress", "--log", "tensorboard",
                  "--run-dir", str(tmp_path / "run")], capsys)
    assert err.startswith("metashot: error: --log tensorboard needs torch.utils.tensorboard, which does "
                          "not import (")
    assert err.endswith('): pip install "metashot[tensorboard]"')
    assert not (tmp_path / "run").exists()
    with pytest.raises(ConfigError, match="--log tensorboard needs torch.utils.tensorboard"):
        Trainer(_cfg(), tmp_path / "run", log=["tensorboard"])
