"""README.md and docs/ say what the code does.

* every relative link (and its ``#anchor``) in README.md and docs/*.md resolves;
* every fenced block with the info string ``python run`` executes (in one subprocess, each block
  in a fresh namespace);
* the config reference in docs/training.md equals what the config dataclasses generate;
* the README's support matrix equals :data:`COVERAGE`: every cell marked ✓ names the test that
  runs the method under that engine, and that test exists and names the method;
* no file of the repository cites the tracker or holds an absolute path of this machine.

The launch commands the pages show are run by tests/distributed/test_docs_commands.py.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from optimlib.optim import list_optimizers
from optimlib.reparam import list_reparams, tensor_parallel_reparams
from optimlib.train.config_reference import reference

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
PAGES = [README, *sorted((REPO / "docs").glob("*.md"))]

FENCE = re.compile(r"^(```+|~~~+)(.*?)\n(.*?)^\1[ \t]*$", re.S | re.M)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def _prose(text: str) -> str:
    """``text`` without its fenced code blocks and inline code spans."""
    return re.sub(r"`[^`\n]*`", "", FENCE.sub("", text))


def _slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip()).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in FENCE.sub("", page.read_text()).splitlines():
        m = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            slug = _slug(m.group(1))
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            out.add(slug if n == 0 else f"{slug}-{n}")
    return out


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(page):
    bad = []
    for target in LINK.findall(_prose(page.read_text())):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):       # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            bad.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            bad.append(f"{target}: no heading with anchor #{anchor}")
        elif dest.exists() and REPO not in dest.parents and dest != REPO:
            bad.append(f"{target}: outside the repository")
    assert not bad, f"{page.relative_to(REPO)}: " + "; ".join(bad)


def _runnable_blocks() -> list[tuple[str, str]]:
    blocks = []
    for page in PAGES:
        text = page.read_text()
        for m in FENCE.finditer(text):
            if m.group(2).split() == ["python", "run"]:
                line = text[:m.start()].count("\n") + 1
                blocks.append((f"{page.relative_to(REPO)}:{line}", m.group(3)))
    return blocks


RUNNER = """
import json, sys, traceback
blocks = json.loads(sys.stdin.read())
failed = []
for where, code in blocks:
    try:
        exec(compile(code, where, "exec"), {"__name__": "__main__"})
    except BaseException:
        failed.append(where + "\\n" + traceback.format_exc())
print("\\n".join(failed), file=sys.stderr)
sys.exit(1 if failed else 0)
"""


def test_runnable_blocks_execute(tmp_path):
    import json

    blocks = _runnable_blocks()
    assert any(where.startswith("README.md") for where, _ in blocks), "the README's quickstart is runnable"
    proc = subprocess.run([sys.executable, "-c", RUNNER], input=json.dumps(blocks), cwd=tmp_path,
                          capture_output=True, text=True, timeout=600,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-4000:]


def test_config_reference_is_generated_from_the_dataclasses():
    text = (REPO / "docs" / "training.md").read_text()
    m = re.search(r"<!-- config-reference:start -->\n(.*?)<!-- config-reference:end -->", text, re.S)
    assert m, "docs/training.md lost its config-reference markers"
    assert m.group(1) == reference(), ("docs/training.md's config reference is stale: paste the output of "
                                       "`python -m optimlib.train.config_reference` between its markers")


# ------------------------------------------------------------------------------- support matrix
COLUMNS = ("one process", "DDP", "FSDP2", "ZeRO-1", "ZeRO-2", "ZeRO-3", "TP", "layer-wise")
REPARAMS = ("sltrain", "lowrank", "lost", "dynamic_rank", "nm", "compander")

ONE_PROCESS = {
    "adamw": "tests/test_pretrain.py::test_summary_and_outputs",
    "adamp": "tests/optim/test_adamp.py::test_adamp_matches_reference",
    "sgdp": "tests/optim/test_adamp.py::test_sgdp_matches_reference",
    "smmf": "tests/optim/test_smmf.py::test_matches_reference_equations",
    "galore_adamw": "tests/optim/test_galore.py::test_parity_with_galore_torch",
    "galore_adamp": "tests/optim/test_galore_inner.py::"
                    "test_adamp_inner_matches_the_adamp_package_on_the_back_projected_update",
    "galore_smmf": "tests/optim/test_galore_inner.py::test_smmf_inner_matches_the_equations",
    "fira_adamw": "tests/optim/test_galore_family.py::test_fira_matches_the_fira_package",
    "apollo_adamw": "tests/optim/test_galore_family.py::test_apollo_matches_the_paper_equations_in_float64",
    "apollo_mini": "tests/optim/test_galore_family.py::test_apollo_matches_the_paper_equations_in_float64",
    "coap_adamw": "tests/optim/test_galore_family.py::test_coap_matches_its_equations_in_float64",
    "q_galore_adamw": "tests/optim/test_galore_family.py::test_q_galore_matches_q_galore_torch_projector",
    "sltrain": "tests/reparam/test_sltrain.py::test_function_matches_autograd_of_dense_weight",
    "lowrank": "tests/reparam/test_sltrain.py::test_lowrank_is_sltrain_without_the_sparse_part",
    "lost": "tests/reparam/test_lost.py::test_init_is_top_r_plus_top_channels_of_the_residual",
    "dynamic_rank": "tests/reparam/test_dynamic_rank.py::test_settles_at_the_target_rank_and_memory_shrinks",
    "nm": "tests/reparam/test_nm.py::test_srste_gradient_is_g_plus_lambda_times_pruned_weights",
    "compander": "tests/reparam/test_compander.py::test_gradcheck_in_double_through_weight_and_hyper_parameters",
}
USER_SCRIPTS = "tests/distributed/test_user_scripts.py::test_user_scripts_match_one_process"
DDP = "tests/distributed/test_ddp_layerwise.py::test_ddp_two_ranks_match_one_process"
LAYERWISE = "tests/distributed/test_ddp_layerwise.py::test_layerwise_one_process_is_bit_identical"
REPARAM_PARITY = {
    "sltrain": "tests/distributed/test_reparam_distributed.py::test_two_ranks_match_one_process",
    "lost": "tests/distributed/test_reparam_distributed.py::test_two_ranks_match_one_process",
    "dynamic_rank": "tests/distributed/test_reparam_distributed.py::test_dynamic_rank_two_ranks_match_one_process",
}
NM_COMPANDER = {"FSDP2": "tests/distributed/test_nm_compander_distributed.py::test_fsdp2_two_ranks_match_one_process",
                "ZeRO-2": "tests/distributed/test_nm_compander_distributed.py::"
                          "test_deepspeed_zero2_two_ranks_match_one_process"}


TENSOR_PARALLEL = "tests/distributed/test_tensor_parallel.py::test_dp2_tp2_matches_one_process"
TENSOR_PARALLEL_REPARAMS = "tests/distributed/test_tensor_parallel.py::test_reparameterized_dp2_tp2_matches_one_process"


def _coverage() -> dict[tuple[str, str], str]:
    """``(method, column) -> "file::test"`` for every cell the README marks ✓."""
    cov = {}
    for name, test in ONE_PROCESS.items():
        cov[name, "one process"] = test
    for name in [*list_optimizers(), *REPARAMS]:
        cov[name, "DDP"] = DDP
        cov[name, "layer-wise"] = LAYERWISE
    for name in list_optimizers():
        for column in ("FSDP2", "ZeRO-1", "ZeRO-2", "ZeRO-3"):
            cov[name, column] = USER_SCRIPTS
        cov[name, "TP"] = TENSOR_PARALLEL
    for name, test in REPARAM_PARITY.items():
        for column in ("FSDP2", "ZeRO-2", "ZeRO-3"):
            cov[name, column] = test
    for name in ("nm", "compander"):
        for column, test in NM_COMPANDER.items():
            cov[name, column] = test
    for name in tensor_parallel_reparams():
        cov[name, "TP"] = TENSOR_PARALLEL_REPARAMS
    return cov


COVERAGE = _coverage()


def _matrix() -> dict[str, dict[str, str]]:
    text = README.read_text()
    m = re.search(r"<!-- support-matrix:start -->\n(.*?)<!-- support-matrix:end -->", text, re.S)
    assert m, "README.md lost its support-matrix markers"
    lines = [line for line in m.group(1).splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert tuple(header[1:]) == COLUMNS, header
    rows = {}
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0].strip("`")] = dict(zip(COLUMNS, cells[1:]))
    return rows


def test_support_matrix_lists_every_method_and_equals_the_coverage():
    rows = _matrix()
    assert list(rows) == [*list_optimizers_in_readme_order(rows), *REPARAMS]
    assert set(rows) == set(list_optimizers()) | set(list_reparams()), "every registered method has a row"
    marked = {(name, col) for name, cells in rows.items() for col, cell in cells.items() if cell == "✓"}
    assert marked == set(COVERAGE), {"marked but no test": sorted(marked - set(COVERAGE)),
                                     "tested but not marked": sorted(set(COVERAGE) - marked)}
    for name, cells in rows.items():
        assert set(cells.values()) <= {"✓", "·", "—"}, (name, cells)
        if name in REPARAMS and name not in tensor_parallel_reparams():
            assert cells["TP"] == "—", f"{name} has no tensor-parallel form"


def list_optimizers_in_readme_order(rows) -> list[str]:
    return [name for name in rows if name in set(list_optimizers())]


# How a test may name a method instead of its registry name (its class, its case name).
ALIASES = {"fira_adamw": ("FiraAdamW",), "apollo_adamw": ("ApolloAdamW",), "apollo_mini": ('"mini"',),
           "coap_adamw": ("COAPAdamW",), "q_galore_adamw": ("QGaLoreAdamW",)}


def _sources(test_file: Path) -> str:
    """The test file and the worker scripts beside it that it names."""
    text = test_file.read_text()
    for worker in re.findall(r"with_name\(\"(\w+\.py)\"\)", text):
        text += (test_file.parent / worker).read_text()
    return text


@pytest.mark.parametrize("test", sorted(set(COVERAGE.values())))
def test_every_covering_test_exists_and_names_its_methods(test):
    path, _, function = test.partition("::")
    file = REPO / path
    assert file.is_file(), path
    text = _sources(file)
    assert re.search(rf"^def {function}\(", file.read_text(), re.M), test
    registry_driven = "list_optimizers()" in text
    for (name, _), covering in COVERAGE.items():
        if covering == test and not (registry_driven and name in list_optimizers()):
            spellings = [rf"\b{name}\b", *map(re.escape, ALIASES.get(name, ()))]
            assert any(re.search(p, text) for p in spellings), f"{test} does not name {name}"


# ------------------------------------------------------------------------------- tracker talk
TRACKER = re.compile(r"issue ?#[0-9]|the\ issue", re.I)


def _repository_files() -> list[Path]:
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                         capture_output=True, text=True, check=True).stdout.split("\n")
    return [REPO / f for f in out if f and (REPO / f).is_file()]


def test_no_tracker_talk_or_absolute_paths_of_this_machine():
    machine_paths = [str(REPO), "/".join(["", "work", "shared"])]
    hits = []
    for file in _repository_files():
        try:
            text = file.read_text()
        except (UnicodeDecodeError, OSError):
            continue
        for number, line in enumerate(text.splitlines(), 1):
            if TRACKER.search(line) or any(p in line for p in machine_paths):
                hits.append(f"{file.relative_to(REPO)}:{number}: {line.strip()[:120]}")
    assert not hits, "\n".join(hits)
