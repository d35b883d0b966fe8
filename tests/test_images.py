import math

import numpy as np
import pytest
import skimage.data
import skimage.io
import torch
from scipy.ndimage import maximum_filter

from py4dstem_deepcdi.images import (
    LatticeSource,
    MixedSource,
    NoiseSource,
    PhotoSource,
    _blur_matrices,
    _lattice_sites,
    default_source,
)

SAMPLING = (0.3076, 0.3076)


@pytest.fixture(scope="module")
def photos():
    return PhotoSource.from_skimage()


def test_photos_are_local_and_augmented(photos):
    assert photos.n_images >= 15
    g = torch.Generator().manual_seed(0)
    x = photos.sample(2000, (32, 32), SAMPLING, g)
    assert x.shape == (2000, 32, 32)
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    # every draw is a different object: no two of 2000 samples are equal (so 250,000+ distinct ones are available)
    flat = x.reshape(2000, -1)
    distances = torch.cdist(flat[:500], flat[:500]) + torch.eye(500) * 1e9
    assert float(distances.min()) > 1e-3
    # high entropy: most samples carry structure (not flat)
    assert float((x.std((-2, -1)) > 0.05).float().mean()) > 0.9


def test_photo_sampling_is_seeded(photos):
    a = photos.sample(8, (32, 32), SAMPLING, torch.Generator().manual_seed(3))
    b = photos.sample(8, (32, 32), SAMPLING, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_folder_source(tmp_path):
    skimage.io.imsave(tmp_path / "a.png", skimage.data.camera())
    skimage.io.imsave(tmp_path / "b.tif", skimage.data.coins())
    (tmp_path / "notes.txt").write_text("not an image")
    source = PhotoSource.from_folder(tmp_path)
    assert source.n_images == 2
    x = source.sample(4, (32, 32), SAMPLING, torch.Generator().manual_seed(0))
    assert x.shape == (4, 32, 32)


def test_folder_errors(tmp_path):
    with pytest.raises(ValueError, match="holds no"):
        PhotoSource.from_folder(tmp_path)
    with pytest.raises(ValueError, match="does not exist"):
        PhotoSource.from_folder(tmp_path / "missing")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="cannot read image"):
        PhotoSource.from_folder(tmp_path)


def test_lattice_has_the_drawn_periodicity():
    # one lattice with fixed spacing: its power spectrum peaks at 1/(a sin γ) ... check the autocorrelation peak
    source = LatticeSource(spacing_range=(2.0, 2.0), sigma_range=(0.3, 0.3), vacancy_range=(0, 0), amorphous_fraction=0)
    x = source.sample(64, (64, 64), (0.2, 0.2), torch.Generator().manual_seed(1))
    assert x.shape == (64, 64, 64)
    # nearest-neighbour distance between atoms is at least ~0.8 a and at most a
    img = x[0].numpy()
    peaks = np.argwhere((img == maximum_filter(img, size=5)) & (img > 0.5))
    d = np.sqrt(((peaks[:, None] - peaks[None]) ** 2).sum(-1)) * 0.2
    d[d == 0] = np.inf
    nn = np.median(d.min(1))
    assert 1.5 < nn <= 2.1


def test_noise_and_mixture_weights():
    g = torch.Generator().manual_seed(0)
    noise = NoiseSource().sample(16, (32, 32), SAMPLING, g)
    assert noise.shape == (16, 32, 32) and float(noise.max()) == 1.0
    with pytest.raises(ValueError):
        MixedSource([NoiseSource()], [1.0, 2.0])
    with pytest.raises(ValueError, match="unknown training-set sources"):
        default_source(mix={"cats": 1.0})


def test_blur_matrices_equal_the_fft_blur_of_the_padded_grid():
    g = torch.Generator().manual_seed(0)
    for grid, shape, sampling in [((46, 46), (32, 32), (0.3, 0.3)), ((45, 50), (31, 36), (0.2, 0.25))]:
        sigma = 0.15 + 0.35 * torch.rand(4, generator=g)
        image = torch.rand(4, *grid, generator=g)
        bx, by = _blur_matrices(sigma, grid, shape, sampling)
        out = bx @ image @ by.transpose(-1, -2)
        qx = torch.fft.fftfreq(grid[0], d=sampling[0])[:, None]
        qy = torch.fft.fftfreq(grid[1], d=sampling[1])[None, :]
        transfer = torch.exp(-2 * math.pi**2 * sigma[:, None, None] ** 2 * (qx**2 + qy**2))
        expected = torch.fft.ifft2(torch.fft.fft2(image) * transfer).real
        r0, c0 = (grid[0] - shape[0]) // 2, (grid[1] - shape[1]) // 2
        np.testing.assert_allclose(out.numpy(), expected[:, r0 : r0 + shape[0], c0 : c0 + shape[1]].numpy(), atol=1e-5)


def test_lattice_sites_are_exactly_the_sites_inside_the_rectangle():
    g = torch.Generator().manual_seed(1)
    extent = (14.2, 11.7)
    n = 6
    a = 1.2 + 2.8 * torch.rand(n, generator=g)
    angle = 2 * np.pi * torch.rand(n, generator=g)
    gamma = np.pi / 3 + np.pi / 6 * torch.rand(n, generator=g)
    cells = torch.stack(
        [torch.stack([torch.cos(angle), torch.sin(angle)], -1) * a[:, None],
         torch.stack([torch.cos(angle + gamma), torch.sin(angle + gamma)], -1) * (a * 1.1)[:, None]], 1
    )  # fmt: skip
    origin = 2 * torch.rand(n, 2, generator=g)
    lattice, x, y = _lattice_sites(cells, origin, extent)
    idx = torch.arange(-60, 61, dtype=torch.float64)
    for s in range(n):
        i, j = torch.meshgrid(idx, idx, indexing="ij")
        c = cells[s].double()
        pos = (i.flatten()[:, None] + origin[s, 0]) * c[0] + (j.flatten()[:, None] + origin[s, 1]) * c[1]
        pos = pos + torch.tensor(extent, dtype=torch.float64) / 2
        inside = (pos[:, 0] >= 0) & (pos[:, 0] < extent[0]) & (pos[:, 1] >= 0) & (pos[:, 1] < extent[1])
        expected = pos[inside]
        got = torch.stack([x[lattice == s], y[lattice == s]], -1).double()
        assert len(got) == len(expected) > 0
        order = lambda p: p[torch.argsort(p[:, 0] * 1000 + p[:, 1])]  # noqa: E731
        np.testing.assert_allclose(order(got).numpy(), order(expected).numpy(), atol=1e-4)
