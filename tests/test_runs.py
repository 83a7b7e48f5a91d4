"""The run folder under interruption: signals, resume, leftovers, lost rows, locks, divergence; a run
started from another's weights; a run tested with another head.

Every run here is MAML on sinusoids (no data needed, a fraction of a second a step), but the one a head
is swapped on: ProtoNet on a few Omniglot alphabets."""

from __future__ import annotations

import errno
import json
import os
import signal
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from sklearn.neighbors import NearestCentroid

from metashot import cli
from metashot import io as metashot_io
from metashot.config import Config
from metashot.errors import ConfigError, NonFiniteError, RunFolderError
from metashot.runs import RunFolder, evaluate_run, load_checkpoint, resume_config
from metashot.train import Trainer, train

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


@pytest.fixture(scope="module")
def start(whole: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint file to start runs from: the whole run's best weights, copied."""
    path = tmp_path_factory.mktemp("start") / "start.pt"
    path.write_bytes((whole / "best.pt").read_bytes())
    return path


@pytest.fixture(scope="module")
def started(start: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted run that started from ``start``."""
    run = tmp_path_factory.mktemp("started")
    Trainer(_cfg(init_from=str(start)), run, progress=False).fit()
    return run


def test_a_resume_takes_its_own_last_checkpoint_not_init_from(start: Path, started: Path,
                                                              tmp_path: Path) -> None:
    copy = tmp_path / "start.pt"
    copy.write_bytes(start.read_bytes())
    first = Trainer(_cfg(init_from=str(copy)), tmp_path / "run", progress=False)
    weights = load_checkpoint(start)["method"]
    assert all(torch.equal(v, weights[k]) for k, v in first.method.state_dict().items())
    _signal_at(first, 13, signal.SIGTERM)
    first.fit()
    copy.unlink()  # a resume never reads it
    Trainer(None, tmp_path / "run", resume=True, progress=False).fit()
    _assert_same_run(started, tmp_path / "run")
    assert Config.load(tmp_path / "run" / "config.json").init_from == str(copy)


def test_a_run_killed_before_its_first_checkpoint_starts_from_init_from_again(
    whole: Path, start: Path, started: Path, tmp_path: Path
) -> None:
    _cfg(init_from=str(start)).save(tmp_path / "config.json")
    Trainer(None, tmp_path, resume=True, progress=False).fit()
    _assert_same_run(started, tmp_path)
    ours, theirs = (load_checkpoint(p / "last.pt")["method"] for p in (tmp_path, whole))
    assert not all(torch.equal(ours[k], theirs[k]) for k in ours)  # not the run started from scratch


@pytest.fixture(scope="module")
def protonet_run(omniglot_small_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tested ten-step ProtoNet run (Conv4 of width 8) on a few Omniglot alphabets."""
    run = tmp_path_factory.mktemp("protonet")
    cfg = Config(method="protonet", method_args={"hidden": 8}, data_dir=str(omniglot_small_dir),
                 task_args={"split": "official", "val_characters": 6}, ways=5, shots=2, queries=3,
                 train_queries=2, steps=10, val_every=10, val_episodes=4, test_episodes=20)
    train(cfg, run, progress=False)
    return run


def _cl2n_by_hand(run: Path) -> float:
    """The mean accuracy of scikit-learn's nearest centroid on the test episodes' support-centred,
    L2-normalised features of the run's encoder (CL2N, Wang et al. 2019)."""
    cfg = Config.load(run / "config.json")
    source, method = RunFolder(run).method(cfg)
    method.eval()
    accs = []
    # NearestCentroid warns of features of zero spread (those ReLU leaves at 0), which its rule ignores
    with torch.no_grad(), warnings.catch_warnings(action="ignore", category=UserWarning):
        for episode in source.loader("test", cfg.test_episodes, seed=cfg.seed):
            support, query = method.embed(episode)
            for s, q, s_labels, q_labels in zip(support, query, episode.support_labels, episode.query_labels):
                mean = s.mean(0)
                s, q = F.normalize(s - mean, dim=-1), F.normalize(q - mean, dim=-1)
                found = NearestCentroid().fit(s.numpy(), s_labels.numpy()).predict(q.numpy())
                accs.append(float((found == q_labels.numpy()).mean()))
    return sum(accs) / len(accs)


def test_evaluate_with_another_head_writes_its_own_result(protonet_run: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    own = json.loads((protonet_run / "result.json").read_text())
    # the run's own head by name gives the run's own numbers
    assert json.loads(evaluate_run(protonet_run, head="prototype").to_json()) == own
    assert cli.main(["evaluate", str(protonet_run), "--head", "cl2n", "--no-progress"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].endswith("(95% CI, 20 episodes), with the cl2n head")
    cl2n = json.loads((protonet_run / "result-head-cl2n.json").read_text())
    assert json.loads((protonet_run / "result.json").read_text()) == own  # left as it was
    assert cl2n["stats"]["acc"][0] == pytest.approx(_cl2n_by_hand(protonet_run), abs=1e-6)
    assert cl2n["stats"]["loss"][0] != pytest.approx(own["stats"]["loss"][0], abs=1e-3)
    assert 0.2 < cl2n["mean"] <= 1 and 0.2 < own["mean"] <= 1  # above chance, 5-way
    cosine = evaluate_run(protonet_run, head="prototype", head_args={"distance": "cosine"}, shots=1)
    assert json.loads((protonet_run / "result-head-prototype-5w1s.json").read_text()) == json.loads(
        cosine.to_json())


def test_a_resume_may_move_the_data_to_the_device_but_not_change_the_recipe() -> None:
    saved = Config(method="protonet")
    assert resume_config(saved, {"data_on_device": True, "lr": saved.lr}).data_on_device
    with pytest.raises(ConfigError, match=r"it cannot change --lr \(only --steps, .*--data-on-device\)"):
        resume_config(saved, {"lr": 0.5})
