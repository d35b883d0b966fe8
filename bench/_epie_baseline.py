"""ePIE at the iteration count where it stops improving: the honest baseline of ``bench/compare.py`` and
``bench/multislice.py`` (issue 16).

ePIE runs once for ``n`` iterations, keeping the object after every iteration (py4DSTEM's ``store_iterations``). Its
correlation with the truth is read at the counts of :func:`scored_counts` (1, 2, 3, 5, 10 up to ``n``, and ``n``);
the baseline is the fewest of them within ``CONVERGED_WITHIN`` of the best of them
(:func:`py4dstem_deepcdi.comparison.result.converged_iterations`). Its image is the object after that iteration,
scored again against deep CDI and the truth by ``compare_with_epie``; its time is the run's ``reconstruct`` time × k /
n (py4DSTEM's time per iteration is constant). Every speed ratio of the bench scripts is against this time.

    baseline = run_baselines(recon, ground_truth, num_iter=10)[0]
    baseline.iterations, baseline.seconds, baseline.ratio_text(deep_cdi_s)     # k, ePIE's s at k, "…× (deep CDI …)"
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from py4dstem_deepcdi.comparison import Comparison, EPIEResult, compare_with_epie
from py4dstem_deepcdi.comparison.result import converged_iterations

#: ePIE iteration counts at which its correlation with the truth is read (those up to the iterations run)
SCORED_COUNTS = (1, 2, 3, 5, 10)
#: ePIE iterations run by default: the largest scored count
DEFAULT_ITERATIONS = 10
#: fewest ePIE iterations a shortened (large-scan) run may have
MIN_ITERATIONS = 3


def scored_counts(iterations: int) -> list[int]:
    """The counts scored for a run of ``iterations``: those of :data:`SCORED_COUNTS` below it, and it."""
    return sorted({k for k in SCORED_COUNTS if k < iterations} | {int(iterations)})


def epie_stopped_at(epie: EPIEResult, k: int) -> EPIEResult:
    """The ePIE run as if it had stopped after iteration ``k`` (1-based): the object stored after that iteration,
    the errors up to it, and the time ``time_s × k / num_iter`` (s). Needs ``store_iterations=True``."""
    if not epie.object_iterations or not 1 <= k <= len(epie.object_iterations):
        raise ValueError(f"iteration {k} is not stored (run ePIE with store_iterations=True for at least {k})")
    obj = epie.object_iterations[k - 1]
    r0, c0 = epie.crop_origin_px
    h, w = epie.phase.shape
    return dataclasses.replace(
        epie,
        phase=np.angle(obj[r0 : r0 + h, c0 : c0 + w]).astype(np.float32),
        object=obj,
        error_history=epie.error_history[:k],
        time_s=epie.time_s * k / epie.num_iter,
        num_iter=k,
        object_iterations=epie.object_iterations[:k],
    )


@dataclass(frozen=True)
class EPIEBaseline:
    """ePIE at its converged count against deep CDI.

    Attributes
    ----------
    full
        Deep CDI against the whole ePIE run (its ``epie_truth_correlation`` has every iteration's correlation).
    comparison
        Deep CDI against ePIE stopped at ``iterations`` (images, scores and ``timings["epie_s"]`` at that count).
    iterations
        The converged count k.
    """

    full: Comparison
    comparison: Comparison
    iterations: int

    @property
    def run(self) -> int:
        """ePIE iterations run."""
        return int(self.full.epie.num_iter)

    @property
    def correlations(self) -> dict[int, float]:
        """ePIE's correlation with the truth at each scored count."""
        return {k: float(self.full.epie_truth_correlation[k - 1]) for k in scored_counts(self.run)}

    @property
    def still_improving(self) -> bool:
        """Whether the count is the last one scored: ePIE still gained more than ``CONVERGED_WITHIN`` there, so its
        converged time is at least :attr:`seconds` (and the speed ratio at least :meth:`ratio`)."""
        return self.iterations == self.run

    @property
    def seconds(self) -> float:
        """ePIE's ``reconstruct`` time (s) for :attr:`iterations` (its preprocess not included)."""
        return float(self.comparison.timings["epie_s"])

    def ratio(self, deep_cdi_s: float) -> float:
        """ePIE's time at its converged count over deep CDI's ``deep_cdi_s`` (s); < 1: deep CDI is slower."""
        return self.seconds / deep_cdi_s if deep_cdi_s > 0 else float("nan")

    def count_text(self) -> str:
        """The converged count, as ``"≥k"`` when ePIE was still improving at the last count."""
        return f"{'≥' if self.still_improving else ''}{self.iterations}"

    def ratio_text(self, deep_cdi_s: float) -> str:
        """The speed ratio written plainly: ``"0.6× (deep CDI slower)"``, ``"2.1× (deep CDI faster)"``, with ``≥``
        when ePIE was still improving at its last count."""
        ratio = self.ratio(deep_cdi_s)
        if self.still_improving and ratio < 1:  # a lower bound below 1 says nothing about which is faster
            return f"≥{ratio:.3g}× (ePIE still improving)"
        return f"{'≥' if self.still_improving else ''}{ratio:.3g}× (deep CDI {'slower' if ratio < 1 else 'faster'})"


def run_baselines(recon, ground_truth, num_iter: int = DEFAULT_ITERATIONS, remove_ramp: Sequence[bool] = (False,),
                  epie_kwargs: dict[str, Any] | None = None, adf: bool = False) -> list[EPIEBaseline]:
    """Run ePIE once for ``num_iter`` iterations on a finished deep-CDI reconstruction's data and compare it with
    deep CDI at its converged count, once per ``remove_ramp`` setting (the count is chosen on the first setting's
    correlations and kept for the others). ``epie_kwargs`` go to :func:`~py4dstem_deepcdi.comparison.run_epie`;
    ``adf`` computes the virtual ADF image for figures."""
    baselines: list[EPIEBaseline] = []
    epie = None
    for ramp in remove_ramp:
        options = {"remove_ramp": ramp, "ground_truth": ground_truth, "adf": adf, "progress": False}
        full = compare_with_epie(recon, num_iter=num_iter, epie_kwargs=epie_kwargs, epie=epie, **options)
        epie = full.epie
        k = baselines[0].iterations if baselines else converged_iterations(
            full.epie_truth_correlation, scored_counts(epie.num_iter)
        )
        if k is None:
            raise ValueError("the converged count needs a ground truth and ePIE's stored iterations")
        at_k = full if k == epie.num_iter else compare_with_epie(recon, epie=epie_stopped_at(epie, k), **options)
        baselines.append(EPIEBaseline(full, at_k, k))
    return baselines
