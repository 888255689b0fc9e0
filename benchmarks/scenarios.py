"""Traffic scenarios: input/output token-length distributions in genai-bench syntax.

Three forms, lengths in tokens:

- ``D(in,out)``: every request has exactly ``in`` prompt and ``out`` output tokens.
- ``N(mean_in,std_in)/(mean_out,std_out)``: normal distributions, rounded, clipped
  to at least one token.
- ``U(min_in,max_in)/(min_out,max_out)``: uniform integers, both ends included.

A scenario is a frozen value with a ``sample(rng, n)`` method; ``parse_scenario``
turns the string into it and refuses anything else with a message naming the forms.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

SCENARIO_FORMS = "D(in,out), N(mean_in,std_in)/(mean_out,std_out), U(min_in,max_in)/(min_out,max_out)"

_NUM = r"\s*(\d+(?:\.\d+)?)\s*"
_PAIR = rf"\({_NUM},{_NUM}\)"
_PATTERNS: dict[str, re.Pattern[str]] = {
    "D": re.compile(rf"^D{_PAIR}$"),
    "N": re.compile(rf"^N{_PAIR}/{_PAIR}$"),
    "U": re.compile(rf"^U{_PAIR}/{_PAIR}$"),
}


class ScenarioError(ValueError):
    """A traffic scenario string that does not parse or is out of range."""


@dataclass(frozen=True)
class Scenario:
    """One traffic scenario; ``params`` holds the numbers in the order written."""

    kind: str
    params: tuple[float, ...]

    @property
    def label(self) -> str:
        fmt = [f"{p:g}" for p in self.params]
        if self.kind == "D":
            return f"D({fmt[0]},{fmt[1]})"
        return f"{self.kind}({fmt[0]},{fmt[1]})/({fmt[2]},{fmt[3]})"

    def sample(self, rng: np.random.Generator, n: int) -> list[tuple[int, int]]:
        """``n`` (input_len, output_len) pairs, each length at least one token."""
        inputs, outputs = _SAMPLERS[self.kind](self.params, rng, n)
        return [(max(1, int(i)), max(1, int(o))) for i, o in zip(inputs, outputs, strict=True)]


def _sample_d(p: tuple[float, ...], rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    return np.full(n, p[0]), np.full(n, p[1])


def _sample_n(p: tuple[float, ...], rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    inputs = np.rint(rng.normal(p[0], p[1], n))
    outputs = np.rint(rng.normal(p[2], p[3], n))
    return inputs, outputs


def _sample_u(p: tuple[float, ...], rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    inputs = rng.integers(int(p[0]), int(p[1]), n, endpoint=True)
    outputs = rng.integers(int(p[2]), int(p[3]), n, endpoint=True)
    return inputs, outputs


_SAMPLERS: dict[str, Callable[..., tuple[np.ndarray, np.ndarray]]] = {
    "D": _sample_d,
    "N": _sample_n,
    "U": _sample_u,
}


def _check(kind: str, params: tuple[float, ...], text: str) -> None:
    if kind in ("D", "U") and any(p != int(p) for p in params):
        raise ScenarioError(f"traffic scenario {text!r}: {kind} lengths must be integers")
    if kind == "D" and min(params) < 1:
        raise ScenarioError(f"traffic scenario {text!r}: lengths must be >= 1")
    if kind == "N" and (params[0] < 1 or params[2] < 1):
        raise ScenarioError(f"traffic scenario {text!r}: means must be >= 1")
    if kind == "U":
        if min(params) < 1:
            raise ScenarioError(f"traffic scenario {text!r}: lengths must be >= 1")
        if params[0] > params[1] or params[2] > params[3]:
            raise ScenarioError(f"traffic scenario {text!r}: min must not exceed max")


def parse_scenario(text: str) -> Scenario:
    """Parse one genai-bench traffic scenario string; raises ``ScenarioError``."""
    compact = text.replace(" ", "")
    for kind, pattern in _PATTERNS.items():
        match = pattern.match(compact)
        if match:
            params = tuple(float(g) for g in match.groups())
            _check(kind, params, text)
            return Scenario(kind=kind, params=params)
    raise ScenarioError(f"bad traffic scenario {text!r}; expected one of: {SCENARIO_FORMS}")
