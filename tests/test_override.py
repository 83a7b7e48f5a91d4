"""One rule for changing a recipe: ``Config.override`` in the API and the options of ``metashot train``;
``--steps`` (and its older name); the keys and types of ``method_args`` and ``task_args``."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from torch import nn

from metashot import cli, presets
from metashot.arguments import TASK_ARGS, method_arg_types, task_arg_types
from metashot.cli_train import recipe_from_args
from metashot.config import Config
from metashot.data.sources import PARTS
from metashot.data.tasks import TASKS, build_source
from metashot.errors import ConfigError

# one valid method argument per method and task argument per task source of the presets
METHOD_ARG: dict[str, dict[str, Any]] = {
    "protonet": {"distance": "cosine"}, "matching": {"fce": True}, "maml": {"inner_steps": 2},
    "mann": {"hidden": 100}, "lstm": {"hidden": 100}, "baseline": {"classifier": "cosine"},
    "rfs": {"scale": 5.0}, "simpleshot": {"classifier": "cosine"}, "meta-baseline": {"scale": 5.0},
    "r2d2": {"lam": 0.5},
}
OPTIMIZER_ARG = {"adam": {"eps": 1e-6}, "rmsprop": {"eps": 1e-6}, "sgd": {"dampening": 0.0}}
TASK_ARG: dict[str, dict[str, Any]] = {
    "omniglot": {"rotations": False}, "omniglot-sequences": {"max_shift": 0.0}, "sinusoid": {},
    "miniimagenet": {"augment": "crop-jitter-flip"}, "tieredimagenet": {"channel_order": "rgb"},
    "cifar-fs": {"download": False}, "fc100": {"workers": 2}, "cub": {"split": "feat"},
}


def _flags(changes: dict[str, Any]) -> list[str]:
    return [s for k, v in changes.items()
            for s in (f"--{k.replace('_', '-')}", json.dumps(v) if isinstance(v, dict) else str(v))]


CASES: dict[str, Callable[[Config], tuple[list[str], dict[str, Any]]]] = {
    "shots": lambda c: (["--shots", "5"], {"shots": 5}),
    "shots and train shots": lambda c: _as_both("shots", 5, train_shots=2),
    "another optimizer": lambda c: (["--optimizer", "adamw"], {"optimizer": "adamw"}),
    "the same optimizer": lambda c: (["--optimizer", c.optimizer], {"optimizer": c.optimizer}),
    "another optimizer with its args": lambda c: (
        ["--optimizer", "sgd", "--optimizer-args", '{"momentum": 0.9}'],
        {"optimizer": "sgd", "optimizer_args": {"momentum": 0.9}}),
    "optimizer args": lambda c: _as_both("optimizer_args", OPTIMIZER_ARG[c.optimizer]),
    "another backbone": lambda c: (["--backbone", "resnet12"], {"backbone": "resnet12"}),
    "backbone args": lambda c: (["--backbone-args", '{"hidden": 32}'], {"backbone_args": {"hidden": 32}}),
    "method args": lambda c: _as_both("method_args", METHOD_ARG[c.method]),
    "method args by --set": lambda c: (
        ["--set", f"method_args={json.dumps(METHOD_ARG[c.method])}"], {"method_args": METHOD_ARG[c.method]}),
    "task args": lambda c: _as_both("task_args", TASK_ARG[c.task]),
    "recipe": lambda c: _as_both("lr", 0.01, schedule="cosine", lr_min=1e-4, warmup=3, seed=2),
    "length": lambda c: (["--steps", "100", "--max-minutes", "1.5"], {"steps": 100, "max_minutes": 1.5}),
    "length by its older name": lambda c: (["--max-episodes", "7"], {"steps": 7}),
    "ways and queries": lambda c: _as_both("ways", 3, queries=4, train_queries=2),
}


def _as_both(key: str, value: Any, **more: Any) -> tuple[list[str], dict[str, Any]]:
    changes = {key: value, **more}
    return _flags(changes), changes


def _cli(method: str, *args: str) -> Config:
    return cli.config_from_args(cli.parser().parse_args(["train", method, *args]))


def _every_stage() -> list[tuple[str, int]]:
    """Each preset with 0, each stage k of a staged preset with k."""
    return [(n, k) for n in sorted(presets.PRESETS)
            for k in (range(1, len(presets.stages(n).configs) + 1) if presets.is_staged(n) else [0])]


def _preset(name: str, stage: int) -> Config:
    return presets.stages(name).configs[stage - 1] if stage else presets.get(name)


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize(("name", "stage"), _every_stage())
def test_override_builds_the_config_the_command_line_builds(name: str, stage: int, case: str) -> None:
    base = _preset(name, stage)
    flags, changes = CASES[case](base)
    if stage:  # a stage of a staged preset: the same changes, as --stage K:KEY=JSON
        flags = [s for k, v in changes.items() for s in ("--stage", f"{stage}:{k}={json.dumps(v)}")]
        args = cli.parser().parse_args(["train", "--preset", name, *flags])
        built = recipe_from_args(args).configs[stage - 1]
    else:
        built = _cli(base.method, "--preset", name, *flags)
    api = base.override(**changes)
    assert api.to_dict() == built.to_dict()
    assert base.to_dict() == _preset(name, stage).to_dict()  # the preset is left as it was
    for key, value in changes.items():  # a dict updates the preset's
        got = getattr(api, key)
        assert got.items() >= value.items() if isinstance(value, dict) else got == value


def test_shots_carry_to_training_unless_it_is_given() -> None:
    base = presets.get("protonet-omniglot-5w1s")
    assert base.replace(shots=5).train_shots == 1  # the plain replace keeps 1-shot training
    assert (base.override(shots=5).shots, base.override(shots=5).train_shots) == (5, 5)
    assert base.override(shots=5, train_shots=2).train_shots == 2
    assert base.override(ways=20).train_ways == 60  # only the shot carries


def test_another_optimizer_or_backbone_drops_the_base_arguments() -> None:
    mann = presets.get("mann-omniglot-5class-onehot")
    with pytest.raises(ConfigError, match="do not fit adam"):
        mann.replace(optimizer="adam").validate()  # RMSProp's alpha stays with a plain replace
    assert mann.override(optimizer="adam").optimizer_args == {}
    assert mann.override(optimizer="rmsprop").optimizer_args == {"alpha": 0.95, "momentum": 0.9}
    assert mann.override(optimizer_args={"momentum": 0.5}).optimizer_args == {"alpha": 0.95, "momentum": 0.5}
    sgd = mann.override(optimizer="sgd", optimizer_args={"momentum": 0.9})
    assert sgd.optimizer_args == {"momentum": 0.9}
    maml = presets.get("maml-omniglot-5w1s")
    assert maml.override(backbone="conv4").backbone_args == {}
    wider = maml.override(backbone_args={"hidden": 32})
    assert wider.backbone_args == {**presets.MAML_BACKBONE_ARGS, "hidden": 32}
    matching = presets.get("matching-omniglot-5w1s")
    assert matching.override(method_args={"fce": True}).method_args == {"fce": True, "scale": 20.0}


def test_override_refuses_what_validate_refuses() -> None:
    base = presets.get("maml-sinusoid")
    with pytest.raises(ConfigError, match=r"^--lr must be a positive finite number, got -1$"):
        base.override(lr=-1)
    with pytest.raises(ConfigError, match=r"^unknown config fields \['bogus'\]; known: method, "):
        base.override(bogus=1)
    with pytest.raises(ConfigError, match="^method_args: unknown key 'inner_rate' for maml; known: "):
        base.override(method_args={"inner_rate": 0.1})


def test_steps_is_the_option_and_max_episodes_its_older_name(capsys: pytest.CaptureFixture,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    assert _cli("protonet", "--steps", "9").steps == _cli("protonet", "--max-episodes", "9").steps == 9
    with pytest.raises(ConfigError, match=r"^--steps must be at least 1, got 0$"):
        Config(steps=0).validate()
    monkeypatch.setenv("COLUMNS", "200")
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "[--steps STEPS]" in help_text
    assert "--steps STEPS, --max-episodes STEPS training length in optimizer steps" in help_text


@pytest.mark.parametrize(("method", "args", "message"), [
    ("matching", {"fce_steps": 3}, "method_args: unknown key 'fce_steps' for matching; known: fce, "),
    ("matching", {"fce": "yes"}, 'method_args: fce of matching must be true or false, got "yes"'),
    ("matching", {"processing_steps": 2.5}, "method_args: processing_steps of matching must be an integer, "
                                            "got 2.5"),
    ("protonet", {"hidden": True}, "method_args: hidden of protonet must be an integer or null, got true"),
    ("maml", {"inner_params": [1]}, "method_args: inner_params of maml must be a string or a list, got [1]"),
    ("maml", {"model": "conv4"}, "method_args: unknown key 'model' for maml"),
    ("mann", {"input_size": 400}, "method_args: unknown key 'input_size' for mann"),
    ("lstm", {"encoder": None}, "method_args: unknown key 'encoder' for lstm"),
])
def test_a_method_argument_of_another_name_or_type_is_one_line(method: str, args: dict, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        Config(method=method, method_args=args).validate()
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_method_arguments_are_those_of_build_and_init() -> None:
    known = method_arg_types("matching")
    assert str(_error(Config(method="matching", method_args={"fce_steps": 3}))).endswith(
        f"known: {', '.join(sorted(known))}")
    assert {"fce", "processing_steps", "scale"} <= set(known) and "dim" not in known  # build measures D
    maml = method_arg_types("maml")
    assert {"inner_lr", "inner_steps", "learned_lr", "tasks"} <= set(maml) and "model" not in maml
    assert method_arg_types("lstm") == method_arg_types("mann")  # LSTMBaseline passes them on to MANN
    fitting = {"matching": {"scale": 20, "fce": False}, "maml": {"inner_params": ["0.", "6."],
               "test_inner_steps": None}, "mann": {"instances": [1, 2], "compile": "eager"}}
    for method, args in fitting.items():
        Config(method=method, method_args=args).validate()  # an int for a float, a list for a sequence


def _error(cfg: Config) -> ConfigError:
    with pytest.raises(ConfigError) as e:
        cfg.validate()
    return e.value


class _Base(nn.Module):
    def __init__(self, model: nn.Module, rate: float = 0.1, names: list[str] | None = None,
                 when: Callable[[int], None] | None = None) -> None:
        super().__init__()


class _Fake(_Base):
    def __init__(self, model: nn.Module, depth: int = 2, **kwargs: Any) -> None:
        super().__init__(model, **kwargs)

    @classmethod
    def build(cls, info: Any, backbone: str | None = None, backbone_args: dict | None = None,
              width: int = 8, size: Missing = 1, **kwargs: Any) -> _Fake:  # noqa: F821
        return cls(nn.Linear(width, 1), **kwargs)


class _Open(nn.Module):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)

    @classmethod
    def build(cls, info: Any, backbone: str | None = None, backbone_args: dict | None = None,
              **kwargs: Any) -> _Open:
        return cls(**kwargs)


def test_a_registered_methods_arguments_are_read_from_its_signatures(monkeypatch: pytest.MonkeyPatch) -> None:
    from metashot.methods import METHODS

    monkeypatch.setitem(METHODS, "fake", _Fake)
    monkeypatch.setitem(METHODS, "open", _Open)
    # the unresolvable annotation of size takes anything; the model and the callback are not JSON values
    assert method_arg_types("fake") == {"width": Any, "size": Any, "depth": int, "rate": float,
                                        "names": list[str] | None}
    Config(method="fake", method_args={"names": ["a"], "size": "any", "rate": 1}).validate()
    assert "names of fake must be a list or null, got [1]" in str(
        _error(Config(method="fake", method_args={"names": [1]})))
    assert method_arg_types("open") is None  # its arguments end in nn.Module's **kwargs: any key
    Config(method="open", method_args={"anything": 1}).validate()
    assert method_arg_types("unregistered") is None


@pytest.mark.parametrize(("task", "args", "message"), [
    ("sinusoid", {"amplitude": 1}, "task_args: unknown key 'amplitude' for sinusoid; known: none"),
    ("omniglot", {"image_size": "28"}, 'task_args: image_size of omniglot must be an integer, got "28"'),
    ("omniglot", {"augment": "none"}, "task_args: unknown key 'augment' for omniglot; known: classes, "
                                      "image_size, instances, labels, max_rotation, max_shift, rotations, "
                                      "split, val_characters"),
    ("folder", {"fractions": [0.5, "x"]}, 'task_args: fractions of folder must be a list, got [0.5, "x"]'),
    ("omniglot-sequences", {"instances": 10.0}, "task_args: instances of omniglot-sequences must be an "
                                                "integer, got 10.0"),
])
def test_a_task_argument_of_another_name_or_type_is_one_line(task: str, args: dict, message: str) -> None:
    assert str(_error(Config(task=task, task_args=args))) == message


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    from PIL import Image

    for c in range(10):
        (tmp_path / f"class{c}").mkdir()
        for i in range(6):
            Image.new("L", (8, 8), 20 * c + i).save(tmp_path / f"class{c}" / f"{i}.png")
    return tmp_path


SAMPLES: dict[str, dict[str, Any]] = {
    "omniglot": {"split": "official", "image_size": 20, "rotations": False, "val_characters": 100,
                 "classes": 4, "instances": 3, "labels": "onehot", "max_rotation": 0.0, "max_shift": 3.0},
    "omniglot-sequences": {"split": "official", "image_size": 28, "rotations": False, "val_characters": 100,
                           "classes": 3, "instances": 4, "labels": "string", "max_rotation": 5.0,
                           "max_shift": 1.0},
    "folder": {"image_size": 6, "channels": 1, "fractions": [0.5, 0.3, 0.2], "small_classes": "drop"},
    "sinusoid": {},
}
IMAGE_SAMPLE = {"image_size": 32, "augment": "resized-crop", "jitter": 0.2, "normalize": False, "workers": 2,
                "pin_memory": True, "duplicates": "warn"}
# per natural-image task: a layout, the (empty) files whose presence it is detected by, the task's own args
IMAGE_SETS: dict[str, tuple[str, list[str], dict[str, Any]]] = {
    "miniimagenet": ("cache", [f"mini-imagenet-cache-{p}.pkl" for p in PARTS], {}),
    "tieredimagenet": ("npz", [f"{p}_{k}" for p in PARTS for k in ("images.npz", "labels.pkl")],
                       {"channel_order": "rgb"}),
    "cifar-fs": ("pickle", [f"CIFAR_FS_{p}.pickle" for p in PARTS], {"download": False}),
    "fc100": ("pickle", [f"FC100_{p}.pickle" for p in PARTS], {"download": False}),
    "cub": ("official", [f"CUB_200_2011/{f}" for f in ("images.txt", "images/", "bounding_boxes.txt")],
            {"split": "feat", "crop": True}),
}
for _task, (_layout, _, _own) in IMAGE_SETS.items():
    SAMPLES[_task] = {"layout": _layout, **IMAGE_SAMPLE, **_own}


def _image_set_arguments_taken(task: str, source: Any) -> None:
    layout, _, own = IMAGE_SETS[task]
    assert (source.layout.name, source.image_size, source.workers, source.pin_memory) == (layout, 32, 2, True)
    assert source.duplicates == "warn"
    assert source.augment.kind == "resized-crop" and source.augment.mean is None  # normalize: false
    assert source.augment.jitter == 0.2
    assert getattr(source, "download", False) is False
    assert {k: v for k, v in own.items() if k != "download"} == source.layout.key()


@pytest.mark.parametrize("task", sorted(TASKS))
def test_each_task_sources_declared_arguments_are_the_ones_it_takes(task: str, folder: Path) -> None:
    assert set(TASK_ARGS) == set(TASKS)
    sample = SAMPLES[task]
    assert set(sample) == set(task_arg_types(task) or {})
    for name in IMAGE_SETS.get(task, ("", []))[1]:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).mkdir() if name.endswith("/") else (folder / name).touch()
    cfg = Config(task=task, task_args=sample, data_dir=str(folder), ways=2, shots=1, queries=1).validate()
    source = build_source(cfg)  # a key it did not take would be a ValueError naming it
    if task in IMAGE_SETS:
        _image_set_arguments_taken(task, source)
    elif task == "folder":
        assert source.small_classes == "drop" and source.dataset("test").image_shape == (1, 6, 6)
        assert [source._split[p].num_classes for p in ("train", "val", "test")] == [5, 3, 2]
    else:  # the Omniglot sources keep their sequence episodes' arguments in source.sequences
        taken = vars(source) | (vars(source.sequences) if hasattr(source, "sequences") else {})
        assert all(taken[k] == v for k, v in sample.items())


def test_a_saved_maml_run_config_still_loads(tmp_path: Path) -> None:
    saved = presets.get("maml-omniglot-5w1s").replace(method_args={
        "inner_lr": 0.4, "inner_steps": 1, "test_inner_steps": 3, "tasks": "loop", "checkpoint": True})
    saved.save(tmp_path / "config.json")
    assert Config.load(tmp_path / "config.json") == saved


def test_an_unregistered_task_source_takes_any_arguments() -> None:
    assert task_arg_types("custom") is None
    Config(task="custom", task_args={"anything": [1, 2]}).validate()


def test_a_dict_given_by_its_option_and_by_sets_is_merged_in_order() -> None:
    cfg = _cli("protonet", "--preset", "protonet-miniimagenet-5w1s",
               "--task-args", '{"augment": "resized-crop"}',
               "--set", 'task_args={"normalize": false}', "--set", 'task_args={"workers": 2}',
               "--set", 'optimizer_args={"betas": [0.8, 0.9]}', "--set", 'optimizer_args={"eps": 1e-6}')
    assert cfg.task_args == {"augment": "resized-crop", "normalize": False, "workers": 2}
    assert cfg.optimizer_args == {"betas": [0.8, 0.9], "eps": 1e-6}
    assert _cli("protonet", "--task-args", '{"split": "official"}', "--task-args", '{"rotations": false}'
                ).task_args == {"rotations": False}  # the last of an option given twice


def test_the_data_folder_is_kept_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert _cli("protonet", "--data-dir", "../data").data_dir == str(tmp_path.parent / "data")
