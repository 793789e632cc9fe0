"""Every script and command of docs/integrations.md, run as written (on CPU, in a scratch folder).

A ```python block whose first line is ``# NAME.py: ...`` is saved as NAME.py; each line of a
```bash block is one command.  The first command of a block runs one process; the commands after
it (2 ranks under torchrun) must print the same ``loss after N steps`` within 1e-6 relative
(observed: the same float32 loss, to the last digit, for DDP, ZeRO-2, ZeRO-3 and Lightning's FSDP2).
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, cpu_env, free_port

DOC = REPO / "docs" / "integrations.md"
LOSS_RTOL = 1e-6


def blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", DOC.read_text(), flags=re.S)


SCRIPTS = {m.group(1): code for code in blocks("python") if (m := re.match(r"# (\w+\.py): ", code))}
COMMANDS = [[line for line in block.splitlines() if line.strip()] for block in blocks("bash")]


def run(command: str, cwd: Path) -> str:
    """One documented command, ``torchrun`` with a free port; the scripts are saved in ``cwd``."""
    argv = shlex.split(command)
    port = str(free_port())
    if argv[0] == "torchrun":
        argv = [sys.executable, "-m", "torch.distributed.run", f"--master_port={port}", *argv[1:]]
    else:
        assert argv[0] == "python", command
        argv = [sys.executable, *argv[1:]]
    for name, code in SCRIPTS.items():
        (cwd / name).write_text(code)
    try:
        # optimlib is the installed checkout, as for a user (no repository root on the path)
        proc = subprocess.run(argv, cwd=cwd, env=cpu_env(PYTHONPATH=""), capture_output=True, text=True,
                              timeout=300)
    finally:
        for leftover in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"):
            leftover.unlink(missing_ok=True)
    assert proc.returncode == 0, f"{command}\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-5000:]}"
    return proc.stdout


def loss(stdout: str) -> float:
    found = re.findall(r"^loss after \d+ steps: (\S+)$", stdout, flags=re.M)
    assert len(found) == 1, stdout[-2000:]
    return float(found[0])


def script_of(command: str) -> str:
    return next(token for token in shlex.split(command) if token.endswith(".py"))


def test_every_documented_command_is_run_below():
    """Each command block runs one documented script, and the tests below run every block."""
    assert set(SCRIPTS) == {"hf_trainer.py", "hf_optimizers.py", "lightning_example.py"}
    assert sorted(script_of(block[0]) for block in COMMANDS) == sorted(SCRIPTS)
    assert all(len({script_of(c) for c in block}) == 1 for block in COMMANDS)


@pytest.mark.slow
def test_the_optimizers_example_projects_gpt2s_conv1d_layers(tmp_path):
    [block] = [b for b in COMMANDS if "hf_optimizers.py" in b[0]]
    assert block == ["python hf_optimizers.py"]
    assert run(block[0], tmp_path).strip().splitlines()[-1] == "matrices projected: 8"


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("script", ["hf_trainer.py", "lightning_example.py"])
def test_multi_rank_commands_print_the_one_process_loss(tmp_path, script):
    [block] = [b for b in COMMANDS if script in b[0]]
    assert len(block) >= 3 and block[0] == f"python {script}", block
    ref = loss(run(block[0], tmp_path))
    for command in block[1:]:
        assert command.startswith("torchrun --nproc_per_node 2 "), command
        assert loss(run(command, tmp_path)) == pytest.approx(ref, rel=LOSS_RTOL), command
