"""Which API keys the server accepts at start-up.

An empty key (``--api-key "$KEY"`` with KEY unset) would serve without authentication, and a key with
whitespace or control characters could never be presented: HTTP drops a header's surrounding
whitespace and inner whitespace splits ``Bearer <key>``, so every client would get 401 while the
server looked healthy. Both are refused before anything starts.
"""

from __future__ import annotations


def sendable_key(key: str) -> bool:
    """Whether a client can present ``key`` as ``Authorization: Bearer <key>``: no whitespace, no control
    characters (surrounding whitespace is dropped from headers, inner whitespace splits the value)."""
    return not any(c.isspace() or not c.isprintable() for c in key)


__all__ = ["sendable_key"]
