"""The shipped model's image quality on datasets simulated by the package (ground truth known)."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from py4dstem_deepcdi.comparison import score_reconstruction
from py4dstem_deepcdi.models import list_pretrained, load_pretrained
from py4dstem_deepcdi.probe import AberrationRanges
from py4dstem_deepcdi.reconstruction import DeepCDIReconstruction
from py4dstem_deepcdi.simulation import simulate_dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from quality import random_object  # noqa: E402  (bench/quality.py: the smooth random objects of its draws)

#: correlation with the ground truth the shipped model must reach on a simulated lattice (see docs/models.md)
MIN_CORRELATION = 0.9


@pytest.fixture(scope="module")
def model():
    return load_pretrained("hbn-300kv-17mrad")


def test_shipped_model_is_listed_with_its_metadata(model):
    info = list_pretrained()["hbn-300kv-17mrad"]
    g = info["geometry"]
    assert g["energy_eV"] == 300e3 and g["semiangle_cutoff_mrad"] == 17.1 and g["detector_shape"] == [32, 32]
    assert g["aberrations"]["C10"] == -100.0
    training = model.metadata["training"]
    assert training["samples"] > 100_000
    assert training["val_l1"] < 0.6 * training["val_l1_zero"]  # far better than predicting zero
    assert model.metadata["version"]
    with pytest.raises(ValueError, match="no shipped model named"):
        load_pretrained("nonexistent")


def test_shipped_probe_conditioned_model_serves_probes_in_its_ranges():
    """The conditioned model takes the probe as input: it reconstructs a lattice scanned with a probe other than its
    reference (C10 −75 Å, astigmatism, coma) to the quality bar, and refuses probes outside its ranges."""
    conditioned = load_pretrained("hbn-300kv-17mrad-probe")
    assert conditioned.conditioned
    assert conditioned.aberration_ranges == AberrationRanges(C10=(-120.0, -60.0), C12=25.0, C21=300.0, C23=300.0)
    probe = {"C10": -75.0, "C12": 15.0, "phi12": 0.7, "C21": 150.0, "phi21": 2.0}
    dataset = simulate_dataset(conditioned.geometry.replace(aberrations=probe), scan_shape=(24, 24), seed=5)
    g = conditioned.geometry
    recon = DeepCDIReconstruction(
        dataset.datacube, g.energy, g.semiangle_cutoff, model=conditioned, rotation_deg=0.0, transpose=False,
        verbose=False, probe=probe,
    ).preprocess().reconstruct(progress=False)
    assert score_reconstruction(recon, dataset)["correlation"] >= MIN_CORRELATION
    with pytest.raises(ValueError, match="C10 = -40"):
        DeepCDIReconstruction(dataset.datacube, g.energy, g.semiangle_cutoff, model=conditioned, C10=-40.0)


def reconstruct(model, dataset, **options):
    g = model.geometry
    recon = DeepCDIReconstruction(
        dataset.datacube, g.energy, g.semiangle_cutoff, model=model, rotation_deg=dataset.rotation_deg,
        transpose=False, verbose=False, **g.aberrations, **options,
    )
    return recon.preprocess().reconstruct()


def test_lattice_reconstruction_matches_truth(model):
    torch.set_num_threads(2)
    ds = simulate_dataset(model.geometry, scan_shape=(32, 32), scan_step=0.25, dose=1.6e6, seed=1)
    score = score_reconstruction(reconstruct(model, ds), ds)
    assert score["correlation"] >= MIN_CORRELATION


@pytest.mark.slow
@pytest.mark.parametrize(
    "sim, options",
    [
        ({"scan_step": 0.3076}, {}),  # an integer step in pixels
        ({"rotation_deg": 17.0}, {}),  # a rotated scan
        ({}, {"subsample": 2}),
        ({}, {"subsample": 3}),
        ({"dose": 1.6e7}, {}),  # 10× the nominal dose
    ],
)
def test_more_cases(model, sim, options):
    args = {"scan_shape": (40, 40), "scan_step": 0.25, "dose": 1.6e6, "seed": 1, **sim}
    ds = simulate_dataset(model.geometry, **args)
    score = score_reconstruction(reconstruct(model, ds, **options), ds)
    assert score["correlation"] >= MIN_CORRELATION


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_smooth_random_object_with_symmetrized_patches(model, seed):
    """The non-lattice case: a smooth random object (bench/quality.py's draws 0-2) reaches the bar when every patch
    is averaged over the probe's 8 symmetries (without: 0.884 / 0.894 / 0.932, see docs/models.md)."""
    g = model.geometry
    extent = int(np.ceil(40 * 0.25 / g.sampling[0])) + g.detector_shape[0] + 8
    ds = simulate_dataset(g, scan_shape=(40, 40), scan_step=0.25, dose=1.6e6, seed=1,
                          phase=random_object((extent, extent), seed=seed))
    recon = DeepCDIReconstruction(
        ds.datacube, g.energy, g.semiangle_cutoff, model=model, rotation_deg=0.0, transpose=False, verbose=False,
        **g.aberrations,
    ).preprocess().reconstruct(symmetrize=True, progress=False)
    assert score_reconstruction(recon, ds)["correlation"] >= MIN_CORRELATION
