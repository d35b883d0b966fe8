"""Whether the data lie inside what the model was trained for: dose, aperture, scan step, vacuum probe; the scan
rotation figure. A mixin of :class:`~py4dstem_deepcdi.DeepCDIReconstruction` (it reads ``self.data``,
``self.model``, ``self.vacuum_probe_intensity``)."""

from __future__ import annotations

import warnings

import numpy as np

from ..dose import dose_warning
from ..io import save_figure
from ..preprocessing import aperture_radius_mrad, bright_field_radius, resample_vacuum
from ..probe import vacuum_pattern
from ..rotation import plot_rotation_fit
from ..stitching import stitch
from .results import patch_disagreement

#: relative distance of the data's bright-field disk radius outside the radii the model was trained with above which
#: preprocess() warns (outside those and the nominal aperture's by preprocessing.CALIBRATION_TOLERANCE it refuses,
#: unless check_calibration=False)
BRIGHT_FIELD_TOLERANCE = 0.05
#: per-pattern electrons spread (95th / 5th percentile) above which the dose check also looks at the scan's extremes
DOSE_SPREAD = 2.0
#: L1 distance of the normalised vacuum patterns (given vs the model's) above which preprocess() warns
VACUUM_TOLERANCE = 0.1
#: scan-step scale factors tried by the real-space calibration check, and the relative drop of the patch
#: disagreement below the calibrated step's at which it warns (docs/reliability.md: a 2× error raises it by 34% at
#: 10⁵ e⁻; at 10³ e⁻ the disagreement is flat within 6%, so the check stays silent there)
STEP_SCALES = (0.5, 0.71, 1.41, 2.0)
STEP_TOLERANCE = 0.1
#: probe positions (nearest the scan's centre) the step check re-stitches
STEP_CHECK_POSITIONS = 576


class TrustChecks:
    """The checks of the preprocessed data against the model (mixed into ``DeepCDIReconstruction``)."""

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

    def check_scan_step(self, scales=STEP_SCALES, n_positions: int = STEP_CHECK_POSITIONS,
                        warn: bool = True) -> dict[float, float]:
        """Check the real-space (scan step) calibration against the network's patches.

        Re-stitches the patches of the ``n_positions`` positions nearest the scan's centre with the scan step scaled
        by each of ``scales`` (and 1) and measures their disagreement (:attr:`error`'s RMS, rad). Patches placed at
        the wrong distances disagree more, so a scale whose disagreement lies more than ``STEP_TOLERANCE`` below the
        calibrated step's means the scan step is off: a warning names the factor (``warn=True``). Where the patches
        are too noisy to tell (low dose) the disagreement is flat and nothing is said.

        Returns ``{scale: disagreement (rad)}``, also kept in ``stitch_info["scan_step_check"]``.

        Raises
        ------
        RuntimeError
            Before :meth:`reconstruct`.
        """
        self._require("reconstruct")
        positions_px = self.data.positions / np.array(self.sampling)
        distance = np.linalg.norm(positions_px - positions_px.mean(0), axis=1)
        chosen = np.sort(np.argsort(distance, kind="stable")[:n_positions])
        patches, positions = np.asarray(self.patches)[chosen], positions_px[chosen]
        mask = self._stitch_mask(self.stitch_info.get("stitch_fraction"))
        errors = {}
        for scale in (1.0, *scales):
            scaled = positions * scale
            result = stitch(patches, scaled, mask, device=self.device)
            errors[float(scale)] = patch_disagreement(patches, result.offsets, scaled, mask, result, self.device)[1]
        self.stitch_info["scan_step_check"] = {f"{k:g}": v for k, v in errors.items()}
        best = min(errors, key=errors.get)
        if warn and errors[best] < (1 - STEP_TOLERANCE) * errors[1.0]:
            warnings.warn(
                f"the patches agree best with a scan step {best:g}× the calibrated {self.data.scan_step} Å (patch "
                f"disagreement {errors[best]:.3g} vs {errors[1.0]:.3g} rad): check the real-space calibration "
                "(scan_step, or the DataCube's R pixel size and units)",
                RuntimeWarning, stacklevel=3,
            )
        return errors

    def _check_vacuum_probe(self) -> None:
        """Warn when a given vacuum probe differs from the model's aperture (or the model has none)."""
        if self.vacuum_probe_intensity is None:
            return
        vacuum = vacuum_pattern(self.vacuum_probe_intensity)
        model_vacuum = self.model.geometry.vacuum_probe_intensity
        if model_vacuum is None:
            warnings.warn(
                "a vacuum probe was given but the model was trained with a modelled aperture "
                f"(rolloff {self.model.geometry.rolloff} mrad); train with vacuum_probe_intensity for best results",
                stacklevel=3,
            )
            return
        if vacuum.shape != self.model.geometry.detector_shape:  # on the data's detector, like the data
            vacuum = resample_vacuum(vacuum, self.data.data_angular_sampling, self.model.geometry)
        distance = float(np.abs(vacuum / vacuum.sum() - model_vacuum / model_vacuum.sum()).sum())
        if distance > VACUUM_TOLERANCE:
            warnings.warn(
                f"the measured vacuum probe differs from the model's by {distance:.0%} (L1 of the normalised patterns "
                "on the model's detector); fine-tune the model with this vacuum pattern",
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
