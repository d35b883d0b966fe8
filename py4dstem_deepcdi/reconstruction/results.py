"""The results of a reconstruction under py4DSTEM's names (``object``, ``object_cropped``, ``probe``, ``error``,
``sampling``), the patches' disagreement map, the summary record and the figure. A mixin of
:class:`~py4dstem_deepcdi.DeepCDIReconstruction`.

NaN policy (:data:`NAN_POLICY`): ``object_phase``, ``object`` and ``error_map`` are NaN on the canvas pixels that no
patch reaches (``coverage == 0``), in memory and in the file alike; ``object_cropped`` and ``object_phase_cropped``
(the probe positions' bounding box) are finite wherever the patches overlap, i.e. everywhere for an overlapping scan.
"""

from __future__ import annotations

from typing import Any

import matplotlib.pyplot as plt
import numpy as np

from ..backend import asnumpy
from ..io import save_figure
from ..stitching import stitch
from .keywords import refuse_unknown

NAN_POLICY = "NaN where coverage == 0 (no patch reaches the pixel), in memory and on disk"
#: ``kind`` of a reconstruction's summary record and file
KIND = "py4dstem-deepcdi reconstruction"
#: version of the record written by DeepCDIReconstruction.save (1: the RealSlice files of versions <= 0.1)
FORMAT_VERSION = 2


def patch_disagreement(patches: np.ndarray, offsets: np.ndarray, positions_px: np.ndarray, mask: np.ndarray,
                       result, device: str = "cpu") -> tuple[np.ndarray, float]:
    """How much the overlapping patches disagree after their offsets: per canvas pixel the weighted standard
    deviation (rad) of the corrected patch values that reach it (same bilinear weights as the stitched mean, NaN
    where no patch reaches), and its coverage-weighted RMS over the covered pixels (rad): deep CDI's
    self-consistency error. ``result`` is the ``StitchResult`` of the same patches, positions and mask."""
    squares = np.asarray(patches, dtype=np.float32) + np.asarray(asnumpy(offsets), dtype=np.float32)[:, None, None]
    squares *= squares  # one copy of the patches
    mean = np.asarray(asnumpy(result.image), dtype=np.float64)
    second = stitch(squares, positions_px, mask, offsets=np.zeros(len(squares)), origin_px=result.origin_px,
                    canvas_shape=mean.shape, device=device)
    variance = np.clip(np.asarray(asnumpy(second.image), dtype=np.float64) - mean * mean, 0.0, None)
    coverage = np.asarray(asnumpy(result.coverage), dtype=np.float64)
    covered = coverage > 0
    rms = float(np.sqrt((coverage[covered] * variance[covered]).sum() / max(coverage[covered].sum(), 1e-300)))
    return np.where(covered, np.sqrt(variance), np.nan), rms


class Results:
    """py4DSTEM-style result attributes, the summary and the figure (mixed into ``DeepCDIReconstruction``)."""

    @property
    def sampling(self) -> tuple[float, float]:
        """Pixel size of the reconstructed phase image and of :attr:`probe` (Å)."""
        return self.model.geometry.sampling

    @property
    def angular_sampling(self) -> tuple[float, float]:
        """Detector pixel size of the network's patterns (mrad), as py4DSTEM's ``angular_sampling``."""
        step = self.model.geometry.angular_sampling
        return (step, step)

    @property
    def positions_px(self) -> np.ndarray:
        """Probe positions (J, 2) in pixels of the phase image."""
        self._require("reconstruct")
        return self.positions / np.array(self.sampling) + self._origin_px

    def _box(self) -> tuple[slice, slice]:
        """The canvas pixels of the probe positions' bounding box."""
        lo = np.ceil(self.positions_px.min(0)).astype(int)
        hi = np.floor(self.positions_px.max(0)).astype(int) + 1
        return slice(lo[0], hi[0]), slice(lo[1], hi[1])

    @property
    def object_phase_cropped(self) -> np.ndarray:
        """The phase image (rad) cropped to the scanned field of view (the positions' bounding box)."""
        self._require("reconstruct")
        return self.object_phase[self._box()]

    @property
    def object(self) -> np.ndarray:
        """The complex object on the whole canvas, ``exp(i·object_phase)`` (complex64): deep CDI retrieves the phase
        only, so its amplitude is 1; NaN where no patch reaches (:data:`NAN_POLICY`)."""
        self._require("reconstruct")
        return np.exp(1j * np.asarray(self.object_phase, dtype=np.float64)).astype(np.complex64)

    @property
    def object_cropped(self) -> np.ndarray:
        """:attr:`object` cropped to the scanned field of view (py4DSTEM's ``object_cropped``)."""
        self._require("reconstruct")
        return self.object[self._box()]

    @property
    def probe(self) -> np.ndarray:
        """The probe the patches were retrieved with, in real space (complex, centred, Σ|P|² = 1) on the pixels of the
        phase image (:attr:`sampling` Å): the model's aperture with the data's aberrations for a probe-conditioned
        model, else the model's own probe."""
        return np.asarray(self.probe_geometry.probe)

    def summary(self) -> dict[str, Any]:
        """Everything needed to interpret the result (JSON-able): name, geometry, model (name, network, training
        set), options, preprocessing, stitching, timings (s), the canvas origin, the error (rad), the NaN policy."""
        self._require("reconstruct")
        model = {k: v for k, v in self.model.metadata.items() if k != "geometry"}
        model["network"] = self.model.network.config()
        return {
            "kind": KIND,
            "format_version": FORMAT_VERSION,
            "name": self.name,
            "sampling_A": list(self.sampling),
            "geometry": self.geometry.to_dict(),
            "model": model,
            "model_geometry": self.model.geometry.to_dict(),
            "probe_source": dict(self.probe_source),
            "options": self._stored_options(),
            "preprocessing": self._preprocessing_summary(),
            "stitching": dict(self.stitch_info),
            "timings": dict(self.timings),
            "origin_px": [float(v) for v in self._origin_px],
            "error_rad": self.error,
            "nan_policy": NAN_POLICY,
        }

    def _stored_options(self) -> dict[str, Any]:
        return {
            **self._options,
            "device": self.device,
            "storage": self.storage,
            "verbose": self.verbose,
            "rolloff": self.rolloff,
            "measured_positions": self.initial_scan_positions is not None,
            "positions_mask": self.positions_mask is not None,
        }

    def _preprocessing_summary(self) -> dict[str, Any]:
        d = self.data
        if d is None:
            return dict(self._stored_preprocessing)
        return {
            "scan_shape": list(d.scan_shape),
            "scan_step_A": list(d.scan_step),
            "rotation_deg": d.rotation_deg,
            "transpose": d.transpose,
            "electrons_per_pattern": d.electrons_per_pattern,
            "data_angular_sampling_mrad": d.data_angular_sampling,
            **{name: self._options[name] for name in ("subsample", "centre", "repair", "normalise",
                                                      "check_calibration")},
            "report": d.report,
        }

    def visualize(self, ground_truth: np.ndarray | None = None, figsize=(12, 4), cmap: str = "magma", path=None,
                  fig=None, cbar: bool = True, **keywords):
        """Figure: stitched phase (Å scale), coverage, and, if given, the ground truth (same sampling).

        ``fig``: a matplotlib figure to draw into (py4DSTEM's ``fig=``; default a new one of ``figsize`` inches);
        ``cbar``: colour bars. Returns ``self``; the figure is ``self.figure`` (and is saved to ``path`` if given).

        Raises ``TypeError`` for another keyword (listing the accepted ones).
        """
        refuse_unknown("visualize", keywords, ("ground_truth", "figsize", "cmap", "path", "fig", "cbar"))
        self._require("reconstruct")
        images = [("deep CDI phase (rad)", self.object_phase, cmap), ("coverage (patch weight)", self.coverage, "gray")]
        if ground_truth is not None:
            images.append(("ground truth (rad)", np.asarray(ground_truth), cmap))
        fig = plt.figure(figsize=figsize) if fig is None else fig
        axes = np.atleast_1d(fig.subplots(1, len(images)))
        for ax, (title, image, colours) in zip(axes, images):
            extent = [0, image.shape[1] * self.sampling[1], image.shape[0] * self.sampling[0], 0]
            artist = ax.imshow(image, cmap=colours, extent=extent)
            ax.set_title(title)
            ax.set_xlabel("Å")
            if cbar:
                fig.colorbar(artist, ax=ax, fraction=0.046)
        fig.tight_layout()
        self.figure = fig
        if path is not None:
            save_figure(fig, path)
        return self
