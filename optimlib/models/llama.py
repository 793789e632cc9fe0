"""A LLaMA-style decoder, shaped like the model the GaLore experiments pretrain.

Pre-norm blocks (RMSNorm → attention with rotary position embeddings → residual, RMSNorm →
SwiGLU MLP → residual), no biases, an untied LM head. Module names are part of the API: the
optimizer factory selects the projected/factorized matrices by the ``attn.`` and ``mlp.``
prefixes, FSDP2 shards each entry of ``layers``, and checkpoints are keyed by these names::

    embed                                  nn.Embedding(vocab, dim)
    layers.{i}.attn_norm                   RMSNorm(dim)
    layers.{i}.attn.{q,k,v,o}_proj         nn.Linear(dim, dim, bias=False)
    layers.{i}.mlp_norm                    RMSNorm(dim)
    layers.{i}.mlp.{gate,up}_proj          nn.Linear(dim, hidden, bias=False)
    layers.{i}.mlp.down_proj               nn.Linear(hidden, dim, bias=False)
    norm                                   RMSNorm(dim)
    lm_head                                nn.Linear(dim, vocab, bias=False)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from optimlib.models.configs import LlamaConfig, get_config, num_parameters_formula

INIT_STD = 0.02
"""Standard deviation of the normal init of every linear and embedding weight (HF LLaMA's
``initializer_range``, which GaLore's pretraining code uses)."""


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned gain, computed in fp32 whatever the input dtype.

    Written out rather than ``nn.RMSNorm`` so that the reduction precision does not depend on
    the autocast dtype or the PyTorch version; the output has the input's dtype.
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def rotary_tables(seq_len: int, head_dim: int, theta: float, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 ``cos`` and ``sin`` of shape ``(seq_len, head_dim)`` for rotary embeddings.

    Frequencies ``theta ** (-2i / head_dim)``, laid out in two halves (the "rotate half"
    convention of Hugging Face's LLaMA rather than interleaved pairs).
    """
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` of shape ``(B, T, H, head_dim)`` by position; computed in fp32, returned in x's dtype."""
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    cos, sin = cos[:, None, :], sin[:, None, :]
    return (xf * cos + rotated * sin).to(x.dtype)


class Attention(nn.Module):
    """Multi-head causal self-attention with rotary embeddings on queries and keys."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.head_dim = cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.k_proj = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.v_proj = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.o_proj = nn.Linear(cfg.dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        # The heads this rank computes: all of them, or its share under tensor parallelism.
        shape = (b, t, -1, self.head_dim)
        q = apply_rotary(self.q_proj(x).view(shape), cos, sin)
        k = apply_rotary(self.k_proj(x).view(shape), cos, sin)
        v = self.v_proj(x).view(shape)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    """SwiGLU feed-forward: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.down_proj = nn.Linear(cfg.hidden_dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """One pre-norm transformer layer: the unit that FSDP2 shards and activation checkpointing wraps."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.mlp(self.mlp_norm(x))


class Llama(nn.Module):
    """LLaMA-style decoder: ``forward(idx: LongTensor (B, T)) -> logits (B, T, vocab)``.

    ``device`` defaults to the current default device (so ``with torch.device("meta"):``
    works). The modules are created on the meta device, materialised on ``device`` and then
    filled by :meth:`init_weights`, so no memory or time is spent on PyTorch's default inits
    and a meta-device model costs nothing (count its parameters, or ``to_empty`` it later and
    call :meth:`init_weights`).
    """

    def __init__(self, config: LlamaConfig, device: torch.device | str | None = None):
        super().__init__()
        self.config = config
        device = torch.device(device) if device is not None else torch.get_default_device()
        with torch.device("meta"):
            self.embed = nn.Embedding(config.vocab_size, config.dim)
            self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layers))
            self.norm = RMSNorm(config.dim, config.norm_eps)
            self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False)
        self._rope: tuple[torch.Tensor, torch.Tensor] | None = None
        if device.type != "meta":
            self.to_empty(device=device)
            self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Normal(0, 0.02) for every linear and embedding weight, ones for the norm gains.

        Values are drawn on the CPU from PyTorch's default generator, in module order, and
        copied to wherever the parameters live: the same ``torch.manual_seed`` gives the same
        model on CPU, CUDA or any other device (at the cost of generating on the CPU). Call it
        before the model is sharded.
        """
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                values = torch.empty(module.weight.shape, dtype=torch.float32, device="cpu").normal_(0.0, INIT_STD)
                module.weight.copy_(values)
            elif isinstance(module, RMSNorm):
                module.weight.fill_(1.0)

    def _rotary(self, seq_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The cached rotary tables for the first ``seq_len`` positions, (re)built on first use,
        on a device change, or when a sequence is longer than the cache (kept out of the state
        dict and the buffers so that sharding, dtype casts and checkpoints never touch them)."""
        if self._rope is None or self._rope[0].device != device or self._rope[0].size(0) < seq_len:
            length = max(seq_len, self.config.max_seq_len)
            self._rope = rotary_tables(length, self.config.head_dim, self.config.rope_theta, device)
        cos, sin = self._rope
        return cos[:seq_len], sin[:seq_len]

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        if idx.dim() != 2:
            raise ValueError(f"Llama expects token ids of shape (batch, seq_len), got {tuple(idx.shape)}")
        cos, sin = self._rotary(idx.size(1), idx.device)
        x = self.embed(idx)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.lm_head(self.norm(x))

    def num_flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token (forward + backward) at context length ``seq_len``, for MFU.

        ``6 * N + 12 * L * d * T`` (the PaLM/Chinchilla convention): 6 FLOPs per weight per
        token (2 forward, 4 backward) over the ``N`` parameters that take part in a matmul, i.e.
        all but the token embedding (a lookup; the LM head counts), plus attention's score and
        weighted-sum matmuls, ``2 * 2 * T * d`` per layer forward, times 3 for the backward.
        Causal masking is not discounted. Computed from the config, so it is the same for a
        sharded or reparameterized model.
        """
        cfg = self.config
        n_matmul = num_parameters_formula(cfg) - cfg.vocab_size * cfg.dim
        return 6 * n_matmul + 12 * cfg.n_layers * cfg.dim * seq_len


def build_model(name: str, device: torch.device | str | None = None, **overrides) -> Llama:
    """The named model (see :data:`~optimlib.models.configs.CONFIGS`) with config ``overrides``.

    ``build_model("llama_7b", device="meta")`` builds the structure without allocating memory.
    """
    return Llama(get_config(name, **overrides), device=device)
