"""The byte-level tokenizer of the no-download default: UTF-8 bytes are the tokens.

No vocabulary file, no training and no dependency, and every string round-trips. Sequences are
about 4x longer than with a 32k BPE vocabulary, which is fine for the CPU-scale runs it serves.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np


class ByteTokenizer:
    """UTF-8 bytes → ids 0..255, plus ``eos_id = 256`` that separates documents."""

    eos_id: int = 256
    vocab_size: int = 257

    def encode(self, text: str) -> np.ndarray:
        """The UTF-8 bytes of ``text`` as a ``uint16`` array (no EOS appended)."""
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.uint16)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids`` (a list, array or CPU tensor): EOS ids are dropped, invalid UTF-8 becomes U+FFFD.

        Raises ``ValueError`` for an id outside ``0..256`` (it cannot come from this tokenizer).
        """
        arr = np.asarray(ids if hasattr(ids, "__len__") else list(ids), dtype=np.int64).reshape(-1)
        if arr.size and (arr.min() < 0 or arr.max() > self.eos_id):
            bad = arr[(arr < 0) | (arr > self.eos_id)][0]
            raise ValueError(f"token id {int(bad)} is outside the byte tokenizer's range 0..{self.eos_id}")
        return arr[arr != self.eos_id].astype(np.uint8).tobytes().decode("utf-8", errors="replace")
