"""Training settings are written once and composed: a training stage's config is the union of
them, the packaged recipes load unchanged, and plan and apply resolve the same setup."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from albor.config import validate
from albor.errors import ConfigError
from albor.model.gpt import GPT
from albor.pipeline import load_pipeline, recipes_dir
from albor.stage import OutputConfig
from albor.stages import pretrain
from albor.train import preflight
from albor.train.run import build_model
from albor.train.settings import ModelSettings, TrainSettings, model_config


def test_pretrain_config_is_the_settings_composed_with_no_field_written_twice() -> None:
    own = set(pretrain.Config.model_fields)
    parts = [OutputConfig, ModelSettings, TrainSettings]
    union = [name for part in parts for name in part.model_fields]
    assert len(union) == len(set(union))  # no key belongs to two of them
    assert own == set(union) | {"data"}
    for name, field in pretrain.Config.model_fields.items():
        assert field.description, f"{name} has no description"


@pytest.mark.parametrize("recipe", sorted(p.stem for p in recipes_dir().glob("*.yaml")))
def test_packaged_recipes_load_unchanged(recipe: str, tmp_path: Path) -> None:
    pipeline = load_pipeline(recipe, workdir=tmp_path)
    trained = [n for n in pipeline.nodes.values() if n.module is pretrain]
    assert trained
    for node in trained:
        assert isinstance(node.config, TrainSettings) and isinstance(node.config, ModelSettings)


def test_plan_and_apply_resolve_the_same_setup(
    token_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = pretrain.Config.model_validate(
        {"data": token_data, "output": tmp_path / "o", "model": "tiny", "seq_len": 32}
    )
    plan = pretrain.plan(cfg)
    setup = preflight.setup(cfg, cfg)
    assert setup.world == 2 and setup.mode == "ddp" and setup.seq_len == 32
    assert setup.tokens_per_step == cfg.micro_batch * cfg.grad_accum * 32 * 2
    assert plan.estimates["tokens_per_step"] == setup.tokens_per_step
    assert plan.estimates["parameters"]["total"] == setup.parameters


def test_the_model_is_initialised_once_under_the_seed() -> None:
    cfg = pretrain.Config(model="tiny")
    setup = preflight.setup(cfg, cfg)
    model = build_model(setup, seed=7, device=torch.device("cpu"))
    after_build = torch.rand(4)
    assert not any(p.is_meta for p in model.parameters())
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
    reference = GPT(model_config(cfg))
    torch.manual_seed(7)
    reference.init_weights()  # one initialisation from the seed, nothing drawn before it
    after_one_init = torch.rand(4)
    weights, expected = model.state_dict(), reference.state_dict()
    assert weights.keys() == expected.keys()
    for name in weights:
        assert torch.equal(weights[name], expected[name]), name
    # The meta build drew nothing and the init drew once: the RNG is where one init leaves it
    # (a model initialised by its constructor and again would have drawn twice).
    assert torch.equal(after_build, after_one_init)


@pytest.mark.parametrize(
    ("written", "seconds"),
    [
        ("10m", 600.0),
        ("90s", 90.0),
        ("2h", 7200.0),
        ("1h30m", 5400.0),
        ("1.5h", 5400.0),
        (600, 600.0),
        ("2.5", 2.5),
        (" 1m 30s ", 90.0),
    ],
)
def test_max_time_is_a_duration_in_seconds(written: object, seconds: float) -> None:
    assert TrainSettings.model_validate({"max_time": written}).max_time == seconds
    assert TrainSettings().max_time is None  # by default a run is sized in steps


@pytest.mark.parametrize("written", ["ten minutes", "10 min", "1h30", "-5", 0, "0s", "m"])
def test_a_bad_max_time_is_a_config_error_naming_the_key_and_the_forms(written: object) -> None:
    with pytest.raises(ConfigError) as e:
        validate(pretrain.Config, {"max_time": written}, "run.yaml")
    message = str(e.value)
    assert "max_time" in message and ("90s, 10m, 2h or 1h30m" in message or "10m" in message)


def test_an_unknown_optimizer_is_a_config_error_naming_the_key() -> None:
    with pytest.raises(ConfigError, match="optimizer") as e:
        validate(pretrain.Config, {"optimizer": "sgd"}, "run.yaml")
    assert "adamw" in str(e.value) and "muon" in str(e.value)
    assert pretrain.Config().optimizer == "adamw" and pretrain.Config().precision == "fp32"
