"""``parallel.tp``: the config errors and checkpoint refusals, raised before anything is built."""

from types import SimpleNamespace

import pytest

from optimlib.models.configs import CONFIGS
from optimlib.train import checkpoint, reshard
from optimlib.train.config import ConfigError, load_config
from optimlib.train.loop import check_engine_config
from optimlib.models.tensor_parallel import tensor_parallel_problem


def test_tp_must_be_positive():
    with pytest.raises(ConfigError, match="'parallel.tp' must be >= 1, got 0"):
        load_config(None, ["parallel.tp=0"])


@pytest.mark.parametrize("engine", ["single", "ddp", "deepspeed"])
def test_tp_needs_the_fsdp2_engine(monkeypatch, engine):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(ConfigError, match=rf"'parallel.tp' \(2\) needs the fsdp2 engine .* engine is {engine}"):
        check_engine_config(load_config(None, ["parallel.tp=2"]), engine)


def test_tp_must_divide_the_ranks(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "6")
    with pytest.raises(ConfigError, match=r"'parallel.tp' \(4\) must divide the number of ranks \(6\)"):
        check_engine_config(load_config(None, ["parallel.tp=4"]), "fsdp2")
    monkeypatch.setenv("WORLD_SIZE", "4")
    check_engine_config(load_config(None, ["parallel.tp=4"]), "fsdp2")


@pytest.fixture
def toy_replacement():
    """A registered reparameterization that replaces the module and has no tensor-parallel form."""
    import copy

    from optimlib import reparam

    reparam.register_reparam("toy_copy", lambda linear: copy.deepcopy(linear))
    yield "toy_copy"
    reparam._REGISTRY._specs.pop("toy_copy")


def test_tp_refuses_a_reparameterization_without_a_tensor_parallel_form(monkeypatch, toy_replacement):
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(ConfigError, match=r"'reparam.method' \(toy_copy\) is not available with parallel.tp > 1: "
                                          r"toy_copy replaces the linears by layers that have no tensor-parallel "
                                          r"form.* \(compander, dynamic_rank, lost, lowrank, nm, sltrain\)"):
        check_engine_config(load_config(None, ["parallel.tp=2", "reparam.method=toy_copy"]), "fsdp2")
    for works in ("nm", "compander", "sltrain", "lowrank", "lost", "dynamic_rank"):
        check_engine_config(load_config(None, ["parallel.tp=2", f"reparam.method={works}"]), "fsdp2")


def test_tp_must_divide_heads_and_hidden_features():
    tiny = CONFIGS["llama_tiny"]                        # 4 heads, 352 hidden features
    assert tensor_parallel_problem(tiny, 4) is None
    assert "8 must divide the attention heads (n_heads), 4" in tensor_parallel_problem(tiny, 8)
    assert "3 must divide the attention heads" in tensor_parallel_problem(tiny, 3)
    assert "3 must divide the MLP hidden features (hidden_dim), 352" in tensor_parallel_problem(
        SimpleNamespace(n_heads=6, hidden_dim=352), 3)


def test_the_launcher_names_parallel_tp_when_the_model_does_not_fit(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "8")
    with pytest.raises(ConfigError, match=r"'parallel.tp' \(8\) does not fit model 'llama_tiny': 8 must divide "
                                          r"the attention heads"):
        check_engine_config(load_config(None, ["parallel.tp=8"]), "fsdp2")


@pytest.mark.parametrize("saved, now", [((2, "fsdp2", 4), (1, "fsdp2", 4)), ((1, "fsdp2", 2), (2, "fsdp2", 4)),
                                        ((2, "fsdp2", 4), (2, "fsdp2", 8)), ((2, "fsdp2", 4), (1, "single", 1))])
def test_a_tensor_parallel_checkpoint_resumes_only_as_written(tmp_path, saved, now):
    manifest = {"tp": saved[0], "engine": saved[1], "world_size": saved[2]}
    engine = SimpleNamespace(tp=now[0], name=now[1], world_size=now[2])
    with pytest.raises(ValueError, match=rf"parallel.tp={saved[0]} on {saved[2]} rank\(s\); this run is "
                                         rf"engine={now[1]} with parallel.tp={now[0]}"):
        checkpoint._check_tensor_parallel(engine, tmp_path, manifest)
    checkpoint._check_tensor_parallel(SimpleNamespace(tp=saved[0], name=saved[1], world_size=saved[2]), tmp_path,
                                      manifest)


def test_a_tensor_parallel_checkpoint_is_not_converted(tmp_path):
    manifest = {"tp": 2, "engine": "fsdp2", "world_size": 4}
    with pytest.raises(ValueError, match=r"written with parallel.tp=2 \(a 2-D mesh\), which resumes only with the "
                                         r"parallel.tp and number of ranks that wrote it; no converter reads it"):
        reshard.read_whole(tmp_path, manifest)
