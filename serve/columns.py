"""The columns a serving shard keeps beside its codes, each in the fewest bytes a row: ids and labels.

At 10^8 rows every byte a row is 100 MB of a replica, so neither stays the
Arrow column it was read as when a narrower form holds the same values:

- ids of one width (zero-padded names, hashes, UUIDs: most catalogs) become
  one numpy bytes array, without Arrow's 4-byte offset per row, and an id is
  found by numpy's binary search;
- labels become bit sets of ceil(C/8) bytes a row when that is smaller than
  Arrow's offset plus 4 bytes per label.

Both answer the same two questions whatever the form: the values of some rows
(:meth:`take`), and for ids sorted ascending the row of an id (:meth:`IdColumn.find_sorted`).
"""

from __future__ import annotations

import bisect

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from contracts.codes import label_sets


def combined(column: pa.Array | pa.ChunkedArray | None) -> pa.Array | None:
    """``column`` as one contiguous Arrow array (None stays None)."""
    return column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column


class IdColumn:
    """String ids of rows: as fixed-width bytes when every id has the same length, else as Arrow strings."""

    def __init__(self, ids: pa.Array | pa.ChunkedArray) -> None:
        ids = combined(ids).cast(pa.string())
        self._fixed = fixed_width(ids)
        # One chunk: ``take`` on a many-chunk column costs ~0.5 ms per call at a million rows.
        self._strings = None if self._fixed is not None else ids

    def __len__(self) -> int:
        return len(self._fixed) if self._fixed is not None else len(self._strings)

    @property
    def nbytes(self) -> int:
        """Bytes held for the ids."""
        return self._fixed.nbytes if self._fixed is not None else self._strings.nbytes

    def take(self, rows: np.ndarray) -> list[str]:
        """The ids of ``rows``."""
        if self._fixed is not None:
            return [value.decode() for value in self._fixed[rows].tolist()]
        return self._strings.take(pa.array(rows, pa.int64())).to_pylist()

    def find_sorted(self, item_id: str) -> int | None:
        """The first row of ``item_id`` (binary search: the ids must be sorted ascending), or None."""
        if self._fixed is not None:
            key = item_id.encode()
            if len(key) != self._fixed.dtype.itemsize or key.endswith(b"\0"):
                return None  # no id of this width, or one numpy's bytes would not tell apart
            at = int(np.searchsorted(self._fixed, key))
            return at if at < len(self._fixed) and self._fixed[at] == key else None
        at = bisect.bisect_left(self._strings, item_id, key=lambda scalar: scalar.as_py())
        return at if at < len(self._strings) and self._strings[at].as_py() == item_id else None


def fixed_width(ids: pa.StringArray) -> np.ndarray | None:
    """``ids`` as a numpy ``S<width>`` array (a copy, so the Arrow buffers can go), or None when widths differ.

    Ids ending in a NUL byte stay strings too: numpy's bytes drop trailing NULs.
    """
    if ids.null_count or len(ids) == 0:
        return None
    lengths = pc.binary_length(ids).to_numpy()
    width = int(lengths[0])
    if width == 0 or not np.all(lengths == width):
        return None
    offsets = np.frombuffer(ids.buffers()[1], dtype=np.int32, count=len(ids) + 1, offset=ids.offset * 4)
    data = np.frombuffer(ids.buffers()[2], dtype=np.uint8, count=len(ids) * width, offset=int(offsets[0]))
    matrix = data.reshape(len(ids), width)
    if not np.all(matrix[:, -1]):
        return None
    return matrix.copy().view(f"S{width}").reshape(len(ids))


class LabelColumn:
    """Class-index lists of rows: as bit sets (ceil(C/8) bytes a row) when smaller than Arrow's list<int32>."""

    def __init__(self, labels: pa.Array | pa.ChunkedArray) -> None:
        labels = combined(labels)
        values = pc.list_flatten(labels)
        self.num_classes = 1 + int(pc.max(values).as_py() or 0) if len(values) else 1
        list_bytes = 4 * (len(labels) + 1) + 4 * len(values)
        bitset_bytes = len(labels) * -(-self.num_classes // 8)
        self._bits = label_sets(labels, self.num_classes, np.uint8) if bitset_bytes < list_bytes else None
        self._lists = labels if self._bits is None else None

    def __len__(self) -> int:
        return len(self._bits) if self._bits is not None else len(self._lists)

    @property
    def nbytes(self) -> int:
        """Bytes held for the labels."""
        return self._bits.nbytes if self._bits is not None else self._lists.nbytes

    def take(self, rows: np.ndarray) -> list[list[int]]:
        """The class indices of ``rows``, ascending as stored."""
        if self._bits is None:
            return self._lists.take(pa.array(rows, pa.int64())).to_pylist()
        flags = np.unpackbits(self._bits[rows], axis=1, count=self.num_classes, bitorder="little")
        return [np.flatnonzero(row).tolist() for row in flags]
