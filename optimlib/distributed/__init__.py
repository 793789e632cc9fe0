"""The sharding abstraction (row-sharded matrices) and engine helpers."""

from optimlib.distributed.layout import global_shape, is_dtensor, local_piece, to_local
from optimlib.distributed.row_block import FlatSlice, RowBlock, chunk_bounds, near_square

__all__ = ["FlatSlice", "RowBlock", "chunk_bounds", "global_shape", "is_dtensor", "local_piece", "near_square", "to_local"]
