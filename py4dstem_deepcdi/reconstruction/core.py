"""DeepCDIReconstruction: a py4DSTEM-style phase-reconstruction class for deep CDI.

    recon = DeepCDIReconstruction(datacube, energy=300e3, semiangle_cutoff=17.1, C10=-100).preprocess().reconstruct()
    recon.visualize(); recon.save("phase.h5"); py4DSTEM.read("phase.h5")   # the same object back

or, after ``import py4dstem_deepcdi``, ``datacube.reconstruct_deepcdi(energy=..., semiangle_cutoff=..., C10=...)``.
Like py4DSTEM's phase classes it is an emdfile ``Custom`` (:mod:`.storage`), its stages return ``self``, and it takes
py4DSTEM's keywords (:mod:`.keywords`).
"""

from __future__ import annotations

import inspect
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from emdfile import Custom

from ..backend import asnumpy, get_array_module, torch_device
from ..comparison import compare_with_epie
from ..inference import predict
from ..models import DeepCDIModel, as_model
from ..preprocessing import PreprocessedData, datacube_array, expected_radii_mrad, preprocess, report_lines
from ..probe import ProbeGeometry, normalise_aberrations
from ..ramp import UnanchorableRamp, com_phase_gradients
from ..ramp import anchor_ramp as anchor_ramp_to
from ..stitching import StitchOptions, stitch
from . import keywords
from .checks import TrustChecks
from .results import Results, patch_disagreement
from .storage import DEFAULT_NAME, Storage


class DeepCDIReconstruction(TrustChecks, Results, Storage, Custom):
    """Deep-learning CDI reconstruction of a 4D-STEM DataCube (one network pass per pattern, then stitching).

    Parameters
    ----------
    datacube
        py4DSTEM DataCube (Rx, Ry, Qx, Qy) in counts, calibrated (R in Å, Q in mrad or Å⁻¹), or a 4-D array
        with ``scan_step`` and ``angular_sampling``; None to attach one later (:meth:`attach_datacube`).
    energy
        Beam energy (eV).
    semiangle_cutoff
        Convergence semi-angle (mrad).
    polar_parameters
        Probe aberrations under py4DSTEM's names (C10, C12, phi12, C21, phi21, C23, phi23; Å and rad); they may
        also be given as keyword arguments (``C10=-100``, py4DSTEM's aliases ``defocus=100`` = -C10,
        ``astigmatism``, ``astigmatism_angle``, ``coma``, ``coma_angle``).
    model
        A :class:`DeepCDIModel`, a model file path, or a shipped model's name; default the shipped model.
        It must be trained for this energy, semi-angle and probe, or be probe-conditioned with this probe inside
        its training ranges (then one model serves every such probe).
    probe
        The probe's aberrations: a dict of polar parameters, or the result of
        :func:`~py4dstem_deepcdi.probe_recovery.recover_probe` (or its ``to_dict()``, the JSON of ``deepcdi
        recover-probe``), whose aberrations override ``polar_parameters`` and whose record of which parameters came
        from the data (and their errors) is kept in ``probe_source`` and in the saved file.
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
    storage
        py4DSTEM's storage device, ``"cpu"`` or ``"gpu"`` (only with ``device="gpu"``; default the device). The
        results are small and always numpy arrays.
    name
        The emdfile node's name (default ``"deepcdi_reconstruction"``): the group written by :meth:`save`.
    rolloff
        The data's aperture edge (mrad, py4DSTEM's ``rolloff``; default the model's): used by the ePIE comparison
        and the bright-field disk check; the network keeps the aperture it was trained with.
    initial_scan_positions
        Measured probe positions (J, 2) in Å in the scan's frame (py4DSTEM's convention, :mod:`.keywords`), in
        scan order; default the raster grid. The stitching takes any positions.
    positions_mask
        (Rx, Ry) bool: reconstruct only the positions where True (py4DSTEM's ``positions_mask``).

    Raises
    ------
    TypeError
        An unknown keyword (the message lists the accepted ones).
    ValueError
        A model trained for another geometry, bad keyword values (storage, rolloff, positions, mask).
    RuntimeError
        ``device="gpu"`` without CUDA/CuPy.
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
        *,
        storage: str | None = None,
        name: str = DEFAULT_NAME,
        rolloff: float | None = None,
        initial_scan_positions: np.ndarray | None = None,
        positions_mask: np.ndarray | None = None,
        **aberrations: float,
    ):
        accepted = [p for p in inspect.signature(DeepCDIReconstruction.__init__).parameters if p not in
                    ("self", "aberrations")]
        aberrations = keywords.aberration_keywords(aberrations, accepted, "DeepCDIReconstruction")
        get_array_module(device)  # fail early with a clear message for device="gpu" (CuPy and CUDA torch)
        torch_device(device)
        Custom.__init__(self, name=keywords.check_name(name))
        self.device = device
        self.storage = keywords.check_storage(storage, device)
        self.datacube = datacube
        self.verbose = verbose
        self.rolloff = keywords.check_rolloff(rolloff)
        recovered, self.probe_source = keywords.probe_aberrations_and_source(probe)
        parameters = normalise_aberrations({**(polar_parameters or {}), **aberrations, **recovered})
        model = as_model(model, device=device)
        g = model.geometry
        self.geometry = ProbeGeometry(
            energy=energy, semiangle_cutoff=semiangle_cutoff, detector_shape=g.detector_shape,
            angular_sampling=g.angular_sampling, aberrations=parameters,
            rolloff=g.rolloff if self.rolloff is None else self.rolloff, mask_threshold=g.mask_threshold,
        )
        self.attach_model(model)
        self.vacuum_probe_intensity = vacuum_probe_intensity
        self.initial_scan_positions = None if initial_scan_positions is None else np.asarray(initial_scan_positions)
        self.positions_mask = None if positions_mask is None else np.asarray(positions_mask, dtype=bool)
        self._options = {
            "scan_step": scan_step, "angular_sampling": angular_sampling, "rotation_deg": rotation_deg,
            "transpose": transpose, "subsample": subsample, "centre": True, "repair": repair,
            "normalise": normalise, "check_calibration": check_calibration,
        }
        self.data: PreprocessedData | None = None
        self._positions: np.ndarray | None = None
        self._stored_preprocessing: dict[str, Any] = {}
        self._clear_results()
        self.timings: dict[str, float] = {}
        if datacube is not None:
            self._scan_keywords(datacube_array(datacube).shape[:2])  # wrong shapes fail here, before any work

    def _clear_results(self) -> None:
        self.patches: np.ndarray | None = None
        self.object_phase: np.ndarray | None = None
        self.coverage: np.ndarray | None = None
        self.offsets: np.ndarray | None = None
        self.error_map: np.ndarray | None = None
        #: RMS disagreement (rad) of the overlapping patches (:func:`~.results.patch_disagreement`)
        self.error: float | None = None
        self.stitch_info: dict[str, Any] = {}

    # ------------------------------------------------------------------ inputs
    @property
    def datacube(self):
        """The raw data (a py4DSTEM DataCube or a 4-D array); None for a reconstruction read from a file."""
        return self._datacube

    @datacube.setter
    def datacube(self, datacube) -> None:
        self._datacube = datacube

    def attach_datacube(self, datacube) -> DeepCDIReconstruction:
        """Attach the raw data (py4DSTEM's ``attach_datacube``), e.g. to a reconstruction read from a file before
        comparing it with ePIE again. Returns ``self``."""
        self.datacube = datacube
        self._scan_keywords(datacube_array(datacube).shape[:2])
        return self

    def attach_model(self, model: DeepCDIModel | str | Path) -> DeepCDIReconstruction:
        """Use ``model`` (object, file or shipped name) for the network passes, e.g. the weights of a reconstruction
        read from a file. Returns ``self``.

        Raises ``ValueError`` when it was trained for another geometry than this reconstruction's.
        """
        model = as_model(model, device=self.device)
        model.check_compatible(self.geometry)
        self.model = model
        #: The probe the patches are retrieved with: the model's, with the data's aberrations if it is
        #: probe-conditioned (the aperture, vacuum probe and mask threshold stay the model's).
        self.probe_geometry = (
            model.geometry.replace(aberrations=self.geometry.aberrations) if model.conditioned else model.geometry
        )
        return self

    def _scan_keywords(self, scan_shape: tuple[int, int], step=(1.0, 1.0)) -> tuple[np.ndarray | None,
                                                                                  np.ndarray | None]:
        """(measured scan-frame positions (Rx·Ry, 2) Å or None, positions mask (Rx, Ry) or None), checked against
        the scan shape; ``step`` (Å) places the positions a mask leaves out (their raster place)."""
        mask = keywords.check_positions_mask(self.positions_mask, scan_shape)
        return keywords.scan_frame_positions(self.initial_scan_positions, scan_shape, tuple(step), mask), mask

    @property
    def options(self) -> dict[str, Any]:
        """The preprocessing options in force (``scan_step``, ``angular_sampling``, ``rotation_deg``, ``transpose``,
        ``subsample``, ``centre``, ``repair``, ``normalise``, ``check_calibration``): a copy; change them with
        :meth:`preprocess`."""
        return dict(self._options)

    @property
    def positions(self) -> np.ndarray:
        """Probe positions (J, 2) in Å (detector frame) after preprocessing (or as stored in a file)."""
        if self.data is not None:
            return self.data.positions
        if self._positions is not None:
            return self._positions
        raise RuntimeError("call preprocess() first")

    def _require(self, stage: str) -> None:
        done = {"preprocess": self.data is not None, "reconstruct": self.object_phase is not None}[stage]
        if not done:
            raise RuntimeError(f"call {stage}() first")

    # ------------------------------------------------------------------ stages
    def preprocess(self, **overrides) -> DeepCDIReconstruction:
        """Repair, calibrate, centre, resample and normalise the patterns; compute the probe positions (the raster
        grid or ``initial_scan_positions``, rotated; only those of ``positions_mask``).

        Keyword arguments override the constructor's ``scan_step``, ``angular_sampling``, ``rotation_deg``,
        ``transpose``, ``subsample``, ``repair``, ``normalise`` and ``check_calibration``, and take ``centre``
        (default True: fit and remove each pattern's bright-field disk shift with sub-pixel accuracy; False: assume
        the disk sits at the detector centre). Warns when the data lie outside what the model was trained for
        (dose, aperture, scan step; :meth:`model_trust_warnings`). A finished reconstruction whose positions this
        changes is discarded (with a warning). Returns ``self``.

        Raises
        ------
        TypeError
            An unknown option (listing the accepted ones).
        RuntimeError
            No datacube (a reconstruction read from a file: :meth:`attach_datacube`).
        ValueError
            See :func:`~py4dstem_deepcdi.preprocessing.preprocess`: among others a bright-field disk that
            contradicts the calibration (unless ``check_calibration=False``).
        """
        unknown = set(overrides) - set(self._options)
        if unknown:
            raise TypeError(f"unknown preprocess options {sorted(unknown)}; use {sorted(self._options)}")
        if self.datacube is None:
            raise RuntimeError("no datacube: attach the raw data first (recon.attach_datacube(datacube))")
        self._options.update(overrides)
        before = None if self.object_phase is None else self.positions
        start = time.perf_counter()
        data = preprocess(
            self.datacube, self.model.geometry, pool=self.model.pool,
            bright_field_mrad=expected_radii_mrad(self.geometry, *self.trained_bright_field_mrad), **self._options,
        )
        scan_shape = datacube_array(self.datacube).shape[:2]
        measured, mask = self._scan_keywords(scan_shape, np.asarray(data.scan_step) / self._options["subsample"])
        self.data = keywords.select_positions(data, measured, mask, self._options["subsample"], scan_shape)
        self.timings["preprocess_s"] = time.perf_counter() - start
        self._discard_if_moved(before)
        for message in self.model_trust_warnings():
            warnings.warn(message, stacklevel=2)
        self._check_vacuum_probe()
        if self.verbose:
            self._print_preprocessing()
        return self

    def _discard_if_moved(self, before: np.ndarray | None) -> None:
        """Drop a finished reconstruction whose probe positions the new preprocessing changed."""
        after = self.data.positions
        if before is None or (before.shape == after.shape and np.allclose(before, after, rtol=0, atol=1e-6)):
            return
        warnings.warn("preprocess() changed the probe positions: the earlier reconstruction was discarded; call "
                      "reconstruct()", stacklevel=3)
        self._clear_results()

    def _print_preprocessing(self) -> None:
        d = self.data
        print(
            f"preprocessed {len(d.positions)} patterns ({d.scan_shape[0]}×{d.scan_shape[1]}, step "
            f"{d.scan_step[0]:.3g} Å, rotation {d.rotation_deg:.1f}°{', transposed' if d.transpose else ''}), "
            f"{d.electrons_per_pattern:.3g} e⁻/pattern, in {self.timings['preprocess_s']:.2f} s"
        )
        for line in report_lines(d.report):
            print(f"  {line}")

    def reconstruct(
        self,
        batch_size: int | None = None,
        precision: str = "bf16",
        stitching: str | StitchOptions = "lsq",
        min_overlap: float = 0.25,
        progress: bool | None = None,
        symmetrize: bool = False,
        stitch_fraction: float | None = None,
        anchor_ramp: bool = True,
        runtime: str = "torch",
        check_scan_step: bool = True,
        *,
        max_batch_size: int | None = None,
        progress_bar: bool | None = None,
        **unknown: Any,
    ) -> DeepCDIReconstruction:
        """Retrieve one phase patch per pattern with the network and stitch them into ``object_phase``.

        Parameters
        ----------
        batch_size, max_batch_size
            Patterns per network pass (bounds memory; default 1024); ``max_batch_size`` is py4DSTEM's name.
        precision
            Network arithmetic: ``"bf16"`` or ``"fp32"`` (torch); ``"fp32"``, ``"bf16"`` (openvino) or ``"int8"``
            for the optional runtimes (``inference.predict``).
        stitching
            ``"lsq"`` (exact least squares of the paper's Eq. 2) or ``"relaxation"`` (the paper's iteration), or
            a :class:`~py4dstem_deepcdi.stitching.StitchOptions` with every solver setting (then ``min_overlap``
            is ignored).
        min_overlap
            Pairs of patches count as neighbours when their masks overlap by this fraction of the mask area.
        progress, progress_bar
            Progress bar (default: ``verbose``); ``progress_bar`` is py4DSTEM's name.
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
        check_scan_step
            Check the real-space calibration: warn when the patches agree clearly better at another scan step
            (:meth:`check_scan_step`; a fraction of a second for the ≤ 576 central positions it re-stitches).

        Sets ``patches``, ``object_phase`` (NaN where no patch reaches, :data:`~.results.NAN_POLICY`), ``coverage``,
        ``offsets``, ``error_map`` and ``error`` (the patches' disagreement, rad), ``stitch_info`` and ``timings``.
        Returns ``self``.

        Raises
        ------
        TypeError
            An unknown keyword (listing the accepted ones) or disagreeing aliases.
        ValueError
            Invalid stitching options or ``stitch_fraction``, before any network pass.
        RuntimeError
            A reconstruction read from a file without its model's weights (give ``model=``).
        """
        accepted = [p for p in inspect.signature(self.reconstruct).parameters if p != "unknown"]
        keywords.refuse_unknown("reconstruct", unknown, accepted)
        batch_size = keywords.alias("batch_size", batch_size, "max_batch_size", max_batch_size, 1024)
        progress = keywords.alias("progress", progress, "progress_bar", progress_bar, self.verbose)
        if not getattr(self.model, "weights_loaded", True):
            raise RuntimeError(
                f"the model {self.model.metadata.get('name', '?')!r} of this reconstruction was read from a file "
                "without its weights: give it with recon.attach_model(model) (or read_reconstruction(path, model=...))"
            )
        options = stitching if isinstance(stitching, StitchOptions) else StitchOptions(stitching, min_overlap)
        mask = self._stitch_mask(stitch_fraction)
        if self.data is None:
            self.preprocess()
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
        start = time.perf_counter()
        self.error_map, self.error = patch_disagreement(self.patches, self.offsets, positions_px, mask, result,
                                                        self.device)
        self.timings["error_s"] = time.perf_counter() - start
        ramp_removed = self._anchor_ramp(positions_px) if anchor_ramp else None
        self._record_stitching(options, symmetrize, stitch_fraction, anchor_ramp, ramp_removed, result.solution)
        if check_scan_step:
            start = time.perf_counter()
            self.check_scan_step()
            self.timings["scan_step_check_s"] = time.perf_counter() - start
        if self.verbose:
            print(
                f"reconstructed {len(self.patches)} patterns: inference {self.timings['inference_s']:.2f} s "
                f"({self.timings['patterns_per_s']:.0f} patterns/s), stitching {self.timings['stitching_s']:.2f} s; "
                f"phase image {self.object_phase.shape} at {self.sampling[0]:.4g} Å/pixel, patch disagreement "
                f"{self.error:.3g} rad"
            )
        return self

    def _record_stitching(self, options, symmetrize, stitch_fraction, anchor_ramp, ramp_removed, solution) -> None:
        self.stitch_info = {
            "method": options.method,
            "min_overlap": options.min_overlap,
            "symmetrize": bool(symmetrize),
            "stitch_fraction": stitch_fraction,
            "anchor_ramp": bool(anchor_ramp) and ramp_removed is not None,
            "ramp_removed_rad_per_A": ramp_removed,
            "n_pairs": solution.n_pairs,
            "energy_before": solution.energy_before,
            "energy_after": solution.energy_after,
            "n_components": solution.n_components,
        }
        self.timings["patterns_per_s"] = len(self.patches) / max(self.timings["inference_s"], 1e-9)

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

    def _anchor_ramp(self, positions_px: np.ndarray) -> list[float] | None:
        """Anchor ``object_phase``'s plane to the centres of mass (:mod:`.ramp`); the removed gradient (rad/Å), or
        None (with a warning) when the scan is too small for any probe to lie inside the stitched image."""
        geometry = self.probe_geometry
        measured = com_phase_gradients(self.data.amplitudes, np.abs(geometry.probe_fourier) ** 2, amplitudes=True)
        centres = positions_px + self._origin_px
        try:
            self.object_phase, removed = anchor_ramp_to(
                self.object_phase, centres, np.abs(geometry.probe) ** 2, measured
            )
        except UnanchorableRamp as exc:
            warnings.warn(f"phase ramp not anchored: {exc}", RuntimeWarning, stacklevel=3)
            return None
        return [float(v) for v in removed / np.array(self.sampling)]

    # ------------------------------------------------------------------ comparison
    def compare_with_epie(self, **kwargs):
        """Compare with py4DSTEM's ePIE on the same data, probe and positions (preprocessing first if needed, e.g.
        for a reconstruction read from a file with its datacube attached).

        See :func:`py4dstem_deepcdi.comparison.compare_with_epie` for the arguments; returns a ``Comparison``.
        """
        if self.data is None:
            if self.datacube is None:
                raise RuntimeError("comparing with ePIE needs the raw data: recon.attach_datacube(datacube) first")
            self.preprocess()
        return compare_with_epie(self, **kwargs)

    def __repr__(self) -> str:
        state = "reconstructed" if self.object_phase is not None else "preprocessed" if self.data is not None else "new"
        return (f"DeepCDIReconstruction({state}, {self.name!r}, {self.geometry!r}, "
                f"model={self.model.metadata.get('name', '?')})")


def reconstruct_deepcdi(self, energy: float, semiangle_cutoff: float, **kwargs) -> DeepCDIReconstruction:
    """``DataCube.reconstruct_deepcdi``: preprocess and reconstruct this datacube with deep CDI.

    Takes the arguments of :class:`DeepCDIReconstruction` (plus ``reconstruct_kwargs``, a dict passed to
    ``reconstruct()``) and returns the finished reconstruction. The datacube is not modified.
    """
    reconstruct_kwargs = kwargs.pop("reconstruct_kwargs", {})
    return (
        DeepCDIReconstruction(self, energy, semiangle_cutoff, **kwargs).preprocess().reconstruct(**reconstruct_kwargs)
    )
