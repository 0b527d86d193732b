"""Helpers for the tests of our Prometheus endpoints (student.monitor, teacher_server.metrics):
scrape, Prometheus' own linter (promtool), and the house rules promtool does not check."""

from __future__ import annotations

import shutil
import socket
import subprocess
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

# label values may only come from small fixed sets: the rank or replica index, and these
BOUNDED_LABELS = {"worker", "replica", "kind", "on", "part", "domain", "reason"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        return r.read().decode()


def promtool_check(text: str) -> None:
    """``promtool check metrics`` (Prometheus' own linter) on one scrape; skips when it is absent."""
    if shutil.which("promtool") is None:
        pytest.skip("promtool is not installed (Debian's prometheus package ships it; .ci/run installs it)")
    res = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and not res.stdout.strip() and not res.stderr.strip(), res.stdout + res.stderr


def families(text: str) -> dict:
    """name (as exposed: counters with _total) -> family; prometheus_client's _created gauges left out."""
    out = {}
    for f in text_string_to_metric_families(text):
        if f.name.endswith("_created"):
            continue
        out[f.name + "_total" if f.type == "counter" else f.name] = f
    return out


def check_by_the_book(text: str, expected: dict[str, tuple[str, tuple]], label: str) -> dict:
    """Every family is one we document (name -> (type, labels besides ``label``)), of its type, with our
    prefix, a help text, ``_total`` on counters only, and bounded labels. Returns the families."""
    fams = families(text)
    for name, f in fams.items():
        assert name in expected, f"{name} is not a documented series"
        kind, labels = expected[name]
        assert f.type == kind, (name, f.type)
        assert name.startswith("panodistill_") and f.documentation, name
        assert name.endswith("_total") == (kind == "counter"), name
        for s in f.samples:
            assert set(s.labels) - {"le"} == {label, *labels}, (s.name, s.labels)
            assert set(s.labels) <= BOUNDED_LABELS | {"le"}, s.labels
    return fams


def value(fams: dict, name: str, **labels) -> float:
    """Sum of a family's samples matching ``labels`` (a histogram's: its observation count)."""
    f = fams[name]
    sample = name if f.type != "histogram" else name + "_count"
    return sum(s.value for s in f.samples if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()))
