"""A virtual annular dark-field image of a reconstruction's datacube, for the comparison figure."""

from __future__ import annotations

from typing import Any

import numpy as np
import py4DSTEM

from .inputs import ReconstructionLike, scan_patterns


def virtual_adf(recon: ReconstructionLike, inner_factor: float = 1.1) -> tuple[np.ndarray | None, dict[str, Any]]:
    """Virtual annular dark-field image (scan shape after subsampling, counts) of a preprocessed reconstruction's
    datacube, by py4DSTEM's ``get_virtual_image``.

    Inner radius ``inner_factor`` (default 1.1) × the bright-field radius (``semiangle_cutoff / data angular
    sampling`` pixels), outer radius the detector edge, centred on the mean fitted bright-field-disk centre.
    Computed on a private DataCube (py4DSTEM stores virtual images in the datacube's tree). Returns ``(image, info)``
    with ``info`` the detector geometry (``centre_px``, ``inner_px``, ``outer_px``, ``inner_mrad``, ``outer_mrad``,
    ``bright_field_px``); ``(None, info)`` with ``info["reason"]`` when the detector holds no dark field.
    """
    patterns = scan_patterns(recon)
    centre = recon.data.centre.reshape(-1, 2).mean(0)
    angular = recon.data.data_angular_sampling
    r_bf = recon.geometry.semiangle_cutoff / angular
    r_in = inner_factor * r_bf
    qx, qy = patterns.shape[2:]
    r_out = float(min(centre[0], centre[1], qx - 1 - centre[0], qy - 1 - centre[1]))
    info = {
        "centre_px": centre.tolist(),
        "inner_px": r_in,
        "outer_px": r_out,
        "inner_mrad": r_in * angular,
        "outer_mrad": r_out * angular,
        "bright_field_px": r_bf,
    }
    if r_out <= r_in + 0.5:
        info["reason"] = "the detector ends at the bright-field disk: no dark-field signal"
        return None, info
    datacube = py4DSTEM.DataCube(data=np.asarray(patterns))
    image = datacube.get_virtual_image(
        mode="annulus", geometry=((float(centre[0]), float(centre[1])), (float(r_in), r_out)), verbose=False,
        name="deepcdi_adf",
    )
    return np.asarray(image.data, dtype=np.float64), info
