"""Deep CDI scored against ePIE and the ground truth on their common field of view."""

from __future__ import annotations

import warnings
from typing import Any, NamedTuple

import numpy as np

from .adf import virtual_adf
from .alignment import (
    MIN_FOV_PX,
    CanvasGrid,
    TruthFrame,
    common_box,
    deep_cdi_field_of_view,
    epie_image,
    inside_array,
    inside_hull,
    truth_frame,
)
from .alignment import register as registration_shift
from .epie import EPIEDivergenceError, EPIEResult, run_epie
from .inputs import ReconstructionLike, is_reconstruction
from .metrics import image_frc, phase_correlation, remove_background, score_against_truth
from .result import Comparison


def _pair(values) -> tuple[float, float]:
    return float(values[0]), float(values[1])


def score_reconstruction(
    recon: ReconstructionLike, ground_truth, remove_ramp: bool = False, min_coverage: float = 0.5
) -> dict[str, Any]:
    """Score a finished deep-CDI reconstruction against the ground truth, without ePIE.

    ``ground_truth`` as in :func:`compare_with_epie`. The truth is interpolated onto the reconstruction's canvas
    through the probe positions (no fitting), both are cropped to the largest well-covered rectangle (see
    ``min_coverage`` in :func:`compare_with_epie`), offsets (and with ``remove_ramp`` linear ramps) removed.
    Returns :func:`~.metrics.score_against_truth`'s numbers plus ``box`` (canvas pixels ``(r0, r1, c0, c1)``).

    Raises ``RuntimeError`` for an unfinished reconstruction, ``TypeError`` without a ground truth, ``ValueError``
    when the two share no usable field of view.
    """
    if recon.object_phase is None:
        raise RuntimeError("call recon.preprocess().reconstruct() first")
    truth = truth_frame(ground_truth, recon)
    if truth is None:
        raise TypeError("score_reconstruction needs a ground_truth")
    grid, ok = deep_cdi_field_of_view(recon, min_coverage)
    ok &= inside_array(truth.to_pixels(grid.points_A), truth.phase.shape)
    box = common_box(ok, grid.shape, "the reconstruction and the ground truth share no usable field of view")
    r0, r1, c0, c1 = box
    truth_phase = remove_background(truth.image(grid.box_points_A(box)), remove_ramp)
    deep = remove_background(recon.object_phase[r0:r1, c0:c1], remove_ramp)
    return {**score_against_truth(deep, truth_phase, _pair(grid.sampling)), "box": box}


# ================================================================================================== steps
def _epie_of(recon, epie: EPIEResult | None, num_iter: int, fix_probe: bool, epie_kwargs: dict[str, Any] | None,
             progress: bool, with_truth: bool) -> EPIEResult:
    """The given ePIE result (refused if it diverged) or a new run on the reconstruction's data; with a ground
    truth the new run keeps every iteration's object unless ``epie_kwargs`` says otherwise."""
    if epie is not None:
        if epie.diverged:
            raise EPIEDivergenceError("this ePIE result diverged (diverged=True): it cannot be compared")
        return epie
    kwargs = {"device": recon.device, "progress": progress, **(epie_kwargs or {})}
    if with_truth:
        kwargs.setdefault("store_iterations", True)
    return run_epie(recon, num_iter=num_iter, fix_probe=fix_probe, **kwargs)


def _common_field_of_view(recon, epie: EPIEResult, truth: TruthFrame | None,
                          min_coverage: float) -> tuple[CanvasGrid, tuple[int, int, int, int]]:
    """The canvas and the largest rectangle of it covered by deep CDI, ePIE's scan and object, and the truth."""
    grid, ok = deep_cdi_field_of_view(recon, min_coverage)
    ok &= inside_hull(epie.positions_A / grid.sampling + grid.origin_px, grid.pixels)
    ok &= inside_array(epie.to_pixels(grid.points_A), epie.object.shape)
    if truth is not None:
        ok &= inside_array(truth.to_pixels(grid.points_A), truth.phase.shape)
    box = common_box(
        ok, grid.shape,
        "the fields of view do not overlap: deep CDI (full coverage), ePIE"
        f"{' and the ground truth' if truth is not None else ''} share {int(ok.sum())} pixels, and no "
        f"{MIN_FOV_PX}×{MIN_FOV_PX} pixel rectangle; check that both methods used the same scan positions "
        "(and the ground truth's positions)",
    )
    return grid, box


def _registered(deep: np.ndarray, unregistered: np.ndarray, epie: EPIEResult, points_A: np.ndarray,
                sampling: np.ndarray, max_shift_px: float, remove_ramp: bool) -> tuple[np.ndarray, dict[str, Any]]:
    """The ePIE image moved by the sub-pixel shift that registers it on the deep-CDI image, and the registration
    record; a shift larger than ``max_shift_px`` (or not finite) is reported, warned about and not applied."""
    found = registration_shift(remove_background(deep, remove_ramp), remove_background(unregistered, remove_ramp))
    registration = {"shift_px": found.tolist(), "applied": False, "max_shift_px": max_shift_px}
    if np.all(np.isfinite(found)) and np.hypot(*found) <= max_shift_px:
        registration["applied"] = True
        return epie_image(epie, epie.object, points_A, found, sampling), registration
    warnings.warn(
        f"registration of the ePIE image found a shift of {np.round(found, 2).tolist()} px (> max_shift_px="
        f"{max_shift_px}); kept the alignment given by the probe positions. The images may disagree "
        "(an untrained or mismatched model?)",
        stacklevel=3,
    )
    return unregistered, registration


class _TruthScores(NamedTuple):
    truth_phase: np.ndarray
    vs_truth: dict[str, dict[str, Any]]
    epie_truth_correlation: list[float] | None
    epie_iterations_to_match: int | None


def _truth_scores(truth: TruthFrame, points_A: np.ndarray, deep_phase: np.ndarray, unregistered: np.ndarray,
                  epie: EPIEResult, grid_sampling: np.ndarray, remove_ramp: bool) -> _TruthScores:
    """Both methods scored against the truth where their own probe positions put them (the registration shift is
    not applied, so an offset of either image costs it), and ePIE's correlation after every stored iteration."""
    sampling = _pair(grid_sampling)
    truth_phase = remove_background(truth.image(points_A), remove_ramp)
    vs_truth = {
        "deep_cdi": score_against_truth(deep_phase, truth_phase, sampling),
        "epie": score_against_truth(remove_background(unregistered, remove_ramp), truth_phase, sampling),
    }
    if not epie.object_iterations:
        return _TruthScores(truth_phase, vs_truth, None, None)
    correlations = [
        phase_correlation(remove_background(epie_image(epie, o, points_A, np.zeros(2), grid_sampling), remove_ramp),
                          truth_phase)
        for o in epie.object_iterations
    ]
    target = vs_truth["deep_cdi"]["correlation"]
    match = next((k + 1 for k, c in enumerate(correlations) if c >= target), None)
    return _TruthScores(truth_phase, vs_truth, correlations, match)


def _timings(recon, epie: EPIEResult) -> dict[str, float]:
    """Seconds of both methods (deep CDI = inference + stitching), their ratio, positions and ePIE iterations."""
    nan = float("nan")
    inference = float(recon.timings.get("inference_s", nan))
    stitching = float(recon.timings.get("stitching_s", nan))
    deep_s = inference + stitching
    return {
        "deep_cdi_s": deep_s,
        "deep_cdi_inference_s": inference,
        "deep_cdi_stitching_s": stitching,
        "deep_cdi_preprocess_s": float(recon.timings.get("preprocess_s", nan)),
        "epie_s": epie.time_s,
        "epie_preprocess_s": epie.preprocess_s,
        "epie_over_deep_cdi": epie.time_s / deep_s if deep_s > 0 else nan,
        "positions": int(len(recon.positions)),
        "epie_iterations": int(epie.num_iter),
    }


# ================================================================================================== comparison
def compare_with_epie(
    recon: ReconstructionLike,
    num_iter: int = 50,
    fix_probe: bool = True,
    remove_ramp: bool = False,
    epie_kwargs: dict[str, Any] | None = None,
    *,
    epie: EPIEResult | None = None,
    ground_truth=None,
    register: bool = True,
    max_shift_px: float = 2.0,
    min_coverage: float = 0.5,
    adf: bool = True,
    progress: bool | None = None,
) -> Comparison:
    """Compare a finished deep-CDI reconstruction with py4DSTEM's ePIE on the same data, probe and positions.

    Parameters
    ----------
    recon
        A :class:`~py4dstem_deepcdi.DeepCDIReconstruction` after ``preprocess().reconstruct()``.
    num_iter
        ePIE iterations (default 50).
    fix_probe
        Keep ePIE's probe fixed (default True).
    remove_ramp
        Remove a least-squares linear ramp (rad/pixel) from every image, not only its mean (default False).
    epie_kwargs
        More arguments for :func:`~.epie.run_epie` (``step_size``, ``seed``, ``vacuum_probe_intensity``,
        ``store_iterations``, ``reconstruct_kwargs``, ...); ``device`` defaults to the
        reconstruction's, ``store_iterations`` to True when a ground truth is given.
    epie
        A finished :class:`~.epie.EPIEResult` to use instead of running ePIE.
    ground_truth
        A :class:`~py4dstem_deepcdi.SimulatedDataset`, or ``(phase rad, sampling Å, positions)`` with positions
        (J, 2) Å in the truth's frame (the reconstruction's scan order) or a (2,) offset Å between the frames.
        Both methods are then scored against it.
    register
        Refine the alignment of the ePIE image by sub-pixel registration (default True).
    max_shift_px
        Largest registration shift (deep-CDI pixels, default 2) applied; a larger one is reported, warned about
        and not applied.
    min_coverage
        The common field of view keeps pixels whose deep-CDI coverage (summed patch weights) is at least this
        fraction of the scan's typical (90th percentile) coverage: 0.5 (default) keeps the scanned area (edge
        pixels are covered by about half the patches of the interior), larger values trim a band along its edges.
    adf
        Compute a virtual ADF image of the datacube for the figure (default True).
    progress
        Progress bars (default: the reconstruction's ``verbose``).

    Raises
    ------
    TypeError
        ``recon`` is not a reconstruction.
    RuntimeError
        The reconstruction is not finished.
    EPIEDivergenceError
        ePIE diverged (or the given result did).
    ValueError
        The fields of view do not overlap; a ground truth from another scan.
    """
    if not is_reconstruction(recon):
        raise TypeError(f"compare_with_epie needs a DeepCDIReconstruction, got {type(recon).__name__}")
    if recon.object_phase is None:
        raise RuntimeError(
            "compare_with_epie needs a finished deep-CDI reconstruction: call recon.preprocess().reconstruct() first"
        )
    progress = recon.verbose if progress is None else progress
    truth = truth_frame(ground_truth, recon)
    epie = _epie_of(recon, epie, num_iter, fix_probe, epie_kwargs, progress, with_truth=truth is not None)
    grid, box = _common_field_of_view(recon, epie, truth, min_coverage)
    points_A = grid.box_points_A(box)
    r0, r1, c0, c1 = box
    deep = np.asarray(recon.object_phase[r0:r1, c0:c1], dtype=np.float64)
    unregistered = epie_image(epie, epie.object, points_A, np.zeros(2), grid.sampling)
    registered, registration = unregistered, {"shift_px": [0.0, 0.0], "applied": False, "max_shift_px": max_shift_px}
    if register:
        registered, registration = _registered(deep, unregistered, epie, points_A, grid.sampling, max_shift_px,
                                               remove_ramp)
    deep_phase = remove_background(deep, remove_ramp)
    epie_phase = remove_background(registered, remove_ramp)
    sampling = _pair(grid.sampling)
    scores = None
    if truth is not None:
        scores = _truth_scores(truth, points_A, deep_phase, unregistered, epie, grid.sampling, remove_ramp)
    adf_image, adf_info = virtual_adf(recon) if adf else (None, {"reason": "not computed (adf=False)"})
    return Comparison(
        deep_phase=deep_phase.astype(np.float32),
        epie_phase=epie_phase.astype(np.float32),
        truth_phase=None if scores is None else scores.truth_phase.astype(np.float32),
        sampling=sampling,
        box=box,
        frc=image_frc(deep_phase, epie_phase, sampling),
        correlation=phase_correlation(deep_phase, epie_phase),
        timings=_timings(recon, epie),
        registration=registration,
        vs_truth=None if scores is None else scores.vs_truth,
        epie_truth_correlation=None if scores is None else scores.epie_truth_correlation,
        epie_iterations_to_match=None if scores is None else scores.epie_iterations_to_match,
        adf=adf_image,
        adf_info=adf_info,
        epie=epie,
        remove_ramp=bool(remove_ramp),
        scan_step=_pair(recon.data.scan_step),
        reconstruction=recon,
    )
