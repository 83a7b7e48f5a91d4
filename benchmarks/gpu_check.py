"""The GPU check: one prepared script for a machine with a GPU, one JSON line per stage, in under 6 minutes.

    python benchmarks/gpu_check.py --device cuda --data-dir shared/data/omniglot
    OMP_NUM_THREADS=1 python benchmarks/gpu_check.py --device cpu --dry-run   # every stage, toy sizes

Each stage runs in a process of its own under a time limit, so a failure, a hang or a broken CUDA context
in one is reported as ``{"stage": ..., "ok": false, "error": ...}`` and the next stage runs; a stage that
cannot run here says why (``"ok": null, "skipped": ...``). The last line sums up. The stages:

- ``env``: torch, CUDA, cuDNN, the GPU's name, memory and multiprocessors; measured matmul TFLOP/s in
  fp32 (TF32 off), TF32 and bf16.
- ``vmap_loop``: MAML's vmap and loop meta-gradients on the device (the CPU test's comparison,
  tests/methods/test_maml.py, first and second order, norm layers adapted or not) in float64, then float32
  with TF32 off and on, each against the CPU's float64 loop too.
- ``parity``: loss and gradients of one batch on the CPU and on the device, for every method of
  ``metashot.methods.METHODS`` and MAML's variants (benchmarks/sync_census.py's cases), float64 and float32.
- ``sync_census``: the synchronizing CUDA calls of one training step per case
  (``torch.cuda.set_sync_debug_mode``, then the step again under "error"); on a CPU, the host-read proxy.
- ``cli``: ``metashot train`` (ProtoNet on Omniglot, and fp32/bf16 when ``--precision`` exists), ``--resume``,
  ``evaluate`` and ``plot-sinusoid`` (on a MAML sinusoid run) on the device, reading Omniglot from
  ``--data-dir``.
- ``speed_maml``, ``speed_protonet``, ``speed_mann``, ``speed_resnet12``, ``speed_mann_compiled``: training
  steps at the presets' shapes on random data (MAML loop and vmap 5w1s/20w1s; ProtoNet 60-way; MANN eager;
  ResNet-12 ProtoNet at 84 px in fp32, TF32 and bf16 autocast; MANN's recurrence compiled, last, as its
  first compile may take minutes): ms a step, steps/s, episodes/s, peak memory. They run one at a time
  after the others (which run side by side, ``--jobs``).
- ``determinism``: two identical short runs with ``deterministic`` give identical weights (ProtoNet, MAML),
  and a run stopped halfway and resumed gives the straight run's weights.
- ``distributed``: two ranks on one device over gloo (``METASHOT_DIST_BACKEND=gloo``, torchrun), against
  one process on the same global meta-batch.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT / "src", ROOT):  # metashot from this checkout, and the tests' comparison helpers
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import torch  # noqa: E402

from benchmarks.sync_census import (  # noqa: E402
    CASES,
    census,
    make_case,
    synchronize,
    tf32,
    time_steps,
    toy,
    train_step,
)
from metashot import presets  # noqa: E402
from metashot.config import Config  # noqa: E402

BUDGET_S = 330  # all stages together, under the 6 minutes the check is sized for
LIMITS_S = {"env": 40, "vmap_loop": 60, "parity": 60, "sync_census": 50, "cli": 120, "determinism": 120,
            "distributed": 90, "speed_maml": 60, "speed_protonet": 30, "speed_mann": 30, "speed_resnet12": 60,
            "speed_mann_compiled": 150}
Stage = Callable[[argparse.Namespace], dict[str, Any]]
STAGES: dict[str, Stage] = {}
TIMED = {"env", "speed_maml", "speed_protonet", "speed_mann", "speed_resnet12", "speed_mann_compiled"}


def stage(fn: Stage) -> Stage:
    STAGES[fn.__name__.removeprefix("stage_")] = fn
    return fn


def _has_field(name: str) -> bool:
    return name in Config.__dataclass_fields__


# -- environment -------------------------------------------------------------------------------------
def matmul_tflops(device: torch.device, dtype: torch.dtype, n: int, reps: int, allow_tf32: bool) -> float:
    """Measured TFLOP/s of an n x n x n product, the mean of ``reps`` after 3 warm-ups."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    with tf32(allow_tf32):
        for _ in range(3):
            a @ b
        synchronize(device)
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        synchronize(device)
    return round(2 * n**3 * reps / (time.perf_counter() - t0) / 1e12, 3)


@stage
def stage_env(args: argparse.Namespace) -> dict[str, Any]:
    d = args.device
    row: dict[str, Any] = {"python": sys.version.split()[0], "torch": torch.__version__,
                           "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
                           "cuda_available": torch.cuda.is_available(), "threads": torch.get_num_threads()}
    if d.type == "cuda":
        p = torch.cuda.get_device_properties(d)
        row |= {"gpu": p.name, "memory_gib": round(p.total_memory / 2**30, 1),
                "multiprocessors": p.multi_processor_count, "capability": f"{p.major}.{p.minor}"}
    n, reps = (256, 3) if args.dry_run else (8192, 10)
    row["matmul_n"] = n
    for name, dtype, allow in (("fp32", torch.float32, False), ("tf32", torch.float32, True),
                               ("bf16", torch.bfloat16, False)):
        row[f"matmul_tflops_{name}"] = matmul_tflops(d, dtype, n, reps, allow)
    return {"ok": True, **row}


# -- numerics ----------------------------------------------------------------------------------------
def vmap_loop_gap(device: torch.device | str, dtype: torch.dtype, first_order: bool, adapt_norm: bool,
                  allow_tf32: bool = False) -> dict[str, float]:
    """tests/methods/test_maml.py's vmap-against-loop comparison on ``device``: the relative gaps of the
    meta-gradients (vmap to loop on the device, and the device's loop to the CPU's float64 loop)."""
    from metashot.batches import TaskInfo
    from metashot.methods.maml import MAML
    from tests.methods.test_maml import _images, _meta_grad, _rel

    def method() -> MAML:
        torch.manual_seed(0)
        return MAML.build(TaskInfo((1, 28, 28), 5, 5), inner_steps=2, test_inner_steps=3,
                          first_order=first_order, adapt_norm=adapt_norm)

    batch = _images(3, 5, 1, 2, dtype=torch.float64)
    reference = method().double()
    reference.tasks = "loop"
    want = _meta_grad(reference, batch)
    m = method().to(device, dtype)
    moved = batch.to(device)
    moved = type(moved)(*(getattr(moved, n).to(dtype) if n in ("support", "query") else getattr(moved, n)
                          for n in moved.TENSORS))
    with tf32(allow_tf32):
        m.tasks = "loop"
        loop = _meta_grad(m, moved).double().cpu()
        m.tasks = "vmap"
        vmap = _meta_grad(m, moved).double().cpu()
    return {"vmap_vs_loop": _rel(vmap, loop), "loop_vs_cpu64": _rel(loop, want)}


@stage
def stage_vmap_loop(args: argparse.Namespace) -> dict[str, Any]:
    # float64 as the CPU test's bound; float32's and TF32's from their rounding (a wrong vmap rule is O(1))
    settings = [("float64", torch.float64, False, 1e-9), ("float32", torch.float32, False, 1e-3),
                ("tf32", torch.float32, True, 3e-2)]
    rows, ok = [], True
    orders = [(False, True)] if args.dry_run else [(f, a) for f in (False, True) for a in (False, True)]
    for name, dtype, allow, bound in settings:
        for first_order, adapt_norm in orders:
            gaps = vmap_loop_gap(args.device, dtype, first_order, adapt_norm, allow)
            good = gaps["vmap_vs_loop"] < bound and gaps["loop_vs_cpu64"] < bound
            ok &= good
            rows.append({"dtype": name, "first_order": first_order, "adapt_norm": adapt_norm, "bound": bound,
                         **{k: float(f"{v:.3g}") for k, v in gaps.items()}, "ok": good})
    return {"ok": ok, "rows": rows}


def loss_and_grads(name: str, device: torch.device | str, dtype: torch.dtype) -> tuple[float, torch.Tensor]:
    """Case ``name``'s loss and gradient (every parameter's, zero where none) on one batch, on ``device``."""
    method, batch, _ = make_case(CASES[name], device, dtype)
    method.on_step(0)
    loss, _ = method.loss(batch)
    loss.backward()
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in method.parameters()]
    return loss.item(), torch.cat([g.flatten() for g in grads]).double().cpu()


@stage
def stage_parity(args: argparse.Namespace) -> dict[str, Any]:
    rows, ok = [], True
    for dtype, bound in ((torch.float64, 1e-8), (torch.float32, 1e-3)):
        with tf32(False):
            for name in CASES:
                l_cpu, g_cpu = loss_and_grads(name, "cpu", dtype)
                l_dev, g_dev = loss_and_grads(name, args.device, dtype)
                loss_gap = abs(l_dev - l_cpu) / max(abs(l_cpu), 1e-12)
                grad_gap = ((g_dev - g_cpu).norm() / g_cpu.norm().clamp_min(1e-30)).item()
                good = loss_gap < bound and grad_gap < bound
                ok &= good
                rows.append({"case": name, "dtype": str(dtype).removeprefix("torch."), "loss_gap": float(
                    f"{loss_gap:.3g}"), "grad_gap": float(f"{grad_gap:.3g}"), "ok": good})
    note = {} if args.device.type == "cuda" else {"note": "no CUDA: the CPU against itself"}
    return {"ok": ok, **note, "rows": rows}


@stage
def stage_sync_census(args: argparse.Namespace) -> dict[str, Any]:
    rows, ok = [], True
    for name in CASES:
        row = census(name, args.device)
        good = row["reads"] == 0 if args.device.type == "cuda" else row["in_metashot"] == 0
        if args.device.type == "cuda":
            row["error_mode"] = _step_under_error_mode(name, args.device)
            good &= row["error_mode"] == "ok"
        ok &= good
        rows.append({**row, "ok": good})
    return {"ok": ok, "rows": rows}


def _step_under_error_mode(name: str, device: torch.device) -> str:
    """A warmed-up training step of case ``name`` under ``set_sync_debug_mode("error")``: "ok" or the
    error's first line."""
    cfg = CASES[name]
    method, batch, optimizer = make_case(cfg, device)
    train_step(method, batch, optimizer, 0, cfg.precision)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        train_step(method, batch, optimizer, 1, cfg.precision)
        return "ok"
    except RuntimeError as e:
        return str(e).splitlines()[0][:200]
    finally:
        torch.cuda.set_sync_debug_mode("default")


# -- the command line --------------------------------------------------------------------------------
def metashot(args: argparse.Namespace, *argv: str, torchrun: int = 0, env: dict[str, str] | None = None,
             ) -> dict[str, Any]:
    """``python -m metashot ARGV`` (under torchrun with ``torchrun`` processes), in a process of its own, or
    with ``--dry-run`` and no torchrun in this one: its exit status, seconds, the JSON it printed, and the
    last line of its errors."""
    t0 = time.perf_counter()
    if args.dry_run and not torchrun:
        rc, stdout, stderr = _in_process(list(argv))
    else:
        launch = (["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={torchrun}"]
                  if torchrun else [])
        path = os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])
        done = subprocess.run([sys.executable, *launch, "-m", "metashot", *argv], capture_output=True,
                              text=True, env={**os.environ, "PYTHONPATH": path, **(env or {})}, cwd=args.work)
        rc, stdout, stderr = done.returncode, done.stdout, done.stderr
    out: dict[str, Any] = {"rc": rc, "s": round(time.perf_counter() - t0, 1)}
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    if lines:  # the test result's metric, mean and 95% interval
        out |= {k: v for k, v in json.loads(lines[-1]).items() if k in ("metric", "mean", "ci95")}
    if rc:
        out["error"] = next((line for line in reversed(stderr.splitlines()) if line.strip()), "")[:300]
    return out


def _in_process(argv: list[str]) -> tuple[int, str, str]:
    from metashot.cli import main

    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            rc = main(argv)
        except SystemExit as e:  # argparse's errors
            rc = e.code if isinstance(e.code, int) else 1
    return rc, stdout.getvalue(), stderr.getvalue()


def _run_args(args: argparse.Namespace, run: str, steps: int, *extra: str) -> list[str]:
    """A short ProtoNet-on-Omniglot run into ``run`` (``--preset`` or ``--set`` in ``extra``)."""
    episodes = "2" if args.dry_run else "20"
    return ["train", *(extra or ("protonet",)), "--task", "omniglot", "--data-dir", str(args.data_dir),
            "--device", args.device.type, "--steps", str(steps), "--val-every", str(steps), "--val-episodes",
            episodes, "--test-episodes", episodes, "--run-dir", str(Path(args.work) / run), "--no-progress",
            "--json"]


@stage
def stage_cli(args: argparse.Namespace) -> dict[str, Any]:
    if args.data_dir is None:
        return {"ok": None, "skipped": "no --data-dir with Omniglot's zips"}
    steps = 2 if args.dry_run else 20
    rows = {"train": metashot(args, *_run_args(args, "proto", steps))}
    rows["resume"] = metashot(args, "train", "--resume", "--run-dir", str(Path(args.work) / "proto"),
                              "--steps", str(2 * steps), "--no-progress", "--json")
    rows["evaluate"] = metashot(args, "evaluate", str(Path(args.work) / "proto"), "--device",
                                args.device.type, "--test-episodes", "2" if args.dry_run else "50", "--json")
    if _has_field("precision"):
        rows["train_bf16"] = metashot(args, *_run_args(args, "proto-bf16", steps, "protonet", "--set",
                                                         "precision=bf16"))
    sinusoid = ["train", "--preset", "maml-sinusoid", "--device", args.device.type, "--steps", str(steps),
                "--val-every", str(steps), "--val-episodes", "4", "--test-episodes", "4", "--run-dir",
                str(Path(args.work) / "sinusoid"), "--no-progress", "--json"]
    rows["train_sinusoid"] = metashot(args, *sinusoid)
    rows["plot_sinusoid"] = metashot(args, "plot-sinusoid", str(Path(args.work) / "sinusoid"), "--out",
                                     str(Path(args.work) / "sinusoid.png"), "--device", args.device.type)
    csv = Path(args.work) / "proto" / "metrics.csv"
    resumed_to = csv.read_text().splitlines()[-1].split(",")[0] if csv.exists() else None
    ok = all(r["rc"] == 0 for r in rows.values()) and resumed_to == str(2 * steps)
    return {"ok": ok, "resumed_to_step": resumed_to, **rows}


# -- speed -------------------------------------------------------------------------------------------
def _rows(args: argparse.Namespace, cases: list[tuple[str, Config, dict[str, Any]]]) -> dict[str, Any]:
    """A speed row per case (its name, config and :func:`time_steps` options): the presets' shapes, or
    toy ones with ``--dry-run``."""
    sizes = {"steps": 1, "warmup": 1} if args.dry_run else {}
    rows = [{"row": name, **time_steps(toy(cfg) if args.dry_run else cfg, args.device, **sizes, **kw)}
            for name, cfg, kw in cases]
    return {"ok": True, "toy": args.dry_run, "rows": rows}


def _preset(name: str, **method_args: Any) -> Config:
    cfg = presets.get(name)
    return replace(cfg, method_args=cfg.method_args | method_args)


@stage
def stage_speed_maml(args: argparse.Namespace) -> dict[str, Any]:
    return _rows(args, [(f"maml-omniglot-{s}-{t}", _preset(f"maml-omniglot-{s}", tasks=t), {})
                        for s in ("5w1s", "20w1s") for t in ("loop", "vmap")])


@stage
def stage_speed_protonet(args: argparse.Namespace) -> dict[str, Any]:
    return _rows(args, [("protonet-omniglot-60way", presets.get("protonet-omniglot-5w1s"), {})])


@stage
def stage_speed_mann(args: argparse.Namespace) -> dict[str, Any]:
    return _rows(args, [("mann-5class-onehot-eager", presets.get("mann-omniglot-5class-onehot"), {})])


@stage
def stage_speed_resnet12(args: argparse.Namespace) -> dict[str, Any]:
    cfg = presets.get("protonet-miniimagenet-resnet12-5w1s")
    return _rows(args, [("resnet12-84px-fp32", cfg, {}), ("resnet12-84px-tf32", cfg, {"allow_tf32": True}),
                        ("resnet12-84px-bf16", cfg, {"precision": "bf16"})])


@stage
def stage_speed_mann_compiled(args: argparse.Namespace) -> dict[str, Any]:
    # inductor on a GPU (its first compile is the warm-up); on a CPU dynamo's tracing alone (the eager
    # backend), without a C++ compiler's minutes
    backend = True if args.device.type == "cuda" else "eager"
    cfg = _preset("mann-omniglot-5class-onehot", compile=backend)
    return _rows(args, [("mann-5class-onehot-compiled", cfg, {})])


# -- determinism and processes -----------------------------------------------------------------------
def _weights(args: argparse.Namespace, run: str) -> dict[str, torch.Tensor]:
    state = torch.load(Path(args.work) / run / "last.pt", map_location="cpu", weights_only=True)
    return state["method"]


def _max_gap(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].is_floating_point()),
               default=0.0)


def _relative_gap(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """||a - b|| / ||a|| over the learned tensors (not running statistics) as one vector. (Adam turns
    rounding noise in a near-zero gradient, such as a bias before batch norm, into whole steps, so single
    weights may differ by the learning rate.)"""
    keys = [k for k in a if a[k].is_floating_point() and "running_" not in k]
    va, vb = (torch.cat([w[k].double().flatten() for k in keys]) for w in (a, b))
    return ((va - vb).norm() / va.norm()).item()


@stage
def stage_determinism(args: argparse.Namespace) -> dict[str, Any]:
    if args.data_dir is None:
        return {"ok": None, "skipped": "no --data-dir with Omniglot's zips"}
    if not _has_field("deterministic"):
        return {"ok": None, "skipped": "this metashot has no deterministic option"}
    steps = 2 if args.dry_run else 10
    rows, ok = {}, True
    for method in ("protonet", "maml"):
        runs = {}
        for run in ("a", "b"):
            runs[run] = metashot(args, *_run_args(args, f"det-{method}-{run}", steps, method, "--set",
                                                  "deterministic=true", "--meta-batch", "4"))
        row: dict[str, Any] = {"runs": runs}
        if all(r["rc"] == 0 for r in runs.values()):
            a, b = (_weights(args, f"det-{method}-{run}") for run in ("a", "b"))
            row["identical"] = _max_gap(a, b) == 0
        ok &= bool(row.get("identical"))
        rows[method] = row
    half = metashot(args, *_run_args(args, "det-protonet-c", steps // 2, "protonet", "--set",
                                     "deterministic=true", "--meta-batch", "4"))
    resumed = metashot(args, "train", "--resume", "--run-dir", str(Path(args.work) / "det-protonet-c"),
                       "--steps", str(steps), "--no-progress", "--json")
    rows["resume"] = {"half": half, "resumed": resumed}
    if half["rc"] == 0 and resumed["rc"] == 0 and rows["protonet"].get("identical") is not None:
        rows["resume"]["identical"] = _max_gap(_weights(args, "det-protonet-a"),
                                               _weights(args, "det-protonet-c")) == 0
    ok &= bool(rows["resume"].get("identical"))
    return {"ok": ok, **rows}


@stage
def stage_distributed(args: argparse.Namespace) -> dict[str, Any]:
    if args.data_dir is None:
        return {"ok": None, "skipped": "no --data-dir with Omniglot's zips"}
    steps = 2 if args.dry_run else 10
    extra = ("protonet", "--meta-batch", "2")  # one episode a rank
    two = metashot(args, *_run_args(args, "dist-2", steps, *extra), torchrun=2,
                   env={"METASHOT_DIST_BACKEND": "gloo"})
    one = metashot(args, *_run_args(args, "dist-1", steps, *extra))
    row: dict[str, Any] = {"two_ranks": two, "one_process": one}
    if two["rc"] or one["rc"]:
        return {"ok": False, **row}
    # float32 sums in another order: the two agree to rounding (tests/test_distributed.py's bounds)
    one_w, two_w = _weights(args, "dist-1"), _weights(args, "dist-2")
    row["weight_gap"] = _relative_gap(one_w, two_w)
    running = [k for k in one_w if "running_" in k]  # reported: the fold of every rank's statistics
    row["running_stats_max_gap"] = _max_gap({k: one_w[k] for k in running}, {k: two_w[k] for k in running})
    row["mean_gap"] = abs(two["mean"] - one["mean"])
    return {"ok": row["weight_gap"] < 1e-4 and row["mean_gap"] < 1e-3, "bounds": [1e-4, 1e-3], **row}


# -- the driver --------------------------------------------------------------------------------------
def run_stage(args: argparse.Namespace) -> None:
    """In a stage's own process: run it and print its one JSON line, an error included."""
    try:
        row = STAGES[args.stage](args)
    except Exception as e:  # a failed stage is a line, and the check goes on
        text = str(e).strip().splitlines()
        row = {"ok": False, "error": f"{type(e).__name__}: {text[0] if text else ''}"[:300]}
    print(json.dumps({"stage": args.stage, **row}), flush=True)


def _child(args: argparse.Namespace, name: str, limit: float) -> dict[str, Any]:
    """Stage ``name`` in a process of its own, given ``limit`` seconds: its line, or one saying why none."""
    if limit < 5:
        return {"stage": name, "ok": False, "error": "not run: the check's time budget is spent"}
    argv = [sys.executable, __file__, "--stage", name, "--device", str(args.device), "--work", args.work]
    argv += ["--dry-run"] if args.dry_run else []
    argv += ["--data-dir", str(args.data_dir)] if args.data_dir is not None else []
    t0 = time.perf_counter()
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=limit)
    except subprocess.TimeoutExpired:
        return {"stage": name, "ok": False, "error": f"timed out after {limit:.0f} s"}
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith('{"stage"')]
    if lines:
        return {**lines[-1], "s": round(time.perf_counter() - t0, 1)}
    last = next((line for line in reversed(done.stderr.splitlines()) if line.strip()), "")
    return {"stage": name, "ok": False, "error": f"exit {done.returncode}: {last[:300]}"}


def _groups(stages: list[str]) -> list[list[str]]:
    """The stages in the order they run: those that time alone, one by one (the environment first, the
    speed rows last), the others side by side between them."""
    timed = [n for n in stages if n in TIMED]
    side = [n for n in stages if n not in TIMED]
    return [[n] for n in timed if n == "env"] + ([side] if side else []) + [[n] for n in timed if n != "env"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (the check) or cpu (with --dry-run)")
    parser.add_argument("--dry-run", action="store_true", help="every stage at toy sizes, one at a time, "
                        "and the command lines in the stage's own process")
    default_data = os.environ.get("METASHOT_DATA") or next(
        (str(p) for p in (ROOT / "shared" / "data" / "omniglot",) if p.exists()), None)
    parser.add_argument("--data-dir", type=Path, default=default_data, help="Omniglot's zips")
    parser.add_argument("--stages", nargs="+", choices=list(STAGES), default=list(STAGES))
    parser.add_argument("--jobs", type=int, help="untimed stages side by side (default: 6; 1 with --dry-run)")
    parser.add_argument("--stage", choices=list(STAGES), help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.device = torch.device(args.device)
    if args.stage is not None:
        return run_stage(args)
    start, failed, scale = time.perf_counter(), [], 3 if args.dry_run else 1
    jobs = args.jobs or (1 if args.dry_run else 6)
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as work, ThreadPoolExecutor(jobs) as pool:
        args.work = work
        for group in _groups(args.stages):
            left = BUDGET_S * scale - (time.perf_counter() - start)
            limits = [min(LIMITS_S[n] * scale, left) for n in group]
            for row in pool.map(functools.partial(_child, args), group, limits):
                failed += [row["stage"]] if row["ok"] is False else []
                print(json.dumps(row), flush=True)
    print(json.dumps({"stage": "summary", "ok": not failed, "failed": failed,
                      "wall_s": round(time.perf_counter() - start, 1)}), flush=True)


if __name__ == "__main__":
    main()
