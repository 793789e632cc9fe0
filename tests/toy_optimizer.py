r"""A toy optimizer written outside the library, as a new method would be: one class over
``OptimizerBase`` that declares its state, and a registration.  The tests use it to show that
the factory, the memory estimator, checkpoint conversion and the property tests take a new
method with no change to the library.

Row-RMS SGD: for a parameter viewed as an ``(m, n)`` matrix (``(shape[0], rest)``; a 0-d one as
``(1, 1)``) with gradient :math:`G_t` at its step :math:`t`,

.. math::
    v_i \leftarrow \beta v_i + (1-\beta)\,\tfrac1n \textstyle\sum_j G_{ij}^2,\qquad
    W_{ij} \leftarrow W_{ij}(1 - \eta\lambda) - \eta\, G_{ij} \big/ \big(\sqrt{v_i / (1-\beta^t)} + \epsilon\big).

State per parameter: ``step`` (0-d float32, replicated) and ``row_sq`` (``v``, ``(m,)`` float32,
row-sharded like the parameter: a ``Shard(0)`` DTensor under FSDP2, the owned rows of a DeepSpeed
slice).
"""

from __future__ import annotations

import contextlib
import math

import torch

from optimlib.distributed.layout import is_dtensor, to_local
from optimlib.distributed.row_block import RowBlock
from optimlib.optim import factory
from optimlib.optim._common import OptimizerBase, write_rows_
from optimlib.optim.state_spec import SHARDED, StateSpec, step_spec
from optimlib.validation import check_real

NAME = "toy_row_rms"


def _matrix(shape) -> tuple[int, int]:
    return (int(shape[0]), math.prod(shape[1:])) if len(shape) else (1, 1)


class RowRMS(OptimizerBase):
    """Row-RMS SGD (see the module docstring)."""

    def __init__(self, params, lr: float = 1e-3, beta: float = 0.9, eps: float = 1e-8, weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, beta=beta, eps=eps, weight_decay=weight_decay))

    @staticmethod
    def _validate_group(group: dict) -> None:
        check_real("lr", group["lr"], low=0.0, allow_tensor=True)
        check_real("beta", group["beta"], low=0.0, high=1.0, high_open=True)
        check_real("eps", group["eps"], low=0.0)
        check_real("weight_decay", group["weight_decay"], low=0.0)

    @classmethod
    def state_specs(cls, group, place, state=None) -> list[StateSpec]:
        if place.shape is None:
            raise ValueError(f"{cls.__name__} needs each parameter's shape (one parameter per param group)")
        if math.prod(place.shape) == 0:
            return []
        shape = _matrix(place.shape)
        rows = RowBlock(shape, place.piece).num_rows
        return [step_spec(), StateSpec("row_sq", (shape[0],), torch.float32, SHARDED, rows, "moments")]

    def _step_units(self, group: dict, units) -> None:
        lr, beta, eps, wd = float(group["lr"]), group["beta"], group["eps"], group["weight_decay"]
        for unit in units:
            if math.prod(unit.shape) == 0:
                continue
            block = RowBlock(_matrix(unit.shape), unit.piece)
            state = unit.state
            if "row_sq" not in state:
                state["step"] = torch.tensor(0.0)
                v = torch.zeros(block.num_rows, dtype=torch.float32, device=unit.local.device)
                if is_dtensor(unit.param):
                    from torch.distributed.tensor import DTensor, Shard

                    v = DTensor.from_local(v, unit.param.device_mesh, [Shard(0)], run_check=False,
                                           shape=(block.shape[0],), stride=(1,))
                state["row_sq"] = v
            state["step"] += 1
            t = float(state["step"])
            g = block.rows(unit.grad).float()
            v = to_local(state["row_sq"])
            v.mul_(beta).add_(g.square().mean(dim=1), alpha=1 - beta)
            denom = (v / (1 - beta ** t)).sqrt().add(eps)
            w = block.rows(unit.local)
            new = w.float() * (1 - lr * wd) - lr * g / denom[:, None]
            write_rows_(unit.local, new.to(unit.local.dtype), block)


def _build(groups, lr, **kwargs):
    return RowRMS(groups, lr=lr, **kwargs)


@contextlib.contextmanager
def registered():
    """``NAME`` in the optimizer registry while the block runs (the registry keeps names for the
    process's lifetime; the tests that use the toy take it out again so that the others, which
    enumerate the registry, see only the library's optimizers)."""
    factory.register_optimizer(NAME, _build, shape_aware=True, description="toy: row-RMS SGD (tests only)")
    try:
        yield
    finally:
        factory._REGISTRY._specs.pop(NAME)


# ----------------------------------------------------------------------------- a case for the conversion tests
CASE_STEPS = 4


def case_model() -> torch.nn.Sequential:
    """Linears whose rows do not divide by 2 ranks."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 7), torch.nn.Linear(7, 5))


def set_case_grads(model: torch.nn.Module, step: int, place=lambda p, g: g) -> None:
    """The seeded full gradient of every parameter at ``step``, placed by ``place(param, grad)``."""
    for i, (_, p) in enumerate(model.named_parameters()):
        g = torch.randn(tuple(p.shape), generator=torch.Generator().manual_seed(1000 * step + i))
        p.grad = place(p, g)
