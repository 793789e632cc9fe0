"""optimlib: memory-saving training-time optimizers and weight reparameterizations.

Everything is a ``torch.optim.Optimizer`` or a parametrized module that stays correct under
FSDP2 and DeepSpeed ZeRO.  ``create_optimizer(model, name, ...)`` builds any registered
optimizer; ``list_optimizers()`` names them.
"""

from optimlib.optim import create_optimizer, list_optimizers, optimizer_state_bytes, register_optimizer

__version__ = "0.1.0"
__all__ = ["create_optimizer", "list_optimizers", "optimizer_state_bytes", "register_optimizer", "__version__"]

from optimlib.optim import SGDP, SMMF, AdamP  # noqa: E402

__all__ += ["AdamP", "SGDP", "SMMF"]

from optimlib.optim import ApolloAdamW, COAPAdamW, FiraAdamW, GaLoreAdamW, QGaLoreAdamW  # noqa: E402

__all__ += ["ApolloAdamW", "COAPAdamW", "FiraAdamW", "GaLoreAdamW", "QGaLoreAdamW"]

from optimlib.optim.migrate import convert_state_dict  # noqa: E402

__all__ += ["convert_state_dict"]
