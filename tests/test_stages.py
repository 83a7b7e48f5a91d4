"""Staged recipes and ``init_from``: a stage starts from an earlier one's weights exactly, a killed stage
resumes bit for bit, a bad start is one line, the command line's options reach the stages as documented.

The recipe here exists only in the tests: ProtoNet (Conv4 of width 8) on a few Omniglot alphabets, then
ProtoNet with cosine distance and a learned scale from stage 1's ``encoder.`` at another learning rate."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from metashot import cli, presets
from metashot.cli_train import recipe_from_args
from metashot.config import Config
from metashot.errors import ConfigError
from metashot.runs import load_checkpoint
from metashot.stages import Stages, with_changes
from metashot.train import Trainer

NAME = "test-two-stage"
Whole = tuple[Path, dict[str, torch.Tensor], str]  # a staged run, stage 2's first weights, the output
TINY = dict(method="protonet", method_args={"hidden": 8}, ways=5, shots=1, queries=2, train_queries=2,
            task_args={"split": "official", "val_characters": 6}, steps=6, val_every=3, val_episodes=4,
            test_episodes=10)


def _stage1(data_dir: Path) -> Config:
    return Config(**TINY, data_dir=str(data_dir))


def _stage2(data_dir: Path) -> Config:
    args = {"hidden": 8, "distance": "cosine", "learn_scale": True}
    return _stage1(data_dir).replace(method_args=args, init_from="stage:1", init_prefix="encoder.", lr=5e-4)


@pytest.fixture(scope="module")
def registered(omniglot_small_dir: Path) -> Iterator[str]:
    """The two-stage preset, registered for this module's tests, three quarters of --max-minutes to
    stage 1."""
    stages = Stages([_stage1(omniglot_small_dir), _stage2(omniglot_small_dir)], budget=[3, 1])
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(presets.PRESETS, NAME, stages)
        yield NAME


@pytest.fixture
def recipe(registered: str, capsys: pytest.CaptureFixture) -> str:
    capsys.readouterr()  # what a module fixture printed
    return registered


def _train(*args: str) -> int:
    return cli.main(["train", "--preset", NAME, "--no-progress", *args])


def _error(argv: list[str], capsys: pytest.CaptureFixture) -> str:
    code = cli.main(argv)
    out, err = capsys.readouterr()
    assert code == 2 and out == "", (out, err)
    assert err.count("\n") == 1 and err.startswith("metashot: error: ") and "Traceback" not in err, err
    return err.strip()


def _on_open(monkeypatch: pytest.MonkeyPatch, stage: str, hook: object) -> None:
    """Call ``hook(trainer)`` once the trainer of ``stage`` has opened its folder, at its first step."""
    real = Trainer._open

    def opened(self: Trainer) -> None:
        real(self)
        if self.run_dir.name == stage:
            hook(self)

    monkeypatch.setattr(Trainer, "_open", opened)


def _copy(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in weights.items()}


@pytest.fixture(scope="module")
def whole(registered: str, tmp_path_factory: pytest.TempPathFactory) -> Whole:
    """A finished staged run, stage 2's weights as its training began, and what the command printed."""
    run, start = tmp_path_factory.mktemp("whole") / "run", {}
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(io.StringIO()) as out, \
            contextlib.redirect_stderr(io.StringIO()) as err:
        _on_open(patch, "stage2", lambda t: start.update(_copy(t.method.state_dict())))
        assert _train("--run-dir", str(run), "--json") == 0
    return run, start, out.getvalue() + err.getvalue()


def test_stage_two_starts_from_stage_ones_encoder_exactly(whole: Whole) -> None:
    run, start, printed = whole
    best = load_checkpoint(run / "stage1" / "best.pt")["method"]
    encoder = [k for k in start if k.startswith("encoder.")]
    assert encoder and all(torch.equal(start[k], best[k]) for k in encoder)
    assert set(start) - set(encoder) == {"head.scale"} and start["head.scale"].item() == 1.0  # its own init
    saved = json.loads((run / "stage2" / "config.json").read_text())
    assert saved["init_from"] == str((run / "stage1").resolve()) and saved["init_prefix"] == "encoder."
    assert json.loads((run / "stages.json").read_text())["stages"][1]["init_from"] == "stage:1"
    trained = load_checkpoint(run / "stage2" / "last.pt")["method"]
    assert not torch.equal(trained["encoder.0.0.weight"], best["encoder.0.0.weight"])  # stage 2 trained it
    # each stage's result on stderr, the last stage's on stdout
    assert "stage 1 of 2 (protonet): test acc" in printed and "stage 2 of 2 (protonet): test acc" in printed
    assert (run / "stage2" / "result.json").read_text().strip() in printed


def test_evaluate_and_summarize_read_a_staged_runs_last_stage(whole: Whole,
                                                              capsys: pytest.CaptureFixture) -> None:
    run = whole[0]
    assert cli.main(["evaluate", str(run), "--no-progress", "--json"]) == 0
    last = json.loads((run / "stage2" / "result.json").read_text())
    assert json.loads(capsys.readouterr().out) == last
    assert cli.main(["summarize", str(run), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["mean"] == last["mean"]


def _assert_same_weights(a: Path, b: Path) -> None:
    sa, sb = load_checkpoint(a / "last.pt"), load_checkpoint(b / "last.pt")
    assert sa["step"] == sb["step"] and torch.equal(sa["rng"], sb["rng"])
    assert sa["method"].keys() == sb["method"].keys()
    assert all(torch.equal(sa["method"][k], sb["method"][k]) for k in sa["method"])
    for pa, pb in zip(sa["optimizer"]["state"].values(), sb["optimizer"]["state"].values()):
        assert all(torch.equal(pa[k], pb[k]) for k in pa)
    assert json.loads((a / "result.json").read_text()) == json.loads((b / "result.json").read_text())


class _Killed(BaseException):
    """What kill -9 leaves: the process gone within a step, nothing saved since the last checkpoint."""


@pytest.mark.parametrize(("stage", "signum"), [("stage1", signal.SIGTERM), ("stage2", signal.SIGTERM),
                                               ("stage2", signal.SIGKILL)])
def test_a_killed_stage_resumes_bit_for_bit(stage: str, signum: int, recipe: str, whole: Whole,
                                            tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture) -> None:
    whole, killed = whole[0], tmp_path / "killed"

    def kill(step: int) -> None:  # SIGTERM as test_runs sends it, as step 4 begins; SIGKILL: gone at once
        if step == 4:
            if signum == signal.SIGKILL:
                raise _Killed
            os.kill(os.getpid(), signum)

    def kill_at_step_4(trainer: Trainer) -> None:
        hook = trainer.method.on_step
        trainer.method.on_step = lambda s: kill(s) or hook(s)

    with monkeypatch.context() as patch:
        _on_open(patch, stage, kill_at_step_4)
        if signum == signal.SIGKILL:
            with pytest.raises(_Killed):
                _train("--run-dir", str(killed))
        else:
            assert _train("--run-dir", str(killed)) == 128 + signum
    # SIGTERM saves the step it stopped in; after SIGKILL the last checkpoint is step 3's
    assert load_checkpoint(killed / stage / "last.pt")["step"] == (3 if signum == signal.SIGKILL else 5)
    assert not (killed / stage / "result.json").exists() and not (killed / "stage2" / "result.json").exists()
    before = {p.name: p.stat().st_mtime_ns for p in (killed / "stage1").iterdir()}
    capsys.readouterr()
    assert _train("--resume", "--run-dir", str(killed)) == 0
    err = capsys.readouterr().err
    if stage == "stage2":  # the finished stage is left as it was
        assert "stage 1 of 2 is finished" in err
        assert {p.name: p.stat().st_mtime_ns for p in (killed / "stage1").iterdir()} == before
    for k in ("stage1", "stage2"):
        _assert_same_weights(whole / k, killed / k)
    # a finished staged run resumed does nothing but print its result
    assert cli.main(["train", "--resume", "--run-dir", str(killed), "--no-progress", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == json.loads((whole / "stage2" / "result.json").read_text())


def test_stage_options_and_the_time_budget_resolve_as_documented(recipe: str) -> None:
    def resolved(*args: str) -> list[Config]:
        parsed = cli.parser().parse_args(["train", "--preset", NAME, *args])
        return recipe_from_args(parsed).configs

    one, two = resolved("--steps", "300", "--max-minutes", "8", "--stage", "2:steps=50",
                        "--stage", "2:lr=0.01", "--set", 'method_args={"hidden": 4}',
                        "--stage", '1:method_args={"distance": "cosine"}')
    assert (one.steps, two.steps, one.lr, two.lr) == (300, 50, 1e-3, 0.01)
    assert (one.max_minutes, two.max_minutes) == (6.0, 2.0)  # the budget 3:1 of 8 minutes
    assert one.method_args == {"hidden": 4, "distance": "cosine"}  # dicts merged: preset, all, stage
    assert two.method_args == {"hidden": 4, "distance": "cosine", "learn_scale": True}
    assert two.init_from == "stage:1" and one.preset == two.preset == NAME
    equal = with_changes(Stages(presets.stages(NAME).configs), {"max_minutes": 9.0}, {})
    assert [c.max_minutes for c in equal.configs] == [4.5, 4.5]  # no budget: equal shares
    assert [c.max_minutes for c in resolved()] == [None, None]
    with pytest.raises(ConfigError, match=r"^--stage 3: the recipe test-two-stage has stages 1 to 2$"):
        resolved("--stage", "3:steps=5")
    with pytest.raises(ConfigError, match=r"^stage 1: --init-prefix encoder. needs --init-from"):
        resolved("--init-prefix", "encoder.")
    with pytest.raises(ConfigError, match=r"^stage 2: --init-from stage:2 must name an earlier stage "
                                          r"\(stages 1 to 1\)$"):
        resolved("--stage", "2:init_from=stage:2")
    with pytest.raises(ConfigError, match="trains protonet then protonet: its METHOD is protonet"):
        recipe_from_args(cli.parser().parse_args(["train", "maml", "--preset", NAME]))


@pytest.mark.parametrize(("args", "message"), [
    (["--stage", "two:steps=5"], "--stage two:steps=5: expected K:KEY=JSON with K a stage number"),
    (["--stage", "2:bogus=1"], "--stage 2: bogus=1: expected KEY=JSON with KEY a config field"),
    (["--stage", "2:steps=many"], "--stage 2: steps=many: 'many' is not JSON"),
    (["--stage", "1:steps=0"], "stage 1: --steps must be at least 1, got 0"),
    (["--max-minutes", "-1"], "error: --max-minutes must be a positive number of minutes, got -1.0"),
])
def test_bad_stage_options_are_one_line_errors(args: list[str], message: str, recipe: str, tmp_path: Path,
                                               capsys: pytest.CaptureFixture) -> None:
    assert message in _error(["train", "--preset", NAME, "--run-dir", str(tmp_path / "run"), *args], capsys)
    assert not (tmp_path / "run").exists()


def test_presets_lists_a_staged_preset_with_its_stages(recipe: str, capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["presets"]) == 0
    lines = capsys.readouterr().out.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith(NAME))
    assert lines[at].split(None, 1)[1] == "2 stages, --max-minutes shared 75% / 25%:"
    assert lines[at + 1].split()[:3] == ["stage", "1", "protonet"]
    assert lines[at + 2].endswith("; 6 steps; from stage 1's encoder.")
    assert cli.main(["presets", NAME]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert [Config.from_dict(c) for c in printed] == list(presets.stages(NAME).configs)
    with pytest.raises(ConfigError, match="is a recipe of 2 stages"):
        presets.get(NAME)


def test_a_staged_run_folder_is_refused_to_a_new_run_and_other_commands_read_its_last_stage(
    recipe: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "stages.json").write_text(json.dumps(presets.stages(NAME).to_dict()))
    for argv in (["train", "--preset", NAME], ["train", "protonet"]):
        assert "already holds a run; pass --resume" in _error([*argv, "--run-dir", str(run)], capsys)
    message = f"{run}: a staged run whose last stage (2) has not started; `metashot train --resume"
    for argv in (["evaluate", str(run)], ["summarize", str(run)], ["plot", str(run)]):
        assert message in _error(argv, capsys)
    assert "--resume continues the run's own recipe (test-two-stage); drop --preset" in _error(
        ["train", "--preset", "protonet-omniglot-5w1s", "--resume", "--run-dir", str(run)], capsys)


def test_the_recipe_of_a_staged_run_is_checked_when_read(recipe: str, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "stages.json").write_text('{"stages": [{"ways": 5}]}')
    assert "stages.json, stage 1: missing config fields" in _error(
        ["train", "--resume", "--run-dir", str(tmp_path)], capsys)
    (tmp_path / "stages.json").write_text("[]")
    assert "stages.json: not a metashot stages file" in _error(["evaluate", str(tmp_path)], capsys)


def test_stages_refuse_a_bad_budget_or_a_later_stage(omniglot_small_dir: Path) -> None:
    one, two = _stage1(omniglot_small_dir), _stage2(omniglot_small_dir)
    for budget in ([1], [1, 0], "31", [1, True], [1, float("inf")]):
        with pytest.raises(ConfigError, match=r"^budget .*: one positive share of --max-minutes per stage"):
            Stages([one, two], budget=budget)
    with pytest.raises(ConfigError, match=r"^stage 1: --init-from stage:1 must name an earlier stage \(none"):
        Stages([two])
    assert Stages([one, two], budget=[1, 3]).shares == [0.25, 0.75]


def _fake_staged_run(run: Path, seed: int, acc: float, start: Path | None = None) -> Path:
    """A tested staged run of the recipe, written by hand: its stages.json, stage folders and results."""
    recipe = with_changes(presets.stages(NAME), {"seed": seed}, {})
    run.mkdir(parents=True)
    (run / "stages.json").write_text(json.dumps(recipe.to_dict()))
    for k, cfg in enumerate(recipe.configs, 1):
        (run / f"stage{k}").mkdir()
        init = None if cfg.init_from is None else str((start or run / "stage1").resolve())
        cfg.replace(init_from=init).save(run / f"stage{k}" / "config.json")
        result = {"metric": "acc", "episodes": 10, "stats": {"acc": [acc + k / 10, 0.01]}}
        (run / f"stage{k}" / "result.json").write_text(json.dumps(result))
    return run


def test_summarize_compares_staged_runs_by_their_recipe(recipe: str, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    runs = [_fake_staged_run(tmp_path / f"seed{s}", s, acc) for s, acc in ((0, 0.5), (1, 0.6))]
    assert cli.main(["summarize", *map(str, runs), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["mean"] == pytest.approx(0.75) and summary["runs"] == [str(r) for r in runs]
    other = _fake_staged_run(tmp_path / "other", 2, 0.6, start=runs[0] / "stage1")  # not its own stage 1
    assert f"differ in more than the seed: init_from (\"stage:1\" vs \"{runs[0] / 'stage1'}\")" in _error(
        ["summarize", str(runs[0]), str(other)], capsys)


def test_a_resume_of_a_staged_run_changes_only_what_a_resume_may(recipe: str, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture) -> None:
    run = _fake_staged_run(tmp_path / "run", 0, 0.5)

    def resumed(*args: str) -> list[Config]:
        return recipe_from_args(cli.parser().parse_args(["train", "--resume", "--run-dir", str(run), *args])
                                ).configs

    one, two = resumed("--steps", "9", "--stage", "2:test_episodes=3", "--max-minutes", "4")
    assert (one.steps, two.steps, one.test_episodes, two.test_episodes) == (9, 9, 10, 3)
    assert (one.max_minutes, two.max_minutes) == (3.0, 1.0)
    with pytest.raises(ConfigError, match=r"^stage 2: --resume continues the run as configured; it cannot "
                                          r"change --lr"):
        resumed("--stage", "2:lr=0.1")
    # a finished recipe resumed: every stage is skipped, the last stage's result printed
    assert cli.main(["train", "--resume", "--run-dir", str(run), "--no-progress", "--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["mean"] == pytest.approx(0.7)
    assert err.splitlines() == [f"metashot: stage {k} of 2 is finished ({run}/stage{k}/result.json)"
                                for k in (1, 2)]
