"""Packing a token stream into training blocks, and which blocks each step and rank takes.

The batch order is a pure function of ``(step, batch_size, num_blocks, seed)`` and does not
depend on the world size: step ``s`` takes the global batch ``global_batch_indices(s, ...)``
and rank ``r`` of ``N`` takes its contiguous ``1/N`` of it (``rank_indices``). So a run on 1
rank and on N ranks sees the same global batches, and a resumed run continues exactly where
the checkpoint left off without any sampler state to save.
"""

from __future__ import annotations

import functools
import operator

import numpy as np
import torch


class PackedBlocks:
    """A 1-D token stream cut into ``len(self)`` non-overlapping blocks of ``seq_len + 1`` tokens.

    A block's first ``seq_len`` tokens are the inputs and its last ``seq_len`` the targets, so no
    token is lost to the shift; the tail that does not fill a block is dropped. Blocks run
    across document boundaries (documents are separated by EOS). Works on memory maps
    without reading them: only the blocks asked for are read.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int):
        tokens = np.asarray(tokens)
        if tokens.ndim != 1:
            raise ValueError(f"PackedBlocks needs a 1-D token stream, got shape {tokens.shape}")
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        self.seq_len = seq_len
        block = seq_len + 1
        n_blocks = len(tokens) // block
        if n_blocks == 0:
            raise ValueError(f"a stream of {len(tokens)} tokens is shorter than one block of data.seq_len + 1 = "
                             f"{block} tokens; lower data.seq_len or use more data")
        self._blocks = tokens[:n_blocks * block].reshape(n_blocks, block)

    def __len__(self) -> int:
        return self._blocks.shape[0]

    def get(self, indices) -> torch.Tensor:
        """The blocks at ``indices`` as an int64 tensor of shape ``(len(indices), seq_len + 1)``."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"block index out of range [0, {len(self)}): {idx[(idx < 0) | (idx >= len(self))][0]}")
        return torch.from_numpy(self._blocks[idx].astype(np.int64))


@functools.lru_cache(maxsize=2)
def _epoch_permutation(seed: int, epoch: int, num_blocks: int) -> np.ndarray:
    """The block order of one epoch (cached: consecutive steps mostly share an epoch)."""
    perm = np.random.default_rng((seed, epoch)).permutation(num_blocks)
    perm.flags.writeable = False
    return perm


def global_batch_indices(step: int, batch_size: int, num_blocks: int, seed: int) -> np.ndarray:
    """Block indices of global step ``step``: ``batch_size`` int64 indices in ``[0, num_blocks)``.

    The blocks are visited epoch by epoch, each epoch in the order of
    ``np.random.default_rng((seed, epoch)).permutation(num_blocks)``; step ``s`` takes positions
    ``s*batch_size .. (s+1)*batch_size - 1`` of that endless sequence, so a batch may span an
    epoch boundary (``epoch = position // num_blocks``) and every block is seen once per epoch.
    """
    step, batch_size, num_blocks, seed = map(operator.index, (step, batch_size, num_blocks, seed))
    if step < 0 or batch_size < 1 or num_blocks < 1 or seed < 0:
        raise ValueError(f"need step >= 0, batch_size >= 1, num_blocks >= 1, seed >= 0; got step={step}, "
                         f"batch_size={batch_size}, num_blocks={num_blocks}, seed={seed}")
    pos, stop = step * batch_size, (step + 1) * batch_size
    parts = []
    while pos < stop:
        epoch, offset = divmod(pos, num_blocks)
        take = min(stop - pos, num_blocks - offset)
        parts.append(_epoch_permutation(seed, epoch, num_blocks)[offset:offset + take])
        pos += take
    return np.concatenate(parts).astype(np.int64)


def rank_indices(indices, rank: int, world_size: int) -> np.ndarray:
    """Rank ``rank``'s contiguous ``1/world_size`` of a global batch (ranks in order rebuild it)."""
    indices = np.asarray(indices)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    if len(indices) % world_size:
        raise ValueError(f"a batch of {len(indices)} blocks cannot be split evenly over {world_size} ranks")
    per_rank = len(indices) // world_size
    return indices[rank * per_rank:(rank + 1) * per_rank]


def eval_blocks(tokens: np.ndarray, seq_len: int, max_blocks: int) -> torch.Tensor:
    """The first ``min(max_blocks, available)`` blocks of the held-out stream, ``(k, seq_len + 1)`` int64.

    A fixed set, so every evaluation of a run (and of runs to compare) scores the same tokens.
    """
    if max_blocks < 1:
        raise ValueError(f"max_blocks must be >= 1, got {max_blocks}")
    blocks = PackedBlocks(tokens, seq_len)
    return blocks.get(np.arange(min(max_blocks, len(blocks))))
