"""The one way our processes connect to Ray: loopback binding and auth settings live here and nowhere else.

* With an address (an argument, or ``RAY_ADDRESS`` as ``ray job submit`` sets it), join that cluster. Its
  binding is whatever its ``ray start`` chose (``cluster/start_local_head.sh`` binds 127.0.0.1).
* Without one, start a local single-node Ray whose every port is bound to 127.0.0.1:
  ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` and ``_node_ip_address="127.0.0.1"`` (without them Ray picks a
  non-loopback node address and listens on all interfaces), no dashboard, and token auth off
  (``RAY_AUTH_MODE=disabled``: a loopback-only cluster of one user; Ray 2.60 otherwise writes
  ``~/.ray/auth_token``). A user's own ``RAY_AUTH_MODE`` is kept.

``connect`` returns True when it started Ray here, so the caller knows it must shut it down (and must not
shut down a cluster it only joined).
"""

from __future__ import annotations

import os
from typing import Any


def connect(address: str | None = None, *, num_cpus: int | None = None,
            object_store_memory: int | None = None, **init_kwargs: Any) -> bool:
    """Connect this process to Ray (see the module docstring); True if a local Ray was started here."""
    address = address or os.environ.get("RAY_ADDRESS") or None
    local = not address or address == "local"
    if local:
        # Before `import ray`: Ray reads this variable into a module constant at import time, and a Ray
        # started while that constant is on listens on every interface (measured: gcs_server, raylet and the
        # agents on :: and 0.0.0.0). Set only for a local Ray: a driver joining a real cluster must find its
        # node's own address.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    from ray._private import ray_constants

    if ray.is_initialized():
        return False
    if not local:
        ray.init(address=address, log_to_driver=True, **init_kwargs)
        return False
    if os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0":
        ray_constants.ENABLE_RAY_CLUSTER = False  # ray imported before us: the constant missed the variable
    kwargs: dict[str, Any] = {"address": "local", "_node_ip_address": "127.0.0.1", "include_dashboard": False,
                              "log_to_driver": True}
    if num_cpus is not None:
        kwargs["num_cpus"] = int(num_cpus)
    if object_store_memory is not None:
        kwargs["object_store_memory"] = int(object_store_memory)
    ray.init(**{**kwargs, **init_kwargs})
    return True
