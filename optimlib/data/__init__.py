"""Corpora, the byte tokenizer, and packing into world-size-independent batches.

``load_corpus(DataConfig())`` needs no download (the Python standard library's source);
``PackedBlocks`` cuts a token stream into ``seq_len + 1`` blocks; ``global_batch_indices`` and
``rank_indices`` say which blocks a step and a rank take.
"""

from optimlib.data.blocks import PackedBlocks, eval_blocks, global_batch_indices, rank_indices
from optimlib.data.corpus import TOKEN_DTYPES, Corpus, DataConfig, DataError, load_corpus
from optimlib.data.tokenizer import ByteTokenizer

__all__ = ["TOKEN_DTYPES", "ByteTokenizer", "Corpus", "DataConfig", "DataError", "PackedBlocks", "eval_blocks",
           "global_batch_indices", "load_corpus", "rank_indices"]
