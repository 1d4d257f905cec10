"""Options: one path from the options dict to a frozen ActcConfig, with a clear error for each bad input."""
import dataclasses

import pytest

from actc.config import ENV_BUDGET, ActcConfig, ActcOptionError, AverageBits, Bytes, Fraction, parse_budget


@pytest.mark.parametrize("value,expected", [
    ("2bit", AverageBits(2.0)), ("1.5 bits", AverageBits(1.5)), ("8BIT", AverageBits(8.0)),
    (0.1, Fraction(0.1)), ("0.25", Fraction(0.25)), (1.0, Fraction(1.0)),
    ("512MB", Bytes(512 * 10**6)), ("1.5GiB", Bytes(int(1.5 * 2**30))), ("64KiB", Bytes(65536)),
    (4096, Bytes(4096)), ("4096", Bytes(4096)), (1024, Bytes(1024)),
])
def test_budget_forms(value, expected):
    assert parse_budget(value) == expected


@pytest.mark.parametrize("budget,text", [(Bytes(8000), "7.8 KiB"), (Bytes(512 * 2**20), "512.0 MiB")])
def test_byte_budgets_print_in_a_unit_that_shows_them(budget, text):
    assert str(budget) == text  # a few KB printed as "0.0 MiB" in the plan and the warnings


@pytest.mark.parametrize("value,fragment", [
    ("0.5bit", "outside 1 to 8 bits"), ("16bit", "outside 1 to 8 bits"), (1.5, "outside (0, 1]"),
    (0.0, "outside (0, 1]"), (-5, "negative"), ("lots", "cannot read"), ("12 parsecs", "cannot read"),
    (True, "not a budget"), ([2], "cannot read"),
    # an int this small is a slip for '1bit' or 1.0: the message says which is which
    (0, "'1bit'"), (1, "a float like 1.0"), (100, "almost surely a mistake"), ("1", "1 bytes"), ("1kb", "1000 bytes"),
])
def test_bad_budgets_name_the_value_and_the_valid_forms(value, fragment):
    with pytest.raises(ActcOptionError) as e:
        ActcConfig.from_options({"memory_budget": value}, env={})
    message = str(e.value)
    assert "memory_budget" in message and repr(value) in message and fragment in message
    assert "'2bit'" in message and "'512MB'" in message  # says what is valid


def test_unknown_key_suggests_the_closest():
    with pytest.raises(ActcOptionError, match=r"'memory_budgt'.*did you mean 'memory_budget'"):
        ActcConfig.from_options({"memory_budgt": "2bit"}, env={})
    with pytest.raises(ActcOptionError, match=r"unknown actc option 'zzz'.*Valid options: memory_budget"):
        ActcConfig.from_options({"zzz": 1}, env={})


@pytest.mark.parametrize("key,value,fragment", [
    ("group_size", 100, "power of two"), ("group_size", 2048, "power of two"), ("group_size", True, "power of two"),
    ("bits", [3], "drawn from"), ("bits", [], "drawn from"), ("min_bytes", -1, ">= 0"),
    ("keep_uncompressed", "yes", "True or False"), ("compress_masks", 1, "True or False"), ("dump_dir", 5, "directory"),
    ("recompute_credit", "no", "True or False"),
    ("allocation", "greedy", "'adaptive' or 'static'"), ("warmup_steps", 0, ">= 1"), ("warmup_steps", 2.5, ">= 1"),
    ("replan_every", -1, ">= 0"), ("replan_every", "often", ">= 0"),
    ("sensitivity", "adam", "'relative' or 'absolute'"),
])
def test_each_bad_value_has_its_own_error(key, value, fragment):
    with pytest.raises(ActcOptionError) as e:
        ActcConfig.from_options({key: value}, env={})
    assert repr(key) in str(e.value) and repr(value) in str(e.value) and fragment in str(e.value)


def test_env_var_is_used_and_the_option_wins():
    assert ActcConfig.from_options(None, env={ENV_BUDGET: "4bit"}).memory_budget == AverageBits(4.0)
    assert ActcConfig.from_options({"memory_budget": 0.2}, env={ENV_BUDGET: "4bit"}).memory_budget == Fraction(0.2)
    with pytest.raises(ActcOptionError, match="environment variable.*ACTC_MEMORY_BUDGET.*'huge'"):
        ActcConfig.from_options(None, env={ENV_BUDGET: "huge"})


def test_config_is_frozen_and_hashable():
    config = ActcConfig.from_options({"bits": [8, 2, 2], "group_size": 64}, env={})
    assert config.bits == (2, 8) and config.group_size == 64
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.group_size = 32
    assert hash(config) == hash(ActcConfig.from_options({"bits": (2, 8), "group_size": 64}, env={}))
    assert ActcConfig.from_options(None, env={}).memory_budget == AverageBits(2.0)


def test_the_defaults_in_one_place():
    """What almost every user gets: 2 bits on average over the tensors that are saved, Inductor's recompute
    budget 0.3 (what it recomputes lowers memory: no recompute credit), static allocation (adaptive is opt-in:
    every re-plan on the benches kept the static plan, docs/results.md), groups of 128, masks exact."""
    config = ActcConfig.from_options({}, env={})
    assert config == ActcConfig(memory_budget=AverageBits(2.0), group_size=128, bits=(1, 2, 4, 8), min_bytes=16384,
                                keep_uncompressed=True, compress_masks=True, dump_dir=None, allocation="static",
                                warmup_steps=20, replan_every=100, sensitivity="relative", recompute=None,
                                recompute_credit=False)
    # Inductor recomputes under a budget of 0.3 (config.RECOMPUTE_ON, docs/results.md) unless torch's own
    # activation_memory_budget is set or the option says otherwise
    assert (config.recompute_budget(1.0), config.recompute_budget(0.5)) == (0.3, 0.5)
    assert ActcConfig.from_options({"recompute": False}, env={}).recompute_budget(1.0) == 1.0
    assert config.summary() == "budget=2bit group=128 bits=[1, 2, 4, 8] min_bytes=16384 allocation=static"
