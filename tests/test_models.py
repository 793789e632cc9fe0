"""The LLaMA model and its named configs: sizes, structure, causality, init, FLOPs."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from optimlib.models import CONFIGS, Llama, LlamaConfig, RMSNorm, build_model, get_config, num_parameters_formula

# (dim, hidden_dim, n_heads, n_layers, vocab_size) of the GaLore paper's LLaMA models, and their
# exact parameter counts (embedding and untied LM head included).
PAPER = {
    "llama_60m": ((512, 1376, 8, 8, 32000), 58_073_600),
    "llama_130m": ((768, 2048, 12, 12, 32000), 134_105_856),
    "llama_350m": ((1024, 2736, 16, 24, 32000), 367_969_280),
    "llama_1b": ((2048, 5461, 32, 24, 32000), 1_339_082_752),
    "llama_7b": ((4096, 11008, 32, 32, 32000), 6_738_415_616),
}


def shape_of(cfg: LlamaConfig) -> tuple:
    return cfg.dim, cfg.hidden_dim, cfg.n_heads, cfg.n_layers, cfg.vocab_size


@pytest.fixture(scope="module")
def tiny() -> Llama:
    torch.manual_seed(0)
    return build_model("llama_tiny").eval()


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_sizes(name):
    shape, count = PAPER[name]
    assert shape_of(CONFIGS[name]) == shape
    assert num_parameters_formula(CONFIGS[name]) == count


def test_tiny_config_holds_byte_vocabulary():
    cfg = CONFIGS["llama_tiny"]
    assert shape_of(cfg) == (128, 352, 4, 4, 320)
    assert cfg.vocab_size >= 257


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_parameter_count_matches_formula(name):
    model = build_model(name, device="meta")
    assert all(p.is_meta for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == num_parameters_formula(model.config)


def test_formula_counts_the_built_model(tiny):
    assert sum(p.numel() for p in tiny.parameters()) == num_parameters_formula(tiny.config) == 885_888


def test_module_names(tiny):
    linears = {name for name, m in tiny.named_modules() if isinstance(m, nn.Linear)}
    expected = {f"layers.{i}.{kind}" for i in range(4) for kind in
                ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    assert linears == expected | {"lm_head"}
    assert all(m.bias is None for name, m in tiny.named_modules() if isinstance(m, nn.Linear))
    assert isinstance(tiny.embed, nn.Embedding) and isinstance(tiny.norm, RMSNorm)
    assert isinstance(tiny.layers, nn.ModuleList) and len(tiny.layers) == 4
    targeted = [n for n in linears if re.search(r"(^|\.)(attn|mlp)\.", n)]
    assert len(targeted) == 28 and "lm_head" not in targeted
    assert tiny.lm_head.weight.data_ptr() != tiny.embed.weight.data_ptr()


def test_forward_shape(tiny):
    idx = torch.randint(0, 320, (3, 17))
    logits = tiny(idx)
    assert logits.shape == (3, 17, 320) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all()


def test_causality(tiny):
    idx = torch.randint(0, 320, (2, 24))
    changed = idx.clone()
    changed[:, 15] = (changed[:, 15] + 1) % 320
    with torch.no_grad():
        a, b = tiny(idx), tiny(changed)
    torch.testing.assert_close(a[:, :15], b[:, :15], rtol=0, atol=1e-6)
    assert not torch.allclose(a[:, 15:], b[:, 15:])


def test_rotary_cache_grows_past_max_seq_len():
    torch.manual_seed(0)
    model = build_model("llama_tiny", max_seq_len=8).eval()
    idx = torch.randint(0, 320, (1, 20))
    with torch.no_grad():
        long, short = model(idx), model(idx[:, :8])
    torch.testing.assert_close(long[:, :8], short, rtol=1e-5, atol=1e-5)


def test_positions_matter(tiny):
    """Rotary embeddings make the model order-aware: the same token at two positions differs."""
    idx = torch.full((1, 6), 7)
    with torch.no_grad():
        logits = tiny(idx)
    assert not torch.allclose(logits[0, 1], logits[0, 5])


def test_init_is_seeded_and_device_independent():
    torch.manual_seed(123)
    a = build_model("llama_tiny")
    torch.manual_seed(123)
    with torch.device("meta"):
        b = build_model("llama_tiny")
    b.to_empty(device="cpu")
    b.init_weights()
    torch.manual_seed(124)
    c = build_model("llama_tiny")
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), name
        if name.endswith("norm.weight"):
            assert torch.equal(pa, torch.ones_like(pa))
        else:
            assert not torch.equal(pa, pc), name
            assert abs(pa.std().item() - 0.02) < 0.003, name


def test_backward_reaches_every_parameter():
    torch.manual_seed(0)
    model = build_model("llama_tiny", n_layers=2)
    idx = torch.randint(0, 320, (2, 9))
    loss = nn.functional.cross_entropy(model(idx[:, :-1]).flatten(0, 1), idx[:, 1:].flatten())
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert 5.0 < loss.item() < 6.5  # ~ln(320) at init


def test_bf16_autocast_forward(tiny):
    idx = torch.randint(0, 320, (2, 8))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = tiny(idx)
    assert logits.dtype == torch.bfloat16
    with torch.no_grad():
        torch.testing.assert_close(logits.float(), tiny(idx), rtol=0.05, atol=0.05)


def test_rmsnorm_computes_in_fp32():
    norm = RMSNorm(16, eps=1e-6)
    x = torch.randn(4, 16) * 100
    y = norm(x)
    torch.testing.assert_close(y, x / x.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt())
    yb = norm(x.bfloat16())
    assert yb.dtype == torch.bfloat16
    torch.testing.assert_close(yb.float(), y, rtol=1e-2, atol=1e-2)


def test_overrides_and_errors():
    assert get_config("llama_tiny", vocab_size=512).vocab_size == 512
    assert build_model("llama_tiny", n_layers=1, device="meta").config.n_layers == 1
    with pytest.raises(ValueError, match="llama_60m"):
        build_model("llama_9b")
    with pytest.raises(TypeError, match="n_head_kv"):
        build_model("llama_tiny", n_head_kv=2)
    with pytest.raises(ValueError, match="divisible"):
        get_config("llama_tiny", n_heads=3)
    with pytest.raises(ValueError, match="vocab_size"):
        get_config("llama_tiny", vocab_size=0)
    with pytest.raises(ValueError, match="shape"):
        build_model("llama_tiny", n_layers=1)(torch.zeros(5, dtype=torch.long))


def test_num_flops_per_token():
    model = build_model("llama_60m", device="meta")
    d, layers, vocab = 512, 8, 32000
    non_embedding = 58_073_600 - vocab * d
    assert model.num_flops_per_token(256) == 6 * non_embedding + 12 * layers * d * 256
    assert model.num_flops_per_token(512) - model.num_flops_per_token(256) == 12 * layers * d * 256
