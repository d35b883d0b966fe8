"""Deep CDI against the iterative baseline: py4DSTEM's ePIE on the same data, probe and positions.

    result = run_epie(recon, num_iter=50)                     # py4DSTEM SingleslicePtychography as ePIE
    comparison = compare_with_epie(recon, ground_truth=ds)    # register, crop, FRC, scores, timings
    comparison.visualize(); comparison.save("comparison.h5"); comparison.summary()

One concept per module:

- :mod:`.epie`: running py4DSTEM's ePIE (:func:`run_epie`, :class:`EPIEOptions`, :class:`EPIEResult`);
- :mod:`.metrics`: scores of two images on one grid (correlation, fitted RMS, contrast scale, FRC);
- :mod:`.alignment`: the deep-CDI canvas grid, fields of view, the ground truth's frame, resampling, registration;
- :mod:`.adf`: a virtual annular dark-field image;
- :mod:`.compare`: :func:`compare_with_epie` and :func:`score_reconstruction`;
- :mod:`.result`: the :class:`Comparison` with its summary and file (:func:`read_comparison`);
- :mod:`.figure`: the side-by-side figure;
- :mod:`.inputs`: what is read from a reconstruction (public attributes only; this package never imports
  :mod:`py4dstem_deepcdi.reconstruction`).
"""

from .adf import virtual_adf
from .alignment import MIN_FOV_PX
from .compare import compare_with_epie, score_reconstruction
from .epie import EPIE_ERROR_GROWTH, EPIE_ERROR_LIMIT, EPIEDivergenceError, EPIEOptions, EPIEResult, run_epie
from .metrics import image_frc, phase_correlation, remove_background, score_against_truth
from .result import KIND, Comparison, read_comparison

__all__ = [
    "EPIE_ERROR_GROWTH",
    "EPIE_ERROR_LIMIT",
    "KIND",
    "MIN_FOV_PX",
    "Comparison",
    "EPIEDivergenceError",
    "EPIEOptions",
    "EPIEResult",
    "compare_with_epie",
    "image_frc",
    "phase_correlation",
    "read_comparison",
    "remove_background",
    "run_epie",
    "score_against_truth",
    "score_reconstruction",
    "virtual_adf",
]
