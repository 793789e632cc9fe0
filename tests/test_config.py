"""The run config: typed, validated, errors that name the key."""

import pytest

import yaml

from optimlib.train.config import (ConfigError, RunConfig, config_from_mapping, load_config, merge_overrides,
                                   micro_batch_for, parse_overrides, read_yaml, to_dict)


def test_defaults_and_overrides_typed(tmp_path):
    cfg = load_config(None, ["optim.lr=3e-3", "train.steps=7", "optim.betas=[0.9, 0.99]",
                             "optim.kwargs={rank: 4}", "resume=auto"])
    assert isinstance(cfg, RunConfig)
    assert cfg.optim.lr == pytest.approx(3e-3) and isinstance(cfg.optim.lr, float)
    assert cfg.train.steps == 7
    assert cfg.optim.betas == [0.9, 0.99]
    assert cfg.optim.kwargs == {"rank": 4}
    assert cfg.resume == "auto"


def test_yaml_file_then_override(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  steps: 11\n  batch_size: 8\n  micro_batch: 4\noptim:\n  lr: 1e-3\n")
    cfg = load_config(path, ["train.steps=12"])
    assert (cfg.train.steps, cfg.train.batch_size, cfg.optim.lr) == (12, 8, 1e-3)


def test_written_config_reads_back_equal(tmp_path):
    """A run's config.yaml (to_dict, dumped as YAML) rebuilds the same RunConfig."""
    cfg = load_config(None, ["optim.lr=3e-3", "optim.kwargs={rank: 4}", "reparam.method=nm",
                             "reparam.options={n: 2, m: 4}", "train.steps=9"])
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    assert config_from_mapping(read_yaml(path)) == cfg


def test_mapping_errors_name_the_key():
    tree = merge_overrides({"train": {"steps": 5}}, ["train.stepz=3"])
    assert tree == {"train": {"steps": 5, "stepz": 3}}
    with pytest.raises(ConfigError, match="'train.stepz'"):
        config_from_mapping(tree)
    with pytest.raises(ConfigError, match="'train.micro_batch'"):
        config_from_mapping({"train": {"batch_size": 10, "micro_batch": 4}})


@pytest.mark.parametrize("override, key", [
    ("optim.lrr=1e-3", "optim.lrr"),
    ("trian.steps=3", "trian"),
    ("train.steps=abc", "train.steps"),
    ("train.steps=1.5", "train.steps"),
    ("optim.lr=fast", "optim.lr"),
    ("train.progress=maybe", "train.progress"),
    ("model=llama", "model"),
    ("train.micro_batch=0", "train.micro_batch"),
    ("engine=mpi", "engine"),
    ("deepspeed.zero_stage=4", "deepspeed.zero_stage"),
    ("optim.lr=-1", "optim.lr"),
    ("optim.lr=.nan", "optim.lr"),
])
def test_bad_keys_and_types_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])


def test_batch_must_divide_into_micro_batches():
    with pytest.raises(ConfigError, match="train.batch_size"):
        load_config(None, ["train.batch_size=10", "train.micro_batch=4"])


@pytest.mark.parametrize("batch, world, micro", [(16, 1, 16), (16, 2, 8), (16, 16, 1), (512, 8, 16), (24, 1, 12),
                                                (14, 2, 7), (34, 1, 2)])
def test_unset_micro_batch_follows_the_world_size(batch, world, micro):
    cfg = load_config(None, [f"train.batch_size={batch}"])
    assert cfg.train.micro_batch is None and micro_batch_for(cfg.train, world) == micro


def test_given_micro_batch_is_kept_or_refused_with_the_world_size():
    cfg = load_config(None, ["train.batch_size=16", "train.micro_batch=4"])
    assert micro_batch_for(cfg.train, 2) == 4
    with pytest.raises(ConfigError, match=r"'train.batch_size' \(12\) must be a multiple of train.micro_batch x "
                                          r"world size \(4 x 2\)"):
        micro_batch_for(load_config(None, ["train.batch_size=12", "train.micro_batch=4"]).train, 2)
    with pytest.raises(ConfigError, match=r"'train.batch_size' \(10\) must be a multiple of the world size \(4\)"):
        micro_batch_for(load_config(None, ["train.batch_size=10"]).train, 4)


def test_layerwise_refuses_clipping_and_skipping():
    assert load_config(None, ["train.layerwise=true", "train.grad_clip=0"]).train.layerwise
    with pytest.raises(ConfigError, match=r"'train.grad_clip' \(1.0\) must be 0 with train.layerwise=true"):
        load_config(None, ["train.layerwise=true"])
    with pytest.raises(ConfigError, match="'train.on_nonfinite' = 'skip' is not available with train.layerwise"):
        load_config(None, ["train.layerwise=true", "train.grad_clip=0", "train.on_nonfinite=skip"])


def test_engines_refuse_what_they_cannot_run(monkeypatch):
    from optimlib.train.loop import check_engine_config

    cfg = load_config(None, ["train.layerwise=true", "train.grad_clip=0"])
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(ConfigError, match="engine=ddp needs torchrun"):
        check_engine_config(cfg, "ddp")
    monkeypatch.setenv("RANK", "0")
    check_engine_config(cfg, "ddp")
    check_engine_config(cfg, "fsdp2")
    with pytest.raises(ConfigError, match="'train.layerwise' = true is not available under DeepSpeed: ZeRO owns"):
        check_engine_config(cfg, "deepspeed")


def test_override_syntax_errors():
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["optim.lr"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("no/such/file.yaml")


def test_shipped_configs_load():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "configs"
    for path in sorted(root.glob("*.yaml")):
        load_config(path)
