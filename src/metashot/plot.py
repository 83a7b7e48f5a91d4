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


def plot_sinusoid(
    run_dir: Path,
    out: Path,
    episode: int = 0,
    shots: int | None = None,
    steps: tuple[int, ...] = (1, 10),
    checkpoint: str = "best.pt",
    trust_code: bool = False,
    device: str = "auto",
) -> None:
    """The MAML paper's sinusoid figure (Finn et al. 2017, fig. 2) for a trained ``maml-sinusoid`` run.

    Test task ``episode`` of the run's seed: the true function, its K support points (``shots``,
    default the run's test shots), and the model's prediction before adaptation and after each of
    ``steps`` inner steps on those points, drawn to the PNG ``out``. ``trust_code`` lets the run's
    ``config.json`` choose a backbone factory to import. The model runs on ``device`` (auto: a GPU if
    there is one, else MPS, else the CPU), whatever the run trained on.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from metashot.data.sinusoid import X_RANGE, SinusoidSampler
    from metashot.devices import check_device
    from metashot.errors import ConfigError
    from metashot.runs import RunFolder

    folder = RunFolder(run_dir)
    cfg = folder.load_config(trust_code)
    if cfg.task != "sinusoid" or cfg.method != "maml":
        raise ConfigError(f"{run_dir} is a {cfg.method} run on {cfg.task}, not maml on sinusoid")
    on = check_device(device)
    _, method = folder.method(cfg.replace(device=str(on)), checkpoint)
    method.eval()
    sampler = SinusoidSampler(shots or cfg.shots, 0, episode + 1, cfg.seed, "test")
    task, ep = sampler.task(episode), sampler.episode(episode)
    grid = torch.linspace(*X_RANGE, 400).unsqueeze(1)
    curves: dict[int, torch.Tensor] = {}  # on the CPU, for matplotlib

    def record(step: int, params: dict[str, torch.Tensor]) -> None:
        if step == 0 or step in steps:
            with torch.no_grad():
                curves[step] = method.forward(params, grid.to(on)).squeeze(1).cpu()

    params = {n: p.detach().requires_grad_(n in method.adapted) for n, p in method.params().items()}
    with torch.enable_grad():
        method.adapt(params, ep.support.to(on), ep.support_labels.to(on), max(steps), create_graph=False,
                     callback=record)

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(grid.squeeze(1), task(grid).squeeze(1), color="red", label="ground truth")
    ax.plot(grid.squeeze(1), curves[0], ":", color="green", label="pre-update")
    for s, style in zip(sorted(set(steps)), ["--", "-", "-.", "--"] * len(steps)):
        ax.plot(grid.squeeze(1), curves[s], style, label=f"{s} grad step{'s' if s > 1 else ''}")
    ax.scatter(ep.support.squeeze(1), ep.support_labels.squeeze(1), marker="^", color="purple", zorder=3,
               label=f"{len(ep.support)} points used for gradient")
    ax.set_title(f"MAML, K={len(ep.support)}: A={task.amplitude:.2f}, phase={task.phase:.2f}")
    ax.set_xlim(*X_RANGE)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def _instance_stats(path: Path) -> tuple[str, dict[int, tuple[float, float]]]:
    """A result.json (or a run folder holding one): its name and {n: (mean, ci95)} of each acc_n."""
    import json

    from metashot.evaluate import Result

    path = Path(path)
    file = path / "result.json" if path.is_dir() else path
    stats = Result.from_dict(json.loads(file.read_text())).stats
    by_instance = {int(k[4:]): v for k, v in stats.items() if k.startswith("acc_") and k[4:].isdigit()}
    if not by_instance:
        raise ValueError(f"{file} has no per-instance accuracy (acc_1, acc_2, ...): not a sequence run")
    return (path.name if path.is_dir() else path.parent.name), dict(sorted(by_instance.items()))


def instance_table(results: list[Path], names: list[str] | None = None) -> str:
    """Accuracy (%) by instance, one row per result.json or run folder, as a Markdown table."""
    rows = [_instance_stats(r) for r in results]
    columns = sorted({n for _, s in rows for n in s})
    ordinal = {1: "st", 2: "nd", 3: "rd"}
    lines = ["| | " + " | ".join(f"{n}{ordinal.get(n, 'th')}" for n in columns) + " |",
             "|---" * (len(columns) + 1) + "|"]
    for i, (name, s) in enumerate(rows):
        cells = [f"{100 * s[n][0]:.1f} +- {100 * s[n][1]:.1f}" if n in s else "-" for n in columns]
        lines.append(f"| {names[i] if names else name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_instances(results: list[Path], out: Path, names: list[str] | None = None) -> None:
    """Santoro et al.'s figure: test accuracy against the instance of a class in the episode (1st,
    2nd, ... 10th presentation), one line per result.json or run folder, with 95% intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ticks: set[int] = set()
    for i, path in enumerate(results):
        name, s = _instance_stats(path)
        n = list(s)
        ticks.update(n)
        ax.errorbar(n, [100 * s[k][0] for k in n], yerr=[100 * s[k][1] for k in n], marker="o",
                    capsize=3, label=names[i] if names else name)
    ax.set_xticks(sorted(ticks))
    ax.set_xlabel("instance of the class in the episode")
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
