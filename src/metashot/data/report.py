"""What ``metashot data DIR --task NAME`` says of a dataset folder: its layout, parts, image shape, cache."""

from __future__ import annotations

import os
from typing import Any

from metashot.config import Config
from metashot.data.sources import FewShotSource
from metashot.data.tasks import build_source
from metashot.errors import ConfigError, MetashotError


def check_folder(task: str, task_args: dict[str, Any], data_dir: str | os.PathLike) -> dict[str, Any]:
    """Read ``data_dir`` as ``task`` (building its cache on first use) and report it
    (:meth:`FewShotSource.report`); a problem is a :class:`MetashotError` of one line."""
    cfg = Config(task=task, task_args=task_args, data_dir=str(data_dir)).validate()
    try:
        source = build_source(cfg)
        if not isinstance(source, FewShotSource):
            raise ConfigError(f"--task {task} reads no dataset folder")
        return source.report()
    except MetashotError:
        raise
    except ValueError as e:
        raise ConfigError(f"{task}: {e}") from None


def report_text(report: dict[str, Any]) -> str:
    """:func:`check_folder`'s report in lines."""
    lines = [f"{report['task']} in {report['root']}" + (
        f": {report['layout']} layout ({report['layout_files']})" if "layout" in report else "")]
    lines.append("  images " + " x ".join(map(str, report["image_shape"])) + (
        f", cached in {report['cache']}" if "cache" in report else ""))
    if report.get("options"):
        lines.append("  read with " + ", ".join(f"{k} {v}" for k, v in report["options"].items()))
    for part, p in report["parts"].items():
        low, high = p["images_per_class"]
        each = f"{low}" if low == high else f"{low} to {high}"
        lines.append(f"  {part:5} {p['classes']:5} classes {p['images']:8} images ({each} per class)")
    if "layout" in report:
        lines.append("no problem found: the split's class counts, no image in two parts")
    return "\n".join(lines)
