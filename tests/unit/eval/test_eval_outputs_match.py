"""The stdin/stdout checker: CodeContests' token comparison, on fixed cases and random outputs."""

from __future__ import annotations

import math
import random

import pytest

from weighted_mtp.eval.sandbox import outputs_match


@pytest.mark.parametrize(
    "output,expected,match",
    [
        ("3\n", "3", True),
        ("1 2\r\n3\t4  \n\n", "1 2\n3 4\n", True),  # line ends, tabs, blank lines
        ("YES", "yes", True),  # case-insensitive, as the reference checker lowercases
        ("0.3333333", "0.333333333", True),  # |diff| < 1e-5
        ("0.33", "0.333", False),
        ("1", "1.0000000", True),  # an integer and a decimal: numeric comparison
        ("+5", "5", True),
        ("1e-7", "0", True),
        ("12345678901234567890", "12345678901234567891", False),  # integers exactly, however large
        ("1 2", "1 2 3", False),
        ("", "\n", True),
        ("", "0", False),
        ("nan", "nan", True),  # identical tokens
        ("abc", "abd", False),
        ("1_000", "1000", False),  # Python's float() accepts this; the checker does not
        ("0x10", "16", False),
    ],
)
def test_cases(output: str, expected: str, match: bool) -> None:
    assert outputs_match(output, expected) is match


def reference_match(output: str, expected: str) -> bool:
    """Straightforward restatement: parse each token as int, else float, else keep the string."""

    def value(token: str):
        token = token.lower()
        if token.lstrip("+-").isdigit() and token.count("-") + token.count("+") <= 1:
            return int(token)
        try:
            number = float(token)
        except ValueError:
            return token
        return token if "_" in token or not math.isfinite(number) else number

    got, want = output.split(), expected.split()
    if len(got) != len(want):
        return False
    for a, b in zip(got, want):
        va, vb = value(a), value(b)
        if a.lower() == b.lower():
            continue
        if isinstance(va, str) or isinstance(vb, str):
            return False
        if isinstance(va, int) and isinstance(vb, int):
            if va != vb:
                return False
        elif not abs(va - vb) < 1e-5:
            return False
    return True


def test_random_outputs_against_reference() -> None:
    rng = random.Random(0)
    tokens = ["0", "1", "-1", "+1", "10", "1.0", "0.999995", "1.000004", "1.00002", "3.14159", "yes", "YES", "No",
              "1e3", "1000", "1E3", "-0", "0.0", "abc", ".5", "0.5", "5."]
    spaces = [" ", "\n", "\r\n", "\t", "  "]
    for _ in range(3000):
        n = rng.randint(0, 4)
        got = [rng.choice(tokens) for _ in range(n)]
        want = [rng.choice(tokens) for _ in range(n + rng.choice([0, 0, 0, 1]))]
        output = "".join(t + rng.choice(spaces) for t in got)
        expected = rng.choice(spaces).join(want) + "\n"
        assert outputs_match(output, expected) == reference_match(output, expected), (output, expected)
