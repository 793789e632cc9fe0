"""Corpora: where the training text comes from, tokenized into a train and a held-out stream.

``load_corpus(DataConfig(...))`` returns a :class:`Corpus`: two 1-D arrays of token ids and
the vocabulary size they need. Sources (``data.source``):

``stdlib`` (the default, no download)
    The Python standard library's own top-level ``*.py`` files, sorted by name: real text that
    every Python install has. The corpus depends on the Python version (the description says
    which); on one version it is the same on every machine.
a text file
    Split into documents at blank lines. The file is read up to ``data.max_bytes``.
a folder
    Every regular file under it (recursively, sorted by relative path; hidden files and
    folders and files with a NUL byte in what is read are skipped) is one document.
a ``.jsonl`` file
    One JSON object per line; its ``data.text_field`` is the document.
``hf:<name>`` or ``hf:<name>:<config>``
    A Hugging Face dataset (split ``data.hf_split``), streamed with the optional ``datasets``
    package so that only ``data.max_bytes`` of text is downloaded.
a ``.bin`` token file
    Already tokenized ids, a raw array of ``data.token_dtype`` (what ``ndarray.tofile``
    writes), memory-mapped. ``data.vocab_size`` must be given.

Text sources are tokenized by :class:`~optimlib.data.tokenizer.ByteTokenizer`; every
document is followed by its EOS id. Text sources are capped at ``data.max_bytes`` of UTF-8
text in total (the document that crosses the cap is cut), read as UTF-8 with invalid bytes
replaced.

Held-out split. Text sources are split by document, so train and eval never share one: a
document goes to eval when ``zlib.crc32(key) / 2**32 < data.eval_fraction``, where the key is
the file's relative path for files (stable across Python versions and edits) and the text
itself for paragraphs, JSON lines and dataset records (duplicates land on the same side).
The split thus depends neither on the order of the documents nor on which other documents
exist. With ``eval_fraction > 0`` and at least two documents, both sides are kept non-empty:
if no document hashed into eval, the one with the smallest hash goes there (and if all did,
the one with the largest hash stays in train). A source that has a single document, and a
token file, is split by position instead: the last ``eval_fraction`` of its tokens is eval.
"""

from __future__ import annotations

import json
import re
import sys
import sysconfig
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional

import numpy as np

from optimlib.data.tokenizer import ByteTokenizer

TOKEN_DTYPES = ("uint8", "uint16", "uint32", "int32", "int64")
"""The ``data.token_dtype`` values a ``.bin`` token file may use."""

_TOKENIZER = ByteTokenizer()


class DataError(ValueError):
    """The data configuration or a data source is invalid (the message names the key or the line)."""


@dataclass
class DataConfig:
    """The ``data`` section of a run config."""

    source: str = "stdlib"
    """``stdlib``, a text/``.jsonl``/``.bin`` file, a folder, or ``hf:<name>[:<config>]``."""
    seq_len: int = 128
    """Tokens per training sequence (blocks are ``seq_len + 1`` tokens: inputs and shifted targets)."""
    eval_fraction: float = 0.05
    """Share of the documents (of the tokens, for a token file) held out for evaluation."""
    text_field: str = "text"
    """The key of the document text in ``.jsonl`` lines and Hugging Face records."""
    token_dtype: str = "uint16"
    """The element type of a ``.bin`` token file."""
    vocab_size: Optional[int] = None
    """Vocabulary of a ``.bin`` token file (required there; text sources use the byte tokenizer's 257)."""
    max_bytes: int = 4_000_000
    """Cap on the UTF-8 text read from a text source."""
    hf_split: str = "train"
    """The split of a Hugging Face dataset."""

    def validate(self) -> None:
        """Raise :class:`DataError` naming the first ``data.<key>`` whose value is out of range."""
        if not isinstance(self.source, str) or not self.source:
            raise DataError(f"data.source must be a non-empty string, got {self.source!r}")
        if self.seq_len < 1:
            raise DataError(f"data.seq_len must be >= 1, got {self.seq_len}")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise DataError(f"data.eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if not self.text_field:
            raise DataError("data.text_field must be a non-empty string")
        if self.token_dtype not in TOKEN_DTYPES:
            raise DataError(f"data.token_dtype must be one of {', '.join(TOKEN_DTYPES)}, got {self.token_dtype!r}")
        if self.vocab_size is not None and self.vocab_size < 1:
            raise DataError(f"data.vocab_size must be >= 1, got {self.vocab_size}")
        if self.max_bytes < 1:
            raise DataError(f"data.max_bytes must be >= 1, got {self.max_bytes}")


@dataclass
class Corpus:
    """A tokenized corpus: ``train`` and ``eval`` are 1-D arrays of ids below ``vocab_size``.

    For a token file the arrays are read-only memory maps; otherwise ``uint16`` arrays.
    """

    train: np.ndarray
    eval: np.ndarray
    vocab_size: int
    description: str


def load_corpus(cfg: DataConfig) -> Corpus:
    """Load and tokenize ``cfg.source`` and split off the held-out part (see the module doc).

    Raises ``FileNotFoundError`` for a missing path, :class:`DataError` (a ``ValueError``) for
    an invalid config, a malformed source or an empty corpus, and ``RuntimeError`` when a
    Hugging Face dataset cannot be loaded; every message names the ``data.`` key at fault.
    """
    cfg.validate()
    source = cfg.source
    if source.startswith("hf:"):
        return _from_documents(cfg, *_hf_documents(cfg))
    if source == "stdlib":
        root = Path(sysconfig.get_paths()["stdlib"])
        files = sorted(p for p in root.glob("*.py") if p.is_file())
        docs = ((p.name.encode(), text) for p, text in _read_files(files, cfg.max_bytes, skip_unreadable=True))
        keys, texts = _take(docs, cfg.max_bytes)
        described = (f"Python {sys.version.split()[0]} standard library source ({root}, "
                     f"{len(keys)} of {len(files)} files)")
        return _from_documents(cfg, keys, texts, described)
    path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"data.source: no such file or folder: {str(path)!r}")
    if path.is_dir():
        files = sorted((p for p in path.rglob("*") if p.is_file()
                        and not any(part.startswith(".") for part in p.relative_to(path).parts)),
                       key=lambda p: p.relative_to(path).as_posix())
        docs = ((p.relative_to(path).as_posix().encode(), text)
                for p, text in _read_files(files, cfg.max_bytes, skip_unreadable=False) if "\0" not in text)
        keys, texts = _take(docs, cfg.max_bytes)
        return _from_documents(cfg, keys, texts, f"text files under {path} ({len(keys)} of {len(files)} files)")
    if path.suffix == ".bin":
        return _token_file(cfg, path)
    if path.suffix == ".jsonl":
        keys, texts = _take(((t.encode(), t) for t in _jsonl_texts(path, cfg.text_field)), cfg.max_bytes)
        return _from_documents(cfg, keys, texts, f"JSON lines {path} (field {cfg.text_field!r})")
    _, text = next(_read_files([path], cfg.max_bytes, skip_unreadable=False))
    paragraphs = [p for p in re.split(r"\n\s*\n", text) if p.strip()]
    keys, texts = _take(((p.encode(), p) for p in paragraphs), cfg.max_bytes)
    return _from_documents(cfg, keys, texts, f"text file {path} (documents split at blank lines)")


def _read_files(paths: Iterable[Path], limit: int, *, skip_unreadable: bool) -> Iterator[tuple[Path, str]]:
    """``(path, text)`` of each file: at most ``limit`` bytes of it, decoded with invalid UTF-8 replaced."""
    for path in paths:
        try:
            with open(path, "rb") as f:
                raw = f.read(limit)
        except OSError as exc:
            if skip_unreadable:
                continue
            raise DataError(f"data.source file {str(path)!r} cannot be read: {exc.strerror or exc}") from None
        yield path, raw.decode("utf-8", errors="replace")


def _jsonl_texts(path: Path, field: str) -> Iterator[str]:
    """The ``field`` of each non-blank line of a JSON-lines file."""
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"data.source {str(path)!r}: line {lineno} is not valid JSON ({exc.msg})") from None
            if not isinstance(record, dict) or field not in record:
                raise DataError(f"data.source {str(path)!r}: line {lineno} has no field {field!r} "
                                f"(data.text_field)")
            if not isinstance(record[field], str):
                raise DataError(f"data.source {str(path)!r}: line {lineno}: field {field!r} is a "
                                f"{type(record[field]).__name__}, not a string")
            yield record[field]


def _hf_documents(cfg: DataConfig) -> tuple[list[bytes], list[bytes], str]:
    """Stream up to ``max_bytes`` of text from a Hugging Face dataset (``datasets`` imported only here)."""
    name, _, config = cfg.source[len("hf:"):].partition(":")
    if not name:
        raise DataError(f"data.source {cfg.source!r}: expected 'hf:<name>' or 'hf:<name>:<config>'")
    try:
        import datasets
    except ImportError as exc:
        raise RuntimeError(f"data.source {cfg.source!r} needs the Hugging Face 'datasets' package, which is "
                           f"not installed (pip install datasets)") from exc

    def texts() -> Iterator[tuple[bytes, str]]:
        stream = datasets.load_dataset(name, config or None, split=cfg.hf_split, streaming=True)
        for i, record in enumerate(stream):
            if cfg.text_field not in record or not isinstance(record[cfg.text_field], str):
                raise DataError(f"data.source {cfg.source!r}: record {i} has no string field "
                                f"{cfg.text_field!r} (data.text_field); fields: {', '.join(record)}")
            text = record[cfg.text_field]
            yield text.encode(), text

    try:
        keys, docs = _take(texts(), cfg.max_bytes)
    except DataError:
        raise
    except Exception as exc:
        raise RuntimeError(f"data.source {cfg.source!r}: could not load Hugging Face dataset {name!r}"
                           f"{f' config {config!r}' if config else ''} split {cfg.hf_split!r} "
                           f"({type(exc).__name__}: {exc})") from exc
    return keys, docs, f"Hugging Face dataset {name}{f':{config}' if config else ''} [{cfg.hf_split}]"


def _take(docs: Iterable[tuple[bytes, str]], max_bytes: int) -> tuple[list[bytes], list[bytes]]:
    """Keys and UTF-8 bytes of the documents, in order, until ``max_bytes`` of text (empty ones skipped).

    Stops consuming ``docs`` once the cap is reached, so nothing past it is read.
    """
    keys, texts, used = [], [], 0
    for key, text in docs:
        data = text.encode("utf-8")[: max_bytes - used]
        if not data:
            continue
        keys.append(key)
        texts.append(data)
        used += len(data)
        if used >= max_bytes:
            break
    return keys, texts


def _token_stream(texts: list[bytes]) -> np.ndarray:
    """Byte-tokenize ``texts`` into one ``uint16`` stream, each document followed by EOS."""
    out = np.empty(sum(len(t) + 1 for t in texts), dtype=np.uint16)
    pos = 0
    for data in texts:
        out[pos:pos + len(data)] = np.frombuffer(data, dtype=np.uint8)
        pos += len(data)
        out[pos] = _TOKENIZER.eos_id
        pos += 1
    return out


def _eval_mask(keys: list[bytes], eval_fraction: float) -> np.ndarray:
    """Which documents are held out: a pure function of each key (see the module doc)."""
    u = np.array([zlib.crc32(k) for k in keys], dtype=np.float64) / 2.0 ** 32
    held_out = u < eval_fraction
    if eval_fraction > 0 and len(keys) >= 2:
        if not held_out.any():
            held_out[np.argmin(u)] = True
        if held_out.all():
            held_out[np.argmax(u)] = False
    return held_out


def _from_documents(cfg: DataConfig, keys: list[bytes], texts: list[bytes], described: str) -> Corpus:
    """Tokenize the documents of a text source and split them into train and eval."""
    if cfg.vocab_size is not None and cfg.vocab_size != _TOKENIZER.vocab_size:
        raise DataError(f"data.vocab_size ({cfg.vocab_size}) is for .bin token files; text sources use the byte "
                        f"tokenizer's {_TOKENIZER.vocab_size} ids (set model.vocab_size to change the model)")
    if not texts:
        raise DataError(f"data.source {cfg.source!r}: no text found ({described})")
    if len(texts) == 1:
        stream = _token_stream(texts)
        n_eval = int(round(len(stream) * cfg.eval_fraction))
        train, held = stream[:len(stream) - n_eval], stream[len(stream) - n_eval:]
        split = f"1 document, last {n_eval} tokens held out"
    else:
        held_out = _eval_mask(keys, cfg.eval_fraction)
        train = _token_stream([t for t, e in zip(texts, held_out) if not e])
        held = _token_stream([t for t, e in zip(texts, held_out) if e])
        split = f"{int((~held_out).sum())} train / {int(held_out.sum())} eval documents"
    if len(train) == 0:
        raise DataError(f"data.source {cfg.source!r}: the training split is empty; lower data.eval_fraction")
    n_bytes = sum(len(t) for t in texts)
    return Corpus(train=train, eval=held, vocab_size=_TOKENIZER.vocab_size,
                  description=f"{described}: {n_bytes:,} bytes, {split}, {len(train):,} train / "
                              f"{len(held):,} eval byte tokens")


_RANGE_WINDOW = 1 << 20
_RANGE_WINDOWS = 64


def _check_token_range(tokens: np.ndarray, vocab_size: int, path: Path) -> None:
    """Check the ids of a token file are in ``[0, vocab_size)``.

    Files of up to 64 windows of 2**20 tokens are scanned in full; larger ones at 64 evenly
    spaced windows (the first and last included), so a wrong ``data.token_dtype`` or
    ``data.vocab_size`` is caught without reading a large file at every start.
    """
    n_windows = -(-len(tokens) // _RANGE_WINDOW)
    starts = np.unique(np.linspace(0, n_windows - 1, min(n_windows, _RANGE_WINDOWS)).astype(np.int64)) * _RANGE_WINDOW
    for start in starts:
        window = tokens[start:start + _RANGE_WINDOW]
        low, high = int(window.min()), int(window.max())
        if low < 0 or high >= vocab_size:
            bad = high if high >= vocab_size else low
            raise DataError(f"data.source {str(path)!r} holds token id {bad}, outside data.vocab_size = {vocab_size} "
                            f"(is data.token_dtype = {tokens.dtype.name!r} right?)")


def _token_file(cfg: DataConfig, path: Path) -> Corpus:
    """Memory-map a pre-tokenized ``.bin`` file; the last ``eval_fraction`` of its tokens is eval."""
    if cfg.vocab_size is None:
        raise DataError(f"data.source {str(path)!r} is a token file: set data.vocab_size to its vocabulary size")
    dtype = np.dtype(cfg.token_dtype)
    size = path.stat().st_size
    if size == 0:
        raise DataError(f"data.source {str(path)!r} is empty")
    if size % dtype.itemsize:
        raise DataError(f"data.source {str(path)!r} has {size} bytes, not a multiple of {dtype.itemsize} "
                        f"(data.token_dtype = {cfg.token_dtype!r})")
    tokens = np.memmap(path, dtype=dtype, mode="r")
    _check_token_range(tokens, cfg.vocab_size, path)
    n_eval = int(round(len(tokens) * cfg.eval_fraction))
    train, held = tokens[:len(tokens) - n_eval], tokens[len(tokens) - n_eval:]
    if len(train) == 0:
        raise DataError(f"data.source {str(path)!r}: the training split is empty; lower data.eval_fraction")
    return Corpus(train=train, eval=held, vocab_size=cfg.vocab_size,
                  description=f"token file {path} ({cfg.token_dtype}, vocabulary {cfg.vocab_size}): "
                              f"{len(train):,} train / {len(held):,} eval tokens (last {cfg.eval_fraction:g} held out)")
