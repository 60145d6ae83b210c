"""The ranges of numeric settings, in one place: read by argparse when a flag is parsed and by
RunConfig whenever settings are built (from flags, a checkpoint or code).

Not a paper section. Imports nothing heavy, so the scripts can parse their flags before NumPy loads.

    WHOLE(1)                 a whole number >= 1
    NUMBER(0, low_open=True) a finite number > 0
    Range(.., what=...)      any other interval, with the words its error message uses
"""
from __future__ import annotations

import argparse
import math


class Range:
    """Numbers of one kind (int or float) in [low, high] (either end open or absent)."""

    def __init__(self, kind, low=None, high=None, low_open: bool = False, what: str | None = None):
        self.kind, self.low, self.high, self.low_open = kind, low, high, low_open
        words = "a whole number" if kind is int else "a finite number"
        if what is None:
            what = words if low is None else f"{words} {'>' if low_open else '>='} {low:g}"
            if high is not None:
                what = f"{words} from {low:g} to {high:g}"
        self.what = what

    def ok(self, value) -> bool:
        """Whether value (a number of any type, or anything else) is in the range."""
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if not math.isfinite(value) or (self.kind is int and value != int(value)):
            return False
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return self.high is None or value <= self.high

    def __call__(self, text: str):
        """argparse's type=: the flag's text as a number in the range, or a one-line error."""
        try:
            value = self.kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {self.what}") from None
        if not self.ok(value):
            raise argparse.ArgumentTypeError(f"{text} is not {self.what}")
        return value


def WHOLE(low: int = 0) -> Range:
    return Range(int, low)


def NUMBER(low: float = 0.0, low_open: bool = False, what: str | None = None) -> Range:
    return Range(float, low, low_open=low_open, what=what)


POSITIVE_INT = WHOLE(1)
NONNEGATIVE_INT = WHOLE(0)
POSITIVE = NUMBER(0.0, low_open=True)
NONNEGATIVE = NUMBER(0.0)
