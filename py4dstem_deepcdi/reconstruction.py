"""DeepCDIReconstruction: a py4DSTEM-style phase-reconstruction class for deep CDI.

    recon = DeepCDIReconstruction(datacube, energy=300e3, semiangle_cutoff=17.1, C10=-100).preprocess().reconstruct()
    recon.visualize(); recon.save("phase.h5")

or, after ``import py4dstem_deepcdi``, ``datacube.reconstruct_deepcdi(energy=..., semiangle_cutoff=..., C10=...)``.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
from py4DSTEM import DataCube

from .backend import asnumpy, get_array_module, torch_device
from .comparison import compare_with_epie
from .dose import dose_warning
from .inference import predict
from .io import read_result, save_figure, save_result
from .models import DeepCDIModel, as_model
from .preprocessing import (
    PreprocessedData,
    aperture_radius_mrad,
    bright_field_radius,
    expected_radii_mrad,
    preprocess,
    report_lines,
    resample_vacuum,
)
from .probe import ProbeGeometry, normalise_aberrations, vacuum_pattern
from .ramp import anchor_ramp as anchor_ramp_to
from .ramp import com_phase_gradients
from .rotation import plot_rotation_fit
from .stitching import StitchOptions, stitch

#: relative distance of the data's bright-field disk radius outside the radii the model was trained with above which
#: preprocess() warns (outside those and the nominal aperture's by preprocessing.CALIBRATION_TOLERANCE it refuses,
#: unless check_calibration=False)
BRIGHT_FIELD_TOLERANCE = 0.05
#: per-pattern electrons spread (95th / 5th percentile) above which the dose check also looks at the scan's extremes
DOSE_SPREAD = 2.0


class DeepCDIReconstruction:
    """Deep-learning CDI reconstruction of a 4D-STEM DataCube (one network pass per pattern, then stitching).

    Parameters
    ----------
    datacube
        py4DSTEM DataCube (Rx, Ry, Qx, Qy) in counts, calibrated (R in Å, Q in mrad or Å⁻¹), or a 4-D array
        with ``scan_step`` and ``angular_sampling``.
    energy
        Beam energy (eV).
    semiangle_cutoff
        Convergence semi-angle (mrad).
    polar_parameters
        Probe aberrations under py4DSTEM's names (C10, C12, phi12, C21, phi21, C23, phi23; Å and rad); they may
        also be given as keyword arguments (``C10=-100``, ``defocus=100``).
    model
        A :class:`DeepCDIModel`, a model file path, or a shipped model's name; default the shipped model.
        It must be trained for this energy, semi-angle and probe, or be probe-conditioned with this probe inside
        its training ranges (then one model serves every such probe).
    probe
        The probe's aberrations, e.g. the result of :func:`~py4dstem_deepcdi.probe_recovery.recover_probe` (its
        ``aberrations``) or a dict of polar parameters; they override ``polar_parameters``.
    device
        ``"cpu"`` or ``"gpu"`` (CUDA for the network, CuPy for stitching).
    scan_step
        Scan step (Å); default from the DataCube calibration.
    angular_sampling
        Detector pixel size of the data (mrad); default from the DataCube calibration.
    rotation_deg, transpose
        Scan rotation (deg) and transpose relative to the detector (py4DSTEM convention); when None, estimated from
        the curl of the centre-of-mass field if the estimate is usable (a warning when imprecise), else 0° and no
        transpose with a warning (:mod:`~py4dstem_deepcdi.rotation`, :meth:`plot_rotation`).
    subsample
        Use every n-th scan position along both axes.
    vacuum_probe_intensity
        Measured vacuum pattern (array or DataCube) of the experiment, compared with the model's aperture: on the
        data's detector (resampled like the data) or already on the model's (same shape as its patterns).
    verbose
        Progress bars and messages (and the preprocessing report).
    repair
        Find and repair hot and dead detector pixels before anything else (default True).
    normalise
        ``"pattern"`` (default): every pattern normalised by its own electrons (immune to dose drift), or
        ``"dataset"``: by the dataset's mean electrons per pattern.
    check_calibration
        Refuse (default True) data whose bright-field disk contradicts the detector calibration and the model's
        aperture (``ValueError`` naming both radii and the likely cause); False only warns.
    """

    def __init__(
        self,
        datacube,
        energy: float,
        semiangle_cutoff: float,
        polar_parameters: Mapping[str, float] | None = None,
        model: DeepCDIModel | str | Path | None = None,
        device: str = "cpu",
        scan_step: float | tuple[float, float] | None = None,
        angular_sampling: float | None = None,
        rotation_deg: float | None = None,
        transpose: bool | None = None,
        subsample: int = 1,
        vacuum_probe_intensity=None,
        verbose: bool = True,
        probe=None,
        repair: bool = True,
        normalise: str = "pattern",
        check_calibration: bool = True,
        **aberrations: float,
    ):
        get_array_module(device)  # fail early with a clear message for device="gpu" (CuPy and CUDA torch)
        torch_device(device)
        self.device = device
        self.datacube = datacube
        self.model = as_model(model, device=device)
        self.verbose = verbose
        recovered = getattr(probe, "aberrations", probe) or {}
        parameters = normalise_aberrations({**(polar_parameters or {}), **aberrations, **recovered})
        model_geometry = self.model.geometry
        self.geometry = ProbeGeometry(
            energy=energy,
            semiangle_cutoff=semiangle_cutoff,
            detector_shape=model_geometry.detector_shape,
            angular_sampling=model_geometry.angular_sampling,
            aberrations=parameters,
            rolloff=model_geometry.rolloff,
            mask_threshold=model_geometry.mask_threshold,
        )
        self.model.check_compatible(self.geometry)
        #: The probe the patches are retrieved with: the model's, with the data's aberrations if it is
        #: probe-conditioned (the aperture, vacuum probe and mask threshold stay the model's).
        self.probe_geometry = (
            model_geometry.replace(aberrations=parameters) if self.model.conditioned else model_geometry
        )
        self.vacuum_probe_intensity = vacuum_probe_intensity
        self._options = {
            "scan_step": scan_step,
            "angular_sampling": angular_sampling,
            "rotation_deg": rotation_deg,
            "transpose": transpose,
            "subsample": subsample,
            "centre": True,
            "repair": repair,
            "normalise": normalise,
            "check_calibration": check_calibration,
        }
        self.data: PreprocessedData | None = None
        self.patches: np.ndarray | None = None
        self.object_phase: np.ndarray | None = None
        self.coverage: np.ndarray | None = None
        self.offsets: np.ndarray | None = None
        self.stitch_info: dict[str, Any] = {}
        self.timings: dict[str, float] = {}

    # ------------------------------------------------------------------ properties
    @property
    def sampling(self) -> tuple[float, float]:
        """Pixel size of the reconstructed phase image (Å)."""
        return self.model.geometry.sampling

    @property
    def options(self) -> dict[str, Any]:
        """The preprocessing options in force (``scan_step``, ``angular_sampling``, ``rotation_deg``, ``transpose``,
        ``subsample``, ``centre``, ``repair``, ``normalise``, ``check_calibration``): a copy; change them with
        :meth:`preprocess`."""
        return dict(self._options)

    @property
    def positions(self) -> np.ndarray:
        """Probe positions (J, 2) in Å (detector frame) after preprocessing."""
        self._require("preprocess")
        return self.data.positions

    @property
    def positions_px(self) -> np.ndarray:
        """Probe positions (J, 2) in pixels of the phase image."""
        self._require("reconstruct")
        return self.data.positions / np.array(self.sampling) + self._origin_px

    @property
    def object_phase_cropped(self) -> np.ndarray:
        """The phase image cropped to the scanned field of view (positions' bounding box)."""
        self._require("reconstruct")
        lo = np.ceil(self.positions_px.min(0)).astype(int)
        hi = np.floor(self.positions_px.max(0)).astype(int) + 1
        return self.object_phase[lo[0] : hi[0], lo[1] : hi[1]]

    def _require(self, stage: str) -> None:
        done = {"preprocess": self.data is not None, "reconstruct": self.object_phase is not None}[stage]
        if not done:
            raise RuntimeError(f"call {stage}() first")

    # ------------------------------------------------------------------ stages
    def preprocess(self, **overrides) -> DeepCDIReconstruction:
        """Repair, calibrate, centre, resample and normalise the patterns; compute the probe positions.

        Keyword arguments override the constructor's ``scan_step``, ``angular_sampling``, ``rotation_deg``,
        ``transpose``, ``subsample``, ``repair``, ``normalise`` and ``check_calibration``, and take ``centre``
        (default True: fit and remove each pattern's bright-field disk shift with sub-pixel accuracy; False: assume
        the disk sits at the detector centre). Warns when the data lie outside what the model was trained for
        (dose, aperture, scan step; :meth:`model_trust_warnings`). Returns ``self``.

        Raises
        ------
        ValueError
            See :func:`~py4dstem_deepcdi.preprocessing.preprocess`: among others a bright-field disk that
            contradicts the calibration (unless ``check_calibration=False``).
        """
        unknown = set(overrides) - set(self._options)
        if unknown:
            raise TypeError(f"unknown preprocess options {sorted(unknown)}; use {sorted(self._options)}")
        self._options.update(overrides)
        start = time.perf_counter()
        self.data = preprocess(
            self.datacube, self.model.geometry, pool=self.model.pool,
            bright_field_mrad=expected_radii_mrad(self.geometry, *self.trained_bright_field_mrad), **self._options,
        )
        self.timings["preprocess_s"] = time.perf_counter() - start
        for message in self.model_trust_warnings():
            warnings.warn(message, stacklevel=2)
        self._check_vacuum_probe()
        if self.verbose:
            d = self.data
            print(
                f"preprocessed {len(d.positions)} patterns ({d.scan_shape[0]}×{d.scan_shape[1]}, step "
                f"{d.scan_step[0]:.3g} Å, rotation {d.rotation_deg:.1f}°{', transposed' if d.transpose else ''}), "
                f"{d.electrons_per_pattern:.3g} e⁻/pattern, in {self.timings['preprocess_s']:.2f} s"
            )
            for line in report_lines(d.report):
                print(f"  {line}")
        return self

    @property
    def trained_bright_field_mrad(self) -> tuple[float, float]:
        """(min, max) bright-field disk radii (mrad, half maximum) of the apertures the model was trained with: its
        own, and with ``edge_width_range`` in its metadata those of the edges it was trained over."""
        geometry = self.model.geometry
        radii = [aperture_radius_mrad(geometry)]
        widths = self.model.metadata.get("training_set", {}).get("edge_width_range")
        if widths and geometry.vacuum_probe_intensity is None:
            radii += [bright_field_radius(geometry.aperture_edge(w)) * geometry.angular_sampling for w in widths]
        return (min(radii), max(radii))

    def model_trust_warnings(self) -> list[str]:
        """Messages for every way the preprocessed data lie outside what the model was trained for: the electrons per
        pattern (``dose.dose_warning``, also at the 5th/95th percentile when the dose varies over the scan), the
        bright-field disk (semi-angle and aperture edge, ``BRIGHT_FIELD_TOLERANCE``) and, for a pooled model, the
        scan step. Empty when the data lie inside."""
        self._require("preprocess")
        return [*self._dose_messages(), *self._aperture_messages(), *self._step_messages()]

    def _dose_messages(self) -> list[str]:
        d = self.data
        electrons = d.pattern_electrons if d.pattern_electrons is not None else np.array([d.electrons_per_pattern])
        low, high = np.percentile(electrons, [5, 95])
        doses = {"": d.electrons_per_pattern}
        if high > DOSE_SPREAD * low:  # dose drift: the scan's dimmest and brightest parts too
            doses.update({"the dimmest 5% of the patterns: ": low, "the brightest 5% of the patterns: ": high})
        messages = {prefix: dose_warning(value, self.model.electrons_range) for prefix, value in doses.items()}
        return [prefix + message for prefix, message in messages.items() if message]

    def _aperture_messages(self) -> list[str]:
        lo, hi = self.trained_bright_field_mrad
        radius = self.data.bright_field_radius_mrad
        if radius is None or lo * (1 - BRIGHT_FIELD_TOLERANCE) <= radius <= hi * (1 + BRIGHT_FIELD_TOLERANCE):
            return []
        geometry = self.model.geometry
        widths = self.model.metadata.get("training_set", {}).get("edge_width_range")
        if geometry.vacuum_probe_intensity is not None:
            trained = "its measured vacuum probe"
        elif widths:
            trained = f"aperture edges {widths[0]:g}–{widths[1]:g} mrad wide"
        else:
            trained = f"py4DSTEM rolloff {geometry.rolloff:g} mrad"
        span = f"{lo:.3g}–{hi:.3g} mrad" if hi > lo else f"{lo:.3g} mrad"
        return [
            f"the data's bright-field disk (radius {radius:.3g} mrad at half maximum) lies outside the {span} of the "
            f"apertures the model was trained with (semi-angle {geometry.semiangle_cutoff:g} mrad, {trained}) by more "
            f"than {BRIGHT_FIELD_TOLERANCE:.0%}: check semiangle_cutoff and the angular calibration, or train with the "
            "measured vacuum_probe_intensity or a wider edge_width_range"
        ]

    def _step_messages(self) -> list[str]:
        steps, step = self.model.pool_step_range, self.data.scan_step
        if steps is None or all(steps[0] <= s <= steps[1] for s in step):
            return []
        return [
            f"the scan step {step} Å is outside the steps {steps} Å this pooled model's neighbourhoods were trained "
            "with; use a pooled model trained for this step (deepcdi train --pool 3 --pool-step-range) or a model "
            "that sees one pattern"
        ]

    def _check_vacuum_probe(self) -> None:
        """Warn when a given vacuum probe differs from the model's aperture (or the model has none)."""
        if self.vacuum_probe_intensity is not None:
            vacuum = vacuum_pattern(self.vacuum_probe_intensity)
            if self.model.geometry.vacuum_probe_intensity is None:
                warnings.warn(
                    "a vacuum probe was given but the model was trained with a modelled aperture "
                    f"(rolloff {self.model.geometry.rolloff} mrad); train with vacuum_probe_intensity for best results",
                    stacklevel=3,
                )
            else:
                if vacuum.shape != self.model.geometry.detector_shape:  # on the data's detector, like the data
                    vacuum = resample_vacuum(vacuum, self.data.data_angular_sampling, self.model.geometry)
                a = vacuum / vacuum.sum()
                b = self.model.geometry.vacuum_probe_intensity / self.model.geometry.vacuum_probe_intensity.sum()
                if np.abs(a - b).sum() > 0.1:
                    warnings.warn(
                        f"the measured vacuum probe differs from the model's by {np.abs(a - b).sum():.0%} (L1 of the "
                        "normalised patterns on the model's detector); fine-tune the model with this vacuum pattern",
                        stacklevel=3,
                    )

    def plot_rotation(self, path=None, figsize=(7, 3.5)):
        """Figure of the scan-rotation fit (:func:`~py4dstem_deepcdi.rotation.plot_rotation_fit`): the curl share of
        the centre-of-mass deflection field versus the rotation, the estimate ± its standard error and the rotation
        used. Returns the matplotlib figure (also saved to ``path`` if given)."""
        self._require("preprocess")
        d = self.data
        fig = plot_rotation_fit(d.rotation_fit, d.rotation_deg, d.transpose, figsize=figsize)
        if path is not None:
            save_figure(fig, path)
        return fig

    def reconstruct(
        self,
        batch_size: int = 1024,
        precision: str = "bf16",
        stitching: str | StitchOptions = "lsq",
        min_overlap: float = 0.25,
        progress: bool | None = None,
        symmetrize: bool = False,
        stitch_fraction: float | None = None,
        anchor_ramp: bool = True,
        runtime: str = "torch",
    ) -> DeepCDIReconstruction:
        """Retrieve one phase patch per pattern with the network and stitch them into ``object_phase``.

        Parameters
        ----------
        batch_size
            Patterns per network pass (bounds memory).
        precision
            Network arithmetic: ``"bf16"`` or ``"fp32"`` (torch); ``"fp32"``, ``"bf16"`` (openvino) or ``"int8"``
            for the optional runtimes (``inference.predict``).
        stitching
            ``"lsq"`` (exact least squares of the paper's Eq. 2) or ``"relaxation"`` (the paper's iteration), or
            a :class:`~py4dstem_deepcdi.stitching.StitchOptions` with every solver setting (then ``min_overlap``
            is ignored).
        min_overlap
            Pairs of patches count as neighbours when their masks overlap by this fraction of the mask area.

        Raises
        ------
        ValueError
            Invalid stitching options or ``stitch_fraction``, before any network pass.
        progress
            Progress bar (default: ``verbose``).
        symmetrize
            Average every patch over the symmetries of the square that leave the probe unchanged (8 network passes
            per pattern for a defocused round probe): slower, more accurate (see ``inference.predict``).
        stitch_fraction
            Stitch only the disk of each patch about the probe's centre that holds this fraction of the probe's
            intensity (``ProbeGeometry.support_mask``; within the model's mask, where the network predicts): a
            patch size set by the probe, which drops the dimly lit, least accurate patch edges. Default: the
            model's whole mask.
        anchor_ramp
            Give the image the scan-averaged phase gradient that the preprocessed patterns' centres of mass measure
            (Ehrenfest's theorem, :mod:`py4dstem_deepcdi.ramp`) instead of the one the per-patch tilts add up to:
            removes the long-range ramp of offset-only stitching. With the default disk centring (which removes the
            descan plane and with it the object's own mean tilt) the anchored gradient is zero, right for a field
            of view without a net phase gradient (a crystal or a 2-D material, not an edge or a wedge); with
            ``preprocess(centre=False)`` on data without descan it is the object's own. Default True (measured best
            on multislice crystals and 2-D materials at every dose, docs/benchmarks.md); pass False for a field of
            view with a real net phase gradient (a wedge, an edge, a smooth thick object).
        runtime
            ``"torch"`` (default), ``"onnxruntime"`` or ``"openvino"`` (CPU; see ``inference.predict``).
        """
        options = stitching if isinstance(stitching, StitchOptions) else StitchOptions(stitching, min_overlap)
        mask = self._stitch_mask(stitch_fraction)
        if self.data is None:
            self.preprocess()
        progress = self.verbose if progress is None else progress
        start = time.perf_counter()
        self.patches = predict(
            self.model, self.data.amplitudes, batch_size=batch_size, precision=precision, device=self.device,
            progress=progress, geometry=self.probe_geometry, symmetrize=symmetrize, pooled=self.data.pooled,
            neighbour_offsets=self.data.neighbour_offsets, runtime=runtime,
        )
        self.timings["inference_s"] = time.perf_counter() - start
        start = time.perf_counter()
        positions_px = self.data.positions / np.array(self.sampling)
        result = stitch(self.patches, positions_px, mask, options, device=self.device)
        self.timings["stitching_s"] = time.perf_counter() - start
        self.object_phase = asnumpy(result.image)
        self.coverage = asnumpy(result.coverage)
        self.offsets = asnumpy(result.offsets)
        self._origin_px = np.asarray(result.origin_px)
        ramp_removed = self._anchor_ramp(positions_px) if anchor_ramp else None
        solution = result.solution
        self.stitch_info = {
            "method": options.method,
            "min_overlap": options.min_overlap,
            "symmetrize": bool(symmetrize),
            "stitch_fraction": stitch_fraction,
            "anchor_ramp": bool(anchor_ramp),
            "ramp_removed_rad_per_A": ramp_removed,
            "n_pairs": solution.n_pairs,
            "energy_before": solution.energy_before,
            "energy_after": solution.energy_after,
            "n_components": solution.n_components,
        }
        self.timings["patterns_per_s"] = len(self.patches) / max(self.timings["inference_s"], 1e-9)
        if self.verbose:
            print(
                f"reconstructed {len(self.patches)} patterns: inference {self.timings['inference_s']:.2f} s "
                f"({self.timings['patterns_per_s']:.0f} patterns/s), stitching {self.timings['stitching_s']:.2f} s; "
                f"phase image {self.object_phase.shape} at {self.sampling[0]:.4g} Å/pixel"
            )
        return self

    def _stitch_mask(self, stitch_fraction: float | None) -> np.ndarray:
        """The pixels of every patch that are stitched: the model's mask, or its disk holding ``stitch_fraction``."""
        geometry = self.probe_geometry
        if stitch_fraction is None:
            return geometry.mask
        if not 0 < stitch_fraction <= 1:
            raise ValueError(
                f"stitch_fraction must lie in (0, 1] (a fraction of the probe's intensity), got {stitch_fraction!r}"
            )
        return geometry.mask & geometry.support_mask(stitch_fraction)

    def _anchor_ramp(self, positions_px: np.ndarray) -> list[float]:
        """Anchor ``object_phase``'s plane to the centres of mass (:mod:`.ramp`); the removed gradient (rad/Å)."""
        geometry = self.probe_geometry
        measured = com_phase_gradients(self.data.amplitudes, np.abs(geometry.probe_fourier) ** 2, amplitudes=True)
        centres = positions_px + self._origin_px
        self.object_phase, removed = anchor_ramp_to(self.object_phase, centres, np.abs(geometry.probe) ** 2, measured)
        return [float(v) for v in removed / np.array(self.sampling)]

    # ------------------------------------------------------------------ results
    def metadata(self) -> dict[str, Any]:
        """Everything needed to interpret the result: geometry, model, preprocessing, stitching, timings."""
        self._require("reconstruct")
        d = self.data
        return {
            "kind": "py4dstem-deepcdi reconstruction",
            "sampling_A": list(self.sampling),
            "geometry": self.geometry.to_dict(),
            "model": {k: v for k, v in self.model.metadata.items() if k != "geometry"},
            "model_geometry": self.model.geometry.to_dict(),
            "preprocessing": {
                "scan_shape": list(d.scan_shape),
                "scan_step_A": list(d.scan_step),
                "rotation_deg": d.rotation_deg,
                "transpose": d.transpose,
                "electrons_per_pattern": d.electrons_per_pattern,
                "data_angular_sampling_mrad": d.data_angular_sampling,
                "subsample": self._options["subsample"],
                "centre": self._options["centre"],
                "repair": self._options["repair"],
                "normalise": self._options["normalise"],
                "check_calibration": self._options["check_calibration"],
                "report": d.report,
            },
            "stitching": self.stitch_info,
            "timings": self.timings,
            "origin_px": self._origin_px.tolist(),
        }

    def save(self, path: str | Path, overwrite: bool = False, include_patches: bool = False) -> Path:
        """Write the phase image, metadata, positions, offsets, coverage (and patches) as an EMD 1.0 file.

        Atomic; an existing file is kept unless ``overwrite``. Read it back with :func:`read_reconstruction`
        or ``py4DSTEM.read``.
        """
        self._require("reconstruct")
        arrays = {
            "positions_A": self.positions,
            "offsets_rad": self.offsets,
            "coverage": self.coverage,
        }
        if include_patches:
            arrays["patches_rad"] = self.patches
        return save_result(
            path, np.nan_to_num(self.object_phase, nan=0.0), self.metadata(), arrays, overwrite=overwrite
        )

    def visualize(self, ground_truth: np.ndarray | None = None, figsize=(12, 4), cmap: str = "magma", path=None):
        """Figure: stitched phase (Å scale), coverage, and, if given, the ground truth (same sampling).

        Returns ``self``; the figure is ``self.figure`` (and is saved to ``path`` if given).
        """
        self._require("reconstruct")
        panels = 3 if ground_truth is not None else 2
        fig, axes = plt.subplots(1, panels, figsize=figsize)
        extent = [0, self.object_phase.shape[1] * self.sampling[1], self.object_phase.shape[0] * self.sampling[0], 0]
        im = axes[0].imshow(self.object_phase, cmap=cmap, extent=extent)
        axes[0].set_title("deep CDI phase (rad)")
        fig.colorbar(im, ax=axes[0], fraction=0.046)
        im = axes[1].imshow(self.coverage, cmap="gray", extent=extent)
        axes[1].set_title("coverage (patch weight)")
        fig.colorbar(im, ax=axes[1], fraction=0.046)
        if ground_truth is not None:
            im = axes[2].imshow(
                ground_truth,
                cmap=cmap,
                extent=[0, ground_truth.shape[1] * self.sampling[1], ground_truth.shape[0] * self.sampling[0], 0],
            )
            axes[2].set_title("ground truth (rad)")
            fig.colorbar(im, ax=axes[2], fraction=0.046)
        for ax in axes:
            ax.set_xlabel("Å")
        fig.tight_layout()
        self.figure = fig
        if path is not None:
            save_figure(fig, path)
        return self

    def compare_with_epie(self, **kwargs):
        """Compare with py4DSTEM's ePIE on the same data, probe and positions.

        See :func:`py4dstem_deepcdi.comparison.compare_with_epie` for the arguments; returns a ``Comparison``.
        """
        return compare_with_epie(self, **kwargs)

    def __repr__(self) -> str:
        state = "reconstructed" if self.object_phase is not None else "preprocessed" if self.data is not None else "new"
        return f"DeepCDIReconstruction({state}, {self.geometry!r}, model={self.model.metadata.get('name', '?')})"


def read_reconstruction(path: str | Path) -> dict[str, Any]:
    """Read a reconstruction written by :meth:`DeepCDIReconstruction.save`.

    Returns a dict with ``phase`` (rad), ``sampling`` (Å), ``metadata`` and every stored array by name.
    """
    phase, metadata, arrays = read_result(path)
    if metadata.get("kind") != "py4dstem-deepcdi reconstruction":
        raise ValueError(
            f"{path} holds a py4dstem-deepcdi result of kind {metadata.get('kind')!r}, not a reconstruction"
        )
    return {"phase": phase, "sampling": tuple(metadata["sampling_A"]), "metadata": metadata, **arrays}


def reconstruct_deepcdi(self, energy: float, semiangle_cutoff: float, **kwargs) -> DeepCDIReconstruction:
    """``DataCube.reconstruct_deepcdi``: preprocess and reconstruct this datacube with deep CDI.

    Takes the arguments of :class:`DeepCDIReconstruction` (plus ``reconstruct_kwargs``, a dict passed to
    ``reconstruct()``) and returns the finished reconstruction. The datacube is not modified.
    """
    reconstruct_kwargs = kwargs.pop("reconstruct_kwargs", {})
    return (
        DeepCDIReconstruction(self, energy, semiangle_cutoff, **kwargs).preprocess().reconstruct(**reconstruct_kwargs)
    )


def _register() -> None:
    DataCube.reconstruct_deepcdi = reconstruct_deepcdi
