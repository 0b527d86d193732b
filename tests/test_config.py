from pathlib import Path

import pytest

import dataclasses
import re

from sharding.cli import UserError
from student import config as config_module
from student.config import TrainConfig, dump_yaml, from_dict, help_text, iter_fields, load_config, parse_override

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, TrainConfig)
    assert from_dict(__import__("yaml").safe_load(dump_yaml(cfg))) == cfg  # the resolved file round-trips


def test_overrides_are_typed_and_nested():
    cfg = load_config(None, ["optim.steps=7", "distill.max_deg=[10, 20, 30]", "teacher.mode=oracle",
                             "run.out_dir=/tmp/x", "optim.lr=1e-3", "model.options={se: false}"])
    assert cfg.optim.steps == 7 and cfg.distill.max_deg == [10.0, 20.0, 30.0]
    assert cfg.teacher.mode == "oracle" and cfg.run.out_dir == "/tmp/x" and cfg.optim.lr == 1e-3
    assert cfg.model.options == {"se": False}
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
    ("optim.steps=0", "optim.steps must be >= 1"),
    ("optim.steps=-3", "optim.steps must be >= 1"),
    ("optim.lr=inf", "optim.lr must be a finite number"),
    ("optim.lr=.nan", "optim.lr must be a finite number"),
    ("distill.pseudo_weight=-.inf", "distill.pseudo_weight must be a finite number"),
    ("eval.max_depth=nan", "eval.max_depth must be a finite number"),
    ("run.log_every=0", "run.log_every must be >= 1"),
    ("data.height=0", "data.height must be >= 16"),
    ("distill.face_size=-1", "distill.face_size must be >= 0"),
    ("distill.face_size=1", "distill.face_size must be 0 \\(auto"),
    ("run.metrics_port=65536", "run.metrics_port must be -1"),
    ("run.metrics_port=-2", "run.metrics_port must be -1"),
    ("teacher.metrics_port=70000", "teacher.metrics_port"),
    ("model.name=bogus", "model.name must be one of"),
    ("model.options={nope: 1}", "unknown option nope"),
    ("eval.protocol=none", "eval.protocol must be one of lstsq, median"),
    ("optim.schedule=linear", "optim.schedule must be one of constant, cosine"),
    ("run=3", "run is a section"),
    ("optim.betas=[0.9, {a: 1}]", "optim.betas\\[1\\] must be a number"),
    ("optim.lr=[1", "override optim.lr: cannot read"),
])
def test_bad_values_are_named(override, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, [override])


def test_config_errors_are_user_errors_and_value_errors():
    with pytest.raises(UserError):
        load_config(None, ["optim.steps=0"])
    # worker r exports on cluster.metrics_port + r: every worker's port must exist
    assert load_config(None, ["cluster.metrics_port=65535"]).cluster.metrics_port == 65535
    with pytest.raises(ValueError, match="cluster.metrics_port"):
        load_config(None, ["cluster.metrics_port=65535", "cluster.num_workers=2"])
    assert load_config(None, ["run.metrics_port=-1", "run.metrics_port=0"]).run.metrics_port == 0


def test_broken_yaml_and_missing_file_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  steps: [1, 2\nrun: {")
    with pytest.raises(UserError, match=r"bad.yaml is not valid YAML: line \d+"):
        load_config(bad)
    with pytest.raises(UserError, match="missing.yaml not found"):
        load_config(tmp_path / "missing.yaml")
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("optim:\n  stepz: 3\n")
    with pytest.raises(UserError, match="wrong.yaml: unknown config key optim.stepz"):
        load_config(wrong)


def test_every_key_has_help_and_is_listed():
    text = help_text()
    keys = [key for key, _, _, _ in iter_fields()]
    assert len(keys) > 90 and "data.allow_pipe" in keys and "run.tensorboard" in keys
    for key, _, _, help in iter_fields():
        assert help, f"{key} has no help"
        assert re.search(rf"^  {re.escape(key)} \(", text, re.M), key
    assert "teacher.mode (inprocess|ray|cached|hybrid|oracle|none, default inprocess)" in text
    assert "eval.protocol (lstsq|median, default lstsq)" in text
    cfg = TrainConfig()
    assert cfg.data.allow_pipe is False and cfg.run.tensorboard is False and cfg.eval.protocol == "lstsq"


def test_the_docstring_example_parses():
    example = re.search(r"``(\w+\.\w+=\S+ [^`]+)``", config_module.__doc__).group(1).split()
    cfg = load_config(None, example)
    assert cfg.optim.steps == 20


def test_every_field_default_passes_its_own_type_check():
    # defaults go through the same coercion as user values (Literal defaults among their choices)
    assert from_dict(dataclasses.asdict(TrainConfig())) == TrainConfig()
