"""Serve an archive over loopback in its own process, answering counter queries on stdin.

`python3 -m benchmarks.serve ROOT` prints the server's URL on its first line, then reads commands, one a line:
`counters` prints one JSON line `{"bytes": ..., "requests": ...}` (response bodies sent, requests answered),
`reset` clears the counters and prints `ok`; end of input stops the server.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from reformatters.testing.archive_server import ArchiveServer


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("root", type=Path)
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    with ArchiveServer(args.root, port=args.port) as server:
        print(server.url, flush=True)
        for line in sys.stdin:
            command = line.strip()
            if command == "counters":
                counts = {"bytes": sum(server.bytes_sent.values()), "requests": sum(server.requests.values())}
                print(json.dumps(counts), flush=True)
            elif command == "reset":
                server.reset_counters()
                print("ok", flush=True)
            elif command:
                print(json.dumps({"error": f"unknown command {command!r}"}), flush=True)


if __name__ == "__main__":
    main()
