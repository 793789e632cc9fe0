"""Typed run configuration for ``launch/pretrain.py``.

A run is described by nested dataclasses loaded from YAML and overridden by ``key=value``
arguments with dotted keys (``optim.lr=3e-3``).  Every key is checked: an unknown key or a
value of the wrong type raises :class:`ConfigError` naming the full key path, before any
model is built.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from optimlib.data import DataConfig


class ConfigError(ValueError):
    """A configuration key is unknown, mistyped or out of range (the message names it)."""


@dataclass
class ModelConfig:
    name: str = "llama_tiny"
    """A named size config of :mod:`optimlib.models` (``llama_tiny``, ``llama_60m``, ...)."""
    vocab_size: Optional[int] = None
    """Override the named config's vocabulary (must hold the tokenizer's ids)."""


@dataclass
class TrainConfig:
    steps: int = 300
    batch_size: int = 16
    """Global sequences per optimizer step, whatever the world size."""
    micro_batch: Optional[int] = None
    """Sequences per rank per forward; accumulation = batch_size / (micro_batch * world).  Unset:
    the rank's share ``batch_size / world`` if at most 16, else the largest divisor of the share
    that is (:func:`micro_batch_for`)."""
    warmup_steps: int = 30
    min_lr_ratio: float = 0.1
    """Cosine decay ends at ``lr * min_lr_ratio``."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 turns clipping off (layer-wise needs 0)."""
    layerwise: bool = False
    """Optimizer-in-backward: step each parameter as soon as its gradient is final and free the
    gradient (:class:`optimlib.optim.layerwise.LayerwiseStepper`), on the last micro-batch of each
    step; the same updates as the ordinary step.  Not under DeepSpeed (it owns the gradients), not
    with ``grad_clip`` > 0 (global clipping needs every gradient), and ``on_nonfinite`` can only
    stop (a non-finite gradient is seen after the parameters were stepped)."""
    eval_every: int = 100
    eval_blocks: int = 64
    checkpoint_every: int = 0
    """Write a checkpoint every N steps (0: only at the end)."""
    keep_checkpoints: int = 2
    log_every: int = 10
    dtype: str = "auto"
    """``auto`` (bf16 autocast on GPU, fp32 on CPU), ``float32`` or ``bfloat16``."""
    progress: bool = True
    on_nonfinite: str = "auto"
    """A step whose gradients hold NaN/inf: ``skip`` it (counted in the summary) or ``stop``
    the run naming the parameters.  ``auto``: skip, except under DeepSpeed, which owns the step
    and so supports only ``stop``."""


@dataclass
class OptimConfig:
    name: str = "adamw"
    lr: float = 3e-3
    weight_decay: float = 0.0
    betas: Optional[list] = None
    """Adam-family ``betas``; unset: the optimizer's default."""
    eps: Optional[float] = None
    target_modules: Optional[list] = None
    """Names or regexes of the linears a projected / low-rank method targets."""
    kwargs: dict = field(default_factory=dict)
    """Extra keyword arguments for the optimizer (``rank``, ``update_proj_gap``, ...)."""


@dataclass
class DeepSpeedSection:
    zero_stage: int = 0
    config: Optional[str] = None
    """A DeepSpeed JSON whose settings are merged under ours (batch sizes come from ``train``)."""


@dataclass
class ParallelSection:
    tp: int = 1
    """Tensor-parallel degree (torchrun, the fsdp2 engine): the attention's q/k/v and the MLP's
    gate/up projections column-wise, o/down row-wise over ``tp`` ranks, FSDP2 over the world size
    divided by ``tp`` (docs/distributed.md)."""


@dataclass
class ReparamConfig:
    method: Optional[str] = None
    targets: Optional[list] = None
    options: dict = field(default_factory=dict)


@dataclass
class RunConfig:
    seed: int = 0
    out_dir: str = "runs/default"
    resume: Optional[str] = None
    """``auto`` (newest complete checkpoint in ``out_dir``, if any) or a checkpoint path.  A
    finished run re-launched with ``auto`` does nothing ("already at step N")."""
    resume_trusted: bool = False
    """Load the checkpoint's files without the safety checks (``weights_only=False``, DCP's own
    ``pickle.load``), as if they were code: only for checkpoints you trust like code, in a format
    the checks do not admit (docs/checkpoints.md)."""
    resume_other_config: bool = False
    """Resume a checkpoint whose manifest records another config (keys outside
    :data:`RESUME_MAY_CHANGE` changed); without it such a resume stops with an error."""
    overwrite: bool = False
    """A run that does not continue ``out_dir``'s own checkpoints (a fresh start, or ``resume``
    naming a checkpoint elsewhere), in an ``out_dir`` that holds another run's checkpoints or
    ``summary.json``, deletes that run's outputs first; without it the run refuses to start."""
    engine: str = "auto"
    """``auto`` (deepspeed when launched by ``deepspeed``, fsdp2 under ``torchrun`` with
    several ranks, else single), ``single``, ``ddp`` (``torchrun``: the whole model on every
    rank, gradients all-reduced), ``fsdp2`` or ``deepspeed``."""
    device: str = "auto"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    reparam: ReparamConfig = field(default_factory=ReparamConfig)


ENGINES = ("auto", "single", "ddp", "fsdp2", "deepspeed")
DEFAULT_MICRO_BATCH = 16
"""The most sequences per rank per forward that an unset ``train.micro_batch`` takes."""

RESUME_MAY_CHANGE = (
    "out_dir", "resume", "resume_trusted", "resume_other_config", "overwrite",   # where and how to resume
    "engine", "device", "deepspeed",                       # how it runs (the manifest checks the engine)
    "train.steps",                                         # extending a run
    "train.micro_batch",                                   # follows the world size; the global batch stays
    "train.layerwise",                                     # the same updates, stepped in the backward pass
    "train.eval_every", "train.eval_blocks", "train.log_every", "train.progress",   # reporting
    "train.checkpoint_every", "train.keep_checkpoints", "train.on_nonfinite",        # operations
)
"""Config keys (a section name covers its keys) that may differ between a checkpoint's run and
the run resuming it.  Every other key is part of the run's identity (:func:`run_identity`)."""


# ---------------------------------------------------------------------- typed construction
def _coerce(value: Any, tp, path: str):
    """Check ``value`` against the annotation ``tp``; ints are accepted where floats are."""
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], path)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{path}' is a section; expected a mapping, got {value!r}")
        return _build(tp, value, path)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{path}' expects a number, got {type(value).__name__} {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"config key '{path}' must be finite, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key '{path}' expects an integer, got {type(value).__name__} {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{path}' expects true/false, got {type(value).__name__} {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key '{path}' expects a string, got {type(value).__name__} {value!r}")
        return value
    if tp in (list, dict) or origin in (list, dict):
        base = origin or tp
        if not isinstance(value, base):
            raise ConfigError(f"config key '{path}' expects a {base.__name__}, got {type(value).__name__} {value!r}")
        return value
    return value


def _build(cls, values: dict, path: str = ""):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        full = f"{path}.{key}" if path else str(key)
        if key not in names:
            raise ConfigError(f"unknown config key '{full}'; known keys{' in ' + repr(path) if path else ''}: "
                              f"{', '.join(sorted(names))}")
        kwargs[key] = _coerce(value, hints[key], full)
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    node = tree
    parts = dotted.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"config key '{dotted}': '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> dict:
    """``["optim.lr=3e-3", "train.steps=10"]`` -> nested dict; values are parsed as YAML."""
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. optim.lr=3e-3)")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"override {item!r} has an empty key")
        value = _yaml_floats(yaml.safe_load(raw)) if raw.strip() else ""
        _set_dotted(tree, key, value)
    return tree


def merge_overrides(tree: dict, overrides: list[str] | None) -> dict:
    """``tree`` (a nested config mapping) with dotted ``key=value`` ``overrides`` applied on top."""
    return _merge(tree, parse_overrides(list(overrides or [])))


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _yaml_floats(tree):
    """PyYAML reads ``3e-3`` as a string; turn such numeric-looking strings into floats."""
    if isinstance(tree, dict):
        return {k: _yaml_floats(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_yaml_floats(v) for v in tree]
    if isinstance(tree, str):
        try:
            return float(tree) if any(c in tree for c in "eE") else tree
        except ValueError:
            return tree
    return tree


def read_yaml(path: str | Path) -> dict:
    """The mapping in the YAML file ``path`` (``3e-3`` read as a number), or a :class:`ConfigError`
    naming the file: missing, not YAML, or not a mapping at the top level."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file '{path}' does not exist")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file '{path}' is not valid YAML: {exc}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping at the top level")
    return _yaml_floats(tree)


def config_from_mapping(tree: dict) -> RunConfig:
    """A checked :class:`RunConfig` from a nested mapping (the shape of a config YAML, or of the
    ``config.yaml`` a run writes); unknown keys and bad values raise :class:`ConfigError`."""
    cfg = _build(RunConfig, tree)
    validate(cfg)
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Load a YAML config (or the defaults) and apply dotted ``key=value`` overrides."""
    return config_from_mapping(merge_overrides(read_yaml(path) if path is not None else {}, overrides))


def validate(cfg: RunConfig) -> None:
    """Range checks that do not need the model or the world size."""
    t = cfg.train
    positive = {"train.steps": t.steps, "train.batch_size": t.batch_size, "train.micro_batch": t.micro_batch,
                "train.eval_blocks": t.eval_blocks, "data.seq_len": cfg.data.seq_len}
    for key, value in positive.items():
        if value is not None and value < 1:
            raise ConfigError(f"config key '{key}' must be >= 1, got {value}")
    for key, value in {"train.warmup_steps": t.warmup_steps, "train.eval_every": t.eval_every,
                       "train.checkpoint_every": t.checkpoint_every, "train.log_every": t.log_every,
                       "train.keep_checkpoints": t.keep_checkpoints}.items():
        if value < 0:
            raise ConfigError(f"config key '{key}' must be >= 0, got {value}")
    if t.micro_batch is not None and t.batch_size % t.micro_batch:
        raise ConfigError(f"config key 'train.batch_size' ({t.batch_size}) must be a multiple of "
                          f"'train.micro_batch' ({t.micro_batch})")
    if not 0.0 <= t.min_lr_ratio <= 1.0:
        raise ConfigError(f"config key 'train.min_lr_ratio' must lie in [0, 1], got {t.min_lr_ratio}")
    if t.grad_clip < 0:
        raise ConfigError(f"config key 'train.grad_clip' must be >= 0 (0 turns clipping off), got {t.grad_clip}")
    if t.layerwise and t.grad_clip > 0:
        raise ConfigError(f"config key 'train.grad_clip' ({t.grad_clip}) must be 0 with train.layerwise=true: clipping "
                          f"by the global norm needs every gradient before any parameter steps, and layer-wise "
                          f"stepping consumes each gradient as soon as it is ready; set train.grad_clip=0")
    if t.layerwise and t.on_nonfinite == "skip":
        raise ConfigError("config key 'train.on_nonfinite' = 'skip' is not available with train.layerwise=true: the "
                          "parameters are stepped before the gradient norm is known; use stop (or auto)")
    if t.dtype not in ("auto", "float32", "bfloat16"):
        raise ConfigError(f"config key 'train.dtype' must be auto, float32 or bfloat16, got {t.dtype!r}")
    if not cfg.optim.lr > 0:
        raise ConfigError(f"config key 'optim.lr' must be > 0, got {cfg.optim.lr}")
    betas = cfg.optim.betas
    if betas is not None and (len(betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas)):
        raise ConfigError(f"config key 'optim.betas' must be two numbers in [0, 1), got {cfg.optim.betas}")
    if t.on_nonfinite not in ("auto", "skip", "stop"):
        raise ConfigError(f"config key 'train.on_nonfinite' must be auto, skip or stop, got {t.on_nonfinite!r}")
    if cfg.engine not in ENGINES:
        raise ConfigError(f"config key 'engine' must be one of {', '.join(ENGINES)}, got {cfg.engine!r}")
    if cfg.parallel.tp < 1:
        raise ConfigError(f"config key 'parallel.tp' must be >= 1, got {cfg.parallel.tp}")
    if cfg.deepspeed.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"config key 'deepspeed.zero_stage' must be 0, 1, 2 or 3, got {cfg.deepspeed.zero_stage}")
    if not 0.0 < cfg.data.eval_fraction < 1.0:
        raise ConfigError(f"config key 'data.eval_fraction' must lie in (0, 1), got {cfg.data.eval_fraction}")


def micro_batch_for(train: TrainConfig, world_size: int) -> int:
    """The micro-batch a run on ``world_size`` ranks uses: ``train.micro_batch`` if given, else the
    largest divisor of the rank's share ``batch_size / world_size`` not above
    :data:`DEFAULT_MICRO_BATCH`.  Raises :class:`ConfigError` naming ``train.batch_size`` when the
    world size (times a given micro-batch) does not divide the global batch."""
    share, rest = divmod(train.batch_size, world_size)
    if rest or share == 0:
        raise ConfigError(f"config key 'train.batch_size' ({train.batch_size}) must be a multiple of the world size "
                          f"({world_size}): every rank takes the same share of each global batch")
    if train.micro_batch is None:
        return max(d for d in range(1, min(share, DEFAULT_MICRO_BATCH) + 1) if share % d == 0)
    if share % train.micro_batch:
        raise ConfigError(f"config key 'train.batch_size' ({train.batch_size}) must be a multiple of "
                          f"train.micro_batch x world size ({train.micro_batch} x {world_size}); leave "
                          f"train.micro_batch unset to derive it from the world size")
    return train.micro_batch


def to_dict(cfg: RunConfig) -> dict:
    return dataclasses.asdict(cfg)


def run_identity(cfg: RunConfig) -> dict:
    """The run's identity: every config key outside :data:`RESUME_MAY_CHANGE`, flat (dotted key ->
    value); checkpoints record it, and a resume under another identity is refused."""
    flat: dict = {}

    def walk(node, prefix: str) -> None:
        for f in dataclasses.fields(node):
            key, value = prefix + f.name, getattr(node, f.name)
            if key in RESUME_MAY_CHANGE:
                continue
            if dataclasses.is_dataclass(value):
                walk(value, key + ".")
            else:
                flat[key] = value

    walk(cfg, "")
    return flat
