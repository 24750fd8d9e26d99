"""String options checked against an enum, with the field and the bad value in the error."""

from __future__ import annotations

import enum
from typing import TypeVar

__all__ = ["parse_choice"]

Choice = TypeVar("Choice", bound=enum.Enum)


def parse_choice(enum_class: type[Choice], value: object, field: str) -> Choice:
    """``enum_class(value)``, or a ``ValueError`` listing the options.

    Example:
        >>> from enn_neuro.data.cohort import Task
        >>> parse_choice(Task, "survival", "task")
        Traceback (most recent call last):
        ValueError: task must be one of ['classification', 'regression'], got 'survival'

    Raises:
        ValueError: ``"<field> must be one of [...], got <value>"``.
    """
    try:
        return enum_class(value)
    except ValueError:
        options = [member.value for member in enum_class]
        raise ValueError(f"{field} must be one of {options}, got {value!r}") from None
