"""Parameters kept whole and identical on every rank, outside FSDP2's and ZeRO's sharding.

A reparameterized layer may declare some of its parameters *replicated* (a class attribute
``replicated_parameters = ("U", "S", "V")``, see :func:`optimlib.reparam.replicated_parameters`):
small tensors whose shape the layer changes, in place, between optimizer steps (the factors of a
dynamic-rank layer).  FSDP2's ``DTensor`` shards and ZeRO's flat partitions are laid out once at
wrap time and cannot follow a shape change, so the sharded engines keep those parameters out:

* **hidden from the wrapper**: each one moves from its module's ``_parameters`` to a plain
  attribute of the module (``module.U`` still finds it, forward is unchanged), so neither
  ``fully_shard`` nor ``deepspeed.initialize`` (which convert every *registered* parameter) see
  it, and the module's ``state_dict`` leaves it out: :meth:`ReplicatedParams.state_dict` carries
  it in checkpoints instead, with its optimizer state;
* **identical on every rank**: broadcast from rank 0 once; gradients averaged over the ranks with
  one all-reduce per optimizer step (:meth:`average_grads_`), exactly the data-parallel mean
  FSDP2's reduce-scatter and ZeRO's reduction compute for the other parameters; the same
  optimizer update then runs on the same values on every rank, so step-time work on them (a
  QR / SVD and a rank decision) is the same on every rank without any further communication;
* **trained by a second instance of the run's optimizer** (same class, options and param-group
  rules), which the layers' step hooks may reshape freely: it holds plain tensors.  A hook that
  replaces a parameter by a new one of another shape does so with :func:`replace_parameter`,
  which keeps it hidden; this class looks the parameters up by name each time.

Memory: the replicated parameters and their optimizer state are held in full on every rank
(for a dynamic-rank layer ``(d_out + d_in + k) k`` numbers, at the current width ``k``).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


class ReplicatedParams:
    """The replicated parameters of a model, hidden from its ``_parameters`` (see the module doc).

    ``entries``: ``(qualified name, module, attribute)`` triples, as
    :func:`optimlib.reparam.replicated_parameters` returns them.  ``optimizer`` is set by the
    engine once built.
    """

    def __init__(self, entries: list[tuple[str, nn.Module, str]], world_size: int):
        self.world_size = world_size
        self.entries = list(entries)
        for _, module, attr in self.entries:
            object.__setattr__(module, attr, module._parameters.pop(attr))  # module.attr still finds it
        self.optimizer: torch.optim.Optimizer | None = None

    @property
    def named(self) -> list[tuple[str, nn.Parameter]]:
        """``(qualified name, parameter)``, looked up now (step hooks replace parameters)."""
        return [(fqn, getattr(module, attr)) for fqn, module, attr in self.entries]

    @property
    def params(self) -> list[nn.Parameter]:
        return [p for _, p in self.named]

    def param_view(self) -> nn.Module:
        """A module whose ``named_parameters`` are these parameters under their qualified names
        (what the optimizer factory builds its param groups from)."""
        return _ParamView(self.named)

    # ------------------------------------------------------------------ collectives
    @torch.no_grad()
    def broadcast_(self) -> None:
        """Rank 0's values everywhere (one flat broadcast)."""
        if self.world_size > 1:
            flat = torch._utils._flatten_dense_tensors([p.data for p in self.params])
            dist.broadcast(flat, 0)
            for p, src in zip(self.params, torch._utils._unflatten_dense_tensors(flat, [p.data for p in self.params])):
                p.data.copy_(src)

    @torch.no_grad()
    def average_grads_(self) -> None:
        """Every gradient becomes its mean over the ranks (one flat all-reduce).  Every rank runs
        the same model, so the same parameters have a gradient everywhere."""
        grads = self.grads()
        if self.world_size == 1 or not grads:
            return
        flat = torch._utils._flatten_dense_tensors(grads)
        dist.all_reduce(flat)
        flat /= self.world_size
        for g, avg in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
            g.copy_(avg)

    # ------------------------------------------------------------------ gradients
    def grads(self) -> list[torch.Tensor]:
        return [p.grad for p in self.params if p.grad is not None]

    def grad_norm(self) -> torch.Tensor:
        """L2 norm of the (averaged) gradients: the same value on every rank."""
        grads = self.grads()
        if not grads:
            return torch.zeros((), device=self.params[0].device)
        return torch.nn.utils.get_total_norm(grads, foreach=True)

    def nonfinite_names(self) -> list[str]:
        return [n for n, p in self.named if p.grad is not None and not bool(torch.isfinite(p.grad).all())]

    def param_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.params)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """The parameters (by qualified name, at their current shapes) and the optimizer's state."""
        return {"params": {n: p.detach().clone() for n, p in self.named},
                "optimizer": self.optimizer.state_dict() if self.optimizer is not None else None}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        """Take the saved values *and shapes* (each parameter is resized in place, so the
        optimizer keeps referring to it), then the optimizer's state."""
        saved = state["params"]
        names = [n for n, _ in self.named]
        if sorted(saved) != sorted(names):
            missing, extra = sorted(set(names) - set(saved)), sorted(set(saved) - set(names))
            raise ValueError(f"replicated parameters in the checkpoint do not match the model: missing {missing}, "
                             f"unexpected {extra}")
        for n, p in self.named:
            p.grad = None
            p.data = saved[n].to(device=p.device, dtype=p.dtype).clone()
        if self.optimizer is not None and state.get("optimizer") is not None:
            self.optimizer.load_state_dict(state["optimizer"])


def replace_parameter(module: nn.Module, name: str, value: nn.Parameter) -> None:
    """Make ``value`` the parameter ``module.<name>``, where the module keeps it: registered in
    ``module._parameters``, or as the plain attribute :class:`ReplicatedParams` hid it as."""
    if name in module._parameters:
        module._parameters[name] = value
    else:
        object.__setattr__(module, name, value)


class _ParamView(nn.Module):
    """``named_parameters()`` over a fixed list (names may contain dots); no submodules."""

    def __init__(self, named: list[tuple[str, nn.Parameter]]):
        super().__init__()
        self._named = list(named)

    def named_parameters(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True):
        return iter(self._named)
