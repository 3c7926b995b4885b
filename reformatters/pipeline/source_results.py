"""Source files and what became of them, kept compact: a variable-region of an ensemble has thousands.

A `SourceFileCoord` as a Python object takes about 1.3 KB (the model, its timestamps); a GEFS variable-region has
31 members x 181 leads of them, and a task that kept one object per file, then a copy with its status and reason,
held about 15 MB that grew with the ensemble. Here the coords live in blocks of 64, each pickled and compressed
(about 15 bytes per coord: they differ in a member and a lead), and a coord object exists only while it is used.
"""

from __future__ import annotations

import pickle
import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, overload

from reformatters.region_job import SourceFileCoord

BLOCK = 64
_OPEN_BLOCKS = 2  # a reader a few coords ahead of a writer (the scratch task's download window) share two


def _pack(coords: list[SourceFileCoord]) -> bytes:
    return zlib.compress(pickle.dumps(coords, protocol=pickle.HIGHEST_PROTOCOL), 1)


def _unpack(block: bytes) -> list[SourceFileCoord]:
    coords: list[SourceFileCoord] = pickle.loads(zlib.decompress(block))
    return coords


class SourceFileResults(Sequence[SourceFileCoord]):
    """The coords of a task's source files in order; `record(index, coord)` replaces one with what became of it.
    Reads like a list of coords; pickles as the compressed blocks."""

    def __init__(self, coords: Iterable[SourceFileCoord] = ()) -> None:
        self._blocks: list[bytes] = []
        self._length = 0
        self._open: OrderedDict[int, tuple[list[SourceFileCoord], bool]] = OrderedDict()  # block -> (coords, dirty)
        pending: list[SourceFileCoord] = []
        for coord in coords:
            pending.append(coord)
            self._length += 1
            if len(pending) == BLOCK:
                self._blocks.append(_pack(pending))
                pending = []
        if pending:
            self._blocks.append(_pack(pending))

    def _block(self, number: int) -> list[SourceFileCoord]:
        opened = self._open.get(number)
        if opened is not None:
            self._open.move_to_end(number)
            return opened[0]
        coords = _unpack(self._blocks[number])
        self._open[number] = (coords, False)
        while len(self._open) > _OPEN_BLOCKS:
            closed, (old, dirty) = self._open.popitem(last=False)
            if dirty:
                self._blocks[closed] = _pack(old)
        return coords

    def _flush(self) -> None:
        for number, (coords, dirty) in self._open.items():
            if dirty:
                self._blocks[number] = _pack(coords)
        self._open.clear()

    def record(self, index: int, coord: SourceFileCoord) -> None:
        """Keep `coord` (the file at `index`, with its status) in place of what was there."""
        index = self._checked(index)
        number = index // BLOCK
        coords = self._block(number)
        coords[index % BLOCK] = coord
        self._open[number] = (coords, True)

    def fresh(self) -> SourceFileResults:
        """The same files, for records of their own (the compressed blocks are shared until one changes)."""
        self._flush()
        copy = SourceFileResults()
        copy._blocks = list(self._blocks)
        copy._length = self._length
        return copy

    def where(self, keep: Callable[[SourceFileCoord], bool]) -> SourceFileResults:
        """The files for which `keep(coord)` holds, with their statuses."""
        return SourceFileResults(coord for coord in self if keep(coord))

    def _checked(self, index: int) -> int:
        if index < 0:
            index += self._length
        if not 0 <= index < self._length:
            raise IndexError(index)
        return index

    def __len__(self) -> int:
        return self._length

    @overload
    def __getitem__(self, index: int) -> SourceFileCoord: ...

    @overload
    def __getitem__(self, index: slice) -> Sequence[SourceFileCoord]: ...

    def __getitem__(self, index: int | slice) -> SourceFileCoord | Sequence[SourceFileCoord]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self._length))]
        index = self._checked(index)
        return self._block(index // BLOCK)[index % BLOCK]

    def __iter__(self) -> Iterator[SourceFileCoord]:
        for number in range(len(self._blocks)):
            yield from list(self._block(number))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other, strict=True))

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"SourceFileResults({self._length} files)"

    def __getstate__(self) -> dict[str, Any]:
        self._flush()
        return {"blocks": self._blocks, "length": self._length}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._blocks = state["blocks"]
        self._length = state["length"]
        self._open = OrderedDict()

    @property
    def nbytes(self) -> int:
        """The compressed blocks' bytes (coords being used are objects besides)."""
        return sum(len(block) for block in self._blocks)


def packed(coords: Sequence[SourceFileCoord]) -> SourceFileResults:
    return coords if isinstance(coords, SourceFileResults) else SourceFileResults(coords)
