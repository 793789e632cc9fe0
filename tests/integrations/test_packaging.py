"""``pip install optimlib`` is the optimizers and reparameterizations: ``import optimlib`` stays light,
and the library works with the core dependencies alone (torch, numpy, triton on Linux); the
launcher's and benchmarks' packages are extras that ``make install`` (``.[dev]``) still installs."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import tomllib

from conftest import REPO

# Import names of what only the extras (or the user's own stack) provide.
EXTRAS_ONLY = ("deepspeed", "tensorboard", "matplotlib", "transformers", "accelerate", "lightning", "yaml",
               "tqdm", "einops", "datasets")


def run_python(code: str, cwd=REPO / "tests") -> str:
    """``code`` in a fresh interpreter started in ``cwd`` (its first import path); optimlib is
    the installed checkout."""
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, capture_output=True,
                          text=True, timeout=120, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": ""})
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout.strip().splitlines()[-1]


def test_nothing_at_the_repository_root_shadows_another_distribution():
    """From the root (a script or notebook in a clone): transformers imports the `kernels`
    distribution it depends on, not the repository's top-level kernels/ folder."""
    found = json.loads(run_python("""
        import json, kernels, optimlib.kernels
        from transformers import GPT2LMHeadModel
        GPT2LMHeadModel
        print(json.dumps([kernels.__file__, optimlib.kernels.__file__]))
    """, cwd=REPO))
    assert "site-packages" in found[0] and not found[0].startswith(str(REPO / "kernels")), found
    assert found[1] == str(REPO / "optimlib" / "kernels" / "__init__.py"), found


def test_import_optimlib_imports_no_framework():
    loaded = json.loads(run_python(f"""
        import json, sys
        import optimlib, optimlib.integrations, optimlib.integrations.transformers
        print(json.dumps(sorted(m for m in {EXTRAS_ONLY!r} if m in sys.modules)))
    """))
    # torch itself imports tqdm when it is installed; nothing else may be there
    assert loaded in ([], ["tqdm"]), loaded


def test_optimizers_and_reparameterizations_need_only_the_core_dependencies():
    """With every extras-only package made unimportable: each registered optimizer steps (the
    factory's groups, GaLore on targeted matrices) and each registered reparameterization trains."""
    out = run_python(f"""
        import sys
        for name in {EXTRAS_ONLY!r}:  # as if not installed: import raises, importlib.util.find_spec is None
            sys.modules[name] = None
        import torch
        from torch import nn
        import optimlib
        from optimlib import reparam

        def model():
            torch.manual_seed(0)
            return nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 64))

        def train(m, opt):
            for _ in range(2):
                m(torch.randn(4, 64)).pow(2).mean().backward()
                opt.step()
                reparam.after_step(m, opt)
                opt.zero_grad()

        for name in optimlib.list_optimizers():
            matrix = name in optimlib.optim.factory.matrix_optimizers()
            extra = {{"target_modules": ["0", "2"], "rank": 4}} if matrix else {{}}
            m = model()
            before = m[0].weight.detach().clone()
            train(m, optimlib.create_optimizer(m, name, lr=1e-2, **extra))
            assert not torch.equal(before, m[0].weight), name
        done = []
        for method in reparam.list_reparams():
            options = {{"rank": 8}} if method in ("dynamic_rank", "lost", "lowrank", "sltrain") else {{}}
            m = reparam.apply(model(), method, targets=["0", "2"], **options)
            train(m, optimlib.create_optimizer(m, "adamw", lr=1e-2))
            done.append(method)
        print(len(optimlib.list_optimizers()), len(done))
    """)
    n_opt, n_reparam = map(int, out.split())
    assert n_opt >= 7 and n_reparam >= 6


def test_the_launchers_needs_are_extras_and_dev_installs_them_all():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    core = {d.split(";")[0].split(">")[0].split("=")[0].strip() for d in project["dependencies"]}
    assert core == {"torch", "numpy", "triton"}, core
    extras = project["optional-dependencies"]
    assert {"pyyaml", "tensorboard", "tqdm", "matplotlib"} <= {d.split(">")[0] for d in extras["train"]}
    assert [d.split(">")[0] for d in extras["deepspeed"]] == ["deepspeed"]
    assert extras["bench"] == ["optimlib[train]"]
    assert "optimlib[train,deepspeed,bench]" in extras["dev"]  # `make install` installs .[dev]
