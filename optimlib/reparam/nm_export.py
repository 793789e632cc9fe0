"""Finding the N:M-sparsified layers of a model, and exporting them to PyTorch's 2:4
semi-structured sparse tensors for inference."""

from __future__ import annotations

import warnings

import torch
from torch import nn
from torch.nn.utils import parametrize

from optimlib.reparam.nm import NMSparsity, is_nm_sparse

__all__ = ["nm_parametrizations", "to_semi_structured", "SemiStructuredUnavailable"]


def nm_parametrizations(model: nn.Module) -> list[tuple[str, nn.Linear, NMSparsity]]:
    """``(name, linear, parametrization)`` of every N:M-parametrized linear of ``model``."""
    found = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and parametrize.is_parametrized(module, "weight"):
            for p in module.parametrizations.weight:
                if isinstance(p, NMSparsity):
                    found.append((name, module, p))
    return found


class SemiStructuredUnavailable(RuntimeError):
    """``to_semi_structured(..., strict=True)`` on hardware, dtype or shapes it cannot serve."""


def _semi_structured_class():
    from torch.sparse import SparseSemiStructuredTensor, SparseSemiStructuredTensorCUSPARSELT, \
        SparseSemiStructuredTensorCUTLASS

    if SparseSemiStructuredTensor._FORCE_CUTLASS or not torch.backends.cusparselt.is_available():
        return SparseSemiStructuredTensorCUTLASS
    return SparseSemiStructuredTensorCUSPARSELT


def _semi_structured_problem(weight: torch.Tensor) -> str | None:
    """Why ``weight`` cannot become a semi-structured tensor here (None: it can)."""
    if weight.device.type != "cuda":
        return (f"the weight is on {weight.device.type}; 2:4 semi-structured tensors need a CUDA GPU "
                f"with sparse tensor cores (compute capability >= 8.0)")
    major, minor = torch.cuda.get_device_capability(weight.device)
    if major < 8:
        return f"the GPU has compute capability {major}.{minor}; sparse tensor cores need >= 8.0"
    cls = _semi_structured_class()
    limits = cls._DTYPE_SHAPE_CONSTRAINTS.get(weight.dtype)
    if limits is None:
        names = ", ".join(str(d).replace("torch.", "") for d in cls._DTYPE_SHAPE_CONSTRAINTS)
        return (f"dtype {str(weight.dtype).replace('torch.', '')} is not supported by the {cls.BACKEND} backend "
                f"(supported: {names}); pass dtype=torch.bfloat16")
    rows, cols = weight.shape
    if rows % limits.sparse_min_rows or cols % limits.sparse_min_cols:
        return (f"shape {tuple(weight.shape)} is not a multiple of ({limits.sparse_min_rows}, "
                f"{limits.sparse_min_cols}), which the {cls.BACKEND} backend needs for {weight.dtype}")
    return None


def to_semi_structured(model: nn.Module, *, dtype: torch.dtype | None = None, strict: bool = False) -> list[str]:
    """Convert every N:M linear of ``model`` whose sparse weight is 2:4-compatible (at most 2
    non-zeros in every 4 consecutive inputs: 2:4, 1:4, 1:8, 2:8, ...) to a ``torch.sparse``
    semi-structured weight, for inference.

    The N:M parametrization is baked in first (exact zeros, as :func:`optimlib.reparam.merge`),
    then ``linear.weight`` becomes a frozen ``SparseSemiStructuredTensor`` (cuSPARSELt where
    available, else CUTLASS), cast to ``dtype`` if given.  Where the hardware, dtype or shape
    cannot be served (no CUDA GPU, compute capability < 8.0, fp32 on cuSPARSELt, shapes off the
    backend's multiples, a pattern that is not 2:4-compatible) the layer falls back: it stays a
    dense ``nn.Linear`` with exact N:M zeros, and a ``UserWarning`` names the layers and the
    reason.  With ``strict=True`` a :class:`SemiStructuredUnavailable` error is raised instead,
    before any layer is changed.  Returns the names of the converted layers.
    """
    layers = nm_parametrizations(model)
    if not layers:
        raise ValueError("the model has no N:M-sparse linear (apply(model, 'nm', ...) first)")
    plan, reasons = [], {}
    for name, linear, p in layers:
        with torch.no_grad():
            dense = linear.weight  # under no_grad the parametrization applies the target mask
            target = (dense if dtype is None else dense.to(dtype)).contiguous()
        problem = None
        if not is_nm_sparse(target, 2, 4):
            problem = f"pattern {p.n}:{p.m} leaves more than 2 non-zeros in some group of 4 (not 2:4-compatible)"
        if problem is None:
            problem = _semi_structured_problem(target)
        sparse = None
        if problem is None:
            try:
                sparse = _semi_structured_class().from_dense(target)
            except RuntimeError as exc:  # e.g. a torch build without the kernels
                problem = f"torch refused the conversion: {exc}"
        if problem is not None:
            reasons.setdefault(problem, []).append(name)
        plan.append((name, linear, sparse))
    messages = [f"to_semi_structured: {len(names)} layer(s) kept dense with exact N:M zeros "
                f"({', '.join(names[:3])}{', ...' if len(names) > 3 else ''}): {reason}"
                for reason, names in reasons.items()]
    if strict and messages:
        raise SemiStructuredUnavailable("; ".join(messages))
    converted = []
    for name, linear, sparse in plan:
        if sparse is None:
            parametrize.remove_parametrizations(linear, "weight", leave_parametrized=True)
            continue
        parametrize.remove_parametrizations(linear, "weight", leave_parametrized=False)
        linear.weight = nn.Parameter(sparse, requires_grad=False)
        if linear.bias is not None and dtype is not None:
            linear.bias = nn.Parameter(linear.bias.detach().to(dtype), requires_grad=False)
        converted.append(name)
    for message in messages:
        warnings.warn(message, UserWarning, stacklevel=2)
    return converted

