"""What counts as a number in a user's argument, in one place for every
module that checks one: a bool is not a number here (True would otherwise
pass as 1), and a real must be finite unless the caller says otherwise."""
from __future__ import annotations

import math
from numbers import Real


def is_int(value) -> bool:
    """An int, not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_real(value, finite: bool = True) -> bool:
    """A real number (int, float, numpy scalar), not a bool; finite unless `finite` is False."""
    return (isinstance(value, Real) and not isinstance(value, bool)
            and (not finite or math.isfinite(value)))
