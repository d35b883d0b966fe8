"""The result of a comparison: images, scores and timings, its text summary, figure and EMD file."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from emdfile import Array, Node

from ..io import calibrated_array, read_result_nodes, save_figure, save_result
from ._json import plain
from .epie import EPIEResult
from .figure import comparison_figure
from .metrics import format_resolution

#: the ``kind`` stored in a comparison file's metadata
KIND = "py4dstem-deepcdi comparison"
#: names of the objects written beside the images in a comparison file
RECONSTRUCTION_NODE = "reconstruction"
ROOT_NAME = "deepcdi_comparison"
EPIE_NODE = "epie"


#: ePIE counts as converged at the first iteration within this correlation (with the truth) of its best
CONVERGED_WITHIN = 0.005


def converged_iterations(correlations: Sequence[float] | None, counts: Iterable[int] | None = None) -> int | None:
    """The fewest ePIE iterations, among ``counts`` (default: every iteration run), whose correlation with the truth
    is within :data:`CONVERGED_WITHIN` of the best of those counts; ``correlations[k - 1]`` is the correlation after
    iteration ``k``. None without correlations.

    Raises ``ValueError`` for a count outside 1 … ``len(correlations)`` or an empty ``counts``.
    """
    if not correlations:
        return None
    run = len(correlations)
    chosen = range(1, run + 1) if counts is None else sorted(set(counts))
    if not chosen or chosen[0] < 1 or chosen[-1] > run:
        raise ValueError(f"counts must be iterations within 1..{run} (the iterations scored), got {list(chosen)}")
    best = max(correlations[k - 1] for k in chosen)
    return next(k for k in chosen if correlations[k - 1] >= best - CONVERGED_WITHIN)


@dataclass
class Comparison:
    """Deep CDI against ePIE on the common field of view.

    Attributes
    ----------
    deep_phase, epie_phase
        Phase images (rad) on the deep-CDI grid over the common field of view, offset (and ramp) removed.
    truth_phase
        The ground truth on the same grid (or None).
    sampling
        Pixel size (Å) of the images.
    box
        The common field of view as deep-CDI canvas pixels ``(r0, r1, c0, c1)`` (half-open).
    frc
        ``image_frc(deep_phase, epie_phase)``: ``q`` (Å⁻¹), ``frc``, ``half_bit``, ``resolution_A``.
    correlation
        Pearson correlation of the two phase images.
    timings
        Seconds: ``deep_cdi_s`` (inference + stitching), ``deep_cdi_preprocess_s``, ``epie_s``, ``epie_preprocess_s``;
        ``epie_over_deep_cdi`` (speed ratio), ``positions``, ``epie_iterations``.
    registration
        ``shift_px`` (the sub-pixel shift of the ePIE image found by registration, canvas pixels), ``applied``,
        ``max_shift_px``.
    vs_truth
        ``{"deep_cdi": scores, "epie": scores}`` (see :func:`~.metrics.score_against_truth`), or None.
    epie_truth_correlation
        ePIE's correlation with the truth after every iteration (when stored), else None.
    epie_iterations_to_match
        First ePIE iteration whose correlation with the truth reaches deep CDI's (None: never, or not measured).
    adf, adf_info
        Virtual ADF image of the same datacube (scan frame) and its detector geometry.
    epie
        The :class:`~.epie.EPIEResult`.
    remove_ramp
        Whether a linear ramp was removed from every image.
    scan_step
        Scan step (Å) of the ADF image's pixels (after subsampling); default (1, 1).
    reconstruction
        The deep-CDI reconstruction compared (written into the file beside py4DSTEM's ePIE object), or None.
    figure
        The last figure drawn by :meth:`visualize` (None before).
    """

    deep_phase: np.ndarray
    epie_phase: np.ndarray
    truth_phase: np.ndarray | None
    sampling: tuple[float, float]
    box: tuple[int, int, int, int]
    frc: dict[str, Any]
    correlation: float
    timings: dict[str, float]
    registration: dict[str, Any]
    vs_truth: dict[str, dict[str, Any]] | None
    epie_truth_correlation: list[float] | None
    epie_iterations_to_match: int | None
    adf: np.ndarray | None
    adf_info: dict[str, Any]
    epie: EPIEResult
    remove_ramp: bool
    scan_step: tuple[float, float] = (1.0, 1.0)
    reconstruction: Any = None
    figure: Any = None

    @property
    def epie_converged_iterations(self) -> int | None:
        """The fewest ePIE iterations whose correlation with the truth is within ``CONVERGED_WITHIN`` of its best
        over the run: the count to compare speed with (None without a truth or stored iterations)."""
        return converged_iterations(self.epie_truth_correlation)

    @property
    def epie_converged_s(self) -> float | None:
        """ePIE's time (s) for :attr:`epie_converged_iterations` (its run time × that count / its iterations)."""
        k = self.epie_converged_iterations
        return None if k is None else self.timings["epie_s"] * k / self.timings["epie_iterations"]

    @property
    def resolution_A(self) -> dict[str, float]:
        """FRC resolutions (Å) between the two methods at the 0.5, 0.143 and half-bit thresholds."""
        return self.frc["resolution_A"]

    def summary(self) -> dict[str, Any]:
        """All numbers (JSON-able): resolutions Å, correlation, timings s, registration, scores against the truth."""
        out: dict[str, Any] = {
            "field_of_view_px": [self.deep_phase.shape[0], self.deep_phase.shape[1]],
            "field_of_view_A": [n * s for n, s in zip(self.deep_phase.shape, self.sampling)],
            "sampling_A": list(self.sampling),
            "frc_resolution_A": dict(self.resolution_A),
            "correlation": self.correlation,
            "remove_ramp": self.remove_ramp,
            "timings": dict(self.timings),
            "registration": dict(self.registration),
            "epie": self.epie.summary(),
        }
        if self.vs_truth is not None:
            out["vs_truth"] = {
                method: {k: v for k, v in scores.items() if k != "frc"} for method, scores in self.vs_truth.items()
            }
            out["epie_iterations_to_match"] = self.epie_iterations_to_match
            out["epie_converged_iterations"] = self.epie_converged_iterations
            out["epie_converged_s"] = self.epie_converged_s
        return plain(out)

    def _speed_line(self) -> str:
        """Deep CDI's speed against ePIE at its converged iteration count (the honest ratio), when known."""
        k, seconds, deep_s = self.epie_converged_iterations, self.epie_converged_s, self.timings["deep_cdi_s"]
        if k is None or not deep_s > 0:
            return ""
        ratio = seconds / deep_s
        speed = f"{ratio:.3g}× faster" if ratio >= 1 else f"{1 / ratio:.3g}× slower"
        return f"; ePIE converged after {k} iteration{'s' * (k > 1)} (≈ {seconds:.3g} s): deep CDI {speed}"

    def _truth_lines(self) -> list[str]:
        lines = []
        for method, label in (("deep_cdi", "deep CDI"), ("epie", "ePIE")):
            s = self.vs_truth[method]
            lines.append(
                f"  {label} vs truth: correlation {s['correlation']:.3f}, RMS {s['rms_rad']:.3g} rad, "
                f"phase scale {s['phase_scale']:.3g}, "
                f"FRC {format_resolution(s['resolution_A']['0.143'], self.sampling)} (0.143)"
            )
        if self.epie_truth_correlation is not None:
            match = self.epie_iterations_to_match
            lines.append(
                f"  ePIE reaches deep CDI's correlation with the truth after "
                f"{match if match is not None else f'more than {len(self.epie_truth_correlation)}'} iterations"
            )
        return lines

    def __repr__(self) -> str:
        r, t, s = self.resolution_A, self.timings, self.sampling
        h, w = self.deep_phase.shape
        lines = [
            f"Comparison(deep CDI vs ePIE, {self.epie.num_iter} iterations; common field of view "
            f"{h}×{w} px = {h * s[0]:.1f}×{w * s[1]:.1f} Å{', ramp removed' if self.remove_ramp else ''})",
            f"  FRC resolution: {format_resolution(r['0.5'], s)} (0.5), {format_resolution(r['0.143'], s)} "
            f"(0.143), {format_resolution(r['half_bit'], s)} (half-bit); phase correlation {self.correlation:.3f}",
            f"  time: deep CDI {t['deep_cdi_s']:.3g} s (inference + stitching), ePIE {t['epie_s']:.3g} s for "
            f"{t['epie_iterations']} iterations, {t['positions']} positions{self._speed_line()}",
            f"  registration shift {np.round(self.registration['shift_px'], 2).tolist()} px "
            f"({'applied' if self.registration['applied'] else 'not applied'})",
        ]
        if self.vs_truth is not None:
            lines += self._truth_lines()
        return "\n".join(lines)

    def visualize(
        self,
        inset: tuple[float, float, float] | None = None,
        cmap: str = "magma",
        figsize: tuple[float, float] | None = None,
        path: str | Path | None = None,
    ):
        """The paper's figure (see :func:`~.figure.comparison_figure`): both phase images on one colour scale,
        magnified views of the same region, the FRC with the 0.5/0.143/half-bit thresholds and the resolutions
        in Å, the virtual ADF.

        ``inset`` is ``(row Å, column Å, size Å)`` from the top-left of the common field of view (default: the
        central third; ``ValueError`` if it does not fit). Returns the matplotlib Figure (also ``self.figure``;
        written atomically to ``path`` at 150 dpi if given).
        """
        fig = comparison_figure(self, inset=inset, cmap=cmap, figsize=figsize)
        self.figure = fig
        if path is not None:
            save_figure(fig, path, dpi=150)
        return fig

    def _arrays(self) -> dict[str, Any]:
        """The child arrays of the file, by name: images (rad, axes in Å), FRC curves (with their frequency axis
        ``q`` in Å⁻¹), ePIE's error and correlation per iteration, the ADF image."""
        sampling = list(self.sampling)
        image = {"units": "rad", "dims": sampling, "dim_units": ["A", "A"], "dim_names": ["x", "y"]}
        arrays: dict[str, Any] = {
            "epie_phase_rad": calibrated_array(self.epie_phase, "epie_phase_rad", **image),
            "frc": _frc_array("frc", self.frc["q"], self.frc["frc"]),
            "frc_half_bit": _frc_array("frc_half_bit", self.frc["q"], self.frc["half_bit"]),
            "epie_error": calibrated_array(self.epie.error_history, "epie_error", dim_names=["iteration"]),
        }
        if self.truth_phase is not None:
            arrays["truth_phase_rad"] = calibrated_array(self.truth_phase, "truth_phase_rad", **image)
            for method in ("deep_cdi", "epie"):
                f = self.vs_truth[method]["frc"]
                arrays[f"frc_truth_{method}"] = _frc_array(f"frc_truth_{method}", f["q"], f["frc"])
        if self.epie_truth_correlation is not None:
            arrays["epie_truth_correlation"] = np.asarray(self.epie_truth_correlation)
        if self.adf is not None:
            step = list(self.scan_step)
            arrays["adf"] = calibrated_array(self.adf, "adf", "counts", dims=step, dim_units=["A", "A"],
                                             dim_names=["Rx", "Ry"])
        return arrays

    def _nodes(self) -> dict[str, Any]:
        """The objects written beside the images: the deep-CDI reconstruction and py4DSTEM's ptychography object."""
        nodes = {}
        if isinstance(self.reconstruction, Node):
            nodes[RECONSTRUCTION_NODE] = self.reconstruction
        ptychography = getattr(self.epie, "ptychography", None)
        if isinstance(ptychography, Node):
            if hasattr(ptychography, "set_save_defaults"):  # the object, not every iteration's (the file's size)
                ptychography.set_save_defaults(save_datacube=False, save_exit_waves=False, save_iterations=False)
            nodes[EPIE_NODE] = ptychography
        return nodes

    def save(self, path: str | Path, overwrite: bool = False) -> Path:
        """Write an EMD 1.0 file: the deep-CDI phase (image ``deepcdi_phase``: rad, pixels of ``sampling`` Å), the
        ePIE/truth images, FRC curves (each with its frequency axis in Å⁻¹), ADF and ePIE error history as its child
        arrays, every number and timing as metadata; beside it the deep-CDI reconstruction (``reconstruction``) and
        py4DSTEM's ``SingleslicePtychography`` (``epie``), which ``py4DSTEM.read(path,
        datapath="deepcdi_comparison/epie")`` or
        :func:`read_comparison` reopen as objects. Atomic; an existing file is kept unless ``overwrite``
        (``FileExistsError``)."""
        metadata = {
            "kind": KIND,
            "summary": self.summary(),
            "box_px": list(self.box),
            "adf_info": self.adf_info,
            "scan_step_A": list(self.scan_step),
            "epie_parameters": self.epie.parameters,
        }
        return save_result(path, self.deep_phase, metadata, self._arrays(), overwrite=overwrite,
                           sampling=self.sampling, nodes=self._nodes(), root_name=ROOT_NAME)


def _frc_array(name: str, q, values) -> Array:
    """An FRC curve as an emdfile Array whose axis is its spatial frequency ``q`` (Å⁻¹)."""
    return calibrated_array(np.asarray(values, dtype=np.float64), name, dims=[np.asarray(q, dtype=np.float64)],
                            dim_units=["A^-1"], dim_names=["q"])


def read_comparison(path: str | Path) -> dict[str, Any]:
    """Read a file written by :meth:`Comparison.save`: ``deep_phase`` (rad), ``sampling`` (Å), ``summary``,
    ``metadata``, every stored array by name (FRC curves also with their frequency axis ``NAME_q_per_A``, Å⁻¹) and,
    when stored, ``reconstruction`` (a ``DeepCDIReconstruction``) and ``epie`` (py4DSTEM's
    ``SingleslicePtychography``).

    Raises ``FileNotFoundError`` for a missing file, ``ValueError`` for a file that is not a comparison.
    """
    try:
        image, metadata, children, beside = read_result_nodes(path)
    except ValueError as exc:
        raise ValueError(f"{path} is not a comparison: {exc}") from exc
    if metadata.get("kind") != KIND:
        raise ValueError(f"{path} holds a py4dstem-deepcdi result of kind {metadata.get('kind')!r}, not a comparison")
    arrays = {name: node.data for name, node in children.items()}
    for name, node in children.items():
        if name.startswith("frc") and not name.endswith("_q_per_A") and node.data.ndim == 1:
            arrays.setdefault(f"{name}_q_per_A", np.asarray(node.get_dim(0)))
    summary = metadata["summary"]
    return {
        "deep_phase": image.data,
        "sampling": tuple(summary["sampling_A"]),
        "summary": summary,
        "metadata": metadata,
        **arrays,
        **beside,
    }
