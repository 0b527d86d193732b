"""student.checkpoint: CRC-checked loading, fallback to the newest intact checkpoint, non-finite weights
refused, and the single-writer lock (two processes)."""

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sharding.cli import UserError
from student import checkpoint as ckpt

ROOT = Path(__file__).resolve().parents[1]


def _fake_checkpoint(run: Path, step: int, *, nan: bool = False) -> Path:
    """A checkpoint folder as the loop writes it, with a small model and a trainer.pt of some size."""
    torch.manual_seed(step)
    tmp = ckpt.begin(run, step)
    model = {"conv.weight": torch.randn(16, 16, 3, 3), "bn.running_var": torch.rand(16) + 0.5,
             "bn.num_batches_tracked": torch.tensor(step)}
    if nan:
        model["conv.weight"][3, 2, 1, 0] = float("nan")
    torch.save(model, tmp / "model.pt")
    torch.save({"model": model, "optimizer": {"state": {0: {"exp_avg": torch.randn(64, 1024)}}}}, tmp / "trainer.pt")
    torch.save({"loop": {"step": step}}, tmp / "rank0.pt")
    (tmp / "loop.json").write_text(json.dumps({"step": step, "world_size": 1, "engine": "local", "data": {}}))
    return ckpt.commit(run, tmp, step, keep=0)


def _flip(path: Path, offset: int, length: int = 4096) -> None:
    data = bytearray(path.read_bytes())
    assert len(data) > offset + length, (len(data), offset + length)
    for i in range(offset, offset + length):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def test_4kb_flipped_inside_trainer_pt_is_caught_and_resume_falls_back(tmp_path, caplog):
    run = tmp_path / "run"
    _fake_checkpoint(run, 3)
    newest = _fake_checkpoint(run, 6)
    trainer = newest / "trainer.pt"
    ckpt.load(trainer)  # intact: loads
    _flip(trainer, trainer.stat().st_size // 2)
    with pytest.raises(ckpt.CorruptCheckpoint, match=f"{trainer}.*fails its CRC check"):
        ckpt.load(trainer)
    with caplog.at_level(logging.WARNING, logger="pano_distill.checkpoint"):
        assert ckpt.intact_checkpoint(run) == ckpt.step_dir(run, 3)
    text = caplog.text
    assert str(trainer) in text and "instead of the damaged checkpoint(s) step_0000006" in text


def test_truncated_file_and_all_damaged_are_named(tmp_path):
    run = tmp_path / "run"
    folder = _fake_checkpoint(run, 2)
    model = folder / "model.pt"
    model.write_bytes(model.read_bytes()[:1000])
    with pytest.raises(ckpt.CorruptCheckpoint, match=str(model)):
        ckpt.load_model_state(run)
    with pytest.raises(ckpt.CorruptCheckpoint, match="every checkpoint .* is damaged"):
        ckpt.intact_checkpoint(run)
    assert ckpt.intact_checkpoint(tmp_path / "empty") is None


def test_nonfinite_weights_are_refused_by_file_and_tensor(tmp_path):
    run = tmp_path / "run"
    _fake_checkpoint(run, 1)
    state, f = ckpt.load_model_state(run)
    assert ckpt.first_nonfinite(state) is None
    bad = _fake_checkpoint(run, 2, nan=True)
    with pytest.raises(ckpt.NonFiniteCheckpoint, match=rf"{bad / 'model.pt'} .*non-finite weights \(first: conv.weight\)"):
        ckpt.load_model_state(run)  # latest is the NaN one
    assert ckpt.first_nonfinite({"a": {"b": [torch.zeros(2), torch.tensor([1.0, float("inf")])]}}) == "a.b[1]"
    assert ckpt.first_nonfinite({"n": torch.tensor([1, 2])}) is None  # integer tensors cannot be non-finite


_HOLD = """
import sys, time
from student import checkpoint as ckpt
lock = ckpt.Lock(sys.argv[1], "test")
print("held", flush=True)
time.sleep(60)
"""


@pytest.fixture
def holder():
    """Start another process holding a lock file; yields (process, path)."""
    procs = []

    def start(path: Path):
        p = subprocess.Popen([sys.executable, "-c", _HOLD, str(path)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
        procs.append(p)
        assert p.stdout.readline().strip() == "held"
        return p

    yield start
    for p in procs:
        p.kill()
        p.wait()


def test_a_second_writer_is_refused_with_the_holders_pid(tmp_path, holder):
    path = tmp_path / "run" / ".lock"
    proc = holder(path)
    with pytest.raises(UserError, match=rf"in use by another process \(pid {proc.pid}, lock file {path}\)"):
        ckpt.lock_run_dir(tmp_path / "run")
    proc.kill()
    proc.wait()
    deadline = time.time() + 10
    while True:  # the kernel drops the lock with the process
        try:
            lock = ckpt.lock_run_dir(tmp_path / "run")
            break
        except UserError:
            assert time.time() < deadline
            time.sleep(0.1)
    assert path.read_text().strip() == str(__import__("os").getpid())
    lock.release()
    with ckpt.lock_run_dir(tmp_path / "run"):  # released: taken again in this process
        pass


def test_generated_cache_writer_is_refused_while_another_renders(tmp_path, holder):
    from student.config import load_config
    from student.data import _generated_dir, prepare_data

    cfg = load_config(ROOT / "configs" / "tiny.yaml", [f"data.generated.cache_dir={tmp_path / 'cache'}"])
    root = _generated_dir(cfg)
    proc = holder(root.with_name(root.name + ".lock"))
    with pytest.raises(UserError, match=rf"generated-data cache .* \(pid {proc.pid},"):
        prepare_data(cfg)
    assert not root.exists()  # nothing rendered by the refused writer


_HOLD_AND_FORK = """
import os, sys, time
from student import checkpoint as ckpt
lock = ckpt.Lock(sys.argv[1], "test")
child = os.fork()
if child == 0:  # like a DataLoader worker: forked from the holder, outliving it for a while
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):  # not the test's pipes: it reads them to their end
        os.dup2(null, fd)
    time.sleep(60)
    os._exit(0)
print(child, flush=True)
"""


def test_a_forked_child_does_not_keep_its_parents_lock(tmp_path):
    """A trainer's DataLoader workers are forked from it. When the trainer ended, a worker still alive kept its
    run folder locked (a flock is shared over fork), so a resume started at once was refused."""
    path = tmp_path / "run" / ".lock"
    proc = subprocess.run([sys.executable, "-c", _HOLD_AND_FORK, str(path)], capture_output=True, text=True, cwd=ROOT,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    child = int(proc.stdout.split()[0])
    try:
        os.kill(child, 0)  # the forked child is still alive, the holder is gone
        lock = ckpt.lock_run_dir(tmp_path / "run")  # and the lock is free at once
        lock.release()
    finally:
        try:
            os.kill(child, signal.SIGKILL)
        except ProcessLookupError:
            pass
