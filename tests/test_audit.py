"""The black-box audit's findings, each as a command, its one line and its exit status: a run folder
never runs code of its own, and every failure of a run folder, a checkpoint, a backbone factory or an
image is one line ``metashot: error: ...`` with exit status 2, nothing half-written. Sinusoid runs and
tiny image folders: no Omniglot needed."""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import struct
import subprocess
import sys
import time
import warnings
import zipfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

import pytest
import torch
from PIL import Image

from metashot import cli
from metashot import io as metashot_io
from metashot.data.fewshot import FewShotDataset
from metashot.errors import RunFolderError
from metashot.runs import load_checkpoint, save_checkpoint
from metashot.train import Trainer

SINE = ["train", "maml", "--task", "sinusoid", "--no-progress"]
SHORT = ["--max-episodes", "4", "--val-every", "2", "--test-episodes", "5", "--set", "val_episodes=5"]
PAYLOAD = '''
from pathlib import Path
from torch import nn
Path(__file__).with_name("MARKER").write_text("payload ran")


def make(input_shape, **args):
    return nn.Sequential(nn.Linear(input_shape[0], 8), nn.ReLU())
'''


def _fails(argv: list[str], capsys: pytest.CaptureFixture) -> str:
    """The one error line of ``metashot argv``, which must exit with status 2 and print nothing else."""
    capsys.readouterr()
    code = cli.main(argv)
    out, err = capsys.readouterr()
    assert code == 2, (out, err)
    assert err.count("\n") == 1 and err.startswith("metashot: error: ") and out == "", err
    return err.strip().removeprefix("metashot: error: ")


def _ok(argv: list[str], capsys: pytest.CaptureFixture) -> str:
    capsys.readouterr()
    assert cli.main(argv) == 0
    return capsys.readouterr().err


@pytest.fixture()
def run(tmp_path: Path) -> Path:
    """A short finished sinusoid run."""
    run = tmp_path / "run"
    assert cli.main([*SINE, "--run-dir", str(run), *SHORT]) == 0
    return run


# -- 1. a run folder never chooses code to run ----------------------------------------------------
@pytest.fixture()
def shipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> Iterator[Path]:
    """A run folder whose config names ``payload:make`` and ships ``payload.py``, which writes MARKER
    when imported, run from inside it with it on sys.path (as ``python -m metashot`` there puts it)."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "payload.py").write_text(PAYLOAD)
    monkeypatch.chdir(run)
    monkeypatch.syspath_prepend(str(run))
    _ok([*SINE, "--run-dir", str(run), "--backbone", "payload:make", *SHORT], capsys)
    (run / "MARKER").unlink()  # the user chose the factory on the command line that trained the run
    sys.modules.pop("payload")
    yield run
    sys.modules.pop("payload", None)


def test_a_config_from_disk_never_imports_its_backbone_factory(shipped: Path,
                                                               capsys: pytest.CaptureFixture) -> None:
    refusal = (f"{shipped / 'config.json'} names the backbone factory payload:make, code that a config "
               "read from disk may not run; if you trust this run folder, pass --backbone payload:make "
               "(or --trust-code)")
    assert _fails(["evaluate", str(shipped), "--no-progress"], capsys) == refusal
    assert _fails([*SINE, "--resume", "--run-dir", str(shipped)], capsys) == refusal
    with pytest.raises(RunFolderError) as e:
        Trainer(None, shipped, resume=True, progress=False)
    assert str(e.value) == refusal
    assert not (shipped / "MARKER").exists() and "payload" not in sys.modules
    _ok(["evaluate", str(shipped), "--no-progress", "--trust-code"], capsys)
    assert (shipped / "MARKER").exists()


def test_plot_sinusoid_refuses_the_factory_unless_trusted(shipped: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    pytest.importorskip("matplotlib")
    argv = ["plot-sinusoid", str(shipped), "--out", str(tmp_path / "sine.png")]
    assert "names the backbone factory payload:make" in _fails(argv, capsys)
    assert not (shipped / "MARKER").exists()
    _ok([*argv, "--trust-code"], capsys)
    assert (shipped / "MARKER").exists() and (tmp_path / "sine.png").stat().st_size > 0


@pytest.mark.parametrize("allow", [["--trust-code"], ["--backbone", "payload:make"]])
def test_the_command_line_allows_the_factory(shipped: Path, allow: list[str],
                                             capsys: pytest.CaptureFixture) -> None:
    _ok(["evaluate", str(shipped), "--no-progress", *allow], capsys)
    _ok([*SINE, "--resume", "--run-dir", str(shipped), "--max-episodes", "6", *allow], capsys)
    assert load_checkpoint(shipped / "last.pt")["step"] == 6 and (shipped / "MARKER").exists()


def test_a_torchrun_restart_repeats_the_backbone_of_its_command_line(
    shipped: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    _ok([*SINE, "--run-dir", str(shipped), "--backbone", "payload:make", *SHORT], capsys)
    assert (shipped / "MARKER").exists()


def test_python_m_metashot_inside_a_downloaded_run_folder_runs_none_of_it(shipped: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "metashot", "evaluate", ".", "--no-progress"], cwd=shipped,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.startswith("metashot: error: config.json names the "
                                                           "backbone factory payload:make"), done.stderr
    assert done.stderr.count("\n") == 1 and not (shipped / "MARKER").exists()


# -- 2. one line where a traceback was ------------------------------------------------------------
def test_a_full_disk_while_saving_a_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    run = tmp_path / "run"
    real = metashot_io._write_temporary

    def full(path: Path, write: object) -> str:
        if path.name == "last.pt" and path.exists():  # every save after the first
            def write(f: IO[bytes]) -> None:
                f.write(b"half a checkpoint")
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(path, write)

    monkeypatch.setattr(metashot_io, "_write_temporary", full)
    argv = [*SINE, "--run-dir", str(run), *SHORT]
    assert _fails(argv, capsys) == (
        f"{run}: cannot write the checkpoint (No space left on device); nothing was half-written; the "
        f"last checkpoint, {run / 'last.pt'}, is intact and --resume continues from it")
    state = load_checkpoint(run / "last.pt")
    assert state["step"] == 2 and load_checkpoint(run / "best.pt")["step"] == 2
    assert sorted(p.name for p in run.iterdir()) == [".lock", "best.pt", "config.json", "last.pt",
                                                     "metrics.csv"]
    assert len((run / "metrics.csv").read_text().splitlines()) == 2  # the header and step 2's row
    monkeypatch.undo()
    _ok([*SINE, "--resume", "--run-dir", str(run)], capsys)
    assert load_checkpoint(run / "last.pt")["step"] == 4


def test_weights_that_do_not_fit_the_config(run: Path, capsys: pytest.CaptureFixture) -> None:
    weights = load_checkpoint(run / "best.pt")["method"]
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "backbone_args": {"hidden": 16}}))
    sizes = [f"{k} {list(v.shape)} (the network's: {[16 if d == 40 else d for d in v.shape]})"
             for k, v in weights.items() if 40 in v.shape]
    fit = f"its weights do not fit the network of {run / 'config.json'} (size mismatch: "
    assert _fails(["evaluate", str(run), "--no-progress"], capsys) == (
        f"{run / 'best.pt'}: {fit}{', '.join(sizes[:3])} and {len(sizes) - 3} more)")
    assert _fails([*SINE, "--resume", "--run-dir", str(run)], capsys).startswith(f"{run / 'last.pt'}: {fit}")
    (run / "config.json").write_text(json.dumps(config))
    save_checkpoint(run / "best.pt", {"method": {"weight": torch.zeros(2)}})
    keys = list(weights)
    assert _fails(["evaluate", str(run), "--no-progress"], capsys) == (
        f"{run / 'best.pt'}: {fit.removesuffix('size mismatch: ')}missing keys: {', '.join(keys[:3])} and "
        f"{len(keys) - 3} more; unexpected keys: weight)")


@pytest.mark.parametrize("damage", [
    lambda rows: "rows", lambda rows: [1, 2], lambda rows: [{"step": 2}], lambda rows: rows + [None],
    lambda rows: [{**rows[0], "step": "2"}], lambda rows: [{**rows[0], "colour": 1}],
])
def test_a_last_pt_whose_rows_are_not_rows(run: Path, damage: Callable[[list], object],
                                           capsys: pytest.CaptureFixture) -> None:
    state = load_checkpoint(run / "last.pt")
    save_checkpoint(run / "last.pt", {**state, "rows": damage(state["rows"])})
    assert _fails([*SINE, "--resume", "--run-dir", str(run)], capsys) == (
        f"{run / 'last.pt'}: its 'rows' are not metrics rows (a list of dicts of step, episodes, minutes, "
        "lr, train_loss, train_metric, val_metric, val_ci95); the checkpoint is damaged or not metashot's")


@pytest.mark.parametrize(("code", "message"), [
    ("def boom(input_shape, **args):\n    raise RuntimeError('no GPU here\\nsecond line')\n",
     "maml: backbone factory 'broken:boom' raised RuntimeError: no GPU here"),
    ("raise ImportError('needs timm')\n",
     "maml: backbone 'broken:boom': importing 'broken' raised ImportError: needs timm"),
])
def test_a_backbone_factory_that_raises(code: str, message: str, tmp_path: Path,
                                        capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch,
                                        ) -> None:
    (tmp_path / "broken.py").write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "broken", raising=False)
    assert _fails([*SINE, "--run-dir", str(tmp_path / "run"), "--backbone", "broken:boom"], capsys) == message
    assert not (tmp_path / "run").exists()


def _bilevel_png(path: Path, width: int, height: int) -> None:
    """A black 1-bit PNG, written row by row: 20000 x 20000 is 50 MB of pixels but a few kB of file."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    z, row = zlib.compressobj(9), b"\0" * (1 + (width + 7) // 8)
    pixels = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    png = chunk(b"IHDR", ihdr) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + png)


def test_a_decompression_bomb_in_an_image_folder(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = tmp_path / "images"
    for c in range(3):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(3):
            Image.new("L", (8, 8), 40 * c + i).save(root / f"class{c}" / f"{i}.png")
    bomb = root / "class1" / "big.png"
    _bilevel_png(bomb, 20_000, 20_000)
    argv = ["train", "protonet", "--task", "folder", "--data-dir", str(root), "--no-progress", "--ways", "2",
            "--run-dir", str(tmp_path / "run")]
    assert _fails(argv, capsys) == (
        f"folder: {bomb}: too large to decode (Image size (400000000 pixels) exceeds limit of "
        f"{2 * Image.MAX_IMAGE_PIXELS} pixels, could be decompression bomb DOS attack); shrink the image or "
        "remove it")
    assert not (tmp_path / "run").exists()


def test_a_decompression_bomb_warning_made_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "a").mkdir()
    _bilevel_png(tmp_path / "a" / "wide.png", 40, 40)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 1600 pixels: over it, under twice it
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with pytest.raises(ValueError) as e:
            FewShotDataset.from_folder(tmp_path)
    assert str(e.value) == (f"{tmp_path / 'a' / 'wide.png'}: too large to decode (Image size (1600 pixels) "
                            "exceeds limit of 1000 pixels, could be decompression bomb DOS attack); shrink "
                            "the image or remove it")


def test_a_decompression_bomb_in_an_omniglot_zip(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    _bilevel_png(tmp_path / "big.png", 20_000, 20_000)
    for name in ("images_background", "images_evaluation"):
        with zipfile.ZipFile(tmp_path / f"{name}.zip", "w") as z:
            z.write(tmp_path / "big.png", f"{name}/Alphabet/character01/0001_01.png")
    argv = ["train", "protonet", "--no-progress", "--run-dir", str(tmp_path / "run"), "--data-dir",
            str(tmp_path)]
    assert _fails(argv, capsys).startswith("images_background.zip: Alphabet/character01 drawer 01 does not "
                                           "decode (Image size (400000000 pixels) exceeds limit of ")


# -- 3. a kill before config.json ------------------------------------------------------------------
@pytest.mark.parametrize("left", [[], [".lock"], [".lock", ".config.json.k2x9.tmp"]])
def test_resume_of_a_folder_killed_before_its_config_starts_afresh(
    left: list[str], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    for name in left:
        (run / name).write_text("")
    err = _ok([*SINE, "--resume", "--run-dir", str(run), *SHORT], capsys)
    assert err.splitlines()[0] == (f"metashot: {run} has no config.json (stopped before its first save); "
                                   "starting it afresh with this command's config")
    assert load_checkpoint(run / "last.pt")["step"] == 4 and not list(run.glob(".*.tmp"))


def test_resume_of_a_folder_of_other_files_is_still_refused(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    assert "config.json: no such file" in _fails([*SINE, "--resume", "--run-dir", str(tmp_path)], capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


# -- 4. signals, and the smaller findings ---------------------------------------------------------
def _signal_once_started(argv: list[str], started: str, signum: int) -> subprocess.CompletedProcess:
    """Run ``metashot argv``, send ``signum`` once its stderr matches ``started``, and wait for it to end."""
    p = subprocess.Popen([sys.executable, "-m", "metashot", *argv], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    seen, deadline = b"", time.monotonic() + 120
    while not re.search(started.encode(), seen) and p.poll() is None and time.monotonic() < deadline:
        seen += p.stderr.read1(4096)
    p.send_signal(signum)
    out, err = p.communicate(timeout=120)
    return subprocess.CompletedProcess(p.args, p.returncode, out.decode(), (seen + err).decode())


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_during_training_is_exit_status_128_plus_it(signum: int, tmp_path: Path) -> None:
    argv = ["train", "maml", "--preset", "maml-sinusoid", "--max-episodes", "100000", "--test-episodes", "5",
            "--set", "val_episodes=5", "--run-dir", str(tmp_path / "run")]
    done = _signal_once_started(argv, r"train maml: .* [1-9]\d*/100000", signum)  # once steps are done
    name = signal.Signals(signum).name
    assert done.returncode == 128 + signum, done.stderr
    assert done.stderr.splitlines()[-1].startswith(f"metashot: stopped by {name} at step "), done.stderr
    assert "Traceback" not in done.stderr and load_checkpoint(tmp_path / "run" / "last.pt")["step"] > 0


def test_sigterm_during_evaluate_is_exit_status_143(run: Path) -> None:
    done = _signal_once_started(["evaluate", str(run), "--test-episodes", "10000000"], "evaluate",
                                signal.SIGTERM)
    # a signal during the progress bar's first draw leaves the bar's text before the message
    assert done.returncode == 143 and done.stderr.rstrip().endswith("metashot: stopped by SIGTERM")
    assert "Traceback" not in done.stderr and json.loads((run / "result.json").read_text())["episodes"] == 5


def test_evaluate_a_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "result.json").write_text("{}")
    message = f"{tmp_path / 'result.json'}: is a file, not a run folder"
    assert _fails(["evaluate", str(tmp_path / "result.json")], capsys) == message


@pytest.mark.parametrize("checkpoint", ["../best.pt", "/etc/passwd", "sub/../../run/last.pt", "link.pt"])
def test_evaluate_checkpoint_outside_the_run_folder(run: Path, checkpoint: str,
                                                    capsys: pytest.CaptureFixture) -> None:
    (run / "link.pt").symlink_to(run.parent / "elsewhere.pt")
    assert _fails(["evaluate", str(run), "--checkpoint", checkpoint, "--no-progress"], capsys) == (
        f"--checkpoint {checkpoint}: not in the run folder {run}; give the name of a checkpoint in it, "
        "such as best.pt or last.pt")


def test_evaluate_checkpoint_in_the_run_folder(run: Path, capsys: pytest.CaptureFixture) -> None:
    _ok(["evaluate", str(run), "--checkpoint", "last.pt", "--no-progress"], capsys)


def test_evaluate_backbone_only_allows_the_runs_own(run: Path, capsys: pytest.CaptureFixture) -> None:
    assert _fails(["evaluate", str(run), "--backbone", "mlp", "--no-progress"], capsys) == (
        f"{run} was trained with the method's own backbone; --backbone mlp cannot change it (it only "
        "allows the run's own factory)")


def test_a_corrupt_best_pt_does_not_block_resume(run: Path, capsys: pytest.CaptureFixture) -> None:
    (run / "best.pt").write_bytes(b"garbage" * 10)
    err = _ok([*SINE, "--resume", "--run-dir", str(run)], capsys)
    assert err.splitlines()[0] == (
        f"metashot: warning: {run / 'best.pt'}: truncated, corrupt or not a metashot checkpoint (Unsupported "
        "operand 103); the test takes the last weights unless a validation beats the best so far")
    last = load_checkpoint(run / "last.pt")
    assert last["step"] == 4 and json.loads((run / "result.json").read_text())["episodes"] == 5


class _Calls:
    def __reduce__(self) -> tuple:
        return (print, ("a pickle ran this",))


class _Plain:
    pass


@pytest.mark.parametrize(("obj", "name"), [(_Calls(), "print"), (_Plain(), f"{__name__}._Plain")])
def test_a_pickle_that_would_run_code(obj: object, name: str, run: Path,
                                      capsys: pytest.CaptureFixture) -> None:
    torch.save({"method": obj}, run / "best.pt")
    assert _fails(["evaluate", str(run), "--no-progress"], capsys) == (
        f"{run / 'best.pt'}: this file would run code when read (it names {name}); metashot loads "
        "only tensors and plain data, so it is not a metashot checkpoint")
