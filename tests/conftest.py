import numpy as np
import pytest
import torch

from py4dstem_deepcdi.probe import ProbeGeometry

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def geometry():
    """The quick-start geometry: 300 keV, 17.1 mrad, 32×32 patterns of 2 mrad, 100 Å defocus, mild astigmatism."""
    return ProbeGeometry(
        energy=300e3,
        semiangle_cutoff=17.1,
        angular_sampling=2.0,
        aberrations={"C10": -100.0, "C12": 20.0, "phi12": 0.5},
        mask_threshold=0.1,
    )


@pytest.fixture
def rng():
    return np.random.default_rng(0)
