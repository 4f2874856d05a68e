from dataclasses import dataclass, field
from typing import Literal

import pytest

from mechsieve.config import ConfigError, load_config, parse_override, to_dict


@dataclass
class Inner:
    layers: list[int] | Literal["all"] = "all"
    rate: float = 0.1


@dataclass
class Outer:
    name: str = "x"
    inner: Inner = field(default_factory=Inner)
    flag: bool = False


def test_file_then_flags_then_set(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("name: from-file\ninner:\n  rate: 0.5\n  layers: [1, 2]\n")
    cfg = load_config(Outer, cfg_file, ["inner.layers=[3]", "flag=true"], flags={"name": "from-flag"})
    assert cfg.name == "from-flag"
    assert cfg.inner.rate == 0.5
    assert cfg.inner.layers == [3]
    assert cfg.flag is True
    assert to_dict(cfg) == {"name": "from-flag", "inner": {"layers": [3], "rate": 0.5}, "flag": True}


def test_unknown_key_names_it_and_the_allowed_ones():
    with pytest.raises(ConfigError, match=r"inner\.rat.*inner\.layers, inner\.rate"):
        load_config(Outer, None, ["inner.rat=1"])


@pytest.mark.parametrize("override, message", [
    ("inner.rate=abc", "inner.rate: expected a number"),
    ("flag=3", "flag: expected true or false"),
    ("inner.layers=some", "inner.layers"),
    ("novalue", "expected key=value"),
])
def test_bad_values_name_the_field(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(Outer, None, [override])


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_config(Outer, tmp_path / "nope.yaml")


def test_parse_override_reads_yaml():
    assert parse_override("a.b=[1, -1]") == ("a.b", [1, -1])
    assert parse_override("a=") == ("a", "")
