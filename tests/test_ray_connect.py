"""sharding.ray_connect: a local Ray started through it listens on loopback only, even when the caller
imported ray first (Ray reads RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER into a constant at import time)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PROBE = textwrap.dedent("""
    import ipaddress, os, time
    import ray  # imported before sharding.ray_connect on purpose
    import psutil
    from sharding.ray_connect import connect

    assert connect(num_cpus=1, object_store_memory=80 * 2**20) is True
    assert connect() is False  # already connected: nothing started
    time.sleep(1)
    pids = {p.pid for p in psutil.Process().children(recursive=True)} | {os.getpid()}
    listen = [(c.pid, c.laddr.ip) for c in psutil.net_connections(kind="inet")
              if c.status == "LISTEN" and c.pid in pids]
    def loopback(ip):
        a = ipaddress.ip_address(ip)
        return a.is_loopback or (a.version == 6 and a.ipv4_mapped is not None and a.ipv4_mapped.is_loopback)
    print("LISTENERS", len(listen), "NONLOOPBACK", [x for x in listen if not loopback(x[1])])
    ray.shutdown()
""")


def test_a_local_ray_listens_on_loopback_only():
    env = {k: v for k, v in __import__("os").environ.items()
           if k not in ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_ADDRESS")}
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    line = next(l for l in out.stdout.splitlines() if l.startswith("LISTENERS"))
    n = int(line.split()[1])
    assert n >= 3, line  # gcs_server, raylet, the driver's own servers: the probe did see Ray's sockets
    assert line.endswith("NONLOOPBACK []"), line
