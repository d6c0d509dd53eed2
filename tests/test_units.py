"""Byte units: the documented convention (G = GiB = 2^30, GB = 10^9) and the errors a person sees."""

import pytest

from autobatch import cli
from autobatch.errors import ConfigError
from autobatch.units import format_bytes, parse_bytes


@pytest.mark.parametrize(
    ("text", "expected"),
    [("12G", 12 * 2**30), ("12g", 12 * 2**30), ("12GiB", 12 * 2**30), ("12GB", 12 * 10**9), ("12gb", 12 * 10**9),
     ("1K", 2**10), ("1KB", 10**3), ("1M", 2**20), ("1MB", 10**6), ("1T", 2**40), ("1TB", 10**12), ("7", 7)],
)
def test_a_bare_letter_is_binary_and_an_si_unit_decimal(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["-5GiB", "-1", -1, "0", 0, "0.1", "1e-3"])
def test_a_size_that_is_not_positive_says_so(text):
    with pytest.raises(ConfigError, match=r"^memory_budget must be a positive size, got .*: write e\.g\. 300MiB"):
        parse_bytes(text, "memory_budget")


def test_format_bytes_reads_back():
    assert parse_bytes(format_bytes(300 * 2**20)) == 300 * 2**20


@pytest.mark.parametrize("value", ["-5GiB", "-.5G"])
def test_a_negative_budget_on_the_command_line_gets_one_line_not_argparse(value, capsys):
    assert cli.main(["plan", "--device", "estimate", "--memory-budget", value]) == 2
    err = capsys.readouterr().err
    assert f"--memory-budget must be a positive size, got '{value}'" in err
    assert "expected one argument" not in err


def test_a_dash_value_after_a_switch_is_left_to_argparse():
    assert cli._join_dash_values(["--find-max", "-5", "--memory-budget", "-5G"]) == [
        "--find-max", "-5", "--memory-budget=-5G"]


def test_help_states_the_unit_convention(capsys):
    with pytest.raises(SystemExit):
        cli.main(["plan", "--help"])
    assert "G = GiB = 2^30 bytes, GB = 10^9" in " ".join(capsys.readouterr().out.split())
