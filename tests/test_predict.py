"""The few-shot classifier of one's own images (metashot.predict, `metashot fit` / `metashot predict`): on
solid-colour classes a stand-in pretrained backbone separates exactly, and on a short Omniglot ProtoNet
run (``--from-run``), whose predictions must be the run's own on the same images."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from torch import nn

from metashot import cli
from metashot.batches import Episode
from metashot.config import Config
from metashot.methods.protonet import PrototypeHead
from metashot.predict import FewShotClassifier, UncalibratedWarning, fit_temperature, leave_one_out
from metashot.runs import RunFolder
from metashot.train import train

# three solid-colour classes, symmetric under a permutation of the channels: a grey image is equally far
# from every prototype of mean-colour features
COLOURS = {"red": (0, 1, 1), "green": (1, 0, 1), "blue": (1, 1, 0)}


def _colour(name: str, shade: int) -> tuple[int, int, int]:
    return tuple(200 + shade if c == 0 else 30 for c in COLOURS[name])


class StandInPreprocessing:
    """The attributes of metashot.nn.pretrained.Preprocessing a classifier uses."""

    size = (16, 16)

    def read(self, image: str | Path | Image.Image) -> torch.Tensor:
        try:
            im = image if isinstance(image, Image.Image) else Image.open(image)
            im = im.convert("RGB").resize(self.size)
        except OSError as e:
            raise ValueError(f"{image}: not an image ({e})") from None
        return torch.from_numpy(__import__("numpy").asarray(im).copy()).permute(2, 0, 1)

    def to_dict(self) -> dict[str, Any]:
        return {"size": list(self.size)}


class StandIn(nn.Module):
    """A frozen "pretrained" backbone: the mean colour, times 10, of float images [M, C, h, w] in [0, 1]."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name, self.preprocessing, self.freeze, self.lr_scale = name, StandInPreprocessing(), True, None
        self.scale = nn.Parameter(torch.tensor(10.0), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * x.expand(-1, 3, -1, -1).mean((2, 3))

    def reference(self) -> dict[str, Any]:
        return {"name": self.name, "weights": float(self.scale), "size": list(self.preprocessing.size)}


@pytest.fixture(autouse=True)
def stand_in(monkeypatch: pytest.MonkeyPatch) -> None:
    from metashot.nn import backbones

    real = backbones.make_backbone

    def make(name: str, input_shape: tuple[int, ...], **args: Any) -> nn.Module:
        return StandIn(name) if name == "hf:stand-in" else real(name, input_shape, **args)

    monkeypatch.setattr(backbones, "make_backbone", make)


@pytest.fixture(scope="module")
def colours(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A support folder of the three colours, three shades each (one a JPEG), and a query folder."""
    root = tmp_path_factory.mktemp("colours")
    for name in COLOURS:
        (root / "support" / name).mkdir(parents=True)
        for shade in (-20, 0, 20):
            Image.new("RGB", (20, 12), _colour(name, shade)).save(root / "support" / name / f"{shade}.png")
    (root / "query").mkdir()
    for name in COLOURS:
        for shade in (-30, 10):
            Image.new("RGB", (9, 9), _colour(name, shade)).save(root / "query" / f"{name}{shade}.png")
    return root


def _fit(colours: Path, **kwargs: Any) -> FewShotClassifier:
    return FewShotClassifier.from_folder(colours / "support", backbone="hf:stand-in", device="cpu", **kwargs)


def _queries(colours: Path) -> tuple[list[Path], list[str]]:
    files = sorted((colours / "query").iterdir())
    return files, [f.stem.rstrip("-0123456789") for f in files]


def test_fit_then_predict_names_every_colour(colours: Path) -> None:
    clf = _fit(colours)
    assert clf.classes == ["blue", "green", "red"] and clf.images_per_class == [3, 3, 3]
    files, truth = _queries(colours)
    names, p = clf.predict(files)
    assert names == truth
    probabilities = clf.predict_proba(files)
    assert torch.allclose(probabilities.sum(-1), torch.ones(len(files)), atol=1e-6)
    assert torch.equal(p[:, 0], probabilities.max(-1).values)
    # a PIL image and a tensor (float in [0, 1], any size) are the file's image
    image = Image.open(files[0]).convert("RGB")
    tensor = torch.tensor(_colour("blue", -30)).float().div(255)[:, None, None].expand(3, 5, 7)
    assert clf.predict([image, tensor])[0] == ["blue", "blue"]


def test_top_k_order_and_the_threshold(colours: Path) -> None:
    clf = _fit(colours)
    files, truth = _queries(colours)
    grey = Image.new("RGB", (8, 8), (90, 90, 90))
    names, p = clf.predict([*files, grey], top_k=3)
    assert [n[0] for n in names[:-1]] == truth and all(sorted(n) == clf.classes for n in names[:-1])
    assert bool((p[:, :-1] >= p[:, 1:]).all())  # best first
    assert torch.allclose(p[-1], torch.full((3,), 1 / 3), atol=1e-5)  # equally far from every colour
    names, p = clf.predict([files[0], grey], threshold=0.5)
    assert names == ["blue", None]
    assert _fit(colours, threshold=0.5).predict(grey)[0] == [None]  # the fitted default
    assert clf.predict(grey)[0] != [None]  # threshold 0: always a class


def test_save_and_load_give_the_same_predictions(colours: Path, tmp_path: Path) -> None:
    clf = _fit(colours, head="linear", head_args={"steps": 20})  # a head that draws its start: seeded
    files, _ = _queries(colours)
    clf.save(tmp_path / "clf")
    again = FewShotClassifier.load(tmp_path / "clf", "cpu")
    assert torch.equal(again.predict_proba(files), clf.predict_proba(files))
    assert again.temperature == clf.temperature and again.classes == clf.classes
    saved = json.loads((tmp_path / "clf" / "classifier.json").read_text())
    assert saved["features"]["backbone"] == "hf:stand-in" and saved["head"] == "linear"
    assert saved["calibrated"] is True and saved["format"] == 1
    clf.save(tmp_path / "clf")  # replaces a classifier folder whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clf"]


def _brute_force_temperature(support: torch.Tensor, labels: torch.Tensor, ways: int) -> float:
    """Leave-one-out by hand (each prototype a loop's mean) and the cross-entropy against the labels
    smoothed by 1 / (L + 2) on a fine grid of T."""
    logits, targets = [], []
    for i in range(len(labels)):
        if int((labels == labels[i]).sum()) < 2:
            continue
        keep = torch.arange(len(labels)) != i
        protos = torch.stack([support[keep & (labels == c)].mean(0) for c in range(ways)])
        logits.append(-((support[i] - protos) ** 2).sum(-1))
        targets.append(int(labels[i]))
    z, y = torch.stack(logits).double(), torch.tensor(targets)
    grid = torch.logspace(-3, 3, 60001, dtype=torch.float64)
    log_p = (z / grid[:, None, None]).log_softmax(-1)  # [G, L, N]
    eps = 1 / (len(y) + 2)
    target = torch.nn.functional.one_hot(y, ways).double() * (1 - eps - eps / (ways - 1)) + eps / (ways - 1)
    loss = -(log_p * target).sum(-1).mean(-1)
    return float(grid[loss.argmin()])


def test_leave_one_out_temperature_is_the_brute_force_one() -> None:
    g = torch.Generator().manual_seed(0)
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 1, 2, 2, 3])  # class 3's one image is never left out
    support = torch.randn(10, 4, generator=g) + 1.5 * torch.randn(4, 4, generator=g)[labels]
    scored = leave_one_out(PrototypeHead(), support, labels, 4, budget=8)  # batched 2 at a time
    assert scored[0].shape == (9, 4) and scored[1].tolist() == labels[:9].tolist()
    t = fit_temperature(*scored)
    assert math.isclose(t, _brute_force_temperature(support, labels, 4), rel_tol=1e-3)
    assert leave_one_out(PrototypeHead(), support[:3], torch.tensor([0, 1, 2]), 3) is None


def test_a_support_set_classified_perfectly_keeps_a_finite_temperature() -> None:
    labels = torch.arange(3).repeat_interleave(4)
    noise = torch.randn(12, 3, generator=torch.Generator().manual_seed(0))
    support = torch.eye(3)[labels] * 10 + 0.01 * noise
    log_p, y = leave_one_out(PrototypeHead(), support, labels, 3)
    assert (log_p.argmax(-1) == y).all()  # the plain NLL would drive T to 0 and every probability to 1
    p = (log_p / fit_temperature(log_p, y)).softmax(-1).max(-1).values
    assert p.mean().item() == pytest.approx(1 - 1 / (12 + 2), abs=0.01)  # Laplace's (L + 1) / (L + 2)


def test_one_image_per_class_is_uncalibrated(colours: Path, tmp_path: Path) -> None:
    for name in COLOURS:
        (tmp_path / "one" / name).mkdir(parents=True)
        Image.new("RGB", (4, 4), _colour(name, 0)).save(tmp_path / "one" / name / "a.png")
    clf = FewShotClassifier.from_folder(tmp_path / "one", backbone="hf:stand-in", device="cpu")
    assert not clf.calibrated and clf.temperature == 1
    files, truth = _queries(colours)
    with pytest.warns(UncalibratedWarning, match="not calibrated"):
        assert clf.predict(files)[0] == truth


def _cli(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    try:
        code = cli.main(argv)
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def test_fit_and_predict_commands_print_json_csv_and_skip_bad_images(
    colours: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    clf = tmp_path / "clf"
    code, out, err = _cli(["fit", str(colours / "support"), "--backbone", "hf:stand-in", "--out", str(clf),
                           "--device", "cpu", "--no-progress"], capsys)
    assert code == 0, err
    assert "3 classes, 9 images" in out and "  red    3 images" in out and "temperature " in out
    (tmp_path / "bad.png").write_bytes(b"not a png")
    files, truth = _queries(colours)
    argv = ["predict", str(clf), str(colours / "query"), str(tmp_path / "bad.png"), "--no-progress"]
    code, out, err = _cli([*argv, "--json", "--top-k", "2"], capsys)
    assert code == 0
    assert err.count("metashot: warning: ") == 1 and f"{tmp_path / 'bad.png'}" in err and "skipped" in err
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["image"] for r in rows] == [str(f) for f in files] and [r["class"] for r in rows] == truth
    assert all(r["top"][0] == [r["class"], r["probability"]] and len(r["top"]) == 2 for r in rows)
    Image.new("RGB", (8, 8), (90, 90, 90)).save(tmp_path / "grey.png")
    code, out, _ = _cli([*argv[:-1], str(tmp_path / "grey.png"), "--csv", "--threshold", "0.5"], capsys)
    table = list(csv.DictReader(io.StringIO(out)))
    assert list(table[0]) == ["image", "class", "probability", "top1", "top1_probability"]
    assert [r["class"] for r in table] == [*truth, ""]  # the grey image is none of these
    assert [r["top1"] for r in table[:-1]] == truth and math.isclose(float(table[-1]["probability"]), 1 / 3,
                                                                     rel_tol=1e-4)
    code, out, _ = _cli(argv, capsys)
    assert [line.split()[1] for line in out.splitlines()] == truth


def _error(argv: list[str], capsys: pytest.CaptureFixture) -> str:
    code, out, err = _cli(argv, capsys)
    assert code == 2, (out, err)
    assert err.count("\n") == 1 and err.startswith("metashot: error: ") and "Traceback" not in err
    return err.strip()


def test_bad_input_is_one_line_and_exit_2(colours: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture) -> None:
    fit = ["fit", "--backbone", "hf:stand-in", "--out", str(tmp_path / "clf"), "--no-progress"]
    (tmp_path / "empty" / "a").mkdir(parents=True)
    (tmp_path / "empty" / "b").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "empty" / "a" / "x.png")
    assert "empty" in _error([*fit, str(tmp_path / "empty")], capsys)
    (tmp_path / "empty" / "b" / "y.jpg").write_bytes(b"\xff\xd8 broken")
    assert f"{tmp_path / 'empty' / 'b' / 'y.jpg'}" in _error([*fit, str(tmp_path / "empty")], capsys)
    (tmp_path / "single" / "a").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(tmp_path / "single" / "a" / "x.png")
    assert "a classifier needs at least 2" in _error([*fit, str(tmp_path / "single")], capsys)
    assert "no such folder" in _error([*fit, str(tmp_path / "nope")], capsys)
    assert "is not a pretrained model" in _error(["fit", str(colours / "support"), "--backbone", "conv4",
                                                  "--out", str(tmp_path / "c")], capsys)
    assert not (tmp_path / "clf").exists() and not (tmp_path / "c").exists()
    assert "no such classifier folder" in _error(["predict", str(tmp_path / "nope"), "x.png"], capsys)
    _fit(colours).save(tmp_path / "clf")
    saved = json.loads((tmp_path / "clf" / "classifier.json").read_text())
    (tmp_path / "clf" / "classifier.json").write_text(json.dumps({**saved, "format": 99}))
    message = _error(["predict", str(tmp_path / "clf"), str(colours / "query")], capsys)
    assert "a classifier of format 99 (by metashot 0.1.0); metashot 0.1.0 reads format 1" in message
    assert "not a classifier folder" in _error([*fit[:-2], str(colours), "--no-progress",
                                                str(colours / "support")], capsys)


@pytest.fixture(scope="module")
def protonet_run(omniglot_small_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ten-step ProtoNet run (Conv4 of width 8) on a few Omniglot alphabets."""
    run = tmp_path_factory.mktemp("protonet")
    cfg = Config(method="protonet", method_args={"hidden": 8}, data_dir=str(omniglot_small_dir),
                 task_args={"split": "official", "val_characters": 6}, ways=5, shots=2, queries=3,
                 train_queries=2, steps=10, val_every=10, val_episodes=4, test_episodes=4)
    train(cfg, run, progress=False)
    return run


def test_a_run_classifies_files_as_its_own_head_classifies_its_images(
    protonet_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    source, method = RunFolder(protonet_run).method(Config.load(protonet_run / "config.json")
                                                    .replace(device="cpu"))
    data = source.dataset("test")
    images = data.flat.view(data.num_classes, -1, *data.image_shape)[:5, :6]  # [5, 6, 1, 28, 28], ink 255
    for c in range(5):  # written as Omniglot's files are: black strokes on white
        (tmp_path / "support" / f"char{c}").mkdir(parents=True)
        for i in range(6):
            folder = "support" if i < 2 else "query"
            (tmp_path / folder / f"char{c}").mkdir(parents=True, exist_ok=True)
            Image.fromarray(255 - images[c, i, 0].numpy()).save(tmp_path / folder / f"char{c}" / f"{i}.png")
    clf = tmp_path / "clf"
    code, out, err = _cli(["fit", str(tmp_path / "support"), "--from-run", str(protonet_run), "--out",
                           str(clf), "--device", "cpu"], capsys)
    assert code == 0, err
    code, out, err = _cli(["predict", str(clf), str(tmp_path / "query"), "--json", "--top-k", "5"], capsys)
    rows = [json.loads(line) for line in out.splitlines()]
    # the run's head on the same images, as a test episode hands them to it
    one = Episode(support=source.present(images[:, :2].flatten(0, 1)), support_labels=torch.arange(5)
                  .repeat_interleave(2), query=source.present(images[:, 2:].flatten(0, 1)),
                  query_labels=torch.arange(5).repeat_interleave(4), num_ways=5)
    episode = Episode.collate([one])
    with torch.no_grad():
        log_p = method.eval().log_probs(episode)[0]
    t = json.loads((clf / "classifier.json").read_text())["temperature"]
    expected = (log_p / t).softmax(-1)
    for row, p in zip(rows, expected):
        got = dict(map(tuple, row["top"]))
        assert torch.allclose(torch.tensor([got[f"char{c}"] for c in range(5)]), p, atol=1e-5)
    loaded = FewShotClassifier.load(clf)
    stored = loaded.predict(images[:, 2:].flatten(0, 1))[0]  # tensors: the task's stored images
    assert stored == [r["class"] for r in rows]
    # a classifier folder is data: one naming code to import is refused before anything runs
    saved = json.loads((clf / "classifier.json").read_text())
    marker = tmp_path / "ran"
    saved["features"]["config"]["backbone"] = "subprocess:run"
    saved["features"]["task_info"]["input_shape"] = ["sh", "-c", f"touch {marker}"]
    (clf / "classifier.json").write_text(json.dumps(saved))
    code, out, err = _cli(["predict", str(clf), str(tmp_path / "query")], capsys)
    assert code == 2 and "names the backbone factory 'subprocess:run', code that a classifier" in err
    assert not marker.exists()


def test_a_tiny_dinov2_saved_locally_fits_and_predicts_by_its_folder(
    colours: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    transformers = pytest.importorskip("transformers")
    from transformers.models.bit import image_processing_pil_bit as bit

    torch.manual_seed(0)
    config = transformers.Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                       intermediate_size=64, image_size=32, patch_size=8)
    transformers.Dinov2Model(config).save_pretrained(tmp_path / "dino")
    bit.BitImageProcessorPil(size={"shortest_edge": 36}, crop_size={"height": 32, "width": 32}) \
        .save_pretrained(tmp_path / "dino")
    clf = tmp_path / "clf"
    code, out, err = _cli(["fit", str(colours / "support"), "--backbone", f"hf:{tmp_path / 'dino'}", "--out",
                           str(clf), "--device", "cpu", "--no-progress"], capsys)
    assert code == 0, err
    saved = json.loads((clf / "classifier.json").read_text())
    assert saved["features"]["preprocessing"]["size"] == [32, 32] and saved["features"]["preprocessing"][
        "resize"] == 36
    files, truth = _queries(colours)
    code, out, err = _cli(["predict", str(clf), *map(str, files), "--json"], capsys)
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["class"] for r in rows] == truth
    loaded = FewShotClassifier.load(clf, "cpu")
    assert [r["probability"] for r in rows] == loaded.predict(files)[1][:, 0].tolist()
    code, _, err = _cli(["fit", str(colours / "support"), "--backbone", f"hf:{tmp_path / 'none'}", "--out",
                         str(tmp_path / "c")], capsys)
    last = err.splitlines()[-1]  # after transformers' own progress bars, when it printed any
    assert code == 2 and last.startswith("metashot: error: ") and f"no folder {tmp_path / 'none'}" in last


@pytest.mark.cuda
def test_on_cuda_the_same_answers_as_on_the_cpu(colours: Path, tmp_path: Path) -> None:
    files, truth = _queries(colours)
    cpu = _fit(colours)
    gpu = FewShotClassifier.from_folder(colours / "support", backbone="hf:stand-in", device="cuda")
    assert gpu.support.device.type == "cuda" and gpu.predict(files)[0] == truth
    assert torch.allclose(gpu.predict_proba(files).cpu(), cpu.predict_proba(files), atol=1e-5)
    gpu.save(tmp_path / "clf")
    assert torch.equal(FewShotClassifier.load(tmp_path / "clf", "cuda").predict_proba(files),
                       gpu.predict_proba(files))
