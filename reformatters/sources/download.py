"""Byte-range downloads of GRIB2 messages that survive flaky and throttling servers.

http(s) goes through one pooled `urllib3.PoolManager` per process (thread-safe, keep-alive, no redirect following
and no retries of its own: `_get_with_retries` backs off);
`s3://`, `gs://`, `file://` and plain local paths go through fsspec's `cat_file(path, start, end)`, so a local or
mirrored archive works as a source root.
"""

from __future__ import annotations

import functools
import logging
import os
import random
import tempfile
import threading
import time
import urllib.request
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import certifi
import fsspec
import urllib3
from pydantic import BaseModel, ConfigDict, Field

from reformatters.sources.errors import SourceNotFoundError, SourceUnreadableError
from reformatters.sources.grib_index import (
    GribIndexParseError,
    GribMessageNotFoundError,
    IndexEntry,
    MergedRange,
    find_message,
    merge_byte_ranges,
    parse_index,
)

log = logging.getLogger("reformatters.sources")

T = TypeVar("T")
R = TypeVar("R")


class SourceFileNotFoundError(SourceNotFoundError):
    """The source file does not exist (yet): 404, or 403 from a bucket without list permission."""


class SourceDownloadError(SourceUnreadableError, OSError):
    """A download failed after all retries (or with a non-retryable answer)."""


class _Retryable(Exception):
    """Internal: a transient failure worth another attempt."""


class DownloadConfig(BaseModel):
    model_config = ConfigDict(frozen=True)

    connect_timeout_seconds: float = 10.0
    read_timeout_seconds: float = 60.0
    max_attempts: int = Field(default=6, ge=1)
    # 404/403 usually mean "not published yet": retrying inside one job rarely helps, the next update will.
    not_found_attempts: int = Field(default=1, ge=1)
    backoff_base_seconds: float = 0.5
    backoff_max_seconds: float = 30.0
    # A gap of 256 KiB costs ~5 ms at ~50 MB/s, less than a request's first-byte latency, but is well below a
    # typical GFS message (~0.8 MB), so merging never drags in whole unwanted fields.
    max_gap_bytes: int = Field(default=256 * 1024, ge=0)
    per_host_concurrency: int = Field(default=16, ge=1)
    requests_per_minute: float | None = None  # NOMADS allows about 120
    cluster_semaphore_name: str | None = None  # a distributed.Semaphore shared by every worker
    cluster_semaphore_max_leases: int = 64


# --------------------------------------------------------------------------------------------------
# Process-wide shared state: HTTP connection pools, per-host concurrency caps and rate limiters

_state_lock = threading.Lock()
_http_pools: dict[tuple[float, float, int, str | None], urllib3.PoolManager] = {}
_host_semaphores: dict[tuple[str, int], threading.BoundedSemaphore] = {}
_rate_limiters: dict[tuple[str, float], _RateLimiter] = {}


class _RateLimiter:
    """Spaces requests to one host at least 60/rpm seconds apart (thread-safe)."""

    def __init__(self, requests_per_minute: float) -> None:
        self.interval = 60.0 / requests_per_minute
        self._next = 0.0
        self._lock = threading.Lock()

    def wait(self) -> None:
        with self._lock:
            now = time.monotonic()
            slot = max(now, self._next)
            self._next = slot + self.interval
        if slot > now:
            time.sleep(slot - now)


def _http_pool(config: DownloadConfig, url: str) -> urllib3.PoolManager:
    """The process's pool for `url`: through the proxy the environment names for it (HTTP_PROXY, HTTPS_PROXY,
    NO_PROXY, as curl and requests read them), else direct."""
    parts = urlsplit(url)
    proxy_settings = tuple(os.environ.get(name) for name in _PROXY_VARIABLES)
    proxy = _proxy_for(parts.scheme, parts.hostname or "", proxy_settings)
    key = (config.connect_timeout_seconds, config.read_timeout_seconds, config.per_host_concurrency, proxy)
    with _state_lock:
        pool = _http_pools.get(key)
        if pool is None:
            settings: dict[str, Any] = {
                "maxsize": config.per_host_concurrency,
                "block": False,
                "timeout": urllib3.Timeout(connect=config.connect_timeout_seconds, read=config.read_timeout_seconds),
                "retries": False,
                # certifi's bundle, not the image's: slim worker images may ship no CA certificates at all.
                "ca_certs": certifi.where(),
            }
            pool = urllib3.ProxyManager(proxy, **settings) if proxy else urllib3.PoolManager(**settings)
            _http_pools[key] = pool
        return pool


# What urllib's proxy lookup reads for http(s) URLs (it takes every *_proxy variable, only these apply here).
_PROXY_VARIABLES = ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "no_proxy", "NO_PROXY")


@functools.lru_cache(maxsize=64)
def _proxy_for(scheme: str, host: str, proxy_settings: tuple[str | None, ...]) -> str | None:
    """The proxy for `scheme://host` under the environment's proxy settings (the cache key): urllib's lookup
    walks the whole environment and cost ~0.5 ms per request."""
    proxy = urllib.request.getproxies().get(scheme)
    if proxy and urllib.request.proxy_bypass(host):
        return None
    return proxy


def _host_slot(url: str, config: DownloadConfig) -> AbstractContextManager[Any]:
    host = urlsplit(url).netloc or "local"
    capped = _capped_host_slot(host)
    key = (host, config.per_host_concurrency)
    with _state_lock:
        sem = _host_semaphores.get(key)
        if sem is None:
            sem = _host_semaphores[key] = threading.BoundedSemaphore(config.per_host_concurrency)
    if capped is None:
        return sem
    # The process's slot first, then the cluster's lease: a thread holding a lease never waits on its process.
    return _both(sem, capped)


@contextmanager
def _both(first: AbstractContextManager[Any], second: AbstractContextManager[Any]) -> Iterator[None]:
    with first, second:
        yield


# --------------------------------------------------------------------------------------------------
# Per-host request caps across the whole cluster
#
# A source host that slows down past some number of parallel requests per client (the ECMWF bucket: about 8) is
# declared with its cap (`declare_host_request_caps`, called by the kernels with `RegionJob.source_request_caps()`,
# or `REFORMATTERS_HOST_REQUEST_CAPS="host=N,host:port=N"`, which wins). Every request to it then holds a lease of a
# `distributed.Semaphore` named after the host, shared by every worker of the cluster; a process without a
# distributed client (a plain script, the synchronous scheduler) holds a process-local semaphore of the same size.

HOST_REQUEST_CAPS_ENV = "REFORMATTERS_HOST_REQUEST_CAPS"
_declared_caps: dict[str, int] = {}
# host -> (cap, id of the worker or client it is bound to, the semaphore every request to the host holds)
_cap_semaphores: dict[str, tuple[int, int | None, Any]] = {}


class HostRequestCapError(ValueError):
    """A request cap declaration that cannot be used."""


def parse_host_request_caps(text: str) -> dict[str, int]:
    """`host=N` pairs separated by commas or spaces (`data.ecmwf.int=8,127.0.0.1:8080=3`)."""
    caps: dict[str, int] = {}
    for item in text.replace(",", " ").split():
        host, _, number = item.rpartition("=")
        if not host or not number.isdigit() or int(number) < 1:
            raise HostRequestCapError(
                f"{HOST_REQUEST_CAPS_ENV}: expected host=N with N >= 1 (e.g. data.ecmwf.int=8), found {item!r}"
            )
        caps[host] = int(number)
    return caps


@functools.lru_cache(maxsize=8)
def _caps_from_environment(text: str) -> dict[str, int]:
    return parse_host_request_caps(text)


def host_request_cap(host: str) -> int | None:
    """The cap on parallel requests to `host` across the cluster, or None: the environment's, else declared."""
    from_env = _caps_from_environment(os.environ.get(HOST_REQUEST_CAPS_ENV, ""))
    if host in from_env:
        return from_env[host]
    return _declared_caps.get(host)


def declare_host_request_caps(caps: Mapping[str, int]) -> None:
    """Declare per-host caps in this process and bind their semaphores. Call it in a task's own thread (the
    kernels do): a distributed client is found there, and threads the task starts use what was bound."""
    for host, cap in caps.items():
        if cap < 1:
            raise HostRequestCapError(f"request cap of {host} must be at least 1, got {cap}")
        with _state_lock:
            _declared_caps[host] = cap
    for host in {*caps, *_caps_from_environment(os.environ.get(HOST_REQUEST_CAPS_ENV, ""))}:
        _bind_cap_semaphore(host)


def _distributed_context() -> Any | None:
    """This thread's Dask worker, else the process's default distributed client, else None."""
    try:
        from distributed import get_client, get_worker
    except ImportError:
        return None
    try:
        return get_worker()
    except ValueError:
        pass
    try:
        return get_client()
    except ValueError:
        return None


def _bind_cap_semaphore(host: str, *, rebind: bool = True) -> tuple[int, int | None, Any] | None:
    """(cap, id of the worker or client it is bound to, semaphore) for `host`, bound now if it was not (or, with
    `rebind`, if this thread sees another worker or client than the one it was bound to)."""
    cap = host_request_cap(host)
    if cap is None:
        return None
    with _state_lock:
        held = _cap_semaphores.get(host)
    if held is not None and held[0] == cap and not rebind:
        return held
    context = _distributed_context()
    context_id = None if context is None else id(context)
    # A thread that sees no worker (one a task started) never trades a cluster-wide semaphore for a local one.
    if held is not None and held[0] == cap and (not rebind or held[1] == context_id or context_id is None):
        return held
    if context is None:
        semaphore: Any = _LocalCap(cap)
    else:
        from distributed import Semaphore

        # Bound here to this thread's worker (or client) and its event loop; any thread of the process may use it.
        semaphore = Semaphore(max_leases=cap, name=f"reformatters-host-requests/{host}")
    bound = (cap, context_id, semaphore)
    with _state_lock:
        _cap_semaphores[host] = bound
    return bound


class _LocalCap:
    """The fallback without a distributed client: the cap within this process."""

    def __init__(self, cap: int) -> None:
        self._semaphore = threading.BoundedSemaphore(cap)

    def __enter__(self) -> None:
        self._semaphore.acquire()

    def __exit__(self, *exc: object) -> None:
        self._semaphore.release()


def _capped_host_slot(host: str) -> AbstractContextManager[Any] | None:
    bound = _bind_cap_semaphore(host, rebind=False)
    return None if bound is None else _lease(bound[2])


@contextmanager
def _lease(semaphore: Any) -> Iterator[None]:
    if isinstance(semaphore, _LocalCap):
        with semaphore:
            yield
        return
    semaphore.acquire()
    try:
        yield
    finally:
        semaphore.release()


def _rate_limit(url: str, config: DownloadConfig) -> None:
    if config.requests_per_minute is None:
        return
    key = (urlsplit(url).netloc or "local", config.requests_per_minute)
    with _state_lock:
        limiter = _rate_limiters.get(key)
        if limiter is None:
            limiter = _rate_limiters[key] = _RateLimiter(config.requests_per_minute)
    limiter.wait()


def _cluster_slot(config: DownloadConfig) -> AbstractContextManager[Any]:
    if config.cluster_semaphore_name is None:
        return nullcontext()
    from distributed import Semaphore  # only when asked: needs a running distributed client

    return Semaphore(max_leases=config.cluster_semaphore_max_leases, name=config.cluster_semaphore_name)


def _is_http(url: str) -> bool:
    return url.startswith(("http://", "https://"))


# --------------------------------------------------------------------------------------------------
# One request


def _http_get(url: str, start: int | None, end: int | None, config: DownloadConfig) -> bytes:
    """GET (a range of) url; `end` exclusive, None = to EOF.

    Raises _Retryable, SourceFileNotFoundError or SourceDownloadError.
    """
    headers = {}
    if start is not None:
        headers["Range"] = f"bytes={start}-" if end is None else f"bytes={start}-{end - 1}"
    try:
        # Returns with the body read and the connection back in the pool (or discarded, on error) whatever the status.
        response = _http_pool(config, url).request(
            "GET", url, headers=headers, redirect=False, retries=False, preload_content=True
        )
    except urllib3.exceptions.LocationValueError:  # a malformed URL: no attempt will do better
        raise
    except urllib3.exceptions.NewConnectionError as e:  # refused, DNS: a ConnectTimeoutError subclass in urllib3 2
        raise _Retryable(f"connection error: {type(e).__name__}: {e}") from e
    except urllib3.exceptions.TimeoutError as e:
        raise _Retryable(f"timeout ({type(e).__name__})") from e
    except urllib3.exceptions.HTTPError as e:  # reset, incomplete body (fewer bytes than Content-Length), TLS, ...
        raise _Retryable(f"connection error: {type(e).__name__}: {e}") from e
    status = response.status
    if status in (403, 404):
        raise SourceFileNotFoundError(f"{url}: HTTP {status} (file missing or not yet published)")
    if status in (301, 302, 303, 307, 308):
        raise _Retryable(f"HTTP {status} redirect to {response.headers.get('location')!r} (throttling)")
    if status == 429 or status >= 500:
        raise _Retryable(f"HTTP {status}")
    if status not in (200, 206):
        raise SourceDownloadError(f"{url}: unexpected HTTP {status}: {response.data[:200].decode(errors='replace')!r}")
    body = response.data
    declared = response.headers.get("content-length")
    if declared is not None and int(declared) != len(body):
        raise _Retryable(f"short body: {len(body)} of {declared} bytes")
    if start is None:
        return body
    if status == 200:  # server ignored the Range header: fine if this is the whole object, else an error page
        if len(body) < (start + 1 if end is None else end):
            ctype = response.headers.get("content-type", "?")
            raise _Retryable(f"body is not GRIB: HTTP 200 with {len(body)} bytes of {ctype} to a range request")
        return body[start:] if end is None else body[start:end]
    content_range = response.headers.get("content-range", "")
    if not content_range.startswith(f"bytes {start}-"):
        raise _Retryable(f"206 with Content-Range {content_range!r}, expected it to start at {start}")
    if end is not None and len(body) != end - start:
        raise _Retryable(f"range body has {len(body)} bytes, expected {end - start}")
    return body


def _fsspec_get(url: str, start: int | None, end: int | None) -> bytes:
    try:
        fs, path = fsspec.core.url_to_fs(url)
        data: bytes = fs.cat_file(path, start=start, end=end)
    except FileNotFoundError as e:
        raise SourceFileNotFoundError(f"{url}: not found ({e})") from e
    except PermissionError as e:  # S3 without list permission answers 403 for a missing key
        raise SourceFileNotFoundError(f"{url}: access denied, treated as missing ({e})") from e
    except OSError as e:
        raise _Retryable(f"{type(e).__name__}: {e}") from e
    if start is not None and end is not None and len(data) != end - start:
        raise _Retryable(f"read {len(data)} bytes, expected {end - start}")
    return data


def _get_with_retries(
    url: str,
    start: int | None,
    end: int | None,
    config: DownloadConfig,
    validate: Callable[[bytes], str | None] | None = None,
) -> bytes:
    """Fetch with exponential backoff and full jitter; `validate` returns a reason to retry or None."""
    what = url if start is None else f"{url} [bytes {start}-{'' if end is None else end - 1}]"
    not_found = 0
    reason = ""
    for attempt in range(1, config.max_attempts + 1):
        try:
            with _cluster_slot(config), _host_slot(url, config):
                _rate_limit(url, config)
                data = _http_get(url, start, end, config) if _is_http(url) else _fsspec_get(url, start, end)
            if validate is not None and (problem := validate(data)) is not None:
                raise _Retryable(problem)
            return data
        except SourceFileNotFoundError:
            not_found += 1
            if not_found >= config.not_found_attempts:
                log.debug("source file not found: %s", what)
                raise
            reason = "not found"
        except _Retryable as e:
            reason = str(e)
        if attempt < config.max_attempts:
            delay = random.uniform(0, min(config.backoff_max_seconds, config.backoff_base_seconds * 2 ** (attempt - 1)))
            log.info(
                "retrying %s after attempt %d/%d failed: %s (sleep %.3fs)",
                what,
                attempt,
                config.max_attempts,
                reason,
                delay,
            )
            time.sleep(delay)
    log.error("giving up on %s after %d attempts: %s", what, config.max_attempts, reason)
    raise SourceDownloadError(f"{what}: failed after {config.max_attempts} attempts; last error: {reason}")


# --------------------------------------------------------------------------------------------------
# Public API


def fetch_bytes(
    url: str, byte_range: tuple[int, int | None] | None = None, *, config: DownloadConfig | None = None
) -> bytes:
    """Whole object, or `byte_range=(start, end_exclusive_or_None)` of it, with retries."""
    config = config or DownloadConfig()
    if byte_range is None:
        return _get_with_retries(url, None, None, config)
    return _get_with_retries(url, byte_range[0], byte_range[1], config)


class IndexCache:
    """Inventories by URL (parsed, with their text), the most recent `capacity` of them and at most `max_lines`
    inventory lines together (the newest is kept whatever its size), for this process.

    Inventories of published files never change. Downloads that fetch one variable at a time ask for the same
    inventory once per variable; this keeps it to once per worker. A missing inventory is remembered for
    `not_found_seconds` only: the file may be published by the time a later task (or the next update) asks.
    Each line is held as an entry and as text: an ECMWF step file's index lists every member's messages, so
    `max_lines` bounds the memory whatever the producer lists (an inventory pushed out is fetched again if asked for).
    """

    def __init__(self, capacity: int = 256, not_found_seconds: float = 30.0, max_lines: int = 65_536) -> None:
        self._capacity = capacity
        self._max_lines = max_lines
        self._lines = 0
        self.not_found_seconds = not_found_seconds
        self._entries: OrderedDict[str, tuple[list[IndexEntry], str | None] | tuple[float, str]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, url: str) -> list[IndexEntry] | None:
        """The entries, None if unknown; raises SourceFileNotFoundError if recently found missing."""
        with self._lock:
            cached = self._lookup(url)
            if cached is None:
                return None
            if isinstance(cached[0], list):
                return cached[0]
            raise SourceFileNotFoundError(cached[1])

    def known(self, url: str) -> bool:
        """Whether `get` would answer without a request."""
        with self._lock:
            return self._lookup(url) is not None

    def text(self, url: str) -> str | None:
        """The inventory's text, if it is cached with it."""
        with self._lock:
            cached = self._lookup(url)
            return cached[1] if cached is not None and isinstance(cached[0], list) else None

    def _lookup(self, url: str) -> tuple[list[IndexEntry], str | None] | tuple[float, str] | None:
        cached = self._entries.get(url)
        if cached is None:
            return None
        self._entries.move_to_end(url)
        if isinstance(cached[0], float) and time.monotonic() >= cached[0]:
            self._drop(url)
            return None
        return cached

    def _drop(self, url: str) -> None:
        held = self._entries.pop(url)
        if isinstance(held[0], list):
            self._lines -= len(held[0])

    def put(self, url: str, entries: list[IndexEntry], text: str | None = None) -> None:
        self._store(url, (entries, text))

    def put_missing(self, url: str, reason: str, *, seen_seconds_ago: float = 0.0) -> None:
        self._store(url, (time.monotonic() + self.not_found_seconds - seen_seconds_ago, reason))

    def _store(self, url: str, value: tuple[list[IndexEntry], str | None] | tuple[float, str]) -> None:
        with self._lock:
            if url in self._entries:
                self._drop(url)
            self._entries[url] = value
            if isinstance(value[0], list):
                self._lines += len(value[0])
            while len(self._entries) > 1 and (len(self._entries) > self._capacity or self._lines > self._max_lines):
                self._drop(next(iter(self._entries)))

    @property
    def lines(self) -> int:
        """The inventory lines held."""
        return self._lines

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._lines = 0


INDEX_CACHE = IndexCache()


def fetch_index(
    idx_url: str, *, config: DownloadConfig | None = None, cache: IndexCache = INDEX_CACHE
) -> list[IndexEntry]:
    """The parsed inventory (NCEP `.idx` or ECMWF JSON lines) at `idx_url`, fetched once per process: threads
    asking for the same one at once (an ECMWF step file's members, downloaded side by side) wait for one request."""
    entries = cache.get(idx_url)
    if entries is not None:
        return entries
    with _index_fetch_lock(idx_url):
        return _fetch_index_once(idx_url, config, cache)


_index_fetch_locks: dict[str, tuple[threading.Lock, int]] = {}


@contextmanager
def _index_fetch_lock(url: str) -> Iterator[None]:
    with _state_lock:
        lock, users = _index_fetch_locks.get(url, (threading.Lock(), 0))
        _index_fetch_locks[url] = (lock, users + 1)
    try:
        with lock:
            yield
    finally:
        with _state_lock:
            lock, users = _index_fetch_locks[url]
            if users == 1:
                del _index_fetch_locks[url]
            else:
                _index_fetch_locks[url] = (lock, users - 1)


def _fetch_index_once(idx_url: str, config: DownloadConfig | None, cache: IndexCache) -> list[IndexEntry]:
    entries = cache.get(idx_url)  # another thread may have fetched it (or found it missing) while this one waited
    if entries is None:
        try:
            data = fetch_bytes(idx_url, config=config)
        except SourceFileNotFoundError as error:
            cache.put_missing(idx_url, str(error))
            raise
        try:
            text = data.decode()
            entries = parse_index(text)
        except UnicodeDecodeError as error:
            raise GribIndexParseError(f"{idx_url}: the inventory is not UTF-8 text ({error})") from None
        except GribIndexParseError as error:
            raise GribIndexParseError(f"{idx_url}: {error}") from None
        cache.put(idx_url, entries, text)
    return entries


@dataclass(frozen=True)
class FetchedIndexes:
    """Inventories one task fetched for the downloads of a batch of files, to be handed to each download task.

    `texts` by URL; `missing` maps a URL answered not-found to (reason, wall-clock time of the answer). A URL
    that failed otherwise is in neither: each download then fetches it itself, with its own retries.
    """

    texts: dict[str, str]
    missing: dict[str, tuple[str, float]]


def prefetch_indexes(
    urls: Sequence[str], *, config: DownloadConfig | None = None, cache: IndexCache = INDEX_CACHE
) -> FetchedIndexes:
    """Fetch the inventories at `urls` (in parallel, one attempt each) into `cache`, and return them to hand on."""
    config = (config or DownloadConfig()).model_copy(update={"max_attempts": 1})
    texts: dict[str, str] = {}
    missing: dict[str, tuple[str, float]] = {}

    def fetch(url: str) -> None:
        try:
            fetch_index(url, config=config, cache=cache)
        except SourceFileNotFoundError as error:
            missing[url] = (str(error), time.time())
        except (SourceDownloadError, GribIndexParseError):
            return  # each download that needs it tries again and fails its own file
        else:
            if (text := cache.text(url)) is not None:
                texts[url] = text

    _in_parallel(fetch, list(dict.fromkeys(urls)), config.per_host_concurrency)
    return FetchedIndexes(texts, missing)


def seed_indexes(fetched: FetchedIndexes, cache: IndexCache = INDEX_CACHE) -> None:
    """Put inventories another task fetched into this process's cache, where `fetch_index` finds them."""
    for url, text in fetched.texts.items():
        if not cache.known(url):
            cache.put(url, parse_index(text), text)
    now = time.time()
    for url, (reason, seen_at) in fetched.missing.items():
        seen_seconds_ago = max(0.0, now - seen_at)
        if seen_seconds_ago < cache.not_found_seconds and not cache.known(url):
            cache.put_missing(url, reason, seen_seconds_ago=seen_seconds_ago)


def grib_problem(data: bytes) -> str | None:
    """Why `data` is not one or more whole GRIB messages, or None if it looks right."""
    if data[:4] != b"GRIB":
        return f"body is not GRIB (starts with {data[:16]!r})"
    if data[-4:] != b"7777":
        return f"GRIB body does not end with '7777' (ends with {data[-8:]!r}); truncated or corrupt"
    return None


def _split_checked(rng: MergedRange) -> Callable[[bytes], str | None]:
    def validate(data: bytes) -> str | None:
        if rng.end is not None and len(data) != rng.end - rng.start:
            return f"got {len(data)} bytes, expected {rng.end - rng.start}"
        for key, part in rng.split(data).items():
            if (problem := grib_problem(part)) is not None:
                return f"message {key!r}: {problem}"
        return None

    return validate


def fetch_grib_messages(
    file_url: str,
    idx_url: str,
    wanted: Mapping[str, tuple[str, str, str]],
    *,
    config: DownloadConfig | None = None,
) -> dict[str, bytes]:
    """Download only the messages `wanted` ({key: (element, level, step)}) of a GRIB2 file.

    The inventory (NCEP `.idx` or ECMWF JSON lines, detected) gives byte ranges; ranges closer than
    `config.max_gap_bytes` are merged and each merged range is fetched with its own single-range request (S3 answers
    multi-range requests with the whole object), in parallel. Returns {key: message bytes}, each `GRIB`…`7777`.
    Raises SourceFileNotFoundError, SourceDownloadError, GribMessageNotFoundError.
    """
    config = config or DownloadConfig()
    entries = fetch_index(idx_url, config=config)
    selected = {key: find_message(entries, el, lev, step, source=idx_url) for key, (el, lev, step) in wanted.items()}
    return fetch_message_ranges(file_url, selected, config=config)


def fetch_message_ranges(
    file_url: str, selected: Mapping[str, IndexEntry], *, config: DownloadConfig | None = None
) -> dict[str, bytes]:
    """The messages at `selected` byte ranges ({key: entry}) of a file: ranges closer than `config.max_gap_bytes`
    merged, one single-range request per merged range, in parallel; each message checked to be `GRIB`...`7777`."""
    config = config or DownloadConfig()
    ranges = merge_byte_ranges(dict(selected), config.max_gap_bytes)

    def fetch(rng: MergedRange) -> dict[str, bytes]:
        data = _get_with_retries(file_url, rng.start, rng.end, config, validate=_split_checked(rng))
        return rng.split(data)

    out: dict[str, bytes] = {}
    for parts in _in_parallel(fetch, ranges, config.per_host_concurrency):
        out.update(parts)
    return {key: out[key] for key in selected}


def fetch_available_grib_messages(
    file_url: str,
    idx_url: str,
    wanted: Mapping[str, tuple[str, str, str]],
    *,
    config: DownloadConfig | None = None,
) -> dict[str, bytes]:
    """The `wanted` messages the inventory lists: a message it does not list is left out and costs the others
    nothing. The inventory is fetched even when nothing is wanted (windowed variables at lead 0): it proves the
    file is published, so a source file counts as read only where the source has it.
    Raises SourceFileNotFoundError and SourceDownloadError."""
    config = config or DownloadConfig()
    entries = fetch_index(idx_url, config=config)
    available = {}
    for key, (element, level, step) in wanted.items():
        try:
            find_message(entries, element, level, step, source=idx_url)
        except GribMessageNotFoundError:
            continue
        available[key] = (element, level, step)
    return fetch_grib_messages(file_url, idx_url, available, config=config) if available else {}


def _in_parallel(function: Callable[[T], R], items: Sequence[T], concurrency: int) -> list[R]:
    """`function` over `items` in order, on up to `concurrency` threads when there is more than one item."""
    if len(items) <= 1:
        return [function(item) for item in items]
    with ThreadPoolExecutor(max_workers=min(len(items), concurrency)) as pool:
        return list(pool.map(function, items))


def write_atomic(path: Path | str, data: bytes) -> None:
    """Write via a temp file in the same directory then `os.replace`: readers never see a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def download_file(
    url: str, path: Path | str, *, config: DownloadConfig | None = None, require_grib: bool = False
) -> Path:
    """Download a whole object to `path` atomically (nothing is left on disk on failure)."""
    config = config or DownloadConfig()
    data = _get_with_retries(url, None, None, config, validate=grib_problem if require_grib else None)
    write_atomic(path, data)
    return Path(path)
