from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import Field

from albor.config import Int, StageConfig, apply_overrides, load_config, parse_int
from albor.errors import ConfigError


class Inner(StageConfig):
    size: Int = Field(8, description="A size.")


class Sample(StageConfig):
    vocab_size: Int = Field(4096, description="Vocab.")
    lr: float = Field(3e-4, description="LR.")
    name: str = Field("x", description="Name.")
    inner: Inner = Field(default_factory=Inner, description="Nested.")


@pytest.mark.parametrize(
    ("raw", "value"),
    [
        ("32K", 32768),
        ("1M", 1048576),
        ("10B", 10**10),
        ("1.5K", 1536),
        ("1e6", 10**6),
        ("32_768", 32768),
        (" 2G ", 2 * 1024**3),
        ("1T", 10**12),
        (4096, 4096),
        (2.0, 2),
    ],
)
def test_shorthand(raw: object, value: int) -> None:
    assert parse_int(raw) == value


def test_shorthand_leaves_non_integers_to_validation(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("vocab_size: 1.3\n")
    with pytest.raises(ConfigError, match="vocab_size"):
        load_config(Sample, path)


@given(st.integers(min_value=0, max_value=10**6))
def test_shorthand_k_roundtrip(n: int) -> None:
    assert parse_int(f"{n}K") == n * 1024


def test_yaml_floats_and_overrides(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("vocab_size: 32K\nlr: 3e-4\ninner:\n  size: 1K\n")
    cfg = load_config(Sample, path, ["inner.size=2K", "name=abc", "lr=1e-3"])
    assert (cfg.vocab_size, cfg.lr, cfg.inner.size, cfg.name) == (32768, 1e-3, 2048, "abc")


def test_unknown_key_names_file_key_and_fix(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("vocab_sise: 10\ninner:\n  sise: 3\n")
    with pytest.raises(ConfigError) as e:
        load_config(Sample, path)
    msg = str(e.value)
    assert f"{path}: vocab_sise: unknown key (did you mean 'vocab_size'?)" in msg
    assert "inner.sise: unknown key (did you mean 'size'?)" in msg
    assert e.value.exit_code == 2


def test_wrong_type_and_bad_yaml_and_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("vocab_size: lots\n")
    with pytest.raises(ConfigError, match=r"vocab_size: .*got 'lots'"):
        load_config(Sample, path)
    path.write_text("vocab_size: [1,\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(Sample, path)
    path.write_text("- 1\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(Sample, path)
    with pytest.raises(ConfigError, match="not found"):
        load_config(Sample, tmp_path / "nope.yaml")


def test_override_errors() -> None:
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        apply_overrides({}, ["novalue"])
    with pytest.raises(ConfigError, match="not a mapping"):
        apply_overrides({"a": 1}, ["a.b=2"])


def test_overrides_index_lists() -> None:
    data = {"tasks": [{"task": "a", "n": 1}, {"task": "b"}], "k": [1, 2]}
    out = apply_overrides(data, ["tasks.1.n=20", "tasks.0.limit=5", "k.1=10"])
    assert out == {
        "tasks": [{"task": "a", "n": 1, "limit": 5}, {"task": "b", "n": 20}],
        "k": [1, 10],
    }
    assert data["tasks"][1] == {"task": "b"}  # the input is left alone
    with pytest.raises(ConfigError, match=r"tasks is a list of 2; index it with 0\.\.1, not '2'"):
        apply_overrides(data, ["tasks.2.n=1"])
    with pytest.raises(ConfigError, match="not 'x'"):
        apply_overrides(data, ["tasks.x=1"])
