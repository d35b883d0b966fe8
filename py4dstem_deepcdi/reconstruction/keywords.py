"""py4DSTEM's keywords on :class:`~py4dstem_deepcdi.DeepCDIReconstruction`: aberration aliases, aliases of the
reconstruct settings, storage, measured scan positions and the positions mask; anything else is refused with the list
of what is accepted.

Measured positions follow py4DSTEM's ``initial_scan_positions``: (J, 2) Å in the scan's frame (axis 0 = Rx, axis 1 =
Ry, the frame of the raster grid ``i·step, j·step``), in scan order, rotated by the scan rotation about their mean
and transposed like the raster grid (:func:`~py4dstem_deepcdi.scan.rotate_positions`). ``positions_mask`` (Rx, Ry)
bool keeps the positions where it is True (py4DSTEM's meaning); with a mask the positions may be given for the kept
positions only. A pooled model's 3×3 neighbourhoods keep the raster's nominal offsets (exact for a raster scan,
approximate for measured positions that stray from it).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from ..preprocessing import PreprocessedData
from ..probe import POLAR_NAMES
from ..scan import rotate_positions, scan_positions

#: py4DSTEM's aliases of the modelled aberrations (``defocus`` = -C10 is handled by ``normalise_aberrations``)
ABERRATION_ALIASES = {"astigmatism": "C12", "astigmatism_angle": "phi12", "coma": "C21", "coma_angle": "phi21"}
#: every name an aberration may be given under
ABERRATION_NAMES = (*POLAR_NAMES, "defocus", *ABERRATION_ALIASES)
#: py4DSTEM keywords that mean nothing for deep CDI, with the reason given when they are passed
NOT_APPLICABLE = {
    "initial_object_guess": "deep CDI does not iterate: there is no initial object",
    "initial_probe_guess": "the probe is the model's with the aberrations given (probe=, C10=, ...)",
    "object_padding_px": "the canvas is sized by the probe positions and the model's patch",
    "object_fov_ang": "the canvas is sized by the probe positions and the model's patch",
    "positions_offset_ang": "shift initial_scan_positions instead",
    "object_type": "the object is a phase: .object is exp(i·object_phase)",
    "clear_fft_cache": "deep CDI caches no FFT plans",
    "semiangle_cutoff_pixels": "give semiangle_cutoff in mrad",
    "num_iter": "deep CDI is not iterative (one network pass per pattern)",
    "reconstruction_method": "deep CDI is not iterative (one network pass per pattern)",
    "step_size": "deep CDI is not iterative (one network pass per pattern)",
    "fix_probe": "the probe is fixed by the model and the aberrations given",
    "store_iterations": "deep CDI is not iterative (one network pass per pattern)",
    "reset": "every reconstruct() starts afresh",
    "Cs": "spherical aberration (C30) is not modelled: the probe has C10, C12, phi12, C21, phi21, C23, phi23",
    "C30": "spherical aberration (C30) is not modelled: the probe has C10, C12, phi12, C21, phi21, C23, phi23",
    "C5": "C50 is not modelled: the probe has C10, C12, phi12, C21, phi21, C23, phi23",
}
STORAGES = ("cpu", "gpu")


def unknown_keywords(where: str, unknown: Iterable[str], accepted: Iterable[str]) -> TypeError:
    """A ``TypeError`` naming the unknown keywords of ``where`` (with the reason for py4DSTEM keywords that do not
    apply to deep CDI) and listing the accepted ones."""
    unknown = sorted(unknown)
    notes = "".join(f"; {name}: {NOT_APPLICABLE[name]}" for name in unknown if name in NOT_APPLICABLE)
    return TypeError(
        f"{where} got unknown keyword argument(s) {unknown}{notes}. Accepted: {', '.join(accepted)}"
    )


def refuse_unknown(where: str, keywords: Mapping[str, Any], accepted: Iterable[str]) -> None:
    """Raise :func:`unknown_keywords` if ``keywords`` is not empty."""
    if keywords:
        raise unknown_keywords(where, keywords, accepted)


def aberration_keywords(keywords: Mapping[str, Any], accepted: Iterable[str], where: str) -> dict[str, float]:
    """The aberrations among the keyword arguments, under py4DSTEM's polar names (``astigmatism`` → C12, ...;
    ``defocus`` kept: ``normalise_aberrations`` turns it into -C10).

    Raises :func:`unknown_keywords` (listing ``accepted`` and the aberration names) for any other keyword.
    """
    unknown = set(keywords) - set(ABERRATION_NAMES)
    if unknown:
        names = f"the aberrations {', '.join(ABERRATION_NAMES)} (Å, rad; defocus = -C10)"
        raise unknown_keywords(where, unknown, [*accepted, names])
    return {ABERRATION_ALIASES.get(name, name): value for name, value in keywords.items()}


def alias(name: str, value: Any, alias_name: str, alias_value: Any, default: Any) -> Any:
    """``value`` or its py4DSTEM alias ``alias_value`` (whichever is given), else ``default``.

    Raises ``TypeError`` when both are given with different values.
    """
    if value is not None and alias_value is not None and value != alias_value:
        raise TypeError(f"{name}={value!r} and its py4DSTEM alias {alias_name}={alias_value!r} disagree; give one")
    chosen = value if value is not None else alias_value
    return default if chosen is None else chosen


def check_storage(storage: str | None, device: str) -> str:
    """py4DSTEM's ``storage`` (where arrays are kept; default the ``device``): ``"cpu"`` or ``"gpu"``, the latter
    only with ``device="gpu"``. Deep CDI's results are small and always returned as numpy arrays.

    Raises ``ValueError`` for another value or ``storage="gpu"`` with ``device="cpu"``.
    """
    storage = device if storage is None else storage
    if storage not in STORAGES:
        raise ValueError(f"storage must be 'cpu' or 'gpu', got {storage!r}")
    if storage == "gpu" and device != "gpu":
        raise ValueError("storage='gpu' and device='cpu' is not supported (py4DSTEM's rule)")
    return storage


def check_name(name: str) -> str:
    """The emdfile node's name (the HDF5 group the reconstruction is written to). Raises ``ValueError`` unless a
    non-empty string without ``/``."""
    if not isinstance(name, str) or not name or "/" in name:
        raise ValueError(f"name must be a non-empty string without '/', got {name!r}")
    return name


def check_rolloff(rolloff: float | None) -> float | None:
    """The aperture edge of the data (mrad, py4DSTEM's ``rolloff``; None: the model's). Raises ``ValueError`` unless
    None or a finite number >= 0."""
    if rolloff is None:
        return None
    if isinstance(rolloff, bool) or not isinstance(rolloff, (int, float)) or not math.isfinite(rolloff) or rolloff < 0:
        raise ValueError(f"rolloff must be a finite number >= 0 (mrad), got {rolloff!r}")
    return float(rolloff)


def check_positions_mask(mask, scan_shape: tuple[int, int]) -> np.ndarray | None:
    """``positions_mask`` as a (Rx, Ry) bool array (None stays None).

    Raises ``ValueError`` for another shape or fewer than 2 kept positions.
    """
    if mask is None:
        return None
    mask = np.asarray(mask)
    if mask.shape != tuple(scan_shape):
        raise ValueError(f"positions_mask must have the scan's shape {tuple(scan_shape)}, got {mask.shape}")
    mask = mask.astype(bool)
    if mask.sum() < 2:
        raise ValueError(f"positions_mask keeps {int(mask.sum())} position(s); deep CDI needs overlapping positions")
    return mask


def scan_frame_positions(positions, scan_shape: tuple[int, int], step: tuple[float, float],
                         mask: np.ndarray | None) -> np.ndarray | None:
    """Measured positions (Rx·Ry, 2) Å in the scan's frame, from ``initial_scan_positions`` given as (Rx·Ry, 2),
    (Rx, Ry, 2) or, with a ``mask``, (kept positions, 2) (the others then take their raster place, ``step`` Å).

    Raises ``ValueError`` for another shape or values that are not finite.
    """
    if positions is None:
        return None
    positions = np.asarray(positions, dtype=np.float64)
    count = scan_shape[0] * scan_shape[1]
    kept = None if mask is None else int(mask.sum())
    if positions.shape == (*scan_shape, 2):
        positions = positions.reshape(count, 2)
    if positions.ndim != 2 or positions.shape[1] != 2 or len(positions) not in (count, kept):
        allowed = f"({count}, 2) or {(*scan_shape, 2)}" + (f" or ({kept}, 2) (the masked positions)" if kept else "")
        raise ValueError(f"initial_scan_positions must have shape {allowed} (Å), got {positions.shape}")
    if not np.isfinite(positions).all():
        raise ValueError("initial_scan_positions hold NaN or infinite values")
    if len(positions) == count:
        return positions
    full = scan_positions(scan_shape, step)
    full[mask.ravel()] = positions
    return full


def select_positions(data: PreprocessedData, positions: np.ndarray | None, mask: np.ndarray | None,
                     subsample: int, scan_shape: tuple[int, int]) -> PreprocessedData:
    """Preprocessed data with the measured scan-frame ``positions`` (Rx·Ry, 2) Å of the full ``scan_shape`` in place
    of the raster ones (subsampled, rotated and transposed like them) and only the patterns where ``mask`` (Rx, Ry)
    is True."""
    s = int(subsample)
    if positions is not None:
        grid = positions.reshape(*scan_shape, 2)[::s, ::s].reshape(-1, 2)
        data = dataclasses.replace(data, positions=rotate_positions(grid, data.rotation_deg, data.transpose))
    if mask is None:
        return data
    keep = mask[::s, ::s].ravel()
    if keep.sum() < 2:
        raise ValueError(f"positions_mask with subsample={s} keeps {int(keep.sum())} position(s); use a smaller one")
    chosen = {"amplitudes": data.amplitudes[keep], "positions": data.positions[keep]}
    for name in ("pooled", "pattern_electrons"):
        value = getattr(data, name)
        if value is not None:
            chosen[name] = value[keep]
    return dataclasses.replace(data, **chosen)


def probe_aberrations_and_source(probe: Any) -> tuple[dict[str, float], dict[str, Any]]:
    """The aberrations ``probe=`` gives and where they came from.

    ``probe`` may be None, a dict of polar parameters, a ``ProbeRecovery`` or its ``to_dict()`` (the JSON of
    ``deepcdi recover-probe``). The source record is ``{"method": "given"}`` for plain parameters, else the
    recovery's ``method``, ``from_data`` (parameters measured from the data), ``assumed``, ``uncertainty`` (Å, rad)
    and ``warnings``.
    """
    if probe is None:
        return {}, {"method": "given"}
    record = probe.to_dict() if hasattr(probe, "to_dict") else probe
    if not isinstance(record, Mapping):
        raise TypeError(f"probe must be a dict of aberrations or a ProbeRecovery, got {type(probe).__name__}")
    if "aberrations" not in record:
        return dict(record), {"method": "given"}
    source = {key: record[key] for key in ("method", "from_data", "assumed", "uncertainty", "warnings")
              if key in record}
    return dict(record["aberrations"]), {"method": "given", **source}
