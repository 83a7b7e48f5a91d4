"""Learning curves: validation metric against training minutes, one line per run."""

from __future__ import annotations

import csv
from pathlib import Path


def plot_runs(run_dirs: list[Path], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for run in run_dirs:
        with open(Path(run) / "metrics.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        if not rows:
            raise ValueError(f"{run}/metrics.csv has no validation rows yet")
        ax.plot([float(r["minutes"]) for r in rows], [float(r["val_metric"]) for r in rows],
                marker="o", label=Path(run).name)
    ax.set_xlabel("training minutes")
    ax.set_ylabel("validation metric")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
