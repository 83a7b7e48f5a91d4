"""The run folder under interruption: signals, resume, leftovers, lost rows, locks, divergence.

Every run here is MAML on sinusoids (no data needed, a fraction of a second a step)."""

from __future__ import annotations

import errno
import os
import signal
from pathlib import Path

import pytest
import torch

from metashot import io as metashot_io
from metashot.config import Config
from metashot.errors import NonFiniteError, RunFolderError
from metashot.runs import RunFolder, load_checkpoint
from metashot.train import Trainer

TIME_COLUMNS = ("minutes",)


def _cfg(**kw: object) -> Config:
    base = dict(method="maml", task="sinusoid", ways=1, shots=5, queries=10, meta_batch=4, steps=30,
                val_every=10, val_episodes=8, test_episodes=8, schedule="constant",
                method_args={"inner_lr": 0.01, "inner_steps": 1, "test_inner_steps": 2},
                backbone_args={"hidden": 8})
    return Config(**{**base, **kw})


def _rows(state: dict) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIME_COLUMNS} for r in state["rows"]]


def _assert_same_run(a: Path, b: Path) -> None:
    """Bit for bit: weights, optimizer, RNG, step and metrics rows (but their wall-clock minutes)."""
    sa, sb = load_checkpoint(a / "last.pt"), load_checkpoint(b / "last.pt")
    assert sa["step"] == sb["step"]
    assert all(torch.equal(sa["method"][k], sb["method"][k]) for k in sa["method"])
    assert torch.equal(sa["rng"], sb["rng"])
    for pa, pb in zip(sa["optimizer"]["state"].values(), sb["optimizer"]["state"].values()):
        assert all(torch.equal(pa[k], pb[k]) for k in pa)
    assert _rows(sa) == _rows(sb) and len(sa["rows"]) == 3
    csv_a = [r.split(",") for r in (a / "metrics.csv").read_text().splitlines()]
    csv_b = [r.split(",") for r in (b / "metrics.csv").read_text().splitlines()]
    assert [r[:2] + r[3:] for r in csv_a] == [r[:2] + r[3:] for r in csv_b]  # column 2: minutes
    assert not list(b.glob(".*.tmp"))


@pytest.fixture(scope="module")
def whole(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("whole")
    Trainer(_cfg(), run, progress=False).fit()
    return run


def _signal_at(trainer: Trainer, step: int, signum: int) -> None:
    """Send ``signum`` to this process as training step ``step`` begins."""
    hook = trainer.method.on_step

    def on_step(s: int) -> None:
        if s == step:
            os.kill(os.getpid(), signum)
        hook(s)

    trainer.method.on_step = on_step


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_saves_at_once_and_resume_is_bit_for_bit(whole: Path, tmp_path: Path, signum: int) -> None:
    first = Trainer(_cfg(), tmp_path, progress=False)
    _signal_at(first, 13, signum)
    first.fit()
    assert first.stopped_by == signum and first.step == 14 and not first.finished
    state = load_checkpoint(tmp_path / "last.pt")
    assert state["step"] == 14 and [r["step"] for r in state["rows"]] == [10]  # saved without validating
    second = Trainer(None, tmp_path, resume=True, progress=False)
    second.fit()
    assert second.finished and second.stopped_by is None
    _assert_same_run(whole, tmp_path)


def test_a_signal_during_validation_stops_it_and_resume_validates_first(whole: Path, tmp_path: Path) -> None:
    first = Trainer(_cfg(), tmp_path, progress=False)
    validate = first.validate
    calls = []

    def interrupted_validate():  # noqa: ANN202
        calls.append(first.step)
        if first.step == 20:
            os.kill(os.getpid(), signal.SIGTERM)
        return validate()

    first.validate = interrupted_validate
    first.fit()
    assert calls == [10, 20] and first.step == 20 and first.stopped_by == signal.SIGTERM
    assert [r["step"] for r in load_checkpoint(tmp_path / "last.pt")["rows"]] == [10]
    Trainer(None, tmp_path, resume=True, progress=False).fit()
    _assert_same_run(whole, tmp_path)


def test_resume_rebuilds_lost_rows_and_removes_leftover_temporaries(whole: Path, tmp_path: Path) -> None:
    Trainer(_cfg(steps=20), tmp_path, progress=False).fit()
    # a kill after last.pt's rename and before metrics.csv's: the CSV lacks the last row
    lines = (tmp_path / "metrics.csv").read_text().splitlines()
    (tmp_path / "metrics.csv").write_text("\n".join(lines[:-1]) + "\n")
    for name in (".last.pt.x1.tmp", ".best.pt.x2.tmp", ".metrics.csv.x3.tmp"):
        (tmp_path / name).write_bytes(b"half-written")
    Trainer(_cfg(), tmp_path, resume=True, progress=False).fit()
    _assert_same_run(whole, tmp_path)


def test_resume_before_the_first_checkpoint_starts_afresh(whole: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    tmp_path.mkdir(exist_ok=True)
    _cfg().save(tmp_path / "config.json")  # killed before step 10's checkpoint
    Trainer(None, tmp_path, resume=True, progress=False).fit()
    assert "has no checkpoint yet; starting its training from step 0" in capsys.readouterr().err
    _assert_same_run(whole, tmp_path)


def test_a_resumed_finished_run_does_not_train_again(whole: Path, tmp_path: Path) -> None:
    Trainer(_cfg(), tmp_path, progress=False).fit()
    before = (tmp_path / "last.pt").stat().st_mtime_ns
    again = Trainer(None, tmp_path, resume=True, progress=False)
    again.fit()
    assert again.step == 30 and (tmp_path / "last.pt").stat().st_mtime_ns == before


def test_a_busy_run_folder_is_refused(tmp_path: Path) -> None:
    holder = RunFolder(tmp_path)
    holder.open(_cfg(), resume=False)
    try:
        with pytest.raises(RunFolderError, match=rf"{tmp_path} is in use by metashot pid {os.getpid()}"):
            Trainer(None, tmp_path, resume=True, progress=False).fit()
    finally:
        holder.close()
    Trainer(None, tmp_path, resume=True, progress=False).fit()  # free again once released


def test_run_folder_that_is_a_file_or_under_one(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("")
    with pytest.raises(RunFolderError, match="is a file, not a run folder"):
        Trainer(_cfg(), tmp_path / "f", progress=False).fit()
    with pytest.raises(RunFolderError, match="cannot write the run folder"):
        Trainer(_cfg(), tmp_path / "f" / "run", progress=False).fit()


def test_divergence_in_the_weights_is_caught_and_names_the_last_good_checkpoint(tmp_path: Path) -> None:
    trainer = Trainer(_cfg(), tmp_path, progress=False)
    trainer.method.register_buffer("stat", torch.zeros(3))  # overflows at step 12, the loss stays finite
    trainer.method.on_step = lambda step: step == 12 and trainer.method.stat.fill_(float("inf"))
    # checked every 25 steps and before every checkpoint: here at step 20
    msg = (rf"training diverged by step 20 of maml: 1 weight tensor\(s\) hold NaN or inf \(stat\); "
           rf"lower --lr \(now 0.001\) or check the data; the last good checkpoint is {tmp_path}/last.pt "
           rf"\(step 10\)")
    with pytest.raises(NonFiniteError, match=msg):
        trainer.fit()
    assert load_checkpoint(tmp_path / "last.pt")["step"] == 10


def test_a_save_that_fails_leaves_every_file_as_it_was(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    folder = RunFolder(tmp_path)
    folder.open(_cfg(), resume=False)
    try:
        folder.save({"step": 1, "rows": [], "method": {}}, best={"step": 1, "method": {}})
        before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
        real = metashot_io._write_temporary

        def full(path: Path, write: object) -> str:  # best.pt and last.pt are written, then the disk fills
            if path.name == "metrics.csv":
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real(path, write)

        monkeypatch.setattr(metashot_io, "_write_temporary", full)
        with pytest.raises(RunFolderError) as e:
            folder.save({"step": 2, "rows": [], "method": {}}, best={"step": 2, "method": {}})
    finally:
        folder.close()
    assert str(e.value) == (f"{tmp_path}: cannot write the checkpoint (No space left on device); nothing was "
                            f"half-written; the last checkpoint, {tmp_path / 'last.pt'}, is intact and "
                            "--resume continues from it")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    assert load_checkpoint(tmp_path / "last.pt")["step"] == 1
