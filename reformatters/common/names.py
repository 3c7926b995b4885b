"""Names that must fit a length limit (Kubernetes names, Sentry monitor slugs), shortened deterministically."""

from __future__ import annotations

import hashlib

HASH_LENGTH = 8


def fit(prefix: str, middle: str, suffix: str, limit: int) -> str:
    """`prefix + middle + suffix` if it fits `limit`; else `middle` cut and 8 hex digits of the full name's hash
    put after it, prefix and suffix kept: distinct full names stay distinct, the same name always gives the same."""
    name = f"{prefix}{middle}{suffix}"
    if len(name) <= limit:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:HASH_LENGTH]
    room = limit - len(prefix) - len(suffix) - len(digest) - 1
    if room < 0:
        raise ValueError(
            f"{name!r} cannot be shortened to {limit} characters: {prefix!r} and {suffix!r} alone take "
            f"{len(prefix) + len(suffix)}; shorten them"
        )
    cut = middle[:room].rstrip("-")
    return f"{prefix}{cut}-{digest}{suffix}" if cut else f"{prefix}{digest}{suffix}"


def shorten(name: str, limit: int) -> str:
    """`name` if it fits, else its first characters and 8 hex digits of its hash."""
    return fit("", name, "", limit)
