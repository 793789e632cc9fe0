"""The kernel benchmark runs on CPU (reference path, labelled as such) with small shapes."""

import torch

from optimlib.bench.kernels import format_kernel_bench, main, run_kernel_bench

KERNELS = {"adam_lowrank_update_", "adam8bit_lowrank_update_", "galore_backproject_update_", "smmf_update_",
           "adamp_update_", "sltrain_compose", "sltrain_grads", "nm_mask_apply", "nm_grad", "compander (fwd)",
           "compander (bwd)"}


def test_cpu_rows_are_reference_timings():
    rows = run_kernel_bench([(24, 40, 4), (17, 12, 3)], "cpu", dtype=torch.float32, tokens=8, repeats=1, warmup=0,
                            copy_bytes=1 << 20)
    assert {r["kernel"] for r in rows} == KERNELS and len(rows) == 2 * len(KERNELS)
    again = run_kernel_bench([(16, 24, 4), (16, 24, 8)], "cpu", dtype=torch.float32, tokens=4, repeats=1, warmup=0,
                             copy_bytes=1 << 20, kernels=["nm_grad", "galore_backproject_update_"])
    assert [r["kernel"] for r in again] == ["galore_backproject_update_", "nm_grad", "galore_backproject_update_"]
    for row in rows:
        assert row["path"] == "reference" and row["speedup"] is None and "no GPU" in row["note"]
        assert row["time_ms"] > 0 and row["bytes"] > 0 and row["gbps"] > 0 and row["copy_gbps"] > 0
        assert row["frac_copy"] == row["gbps"] / row["copy_gbps"]
    text = format_kernel_bench(rows)
    assert "no kernel was timed" in text and "galore_backproject_update_" in text


def test_command_line(capsys):
    rows = main(["--device", "cpu", "--shapes", "16x24x4", "--dtype", "float32", "--tokens", "4", "--repeats", "1",
                 "--kernels", "nm_mask_apply,compander (fwd)"])
    assert [r["kernel"] for r in rows] == ["nm_mask_apply", "compander (fwd)"]
    assert "copy bandwidth" in capsys.readouterr().out
