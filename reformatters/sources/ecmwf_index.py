"""ECMWF open-data JSON-lines `.index` files: parse them, select messages by their MARS keys, fetch those.

One JSON object per message, for example
`{"class": "od", "stream": "enfo", "type": "pf", "number": "7", "step": "144", "levtype": "sfc", "param": "2t",
"_offset": 123, "_length": 456}`. Values may be strings or numbers; `levelist` is present only for levels
(pressure, model, soil), `number` only for ensemble members (the control of `enfo` may carry `0` or nothing, the
deterministic `oper`/`fc` nothing). Accumulations run from the start of the forecast: `tp` at step 144 is
`"step": "144"` (some producers write the range `"0-144"`; both match step 144).

Messages are matched on `param`, `levtype`, `levelist` (when asked for), `number`, `step` and `type`, then fetched
by byte range exactly as NOAA's: ranges merged across small gaps, one request per merged range.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from reformatters.sources.download import (
    INDEX_CACHE,
    DownloadConfig,
    IndexCache,
    fetch_index,
    fetch_message_ranges,
)
from reformatters.sources.grib_index import GribIndexParseError, GribMessageNotFoundError, IndexEntry


@dataclass(frozen=True)
class EcmwfMessageKey:
    """What identifies one message of an ECMWF file. `levelist` None: the level type has no level (surface).
    `number` None: no member number (the deterministic forecast); the control is number 0."""

    param: str
    levtype: str
    step: str
    type: str
    number: int | None = None
    levelist: str | None = None

    def describe(self) -> str:
        parts = [f"param={self.param}", f"levtype={self.levtype}"]
        if self.levelist is not None:
            parts.append(f"levelist={self.levelist}")
        parts += [f"type={self.type}", f"number={self.number}", f"step={self.step}"]
        return " ".join(parts)


@dataclass(frozen=True)
class EcmwfIndexEntry:
    key: EcmwfMessageKey
    offset: int
    length: int
    raw: str

    def as_index_entry(self, name: str) -> IndexEntry:
        return IndexEntry(
            message=name,
            start=self.offset,
            end=self.offset + self.length,
            element=self.key.param,
            level=self.key.levtype,
            step=self.key.step,
            raw=self.raw,
        )


def normalize_ecmwf_step(step: str | int) -> str:
    """`6`, `"6"`, `"0-6"` -> `"6"` (accumulations from the start are listed either way); `"6-12"` stays."""
    text = str(step).strip()
    start, dash, end = text.partition("-")
    if dash:
        return str(int(end)) if int(start) == 0 else f"{int(start)}-{int(end)}"
    return str(int(text))


def _number(value: object) -> int | None:
    if value in (None, ""):
        return None
    return int(str(value))


def parse_ecmwf_index_entries(text: str) -> list[EcmwfIndexEntry]:
    """Every line of an ECMWF `.index` as an entry; a line without `_offset`, `_length`, `param`, `levtype`, `step`
    or `type` raises GribIndexParseError naming it."""
    entries: list[EcmwfIndexEntry] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line:
            continue
        try:
            record = json.loads(line)
            levelist = record.get("levelist")
            key = EcmwfMessageKey(
                param=str(record["param"]),
                levtype=str(record["levtype"]),
                step=normalize_ecmwf_step(record["step"]),
                type=str(record["type"]),
                number=_number(record.get("number")),
                levelist=None if levelist in (None, "") else str(levelist),
            )
            entry = EcmwfIndexEntry(key, int(record["_offset"]), int(record["_length"]), line)
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise GribIndexParseError(
                f"line {lineno} is not an ECMWF index record with _offset, _length, param, levtype, step and type: "
                f"{line[:200]!r} ({type(error).__name__}: {error})"
            ) from None
        if entry.length <= 0 or entry.offset < 0:
            raise GribIndexParseError(f"line {lineno}: a message needs _offset >= 0 and _length > 0: {line[:200]!r}")
        entries.append(entry)
    return entries


def _matches(entry: EcmwfMessageKey, wanted: EcmwfMessageKey) -> bool:
    if (entry.param, entry.levtype, entry.step, entry.type) != (wanted.param, wanted.levtype, wanted.step, wanted.type):
        return False
    if wanted.levelist is not None and entry.levelist != wanted.levelist:
        return False
    # The control is member 0 whether its line says `"number": "0"` or nothing.
    return (entry.number or 0) == (wanted.number or 0)


class EcmwfIndex:
    """An index's entries, looked up by key in constant time."""

    def __init__(self, entries: Sequence[EcmwfIndexEntry]) -> None:
        self.entries = list(entries)
        self._by_key: dict[tuple[str, str, str, str, int], list[EcmwfIndexEntry]] = {}
        for entry in self.entries:
            k = entry.key
            self._by_key.setdefault((k.param, k.levtype, k.step, k.type, k.number or 0), []).append(entry)

    @classmethod
    def parse(cls, text: str) -> EcmwfIndex:
        return cls(parse_ecmwf_index_entries(text))

    def find(self, wanted: EcmwfMessageKey, *, source: str = "<index>") -> EcmwfIndexEntry | None:
        """The one entry matching `wanted`, None if there is none; several raise GribMessageNotFoundError."""
        step = normalize_ecmwf_step(wanted.step)
        candidates = self._by_key.get((wanted.param, wanted.levtype, step, wanted.type, wanted.number or 0), [])
        matches = [e for e in candidates if wanted.levelist is None or e.key.levelist == wanted.levelist]
        if len(matches) > 1:
            listing = "\n  ".join(e.raw for e in matches)
            raise GribMessageNotFoundError(
                f"{source}: {len(matches)} messages match {wanted.describe()}, expected one:\n  {listing}\n"
                "Name the level (levelist) or check the index for duplicates."
            )
        return matches[0] if matches else None

    def select(self, wanted: Mapping[str, EcmwfMessageKey], *, source: str = "<index>") -> dict[str, IndexEntry]:
        """{name: byte range} of every wanted message; one the index does not list raises
        GribMessageNotFoundError with the closest lines."""
        selected: dict[str, IndexEntry] = {}
        for name, key in wanted.items():
            entry = self.find(key, source=source)
            if entry is None:
                close = [e.raw for e in self.entries if e.key.param == key.param][:6]
                listing = "\n  ".join(close) or "(no line with that param)"
                raise GribMessageNotFoundError(
                    f"{source}: no message {key.describe()} among {len(self.entries)} index lines. "
                    f"Lines with param {key.param}:\n  {listing}"
                )
            selected[name] = entry.as_index_entry(name)
        return selected


_parsed: OrderedDict[str, tuple[str, EcmwfIndex]] = OrderedDict()
_parsed_lock = threading.Lock()
_PARSED_CAPACITY = 64
# Lines of the parsed indexes held together (one step file lists every member's messages): the newest index is
# kept whatever its size.
_PARSED_MAX_LINES = 32_768


def fetch_ecmwf_index(
    index_url: str, *, config: DownloadConfig | None = None, cache: IndexCache = INDEX_CACHE
) -> EcmwfIndex:
    """The parsed `.index` at `index_url`: fetched once per process (through the shared inventory cache, so the
    framework's index tasks hand it to every download) and parsed once per process."""
    text = None
    for _ in range(3):  # another thread's inventories may push this one out of the cache between the two calls
        fetch_index(index_url, config=config, cache=cache)
        text = cache.text(index_url)
        if text is not None:
            break
    if text is None:
        raise GribIndexParseError(f"{index_url}: the inventory cache holds no text for it")
    with _parsed_lock:
        held = _parsed.get(index_url)
        if held is not None and held[0] is text:
            _parsed.move_to_end(index_url)
            return held[1]
    try:
        index = EcmwfIndex.parse(text)
    except GribIndexParseError as error:
        raise GribIndexParseError(f"{index_url}: {error}") from None
    with _parsed_lock:
        _parsed.pop(index_url, None)
        _parsed[index_url] = (text, index)
        while len(_parsed) > 1 and (len(_parsed) > _PARSED_CAPACITY or _parsed_lines() > _PARSED_MAX_LINES):
            _parsed.popitem(last=False)
    return index


def _parsed_lines() -> int:
    return sum(len(index.entries) for _, index in _parsed.values())


def fetch_ecmwf_messages(
    file_url: str,
    index_url: str,
    wanted: Mapping[str, EcmwfMessageKey],
    *,
    config: DownloadConfig | None = None,
    skip_unlisted: bool = True,
) -> dict[str, bytes]:
    """The `wanted` messages ({name: key}) of an ECMWF file, fetched by byte range; with `skip_unlisted`, one the
    index does not list is left out of the answer (the index is fetched even when nothing is wanted: it proves the
    file is published). Raises SourceFileNotFoundError, SourceDownloadError, GribIndexParseError."""
    index = fetch_ecmwf_index(index_url, config=config)
    if skip_unlisted:
        wanted = {name: key for name, key in wanted.items() if index.find(key, source=index_url) is not None}
    if not wanted:
        return {}
    return fetch_message_ranges(file_url, index.select(wanted, source=index_url), config=config)
