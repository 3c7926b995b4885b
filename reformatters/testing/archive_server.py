"""Loopback HTTP server for a local archive, with byte ranges and on-demand fault injection.

with ArchiveServer(root) as server:
    server.add_fault("*.f007", "status", status=503, times=2)
    urllib3.request("GET", server.url_for("gfs.20250801/00/atmos/gfs.t00z.pgrb2.0p25.f007"))
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import os
import re
import socket
import stat
import threading
import time
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Literal
from urllib.parse import unquote, urlsplit

FaultKind = Literal["status", "delay", "truncate", "html200", "redirect302", "corrupt"]
THROTTLE_PATH = "/throttle.html"
_HTML = b"<html><head><title>Error</title></head><body><h1>Service temporarily unavailable</h1></body></html>\n"


@dataclass
class Fault:
    pattern: str  # fnmatch pattern on the path relative to the root (no leading slash)
    kind: FaultKind
    times: int | None = None  # remaining injections; None = forever
    status: int = 503
    delay_seconds: float = 0.0

    def matches(self, rel: str) -> bool:
        return fnmatch.fnmatchcase(rel, self.pattern)


_RANGE_RE = re.compile(r"^\s*(\d*)\s*-\s*(\d*)\s*$")


def parse_range_header(header: str, size: int) -> list[tuple[int, int]] | None:
    """`bytes=a-b,c-,-n` → inclusive (start, end) pairs clipped to the size; None if unsatisfiable/invalid."""
    if not header.startswith("bytes="):
        return None
    out: list[tuple[int, int]] = []
    for part in header[len("bytes=") :].split(","):
        m = _RANGE_RE.match(part)
        if not m or (not m.group(1) and not m.group(2)):
            return None
        if not m.group(1):  # suffix: last n bytes
            n = int(m.group(2))
            if n == 0:
                return None
            out.append((max(size - n, 0), size - 1))
            continue
        start = int(m.group(1))
        end = int(m.group(2)) if m.group(2) else size - 1
        if start >= size or end < start:
            return None
        out.append((start, min(end, size - 1)))
    return out


class ArchiveServer:
    """Threaded HTTP server on 127.0.0.1 serving `root`, usable as a context manager."""

    def __init__(
        self, root: Path | str, *, port: int = 0, multipart_ranges: bool = False, missing_as_403: bool = False
    ) -> None:
        self.root = Path(root).resolve()
        self.multipart_ranges = multipart_ranges
        self.missing_as_403 = missing_as_403
        self._lock = threading.Lock()
        self._faults: list[Fault] = []
        self._unpublished: dict[str, float | None] = {}  # pattern -> publish time (epoch) or None = until publish()
        self.requests: Counter[str] = Counter()
        self.bytes_sent: Counter[str] = Counter()
        self.statuses: Counter[tuple[str, int]] = Counter()
        # Requests being answered at once: from the request line read to the response started (the client holds
        # its connection at least that long, so a client-side cap bounds this), and the most seen.
        self.in_flight = 0
        self.max_in_flight = 0
        self._httpd = ThreadingHTTPServer(("127.0.0.1", port), _make_handler(self))
        self._httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    # lifecycle ---------------------------------------------------------------------------------
    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url_for(self, rel_path: str) -> str:
        return f"{self.url}/{rel_path.lstrip('/')}"

    def start(self) -> ArchiveServer:
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, args=(0.05,), name="archive-server", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> ArchiveServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # faults ------------------------------------------------------------------------------------
    def add_fault(
        self,
        pattern: str,
        kind: FaultKind,
        *,
        times: int | None = None,
        status: int = 503,
        delay_seconds: float = 0.0,
    ) -> Fault:
        fault = Fault(pattern, kind, times, status, delay_seconds)
        with self._lock:
            self._faults.append(fault)
        return fault

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()
            self._unpublished.clear()

    def unpublish(self, pattern: str, until: float | None = None) -> None:
        """Answer 404 for matching paths until `until` (epoch seconds) or until `publish` is called."""
        with self._lock:
            self._unpublished[pattern] = until

    def publish(self, pattern: str) -> None:
        with self._lock:
            self._unpublished.pop(pattern, None)

    def reset_counters(self) -> None:
        with self._lock:
            self.max_in_flight = self.in_flight
            self.requests.clear()
            self.bytes_sent.clear()
            self.statuses.clear()

    # used by the handler -----------------------------------------------------------------------
    def _is_unpublished(self, rel: str) -> bool:
        now = time.time()
        with self._lock:
            for pattern, until in list(self._unpublished.items()):
                if until is not None and now >= until:
                    del self._unpublished[pattern]
                elif fnmatch.fnmatchcase(rel, pattern):
                    return True
        return False

    def _take_fault(self, rel: str) -> Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.matches(rel) and (fault.times is None or fault.times > 0):
                    if fault.times is not None:
                        fault.times -= 1
                    return fault
        return None

    def _enter(self) -> None:
        with self._lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)

    def _leave(self) -> None:
        with self._lock:
            self.in_flight -= 1

    def _count(self, rel: str, nbytes: int = 0, status: int | None = None, request: bool = False) -> None:
        with self._lock:
            if request:
                self.requests[rel] += 1
            self.bytes_sent[rel] += nbytes
            if status is not None:
                self.statuses[(rel, status)] += 1


def _regular_file(root: Path, rel: str) -> tuple[Path, int] | None:
    """The path and size of the regular file `rel` names under `root`, or None: one stat per request
    (a resolve() walks every path component); names climbing out of `root` are refused."""
    normal = os.path.normpath(rel)
    if normal in (".", "..") or normal.startswith(("../", "/")):
        return None
    path = root / normal
    try:
        info = path.stat()
    except OSError:
        return None
    return (path, info.st_size) if stat.S_ISREG(info.st_mode) else None


def _read_range(path: Path, start: int, stop: int) -> bytes:
    with path.open("rb") as file:
        file.seek(start)
        return file.read(stop - start)


def _make_handler(server: ArchiveServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        # Headers and body go out in separate sends: with Nagle's algorithm on, loopback's delayed ACK stalls
        # each response ~40 ms (a run of 404s took 45 ms apiece), which no real object store does.
        disable_nagle_algorithm = True
        server_version = "ArchiveServer/1"

        def log_message(self, format: str, *args: object) -> None:
            pass

        def do_HEAD(self) -> None:
            self._answer(head=True)

        def do_GET(self) -> None:
            self._answer(head=False)

        def _answer(self, head: bool) -> None:
            self._in_flight = True
            server._enter()
            try:
                self._serve(head)
            finally:
                self._left()

        def send_response(self, code: int, message: str | None = None) -> None:
            self._left()  # before the first byte of the answer: the client cannot have let go of the request yet
            super().send_response(code, message)

        def _left(self) -> None:
            if getattr(self, "_in_flight", False):
                self._in_flight = False
                server._leave()

        def _simple(
            self, rel: str, status: int, body: bytes, ctype: str = "text/plain", head: bool = False, **headers: str
        ) -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            for k, v in headers.items():
                self.send_header(k.replace("_", "-"), v)
            self.end_headers()
            server._count(rel, 0 if head else len(body), status)
            if not head:
                self.wfile.write(body)

        def _serve(self, head: bool) -> None:
            rel = unquote(urlsplit(self.path).path).lstrip("/")
            server._count(rel, request=True)
            if "/" + rel == THROTTLE_PATH:
                self._simple(rel, 200, _HTML, "text/html", head)
                return
            fault = server._take_fault(rel)
            if fault is not None and fault.kind == "delay":
                time.sleep(fault.delay_seconds)
                fault = None
            if fault is not None:
                if fault.kind == "status":
                    self._simple(rel, fault.status, f"injected {fault.status}\n".encode(), head=head, Retry_After="0")
                    return
                if fault.kind == "html200":
                    self._simple(rel, 200, _HTML, "text/html", head)
                    return
                if fault.kind == "redirect302":
                    self._simple(rel, 302, b"", "text/html", head, Location=server.url + THROTTLE_PATH)
                    return

            found = _regular_file(server.root, rel)
            if found is None or server._is_unpublished(rel):
                status = 403 if server.missing_as_403 else 404
                body = (
                    b"<Error><Code>AccessDenied</Code></Error>"
                    if status == 403
                    else b"<Error><Code>NoSuchKey</Code></Error>"
                )
                self._simple(rel, status, body, "application/xml", head)
                return

            path, size = found
            range_header = self.headers.get("Range")
            file_range: tuple[int, int] | None = None  # sent from the file (sendfile) instead of `body`
            body = b""
            status = 200
            headers: dict[str, str] = {"Accept-Ranges": "bytes"}
            ctype = "application/octet-stream"
            if range_header:
                ranges = parse_range_header(range_header, size)
                if ranges is None:
                    self._simple(rel, 416, b"", head=head, Content_Range=f"bytes */{size}")
                    return
                if len(ranges) == 1:
                    a, b = ranges[0]
                    if fault is None:
                        file_range = (a, b + 1)  # ranges are most of the traffic: straight from the file
                    else:
                        body = _read_range(path, a, b + 1)
                    status = 206
                    headers["Content-Range"] = f"bytes {a}-{b}/{size}"
                elif server.multipart_ranges:
                    data = path.read_bytes()
                    boundary = "ArchiveServerBoundary"
                    parts = []
                    for a, b in ranges:
                        parts.append(
                            f"--{boundary}\r\nContent-Type: application/octet-stream\r\n"
                            f"Content-Range: bytes {a}-{b}/{size}\r\n\r\n".encode()
                            + data[a : b + 1]
                            + b"\r\n"
                        )
                    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
                    status = 206
                    ctype = f"multipart/byteranges; boundary={boundary}"
                else:
                    body = path.read_bytes()  # as S3: several ranges → the whole object
            else:
                body = path.read_bytes()

            if fault is not None and fault.kind == "corrupt" and body:
                buf = bytearray(body)
                for i in {0, len(buf) // 2, len(buf) - 1}:
                    buf[i] ^= 0xFF
                body = bytes(buf)

            length = len(body) if file_range is None else file_range[1] - file_range[0]
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(length))
            for k, v in headers.items():
                self.send_header(k, v)
            self.end_headers()
            if head:
                server._count(rel, 0, status)
                return
            if file_range is not None:
                server._count(rel, length, status)
                with path.open("rb") as file:
                    self.connection.sendfile(file, file_range[0], length)
                return
            if fault is not None and fault.kind == "truncate":
                sent = body[: len(body) // 2]
                server._count(rel, len(sent), status)
                self.wfile.write(sent)
                self.wfile.flush()
                self.close_connection = True
                with contextlib.suppress(OSError):
                    self.connection.shutdown(socket.SHUT_RDWR)
                return
            # Count before writing: the client may look at the counters as soon as it has the last byte.
            server._count(rel, len(body), status)
            self.wfile.write(body)

    return Handler


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Serve a local archive over HTTP with byte-range support.")
    parser.add_argument("root", type=Path)
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--multipart", action="store_true", help="answer multi-range requests with multipart/byteranges"
    )
    parser.add_argument("--missing-as-403", action="store_true", help="answer 403 for missing keys (S3 without list)")
    args = parser.parse_args(argv)
    server = ArchiveServer(
        args.root, port=args.port, multipart_ranges=args.multipart, missing_as_403=args.missing_as_403
    )
    print(f"serving {server.root} at {server.url}", flush=True)
    with server:
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
