"""How sensitive MAML's second-order meta-gradient is to its weights: torch's batch norm and the reference's.

For each batch-norm setting (``torch``: epsilon 1e-5 and a learned scale; ``reference``: cbfinn/maml's
``tf.contrib.layers.batch_norm`` defaults, epsilon 1e-3 and no learned scale; ``preset``: the reference's
and no convolution bias before batch norm, the MAML presets' now), the
preset's network is trained with its recipe (Adam 1e-3, the preset's meta-batch) on real Omniglot episodes,
and at the weights after each of ``--at`` steps the meta-gradient g(theta) of the next training batch is
compared with g(theta') at weights perturbed by ``--rel`` of each tensor's RMS in a random direction:
``rel_change`` = ||g(theta') - g(theta)|| / ||g(theta)||, in float32 (as trained) and in float64 (a copy of
the same weights and batch: no rounding, the sensitivity itself). A well-conditioned meta-gradient moves by
about ``--rel`` times a small factor; an ill-conditioned one turns rounding-level differences (another path,
another process count) into different runs.

``--parity`` also trains ``--parity-steps`` steps of ``--meta-batch-parity`` tasks with each setting on the
loop and on the vmap path (``tasks`` pinned), on 1 process and, with ``torchrun`` on 127.0.0.1, on 2, and
reports the largest weight difference of each run from the 1-process loop run, over all weights and over
all but the convolution biases before batch norm (which change no output).

Prints one JSON line per measurement:

    OMP_NUM_THREADS=1 python benchmarks/maml_conditioning.py --at 0 4 25 100
    OMP_NUM_THREADS=1 python benchmarks/maml_conditioning.py --at --parity          # parity only
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

NORMS = {
    "torch": {"norm_eps": 1e-5, "norm_scale": True},
    "reference": {"norm_eps": 1e-3, "norm_scale": False},
    "preset": {"norm_eps": 1e-3, "norm_scale": False, "conv_bias": False},
}


def _setup(preset: str, norm: str, tasks: str) -> tuple[Any, Any, Any]:
    from metashot import presets
    from metashot.data.tasks import checked_source
    from metashot.methods import build_method

    cfg = presets.get(preset)
    cfg = cfg.replace(backbone_args=NORMS[norm], method_args={**cfg.method_args, "tasks": tasks})
    torch.manual_seed(cfg.seed)
    source = checked_source(cfg)
    return cfg, source, build_method(cfg, source.info)


def _meta_gradient(method: Any, batch: Any) -> torch.Tensor:
    leaves = method.meta_parameters()
    grads = torch.autograd.grad(method.loss(batch)[0], leaves, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).flatten() for p, g in zip(leaves, grads)])


def _perturbed(method: Any, rel: float, generator: torch.Generator) -> Any:
    other = copy.deepcopy(method)
    with torch.no_grad():
        for p in other.meta_parameters():
            rms = p.detach().double().square().mean().sqrt().item()
            p.add_(torch.randn(p.shape, generator=generator, dtype=p.dtype) * rel * rms)
    return other


def _episode_as(batch: Any, dtype: torch.dtype) -> Any:
    from metashot.batches import Episode

    return Episode(batch.support.to(dtype), batch.support_labels, batch.query.to(dtype), batch.query_labels)


def sensitivity(a: argparse.Namespace, norm: str) -> None:
    cfg, source, method = _setup(a.preset, norm, a.tasks)
    optimizer = cfg.make_optimizer(method.parameters())
    batches = iter(source.loader("train", (max(a.at) + 1) * cfg.meta_batch, seed=cfg.seed))
    for step in range(max(a.at) + 1):
        batch = next(batches)
        if step in a.at:
            for dtype in (torch.float32, torch.float64):
                m = copy.deepcopy(method).to(dtype)
                b = _episode_as(batch, dtype)
                g = _meta_gradient(m, b)
                gen = torch.Generator().manual_seed(step)
                changes = [((_meta_gradient(_perturbed(m, a.rel, gen), b) - g).norm() / g.norm()).item()
                           for _ in range(a.draws)]
                print(json.dumps({"measure": "sensitivity", "preset": a.preset, "norm": norm, "step": step,
                                  "dtype": str(dtype).split(".")[1], "rel": a.rel,
                                  "rel_change": [float(f"{c:.3g}") for c in changes]}), flush=True)
        loss, _ = method.loss(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def _train_run(
    a: argparse.Namespace, norm: str, tasks: str, procs: int, root: Path
) -> dict[str, torch.Tensor]:
    run = root / f"{norm}-{tasks}-{procs}p"
    args = ["train", "maml", "--preset", a.preset, "--meta-batch", str(a.meta_batch_parity),
            "--max-episodes", str(a.parity_steps), "--seed", "1", "--val-every", str(a.parity_steps),
            "--val-episodes", "4", "--test-episodes", "4", "--no-progress", "--run-dir", str(run),
            "--backbone-args", json.dumps(NORMS[norm]), "--method-args", json.dumps({"tasks": tasks})]
    if procs == 1:
        cmd = [sys.executable, "-m", "metashot", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={procs}",
               "--master-addr=127.0.0.1", f"--master-port={29700 + len(list(root.iterdir()))}",
               "-m", "metashot", *args]
    subprocess.run(cmd, check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return torch.load(run / "last.pt", weights_only=True)["method"]


def parity(a: argparse.Namespace, norm: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        ref = _train_run(a, norm, "loop", 1, root)
        for tasks, procs in (("vmap", 1), ("loop", 2), ("vmap", 2)):
            w = _train_run(a, norm, tasks, procs, root)
            diff = {k: (w[k].double() - ref[k].double()).abs().max().item() for k in ref}
            # a conv bias before batch norm changes no output: its gradient is rounding noise, which Adam
            # turns into steps of any size up to the learning rate
            inert = {k for k in ref if k.endswith(".0.bias") and k[:-len("0.bias")] + "1.bias" in ref}
            print(json.dumps({"measure": "parity", "preset": a.preset, "norm": norm, "tasks": tasks,
                              "processes": procs, "steps": a.parity_steps, "meta_batch": a.meta_batch_parity,
                              "max_weight_diff_vs_1p_loop": float(f"{max(diff.values()):.3g}"),
                              "without_biases_before_norm": float(
                                  f"{max(v for k, v in diff.items() if k not in inert):.3g}")}), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="maml-omniglot-5w1s")
    p.add_argument("--norms", nargs="+", default=list(NORMS), choices=list(NORMS))
    p.add_argument("--at", type=int, nargs="*", default=[0, 4, 25, 100],
                   help="training steps to measure the sensitivity at (none: parity only)")
    p.add_argument("--rel", type=float, default=1e-6, help="perturbation, relative to each tensor's RMS")
    p.add_argument("--draws", type=int, default=3)
    p.add_argument("--tasks", default="loop", choices=["loop", "vmap"])
    p.add_argument("--parity", action="store_true", help="also train loop/vmap on 1 and 2 processes")
    p.add_argument("--parity-steps", type=int, default=6)
    p.add_argument("--meta-batch-parity", type=int, default=4)
    a = p.parse_args()
    torch.set_num_threads(1)
    for norm in a.norms:
        if a.at:
            sensitivity(a, norm)
        if a.parity:
            parity(a, norm)


if __name__ == "__main__":
    main()
