"""Corpora, the byte tokenizer, packing and world-size-independent batching."""

from __future__ import annotations

import json
import sys
import types

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from optimlib.data import (ByteTokenizer, DataConfig, DataError, PackedBlocks, eval_blocks, global_batch_indices,
                           load_corpus, rank_indices)

EOS = ByteTokenizer.eos_id
tok = ByteTokenizer()


def documents(stream: np.ndarray) -> list[str]:
    """The documents of a byte-token stream (each one is followed by EOS)."""
    stream = np.asarray(stream)
    assert len(stream) == 0 or stream[-1] == EOS
    ends = np.flatnonzero(stream == EOS)
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [tok.decode(stream[s:e]) for s, e in zip(starts, ends)]


# ---------------------------------------------------------------------------------- tokenizer
@settings(max_examples=50, deadline=None)
@given(st.text())
def test_byte_tokenizer_round_trip(text):
    ids = tok.encode(text)
    assert ids.dtype == np.uint16 and len(ids) == len(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert tok.decode(list(ids) + [EOS]) == text


def test_byte_tokenizer_edges():
    assert (tok.vocab_size, tok.eos_id) == (257, 256)
    assert tok.decode(torch.tensor([104, 105, 256, 33])) == "hi!"
    assert tok.decode([0xFF]) == "\ufffd"
    with pytest.raises(ValueError, match="257"):
        tok.decode([257])


# ---------------------------------------------------------------------------------- stdlib corpus
@pytest.fixture(scope="module")
def stdlib_corpus():
    return load_corpus(DataConfig())


def test_stdlib_corpus_default(stdlib_corpus):
    c = stdlib_corpus
    assert c.vocab_size == 257 and "standard library" in c.description
    assert c.train.ndim == c.eval.ndim == 1
    assert len(c.train) > 100_000 and len(c.eval) > 1_000
    assert int(c.train.max()) <= EOS and int(c.eval.max()) <= EOS
    train_docs, eval_docs = documents(c.train), documents(c.eval)
    assert len(train_docs) > 10 and len(eval_docs) >= 1
    assert not set(train_docs) & set(eval_docs)
    assert sum(len(d.encode()) for d in train_docs + eval_docs) <= DataConfig().max_bytes
    assert "def " in train_docs[0]


def test_stdlib_corpus_is_deterministic(stdlib_corpus):
    again = load_corpus(DataConfig())
    assert np.array_equal(again.train, stdlib_corpus.train) and np.array_equal(again.eval, stdlib_corpus.eval)
    assert again.description == stdlib_corpus.description


def test_stdlib_cap_keeps_the_split(stdlib_corpus):
    small = load_corpus(DataConfig(max_bytes=300_000))
    total = len(small.train) + len(small.eval) - len(documents(small.train)) - len(documents(small.eval))
    assert total == 300_000
    # which side a file lands on depends on its name only: the capped corpus's documents keep theirs
    assert set(documents(small.train)[:-1]) <= set(documents(stdlib_corpus.train))
    assert len(small.eval) > 0


# ---------------------------------------------------------------------------------- file sources
def test_folder_source_split_by_file_name(tmp_path):
    texts = {f"{'sub/' if i < 10 else ''}doc{i:02d}.txt": f"document number {i}\n" * (i + 1) for i in range(30)}
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    for name, text in texts.items():
        (root / name).write_text(text)
    (root / ".hidden.txt").write_text("hidden")
    (root / "blob.dat").write_bytes(b"\x00\x01\x02binary")
    c = load_corpus(DataConfig(source=str(root), eval_fraction=0.2))
    train, held = documents(c.train), documents(c.eval)
    assert sorted(train + held) == sorted(texts.values())
    assert 0 < len(held) < 30
    assert not set(train) & set(held)

    # the same files (same relative paths), written in another order, among others: each keeps its side
    more = tmp_path / "more"
    (more / "sub").mkdir(parents=True)
    for name, text in reversed(list(texts.items()) + [(f"x{j}.txt", f"extra {j}") for j in range(9)]):
        (more / name).write_text(text)
    c2 = load_corpus(DataConfig(source=str(more), eval_fraction=0.2))
    assert set(held) <= set(documents(c2.eval)) and set(train) <= set(documents(c2.train))


def test_text_file_split_at_blank_lines(tmp_path):
    paragraphs = [f"paragraph {i}\nline two of {i}" for i in range(40)]
    path = tmp_path / "book.txt"
    path.write_text("\n\n".join(paragraphs) + "\n \n\n")
    c = load_corpus(DataConfig(source=str(path), eval_fraction=0.25))
    train, held = documents(c.train), documents(c.eval)
    assert sorted(train + held) == sorted(paragraphs)
    assert held and not set(train) & set(held)
    assert "blank lines" in c.description


def test_single_document_splits_by_position(tmp_path):
    path = tmp_path / "one.txt"
    path.write_text("abcdefghij" * 100)
    c = load_corpus(DataConfig(source=str(path), eval_fraction=0.1))
    stream = np.concatenate([c.train, c.eval])
    assert tok.decode(stream) == "abcdefghij" * 100 and stream[-1] == EOS
    assert len(c.eval) == round(1001 * 0.1)


def test_max_bytes_caps_text(tmp_path):
    path = tmp_path / "big.txt"
    path.write_text("x" * 10_000)
    c = load_corpus(DataConfig(source=str(path), max_bytes=1_000, eval_fraction=0.0))
    assert len(c.train) == 1_001 and len(c.eval) == 0


def test_jsonl_source(tmp_path):
    records = [{"text": f"record {i} " * 5, "id": i} for i in range(50)]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    c = load_corpus(DataConfig(source=str(path), eval_fraction=0.2))
    train, held = documents(c.train), documents(c.eval)
    assert sorted(train + held) == sorted(r["text"] for r in records)
    assert held and train

    other = tmp_path / "other.jsonl"
    other.write_text("\n".join(json.dumps({"body": r["text"]}) for r in records))
    assert len(load_corpus(DataConfig(source=str(other), text_field="body")).train) > 0


def test_jsonl_errors_name_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n\n{"content": "no text field"}\n')
    with pytest.raises(DataError, match=r"line 3 .*'text'.*data\.text_field"):
        load_corpus(DataConfig(source=str(path)))
    path.write_text('{"text": "fine"}\n{"text": \n')
    with pytest.raises(DataError, match="line 2 is not valid JSON"):
        load_corpus(DataConfig(source=str(path)))
    path.write_text('{"text": 5}\n')
    with pytest.raises(DataError, match="line 1"):
        load_corpus(DataConfig(source=str(path)))


@pytest.mark.parametrize("dtype", ["uint16", "uint32"])
def test_token_file(tmp_path, dtype):
    tokens = (np.arange(10_000) * 7919 % 50_000).astype(dtype)
    path = tmp_path / "tokens.bin"
    tokens.tofile(path)
    c = load_corpus(DataConfig(source=str(path), token_dtype=dtype, vocab_size=50_000, eval_fraction=0.1))
    assert c.vocab_size == 50_000 and isinstance(c.train, np.memmap)
    assert np.array_equal(c.train, tokens[:9_000]) and np.array_equal(c.eval, tokens[9_000:])
    blocks = PackedBlocks(c.train, 99)
    assert torch.equal(blocks.get([1])[0], torch.from_numpy(tokens[100:200].astype(np.int64)))


def test_token_file_errors(tmp_path):
    path = tmp_path / "tokens.bin"
    np.arange(1000, dtype=np.uint16).tofile(path)
    with pytest.raises(DataError, match=r"data\.vocab_size"):
        load_corpus(DataConfig(source=str(path)))
    with pytest.raises(DataError, match=r"token id 999.*data\.vocab_size = 500"):
        load_corpus(DataConfig(source=str(path), vocab_size=500))
    with pytest.raises(DataError, match=r"data\.token_dtype"):
        load_corpus(DataConfig(source=str(path), vocab_size=5000, token_dtype="float32"))
    odd = tmp_path / "odd.bin"
    odd.write_bytes(b"\x01\x02\x03")
    with pytest.raises(DataError, match="multiple of 2"):
        load_corpus(DataConfig(source=str(odd), vocab_size=5000))


def test_clear_errors(tmp_path):
    missing = tmp_path / "nowhere.txt"
    with pytest.raises(FileNotFoundError, match=r"data\.source.*nowhere\.txt"):
        load_corpus(DataConfig(source=str(missing)))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n  \n")
    with pytest.raises(ValueError, match="no text"):
        load_corpus(DataConfig(source=str(empty)))
    (tmp_path / "void").mkdir()
    with pytest.raises(ValueError, match="no text"):
        load_corpus(DataConfig(source=str(tmp_path / "void")))
    with pytest.raises(ValueError, match=r"data\.eval_fraction"):
        load_corpus(DataConfig(eval_fraction=1.0))
    with pytest.raises(ValueError, match=r"data\.vocab_size"):
        load_corpus(DataConfig(vocab_size=32000, max_bytes=1000))


def test_hf_source_without_datasets(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(RuntimeError, match=r"data\.source 'hf:c4'.*datasets"):
        load_corpus(DataConfig(source="hf:c4"))


def test_hf_source_unreachable_and_working(monkeypatch):
    calls = []

    def load_dataset(name, config, split, streaming):
        calls.append((name, config, split, streaming))
        if name == "nobody/nothing":
            raise ConnectionError("offline")
        return iter([{"text": f"hf document {i}"} for i in range(20)] + [{"other": 1}])

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    with pytest.raises(RuntimeError, match=r"data\.source 'hf:nobody/nothing'.*offline"):
        load_corpus(DataConfig(source="hf:nobody/nothing"))
    c = load_corpus(DataConfig(source="hf:fake:cfg", hf_split="validation", max_bytes=100, eval_fraction=0.3))
    assert calls[-1] == ("fake", "cfg", "validation", True)
    assert len(c.train) + len(c.eval) == 100 + len(documents(c.train)) + len(documents(c.eval))
    with pytest.raises(DataError, match=r"record 20 .*data\.text_field"):
        load_corpus(DataConfig(source="hf:fake"))


# ---------------------------------------------------------------------------------- packing
def test_packed_blocks_shapes_and_shift():
    stream = np.arange(1000, dtype=np.uint16)
    blocks = PackedBlocks(stream, seq_len=32)
    assert len(blocks) == 1000 // 33
    batch = blocks.get(np.array([0, 5, 2]))
    assert batch.shape == (3, 33) and batch.dtype == torch.int64
    assert torch.equal(batch[1], torch.arange(5 * 33, 6 * 33))
    inputs, targets = batch[:, :-1], batch[:, 1:]
    assert torch.equal(inputs[:, 1:], targets[:, :-1])
    assert blocks.get([]).shape == (0, 33)
    with pytest.raises(IndexError):
        blocks.get([len(blocks)])
    with pytest.raises(ValueError, match=r"data\.seq_len"):
        PackedBlocks(np.arange(32), seq_len=32)


def test_eval_blocks_are_the_first_blocks():
    stream = np.arange(500)
    fixed = eval_blocks(stream, seq_len=9, max_blocks=7)
    assert torch.equal(fixed, PackedBlocks(stream, 9).get(range(7)))
    assert eval_blocks(stream, seq_len=9, max_blocks=1000).shape == (50, 10)


# ---------------------------------------------------------------------------------- batching
@settings(max_examples=60, deadline=None)
@given(step=st.integers(0, 10_000), per_rank=st.integers(1, 8), world=st.sampled_from([1, 2, 3, 4, 8]),
       num_blocks=st.integers(1, 200), seed=st.integers(0, 2 ** 32))
def test_global_batch_is_split_over_ranks(step, per_rank, world, num_blocks, seed):
    batch_size = per_rank * world
    batch = global_batch_indices(step, batch_size, num_blocks, seed)
    assert batch.shape == (batch_size,) and batch.dtype == np.int64
    assert batch.min() >= 0 and batch.max() < num_blocks
    parts = [rank_indices(batch, r, world) for r in range(world)]
    assert np.array_equal(np.concatenate(parts), batch)
    # a rank's part does not depend on the world size that took the others
    for w in (1, world):
        assert np.array_equal(np.concatenate([rank_indices(batch, r, w) for r in range(w)]), batch)
    # pure function of its arguments (resume): recomputing after other calls gives the same batch
    global_batch_indices(step + 1, batch_size, num_blocks, seed + 1)
    assert np.array_equal(global_batch_indices(step, batch_size, num_blocks, seed), batch)


@settings(max_examples=30, deadline=None)
@given(batch_size=st.integers(1, 16), num_blocks=st.integers(1, 64), seed=st.integers(0, 1000))
def test_every_block_once_per_epoch(batch_size, num_blocks, seed):
    """Concatenated batches are the epochs' permutations one after another."""
    n_steps = -(-3 * num_blocks // batch_size)
    stream = np.concatenate([global_batch_indices(s, batch_size, num_blocks, seed) for s in range(n_steps)])
    for epoch in range(3):
        seen = stream[epoch * num_blocks:(epoch + 1) * num_blocks]
        assert np.array_equal(np.sort(seen), np.arange(num_blocks))
        assert np.array_equal(seen, np.random.default_rng((seed, epoch)).permutation(num_blocks))


def test_batches_are_disjoint_across_ranks_within_an_epoch():
    batch = global_batch_indices(3, 64, 1000, seed=7)
    parts = [set(rank_indices(batch, r, 4)) for r in range(4)]
    assert sum(len(p) for p in parts) == 64 and len(set().union(*parts)) == 64
    assert not np.array_equal(batch, global_batch_indices(3, 64, 1000, seed=8))


def test_batching_errors():
    with pytest.raises(ValueError, match="evenly"):
        rank_indices(np.arange(10), 0, 4)
    with pytest.raises(ValueError, match="rank"):
        rank_indices(np.arange(8), 4, 4)
    with pytest.raises(ValueError, match="num_blocks"):
        global_batch_indices(0, 4, 0, 0)
    with pytest.raises(TypeError):
        global_batch_indices(0.5, 4, 10, 0)
