"""The trainer, evaluator and CLI end to end on real Omniglot; the trainer's progress, metrics rows and
stop signals on sinusoids."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch

from metashot import cli
from metashot.batches import TaskInfo
from metashot.config import Config
from metashot.distributed import World
from metashot.errors import CheckpointError, NonFiniteError, RunFolderError
from metashot.evaluate import evaluate, mean_ci
from metashot.methods import METHODS, build_method
from metashot.methods.base import Method
from metashot.process import Interrupted, StopSignals, uninterrupted
from metashot.progress import Progress
from metashot.runs import evaluate_run, load_checkpoint, save_checkpoint
from metashot.train import Trainer


def _cfg(data_dir: Path, **kw: object) -> Config:
    base = dict(method="protonet", data_dir=str(data_dir), ways=5, shots=1, queries=15,
                train_ways=20, train_queries=5, steps=40, val_every=20, val_episodes=20,
                test_episodes=50)
    return Config(**{**base, **kw})


def test_mean_ci_by_hand() -> None:
    mean, ci = mean_ci(torch.tensor([0.0, 1.0, 1.0, 1.0]))
    assert mean == 0.75
    assert ci == pytest.approx(1.96 * (0.1875**0.5) / 2)


@pytest.mark.slow
def test_short_training_lifts_accuracy_far_above_chance(omniglot_dir: Path, tmp_path: Path) -> None:
    trainer = Trainer(_cfg(omniglot_dir, steps=150, val_every=75, test_episodes=200), tmp_path,
                      progress=False)
    trainer.fit()
    result = trainer.test()
    # chance is 20%; a paper-protocol run reaches ~98%, 150 episodes must pass 85%
    assert result.mean >= 0.85, result.summary()
    assert result.episodes == 200
    saved = json.loads((tmp_path / "result.json").read_text())
    assert saved["mean"] == result.mean and saved["metric"] == "acc"
    rows = (tmp_path / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("step,episodes,minutes") and len(rows) == 3


@pytest.mark.slow
def test_resume_continues_exactly(omniglot_dir: Path, tmp_path: Path) -> None:
    whole = Trainer(_cfg(omniglot_dir), tmp_path / "whole", progress=False)
    whole.fit()
    first = Trainer(_cfg(omniglot_dir, steps=20), tmp_path / "split", progress=False)
    first.fit()
    with pytest.raises(RunFolderError, match="already holds a run; pass --resume"):
        Trainer(_cfg(omniglot_dir), tmp_path / "split").fit()
    second = Trainer(_cfg(omniglot_dir), tmp_path / "split", resume=True, progress=False)
    second.fit()
    assert second.step == 40
    a, b = whole.method.state_dict(), second.method.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert len((tmp_path / "split" / "metrics.csv").read_text().splitlines()) == 3
    # checkpoints hold plain data: they load with weights_only
    state = load_checkpoint(tmp_path / "split" / "last.pt")
    assert state["step"] == 40 and set(state) >= {"method", "optimizer", "scheduler"}
    assert not list((tmp_path / "split").glob(".*.tmp"))


def test_unreadable_checkpoint(tmp_path: Path) -> None:
    (tmp_path / "last.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="last.pt: truncated, corrupt or not a metashot checkpoint"):
        load_checkpoint(tmp_path / "last.pt")


class _Diverges(Method):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))

    def loss(self, batch: object) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss = self.w * float("nan")
        return loss, {"acc": torch.zeros(1)}


def test_nan_loss_stops_with_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(METHODS, "diverges", _Diverges)
    cfg = Config(method="diverges", task="sinusoid", ways=1, shots=5, queries=5, steps=40, val_every=20)
    trainer = Trainer(cfg, tmp_path, progress=False)
    msg = (r"training diverged by step 20 of diverges: the training loss is nan and 1 weight tensor\(s\) "
           r"hold NaN or inf \(w\); lower --lr \(now 0.001\) or check the data; "
           r"no checkpoint was saved before it")
    with pytest.raises(NonFiniteError, match=msg):
        trainer.fit()


@pytest.mark.slow
def test_cli_train_then_evaluate(omniglot_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "run"
    code = cli.main(["train", "protonet", "--data-dir", str(omniglot_dir), "--max-episodes", "30",
                     "--train-ways", "20", "--val-every", "15", "--test-episodes", "40",
                     "--run-dir", str(run), "--no-progress", "--json",
                     "--set", "val_episodes=10"])
    assert code == 0
    trained = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert trained["episodes"] == 40 and 0.2 < trained["mean"] <= 1.0
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["preset"] == "protonet-omniglot-5w1s" and cfg["train_ways"] == 20 and cfg["steps"] == 30

    cli.main(["evaluate", str(run), "--test-episodes", "40", "--no-progress"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    mean, ci = 100 * trained["mean"], 100 * trained["ci95"]
    assert last == f"test acc: {mean:.2f}% +- {ci:.2f}% (95% CI, 40 episodes)"

    result = evaluate_run(run, episodes=30, ways=20)
    assert result.episodes == 30 and (run / "result-20w1s.json").exists()

    png = tmp_path / "curves.png"
    assert cli.main(["plot", str(run), "--out", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_set_updates_the_presets_method_args() -> None:
    args = cli.parser().parse_args(["train", "matching", "--set", 'method_args={"fce": true}',
                                    "--set", "lr=0.01"])
    cfg = cli.config_from_args(args)
    assert cfg.method_args == {"fce": True, "scale": 20.0} and cfg.lr == 0.01
    args = cli.parser().parse_args(["train", "matching", "--set", 'method_args={"scale": 1}'])
    assert cli.config_from_args(args).method_args == {"fce": False, "scale": 1}


def _sine(**kw: object) -> Config:
    base = dict(method="maml", task="sinusoid", ways=1, shots=5, queries=10, meta_batch=4, steps=30,
                val_every=10, val_episodes=8, test_episodes=8, schedule="cosine",
                method_args={"inner_lr": 0.01, "inner_steps": 1}, backbone_args={"hidden": 8})
    return Config(**{**base, **kw})


def _csv_but_minutes(run: Path) -> list[list[str]]:
    return [r.split(",")[:2] + r.split(",")[3:] for r in (run / "metrics.csv").read_text().splitlines()]


def _old_row(row: dict) -> dict:
    """A metrics row as checkpoints kept it before rows held numbers."""
    return {"step": row["step"], "episodes": row["episodes"], "minutes": f"{row['minutes']:.3f}",
            "lr": f"{row['lr']:.3g}", **{k: f"{row[k]:.5f}" for k in ("train_loss", "train_metric",
                                                                      "val_metric", "val_ci95")}}


def _but_minutes(rows: list[dict]) -> list[dict]:
    """Rows without their wall-clock minutes, which differ between any two runs."""
    return [{k: v for k, v in r.items() if k != "minutes"} for r in rows]


def test_rows_hold_numbers_and_a_checkpoint_of_string_rows_resumes_to_the_same_csv(tmp_path: Path) -> None:
    Trainer(_sine(), tmp_path / "whole", progress=False).fit()
    rows = load_checkpoint(tmp_path / "whole" / "last.pt")["rows"]
    assert all(type(v) is (int if k in ("step", "episodes") else float) for r in rows for k, v in r.items())
    lines = (tmp_path / "whole" / "metrics.csv").read_text().splitlines()
    assert lines[0] == "step,episodes,minutes,lr,train_loss,train_metric,val_metric,val_ci95"
    assert lines[1:] == [",".join(str(v) for v in _old_row(r).values()) for r in rows]

    first = Trainer(_sine(), tmp_path / "old", progress=False)
    hook = first.method.on_step
    first.method.on_step = lambda s: (s == 13 and os.kill(os.getpid(), signal.SIGTERM)) or hook(s)
    first.fit()
    state = load_checkpoint(tmp_path / "old" / "last.pt")
    assert state["step"] == 14 and state["since"] == 4 and state["sums"].shape == (1, 2)
    # the checkpoint as the trainer saved it before: string rows, one process's sums as a vector
    save_checkpoint(tmp_path / "old" / "last.pt",
                    {**state, "rows": [_old_row(r) for r in state["rows"]], "sums": state["sums"][0]})
    Trainer(None, tmp_path / "old", resume=True, progress=False).fit()
    resumed = load_checkpoint(tmp_path / "old" / "last.pt")["rows"]
    assert isinstance(resumed[0]["minutes"], str)  # the old row is kept as it was saved
    assert _but_minutes(resumed[:1]) == _but_minutes([_old_row(rows[0])])
    assert _but_minutes(resumed[1:]) == _but_minutes(rows[1:])
    assert _csv_but_minutes(tmp_path / "old") == _csv_but_minutes(tmp_path / "whole")


def test_progress_restores_each_ranks_own_sums() -> None:
    state = {"step": 14, "elapsed": 2.5, "since": 4, "best": 0.5, "rows": [],
             "sums": torch.tensor([[1.0, 2.0], [3.0, 6.0]])}
    for rank in (0, 1):
        p = Progress.load(state, World(rank, 2), torch.device("cpu"))
        assert torch.equal(p.own_sums, state["sums"][rank]) and p.step == 14 and p.since == 4
        saved = p.state()
        assert torch.equal(saved.pop("sums"), state["sums"])
        assert saved == {k: v for k, v in state.items() if k != "sums"}
    # another number of processes: every one takes the mean, so the rows' mean over ranks is kept
    assert torch.equal(Progress.load(state, World(), torch.device("cpu")).own_sums, torch.tensor([2.0, 4.0]))
    old = {**state, "sums": torch.tensor([1.0, 2.0])}  # rank 0's alone
    assert torch.equal(Progress.load(old, World(1, 2), torch.device("cpu")).own_sums, old["sums"])


def test_stop_signals_keep_one_within_a_step_and_raise_outside() -> None:
    before = signal.getsignal(signal.SIGTERM)
    signals = StopSignals()
    with signals:
        signals.in_step = True
        os.kill(os.getpid(), signal.SIGTERM)
        assert signals.pending == signal.SIGTERM
        with pytest.raises(Interrupted) as second:
            os.kill(os.getpid(), signal.SIGINT)
        assert second.value.signum == signal.SIGINT and not second.value.between_steps
    with signals:
        assert signals.pending is None
        with pytest.raises(Interrupted) as outside:
            os.kill(os.getpid(), signal.SIGTERM)
        assert outside.value.signum == signal.SIGTERM and outside.value.between_steps
    assert signal.getsignal(signal.SIGTERM) is before


def test_uninterrupted_holds_a_signal_to_its_end_and_keeps_a_step_signal() -> None:
    signals = StopSignals()
    with signals, pytest.raises(Interrupted) as held:
        with uninterrupted():
            os.kill(os.getpid(), signal.SIGTERM)
            reached = True  # the handler did not raise inside the block
    assert reached and held.value.signum == signal.SIGTERM and held.value.between_steps
    with signals:
        signals.pending = signal.SIGINT  # a training step's signal, which its checkpoint acts on
        with uninterrupted():
            pass
        assert signals.pending == signal.SIGINT and not signals.in_step
    with uninterrupted():  # no handlers installed: nothing to hold
        pass
    with signals:
        with StopSignals():  # a trainer's inside the command's
            pass
        assert StopSignals.active is signals  # the command's episodes are held again
    assert StopSignals.active is None


def test_a_signal_during_an_evaluation_episode_stops_at_its_end(tmp_path: Path) -> None:
    trainer = Trainer(_sine(), tmp_path / "run", progress=False)
    ends: list[int] = []
    episode = trainer.method.evaluate

    def signalled(batch: object) -> dict[str, torch.Tensor]:
        os.kill(os.getpid(), signal.SIGTERM)
        out = episode(batch)  # torch.func runs whole after the signal
        ends.append(len(ends))
        return out

    trainer.method.evaluate = signalled
    with StopSignals(), pytest.raises(Interrupted) as stop:
        evaluate(trainer.method, trainer.source.loader("val", 5, seed=0, kind="episodes"))
    assert ends == [0] and stop.value.signum == signal.SIGTERM


def test_a_submodule_with_an_lr_scale_gets_its_share_of_the_rate(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, method="r2d2", lr=0.5)
    method = build_method(cfg, TaskInfo((1, 28, 28), 5, 20))
    method.encoder.lr_scale = 0.1
    groups = method.param_groups(cfg.lr)
    assert [id(p) for p in groups[0]["params"]] == [id(p) for p in method.head.parameters()]
    assert [id(p) for p in groups[1]["params"]] == [id(p) for p in method.encoder.parameters()]
    optimizer = cfg.make_optimizer(groups)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.5, 0.05])
