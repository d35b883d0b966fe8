"""Dose: thinning counts to a lower dose, and whether a dose lies in the range a model was trained for.

    thinned counts ~ Binomial(counts, f):  if counts ~ Poisson(λ) then thinned ~ Poisson(f·λ)  (exact)
"""

from __future__ import annotations

import math

import numpy as np

#: a dose may lie this factor outside a model's trained range before the reconstruction warns
DOSE_TOLERANCE = 1.1
#: the largest count a pixel may hold for thinning (binomial draws take 64-bit integers)
MAX_COUNTS = 2.0**62


def thin_counts(counts: np.ndarray, fraction: float, rng: np.random.Generator | int | None = None) -> np.ndarray:
    """Counts at ``fraction`` of the dose: every electron kept with probability ``fraction`` (binomial thinning).

    For Poisson counts of mean λ the result is exactly Poisson with mean ``fraction·λ``: the same data as a scan at
    the lower dose, with the same object and probe.

    Parameters
    ----------
    counts
        Detector counts (any shape), whole non-negative numbers (integer or float dtype).
    fraction
        Kept fraction of the electrons, in (0, 1].
    rng
        A numpy Generator or a seed.

    Returns
    -------
    Thinned counts, float32, the shape of ``counts``.

    Raises
    ------
    TypeError
        Counts that are not integers or floats (bool, complex, object), or a ``fraction`` that is not a number.
    ValueError
        ``fraction`` outside (0, 1], or counts that are negative, not finite, not whole numbers (e.g. already
        normalised or gain-corrected data: thin the raw counts) or beyond ``MAX_COUNTS``.
    """
    if isinstance(fraction, (bool, np.bool_)) or not isinstance(fraction, (int, float, np.integer, np.floating)):
        raise TypeError(f"fraction must be a number in (0, 1], got {fraction!r}")
    if not (math.isfinite(fraction) and 0 < fraction <= 1):
        raise ValueError(f"fraction must lie in (0, 1] (the kept share of the electrons), got {fraction!r}")
    counts = np.asarray(counts)
    if counts.dtype.kind not in "uif":
        raise TypeError(f"counts must be integers or floats (electrons), got dtype {counts.dtype}")
    if not np.all(np.isfinite(counts)) or counts.min(initial=0) < 0:
        raise ValueError("counts must be finite and non-negative")
    if counts.max(initial=0) > MAX_COUNTS:
        raise ValueError(f"counts up to {counts.max():.3g} exceed the {MAX_COUNTS:.3g} binomial thinning can draw")
    whole = np.rint(counts)
    if np.any(np.abs(counts - whole) > 1e-6):
        raise ValueError("thinning needs whole electron counts; these are fractional (normalised or gain-corrected?)")
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    return np.asarray(rng.binomial(whole.astype(np.int64), fraction)).astype(np.float32)


def dose_warning(electrons: float, trained_range: tuple[float, float] | None) -> str | None:
    """A message when ``electrons`` per pattern lies outside ``trained_range`` (by more than ``DOSE_TOLERANCE``).

    Returns None inside the range, or when the range is unknown (None).
    """
    if trained_range is None:
        return None
    lo, hi = trained_range
    if lo / DOSE_TOLERANCE <= electrons <= hi * DOSE_TOLERANCE:
        return None
    side = "below" if electrons < lo else "above"
    return (
        f"the data hold {electrons:.3g} e⁻ per pattern, {side} the {lo:.3g}–{hi:.3g} e⁻ the model was trained for: "
        "expect a worse image; train or fine-tune over this dose (deepcdi train --electrons MIN MAX)"
    )
