"""Activation memory of :class:`optimlib.models.Llama`: the tensors autograd saves for backward.

Counted from the model's own autograd graph (saved-tensor hooks, storages deduplicated,
parameters excluded; ``tests/bench/test_estimate.py`` recounts it on ``llama_tiny`` and
``llama_60m``).  Per token, with ``d`` the width, ``h`` the MLP width, ``H`` the heads, ``L`` the
layers and ``V`` the vocabulary:

* per layer ``4 h + 10 d + H + 2`` elements: the SwiGLU's gate and up outputs, their product and
  the SiLU output (``4 h``); each norm's input, normalized input and output (``6 d``, the output
  being what the next projections read); the rotated queries, keys, the values and the output that
  scaled-dot-product attention keeps (``4 d``; ``o_proj`` reads that output through a view);
  attention's log-sum-exp (``H``) and the two norms' inverse RMS (``2``);
* the head: ``3 d + 1`` (final norm, LM-head input) and the ``V`` log-softmax of the loss, which
  the training loop computes in float32 (``logits.float()``);
* the token block (int64; inputs and shifted targets are two views of one ``(B, T + 1)``
  buffer, as the training loop cuts them) and the loss's flattened targets (a copy: the view is
  not contiguous), the rotary tables (``2 x max(T, max_seq_len) x head_dim`` float32,
  shared by all layers) and the float32 loss.

Flash / memory-efficient attention keeps no ``T x T`` matrix (PyTorch's SDPA on CPU and CUDA
both use such a kernel here); the math fallback would add ``H T^2`` per sequence and layer, which
is not modelled.  With activation checkpointing of every block (not what ``launch/pretrain.py``
does today) the blocks keep only their ``d``-wide inputs and one block's activations are alive
again during its recomputation.  Under bf16 autocast the layer terms use the autocast dtype (the
norms' statistics, a few elements per token, are counted in it too) and the loss term stays float32.

Under tensor parallelism over ``tp`` ranks (:mod:`optimlib.models.tensor_parallel`: the heads and
the MLP's hidden features divided over the ranks) each rank keeps ``(4 h + 4 d + H) / tp + 6 d + 2``
elements per layer: its share of the heads' and hidden features' tensors, the norms' tensors
whole (``tests/bench/test_estimate.py`` counts it on 4 ranks of FSDP2 x tensor parallel); the
embedding, the head and the loss are the same on every rank.
"""

from __future__ import annotations

import torch

from optimlib.models import LlamaConfig

__all__ = ["activation_bytes", "per_layer_elements"]


def per_layer_elements(cfg: LlamaConfig, tp: int = 1) -> int:
    """Elements per token one transformer block keeps for backward (on each of ``tp`` tensor-parallel ranks)."""
    return (4 * cfg.hidden_dim + 4 * cfg.dim + cfg.n_heads) // tp + 6 * cfg.dim + 2


def activation_bytes(cfg: LlamaConfig, micro_batch: int, seq_len: int, dtype: torch.dtype = torch.float32,
                     checkpointing: bool = False, tp: int = 1) -> int:
    """Bytes saved for backward by one forward pass of ``micro_batch`` sequences of ``seq_len`` tokens.

    ``dtype``: the dtype activations are computed in (the parameter dtype, or the autocast dtype).
    ``tp``: tensor-parallel degree (it divides ``n_heads`` and ``hidden_dim``).
    """
    if micro_batch < 1 or seq_len < 1:
        raise ValueError(f"micro_batch and seq_len must be >= 1, got micro_batch={micro_batch}, seq_len={seq_len}")
    tokens = micro_batch * seq_len
    size = torch.empty((), dtype=dtype).element_size()
    layer = per_layer_elements(cfg, tp)
    if checkpointing:
        blocks = cfg.n_layers * cfg.dim + layer
    else:
        blocks = cfg.n_layers * layer
    head = (3 * cfg.dim + 1) * size + cfg.vocab_size * 4
    ids = 8 * micro_batch * (seq_len + 1) + 8 * tokens
    rotary = 2 * max(seq_len, cfg.max_seq_len) * cfg.head_dim * 4
    loss = 4
    return tokens * (blocks * size + head) + ids + rotary + loss
