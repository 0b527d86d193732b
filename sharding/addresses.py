"""Shard addresses: which strings may name a shard, and how one is opened.

Contract
--------
A shard address is one of

* a **local path** (``data/train-000000.tar``; also ``file:///abs/path.tar``), opened with ``open()``;
* a **remote URL** with one of ``REMOTE_SCHEMES``: ``http``/``https`` (and ``sftp``, ``ftps``, ``scp``) are
  fetched by ``curl``, ``gs`` by ``gsutil``, ``hf`` by ``curl`` on the Hugging Face hub, ``ais`` by ``ais``.
  These are webdataset's own openers, which start their program with an argument list, never through a
  shell; we call them directly rather than through ``webdataset.gopen`` so that its ``GOPEN_REWRITE``
  environment rules cannot turn an address into a shell command;
* ``pipe:<shell command>`` -- **refused** unless the caller passes ``allow_pipe=True``: webdataset runs the
  command with ``shell=True``, so an address taken from a config file would otherwise run arbitrary commands.

Anything else (``-`` for stdin, an unknown ``scheme://``) is refused. A refusal raises
``AddressError``, a ``sharding.cli.UserError`` naming the address.
"""

from __future__ import annotations

import os
import re
from typing import IO

from .cli import UserError

REMOTE_SCHEMES = ("http", "https", "sftp", "ftps", "scp", "gs", "hf", "ais")
_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")


class AddressError(UserError, ValueError):
    """A shard address that may not be opened (a ``pipe:`` without ``allow_pipe``, an unknown scheme)."""


def scheme(url: str) -> str:
    """``"local"``, ``"pipe"``, ``"file"`` or the remote scheme of ``url`` (lower case)."""
    url = os.fspath(url)
    if url.startswith("pipe:"):
        return "pipe"
    m = _SCHEME_RE.match(url)
    if m is None or ("://" not in url and m.group(1).lower() not in REMOTE_SCHEMES + ("file",)):
        return "local"  # a plain path (which may contain ':' further on)
    return m.group(1).lower()


def is_local(url: str) -> bool:
    """True for a path on this machine (plain or ``file://``)."""
    return scheme(url) in ("local", "file")


def local_path(url: str) -> str:
    """The filesystem path of a local address (``file://`` stripped)."""
    url = os.fspath(url)
    return re.sub(r"^file://?", "", url) if scheme(url) == "file" else url


def check_address(url: str, *, allow_pipe: bool = False) -> str:
    """Return ``url`` if it may be opened, else raise ``AddressError`` naming it and saying why."""
    url = os.fspath(url)
    s = scheme(url)
    if url == "-":
        raise AddressError("shard address '-' (stdin) is not accepted; pass a file path or an http(s) URL")
    if s == "pipe":
        if allow_pipe:
            return url
        raise AddressError(f"shard address {url!r} is a shell command (pipe:); refused. Use a local path or an "
                           f"http(s) URL, or pass allow_pipe=True (config: data.allow_pipe=true) if you trust "
                           f"where this address comes from")
    if s in ("local", "file") or s in REMOTE_SCHEMES:
        return url
    raise AddressError(f"shard address {url!r} has the unsupported scheme {s!r}; accepted: local paths, file://, "
                       f"{', '.join(f'{x}://' for x in REMOTE_SCHEMES)}")


def open_address(url: str, *, allow_pipe: bool = False) -> IO[bytes]:
    """Open a shard for binary reading after ``check_address`` (local files with ``open``, remote URLs with
    webdataset's shell-free opener for the scheme, ``pipe:`` with webdataset's pipe only when allowed)."""
    check_address(url, allow_pipe=allow_pipe)
    s = scheme(url)
    if s in ("local", "file"):
        return open(local_path(url), "rb")
    from webdataset.gopen import gopen_ais, gopen_curl, gopen_gsutil, gopen_hf, gopen_pipe

    if s == "pipe":
        return gopen_pipe(url, "rb")
    opener = {"gs": gopen_gsutil, "hf": gopen_hf, "ais": gopen_ais}.get(s, gopen_curl)
    return opener(url, "rb")
