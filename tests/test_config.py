from pathlib import Path

import pytest

from student.config import TrainConfig, dump_yaml, from_dict, load_config, parse_override

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, TrainConfig)
    assert from_dict(__import__("yaml").safe_load(dump_yaml(cfg))) == cfg  # the resolved file round-trips


def test_overrides_are_typed_and_nested():
    cfg = load_config(None, ["optim.steps=7", "distill.max_deg=[10, 20, 30]", "teacher.mode=oracle",
                             "run.out_dir=/tmp/x", "optim.lr=1e-3", "model.options={width: 3}"])
    assert cfg.optim.steps == 7 and cfg.distill.max_deg == [10.0, 20.0, 30.0]
    assert cfg.teacher.mode == "oracle" and cfg.run.out_dir == "/tmp/x" and cfg.optim.lr == 1e-3
    assert cfg.model.options == {"width": 3}
    assert parse_override("a.b=") == {"a": {"b": ""}}


@pytest.mark.parametrize("override, message", [
    ("optim.stepz=3", "unknown config key optim.stepz"),
    ("optim.steps=many", "optim.steps must be an integer"),
    ("distill.rotation=maybe", "distill.rotation must be true or false"),
    ("teacher.mode=psychic", "teacher.mode must be one of"),
    ("data.batch_size=5", "even"),
    ("data.height=100", "multiple of 16"),
    ("teacher.mode=cached", "teacher.store"),
    ("nonsense", "key=value"),
])
def test_bad_values_are_named(override, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, [override])
