"""Before a run writes anything: does the source answer at all?

A source that answers 404 for a file is normal (not published yet, or never); one that answers nothing
(connection refused, a name that does not resolve, no route) would otherwise cost every download its retries,
for every file of the run. One request per source host, before the first write, tells them apart in seconds.
Only HTTP(S) sources are probed: a local directory or a bucket path without an object is a missing file.
"""

from __future__ import annotations

import socket
import urllib.error
import urllib.request
from collections.abc import Iterable
from urllib.parse import urlsplit

PROBE_TIMEOUT_SECONDS = 10.0


class SourceUnreachableError(ConnectionError):
    pass


def unreachable_reason(url: str, timeout: float = PROBE_TIMEOUT_SECONDS) -> str | None:
    """Why the server of `url` answers nothing, or None when it answers (any HTTP status, 404 included)."""
    request = urllib.request.Request(url, method="HEAD")
    try:
        with urllib.request.urlopen(request, timeout=timeout):
            return None
    except urllib.error.HTTPError:
        return None
    except urllib.error.URLError as error:
        reason = error.reason
        if isinstance(reason, socket.gaierror):
            return f"the name {urlsplit(url).hostname!r} does not resolve ({reason})"
        return f"{type(reason).__name__}: {reason}" if isinstance(reason, BaseException) else str(reason)
    except (TimeoutError, ConnectionError) as error:
        return f"{type(error).__name__}: {error}"


def check_source_reachable(urls: Iterable[str], *, what: str, timeout: float = PROBE_TIMEOUT_SECONDS) -> None:
    """Raise `SourceUnreachableError` if the server of any HTTP(S) URL among `urls` answers nothing; one request
    per host. `what` names the run in the message."""
    probed: set[tuple[str, str]] = set()
    for url in urls:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or (parts.scheme, parts.netloc) in probed:
            continue
        probed.add((parts.scheme, parts.netloc))
        reason = unreachable_reason(url, timeout)
        if reason is not None:
            raise SourceUnreachableError(
                f"{what}: the source at {parts.scheme}://{parts.netloc} answers nothing ({reason}; asked for {url}); "
                "nothing was written. Check the network and --source-url, then run again."
            )
