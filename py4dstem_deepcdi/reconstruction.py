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
from .preprocessing import PreprocessedData, preprocess, resample_vacuum
from .probe import ProbeGeometry, normalise_aberrations, vacuum_pattern
from .ramp import anchor_ramp as anchor_ramp_to
from .ramp import com_phase_gradients
from .stitching import StitchOptions, stitch

#: relative difference of bright-field disk radii (model vs data) above which preprocess() warns
BRIGHT_FIELD_TOLERANCE = 0.05


def _bright_field_radius(pattern: np.ndarray) -> float:
    """Radius (pixels) of the disk whose area is that of the pattern above half its maximum."""
    return float(np.sqrt((pattern > 0.5 * pattern.max()).sum() / np.pi))


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
        Scan rotation (deg) and transpose relative to the detector (py4DSTEM convention); estimated with py4DSTEM's
        centre-of-mass method when None.
    subsample
        Use every n-th scan position along both axes.
    vacuum_probe_intensity
        Measured vacuum pattern (array or DataCube) of the experiment, compared with the model's aperture: on the
        data's detector (resampled like the data) or already on the model's (same shape as its patterns).
    verbose
        Progress bars and messages.
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
        ``subsample``, ``centre``): a copy; change them with :meth:`preprocess`."""
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
        """Calibrate, centre, resample and normalise the patterns; compute the probe positions.

        Keyword arguments override the constructor's ``scan_step``, ``angular_sampling``, ``rotation_deg``,
        ``transpose`` and ``subsample``, and take ``centre`` (default True: fit and remove each pattern's
        bright-field disk shift with sub-pixel accuracy; False: assume the disk sits at the detector centre).
        Returns ``self``.
        """
        unknown = set(overrides) - set(self._options)
        if unknown:
            raise TypeError(f"unknown preprocess options {sorted(unknown)}; use {sorted(self._options)}")
        self._options.update(overrides)
        start = time.perf_counter()
        self.data = preprocess(self.datacube, self.model.geometry, pool=self.model.pool, **self._options)
        self.timings["preprocess_s"] = time.perf_counter() - start
        self._check_bright_field()
        message = dose_warning(self.data.electrons_per_pattern, self.model.electrons_range)
        if message:
            warnings.warn(message, stacklevel=2)
        steps = self.model.pool_step_range
        if steps is not None and not all(steps[0] <= s <= steps[1] for s in self.data.scan_step):
            warnings.warn(
                f"the scan step {self.data.scan_step} Å is outside the steps {steps} Å this pooled model's "
                "neighbourhoods were trained with; use a pooled model trained for this step (deepcdi train --pool 3 "
                "--pool-step-range) or a model that sees one pattern",
                stacklevel=2,
            )
        if self.verbose:
            d = self.data
            print(
                f"preprocessed {len(d.positions)} patterns ({d.scan_shape[0]}×{d.scan_shape[1]}, step "
                f"{d.scan_step[0]:.3g} Å, rotation {d.rotation_deg:.1f}°{', transposed' if d.transpose else ''}), "
                f"{d.electrons_per_pattern:.3g} e⁻/pattern, in {self.timings['preprocess_s']:.2f} s"
            )
        return self

    def _check_bright_field(self) -> None:
        """Warn when the data's bright-field disk differs from the model's aperture (e.g. the aperture edge)."""
        model_pattern = np.abs(self.model.geometry.probe_fourier) ** 2
        r_model = _bright_field_radius(model_pattern)
        r_data = _bright_field_radius(self.data.mean_pattern)
        self.bright_field_radii_px = (r_model, r_data)
        if abs(r_data - r_model) > BRIGHT_FIELD_TOLERANCE * r_model:
            warnings.warn(
                f"the data's bright-field disk (radius {r_data:.2f} px) differs from the model's aperture "
                f"({r_model:.2f} px) by more than {BRIGHT_FIELD_TOLERANCE:.0%}: check semiangle_cutoff and the "
                "angular calibration, or train with the measured vacuum_probe_intensity",
                stacklevel=3,
            )
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
    ) -> DeepCDIReconstruction:
        """Retrieve one phase patch per pattern with the network and stitch them into ``object_phase``.

        Parameters
        ----------
        batch_size
            Patterns per network pass (bounds memory).
        precision
            ``"bf16"`` or ``"fp32"`` network arithmetic.
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
            neighbour_offsets=self.data.neighbour_offsets,
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
