"""Subject attributes (age, sex, any covariate) -> the normalised vector the template network reads.

Numeric attributes are standardised with the training cohort's mean and spread; categorical ones
(e.g. sex) become one-hot codes. The encoder is saved in the model's configuration so a model file
alone knows which attributes it takes, their ranges and their categories.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ..errors import AtlasMorphError

SEX_ALIASES = {"f": "F", "female": "F", "w": "F", "m": "M", "male": "M"}


def canonical_category(name: str, value: str) -> str:
    """Normalise spellings of categorical values (sex: f/female -> F, m/male -> M)."""
    v = str(value).strip()
    if name == "sex":
        return SEX_ALIASES.get(v.lower(), v)
    return v


@dataclass
class AttributeSpec:
    """One attribute: numeric (mean, std, min, max seen in training) or categorical (its categories)."""

    name: str
    kind: str  # "numeric" | "categorical"
    mean: float = 0.0
    std: float = 1.0
    min: float = 0.0
    max: float = 0.0
    categories: list[str] = field(default_factory=list)

    @property
    def width(self) -> int:
        return 1 if self.kind == "numeric" else len(self.categories)


@dataclass
class AttributeEncoder:
    """Encodes attribute dictionaries into vectors, with the checks a user needs at the command line."""

    specs: list[AttributeSpec]

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.specs]

    @property
    def width(self) -> int:
        return sum(s.width for s in self.specs)

    @classmethod
    def fit(cls, names: list[str], rows: list[dict[str, str]]) -> "AttributeEncoder":
        """Learn each attribute's kind and normalisation from the training rows."""
        specs = []
        for name in names:
            values = [r[name] for r in rows]
            nums = [_as_float(v) for v in values]
            if all(n is not None for n in nums):
                arr = np.array(nums, dtype=np.float64)
                std = float(arr.std()) or 1.0
                specs.append(
                    AttributeSpec(name, "numeric", float(arr.mean()), std, float(arr.min()), float(arr.max()))
                )
            else:
                cats = sorted({canonical_category(name, v) for v in values})
                specs.append(AttributeSpec(name, "categorical", categories=cats))
        return cls(specs)

    def parse(self, values: dict[str, object]) -> tuple[dict[str, object], list[str]]:
        """Validate user values; returns canonical values and warnings (e.g. age outside training range)."""
        out: dict[str, object] = {}
        warnings: list[str] = []
        for s in self.specs:
            if s.name not in values or values[s.name] is None:
                raise AtlasMorphError(f"missing attribute '{s.name}' (this model takes: {', '.join(self.names)})")
            raw = values[s.name]
            if s.kind == "numeric":
                x = _as_float(raw)
                if x is None or not math.isfinite(x):
                    raise AtlasMorphError(f"{s.name} must be a number, got '{raw}'")
                if s.name == "age" and (x < 0 or x > 130):
                    raise AtlasMorphError(f"age must be between 0 and 130 years, got {x:g}")
                if x < s.min or x > s.max:
                    warnings.append(
                        f"{s.name}={x:g} is outside the training range {s.min:g}-{s.max:g}; "
                        "the template is extrapolated"
                    )
                out[s.name] = x
            else:
                c = canonical_category(s.name, str(raw))
                if c not in s.categories:
                    raise AtlasMorphError(
                        f"unknown {s.name} '{raw}' (this model knows: {', '.join(s.categories)})"
                    )
                out[s.name] = c
        return out, warnings

    def encode(self, values: dict[str, object]) -> np.ndarray:
        """The network input vector for already-validated values."""
        parts: list[float] = []
        for s in self.specs:
            v = values[s.name]
            if s.kind == "numeric":
                parts.append((float(v) - s.mean) / s.std)
            else:
                parts.extend(1.0 if canonical_category(s.name, str(v)) == c else 0.0 for c in s.categories)
        return np.asarray(parts, dtype=np.float32)

    def numeric_columns(self) -> np.ndarray:
        """(width,) bool: which encoded columns hold numeric attributes (0 there is the training mean)."""
        return np.asarray([s.kind == "numeric" for s in self.specs for _ in range(s.width)], dtype=bool)

    def encode_average(self) -> np.ndarray:
        """Vector for the population-average template: mean numeric values, equal mix of categories."""
        parts: list[float] = []
        for s in self.specs:
            if s.kind == "numeric":
                parts.append(0.0)
            else:
                parts.extend([1.0 / len(s.categories)] * len(s.categories))
        return np.asarray(parts, dtype=np.float32)

    def to_dict(self) -> list[dict]:
        return [s.__dict__.copy() for s in self.specs]

    def check_names(self, values: dict[str, object] | None, given: str = "--age/--sex/--attr") -> None:
        """Refuse attribute names this model does not take (a typo such as 'Age' would otherwise be ignored)."""
        unknown = [k for k in (values or {}) if k not in self.names]
        if unknown:
            takes = ", ".join(self.names) or "none (an unconditional model)"
            raise AtlasMorphError(f"{given}: unknown attribute '{unknown[0]}' (this model takes: {takes})")

    @classmethod
    def from_dict(cls, d: list[dict]) -> "AttributeEncoder":
        specs = [AttributeSpec(**s) for s in d]
        for s in specs:  # a damaged or hand-edited model file: refuse it at load, not with NaN templates
            if s.kind == "numeric" and not (math.isfinite(s.mean) and math.isfinite(s.std) and s.std > 0):
                raise ValueError(f"attribute '{s.name}' has mean {s.mean} and std {s.std} (std must be finite and > 0)")
            if s.kind == "categorical" and not s.categories:
                raise ValueError(f"attribute '{s.name}' has no categories")
            if s.kind not in ("numeric", "categorical"):
                raise ValueError(f"attribute '{s.name}' has unknown kind '{s.kind}'")
        return cls(specs)


def _as_float(v: object) -> float | None:
    try:
        return float(v)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
