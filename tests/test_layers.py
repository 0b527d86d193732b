"""Imports run one way: panorama -> sharding -> teacher_server -> student -> cluster.

A module may import from its own package and from packages to its left, never to its right; this parses
every module of the five packages (imports inside functions included) and fails naming each upward import.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RANK = {"panorama": 0, "sharding": 1, "teacher_server": 2, "student": 3, "cluster": 4}


def upward_imports(root: Path = ROOT) -> list[str]:
    found = []
    for pkg, rank in RANK.items():
        for f in sorted((root / pkg).rglob("*.py")):
            for node in ast.walk(ast.parse(f.read_text(), filename=str(f))):
                if isinstance(node, ast.Import):
                    mods = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    mods = [node.module]
                else:
                    continue
                for m in mods:
                    if RANK.get(m.split(".")[0], -1) > rank:
                        found.append(f"{f.relative_to(root)}:{node.lineno} imports {m}")
    return found


def test_no_upward_imports():
    bad = upward_imports()
    assert not bad, "imports that run upward:\n" + "\n".join(bad)


def test_the_check_sees_an_upward_import(tmp_path):
    # the detector itself: a sharding module importing student must be reported
    for pkg in RANK:
        (tmp_path / pkg).mkdir()
    (tmp_path / "sharding" / "bad.py").write_text("def f():\n    from student.losses import x\n")
    (tmp_path / "student" / "ok.py").write_text("import sharding.format\n")
    assert upward_imports(tmp_path) == ["sharding/bad.py:2 imports student.losses"]
