"""LUFFY's defaults: asserted against the config, TRL's own defaults and the docs table."""

import dataclasses
import pathlib
import re

import pytest
from trl import GRPOConfig

from luffy_trl import MixedPolicyGRPOConfig
from luffy_trl.config import LUFFY_DEFAULTS, LUFFY_MATCHING_TRL_DEFAULTS

DOCS = pathlib.Path(__file__).resolve().parents[1] / "docs"
NEW_FIELDS = ["num_off_policy", "off_policy_column", "policy_shaping_gamma", "off_policy_shaping", "on_policy_clip",
              "success_reward_threshold", "off_policy_trigger", "off_policy_trigger_threshold", "off_policy_schedule",
              "off_policy_schedule_target", "off_policy_schedule_start", "off_policy_schedule_end",
              "off_policy_schedule_warmup_steps", "off_policy_schedule_decay_steps", "off_policy_trace_selection",
              "off_policy_logprobs_column", "off_policy_loss", "sft_loss_coef", "off_policy_shaping_weight",
              "off_policy_shaping_exponent", "off_policy_max_clip", "off_policy_min_clip", "max_token_prob",
              "on_policy_shaping", "on_policy_shaping_gamma", "on_policy_shaping_weight", "on_policy_shaping_exponent"]


@pytest.fixture(scope="module")
def configs():
    return MixedPolicyGRPOConfig(output_dir="unused", use_cpu=True), GRPOConfig(output_dir="unused", use_cpu=True)


def value(config, name):
    v = getattr(config, name)
    return getattr(v, "value", v)  # enums such as SchedulerType


@pytest.mark.parametrize("name", sorted(LUFFY_DEFAULTS))
def test_changed_defaults_follow_luffy(configs, name):
    ours, trl_config = configs
    luffy_value, trl_value, _ = LUFFY_DEFAULTS[name]
    assert value(ours, name) == luffy_value
    assert value(trl_config, name) == trl_value  # if TRL changes its default, revisit the mapping


@pytest.mark.parametrize("name", sorted(LUFFY_MATCHING_TRL_DEFAULTS))
def test_inherited_defaults_already_match_luffy(configs, name):
    ours, trl_config = configs
    expected, _ = LUFFY_MATCHING_TRL_DEFAULTS[name]
    assert value(ours, name) == expected == value(trl_config, name)


def test_new_fields_have_help_and_luffy_values(configs):
    ours, _ = configs
    fields = {f.name: f for f in dataclasses.fields(MixedPolicyGRPOConfig)}
    for name in NEW_FIELDS:
        assert fields[name].metadata.get("help"), name
        assert name in MixedPolicyGRPOConfig.__doc__, name
    assert (ours.num_off_policy, ours.off_policy_column, ours.policy_shaping_gamma) == (1, "target", 0.1)
    assert (ours.off_policy_shaping, ours.on_policy_clip) == ("luffy", False)


def docs_table_rows(path):
    rows = {}
    for line in path.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 3 and cells[0].startswith("`"):
            rows.setdefault(cells[0].strip("`"), cells)  # first table that names the field
    return rows


def test_configuration_docs_list_every_field_with_its_default(configs):
    ours, _ = configs
    rows = docs_table_rows(DOCS / "configuration.md")
    for name in NEW_FIELDS + sorted(LUFFY_DEFAULTS):
        assert name in rows, f"docs/configuration.md has no row for {name}"
        assert f"`{value(ours, name)!r}`" in rows[name][1] or f"`{value(ours, name)}`" in rows[name][1], name


def test_cli_parses_every_new_field():
    from trl import TrlParser

    (config,) = TrlParser((MixedPolicyGRPOConfig,)).parse_args_into_dataclasses(
        ["--output_dir", "x", "--use_cpu", "--num_off_policy", "2", "--off_policy_column", "trace",
         "--policy_shaping_gamma", "0.3", "--off_policy_shaping", "none", "--on_policy_clip", "true"]
    )
    assert (config.num_off_policy, config.off_policy_column, config.policy_shaping_gamma) == (2, "trace", 0.3)
    assert config.off_policy_shaping == "none" and config.on_policy_clip is True
    with pytest.raises(SystemExit):
        TrlParser((MixedPolicyGRPOConfig,)).parse_args_into_dataclasses(
            ["--output_dir", "x", "--off_policy_shaping", "sqrt"]
        )
    assert re.search(r"luffy", MixedPolicyGRPOConfig.__dataclass_fields__["off_policy_shaping"].metadata["help"])
