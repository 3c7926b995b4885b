"""A loopback stand-in for Sentry's ingestion endpoint: accepts envelopes as the real SDK sends them (gzip,
deflate or brotli encoded), parses them into items and keeps every request's decoded bytes."""

from __future__ import annotations

import gzip
import json
import threading
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class EnvelopeItem:
    type: str
    payload: dict[str, Any]


@dataclass
class SentryIngest:
    port: int = 0
    items: list[EnvelopeItem] = field(default_factory=list)
    raw: list[bytes] = field(default_factory=list)

    @property
    def dsn(self) -> str:
        return f"http://publickey@127.0.0.1:{self.port}/1"

    def of_type(self, item_type: str) -> list[dict[str, Any]]:
        return [item.payload for item in self.items if item.type == item_type]


def decode_body(body: bytes, encoding: str) -> bytes:
    if encoding == "gzip":
        return gzip.decompress(body)
    if encoding == "deflate":
        return zlib.decompress(body)
    if encoding == "br":
        import brotli

        return bytes(brotli.decompress(body))
    return body


def parse_envelope(data: bytes) -> list[EnvelopeItem]:
    """Envelope: a header line, then items, each a header line and a payload (`length` bytes, or one line)."""
    _, _, rest = data.partition(b"\n")
    items = []
    while rest.strip():
        header_line, _, rest = rest.partition(b"\n")
        header = json.loads(header_line)
        if "length" in header:
            payload, rest = rest[: header["length"]], rest[header["length"] :].removeprefix(b"\n")
        else:
            payload, _, rest = rest.partition(b"\n")
        try:
            parsed = json.loads(payload) if payload else {}
        except ValueError:
            parsed = {"raw": payload.decode(errors="replace")}
        items.append(EnvelopeItem(header.get("type", ""), parsed))
    return items


@contextmanager
def sentry_ingest() -> Iterator[SentryIngest]:
    ingest = SentryIngest()
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            data = decode_body(body, self.headers.get("Content-Encoding", ""))
            with lock:
                ingest.raw.append(data)
                if self.path.rstrip("/").endswith("/envelope"):
                    ingest.items.extend(parse_envelope(data))
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    ingest.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield ingest
    finally:
        server.shutdown()
        server.server_close()
