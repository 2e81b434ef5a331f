"""Config loading: YAML + dotted overrides, typed checks, helpful errors, faithful dumps."""

import dataclasses
import os

import pytest
import yaml

from cada_jax.config import (
    Config,
    ConfigError,
    OptimSection,
    all_keys,
    apply_overrides,
    config_from_dict,
    describe,
    dump_yaml,
    load_config,
    to_dict,
)


def _write(tmp_path, text, name="c.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def test_defaults_and_every_field_documented():
    cfg = load_config(None)
    assert cfg == Config()
    rows = describe()
    keys = [r[0] for r in rows]
    assert "optim.lr" in keys and "lora.targets" in keys and "checkpoint.async_save" in keys
    undocumented = [k for k, _, _, doc in rows if not doc.strip()]
    assert undocumented == []
    # describe covers every leaf key
    assert sorted(keys) == sorted(k for k in all_keys() if "." in k)  # sections are one level deep


def test_yaml_plus_overrides(tmp_path):
    path = _write(
        tmp_path,
        "optim:\n  lr: 1e-4\n  schedule: constant\nlora:\n  enabled: true\n  rank: 4\nrun:\n  name: exp1\n",
    )
    cfg = load_config(path, ["optim.lr=3e-5", "lora.targets=[q_proj, down_proj]", "sft.packing=true", "run.seed=7"])
    assert cfg.optim.lr == pytest.approx(3e-5) and isinstance(cfg.optim.lr, float)
    assert cfg.optim.schedule == "constant"
    assert cfg.lora == dataclasses.replace(cfg.lora, enabled=True, rank=4, targets=("q_proj", "down_proj"))
    assert cfg.sft.packing is True and cfg.run.seed == 7 and cfg.run.name == "exp1"
    # untouched keys keep their defaults
    assert cfg.optim.b2 == OptimSection().b2
    # ints are accepted for floats, the YAML string '1e-4' (no dot) too
    assert load_config(path, ["optim.max_grad_norm=2"]).optim.max_grad_norm == 2.0
    assert apply_overrides(cfg, ["optim.lr=0.5"]).optim.lr == 0.5


def test_unknown_key_in_file_names_file_key_and_suggestion(tmp_path):
    path = _write(tmp_path, "optim:\n  warmup: 10\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    assert path in msg and "'optim.warmup'" in msg and "did you mean 'optim.warmup_steps'" in msg
    assert "\n" not in msg
    path2 = _write(tmp_path, "optimizer:\n  lr: 1\n", "d.yaml")
    with pytest.raises(ConfigError, match=r"d\.yaml: unknown key 'optimizer' \(did you mean 'optim'\?\)"):
        load_config(path2)


def test_unknown_override_suggests_the_right_section():
    with pytest.raises(ConfigError, match=r"override 'lr=1': unknown key 'lr' \(did you mean 'optim.lr'\?\)"):
        load_config(None, ["lr=1"])
    with pytest.raises(ConfigError, match=r"unknown key 'optim.lrr' \(did you mean 'optim.lr'\?\)"):
        load_config(None, ["optim.lrr=1"])
    with pytest.raises(ConfigError, match="use KEY=VALUE"):
        load_config(None, ["optim.lr"])
    with pytest.raises(ConfigError, match="'optim.lr' is a value, not a section"):
        load_config(None, ["optim.lr.x=1"])


@pytest.mark.parametrize(
    "override, pattern",
    [
        ("optim.lr=abc", r"optim\.lr: expected float, got str 'abc'"),
        ("sft.packing=maybe", r"sft\.packing: expected bool, got str 'maybe'"),
        ("sft.batch_size=2.5", r"sft\.batch_size: expected int, got float 2\.5"),
        ("optim.schedule=cosin", r"optim\.schedule: expected one of 'constant', 'cosine', got 'cosin' \(did you mean 'cosine'\?\)"),
        ("lora.targets=[q_proj, qkv]", r"lora\.targets\[1\]: expected one of 'q_proj'"),
        ("lora.targets=q_proj", r"lora\.targets: expected a list of"),
        ("run=3", r"run: expected a mapping"),
        ("optim.grad_accum=0", r"optim\.grad_accum: must be >= 1, got 0"),
        ("lora.targets=[q_proj, q_proj]", r"lora\.targets: lists \['q_proj'\] more than once"),
    ],
)
def test_type_and_range_errors_name_the_key(override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(None, [override])


def test_range_error_in_file_names_the_file(tmp_path):
    path = _write(tmp_path, "checkpoint:\n  keep: 0\n")
    with pytest.raises(ConfigError, match=rf"{path}: checkpoint\.keep: must be >= 1, got 0"):
        load_config(path)


def test_bad_yaml_and_bad_top_level(tmp_path):
    path = _write(tmp_path, "optim:\n  lr: [1,\n")
    with pytest.raises(ConfigError, match=rf"{path}: invalid YAML at line \d+"):
        load_config(path)
    path2 = _write(tmp_path, "- 1\n- 2\n", "list.yaml")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(path2)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(str(tmp_path / "missing.yaml"))
    assert load_config(_write(tmp_path, "", "empty.yaml")) == Config()


def test_dump_round_trip_is_exact_and_atomic(tmp_path):
    cfg = load_config(None, ["optim.lr=1.2345e-5", "lora.enabled=true", "lora.targets=[up_proj]", "sft.length_buckets=[128, 256, 1024]",
                             "run.name=x y", "checkpoint.dir=/tmp/ck"])
    out = dump_yaml(cfg, str(tmp_path / "run" / "config.yaml"))
    assert sorted(os.listdir(tmp_path / "run")) == ["config.yaml"]  # no temp file left behind
    with open(out) as f:
        raw = yaml.safe_load(f)
    assert raw == to_dict(cfg)
    assert raw["lora"]["targets"] == ["up_proj"]  # tuples are written as plain lists
    assert load_config(out) == cfg
    assert config_from_dict(to_dict(cfg)) == cfg


def test_describe_lists_every_key_of_every_section(capsys):
    from cada_jax.cli import main
    from cada_jax.config import describe

    keys = [k for k, *_ in describe()]
    assert {k.split(".")[0] for k in keys} == {f.name for f in dataclasses.fields(Config)}
    for command in (["config", "--describe"], ["pipeline", "--describe"], ["generate", "--describe"],
                    ["sft", "--describe"], ["rl", "--describe"]):
        assert main(command) == 0
        out = capsys.readouterr().out
        listed = [line.split(" ", 1)[0] for line in out.splitlines() if line and not line.startswith("#")]
        assert listed == keys, command
    assert main(["config", "--describe", "judge", "eval"]) == 0
    out = capsys.readouterr().out
    assert "judge.url (str)" in out and "eval.judge" in out and "rl.steps" not in out
    assert main(["config", "--describe", "jduge"]) == 1
    assert "unknown config section" in capsys.readouterr().err


def test_config_command_prints_the_resolved_config(tmp_path, capsys):
    from cada_jax.cli import main

    path = tmp_path / "c.yaml"
    path.write_text("rl:\n  steps: 3\n")
    assert main(["config", str(path), "rl.beta=0.5"]) == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["rl"]["steps"] == 3 and resolved["rl"]["beta"] == 0.5
    assert resolved["optim"]["lr"] == OptimSection().lr
    assert main(["config", str(path), "rl.stepz=1"]) == 1
    assert "did you mean 'rl.steps'" in capsys.readouterr().err


def test_config_changes_ignore_keys_one_side_lacks():
    from cada_jax.config import config_changes

    saved = {"optim": {"lr": 1e-4, "old_key": 1}, "run": {"progress": True}}
    now = {"optim": {"lr": 2e-4, "new_key": 8}, "run": {"progress": False}}
    assert config_changes(saved, now) == ["optim.lr 0.0001 -> 0.0002", "run.progress True -> False"]
    assert config_changes(saved, now, ("run.",)) == ["optim.lr 0.0001 -> 0.0002"]
    # with the defaults, a key the saved config lacks is a change only when it is not the default
    defaults = {"optim": {"lr": 1e-4, "new_key": 8}, "run": {"progress": True}}
    assert config_changes(saved, now, ("run.",), defaults=defaults) == ["optim.lr 0.0001 -> 0.0002"]
    assert config_changes(saved, {**now, "optim": {"lr": 1e-4, "new_key": 9}}, ("run.",), defaults=defaults) == [
        "optim.new_key (default 8) -> 9"]
