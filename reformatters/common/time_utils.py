"""UTC time parsing. A naive ISO 8601 time means UTC; `Z` is accepted; other offsets are refused."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

import numpy as np
import pandas as pd


class TimezoneError(ValueError):
    pass


# A date, or a date and a time (hours, minutes, seconds and a fraction as far as given), then Z or an offset.
_ISO_8601 = re.compile(
    r"\d{4}-\d{2}-\d{2}(T\d{2}(:\d{2}(:\d{2}(\.\d{1,9})?)?)?)?(Z|[+-]\d{2}(:?\d{2})?)?", re.IGNORECASE
)


def parse_utc(value: str | datetime | pd.Timestamp | np.datetime64) -> pd.Timestamp:
    """Parse to a naive pandas Timestamp in UTC."""
    if isinstance(value, str):
        text = value.strip()
        expected = "write a date or a date and time, e.g. 2025-01-31, 2025-01-31T06:00 or 2025-01-31T06:00Z"
        if not _ISO_8601.fullmatch(text):
            raise ValueError(f"{value!r} is not an ISO 8601 time; {expected}")
        try:
            timestamp = pd.Timestamp(text)
        except ValueError as error:
            raise ValueError(f"{value!r} is not a valid time ({error}); {expected}") from error
    else:
        timestamp = pd.Timestamp(value)
    if timestamp.tzinfo is not None:
        offset = timestamp.utcoffset()
        if offset != timedelta(0):
            raise TimezoneError(
                f"{value!r} has UTC offset {offset}; all times here are UTC: drop the offset or write 'Z' "
                f"(that instant in UTC is {timestamp.tz_convert('UTC').tz_localize(None).isoformat()})"
            )
        timestamp = timestamp.tz_convert("UTC").tz_localize(None)
    return timestamp


def utc_now() -> pd.Timestamp:
    return pd.Timestamp(datetime.now(UTC)).tz_localize(None)


def whole_seconds(value: timedelta | pd.Timedelta | np.timedelta64) -> int:
    return int(pd.Timedelta(value).total_seconds())
