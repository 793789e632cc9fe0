"""The optimizer options a Hugging Face ``Trainer`` run implies (imports neither transformers
nor accelerate)."""

from __future__ import annotations

from typing import Any

from optimlib.optim.factory import get_optimizer_spec

__all__ = ["trainer_options"]


def trainer_options(name: str, args: Any = None, **kwargs: Any) -> dict:
    """:func:`optimlib.create_optimizer`'s keyword arguments for optimizer ``name`` under a Trainer.

    ``name``: a registered optimizer (``optimlib.list_optimizers()``; an unknown one raises
    ``ValueError`` listing them); ``kwargs``: ``create_optimizer``'s options.  ``args``: the
    ``TrainingArguments``; when given, ``lr`` and ``weight_decay`` default to its ``learning_rate``
    and ``weight_decay``, and for a projected optimizer ``target_modules`` to its
    ``optim_target_modules`` (when set)."""
    spec = get_optimizer_spec(name)
    options = dict(kwargs)
    if args is not None:
        options.setdefault("lr", args.learning_rate)
        options.setdefault("weight_decay", args.weight_decay)
        targets = getattr(args, "optim_target_modules", None)
        if spec.matrix_keys and targets is not None:
            options.setdefault("target_modules", targets)
    return {"name": name, **options}
