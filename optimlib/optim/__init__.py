"""Optimizers: one file per family, each a ``torch.optim.Optimizer`` over a functional core."""

from optimlib.optim.factory import (
    OptimizerSpec,
    create_optimizer,
    get_optimizer_spec,
    list_optimizers,
    optimizer_state_bytes,
    param_groups,
    register_optimizer,
)

__all__ = [
    "OptimizerSpec",
    "create_optimizer",
    "get_optimizer_spec",
    "list_optimizers",
    "optimizer_state_bytes",
    "param_groups",
    "register_optimizer",
]

from optimlib.optim.adamp import SGDP, AdamP  # noqa: E402  (registers "adamp", "sgdp")
from optimlib.optim.smmf import SMMF  # noqa: E402  (registers "smmf")

__all__ += ["AdamP", "SGDP", "SMMF"]

from optimlib.optim.galore import ApolloAdamW, COAPAdamW, FiraAdamW, GaLoreAdamW, QGaLoreAdamW  # noqa: E402

__all__ += ["ApolloAdamW", "COAPAdamW", "FiraAdamW", "GaLoreAdamW", "QGaLoreAdamW"]
