"""Benchmark reports: the environment, a Markdown table, a PNG bar chart and the JSON record.

Every benchmark writes ``<name>.json`` (the full result plus :func:`environment`), ``<name>.md``
(the table that is also printed) and, where it has one, ``<name>.png`` into its output folder.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Callable, Sequence

import torch

__all__ = ["environment", "cpu_model", "markdown_table", "bar_chart", "write_report", "mib"]


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, else ``platform.processor()``)."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parents[2])
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def environment(device: torch.device | str = "cpu") -> dict:
    """Where a benchmark ran: device name, torch and Python versions, threads, load, commit."""
    device = torch.device(device)
    env = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "commit": _git_commit(),
    }
    try:
        env["load_average_1m"] = os.getloadavg()[0]
    except OSError:
        env["load_average_1m"] = None
    return env


def mib(n: float | None) -> str:
    """Bytes as MiB with one decimal (``n/a`` for ``None``)."""
    return "n/a" if n is None else f"{n / 2 ** 20:,.1f}"


def markdown_table(rows: Sequence[dict], columns: Sequence[tuple[str, str, Callable | None]]) -> str:
    """A GitHub Markdown table: ``columns`` are ``(key, header, formatter)`` (``None``: ``str``)."""
    head = "| " + " | ".join(h for _, h, _ in columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    lines = [head, rule]
    for row in rows:
        cells = []
        for key, _, fmt in columns:
            value = row.get(key)
            text = "" if value is None and fmt is None else (fmt or str)(value)
            cells.append(str(text).replace("|", "\\|"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def bar_chart(path: str | Path, labels: Sequence[str], series: dict[str, Sequence[float]], *, ylabel: str,
              title: str, reference: float | None = None) -> Path:
    """Grouped horizontal-label bar chart (one bar group per label, one bar per series) as a PNG.

    ``reference``: draw a dashed line at this value (e.g. 1.0 for ratios to the baseline).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    n = max(len(series), 1)
    width = 0.8 / n
    fig, ax = plt.subplots(figsize=(max(6.0, 0.6 * len(labels) + 2), 4.5))
    for i, (name, values) in enumerate(series.items()):
        xs = [j + (i - (n - 1) / 2) * width for j in range(len(labels))]
        ax.bar(xs, [0 if v is None else v for v in values], width, label=name)
    if reference is not None:
        ax.axhline(reference, color="k", linestyle="--", linewidth=0.8)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=35, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    if len(series) > 1:
        ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(out_dir: str | Path, name: str, result: dict, markdown: str,
                 chart: Callable[[Path], object] | None = None) -> dict[str, Path]:
    """Write ``name.json``, ``name.md`` and (with ``chart``) ``name.png`` into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / f"{name}.json", "md": out / f"{name}.md"}
    paths["json"].write_text(json.dumps(result, indent=2, default=str) + "\n")
    paths["md"].write_text(markdown + "\n")
    if chart is not None:
        paths["png"] = out / f"{name}.png"
        chart(paths["png"])
    return paths
