"""Arrow record batches bounded in bytes as well as rows.

Why: Spark's `arrow.maxRecordsPerBatch` (8192) counts rows, and one `binary` column of a batch is
limited to 2 GiB by its int32 offsets: 8192 rows of 1 MB images overflow it, and a 20 MB original
per row (resize_mode `no`) does so at ~100 rows. Cores that emit image rows cut their output with
:func:`bounded_batches`; the session also sets `spark.sql.execution.arrow.maxBytesPerBatch` so the
batches Spark sends to Python are bounded the same way.
"""
from __future__ import annotations

from typing import Iterable, Iterator

import numpy as np
import pyarrow as pa

DEFAULT_MAX_BATCH_BYTES = 256 * 1024 * 1024  # well under Arrow's 2 GiB per binary column


def row_sizes(batch: pa.RecordBatch) -> np.ndarray:
    """Approximate bytes per row: variable-width columns from their offsets, fixed-width by type."""
    sizes = np.zeros(batch.num_rows, dtype=np.int64)
    for col in batch.columns:
        t = col.type
        if pa.types.is_binary(t) or pa.types.is_string(t) or pa.types.is_large_binary(t) \
                or pa.types.is_large_string(t):
            offsets = np.frombuffer(col.buffers()[1], dtype=np.int64 if t in (pa.large_binary(), pa.large_string())
                                    else np.int32)[col.offset:col.offset + len(col) + 1]
            sizes += np.diff(offsets).astype(np.int64)
        elif hasattr(t, "bit_width") and t.bit_width:
            sizes += max(1, t.bit_width // 8)
        else:  # nested / view types: an even share of the column's buffers
            sizes += col.nbytes // max(1, batch.num_rows)
    return sizes


def split_batch(batch: pa.RecordBatch, max_bytes: int) -> Iterator[pa.RecordBatch]:
    """`batch` as consecutive slices of at most `max_bytes` each (a single larger row alone)."""
    if batch.num_rows == 0 or batch.nbytes <= max_bytes:
        yield batch
        return
    sizes = row_sizes(batch)
    start, acc = 0, 0
    for i, size in enumerate(sizes):
        if i > start and acc + size > max_bytes:
            yield batch.slice(start, i - start)
            start, acc = i, 0
        acc += int(size)
    yield batch.slice(start)


def bounded_batches(batches: Iterable[pa.RecordBatch],
                    max_bytes: int = DEFAULT_MAX_BATCH_BYTES) -> Iterator[pa.RecordBatch]:
    """Pass batches through, splitting any above `max_bytes` (no copy: slices share buffers)."""
    for batch in batches:
        yield from split_batch(batch, max_bytes)
