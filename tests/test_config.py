"""Config composition: experiments compose, overrides apply, typos and absurd values fail clearly."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException

from nmt.config import Config, ConfigError, DataConfig, ModelConfig, register_schema, to_config
from tests.conftest import REPO

register_schema()


def composed(*overrides: str) -> Config:
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base=None):
        return to_config(compose("config", overrides=list(overrides)))


@pytest.mark.parametrize(
    "experiment", sorted(p.stem for p in (REPO / "configs" / "experiment").glob("*.yaml"))
)
def test_every_experiment_composes(experiment):
    cfg = composed(f"+experiment={experiment}")
    assert cfg.name and cfg.run_dir == f"runs/{cfg.name}"


def test_command_line_overrides_reach_the_dataclasses():
    cfg = composed("+experiment=smoke", "train.max_steps=7", "model.d_model=48", "model.n_heads=6")
    assert (cfg.train.max_steps, cfg.model.d_model, cfg.model.n_heads) == (7, 48, 6)
    assert isinstance(cfg.model, ModelConfig)


def test_misspelled_key_is_an_error():
    with pytest.raises(ConfigCompositionException, match="max_stepz"):
        composed("+experiment=smoke", "train.max_stepz=3")


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.n_heads=5", "divisible"),
        ("data.max_tokens=10", "data.max_tokens=10"),
        ("train.lr=5", "train.lr=5"),
        ("decode.beam=0", "decode.beam"),
        ("train.precision=fp8", "train.precision"),
        ("data.src_lang=de", "must differ"),
    ],
)
def test_absurd_values_fail_with_a_sentence_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        composed("+experiment=smoke", override)


def test_config_round_trips_through_a_plain_dict():
    cfg = composed("+experiment=base")
    assert Config.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="unknown DataConfig keys: bogus"):
        Config.from_dict({"data": {**DataConfig().__dict__, "bogus": 1}})


def test_resume_flag_spellings():
    assert composed("+experiment=smoke", "train.resume=true").train.resume_requested
    assert not composed("+experiment=smoke").train.resume_requested
