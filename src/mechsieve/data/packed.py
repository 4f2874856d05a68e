"""Columns of strs held without a Python object each, for pools larger than memory
(`data.stream`): `CompactIds`, ids as one UTF-8 buffer with an offset each (sorted from the bytes
when many scores tie), `CodedStrs`, repeating names (sources) as a small code each into the
distinct ones, and `IdPacker`, which builds the ids during a scan, renaming repeats as
`records.make_unique_ids` does. A list of 16-character ids costs ~81 bytes an id, these ~24.
"""

from __future__ import annotations

import operator
from abc import abstractmethod
from array import array
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from mechsieve.data.readers import DataError

ENCODING = ("utf-8", "surrogatepass")
"""How `CompactIds` stores its strs: UTF-8 keeping lone surrogates (JSON's "\\ud800" is a str
too), so every str round-trips and the bytes sort as the strs do, code point by code point."""
BLOCK = 256
"""Strs made at a time when a packed column is iterated (~20 KB of them)."""


class PackedStrs(Sequence[str]):
    """A read-only sequence of strs held without a Python object each: `column[k]` makes one, a
    slice a list (a shard's range), iteration a block at a time; equal to a list or tuple of the
    same strs. `arrow` gives a range as a pyarrow StringArray without making them."""

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def item(self, k: int) -> str:
        """Str `k` (0 <= k < len)."""

    @abstractmethod
    def block(self, start: int, stop: int) -> list[str]:
        """The strs [start, stop) (0 <= start <= stop <= len)."""

    @abstractmethod
    def arrow(self, start: int, stop: int) -> Any:
        """The strs [start, stop) as a pyarrow StringArray (a score table's row group)."""

    def __getitem__(self, k: Any) -> Any:
        n = len(self)
        if isinstance(k, slice):
            start, stop, step = k.indices(n)
            if step == 1:
                return self.block(start, max(start, stop))
            return [self.item(i) for i in range(start, stop, step)]
        k = operator.index(k)
        if not -n <= k < n:
            raise IndexError(f"index {k} out of range for {n} strs")
        return self.item(k % n)

    def __iter__(self) -> Iterator[str]:
        for start in range(0, len(self), BLOCK):
            yield from self.block(start, min(start + BLOCK, len(self)))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, (PackedStrs, list, tuple)):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other))

    def __repr__(self) -> str:
        head = self.block(0, min(3, len(self)))
        return f"<{type(self).__name__} of {len(self)}: {', '.join(map(repr, head))}{', ...' if len(self) > 3 else ''}>"


class CompactIds(PackedStrs):
    """Strs as one buffer of their bytes (`ENCODING`) and `offsets` [n + 1] int64, str k being
    data[offsets[k]:offsets[k + 1]]: their bytes and 8 more each (16-character ids: ~24 bytes an
    id, a list of str ~81). `view` is a window on the same buffer; a pickled one (a shard's
    reader sent to a Ray actor) carries only its own bytes."""

    def __init__(self, data: bytes | bytearray, offsets: np.ndarray) -> None:
        self.data = data
        self.offsets = offsets

    @classmethod
    def of(cls, strs: Iterable[str]) -> CompactIds:
        data, ends = bytearray(), array("q", [0])
        for s in strs:
            data += s.encode(*ENCODING)
            ends.append(len(data))
        return cls(data, np.frombuffer(ends, dtype=np.int64))

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def item(self, k: int) -> str:
        return self.data[self.offsets[k]:self.offsets[k + 1]].decode(*ENCODING)

    def block(self, start: int, stop: int) -> list[str]:
        ends, data = self.offsets[start:stop + 1].tolist(), self.data
        return [data[a:b].decode(*ENCODING) for a, b in zip(ends, ends[1:])]

    def view(self, start: int, stop: int) -> CompactIds:
        """The strs [start, stop), sharing this buffer."""
        return CompactIds(self.data, self.offsets[start:stop + 1])

    def __reduce__(self) -> tuple[Any, ...]:
        first, last = int(self.offsets[0]), int(self.offsets[-1])
        return CompactIds, (bytes(self.data[first:last]), self.offsets - first)

    def arrow(self, start: int, stop: int) -> Any:
        import pyarrow as pa

        ends = self.offsets[start:stop + 1]
        first, last = int(ends[0]), int(ends[-1])
        strs = pa.StringArray.from_buffers(stop - start, pa.py_buffer((ends - first).astype(np.int32)),
                                           pa.py_buffer(memoryview(self.data)[first:last]))
        try:
            strs.validate(full=True)
        except pa.ArrowInvalid:
            bad = next(s for s in self.block(start, stop) if any(0xD800 <= ord(c) < 0xE000 for c in s))
            raise DataError(f"id {bad!r} holds a lone surrogate (a JSON \\ud800-\\udfff escape without its pair), "
                            "which a Parquet string cannot; give the record an id without one (data.field_map)"
                            ) from None
        return strs

    def ranks(self, which: np.ndarray | None = None) -> np.ndarray:
        """[len(which)] int64 keys of the strs at positions `which` (default: all) that order them
        as `sorted` orders the strs, equal strs by position. Arrow sorts their bytes as a binary
        array over this buffer (a copy of only those `which` names, when they are a few): no str
        is made, and the sort holds ~30 bytes a str."""
        import pyarrow as pa
        import pyarrow.compute as pc

        if which is not None and 2 * len(which) > len(self):  # most of them: rank all, copying no byte
            return self.ranks()[which]
        strs = pa.Array.from_buffers(pa.large_binary(), len(self),
                                     [None, pa.py_buffer(self.offsets), pa.py_buffer(self.data)])
        if which is None:
            order = pc.array_sort_indices(strs).to_numpy()  # stable: equal strs by position
        else:
            which = np.asarray(which, dtype=np.int64)
            table = pa.table({"str": strs.take(pa.array(which)), "at": which})
            order = pc.sort_indices(table, [("str", "ascending"), ("at", "ascending")]).to_numpy()
        ranks = np.empty(len(order), dtype=np.int64)
        ranks[order] = np.arange(len(order))
        return ranks


class CodedStrs(PackedStrs):
    """Strs that repeat (sources) as `codes` [n] int32 into `names`, the distinct ones in the
    order they first appear: 4 bytes each."""

    def __init__(self, names: list[str], codes: np.ndarray) -> None:
        self.names = names
        self.codes = codes

    def __len__(self) -> int:
        return len(self.codes)

    def item(self, k: int) -> str:
        return self.names[self.codes[k]]

    def block(self, start: int, stop: int) -> list[str]:
        names = self.names
        return [names[c] for c in self.codes[start:stop].tolist()]

    def arrow(self, start: int, stop: int) -> Any:
        import pyarrow as pa

        return pa.array(self.names, pa.string()).take(pa.array(self.codes[start:stop]))

    def counts(self, mask: np.ndarray | None = None) -> dict[str, int]:
        """Strs (of those `mask` [n] bool keeps) per name, every name, in `names`' order."""
        codes = self.codes if mask is None else self.codes[np.asarray(mask, dtype=bool)]
        return dict(zip(self.names, np.bincount(codes, minlength=len(self.names)).tolist()))


class IdPacker:
    """The ids of a scan as it reads them, into a `CompactIds` buffer, a repeated one renamed `~2`,
    `~3` as `records.make_unique_ids` renames it. Repeats are found in an open-addressing table of
    the positions of each id's first example (its hash picks the slot, its bytes confirm a match),
    16-32 bytes an id while the scan runs and none after, where a Counter of the ids would hold
    each as a str (~80 bytes more)."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.ends = array("q", [0])
        self.slots = array("q", [-1]) * 1024
        self.repeats: dict[int, int] = {}  # first example of an id seen more than once -> times seen
        self.renamed = 0

    def __len__(self) -> int:
        return len(self.ends) - 1

    def add(self, ex_id: str) -> str:
        """Append `ex_id`, renamed when it repeats; return it as stored."""
        raw = ex_id.encode(*ENCODING)
        slots, mask = self.slots, len(self.slots) - 1
        slot = hash(ex_id) & mask
        while (k := slots[slot]) >= 0:
            if self.data[self.ends[k]:self.ends[k + 1]] == raw:
                self.repeats[k] = seen = self.repeats.get(k, 1) + 1
                self.renamed += 1
                ex_id = f"{ex_id}~{seen}"
                self._append(ex_id.encode(*ENCODING))
                return ex_id
            slot = (slot + 1) & mask
        slots[slot] = len(self)
        self._append(raw)
        if 2 * (len(self) - self.renamed) > len(slots):
            self._grow()
        return ex_id

    def _append(self, raw: bytes) -> None:
        self.data += raw
        self.ends.append(len(self.data))

    def _grow(self) -> None:
        slots = array("q", [-1]) * (2 * len(self.slots))
        mask = len(slots) - 1
        for k in self.slots:
            if k >= 0:
                slot = hash(self.data[self.ends[k]:self.ends[k + 1]].decode(*ENCODING)) & mask
                while slots[slot] >= 0:
                    slot = (slot + 1) & mask
                slots[slot] = k
        self.slots = slots

    def ids(self) -> CompactIds:
        """The ids packed so far (the table of repeats is dropped)."""
        self.slots, self.repeats = array("q"), {}
        return CompactIds(self.data, np.frombuffer(self.ends, dtype=np.int64))
