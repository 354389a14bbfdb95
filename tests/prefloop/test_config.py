"""Stage configs: dataclass <-> YAML <-> argparse flags (flags win), config_hash, changed_keys, actionable errors."""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
from dataclasses import dataclass

import pytest

from prefloop.config import (
    ConfigError,
    add_arguments,
    changed_keys,
    config_hash,
    dump_yaml,
    field,
    from_args,
    from_dict,
    hashed_dict,
    load_yaml,
    to_dict,
)
from prefloop.gen.stage import GenerateConfig


@dataclass
class Demo:
    model: str = field(help="Required: the model to train.")
    beta: float = field(0.1, help="DPO beta.")
    loss_type: list[str] = field(["sigmoid"], help="TRL loss types.")
    weights: list[float] = field([1.0], help="Loss weights.")
    chat: bool = field(False, help="Wrap prompts as messages.")
    steps: int = field(10, help="Training steps.")
    adapter: str | None = field(None, help="Optional adapter dir.")
    extra: dict = field({}, help="Extra kwargs.")
    out: str = field("out", help="Where to write.", hash=False)
    batch_size: int = field(8, help="Batch size.", hash=False)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config")
    add_arguments(parser, Demo)
    return parser


# --- from_dict ------------------------------------------------------------------------------------------------


def test_from_dict_unknown_key_names_valid_keys():
    """An unknown key is refused with the key, the dataclass and the list of valid keys in the message."""
    with pytest.raises(ConfigError) as e:
        from_dict(Demo, {"model": "m", "betta": 0.2}, source="recipe.yaml")
    msg = str(e.value)
    assert "recipe.yaml" in msg and "betta" in msg and "Demo" in msg
    for name in ("beta", "loss_type", "chat", "out"):
        assert name in msg


def test_from_dict_coerces_strings():
    """Strings coerce to the field type: '0.5' -> float, 'sigmoid,sft' -> list, 'true' -> bool, '3' -> int."""
    cfg = from_dict(
        Demo,
        {"model": "m", "beta": "0.5", "loss_type": "sigmoid, sft", "weights": "0.5,2", "chat": "true", "steps": "3"},
    )
    assert cfg.beta == 0.5 and isinstance(cfg.beta, float)
    assert cfg.loss_type == ["sigmoid", "sft"]
    assert cfg.weights == [0.5, 2.0]
    assert cfg.chat is True
    assert cfg.steps == 3 and isinstance(cfg.steps, int)


@pytest.mark.parametrize("text,value", [("true", True), ("Yes", True), ("1", True), ("off", False), ("False", False)])
def test_from_dict_bool_words(text, value):
    """Boolean words (true/yes/1/on, false/no/0/off, any case) coerce to bool."""
    assert from_dict(Demo, {"model": "m", "chat": text}).chat is value


def test_from_dict_yaml_native_types_pass_through():
    """Values already of the right type (from YAML) are kept; a YAML list stays a list; int -> float for floats."""
    cfg = from_dict(Demo, {"model": "m", "beta": 1, "loss_type": ["ipo"], "extra": {"k": 1}, "adapter": None})
    assert cfg.beta == 1.0 and isinstance(cfg.beta, float)
    assert cfg.loss_type == ["ipo"] and cfg.extra == {"k": 1} and cfg.adapter is None


@pytest.mark.parametrize(
    "key,value",
    [("beta", "abc"), ("steps", "1.5"), ("steps", 2.5), ("chat", "maybe"), ("extra", "notadict"), ("weights", "a,b")],
)
def test_from_dict_bad_value_names_key_and_source(key, value):
    """A value that cannot be coerced raises ConfigError naming the source, the key and the bad value."""
    with pytest.raises(ConfigError) as e:
        from_dict(Demo, {"model": "m", key: value}, source="flags")
    msg = str(e.value)
    assert "flags" in msg and f"`{key}`" in msg and repr(value) in msg


@pytest.mark.parametrize(
    "key,value",
    [("model", ["a", "b"]), ("model", {"name": "a"}), ("steps", True), ("beta", False)],
)
def test_from_dict_refuses_silent_cross_type_coercion(key, value):
    """A YAML list/dict for a string key, or a bool for a number, is refused instead of silently stringified/cast."""
    values = {"model": "m", key: value}
    with pytest.raises(ConfigError, match=key):
        from_dict(Demo, values)


def test_from_dict_missing_required_named_as_flag():
    """A missing required key is named as its `--flag` (the user's vocabulary), with the YAML alternative."""
    with pytest.raises(ConfigError) as e:
        from_dict(Demo, {"beta": 0.2})
    assert "--model" in str(e.value)
    with pytest.raises(ConfigError) as e:
        from_dict(GenerateConfig, {"model": "m"})
    assert "--prompts" in str(e.value) and "--out" in str(e.value)


def test_post_init_errors_name_the_fix():
    """Stage configs validate in `__post_init__` with the fix in the message (GenerateConfig)."""
    with pytest.raises(ConfigError, match="--n 1"):
        from_dict(GenerateConfig, {"model": "m", "prompts": "p", "out": "o", "n": "0"})
    with pytest.raises(ValueError, match="--shard"):
        from_dict(GenerateConfig, {"model": "m", "prompts": "p", "out": "o", "shard": "8/8"})


def test_every_generate_field_has_help():
    """Every GenerateConfig field carries help text (the CLI shows it)."""
    for f in dataclasses.fields(GenerateConfig):
        assert f.metadata.get("help"), f.name


def test_list_default_is_not_shared():
    """A list default is copied per instance (no shared mutable default)."""
    a, b = Demo(model="a"), Demo(model="b")
    a.loss_type.append("ipo")
    assert b.loss_type == ["sigmoid"]


# --- YAML + flags ---------------------------------------------------------------------------------------------


def test_yaml_then_flags_flags_win(tmp_path):
    """`from_args`: YAML values apply, flags the user typed override them, untouched keys keep YAML or defaults."""
    path = tmp_path / "recipe.yaml"
    path.write_text("model: from-yaml\nbeta: 0.3\nchat: true\nsteps: 50\nloss_type: [sigmoid, sft]\n")
    args = _parser().parse_args(["--config", str(path), "--beta", "0.7", "--no-chat", "--loss-type", "ipo"])
    cfg = from_args(Demo, args)
    assert cfg.model == "from-yaml"  # YAML
    assert cfg.beta == 0.7  # flag beats YAML
    assert cfg.chat is False  # --no-chat beats YAML true
    assert cfg.loss_type == ["ipo"]
    assert cfg.steps == 50  # YAML, no flag
    assert cfg.batch_size == 8  # default


def test_flags_alone_and_underscore_aliases():
    """Without --config, flags alone build the config; `--loss_type` works as well as `--loss-type`."""
    args = _parser().parse_args(
        ["--model", "m", "--loss_type", "a,b", "--steps", "4", "--extra", '{"k": 2}', "--chat"]
    )
    cfg = from_args(Demo, args)
    assert cfg == Demo(model="m", loss_type=["a", "b"], steps=4, extra={"k": 2}, chat=True)


def test_mapping_flag_takes_yaml_or_json_and_refuses_the_rest(capsys):
    """A dict field's flag parses a YAML mapping (JSON is YAML too); anything else is a usage error naming it."""
    assert from_args(Demo, _parser().parse_args(["--model", "m", "--extra", "{k: 2, s: x}"])).extra == {"k": 2, "s": "x"}
    assert from_args(Demo, _parser().parse_args(["--model", "m", "--extra", '{"k": [1]}'])).extra == {"k": [1]}
    with pytest.raises(SystemExit):
        _parser().parse_args(["--model", "m", "--extra", "[1, 2]"])
    assert "--extra" in capsys.readouterr().err


def test_flag_defaults_do_not_override_yaml(tmp_path):
    """An argparse default never overrides YAML: only flags the user typed do (defaults are suppressed)."""
    path = tmp_path / "recipe.yaml"
    path.write_text("model: m\nsteps: 99\nchat: true\n")
    cfg = from_args(Demo, _parser().parse_args(["--config", str(path)]))
    assert cfg.steps == 99 and cfg.chat is True


def test_overrides_sit_between_yaml_and_flags(tmp_path):
    """`overrides` beat YAML and lose to flags."""
    path = tmp_path / "recipe.yaml"
    path.write_text("model: m\nsteps: 1\nbeta: 0.1\n")
    args = _parser().parse_args(["--config", str(path), "--beta", "0.9"])
    cfg = from_args(Demo, args, overrides={"steps": 2, "beta": 0.5})
    assert cfg.steps == 2 and cfg.beta == 0.9


def test_bad_yaml_value_names_the_file(tmp_path):
    """A bad value in the YAML file is reported with the YAML path as its source."""
    path = tmp_path / "recipe.yaml"
    path.write_text("model: m\nsteps: lots\n")
    with pytest.raises(ConfigError, match="recipe.yaml.*steps"):
        from_args(Demo, _parser().parse_args(["--config", str(path)]))


def test_load_yaml_error_includes_the_line(tmp_path):
    """Invalid YAML raises ConfigError with `file:line` of the problem."""
    path = tmp_path / "recipe.yaml"
    path.write_text("model: m\nbeta: 0.1\n  bad: : x\nchat: true\n")
    with pytest.raises(ConfigError) as e:
        load_yaml(path)
    assert f"{path}:3:" in str(e.value)


def test_load_yaml_missing_file_and_non_mapping(tmp_path):
    """A missing file and a non-mapping top level raise ConfigError naming the file; an empty file is {}."""
    with pytest.raises(ConfigError, match="not found"):
        load_yaml(tmp_path / "nope.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="list.yaml"):
        load_yaml(tmp_path / "list.yaml")
    (tmp_path / "empty.yaml").write_text("")
    assert load_yaml(tmp_path / "empty.yaml") == {}


def test_yaml_round_trip(tmp_path):
    """`dump_yaml(to_dict(cfg))` loads back (via load_yaml + from_dict) to an equal config."""
    cfg = Demo(model="m é", beta=0.25, loss_type=["a", "b"], chat=True, adapter="ad", extra={"x": [1, 2]})
    path = tmp_path / "cfg.yaml"
    path.write_text(dump_yaml(to_dict(cfg), header="# header"), encoding="utf-8")
    assert path.read_text(encoding="utf-8").startswith("# header\n")
    assert from_dict(Demo, load_yaml(path)) == cfg


# --- hashing / drift ------------------------------------------------------------------------------------------


def test_config_hash_is_order_independent_and_stable_across_processes():
    """`config_hash` ignores key order and is the same in another process (it is written into run dirs)."""
    values = {"b": [1, 2], "a": "x", "c": {"z": 1, "y": None}, "d": 0.5}
    h = config_hash(values)
    assert h == config_hash(dict(reversed(list(values.items()))))
    assert len(h) == 12 and int(h, 16) >= 0
    code = f"from prefloop.config import config_hash; print(config_hash({values!r}))"
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONHASHSEED": "123"},
    )
    assert out.stdout.strip() == h


def test_config_hash_ignores_hash_false_fields():
    """Fields marked `hash=False` (out, batch_size) do not change the hash; any other field does."""
    base = Demo(model="m")
    h = config_hash(hashed_dict(base))
    assert config_hash(hashed_dict(dataclasses.replace(base, out="elsewhere", batch_size=1))) == h
    assert "out" not in hashed_dict(base) and "batch_size" not in hashed_dict(base)
    for change in ({"beta": 0.2}, {"loss_type": ["ipo"]}, {"chat": True}, {"model": "n"}, {"extra": {"a": 1}}):
        assert config_hash(hashed_dict(dataclasses.replace(base, **change))) != h, change


def test_generate_hash_false_fields():
    """GenerateConfig: out, chunk_size, batch_size, dtype and new_run do not define the output; sampling knobs do."""
    hashed = hashed_dict(GenerateConfig(model="m", prompts="p", out="o"))
    for key in ("out", "chunk_size", "batch_size", "dtype", "new_run"):
        assert key not in hashed
    for key in ("model", "prompts", "n", "temperature", "top_p", "seed", "max_new_tokens", "chat", "shard"):
        assert key in hashed


def test_changed_keys():
    """`changed_keys` lists differing keys sorted, including added/removed ones and dotted nested keys."""
    old = {"a": 1, "b": {"c": 1, "d": 2}, "gone": 1, "same": [1]}
    new = {"a": 1, "b": {"c": 1, "d": 3, "e": 0}, "new": 1, "same": [1]}
    assert changed_keys(old, new) == ["b.d", "b.e", "gone", "new"]
    assert changed_keys(old, old) == []
