"""Recipes: the optimizers and schedules a config names, the split seed, and summaries over seeds."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from metashot import cli, presets
from metashot.batches import SequenceTaskInfo, TaskInfo
from metashot.config import Config, options
from metashot.data.augment import AUGMENTS
from metashot.data.tasks import TASKS, build_source
from metashot.errors import ConfigError, RunFolderError
from metashot.evaluate import Result
from metashot.methods import build_method, method_class
from metashot.runs import summarize_runs

TARGET = torch.tensor([1.0, -2.0, 0.5])


def _grad(p: torch.Tensor) -> torch.Tensor:
    """The gradient of the toy loss sum((p - t)^2 * (1, 2, 3)) / 2."""
    return (p - TARGET) * torch.tensor([1.0, 2.0, 3.0])


def _hand_trajectory(optimizer: str, args: dict, lr: float, wd: float, steps: int) -> list[torch.Tensor]:
    """The update rules as the papers write them (Polyak/Nesterov momentum as Sutskever et al. 2013
    in torch's form, RMSProp with momentum as Graves 2013 without centring, Adam as Kingma & Ba 2015)."""
    p = torch.zeros(3, dtype=torch.float64)
    state = {"v": torch.zeros_like(p), "s": torch.zeros_like(p), "m": torch.zeros_like(p)}
    out = []
    for t in range(1, steps + 1):
        g = _grad(p) + wd * p
        if optimizer == "sgd":
            mu = args.get("momentum", 0.0)
            state["v"] = g if t == 1 else mu * state["v"] + g
            p = p - lr * (g + mu * state["v"] if args.get("nesterov") else state["v"])
        elif optimizer == "rmsprop":
            alpha, mu, eps = args["alpha"], args["momentum"], 1e-8
            state["s"] = alpha * state["s"] + (1 - alpha) * g * g
            state["v"] = mu * state["v"] + g / (state["s"].sqrt() + eps)
            p = p - lr * state["v"]
        else:  # adam
            b1, b2, eps = 0.9, 0.999, 1e-8
            state["m"] = b1 * state["m"] + (1 - b1) * g
            state["s"] = b2 * state["s"] + (1 - b2) * g * g
            m_hat, s_hat = state["m"] / (1 - b1**t), state["s"] / (1 - b2**t)
            p = p - lr * m_hat / (s_hat.sqrt() + eps)
        out.append(p)
    return out


@pytest.mark.parametrize("optimizer, args", [
    ("sgd", {"momentum": 0.9}),
    ("sgd", {"momentum": 0.9, "nesterov": True}),
    ("rmsprop", {"alpha": 0.95, "momentum": 0.9}),
    ("adam", {}),
])
def test_each_optimizer_follows_its_update_rule(optimizer: str, args: dict) -> None:
    cfg = Config(optimizer=optimizer, optimizer_args=args, lr=0.05, weight_decay=0.01).validate()
    p = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    opt = cfg.make_optimizer([p])
    expected = _hand_trajectory(optimizer, args, 0.05, 0.01, 20)
    for want in expected:
        opt.zero_grad()
        p.grad = _grad(p.detach())
        opt.step()
        torch.testing.assert_close(p.detach(), want, rtol=1e-10, atol=1e-12)
    assert (p.detach() - TARGET).abs().sum() < (TARGET.abs().sum())  # it moved toward the minimum


def _lrs(cfg: Config) -> list[float]:
    opt = cfg.make_optimizer([torch.zeros(1, requires_grad=True)])
    sched = cfg.make_scheduler(opt)
    lrs = []
    for _ in range(cfg.steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


@pytest.mark.parametrize("schedule, warmup", [("step", 0), ("step", 4), ("cosine", 0), ("cosine", 5),
                                              ("constant", 3)])
def test_each_schedule_follows_its_formula(schedule: str, warmup: int) -> None:
    lr, steps = 0.1, 30
    cfg = Config(lr=lr, steps=steps, schedule=schedule, warmup=warmup, lr_step=7, lr_gamma=0.5,
                 lr_min=0.01).validate()

    def want(k: int) -> float:
        if k < warmup:
            return lr * (k + 1) / (warmup + 1)
        t = k - warmup
        if schedule == "step":
            return lr * 0.5 ** (t // 7)
        if schedule == "cosine":
            return 0.01 + (lr - 0.01) * (1 + math.cos(math.pi * t / (steps - warmup))) / 2
        return lr

    assert _lrs(cfg) == pytest.approx([want(k) for k in range(steps)], rel=1e-9)


@pytest.mark.parametrize("changes, message", [
    ({"optimizer": "adagrad"}, "optimizer must be one of adam, adamw, sgd, rmsprop, got 'adagrad'"),
    ({"optimizer": "sgd", "optimizer_args": {"momentum": 0.9, "nestrov": True}},
     "optimizer_args {\"momentum\": 0.9, \"nestrov\": true} do not fit sgd"),
    ({"optimizer": "sgd", "optimizer_args": {"nesterov": True}},
     "do not fit sgd (Nesterov momentum requires"),
    ({"weight_decay": -1.0}, "--weight-decay must be a finite number >= 0, got -1.0"),
    ({"schedule": "cosine", "lr_min": 0.01, "lr": 0.01}, "--lr-min (0.01) must be below --lr (0.01)"),
    ({"warmup": -2}, "--warmup must be at least 0, got -2"),
    ({"split_seed": -1}, "--split-seed must be at least 0, got -1"),
])
def test_bad_recipes_are_config_errors(changes: dict, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        Config(**changes).validate()
    assert message in str(e.value)


def test_a_config_saved_before_the_recipe_fields_loads_with_the_old_behaviour() -> None:
    old = Config(seed=3).to_dict()
    for name in ("backbone", "backbone_args", "optimizer", "optimizer_args", "weight_decay", "warmup",
                 "lr_min", "split_seed"):
        del old[name]
    cfg = Config.from_dict(old)
    assert cfg.optimizer == "adam" and cfg.weight_decay == 0 and cfg.warmup == 0 and cfg.backbone is None
    assert cfg.split_seed is None and cfg.class_split_seed == 3  # the split followed the seed then


def test_a_config_saved_before_init_from_loads_starting_from_scratch() -> None:
    old = Config(seed=3).to_dict()
    del old["init_from"], old["init_prefix"]
    cfg = Config.from_dict(old)
    assert cfg.init_from is None and cfg.init_prefix == ""


@pytest.mark.parametrize(("changes", "message"), [
    ({"init_prefix": "encoder."}, "--init-prefix encoder. needs --init-from, the run to start from"),
    ({"init_from": " "}, '--init-from must name a run folder or a checkpoint file, got ""'),
    ({"init_from": "stage:x"},
     "--init-from stage:x: a stage is named stage:K with K >= 1, such as stage:1"),
    ({"init_from": "stage:01"},
     "--init-from stage:01: a stage is named stage:K with K >= 1, such as stage:1"),
])
def test_a_bad_start_is_a_config_error(changes: dict, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        Config(**changes).validate()
    assert str(e.value) == message


def _characters(cfg: Config, part: str) -> set[str]:
    return set(build_source(cfg).dataset(part).class_names)


def test_split_seed_fixes_the_split_while_the_seed_varies(omniglot_dir: Path) -> None:
    a = Config(data_dir=str(omniglot_dir), seed=0, split_seed=0)
    b = a.replace(seed=1)
    c = a.replace(seed=1, split_seed=None)
    for part in ("train", "val", "test"):
        assert _characters(a, part) == _characters(b, part)
    assert _characters(a, "test") != _characters(c, "test")
    assert not _characters(a, "train") & _characters(a, "test")
    batch = lambda cfg: next(iter(build_source(cfg).loader("train", 1, seed=cfg.seed)))  # noqa: E731
    assert not torch.equal(batch(a).support, batch(b).support)
    assert torch.equal(batch(a).support, batch(a.replace(split_seed=0)).support)


def test_every_config_field_but_method_and_preset_has_an_option() -> None:
    names = {f.name for f in options()}
    assert names == set(Config().to_dict()) - {"method", "preset"}
    args = cli.parser().parse_args(["train", "protonet", "--optimizer", "sgd", "--optimizer-args",
                                    '{"momentum": 0.9}', "--warmup", "5", "--split-seed", "4",
                                    "--backbone-args", '{"drop_rate": 0.1}', "--weight-decay", "5e-4"])
    cfg = cli.config_from_args(args)
    assert (cfg.optimizer, cfg.optimizer_args, cfg.warmup, cfg.split_seed, cfg.weight_decay) == (
        "sgd", {"momentum": 0.9}, 5, 4, 5e-4)
    assert cfg.backbone_args == {"drop_rate": 0.1}


def test_a_dict_option_must_be_a_json_object(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "protonet", "--optimizer-args", "momentum=0.9"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1
    assert "argument --optimizer-args: expected a JSON object" in err


def test_presets_name_prints_a_config_that_loads(capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["presets", "mann-omniglot-5class-onehot"]) == 0
    cfg = Config.from_dict(json.loads(capsys.readouterr().out))
    assert cfg.method == "mann" and cfg.preset == "mann-omniglot-5class-onehot"


def _fake_run(folder: Path, seed: int, acc: float, **changes: object) -> Path:
    folder.mkdir(parents=True)
    Config(seed=seed, **changes).save(folder / "config.json")
    result = Result("acc", 100, {"acc": (acc, 0.01), "loss": (1 - acc, 0.02)})
    (folder / "result.json").write_text(result.to_json())
    return folder


def test_summary_over_seeds_by_hand(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    runs = [_fake_run(tmp_path / f"s{s}", s, acc) for s, acc in ((0, 0.90), (1, 0.94), (2, 0.95))]
    summary = summarize_runs(runs)
    mean, std = summary.stats()["acc"]
    assert mean == pytest.approx(0.93)
    assert std == pytest.approx(math.sqrt(((0.03) ** 2 + 0.01**2 + 0.02**2) / 2))
    assert summary.seeds == [0, 1, 2]
    assert cli.main(["summarize", *map(str, runs)]) == 0
    out = capsys.readouterr().out
    assert "test acc over 3 seeds: 93.00% +- 2.65% (mean +- sample std over seeds)" in out


def test_summary_refuses_runs_of_different_recipes(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    a = _fake_run(tmp_path / "a", 0, 0.9)
    b = _fake_run(tmp_path / "b", 1, 0.9, lr=0.01)
    assert cli.main(["summarize", str(a), str(b)]) == 2
    assert "differ in more than the seed: lr (0.001 vs 0.01)" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="same seed"):
        summarize_runs([a, _fake_run(tmp_path / "c", 0, 0.8)])
    (b / "result.json").unlink()
    with pytest.raises(RunFolderError, match="no result.json; finish the run or `metashot evaluate"):
        summarize_runs([a, b])


def test_runs_whose_split_followed_their_seed_differ_in_the_split(tmp_path: Path) -> None:
    a = _fake_run(tmp_path / "a", 0, 0.9, split_seed=None)
    b = _fake_run(tmp_path / "b", 1, 0.9, split_seed=None)
    with pytest.raises(ConfigError, match="split_seed"):
        summarize_runs([a, b])


@pytest.mark.slow
def test_seeds_trains_one_run_per_seed_then_summarizes(omniglot_dir: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    code = cli.main(["train", "protonet", "--data-dir", str(omniglot_dir), "--max-episodes", "20",
                     "--val-every", "20", "--val-episodes", "10", "--test-episodes", "30",
                     "--train-ways", "20", "--seeds", "0,1",
                     "--run-dir", str(tmp_path / "runs"), "--no-progress", "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)  # one JSON object: the per-seed lines go to stderr
    assert out["seeds"] == [0, 1] and len(out["results"]) == 2
    saved = [json.loads((tmp_path / "runs" / f"seed{s}" / "result.json").read_text())["mean"] for s in (0, 1)]
    assert out["mean"] == pytest.approx(sum(saved) / 2) and saved[0] != saved[1]
    assert out["mean"] > 0.4  # 20 episodes of training lift 5-way accuracy well above chance (20%)


def test_another_optimizer_than_the_presets_starts_from_no_arguments() -> None:
    def cfg(*args: str) -> Config:
        return cli.config_from_args(cli.parser().parse_args(["train", "mann", *args]))

    assert cfg().optimizer == "rmsprop" and cfg().optimizer_args == {"alpha": 0.95, "momentum": 0.9}
    adam = cfg("--optimizer", "adam", "--lr", "3e-3")
    assert (adam.optimizer, adam.optimizer_args, adam.lr) == ("adam", {}, 3e-3)
    assert cfg("--optimizer-args", '{"momentum": 0.5}').optimizer_args == {"alpha": 0.95, "momentum": 0.5}
    sgd = cfg("--optimizer", "sgd", "--optimizer-args", '{"momentum": 0.9}')
    assert sgd.optimizer_args == {"momentum": 0.9}


@pytest.mark.parametrize(("name", "stage"), [
    (n, k) for n in sorted(presets.PRESETS)
    for k in (range(1, len(presets.stages(n).configs) + 1) if presets.is_staged(n) else [0])])
def test_every_preset_validates_names_its_recipe_and_builds(name: str, stage: int) -> None:
    """Each preset, and each stage (k > 0) of a staged one."""
    cfg = (presets.stages(name).configs[stage - 1] if stage else presets.get(name)).validate()
    assert Config.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg  # saved and loaded alike
    assert cfg.optimizer in ("adam", "rmsprop", "sgd")
    assert cfg.schedule in ("step", "multistep", "cosine", "constant")
    if cfg.task == "sinusoid":
        info = build_source(cfg).info
    elif method_class(cfg).train_batches == "sequences":
        string = cfg.task_args["labels"] == "string"
        info = SequenceTaskInfo((1, 20, 20), cfg.ways, cfg.ways, label_groups=5 if string else 1,
                                label_values=5 if string else cfg.ways)
    elif cfg.task in presets.IMAGE_SETS:
        size = TASKS[cfg.task].default_image_size
        info = TaskInfo((3, size, size), cfg.ways, cfg.train_ways, train_classes=64)
        assert cfg.task_args["augment"] in AUGMENTS  # each natural-image preset states its augmentation
    else:
        info = TaskInfo((1, 28, 28), cfg.ways, cfg.train_ways, train_classes=64)
    method = build_method(cfg, info)
    assert cfg.make_optimizer(method.parameters()).param_groups[0]["lr"] == cfg.lr


def test_weight_decay_left_unset_is_the_optimizers_own() -> None:
    param = [torch.zeros(1, requires_grad=True)]
    assert Config(optimizer="adamw").make_optimizer(param).defaults["weight_decay"] == 0.01
    assert Config(optimizer="adamw", weight_decay=0.0).make_optimizer(param).defaults["weight_decay"] == 0.0
    assert Config().make_optimizer(param).defaults["weight_decay"] == 0
