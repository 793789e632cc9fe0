"""Which methods fit which model on which GPUs: a grid of :func:`estimate_memory` results.

``fit_grid(models=["llama_7b"], optimizers=["adamw", "galore_adamw"], setups=["single", "fsdp2:8",
"zero3:8"])`` estimates every combination and marks whether one rank's total fits each GPU
capacity with headroom: a setup *fits* a GPU of ``C`` GiB when the estimate is at most
``HEADROOM * C`` -- the remaining 10 % stands for what the estimator leaves out (CUDA context,
allocator fragmentation, communication buckets, SVD and quantization workspaces).

Besides the named configs, :data:`EXTRA_MODELS` has LLaMA-2-13B and a 70B model with LLaMA-2-70B's
widths; :class:`optimlib.models.Llama` has no grouped-query attention, so that "70B" has full
multi-head attention and its own parameter count (reported in every row).
"""

from __future__ import annotations

import yaml

from optimlib.bench.contenders import optimizer_kwargs
from optimlib.bench.estimate import estimate_memory
from optimlib.bench.report import markdown_table
from optimlib.models import CONFIGS, LlamaConfig, get_config
from optimlib.models.tensor_parallel import tensor_parallel_problem

__all__ = ["EXTRA_MODELS", "HEADROOM", "parse_setup", "fit_grid", "fit_markdown"]

HEADROOM = 0.9
EXTRA_MODELS = {
    "llama_13b": LlamaConfig(dim=5120, hidden_dim=13824, n_heads=40, n_layers=40, vocab_size=32000),
    "llama_70b_mha": LlamaConfig(dim=8192, hidden_dim=28672, n_heads=64, n_layers=80, vocab_size=32000),
}
# GaLore-style rank for the extra models (the paper stops at 7B: keep its 1024).
_EXTRA_RANKS = {"llama_13b": 1024, "llama_70b_mha": 1024}


def parse_setup(text: str) -> dict:
    """``single``, ``fsdp2:8``, ``fsdp2:8:tp2`` (FSDP2 over 2-way tensor parallelism on 8 ranks: the
    launcher's ``parallel.tp=2``), ``zero2:8`` (DeepSpeed stage 2 on 8 ranks), ``ddp:8`` (stage 0)."""
    name, _, rest = text.partition(":")
    count, _, degree = rest.partition(":")
    try:
        world = int(count) if count else 1
    except ValueError:
        raise ValueError(f"invalid setup={text!r}: the world size after ':' must be an integer") from None
    tp = 1
    if degree:
        if name != "fsdp2" or not degree.startswith("tp") or not degree[2:].isdigit() or int(degree[2:]) < 1:
            raise ValueError(f"invalid setup={text!r}: a tensor-parallel degree is written fsdp2:N:tpT")
        tp = int(degree[2:])
        if world % tp:
            raise ValueError(f"invalid setup={text!r}: tp={tp} must divide the world size {world}")
    if name == "single":
        if world != 1:
            raise ValueError(f"invalid setup={text!r}: 'single' is one process")
        return {"label": "single", "engine": "single", "zero_stage": 0, "world_size": 1, "tp": 1}
    if name == "fsdp2":
        return {"label": text, "engine": "fsdp2", "zero_stage": 0, "world_size": world, "tp": tp}
    if name in ("zero0", "ddp", "zero1", "zero2", "zero3"):
        stage = 0 if name in ("zero0", "ddp") else int(name[-1])
        return {"label": text, "engine": "deepspeed", "zero_stage": stage, "world_size": world, "tp": 1}
    raise ValueError(f"invalid setup={text!r}: accepted single, fsdp2:N, fsdp2:N:tpT, zero0:N .. zero3:N")


def _model(name: str):
    if name in CONFIGS:
        return name
    if name in EXTRA_MODELS:
        return EXTRA_MODELS[name]
    raise ValueError(f"unknown model {name!r}; known: {', '.join(list(CONFIGS) + list(EXTRA_MODELS))}")


_ESTIMATE_FLAGS = ("layerwise",)


def _kwargs(optimizer: str, model: str) -> tuple[str, dict, dict]:
    """``(registered name, factory kwargs, estimator flags)`` of a grid entry such as
    ``galore_adamw+moments_dtype=int8+layerwise=true`` (``layerwise`` goes to the estimator)."""
    base, *variants = optimizer.split("+")
    kwargs = optimizer_kwargs(base, EXTRA_MODELS.get(model, model))
    if "rank" in kwargs and model in _EXTRA_RANKS:
        kwargs["rank"] = _EXTRA_RANKS[model]
    flags = {}
    for variant in variants:
        key, sep, value = variant.partition("=")
        if not sep:
            raise ValueError(f"invalid optimizer entry {optimizer!r}: expected NAME+KEY=VALUE[+KEY=VALUE...]")
        (flags if key in _ESTIMATE_FLAGS else kwargs)[key] = yaml.safe_load(value)
    return base, kwargs, flags


def fit_grid(models, optimizers, setups, *, dtype: str = "bfloat16", micro_batch: int = 1, seq_len: int = 2048,
             activation_checkpointing: bool = False, activation_dtype: str | None = None,
             gpus_gib=(24, 80), progress=None) -> dict:
    """Estimate every ``model x optimizer x setup`` and mark which GPU sizes it fits.

    ``optimizers`` are registered names, optionally with options after ``+``
    (``galore_adamw+moments_dtype=int8+layerwise=true``: ``layerwise`` is the estimator's
    optimizer-in-backward flag, the rest go to the optimizer); ranks are the GaLore paper's (1024
    above 7B).  A tensor-parallel setup (``fsdp2:8:tp2``) is left out for a model whose heads or MLP
    width it does not divide, and for layer-wise entries.
    """
    rows = []
    parsed = [parse_setup(s) for s in setups]
    for model in models:
        cfg = _model(model)
        config = get_config(cfg) if isinstance(cfg, str) else cfg
        for optimizer in optimizers:
            base, kwargs, flags = _kwargs(optimizer, model)
            for setup in parsed:
                if flags.get("layerwise") and (setup["engine"] == "deepspeed" or setup["tp"] > 1):
                    continue          # DeepSpeed owns the gradients, tensor parallel steps after backward
                if setup["tp"] > 1 and tensor_parallel_problem(config, setup["tp"]):
                    continue          # tp does not divide this model's heads or MLP width
                if progress:
                    progress(f"{model} {optimizer} {setup['label']}")
                est = estimate_memory(cfg, base, engine=setup["engine"], zero_stage=setup["zero_stage"],
                                      world_size=setup["world_size"], tp=setup["tp"], dtype=dtype,
                                      micro_batch=micro_batch, seq_len=seq_len,
                                      activation_checkpointing=activation_checkpointing,
                                      activation_dtype=activation_dtype, **flags, **kwargs)
                row = {"model": model, "optimizer": optimizer, "setup": setup["label"],
                       "parameters": est.num_parameters, "weights": est.weights, "gradients": est.gradients,
                       "optimizer_states": est.optimizer_states, "master_weights": est.master_weights,
                       "activations": est.activations, "total": est.total, "settings": {**kwargs, **flags},
                       "state_breakdown": est.state_breakdown}
                for gib in gpus_gib:
                    row[f"fits_{gib}GiB"] = est.total <= HEADROOM * gib * 2 ** 30
                rows.append(row)
    return {"benchmark": "estimate", "dtype": dtype, "activation_dtype": activation_dtype or dtype,
            "micro_batch": micro_batch, "seq_len": seq_len, "activation_checkpointing": activation_checkpointing,
            "gpus_gib": list(gpus_gib), "headroom": HEADROOM, "rows": rows}


def _gib(n) -> str:
    return f"{n / 2 ** 30:,.2f}"


def fit_markdown(result: dict) -> str:
    columns = [("model", "model", None), ("parameters", "params", lambda n: f"{n / 1e9:.2f}B"),
               ("optimizer", "optimizer", None), ("setup", "setup", None), ("weights", "weights GiB", _gib),
               ("gradients", "grads GiB", _gib), ("optimizer_states", "states GiB", _gib),
               ("master_weights", "master GiB", _gib), ("activations", "activations GiB", _gib),
               ("total", "total GiB", _gib)]
    columns += [(f"fits_{g}GiB", f"fits {g} GiB", lambda b: "yes" if b else "no") for g in result["gpus_gib"]]
    head = (f"Per-rank estimate ({result['dtype']} parameters, activations in {result['activation_dtype']}, "
            f"micro-batch {result['micro_batch']} x {result['seq_len']} tokens, activation checkpointing "
            f"{'on' if result['activation_checkpointing'] else 'off'}); fits = total <= {result['headroom']:.0%} of "
            "the GPU (the rest for the CUDA context, fragmentation, communication buckets, SVD workspace).")
    return "\n".join([head, "", markdown_table(result["rows"], columns)])
