"""Reading one shard: its raw samples, in order, with damage reported instead of raised.

Shard contract (what a reader may assume, ``docs/CONTRACTS.md``): a shard is a tar whose members are
``<key>.<suffix>`` with the members of one sample adjacent and written in sorted order (depth, mask, meta,
rgb); ``manifest.json`` gives its sample count and sha256.

``iter_shard`` yields raw samples ``{"__key__", "__url__", "rgb.jpg": bytes, ...}`` and never raises for
damaged data; it reports through ``on_skip(reason, shard, detail)``:

* ``corrupt_shard`` -- with ``sha256=`` (the manifest's), a local shard whose bytes differ is skipped whole
  before anything is yielded (``sharding.verify.check_shard``; cached per process and file state);
* ``truncated_shard`` -- the tar ends early or is unreadable part-way: the samples before the damage are
  yielded, a sample whose member data was cut is dropped, the rest is lost; also a shard that ends cleanly
  with fewer samples than ``expected`` (its manifest count).

Addresses go through ``sharding.addresses`` (``pipe:`` refused unless ``allow_pipe=True``); a refused
address raises ``AddressError``, it is the caller's input, not damaged data.

We read the tar with ``tarfile`` in stream mode rather than with webdataset's ``tar_file_expander`` +
``group_by_keys`` stages because those either raise on damage or drop it silently through a handler; here a
damaged shard must end cleanly, keep the complete samples before the damage and be counted once. The
member-name rule is webdataset's own (``base_plus_ext``), so keys match what webdataset would produce.
"""

from __future__ import annotations

import tarfile
from typing import Callable, Iterator

from webdataset.tariterators import base_plus_ext

from .addresses import check_address, is_local, local_path, open_address
from .verify import check_shard

OnSkip = Callable[[str, str, str], None]


def iter_shard(url: str, expected: int | None = None, on_skip: OnSkip | None = None, *,
               sha256: str | None = None, allow_pipe: bool = False) -> Iterator[dict]:
    """Complete raw samples of one shard, in order (see the module docstring for damage and reporting).

    A sample is handed on as soon as the header of the next sample's first member has been read. (Members
    are written in sorted order -- depth, mask, meta, rgb -- so a sample cut after some members lacks its
    rgb or meta and is skipped as ``incomplete_sample`` downstream.)
    """
    check_address(url, allow_pipe=allow_pipe)
    if sha256 is not None and is_local(url):
        problem = check_shard(local_path(url), sha256)
        if problem is not None:
            if on_skip is not None:
                on_skip("corrupt_shard", url, problem)
            return
    n = 0
    current = None
    reading_data = False
    try:
        stream = open_address(url, allow_pipe=allow_pipe)
        try:
            with tarfile.open(fileobj=stream, mode="r|*") as tf:
                for ti in tf:
                    if not ti.isreg():
                        continue
                    prefix, suffix = base_plus_ext(ti.name)
                    if prefix is None:
                        continue
                    if current is not None and prefix != current["__key__"]:
                        done, current = current, None
                        n += 1
                        yield done
                    if current is None:
                        current = {"__key__": prefix, "__url__": url}
                    reading_data = True
                    data = tf.extractfile(ti).read()
                    if len(data) != ti.size:
                        raise tarfile.ReadError(f"member {ti.name} is truncated")
                    reading_data = False
                    current[suffix.lower()] = data
                    tf.members = []  # stream mode: do not keep every header of the shard in memory
        finally:
            stream.close()
    except Exception as exc:  # tarfile.ReadError, EOFError, OSError, ...: the rest of this shard is lost
        if on_skip is not None:
            lost = f"; dropped the partial sample {current['__key__']}" if current and reading_data else ""
            on_skip("truncated_shard", url, f"{type(exc).__name__}: {exc} after {n} samples{lost}")
        if current is not None and not reading_data:  # its members were all read; later checks decide
            yield current
        return
    if current is not None:
        n += 1
        yield current
    if expected is not None and n < expected and on_skip is not None:
        on_skip("truncated_shard", url, f"{n} of {expected} samples (manifest count); the rest are lost")
