"""Named LLaMA size configs and the closed-form parameter count.

The named sizes are those of the GaLore paper's LLaMA pretraining experiments (Zhao et al.,
2024), so a run named ``llama_60m`` here is the model their numbers are about. All use a
32000-token vocabulary (the LLaMA sentencepiece tokenizer). ``llama_tiny`` is the CPU default:
small enough to train for a few hundred steps on a laptop, with a vocabulary that holds the
byte tokenizer's 257 ids (rounded up to a multiple of 64).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class LlamaConfig:
    """Shape of a LLaMA-style decoder.

    ``max_seq_len`` only sizes the rotary-embedding cache that is built at first use; a longer
    input grows the cache, so it is not a hard limit.
    """

    dim: int
    hidden_dim: int
    n_heads: int
    n_layers: int
    vocab_size: int
    max_seq_len: int = 2048
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0

    def __post_init__(self):
        for name in ("dim", "hidden_dim", "n_heads", "n_layers", "vocab_size", "max_seq_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"LlamaConfig.{name} must be a positive integer, got {value!r}")
        if self.dim % self.n_heads:
            raise ValueError(f"LlamaConfig.dim ({self.dim}) must be divisible by n_heads ({self.n_heads})")
        if self.head_dim % 2:
            raise ValueError(f"rotary embeddings need an even head dimension; dim/n_heads = {self.head_dim}")
        if not self.norm_eps > 0:
            raise ValueError(f"LlamaConfig.norm_eps must be positive, got {self.norm_eps!r}")
        if not self.rope_theta > 0:
            raise ValueError(f"LlamaConfig.rope_theta must be positive, got {self.rope_theta!r}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


CONFIGS: dict[str, LlamaConfig] = {
    "llama_tiny": LlamaConfig(dim=128, hidden_dim=352, n_heads=4, n_layers=4, vocab_size=320),
    "llama_60m": LlamaConfig(dim=512, hidden_dim=1376, n_heads=8, n_layers=8, vocab_size=32000),
    "llama_130m": LlamaConfig(dim=768, hidden_dim=2048, n_heads=12, n_layers=12, vocab_size=32000),
    "llama_350m": LlamaConfig(dim=1024, hidden_dim=2736, n_heads=16, n_layers=24, vocab_size=32000),
    "llama_1b": LlamaConfig(dim=2048, hidden_dim=5461, n_heads=32, n_layers=24, vocab_size=32000),
    "llama_7b": LlamaConfig(dim=4096, hidden_dim=11008, n_heads=32, n_layers=32, vocab_size=32000),
}


def get_config(name: str, **overrides) -> LlamaConfig:
    """The named config with ``overrides`` applied (e.g. ``vocab_size=50304``, ``max_seq_len=256``).

    Raises ``ValueError`` for an unknown name (listing the known ones) and ``TypeError`` for an
    override that is not a :class:`LlamaConfig` field (naming it).
    """
    if name not in CONFIGS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(CONFIGS)}")
    fields = {f.name for f in dataclasses.fields(LlamaConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise TypeError(f"unknown model override(s) {', '.join(map(repr, unknown))} for {name!r}; "
                        f"LlamaConfig fields: {', '.join(sorted(fields))}")
    return dataclasses.replace(CONFIGS[name], **overrides)


def num_parameters_formula(cfg: LlamaConfig) -> int:
    """Exact parameter count of :class:`~optimlib.models.llama.Llama` for ``cfg``.

    ``2*V*d`` (untied embedding and LM head) + per layer ``4*d*d`` (q, k, v, o projections)
    + ``3*d*h`` (SwiGLU gate, up, down) + ``2*d`` (two RMSNorm gains), + ``d`` (final norm).
    """
    d, h, v, n_layers = cfg.dim, cfg.hidden_dim, cfg.vocab_size, cfg.n_layers
    return 2 * v * d + n_layers * (4 * d * d + 3 * d * h + 2 * d) + d
