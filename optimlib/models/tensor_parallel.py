"""The tensor-parallel plan of the LLaMA decoder (the launcher's ``parallel.tp``).

Within every block, the projections that fan out -- the attention's ``q_proj``/``k_proj``/
``v_proj`` and the MLP's ``gate_proj``/``up_proj`` -- are column-wise parallel (each tp rank holds
a block of output rows, so of attention heads and hidden features); the ones that fan back in --
``o_proj`` and ``down_proj`` -- are row-wise parallel (a block of input columns, the output summed
over the tp ranks).  Embeddings, norms and the output head stay whole on the tp ranks.  FSDP2
then shards every parameter over the data-parallel ranks of the (dp, tp) mesh
(:class:`optimlib.train.engine.FSDP2Engine`), which gives the column-wise weights the placements
``(_StridedShard(0), Shard(0))`` and the row-wise ones ``(Shard(0), Shard(1))``; optimlib's
optimizers step both exactly (:mod:`optimlib.distributed.layout`).
"""

from __future__ import annotations

from torch import nn

COLUMN_WISE = ("attn.q_proj", "attn.k_proj", "attn.v_proj", "mlp.gate_proj", "mlp.up_proj")
ROW_WISE = ("attn.o_proj", "mlp.down_proj")


def tensor_parallel_problem(model_config, tp: int) -> str | None:
    """Why ``tp`` ranks cannot share the blocks of a model of ``model_config`` (``None``: they can):
    each must hold an equal share of the attention heads and of the MLP's hidden features."""
    for what, size in (("attention heads (n_heads)", model_config.n_heads),
                       ("MLP hidden features (hidden_dim)", model_config.hidden_dim)):
        if size % tp:
            return f"{tp} must divide the {what}, {size}: each tensor-parallel rank holds an equal share"
    return None


def apply_tensor_parallel(model: nn.Module, tp_mesh) -> nn.Module:
    """Parallelize every block of the LLaMA ``model`` over the 1-D ``tp_mesh`` (in place)."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    plan = {**{name: ColwiseParallel() for name in COLUMN_WISE}, **{name: RowwiseParallel() for name in ROW_WISE}}
    for block in model.layers:
        parallelize_module(block, tp_mesh, plan)
    return model
