"""Action codecs: continuous action <-> the text a VLM reads and writes.

``encode(action) -> text`` makes SFT targets; ``decode(text) -> (action, valid)`` turns a VLM
answer into the prior a_v. ``decode`` is total: any string (empty, prose, a wrong count of
numbers, NaN, 1e9, another script) returns an action inside the bounds and never raises; when it
cannot read one it returns the middle of the bounds with ``valid=False``, and the COVR loop masks
that row out of the lambda term.

Kinds (:func:`make_codec`):

- ``numeric`` (DMC): one number per actuator, two decimals: ``"torques: [0.12, -0.80, 0.33]"``.
  Decoding reads the first ``[...]`` list (or, without brackets, every number in the text); it is
  valid when it holds exactly one finite number per actuator, each within the bounds give or take
  5 % of their range (then clipped).
- ``carla``: (throttle-brake, steer) as phrases, e.g. ``"accelerate moderately and steer slightly
  left"``; 7 levels per dimension.
- ``car_racing``: (steer, gas, brake), e.g. ``"steer slightly left, half gas, no brake"``.

Phrase codecs quantise each dimension to its nearest level when encoding, and decode by finding
exactly one of that dimension's phrases (case-insensitive, whitespace-normalised); a missing or
contradictory dimension makes the answer invalid. Levels are written in canonical units [-1, 1]
and mapped linearly onto each dimension's bounds.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

import numpy as np

CodecKind = Literal["numeric", "carla", "car_racing"]

_NUMBER = re.compile(r"[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?")
_BRACKETS = re.compile(r"\[([^\[\]]*)\]")
_TOLERANCE = 0.05  # share of a dimension's range a numeric answer may overshoot and still count


def _literal(text: str) -> str:
    """``text`` as a regular expression matching itself. Only the metacharacters are escaped
    (``re.escape`` also escapes spaces, which some servers' regex dialects refuse)."""
    return re.sub(r"([\\.^$*+?()\[\]{}|])", r"\\\1", text)


def _as_bounds(low, high) -> tuple[np.ndarray, np.ndarray]:
    low = np.asarray(low, dtype=np.float64).reshape(-1)
    high = np.asarray(high, dtype=np.float64).reshape(-1)
    if low.shape != high.shape or low.size == 0 or not np.all(high > low):
        raise ValueError(f"action bounds must be non-empty with high > low, got {low}, {high}")
    return low, high


class NumericCodec:
    """One number per action dimension (DMC torques).

    Args:
        low: Lower bounds, one per dimension.
        high: Upper bounds.
        label: Word before the list (``torques`` for DMC).
    """

    def __init__(self, low, high, label: str = "torques") -> None:
        self.low, self.high = _as_bounds(low, high)
        self.label = label

    @property
    def action_dim(self) -> int:
        return self.low.size

    def describe(self) -> str:
        """The answer format, for the prompt."""
        low, high = self.low.min(), self.high.max()
        return (
            f"Answer with the action only, as {self.label}: [v1, ..., v{self.action_dim}]: "
            f"{self.action_dim} numbers between {low:.2f} and {high:.2f}, two decimals each."
        )

    def encode(self, action) -> str:
        """``"torques: [0.12, -0.80]"`` with each value clipped to its bounds, two decimals."""
        values = np.clip(np.asarray(action, dtype=np.float64).reshape(-1), self.low, self.high)
        # "+ 0.0" turns -0.00 into 0.00 so equal actions always give equal text.
        return f"{self.label}: [{', '.join(f'{round(v, 2) + 0.0:.2f}' for v in values)}]"

    def answer_pattern(self) -> str:
        """A regular expression every :meth:`encode` output matches in full (for servers that
        constrain generation to it: guided decoding)."""
        digits = len(str(int(np.ceil(np.abs(np.concatenate([self.low, self.high])).max())))) or 1
        value = rf"-?[0-9]{{1,{digits}}}\.[0-9]{{2}}"
        return rf"{_literal(self.label)}: \[{value}(, {value}){{{self.action_dim - 1}}}\]"

    def decode(self, text: str) -> tuple[np.ndarray, bool]:
        """Read the action back; never raises."""
        middle = (self.low + self.high) / 2
        if not isinstance(text, str):
            return middle.astype(np.float32), False
        bracket = _BRACKETS.search(text)
        numbers = _NUMBER.findall(bracket.group(1) if bracket else text)
        if len(numbers) != self.action_dim:
            return middle.astype(np.float32), False
        values = np.array([float(n) for n in numbers])
        slack = _TOLERANCE * (self.high - self.low)
        ok = np.all(np.isfinite(values)) and np.all(
            (values >= self.low - slack) & (values <= self.high + slack)
        )
        if not ok:
            return middle.astype(np.float32), False
        return np.clip(values, self.low, self.high).astype(np.float32), True


@dataclass(frozen=True)
class Level:
    """One phrase and the canonical value in [-1, 1] it stands for."""

    phrase: str
    value: float


STEERING = (
    Level("steer sharply left", -0.8),
    Level("steer left", -0.4),
    Level("steer slightly left", -0.15),
    Level("go straight", 0.0),
    Level("steer slightly right", 0.15),
    Level("steer right", 0.4),
    Level("steer sharply right", 0.8),
)
"""CARLA's convention: negative steer turns left."""

CARLA_LONGITUDINAL = (
    Level("brake hard", -1.0),
    Level("brake moderately", -0.6),
    Level("brake gently", -0.3),
    Level("maintain speed", 0.0),
    Level("accelerate gently", 0.3),
    Level("accelerate moderately", 0.6),
    Level("accelerate fully", 1.0),
)
"""Throttle-brake in one axis: positive throttles, negative brakes."""

CAR_RACING_GAS = (
    Level("no gas", -1.0),
    Level("light gas", -0.4),
    Level("half gas", 0.0),
    Level("full gas", 1.0),
)
CAR_RACING_BRAKE = (
    Level("no brake", -1.0),
    Level("light brake", -0.4),
    Level("hard brake", 0.6),
)


class PhraseCodec:
    """Semantic phrases, one set of levels per action dimension.

    Args:
        low: Lower bounds, one per dimension.
        high: Upper bounds.
        dimensions: For each dimension, its levels (phrases must not contain one another across
            dimensions).
        joiner: Text between the dimensions' phrases.
    """

    def __init__(self, low, high, dimensions: tuple[tuple[Level, ...], ...], joiner: str) -> None:
        self.low, self.high = _as_bounds(low, high)
        if len(dimensions) != self.low.size:
            raise ValueError(f"{len(dimensions)} phrase sets for {self.low.size} action dimensions")
        self.dimensions = dimensions
        self.joiner = joiner

    @property
    def action_dim(self) -> int:
        return self.low.size

    def _to_canonical(self, action: np.ndarray) -> np.ndarray:
        return 2 * (action - self.low) / (self.high - self.low) - 1

    def _from_canonical(self, canonical: np.ndarray) -> np.ndarray:
        return self.low + (canonical + 1) / 2 * (self.high - self.low)

    def describe(self) -> str:
        """The answer format, for the prompt: every dimension's phrases."""
        choices = "; ".join(
            "one of " + ", ".join(f"'{level.phrase}'" for level in levels)
            for levels in self.dimensions
        )
        example = self.joiner.join(levels[len(levels) // 2].phrase for levels in self.dimensions)
        return f"Answer with one phrase per control, joined as in '{example}': {choices}."

    def encode(self, action) -> str:
        """Each dimension's nearest level, joined: ``"accelerate moderately and steer left"``."""
        values = np.clip(np.asarray(action, dtype=np.float64).reshape(-1), self.low, self.high)
        canonical = self._to_canonical(values)
        phrases = [
            min(levels, key=lambda level: abs(level.value - c)).phrase
            for levels, c in zip(self.dimensions, canonical, strict=True)
        ]
        return self.joiner.join(phrases)

    def answer_pattern(self) -> str:
        """A regular expression every :meth:`encode` output matches in full (guided decoding)."""
        choices = [
            "(" + "|".join(_literal(level.phrase) for level in levels) + ")"
            for levels in self.dimensions
        ]
        return _literal(self.joiner).join(choices)

    def decode(self, text: str) -> tuple[np.ndarray, bool]:
        """Find exactly one phrase per dimension; never raises."""
        middle = ((self.low + self.high) / 2).astype(np.float32)
        if not isinstance(text, str):
            return middle, False
        normalised = " ".join(text.lower().split())
        canonical = []
        for levels in self.dimensions:
            found = {level.value for level in levels if _contains_phrase(normalised, level.phrase)}
            if len(found) != 1:  # missing, or two different levels: contradictory
                return middle, False
            canonical.append(found.pop())
        action = self._from_canonical(np.array(canonical))
        return np.clip(action, self.low, self.high).astype(np.float32), True


def _contains_phrase(text: str, phrase: str) -> bool:
    """Whole-word match, so "steer left" is not found inside "steer leftwards"."""
    return re.search(rf"(?<![a-z]){re.escape(phrase)}(?![a-z])", text) is not None


def make_codec(kind: CodecKind, low, high) -> NumericCodec | PhraseCodec:
    """The codec an environment family uses.

    Args:
        kind: ``numeric`` (DMC), ``carla`` ((throttle-brake, steer)) or ``car_racing``
            ((steer, gas, brake)).
        low: Action lower bounds (array).
        high: Action upper bounds (array).

    Returns:
        An object with ``encode(action) -> str`` and ``decode(text) -> (action, valid)``.

    Raises:
        ValueError: Unknown kind, or bounds that do not fit the kind.
    """
    if kind == "numeric":
        return NumericCodec(low, high)
    if kind == "carla":
        return PhraseCodec(low, high, (CARLA_LONGITUDINAL, STEERING), joiner=" and ")
    if kind == "car_racing":
        return PhraseCodec(low, high, (STEERING, CAR_RACING_GAS, CAR_RACING_BRAKE), joiner=", ")
    raise ValueError(f"unknown codec kind {kind!r}; use numeric, carla or car_racing")


__all__ = ["Level", "NumericCodec", "PhraseCodec", "make_codec"]
