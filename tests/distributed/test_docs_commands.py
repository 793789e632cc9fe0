"""Every ``launch/pretrain.py`` command that README.md and docs/*.md show runs as written.

The commands are read from the fenced code blocks (continuation lines joined, comments cut) and
run with tiny-run overrides appended (:data:`TINY`: the tiny model, 32-token sequences, one step,
the run's own ``out_dir``), which win over the command's own keys.  Launcher options are mapped
onto this machine: ``torchrun`` and ``deepspeed`` run 2 CPU ranks (``--nproc_per_node`` /
``--num_gpus`` N, and the multi-node options, are not used).  The commands of one launcher run
in one launch of tests/distributed/pretrain_cases_worker.py, which runs launch/pretrain.py's
``main`` on each command's arguments.  Templates (``optim.name=NAME``) are filled from
:data:`PLACEHOLDERS`.  Each run must exit 0 and write a summary of the engine and world size its
launcher implies.
"""

import json
import re
import shlex
from pathlib import Path

import pytest

from conftest import REPO, launch

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

WORKER = Path(__file__).with_name("pretrain_cases_worker.py")
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
TINY = ["model.name=llama_tiny", "data.max_bytes=200000", "data.seq_len=32", "train.steps=1", "train.warmup_steps=0",
        "train.eval_every=0", "train.eval_blocks=2", "train.log_every=1", "train.progress=false",
        "train.checkpoint_every=0"]
PLACEHOLDERS = {"NAME": "adamp", "LR": "3e-3", "[settings]": ""}
LAUNCHERS = ("python", "torchrun", "deepspeed")


def documented_commands() -> list[tuple[str, str]]:
    """``(page:line, command)`` for every pretrain command in a fenced block of the pages."""
    found = []
    for page in PAGES:
        fenced, pending, start = False, "", 0
        for number, line in enumerate(page.read_text().splitlines(), 1):
            if line.lstrip().startswith("```"):
                fenced = not fenced
                continue
            if not fenced:
                continue
            if not pending:
                start = number
            pending += line.split(" #")[0].rstrip() if not line.lstrip().startswith("#") else ""
            if pending.endswith("\\"):
                pending = pending[:-1] + " "
                continue
            command, pending = " ".join(pending.split()), ""
            if command.split(" ")[0] in LAUNCHERS and "launch/pretrain.py" in command:
                found.append((f"{page.relative_to(REPO)}:{start}", command))
    return found


def script_args(command: str) -> tuple[str, list[str]]:
    """(launcher, the arguments after launch/pretrain.py), placeholders filled."""
    for key, value in PLACEHOLDERS.items():
        command = command.replace(key, value)
    assert not re.search(r"=[A-Z]{2,}\b|<\w+>", command), f"fill the template's placeholders: {command}"
    argv = shlex.split(command)
    return argv[0], argv[argv.index("launch/pretrain.py") + 1:]


def test_the_pages_show_every_launcher():
    launchers = {script_args(c)[0] for _, c in documented_commands()}
    assert launchers == set(LAUNCHERS), launchers
    assert any("train.layerwise=true" in c and "engine=ddp" in c for _, c in documented_commands())


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_documented_commands_run(launcher, tmp_path):
    runs = [(where, args) for where, command in documented_commands()
            for name, args in [script_args(command)] if name == launcher]
    cases = [[*args, *TINY, f"out_dir={tmp_path / str(i)}"] for i, (_, args) in enumerate(runs)]
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    launch(WORKER, [str(tmp_path / "cases.json")], launcher=launcher, timeout=600)
    for i, (where, args) in enumerate(runs):
        summary = json.loads((tmp_path / str(i) / "summary.json").read_text())
        forced = next((a.split("=", 1)[1] for a in args if a.startswith("engine=")), None)
        engine = {"python": "single", "torchrun": forced or "fsdp2", "deepspeed": "deepspeed"}[launcher]
        assert (summary["engine"], summary["world_size"]) == (engine, 1 if launcher == "python" else 2), where
