"""The command line on a user's mistakes: one line ``metashot: error: ...``, exit status 2, no traceback,
nothing written; and its help. Runs anywhere (a small image folder and sinusoids, no Omniglot)."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import zipfile
from pathlib import Path

import pytest
import torch

from metashot import cli
from metashot.config import Config
from metashot.runs import load_checkpoint, save_checkpoint
from metashot.train import Trainer


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """10 classes of 6 small greyscale images."""
    from PIL import Image

    root = tmp_path_factory.mktemp("images")
    for c in range(10):
        (root / f"class{c}").mkdir()
        for i in range(6):
            Image.new("L", (8, 8), 20 * c + i).save(root / f"class{c}" / f"{i}.png")
    return root


SINE = ["train", "maml", "--task", "sinusoid", "--no-progress"]


def _error(argv: list[str], capsys: pytest.CaptureFixture) -> str:
    try:
        code = cli.main(argv)
    except SystemExit as e:  # argparse's own errors exit
        code = e.code
    out, err = capsys.readouterr()
    assert code == 2, (out, err)
    assert err.count("\n") == 1 and err.startswith("metashot: error: "), err
    assert "Traceback" not in err and out == ""
    return err.strip()


@pytest.mark.parametrize(("args", "message"), [
    (["--ways", "0"], "--ways must be at least 1, got 0"),
    (["--shots", "0"], "--shots must be at least 1, got 0"),
    (["--queries", "-1"], "--queries must be at least 0, got -1"),
    (["--steps", "0"], "--steps must be at least 1, got 0"),
    (["--max-episodes", "-5"], "--steps must be at least 1, got -5"),
    (["--max-minutes", "-1"], "--max-minutes must be a positive number of minutes, got -1.0"),
    (["--val-every", "0"], "--val-every must be at least 1, got 0"),
    (["--test-episodes", "0"], "--test-episodes must be at least 1, got 0"),
    (["--meta-batch", "0"], "--meta-batch must be at least 1, got 0"),
    (["--lr", "-0.1"], "--lr must be a positive finite number, got -0.1"),
    (["--lr", "inf"], "--lr must be a positive finite number, got inf"),
    (["--lr", "nan"], "--lr must be a positive finite number, got nan"),
    (["--preset", "nope"], "unknown preset 'nope'; known: "),
    (["--preset", "protonet-omniglot-5w1s"], "preset 'protonet-omniglot-5w1s' is for protonet, not maml"),
    (["--device", "cuda:7"], "--device cuda:7: this machine has"),
    (["--device", "toaster"], "--device 'toaster' is not a device; expected cpu, cuda, cuda:N or mps"),
    (["--set", "lr=fast"], "--set lr=fast: 'fast' is not JSON"),
    (["--set", "bogus=1"], "--set bogus=1: expected KEY=JSON with KEY a config field"),
    (["--set", "lr"], "--set lr: expected KEY=JSON"),
    (["--set", 'ways="five"'], '--set: ways must be an integer, got "five"'),
    (["--set", "method_args=5"], "--set: method_args must be a JSON object, got 5"),
    (["--set", "schedule=sometimes"],
     "schedule must be one of step, multistep, cosine, constant, got 'sometimes'"),
    (["--set", 'method_args={"bogus": 1}'], "method_args: unknown key 'bogus' for maml; known: adapt_norm, "),
    (["--ways", "x"], "argument --ways: invalid int value: 'x'"),
])
def test_bad_options_are_one_line_errors(args: list[str], message: str, tmp_path: Path,
                                         capsys: pytest.CaptureFixture) -> None:
    err = _error([*SINE, "--run-dir", str(tmp_path / "run"), *args], capsys)
    assert message in err, err
    assert not (tmp_path / "run").exists()  # checked before anything is written


@pytest.mark.parametrize(("args", "message"), [
    (["--ways", "11"], "folder, val classes: 11-way episodes need 11 classes"),
    (["--ways", "2", "--shots", "4", "--queries", "3"], "folder, val classes: shots + queries = 4 + 3 = 7"),
    (["--set", 'task_args={"bogus": 1}'],
     "task_args: unknown key 'bogus' for folder; known: channels, fractions, image_size, small_classes"),
])
def test_episode_shapes_are_checked_against_the_data_before_training(
    args: list[str], message: str, folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    argv = ["train", "protonet", "--task", "folder", "--data-dir", str(folder), "--no-progress",
            "--run-dir", str(tmp_path / "run"), "--train-ways", "2", "--ways", "2", "--queries", "1",
            "--set", "train_queries=1", *args]
    err = _error(argv, capsys)
    assert message in err, err
    assert not (tmp_path / "run").exists()


def test_evaluate_options(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert "--ways must be at least 1, got 0" in _error(["evaluate", str(tmp_path), "--ways", "0"], capsys)
    assert "--test-episodes must be at least 1, got 0" in _error(
        ["evaluate", str(tmp_path), "--test-episodes", "0"], capsys)
    assert f"{tmp_path / 'nope'}: no such run folder" in _error(["evaluate", str(tmp_path / "nope")], capsys)
    assert f"{tmp_path / 'nope'}: no such run folder" in _error(
        [*SINE, "--resume", "--run-dir", str(tmp_path / "nope")], capsys)


@pytest.fixture()
def run(tmp_path: Path) -> Path:
    """A short finished sinusoid run."""
    run = tmp_path / "run"
    code = cli.main([*SINE, "--run-dir", str(run), "--max-episodes", "4", "--val-every", "2",
                     "--test-episodes", "5", "--set", "val_episodes=5"])
    assert code == 0
    return run


@pytest.mark.parametrize(("damage", "message"), [
    (lambda p: p.write_bytes(b""), "best.pt: empty file (0 bytes), not a checkpoint"),
    (lambda p: p.write_bytes(p.read_bytes()[:100]), "best.pt: truncated, corrupt or not a metashot"),
    (lambda p: p.write_bytes(b"garbage" * 10), "best.pt: truncated, corrupt or not a metashot checkpoint"),
    (lambda p: save_checkpoint(p, {"weights": torch.zeros(2)}), "best.pt: not a metashot checkpoint"),
])
def test_damaged_checkpoints(run: Path, damage: object, message: str, capsys: pytest.CaptureFixture) -> None:
    capsys.readouterr()
    damage(run / "best.pt")
    assert message in _error(["evaluate", str(run), "--no-progress"], capsys)


@pytest.mark.parametrize(("edit", "message"), [
    (lambda d: "{not json", "config.json: not valid JSON"),
    (lambda d: json.dumps({**d, "ways": "five"}), 'config.json: ways must be an integer, got "five"'),
    (lambda d: json.dumps({k: v for k, v in d.items() if k != "shots"}), "missing config fields ['shots']"),
    (lambda d: json.dumps({**d, "color": 1}), "config.json: unknown config fields ['color']"),
    (lambda d: json.dumps([1]), "config.json: expected a JSON object of config fields, got list"),
])
def test_damaged_config(run: Path, edit: object, message: str, capsys: pytest.CaptureFixture) -> None:
    capsys.readouterr()
    path = run / "config.json"
    path.write_text(edit(json.loads(path.read_text())))
    assert message in _error(["evaluate", str(run), "--no-progress"], capsys)
    assert message in _error([*SINE, "--resume", "--run-dir", str(run)], capsys)


def test_resume_keeps_the_runs_recipe(run: Path, capsys: pytest.CaptureFixture) -> None:
    capsys.readouterr()
    before = (run / "last.pt").stat().st_mtime_ns
    # a finished 4-step run resumed without options stays at 4 steps (not the preset's 70,000)
    assert cli.main([*SINE, "--resume", "--run-dir", str(run), "--json"]) == 0
    assert (run / "last.pt").stat().st_mtime_ns == before
    capsys.readouterr()
    assert Config.load(run / "config.json").steps == 4
    err = _error([*SINE, "--resume", "--run-dir", str(run), "--lr", "0.1"], capsys)
    assert "--resume continues the run as configured; it cannot change --lr (only --steps" in err
    assert cli.main([*SINE, "--resume", "--run-dir", str(run), "--max-episodes", "6", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["episodes"] == 5
    # the run's own preset may be repeated (torchrun restarts a group with its first command line)
    assert cli.main([*SINE, "--resume", "--run-dir", str(run), "--preset", "maml-sinusoid", "--json"]) == 0
    capsys.readouterr()
    err = _error([*SINE, "--resume", "--run-dir", str(run), "--preset", "maml-omniglot-5w1s"], capsys)
    assert "--resume continues the run's own recipe (maml-sinusoid); drop --preset" in err


def test_run_folder_taken_or_a_file(run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    capsys.readouterr()
    assert "already holds a run; pass --resume" in _error([*SINE, "--run-dir", str(run)], capsys)
    (tmp_path / "file").write_text("")
    assert "is a file, not a run folder" in _error([*SINE, "--run-dir", str(tmp_path / "file")], capsys)


def test_data_errors(tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr("urllib.request.urlopen", offline)
    base = ["train", "protonet", "--no-progress", "--run-dir", str(tmp_path / "run"), "--data-dir"]
    err = _error([*base, str(tmp_path / "empty")], capsys)
    assert "could not download" in err and "images_background.zip and images_evaluation.zip" in err
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in ("images_background", "images_evaluation"):
        with zipfile.ZipFile(bad / f"{name}.zip", "w") as z:
            z.writestr(f"{name}/readme.txt", "x")
    assert "unexpected member 'images_background/readme.txt'" in _error([*base, str(bad)], capsys)
    (bad / "images_background.zip").write_bytes(b"PK\x03\x04 cut short")
    assert "images_background.zip: corrupt or truncated zip" in _error([*base, str(bad)], capsys)


def test_help_states_each_default_once() -> None:
    out = subprocess.run([sys.executable, "-m", "metashot", "train", "--help"], capture_output=True,
                         text=True, check=True).stdout
    assert "(default: None)" not in out and "%%" not in out and "95% CI" in out
    options = " ".join(out.split()).split(" --")[1:]
    assert len(options) > 15 and all(o.count("default") <= 1 for o in options)
    flat = " ".join(out.split())
    assert "one meta-batch of --meta- batch episodes for maml, mann and lstm" in flat


def test_a_bug_keeps_its_traceback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(Trainer, "fit", broken)
    with pytest.raises(ZeroDivisionError):
        cli.main([*SINE, "--max-episodes", "2", "--run-dir", str(tmp_path / "run")])


FOLDER_RUN = ["--task", "folder", "--no-progress", "--ways", "2", "--train-ways", "2", "--queries", "1",
              "--set", "train_queries=1", "--steps", "2", "--val-every", "2", "--set", "val_episodes=2",
              "--test-episodes", "2", "--method-args", '{"hidden": 4}']


@pytest.fixture(scope="module")
def protonet_run(folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A two-step ProtoNet run on the image folder, Conv4 of width 4."""
    run = tmp_path_factory.mktemp("protonet") / "run"
    assert cli.main(["train", "protonet", "--data-dir", str(folder), *FOLDER_RUN, "--run-dir", str(run)]) == 0
    return run


def _saved_with(path: Path, run: Path, **more: torch.Tensor) -> Path:
    save_checkpoint(path, {"method": {**load_checkpoint(run / "best.pt")["method"], **more}})
    return path


@pytest.mark.parametrize(("start", "args", "message"), [
    (lambda run, tmp: tmp / "nope", [], "/nope: no such run folder or checkpoint file"),
    (lambda run, tmp: tmp, [], "holds no best.pt or last.pt; is it a run folder that saved a checkpoint?"),
    (lambda run, tmp: run / "config.json", [],
     "config.json: truncated, corrupt or not a metashot checkpoint"),
    (lambda run, tmp: run, ["--init-prefix", "backbone."],
     "--init-prefix 'backbone.': protonet has no weights under it (its weights' prefixes: encoder.)"),
    (lambda run, tmp: run, ["--init-prefix", "encoder.", "--method-args", '{"hidden": 8}'],
     "best.pt: its weights under 'encoder.' do not fit protonet's (size mismatch: encoder.0.0.weight "
     "[4, 1, 3, 3] (the network's: [8, 1, 3, 3])"),
    (lambda run, tmp: run, ["--set", 'method_args={"learn_scale": true}'],
     "best.pt: its weights under '' do not fit protonet's (missing keys: head.scale)"),
    (lambda run, tmp: _saved_with(tmp / "more.pt", run, **{"head.extra": torch.zeros(1)}), [],
     "more.pt: its weights under '' do not fit protonet's (unexpected keys: head.extra)"),
    (lambda run, tmp: run, ["--init-prefix", "head."],
     "--init-prefix 'head.': protonet has no weights under it"),
    (lambda run, tmp: "stage:1", [], "--init-from stage:1 names a stage of a staged preset"),
    (lambda run, tmp: "stage:0", [], "--init-from stage:0: a stage is named stage:K with K >= 1"),
    (lambda run, tmp: "", [], '--init-from must name a run folder or a checkpoint file, got ""'),
])
def test_a_bad_init_from_is_one_line_before_anything_is_written(
    start: object, args: list[str], message: str, protonet_run: Path, folder: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture
) -> None:
    capsys.readouterr()
    argv = ["train", "protonet", "--data-dir", str(folder), *FOLDER_RUN, "--run-dir", str(tmp_path / "new"),
            "--init-from", str(start(protonet_run, tmp_path)), *args]
    assert message in _error(argv, capsys)
    assert not (tmp_path / "new").exists()


def test_init_from_a_maml_run_into_protonet_names_the_prefixes(run: Path, folder: Path, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture) -> None:
    capsys.readouterr()
    argv = ["train", "protonet", "--data-dir", str(folder), *FOLDER_RUN, "--run-dir", str(tmp_path / "new"),
            "--init-from", str(run), "--init-prefix", "encoder."]
    assert "best.pt: no weights under 'encoder.' to start protonet from (its weights' prefixes: " in _error(
        argv, capsys)
    assert "--init-prefix encoder. needs --init-from" in _error([*SINE, "--init-prefix", "encoder."], capsys)


def test_init_from_loads_the_weights_under_the_prefix_and_saves_the_path_absolute(
    protonet_run: Path, folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(protonet_run.parent)
    argv = ["train", "protonet", "--data-dir", str(folder), *FOLDER_RUN, "--init-from", protonet_run.name,
            "--init-prefix", "encoder.", "--set", 'method_args={"learn_scale": true}']
    cfg = cli.config_from_args(cli.parser().parse_args(argv))
    assert cfg.init_from == str(protonet_run)  # the command line's path, absolute
    trainer = Trainer(cfg.replace(init_from=protonet_run.name), tmp_path / "new", progress=False)
    state, best = trainer.method.state_dict(), load_checkpoint(protonet_run / "best.pt")["method"]
    assert set(state) - set(best) == {"head.scale"} and state["head.scale"].item() == 1.0  # its own init
    assert all(torch.equal(state[k], v) for k, v in best.items())
    trainer.fit()
    assert Config.load(tmp_path / "new" / "config.json").init_from == str(protonet_run)  # the API's too


def test_evaluate_head_errors(run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    capsys.readouterr()
    err = _error(["evaluate", str(run), "--head", "cl2n", "--no-progress"], capsys)
    assert err.startswith(f"metashot: error: {run}: --head cl2n: MAMLRegression is not an encoder and a head")
    assert "unknown head 'nope'; known: " in _error(["evaluate", str(run), "--head", "nope"], capsys)
    assert "--head-args are the arguments of a --head" in _error(
        ["evaluate", str(run), "--head-args", '{"distance": "cosine"}'], capsys)
    assert "argument --head-args: expected a JSON object" in _error(
        ["evaluate", str(run), "--head", "cl2n", "--head-args", "cosine"], capsys)
    assert _error(["evaluate", str(run), "--seed", "3", "--queries", "5"], capsys) == (
        "metashot: error: --queries and --seed go with --features; a run is tested with its own")
    assert _error(["evaluate"], capsys) == "metashot: error: evaluate needs a run folder, or --features CACHE"
    assert not list(run.glob("result-head-*"))


def test_train_takes_the_method_from_the_preset(capsys: pytest.CaptureFixture) -> None:
    args = cli.parser().parse_args(["train", "--preset", "maml-sinusoid"])
    assert cli.config_from_args(args).method == "maml"
    assert "give the METHOD to train, or a --preset (see `metashot presets`)" in _error(["train"], capsys)
    err = _error([*SINE, "--stage", "2:steps=3"], capsys)
    assert "--stage 2:steps=3: --stage sets a field of one stage of a staged preset; this run is one" in err
