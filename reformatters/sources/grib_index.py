"""Parse GRIB2 byte-range inventories (NCEP wgrib2 `.idx`, ECMWF JSON lines) and pick messages from them."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from reformatters.sources.errors import SourceUnreadableError

WindowKind = Literal["acc", "ave", "max", "min"]
WINDOW_KINDS: tuple[WindowKind, ...] = ("acc", "ave", "max", "min")


class GribIndexParseError(SourceUnreadableError, ValueError):
    """An inventory line could not be parsed."""


class GribMessageNotFoundError(SourceUnreadableError, LookupError):
    """The inventory holds no message (or more than one) matching what was asked for."""


@dataclass(frozen=True)
class IndexEntry:
    """One message of a GRIB2 file as listed by its inventory.

    `end` is exclusive; None means the message runs to the end of the file.
    """

    message: str
    start: int
    end: int | None
    element: str
    level: str
    step: str
    extra: str = ""
    raw: str = ""

    @property
    def length(self) -> int | None:
        return None if self.end is None else self.end - self.start

    @property
    def byte_range_header(self) -> str:
        """HTTP Range header value (inclusive end)."""
        return f"bytes={self.start}-" if self.end is None else f"bytes={self.start}-{self.end - 1}"


# --------------------------------------------------------------------------------------------------
# NCEP wgrib2 inventories


def parse_ncep_idx(text: str) -> list[IndexEntry]:
    """Parse a wgrib2 `.idx` inventory: `msg#:start_byte:d=YYYYMMDDHH:ELEMENT:LEVEL:STEP:[extra]`.

    A message ends one byte before the next line with a *different* start byte (sub-messages such as
    `211.1`, `211.2` share a start byte); the last message is open-ended (`end=None`).
    """
    rows: list[tuple[str, int, str, str, str, str, str]] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line:
            continue
        parts = line.split(":")
        if len(parts) < 6 or not parts[2].startswith("d="):
            raise GribIndexParseError(
                f"line {lineno} is not a wgrib2 inventory line (expected "
                f"'msg#:start_byte:d=YYYYMMDDHH:ELEMENT:LEVEL:STEP:[extra]'), found {line!r}"
            )
        try:
            start = int(parts[1])
        except ValueError:
            raise GribIndexParseError(f"line {lineno}: start byte {parts[1]!r} is not an integer in {line!r}") from None
        extra = ":".join(parts[6:]).strip() if len(parts) > 6 else ""
        rows.append((parts[0], start, parts[3], parts[4], parts[5], extra, line))

    # End of each message = the next distinct start byte greater than its own start.
    distinct_starts = sorted({r[1] for r in rows})
    next_start: dict[int, int | None] = {
        s: (distinct_starts[i + 1] if i + 1 < len(distinct_starts) else None) for i, s in enumerate(distinct_starts)
    }
    return [
        IndexEntry(
            message=msg,
            start=start,
            end=next_start[start],
            element=el,
            level=lev,
            step=step,
            extra=extra,
            raw=raw,
        )
        for msg, start, el, lev, step, extra, raw in rows
    ]


# --------------------------------------------------------------------------------------------------
# ECMWF JSON-lines inventories

_ECMWF_LEVTYPES = {
    "sfc": "surface",
    "pl": "{levelist} hPa",
    "ml": "{levelist} model level",
    "sol": "{levelist} soil level",
}


def ecmwf_level(levtype: str, levelist: str | int | None) -> str:
    template = _ECMWF_LEVTYPES.get(levtype)
    if levelist in (None, ""):
        return template if template is not None and "{" not in template else levtype
    return (template or f"{levtype} {{levelist}}").format(levelist=levelist)


def ecmwf_step(step: str | int) -> str:
    """ECMWF step `0`, `6`, `0-24` → the wgrib2-style step text used for matching."""
    text = str(step)
    if "-" in text:
        a, b = text.split("-", 1)
        return f"{int(a)}-{int(b)} hour fcst"
    return instant_step(int(text))


def parse_ecmwf_index(text: str) -> list[IndexEntry]:
    """Parse ECMWF open-data JSON lines (`_offset`, `_length`, `param`, `step`, `levtype`, `levelist`...).

    element = param, level from levtype (+ levelist), step rendered as `anl`, `N hour fcst` or `A-B hour fcst`.
    Other keys (type, number, ...) are kept in `extra` as `key=value` pairs, sorted.
    """
    entries: list[IndexEntry] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line:
            continue
        try:
            record = json.loads(line)
            offset = int(record["_offset"])
            length = int(record["_length"])
            param = str(record["param"])
        except (ValueError, KeyError, TypeError) as e:
            raise GribIndexParseError(
                f"line {lineno} is not an ECMWF index record with _offset, _length and param: {line!r} ({e})"
            ) from None
        skip = {"_offset", "_length", "param", "step", "levtype", "levelist"}
        extra = " ".join(f"{k}={record[k]}" for k in sorted(record) if k not in skip)
        entries.append(
            IndexEntry(
                message=str(len(entries) + 1),
                start=offset,
                end=offset + length,
                element=param,
                level=ecmwf_level(str(record.get("levtype", "")), record.get("levelist")),
                step=ecmwf_step(record.get("step", 0)),
                extra=extra,
                raw=line,
            )
        )
    return entries


def parse_index(text: str) -> list[IndexEntry]:
    """Detect the inventory format (JSON lines start with `{`) and parse it.

    Inventories end with a newline: one that does not was cut short (a transfer that ended early), and its last
    line, though it may parse, could name a message that is not all there.
    """
    if not text.strip():
        raise GribIndexParseError("the inventory is empty")
    if not text.endswith("\n"):
        last = text.rsplit("\n", 1)[-1]
        raise GribIndexParseError(f"the inventory ends mid-line (no final newline after {last[-80:]!r}): cut short")
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    return parse_ecmwf_index(text) if first.startswith("{") else parse_ncep_idx(text)


# --------------------------------------------------------------------------------------------------
# Step strings


def instant_step(lead_hours: int) -> str:
    return "anl" if lead_hours == 0 else f"{lead_hours} hour fcst"


def window_step(start_hours: int, end_hours: int, kind: WindowKind) -> str:
    if kind not in WINDOW_KINDS:
        raise ValueError(f"window kind must be one of {WINDOW_KINDS}, got {kind!r}")
    return f"{start_hours}-{end_hours} hour {kind} fcst"


_UNIT_HOURS = {"min": 1 / 60, "hour": 1, "day": 24, "month": 24 * 30, "year": 24 * 365}
_WINDOW_RE = re.compile(r"^(\d+)-(\d+) (min|hour|day|month|year) (\w+) fcst$")
_INSTANT_RE = re.compile(r"^(\d+) (min|hour|day|month|year) fcst$")


def normalize_step(step: str) -> str:
    """Canonical step text in hours: `0-10 day acc fcst` → `0-240 hour acc fcst`, `1 day fcst` → `24 hour fcst`."""
    s = " ".join(step.strip().split())
    if m := _WINDOW_RE.match(s):
        f = _UNIT_HOURS[m.group(3)]
        return f"{_fmt_hours(int(m.group(1)) * f)}-{_fmt_hours(int(m.group(2)) * f)} hour {m.group(4)} fcst"
    if m := _INSTANT_RE.match(s):
        hours = int(m.group(1)) * _UNIT_HOURS[m.group(2)]
        return "anl" if hours == 0 and m.group(2) != "min" else f"{_fmt_hours(hours)} hour fcst"
    return s


def _fmt_hours(h: float) -> str:
    return str(int(h)) if float(h).is_integer() else f"{h:g}"


# --------------------------------------------------------------------------------------------------
# Matching


def find_message(
    entries: Sequence[IndexEntry],
    element: str,
    level: str,
    step: str,
    *,
    source: str = "<inventory>",
) -> IndexEntry:
    """The single entry whose element, level and (normalised) step equal the ones asked for."""
    want_step = normalize_step(step)
    matches = [e for e in entries if e.element == element and e.level == level and normalize_step(e.step) == want_step]
    if len(matches) == 1:
        return matches[0]
    # GFS lists the 0-6 h APCP accumulation twice at f006 (the 6-hourly window and the run total coincide):
    # lines alike in everything but their position name the same field, so the first one serves.
    if matches and len({e.extra for e in matches}) == 1:
        return matches[0]
    sought = f"{element}:{level}:{step}"
    if not matches:
        close = closest_entries(entries, element, level, step)
        listing = "\n  ".join(e.raw or f"{e.element}:{e.level}:{e.step}" for e in close) or "(inventory is empty)"
        raise GribMessageNotFoundError(
            f"{source}: no message {sought!r} among {len(entries)} inventory lines. Closest lines:\n  {listing}\n"
            "Check the element, level and step text (windows are 'A-B hour acc|ave|max|min fcst', lead 0 is 'anl')."
        )
    listing = "\n  ".join(e.raw for e in matches)
    raise GribMessageNotFoundError(
        f"{source}: {len(matches)} messages match {sought!r}, expected exactly one:\n  {listing}\n"
        "Make the request more specific or deduplicate the inventory."
    )


def closest_entries(entries: Sequence[IndexEntry], element: str, level: str, step: str, n: int = 8) -> list[IndexEntry]:
    """Entries nearest to a request: same element and level, then same element, then same level."""
    want_step = normalize_step(step)

    def score(e: IndexEntry) -> int:
        return (
            (4 if e.element == element else 0)
            + (2 if e.level == level else 0)
            + (1 if normalize_step(e.step) == want_step else 0)
        )

    # Only lines sharing the element or the level are useful hints; a shared step alone is noise.
    scored = [(score(e), i, e) for i, e in enumerate(entries) if score(e) >= 2]
    scored.sort(key=lambda t: (-t[0], t[1]))
    return [e for _, _, e in scored[:n]]


# --------------------------------------------------------------------------------------------------
# Byte ranges

DEFAULT_MAX_GAP_BYTES = 256 * 1024


@dataclass(frozen=True)
class MessageSlice:
    """A requested message inside a merged range: `offset` from the range start, `length` (None = to the end)."""

    key: str
    offset: int
    length: int | None


@dataclass(frozen=True)
class MergedRange:
    """A contiguous byte range covering one or more requested messages. `end` is exclusive, None = to EOF."""

    start: int
    end: int | None
    slices: tuple[MessageSlice, ...] = field(default_factory=tuple)

    @property
    def length(self) -> int | None:
        return None if self.end is None else self.end - self.start

    @property
    def byte_range_header(self) -> str:
        return f"bytes={self.start}-" if self.end is None else f"bytes={self.start}-{self.end - 1}"

    def split(self, data: bytes) -> dict[str, bytes]:
        """Cut the bytes downloaded for this range back into per-message bytes."""
        if self.end is not None and len(data) != self.end - self.start:
            raise ValueError(f"range {self.byte_range_header}: expected {self.end - self.start} bytes, got {len(data)}")
        out: dict[str, bytes] = {}
        for s in self.slices:
            out[s.key] = data[s.offset :] if s.length is None else data[s.offset : s.offset + s.length]
        return out


def merge_byte_ranges(
    ranges: Iterable[IndexEntry | tuple[str, int, int | None]] | dict[str, IndexEntry],
    max_gap_bytes: int = DEFAULT_MAX_GAP_BYTES,
    *,
    file_size: int | None = None,
) -> list[MergedRange]:
    """Merge requested messages into as few contiguous ranges as possible.

    Input: a mapping key → IndexEntry, IndexEntry objects (keyed by message number) or `(key, start, end)` tuples
    (end exclusive, None = to EOF). Two ranges merge when they overlap or the gap between them is at most
    `max_gap_bytes`. An open-ended range stays open-ended (`bytes=START-`) unless `file_size` is given.
    """
    items: list[tuple[str, int, int | None]] = []
    if isinstance(ranges, dict):
        items = [(k, e.start, e.end) for k, e in ranges.items()]
    else:
        for r in ranges:
            items.append((r.message, r.start, r.end) if isinstance(r, IndexEntry) else r)
    if file_size is not None:
        items = [(k, s, file_size if e is None else e) for k, s, e in items]
    items.sort(key=lambda t: (t[1], float("inf") if t[2] is None else t[2]))

    groups: list[tuple[int, int | None, list[tuple[str, int, int | None]]]] = []
    for key, start, end in items:
        if groups:
            g_start, g_end, members = groups[-1]
            if g_end is None or start <= g_end + max_gap_bytes:
                new_end = None if (g_end is None or end is None) else max(g_end, end)
                members.append((key, start, end))
                groups[-1] = (g_start, new_end, members)
                continue
        groups.append((start, end, [(key, start, end)]))

    return [
        MergedRange(
            start=g_start,
            end=g_end,
            slices=tuple(
                MessageSlice(key=k, offset=s - g_start, length=None if e is None else e - s) for k, s, e in members
            ),
        )
        for g_start, g_end, members in groups
    ]
