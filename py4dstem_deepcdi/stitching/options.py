"""Options of the offset solve: one small frozen dataclass that checks itself."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field, fields, replace

METHODS = ("lsq", "relaxation")


@dataclass(frozen=True)
class StitchOptions:
    """How the per-patch offsets of paper Eq. 2 are solved.

    Every field carries a one-line ``metadata["help"]`` (for command-line parsers built from the fields).

    Attributes
    ----------
    method:
        ``"lsq"`` (default): the exact least-squares solution, by preconditioned conjugate gradients.
        ``"relaxation"``: the paper's ``n_iter`` damped sweeps of step ``step``.
    min_overlap:
        Two patches form a pair when their masks, at the relative position rounded to whole pixels, overlap by at
        least this fraction of the mask area; in (0, 1], default 0.25.
    n_iter:
        Relaxation sweeps (``method="relaxation"``); >= 0, default 3 (the paper's).
    step:
        Relaxation step, the fraction of the mean mismatch removed per sweep; in (0, 1], default 0.1 (the paper's).
    tol:
        Relative residual ``|H x - g| / |g|`` of the normal equations at which conjugate gradients stop
        (``method="lsq"``); > 0, default 1e-8.
    max_iter:
        Cap on the conjugate-gradient iterations (``method="lsq"``); >= 1, default 1000.

    Raises
    ------
    ValueError
        A field outside its range (raised on construction).
    """

    method: str = field(default="lsq", metadata={
        "help": "offset solver: 'lsq' (exact least squares) or 'relaxation' (the paper's damped sweeps)",
        "flag": "--stitching", "choices": METHODS})
    min_overlap: float = field(default=0.25, metadata={
        "help": "least mask overlap of a pair, as a fraction of the mask area, in (0, 1]"})
    n_iter: int = field(default=3, metadata={
        "help": "relaxation sweeps (method 'relaxation')", "flag": "--relaxation-sweeps"})
    step: float = field(default=0.1, metadata={
        "help": "relaxation step, in (0, 1] (method 'relaxation')", "flag": "--relaxation-step"})
    tol: float = field(default=1e-8, metadata={
        "help": "relative residual at which conjugate gradients stop (method 'lsq')", "flag": "--cg-tol"})
    max_iter: int = field(default=1000, metadata={
        "help": "most conjugate-gradient iterations (method 'lsq')", "flag": "--cg-max-iter"})

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        for name in ("min_overlap", "n_iter", "step", "tol", "max_iter"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise ValueError(f"{name} must be a number, got {value!r}")
        if not (0.0 < float(self.min_overlap) <= 1.0):
            raise ValueError(f"min_overlap must be in (0, 1] (a fraction of the mask area), got {self.min_overlap}")
        if not (math.isfinite(self.n_iter) and int(self.n_iter) == self.n_iter and self.n_iter >= 0):
            raise ValueError(f"n_iter must be an integer >= 0, got {self.n_iter}")
        if not (0.0 < float(self.step) <= 1.0):
            raise ValueError(f"step must be in (0, 1] for a stable relaxation, got {self.step}")
        if not float(self.tol) > 0.0:
            raise ValueError(f"tol must be > 0, got {self.tol}")
        if not (math.isfinite(self.max_iter) and int(self.max_iter) == self.max_iter and self.max_iter >= 1):
            raise ValueError(f"max_iter must be an integer >= 1, got {self.max_iter}")


def field_names() -> tuple[str, ...]:
    """The names of :class:`StitchOptions`' fields, in declaration order."""
    return tuple(f.name for f in fields(StitchOptions))


def resolve_options(options: StitchOptions | None, keywords: dict, caller: str) -> StitchOptions:
    """``options`` (default: ``StitchOptions()``) with the fields named in ``keywords`` replaced.

    Raises
    ------
    TypeError
        ``options`` is not a :class:`StitchOptions`, or a keyword is not one of its fields (the message names
        ``caller`` and the valid keywords).
    ValueError
        A resulting field is outside its range.
    """
    if options is None:
        options = StitchOptions()
    elif not isinstance(options, StitchOptions):
        raise TypeError(f"{caller}() options must be a StitchOptions, got {type(options).__name__}")
    valid = field_names()
    unknown = sorted(set(keywords) - set(valid))
    if unknown:
        raise TypeError(
            f"{caller}() got unexpected keyword argument(s) {', '.join(map(repr, unknown))}; "
            f"the options are {', '.join(valid)}"
        )
    return replace(options, **keywords) if keywords else options
