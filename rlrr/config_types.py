"""The value types of the run schema (rlrr.config) and the one check of a value against its type:
``Optional``, ``Literal`` choices, and numbers ``Annotated`` with a ``Range``. A failed check is a
ConfigError naming the source, the key and what was expected."""
import dataclasses
import math
import typing
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Optional


class ConfigError(ValueError):
    pass


@dataclass(frozen=True)
class Range:
    """Allowed numbers of a field, attached with ``Annotated[int, Range(1)]``."""
    low: float
    high: float = math.inf
    high_open: bool = True
    low_open: bool = False

    def __contains__(self, v) -> bool:
        above = v > self.low if self.low_open else v >= self.low
        below = v < self.high if self.high_open else v <= self.high
        return above and below

    def describe(self, kind: type) -> str:
        noun = "an integer" if kind is int else "a number"
        if self.high == math.inf:
            return f"{noun} {'>' if self.low_open else '>='} {self.low:g}"
        return f"{noun} in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"


PositiveInt = Annotated[int, Range(1)]
Count = Annotated[int, Range(0)]  # 0 allowed (0 = off, where the comment says so)
PositiveFloat = Annotated[float, Range(0, low_open=True)]
NonNegativeFloat = Annotated[float, Range(0)]
Rate = Annotated[float, Range(0, 1)]
RecipeName = Literal["vtab", "fgvc"]  # the input transforms (rlrr.data.transforms)
DecodeOn = Literal["workers", "device"]  # where streamed images are decoded (rlrr.data.loader)
Stats = Literal["half", "imagenet"]  # the normalisation: mean = std = 0.5 (the reference), or ImageNet's


def choices(hint) -> Optional[tuple]:
    """The allowed values of a ``Literal`` (or ``Optional[Literal]``) type, else None."""
    if typing.get_origin(hint) is typing.Union:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return typing.get_args(hint) if typing.get_origin(hint) is Literal else None


def check_value(value: Any, hint, key: str, source: str):
    """``value`` checked against the type ``hint`` (Optional, Annotated with a Range, Literal, or a
    plain type); int -> float widened, and a float written as YAML 1.1 reads it ("2e-3", a string)
    parsed. ConfigError otherwise."""
    if typing.get_origin(hint) is typing.Union:  # Optional[X]
        if value is None:
            return None
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    if typing.get_origin(hint) is Annotated:
        hint, bounds = typing.get_args(hint)
        value = check_value(value, hint, key, source)
        if value not in bounds:
            raise ConfigError(f"{source}: {key} = {value!r}: expected {bounds.describe(hint)}")
        return value
    if hint is float and isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    allowed = choices(hint)
    if allowed is not None:
        # type too: YAML's true must not pass for 1, nor 1 for true
        if not any(type(value) is type(a) and value == a for a in allowed):
            raise ConfigError(f"{source}: {key} = {value!r}: expected one of {', '.join(map(str, allowed))}")
        return value
    expected = getattr(hint, "__name__", str(hint))
    ok = (isinstance(value, bool) if hint is bool else
          isinstance(value, int) and not isinstance(value, bool) if hint is int else
          isinstance(value, (int, float)) and not isinstance(value, bool) if hint is float else
          isinstance(value, hint))
    if not ok:
        raise ConfigError(f"{source}: {key} = {value!r}: expected {expected}")
    return float(value) if hint is float else value


def check_dataclass(obj, source: str) -> None:
    """Every field of a (frozen) dataclass instance against its type; for the library's own option classes."""
    hints = typing.get_type_hints(type(obj), include_extras=True)
    for f in dataclasses.fields(obj):
        check_value(getattr(obj, f.name), hints[f.name], f.name, source)
