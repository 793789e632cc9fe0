"""What a run reports: TensorBoard events, ``metrics.jsonl``, a loss-curve PNG, ``summary.json``.

Only rank 0 writes.  ``metrics.jsonl`` has one JSON object per logged step (``step``, ``loss``,
``lr``, ...) and per evaluation (``eval_loss``), which is what the tests and the benchmark read.
"""

from __future__ import annotations

import json
import math
import resource
import sys
from pathlib import Path

import torch

# Dense bf16 peak FLOP/s by device name fragment, for MFU on GPUs.
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12,
                   "L4": 121e12, "4090": 165e12, "3090": 71e12, "V100": 125e12}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (Linux reports KiB, macOS bytes)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


class MetricsWriter:
    """TensorBoard + JSONL on rank 0; a no-op elsewhere."""

    def __init__(self, out_dir: Path, enabled: bool, append: bool):
        self.enabled = enabled
        self.out_dir = Path(out_dir)
        self.records: list[dict] = []
        self._tb = None
        self._jsonl = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.out_dir.mkdir(parents=True, exist_ok=True)
            self._tb = SummaryWriter(log_dir=str(self.out_dir / "tensorboard"))
            path = self.out_dir / "metrics.jsonl"
            if append and path.exists():
                self.records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            self._jsonl = open(path, "a" if append else "w")

    def log(self, step: int, **values) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: v for k, v in values.items() if v is not None}}
        self.records.append(record)
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                self._tb.add_scalar(key, value, step)

    def truncate_after(self, step: int) -> None:
        """Drop records of steps later than ``step`` (a resumed run redoes them)."""
        if not self.enabled:
            return
        self.records = [r for r in self.records if r["step"] <= step]
        self._jsonl.seek(0)
        self._jsonl.truncate()
        for r in self.records:
            self._jsonl.write(json.dumps(r) + "\n")
        self._jsonl.flush()

    def close(self) -> None:
        if self.enabled:
            self._tb.close()
            self._jsonl.close()

    def plot(self, path: Path) -> None:
        """Train and eval loss against step, as a PNG."""
        if not self.enabled:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        train = [(r["step"], r["loss"]) for r in self.records if "loss" in r]
        evals = [(r["step"], r["eval_loss"]) for r in self.records if "eval_loss" in r]
        fig, ax = plt.subplots(figsize=(6, 4))
        if train:
            ax.plot(*zip(*train), label="train loss")
        if evals:
            ax.plot(*zip(*evals), "o-", label="eval loss")
        ax.set_xlabel("step")
        ax.set_ylabel("cross-entropy (nats/token)")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)


def write_summary(path: Path, summary: dict) -> None:
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    tmp.replace(path)


def format_bytes(n: float | None) -> str:
    if n is None:
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n} B"
