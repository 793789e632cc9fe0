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

A linear already replaced by a reparameterized layer (SLTrain, LOST, dynamic rank: a
``parallelize(mesh, style)`` method, :class:`optimlib.reparam._lowrank.TensorParallelFactors`)
distributes itself in the same style (:func:`parallelize_linears`).
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


def parallelize_linears(module: nn.Module, tp_mesh, styles: dict[str, str]) -> nn.Module:
    """Make the linears of ``module`` named in ``styles`` (name -> ``"colwise"`` | ``"rowwise"``)
    tensor parallel over the 1-D ``tp_mesh`` (in place): an ``nn.Linear`` through torch's
    ``ColwiseParallel`` / ``RowwiseParallel``, a layer with a ``parallelize(mesh, style)`` method
    through that method."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    torch_styles = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}
    plan = {}
    for name, style in styles.items():
        if style not in torch_styles:
            raise ValueError(f"style of {name!r} must be 'colwise' or 'rowwise', got {style!r}")
        layer = module.get_submodule(name)
        if type(layer) is nn.Linear:
            plan[name] = torch_styles[style]()
        elif callable(getattr(layer, "parallelize", None)):
            layer.parallelize(tp_mesh, style)
        else:
            raise TypeError(f"{name!r} is a {type(layer).__name__}, which has no tensor-parallel form (an nn.Linear "
                            f"or a layer with a parallelize(mesh, style) method has)")
    if plan:
        parallelize_module(module, tp_mesh, plan)
    return module


def apply_tensor_parallel(model: nn.Module, tp_mesh) -> nn.Module:
    """Parallelize every block of the LLaMA ``model`` over the 1-D ``tp_mesh`` (in place)."""
    styles = {**dict.fromkeys(COLUMN_WISE, "colwise"), **dict.fromkeys(ROW_WISE, "rowwise")}
    for block in model.layers:
        parallelize_linears(block, tp_mesh, styles)
    return model
