"""The one shape of config error: a `ValueError` naming the field, its value and what is allowed."""

from __future__ import annotations

import math
from typing import Any


def field_error(field: str, value: Any, allowed: str) -> ValueError:
    return ValueError(f"{field}={value!r} is not allowed: {allowed}")


def is_finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
