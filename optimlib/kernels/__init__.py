"""Fused Triton kernels (installed as ``optimlib.kernels``), each with a PyTorch reference twin.

Each kernel family is one module; each op is a ``torch.library`` custom op in the ``optimlib``
namespace (``torch.ops.optimlib.*``) with a fake implementation, so ``torch.compile`` traces
through it.  CUDA tensors take the Triton kernel, CPU tensors the twin; ``backend=`` or the
environment variable ``OPTIMLIB_KERNELS`` (``auto``/``triton``/``reference``) forces either
(see :mod:`optimlib.kernels._dispatch`; Triton on CPU runs in its interpreter, with
``TRITON_INTERPRET=1``).

==========================  ==============================================================
module                      ops (public functions)
==========================  ==============================================================
:mod:`.adam`                ``adam_lowrank_update_``, ``adam8bit_lowrank_update_``
:mod:`.galore`              ``galore_backproject_update_``
:mod:`.smmf`                ``smmf_update_``
:mod:`.adamp`               ``adamp_update_`` (``adamp_stats_``, ``adamp_coefficients``, ``adamp_apply_``)
:mod:`.sltrain`             ``sltrain_compose``, ``sltrain_grads``
:mod:`.nm`                  ``nm_mask_apply``, ``nm_grad``
:mod:`.compander`           ``compander``
==========================  ==============================================================
"""

from optimlib.kernels._dispatch import BACKENDS, ENV_VAR, HAS_TRITON, KernelUnavailable, resolve_backend
from optimlib.kernels.adam import adam8bit_lowrank_update_, adam_lowrank_update_
from optimlib.kernels.adamp import adamp_apply_, adamp_coefficients, adamp_stats_, adamp_update_
from optimlib.kernels.compander import compander
from optimlib.kernels.galore import galore_backproject_update_
from optimlib.kernels.nm import nm_grad, nm_mask_apply
from optimlib.kernels.sltrain import sltrain_compose, sltrain_grads
from optimlib.kernels.smmf import smmf_update_

__all__ = ["BACKENDS", "ENV_VAR", "HAS_TRITON", "KernelUnavailable", "resolve_backend",
           "adam_lowrank_update_", "adam8bit_lowrank_update_", "galore_backproject_update_", "smmf_update_",
           "adamp_update_", "adamp_stats_", "adamp_coefficients", "adamp_apply_", "sltrain_compose",
           "sltrain_grads", "nm_mask_apply", "nm_grad", "compander"]
