import comparison_cases
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


# ------------------------------------------------------------------ shared cases of the comparison tests
@pytest.fixture(scope="module")
def geom():
    """The comparison tests' geometry (tests/comparison_cases.py)."""
    return comparison_cases.geometry()


@pytest.fixture(scope="module")
def ds():
    """The comparison tests' simulated scan (built once per session)."""
    return comparison_cases.dataset()


@pytest.fixture(scope="module")
def recon():
    """The comparison tests' finished deep-CDI reconstruction (built once per session)."""
    return comparison_cases.finished_reconstruction()


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread: the tiny networks of some tests gain nothing from a second, which mostly waits."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
