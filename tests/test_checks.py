"""conspo.checks: each validator accepts exactly its range and refuses the rest with one line naming the field."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest

from conspo import checks


def test_choice_returns_the_value_and_lists_the_accepted_ones():
    assert checks.choice("mode", "b", ("a", "b")) == "b"
    with pytest.raises(ValueError) as err:
        checks.choice("mode", "c", ("a", "b"))
    assert str(err.value) == "mode='c' is not supported; accepted values: 'a', 'b'"
    with pytest.raises(ValueError, match="accepted values: 'a'$"):
        checks.choice("mode", ["a"], iter(["a"]))  # a list is not a string; a generator of choices works


@pytest.mark.parametrize("value", [1e-300, 0.5, 3, 1e300])
def test_positive_accepts_finite_numbers_above_zero(value):
    assert checks.positive("delta", value) == float(value)
    assert type(checks.positive("delta", value)) is float


@pytest.mark.parametrize("value", [0, 0.0, -1e-9, math.inf, math.nan, True, "1", None])
def test_positive_refuses_the_rest(value):
    with pytest.raises(ValueError) as err:
        checks.positive("delta", value)
    assert str(err.value) == f"delta must be a positive finite number, got {value!r}"


@pytest.mark.parametrize("value, ok", [(-1e9, True), (0, True), (math.inf, False), (-math.inf, False),
                                       (math.nan, False), (False, False), ("0", False)])
def test_finite(value, ok):
    if ok:
        assert checks.finite("threshold", value) == value
    else:
        with pytest.raises(ValueError, match=r"^threshold must be a finite number, got "):
            checks.finite("threshold", value)


def test_at_least_inclusive_and_exclusive():
    assert checks.at_least("m", 0, 0) == 0.0
    assert checks.at_least("m", 0.25, 0, inclusive=False) == 0.25
    with pytest.raises(ValueError) as err:
        checks.at_least("m", 0.0, 0, inclusive=False)
    assert str(err.value) == "m must be a finite number > 0, got 0.0"
    with pytest.raises(ValueError) as err:
        checks.at_least("m", -0.1, 0)
    assert str(err.value) == "m must be a finite number >= 0, got -0.1"
    for bad in (math.inf, math.nan, True, "1"):
        with pytest.raises(ValueError, match="m must be a finite number >= 0"):
            checks.at_least("m", bad, 0)


def _reference_in_range(value, low, high, low_open, high_open, integer):
    """Membership written out case by case, independent of checks.in_range."""
    if type(value) not in ((int,) if integer else (int, float)):
        return False
    if value != value or value in (math.inf, -math.inf):
        return False
    above = True if low is None else (value > low if low_open else value >= low)
    below = True if high is None else (value < high if high_open else value <= high)
    return above and below


@pytest.mark.parametrize("low, high, low_open, high_open, integer", [
    (0, None, False, False, False), (0, None, True, False, False), (0, 1, True, False, False),
    (0, 1, False, True, False), (None, 1, False, False, False), (1, None, False, False, True),
    (2, 5, False, True, True),
])
def test_in_range_matches_the_written_out_interval(low, high, low_open, high_open, integer):
    values = [-2, -1, -0.5, 0, 1e-12, 0.5, 1, 1.0, 1.5, 2, 2.0, 3, 4.9, 5, 6, math.inf, -math.inf, math.nan, True]
    for value in values:
        if _reference_in_range(value, low, high, low_open, high_open, integer):
            assert checks.in_range("x", value, low, high, low_open=low_open, high_open=high_open,
                                   integer=integer) == value
        else:
            with pytest.raises(ValueError, match=r"^x must be (an integer|a finite number) in [\[(]"):
                checks.in_range("x", value, low, high, low_open=low_open, high_open=high_open, integer=integer)


@pytest.mark.parametrize("kwargs, message", [
    (dict(low=0), "x must be a finite number in [0, inf), got -1"),
    (dict(low=0, high=1, low_open=True), "x must be a finite number in (0, 1], got -1"),
    (dict(high=1, high_open=True), "x must be a finite number in (-inf, 1), got 2"),
    (dict(low=1, integer=True), "x must be an integer in [1, inf), got -1"),
])
def test_in_range_writes_the_interval_in_the_message(kwargs, message):
    bad = 2 if kwargs.get("high_open") else -1
    with pytest.raises(ValueError) as err:
        checks.in_range("x", bad, **kwargs)
    assert str(err.value) == message


def test_probability_and_its_open_ends():
    assert checks.probability("p", 0) == 0.0 and checks.probability("p", 1) == 1.0
    for bad, kwargs in ((0, dict(low_open=True)), (1, dict(high_open=True)), (1.01, {}), (-0.01, {})):
        with pytest.raises(ValueError, match=r"^p must be a finite number in [\[(]0, 1[\])]"):
            checks.probability("p", bad, **kwargs)


def test_integer():
    assert checks.integer("n", 3, 1) == 3
    for bad in (0, 1.0, True, "2"):
        with pytest.raises(ValueError) as err:
            checks.integer("n", bad, 1)
        assert str(err.value) == f"n must be an integer >= 1, got {bad!r}"


def test_imports_without_torch():
    code = "import sys; sys.modules['torch'] = None; import conspo.checks; print('ok')"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "ok", result.stderr
