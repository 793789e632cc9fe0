"""Smoke tests of launch/bench.py: every subcommand runs on a small case and writes its files.

``memory`` runs as a subprocess (it forks one worker per optimizer, which must not fork this
test process); ``step``, ``refresh``, ``estimate`` and ``kernels`` run in-process through
``main()``.  Small cases only: the real numbers come from the commands in the README section.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "launch" / "bench.py"

# galore-torch warns on construction; its transformers import warns about torch.jit.
pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]


def _main():
    spec = importlib.util.spec_from_file_location("bench_cli", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def _files(out: Path, name: str, png: bool) -> dict:
    assert (out / f"{name}.md").read_text().strip()
    if png:
        assert (out / f"{name}.png").stat().st_size > 1000
    result = json.loads((out / f"{name}.json").read_text())
    env = result.get("environment")
    if env is not None:
        assert env["torch"] and env["device_name"]
    return result


def test_memory_llama_tiny(tmp_path):
    """Isolated workers, the baseline, one of ours and one peer, with the peer's projector
    objects walked for tensors."""
    out = tmp_path / "memory"
    names = "galore_adamw,galore_torch.GaLoreAdamW" if importlib.util.find_spec("galore_torch") else "galore_adamw"
    proc = subprocess.run([sys.executable, str(BENCH), "memory", "--model", "llama_tiny", "--optimizers", names,
                           "--steps", "1", "--out", str(out), "--threads", "1"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| torch_adamw_foreach |" in proc.stdout
    result = _files(out, "memory", png=True)
    rows = {r["name"]: r for r in result["rows"]}
    assert rows["torch_adamw_foreach"]["state_ratio"] == 1.0
    assert rows["galore_adamw"]["state_ratio"] < 0.6
    assert all(r["param_bytes"] == rows["torch_adamw_foreach"]["param_bytes"] for r in rows.values())
    assert all(r["peak_bytes"] is not None for r in rows.values())
    if "galore_torch.GaLoreAdamW" in rows:
        state = rows["galore_torch.GaLoreAdamW"]["state"]
        assert "GaLoreProjector.ortho_matrix" in state["object_paths"] and state["object_bytes"] > 0


def test_estimate_grid(tmp_path):
    out = tmp_path / "estimate"
    assert _main()(["estimate", "--models", "llama_60m,llama_13b",
                    "--optimizers", "adamw,galore_adamw+moments_dtype=int8",
                    "--setups", "single,fsdp2:8,zero3:8", "--out", str(out)]) == 0
    result = _files(out, "estimate", png=False)
    assert len(result["rows"]) == 2 * 2 * 3
    row = next(r for r in result["rows"] if r["model"] == "llama_13b" and r["setup"] == "single"
               and r["optimizer"] == "adamw")
    assert row["fits_24GiB"] is False and row["fits_80GiB"] is False   # 13B x (2 + 2 + 4) bytes in bf16
    small = next(r for r in result["rows"] if r["model"] == "llama_60m" and r["setup"] == "single")
    assert small["fits_24GiB"] is True


def test_step_llama_tiny(tmp_path):
    out = tmp_path / "step"
    names = "galore_adamw,galore_torch.GaLoreAdamW" if importlib.util.find_spec("galore_torch") else "galore_adamw"
    assert _main()(["step", "--model", "llama_tiny", "--optimizers", names, "--reps", "2", "--gap", "10",
                    "--device", "cpu", "--threads", "1", "--out", str(out)]) == 0
    result = _files(out, "step", png=True)
    rows = {r["name"]: r for r in result["rows"]}
    assert rows["torch_adamw_foreach"]["ratio"] == 1.0
    g = rows["galore_adamw"]
    assert g["refresh"] > 0 and g["amortized"] == pytest.approx((g["refresh"] + 9 * g["ordinary"]) / 10)
    assert "galore_adamw_amortized_vs_adamw_foreach" in result["targets"]
    assert len(result["bandwidth_bytes_per_s"]) == 2 and min(result["bandwidth_bytes_per_s"]) > 0
    assert rows["torch_adamw_foreach"]["floor_bytes_per_param"] == pytest.approx(28.0, rel=1e-3)
    for row in rows.values():
        assert 0 < row["of_floor"] < 10
    if "galore_torch.GaLoreAdamW" in rows:      # a peer takes the floor of the rule it runs
        assert rows["galore_torch.GaLoreAdamW"]["floor_bytes"] == g["floor_bytes"]


def test_refresh_small(tmp_path):
    out = tmp_path / "refresh"
    assert _main()(["refresh", "--shape", "96x160", "--rank", "8", "--reps", "1", "--threads", "1",
                    "--out", str(out)]) == 0
    result = _files(out, "refresh", png=False)
    rows = {r["projection"]: r for r in result["rows"]}
    assert rows["svd"]["overlap"] == pytest.approx(1.0) and rows["svd"]["excess_residual"] == pytest.approx(0.0)
    # a power-law spectrum: the randomized range finder is close to the exact subspace, random is not
    assert rows["randomized"]["excess_residual"] < 0.05 < rows["random"]["excess_residual"]
    assert rows["randomized"]["overlap"] > 0.9 > rows["random"]["overlap"]


def test_kernels_times_the_reference_path_on_cpu(tmp_path, capsys):
    assert _main()(["kernels", "--device", "cpu", "--shapes", "64x96x8", "--dtype", "float32", "--repeats", "1",
                    "--copy-bytes", str(1 << 20), "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "reference" in out.lower()
    rows = json.loads((tmp_path / "kernels.json").read_text())["rows"]
    assert len(rows) >= 7                                           # one row (or more) per kernel family
    assert {r["path"] for r in rows} == {"reference"}               # no Triton without CUDA
    assert all(r["time_ms"] > 0 and r["bytes"] > 0 for r in rows)


def test_bad_arguments_exit_2(tmp_path, capsys):
    assert _main()(["refresh", "--shape", "96by160", "--out", str(tmp_path)]) == 2
    assert "shape" in capsys.readouterr().err
    assert _main()(["memory", "--model", "llama_tiny", "--optimizers", "lion", "--out", str(tmp_path)]) == 2
    assert "lion" in capsys.readouterr().err
