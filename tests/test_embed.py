"""`metashot embed` and `metashot evaluate --features`: a trained run's encoder embedded once scores the
run's own test episodes as `metashot evaluate RUN --head` does; bad input is one line and exit status 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from metashot import cli
from metashot.config import Config
from metashot.data.features import FeatureCache, differences
from metashot.data.tasks import build_source
from metashot.train import train

TASK_ARGS = {"split": "official", "val_characters": 6, "rotations": False}


@pytest.fixture(autouse=True)
def _user_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing reaches the user's own cache folder."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user-cache"))


@pytest.fixture(scope="module")
def run(omniglot_small_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A two-step ProtoNet run (Conv4 of width 8) on a few Omniglot alphabets, unrotated."""
    run = tmp_path_factory.mktemp("protonet")
    cfg = Config(method="protonet", method_args={"hidden": 8}, data_dir=str(omniglot_small_dir),
                 task_args=TASK_ARGS, ways=5, shots=2, queries=3, train_queries=2, steps=2, val_every=2,
                 val_episodes=2, test_episodes=2, device="cpu")
    train(cfg, run, progress=False)
    return run


@pytest.fixture(scope="module")
def cache(run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("features") / "test.pt"
    assert cli.main(["embed", "--from-run", str(run), "--out", str(out), "--no-progress"]) == 0
    return out


def _error(argv: list[str], capsys: pytest.CaptureFixture) -> str:
    """The one line of a command that exits 2 (argparse's own errors too), without its prefix."""
    try:
        code = cli.main(argv)
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    assert code == 2 and out == "" and err.count("\n") == 1 and "Traceback" not in err, (code, out, err)
    return err.strip().removeprefix("metashot: error: ")


def _json(argv: list[str], capsys: pytest.CaptureFixture) -> dict[str, object]:
    assert cli.main([*argv, "--json", "--no-progress"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("head", ["prototype", "cl2n"])
def test_the_cache_scores_the_runs_test_episodes(run: Path, cache: Path, head: str,
                                                 capsys: pytest.CaptureFixture) -> None:
    """The run's test episodes (its seed 0, 5-way 2-shot, 3 queries) on the cache: the accuracy
    `metashot evaluate RUN --head` gives on the images."""
    episodes = ["--test-episodes", "30", "--head", head]
    on_images = _json(["evaluate", str(run), *episodes], capsys)
    on_features = _json(["evaluate", "--features", str(cache), *episodes, "--shots", "2", "--queries", "3"],
                        capsys)
    assert on_features["stats"]["acc"] == on_images["stats"]["acc"]
    assert on_features["episodes"] == 30 and on_features["head"] == head
    torch.testing.assert_close(*(torch.tensor(r["stats"]["loss"]) for r in (on_features, on_images)),
                               rtol=1e-5, atol=1e-6)


def test_embed_says_where_and_how_fast(run: Path, cache: Path, capsys: pytest.CaptureFixture) -> None:
    assert FeatureCache.load(cache).features.shape == (45 * 20, 8)
    assert cli.main(["embed", "--from-run", str(run), "--out", str(cache), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{cache}: features [900, 8] of 45 classes (omniglot, test)\nup to date")
    assert cli.main(["embed", "--backbone", "conv4", "--backbone-args", '{"hidden": 4}', "--task", "omniglot",
                     "--data-dir", json.loads((run / "config.json").read_text())["data_dir"],
                     "--task-args", json.dumps(TASK_ARGS), "--part", "val", "--no-progress"]) == 0
    lines = capsys.readouterr().out.splitlines()
    path = Path(lines[0].split(":")[0])
    assert path.parent.name == "features" and path.name.startswith("omniglot-val-")
    assert lines[0].endswith("features [120, 4] of 6 classes (omniglot, val)")
    assert lines[1].startswith("embedded 120 images in ") and " images/s on cpu" in lines[1]


def test_bad_input_is_one_line(run: Path, cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "text.pt").write_text("not a cache")
    features = ["evaluate", "--features", str(cache)]
    text, none = tmp_path / "text.pt", tmp_path / "none.pt"
    from_run = ("embed", "--from-run", str(run))
    cases = {
        ("embed", "--task", "omniglot"): "embed needs --backbone and --task (or --from-run RUN)",
        ("embed", "--backbone", "conv4", "--task", "sinusoid"): "--task sinusoid has no images",
        ("embed", "--backbone", "nope", "--task", "omniglot"): "unknown backbone 'nope'",
        (*from_run, "--task", "omniglot"): "--from-run embeds with the run's encoder on the run's task; "
        "leave out --task",
        (*from_run, "--batch-size", "0"): "--batch-size must be at least 1, got 0",
        ("embed", "--backbone-args", "[1]"): "argument --backbone-args: expected a JSON object",
        (*from_run, "--out", str(text)): f"{text}: not a metashot feature cache",
        ("evaluate", "--features", str(none), "--head", "prototype"): f"{none}: no such feature cache",
        tuple(features): "evaluate --features needs --head NAME",
        (*features, "--head", "finetune"): "the finetune head trains the encoder on each episode's images",
        (*features, "--head", "nope"): "unknown head 'nope'",
        (*features, "--head", "prototype", "--ways", "50"): "feature cache: 50-way episodes need 50 classes, "
        "but the dataset has 45",
        (*features, "--head", "prototype", "--shots", "10", "--queries", "15"): "feature cache: shots + "
        "queries = 10 + 15 = 25 examples per class, but each class has 20",
        (*features, "--head", "prototype", "--queries", "0"): "--queries must be at least 1, got 0",
        (*features, "--head", "prototype", str(run)): "evaluate takes a run folder or --features CACHE",
    }
    for argv, message in cases.items():
        assert _error(list(argv), capsys).startswith(message), argv


def _tiny_dinov2(folder: Path) -> None:
    """A DINOv2 of one layer with random weights, saved as a user's local model is."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                       intermediate_size=64, image_size=32, patch_size=8)
    transformers.Dinov2Model(config).save_pretrained(folder)


def _processor(folder: Path, crop: int) -> None:
    """Its processor config: the shortest edge resized to 36, centre-cropped to ``crop``."""
    processor = {"image_processor_type": "BitImageProcessor", "size": {"shortest_edge": 36},
                 "crop_size": {"height": crop, "width": crop}, "do_center_crop": True, "resample": 3,
                 "image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.25, 0.25]}
    (folder / "preprocessor_config.json").write_text(json.dumps(processor))


def test_a_pretrained_backbone_by_name(patterns: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """`embed --backbone hf:/folder`: the model's own features of the images as test episodes present them;
    a changed processor (its crop) rebuilds the cache."""
    from metashot.nn.backbones import make_backbone

    model, out = tmp_path / "dino", tmp_path / "features.pt"
    _tiny_dinov2(model)
    _processor(model, 32)
    argv = ["embed", "--backbone", f"hf:{model}", "--backbone-args", '{"freeze": true}', "--task", "folder",
            "--data-dir", str(patterns), "--out", str(out), "--no-progress"]
    assert cli.main(argv) == 0
    cache = FeatureCache.load(out)
    assert cache.key["backbone"]["preprocessing"]["size"] == [32, 32]
    source = build_source(Config.from_dict(cache.config))
    backbone = make_backbone(f"hf:{model}", (1, 28, 28), freeze=True)
    test = torch.arange(len(source.dataset("test")))
    with torch.no_grad():
        torch.testing.assert_close(cache.features, backbone(source.examples("test", test)), rtol=0, atol=1e-5)
    _processor(model, 24)
    assert cli.main(argv) == 0 and "embedded 32 images" in capsys.readouterr().out
    assert differences(cache.key, FeatureCache.load(out).key) == ["backbone.preprocessing"]
