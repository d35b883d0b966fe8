"""Shared cases of the comparison tests (tests/test_comparison_*.py): a small simulated scan, a tiny untrained
deep-CDI reconstruction of it and its comparison with ePIE, each built once per test session.

The deep-CDI side uses a tiny untrained network (its quality is not asserted); ePIE's quality is, against the
simulator's ground truth. An "oracle" reconstruction (the truth written onto the deep-CDI canvas) checks the whole
alignment chain: positions → canvas → ePIE object → truth.
"""

import copy
import functools
import warnings

import numpy as np

from py4dstem_deepcdi import DeepCDIModel, DeepCDIReconstruction, ResUNet
from py4dstem_deepcdi.comparison import compare_with_epie
from py4dstem_deepcdi.comparison.alignment import sample
from py4dstem_deepcdi.probe import ProbeGeometry
from py4dstem_deepcdi.simulation import simulate_dataset

EPIE_ITERATIONS = 8


@functools.cache
def geometry() -> ProbeGeometry:
    return ProbeGeometry(300e3, 17.1, angular_sampling=2.0, aberrations={"C10": -100.0}, mask_threshold=0.1)


def reconstruction(ds, geom, rotation_deg=0.0, subsample=1, reconstruct=True):
    """A tiny untrained deep-CDI reconstruction of ``ds`` (preprocessed and reconstructed unless told not to)."""
    model = DeepCDIModel(ResUNet(width=0.125, depth=2).eval(), geom, {})
    recon = DeepCDIReconstruction(
        ds.datacube, geom.energy, geom.semiangle_cutoff, polar_parameters=geom.aberrations, model=model,
        rotation_deg=rotation_deg, transpose=False, subsample=subsample, verbose=False,
    )
    return recon.preprocess().reconstruct(progress=False) if reconstruct else recon


@functools.cache
def dataset():
    """12×12 positions, 0.5 Å step, 10⁶ e⁻/pattern, seed 1."""
    return simulate_dataset(geometry(), scan_shape=(12, 12), scan_step=0.5, electrons=1e6, seed=1)


@functools.cache
def finished_reconstruction():
    return reconstruction(dataset(), geometry())


@functools.cache
def comparison():
    """compare_with_epie of the shared reconstruction, EPIE_ITERATIONS iterations, with the ground truth."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the untrained network's image may not register: that warning is expected
        return compare_with_epie(finished_reconstruction(), num_iter=EPIE_ITERATIONS, ground_truth=dataset(),
                                 progress=False)


def oracle(recon, ds):
    """A copy of the reconstruction whose phase image is the ground truth itself, placed by the positions."""
    oracle = copy.copy(recon)
    h, w = recon.object_phase.shape
    grid = np.stack(np.meshgrid(np.arange(h), np.arange(w), indexing="ij")).astype(float)
    origin = (recon.positions_px - recon.positions / np.array(recon.sampling)).mean(0)
    delta = (ds.positions - recon.positions).mean(0)
    truth_px = ((grid - origin[:, None, None]) * recon.sampling[0] + delta[:, None, None]) / ds.sampling
    oracle.object_phase = np.where(np.isfinite(recon.object_phase), sample(ds.phase, truth_px), np.nan)
    return oracle
