import numpy as np
import py4DSTEM
import pytest
import torch

from py4dstem_deepcdi.encoding import conditioning_mask, probe_channels
from py4dstem_deepcdi.probe import ProbeGeometry
from py4dstem_deepcdi.simulation import ForwardModel, lattice_object, simulate_dataset


@pytest.fixture(scope="module")
def model(geometry):
    return ForwardModel(geometry)


def random_phase(n, seed=0, shape=(32, 32)):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, *shape, generator=g) * 2.0


def test_parseval_total_intensity_is_one(model):
    intensity = model.intensity(random_phase(8))
    np.testing.assert_allclose(intensity.sum((-2, -1)).numpy(), 1.0, rtol=1e-5)


def test_intensity_matches_numpy_reference(model, geometry):
    phase = random_phase(1, seed=3)[0].numpy().astype(np.float64)
    exit_wave = np.fft.ifftshift(geometry.probe * np.exp(1j * phase))  # corner-centred, as py4DSTEM does
    expected = np.fft.fftshift(np.abs(np.fft.fft2(exit_wave)) ** 2) / exit_wave.size
    np.testing.assert_allclose(model.intensity(torch.as_tensor(phase)[None])[0].numpy(), expected, atol=1e-6)


def test_empty_object_gives_the_bright_field_disk(model, geometry):
    intensity = model.intensity(torch.zeros(1, 32, 32))[0].numpy()
    np.testing.assert_allclose(intensity, np.abs(geometry.probe_fourier) ** 2, atol=1e-6)
    assert np.unravel_index(np.argmax(intensity), intensity.shape) != (0, 0)
    com = [(intensity * np.arange(32)[:, None]).sum(), (intensity * np.arange(32)[None, :]).sum()]
    np.testing.assert_allclose(com, [16, 16], atol=0.5)  # the disk is centred at N//2


def test_phase_ramp_shifts_pattern_by_known_pixels(model):
    # φ(r) = 2π (3 r0/N + 2 r1/N) (pixels) deflects the beam by (+3, +2) detector pixels
    r = torch.arange(32.0)
    ramp = 2 * np.pi * (3 * r[:, None] + 2 * r[None, :]) / 32
    flat = model.intensity(torch.zeros(1, 32, 32))[0]
    tilted = model.intensity(ramp[None])[0]
    np.testing.assert_allclose(tilted.numpy(), torch.roll(flat, (3, 2), (0, 1)).numpy(), atol=1e-6)


def test_twin_image_gives_identical_intensity(model, geometry):
    # |F[f]|² = |F[f*(-r)]|²: the twin of the exit wave is indistinguishable from intensities alone
    phase = random_phase(1, seed=5)[0].numpy()
    exit_wave = geometry.probe * np.exp(1j * phase)
    twin = np.conj(np.roll(np.flip(exit_wave), 1, axis=(0, 1)))
    i1 = np.abs(np.fft.fft2(exit_wave)) ** 2
    i2 = np.abs(np.fft.fft2(twin)) ** 2
    np.testing.assert_allclose(i1, i2, atol=1e-8 * i1.max())
    # the twin's object is [P*(-r)/P(r)]·exp(-iφ(-r)); the aberrated probe makes P*(-r)/P(r) far from a constant
    # inside the illuminated area, so the twin object differs from any offset of the true one
    p = geometry.probe
    ratio = np.conj(np.roll(np.flip(p), 1, axis=(0, 1)))[geometry.mask] / p[geometry.mask]
    assert np.ptp(np.angle(ratio / ratio[0])) > 1.0


def test_subpixel_probe_shift(model, geometry):
    shifted = model.shifted_probes(torch.tensor([[1.0, -2.0], [0.5, 0.0]]))
    np.testing.assert_allclose(shifted[0].numpy(), np.roll(geometry.probe, (1, -2), (0, 1)), atol=1e-6)
    # half a pixel: the centre of intensity moves by 0.5 pixel, the norm is kept
    intensity = shifted[1].abs().numpy() ** 2
    base = np.abs(geometry.probe) ** 2
    com = lambda a: (a * np.arange(32)[:, None]).sum() / a.sum()  # noqa: E731
    assert com(intensity) - com(base) == pytest.approx(0.5, abs=0.02)
    assert intensity.sum() == pytest.approx(1.0, rel=1e-5)


def test_intensity_equals_shifted_unitary_fft_for_odd_and_even_shapes():
    # the fftshift and the unitary norm are folded into the probe: check against the plain formula
    geometry = ProbeGeometry(300e3, 17.1, detector_shape=(33, 30), angular_sampling=2.0, aberrations={"C10": -100.0})
    model = ForwardModel(geometry)
    phase = random_phase(3, seed=7, shape=(33, 30))
    shifts = torch.tensor([[0.3, -0.7], [1.0, 2.0], [0.0, 0.0]])
    for shifts_px in (None, shifts):
        probe = model.probe[None] if shifts_px is None else model.shifted_probes(shifts_px)
        far = torch.fft.fft2(probe * torch.exp(1j * phase), norm="ortho")
        expected = torch.fft.fftshift(far.abs() ** 2, dim=(-2, -1))
        np.testing.assert_allclose(model.intensity(phase, shifts_px).numpy(), expected.numpy(), atol=1e-6)


def test_per_pattern_probes_and_masks(model, geometry):
    """Given the geometry's own probe per pattern, the forward model and the target are those of the fixed probe;
    another probe's patterns still sum to 1 (Parseval)."""

    phase = random_phase(3)
    probes = torch.as_tensor(np.stack([geometry.probe] * 3), dtype=torch.complex64)
    torch.testing.assert_close(model.intensity(phase, probes=probes), model.intensity(phase), atol=1e-7, rtol=1e-5)
    shifts = torch.tensor([[0.3, -0.2]] * 3)
    torch.testing.assert_close(
        model.intensity(phase, shifts, probes), model.intensity(phase, shifts), atol=1e-7, rtol=1e-5
    )
    other = geometry.replace(aberrations={"C10": -70.0, "C21": 200.0})
    intensity = model.intensity(phase, probes=torch.as_tensor(np.stack([other.probe] * 3), dtype=torch.complex64))
    np.testing.assert_allclose(intensity.sum((-2, -1)).numpy(), 1.0, rtol=1e-5)
    channels = probe_channels(other.probe)
    assert channels.shape == (2, 32, 32) and float(torch.hypot(channels[0], channels[1]).max()) == pytest.approx(1.0)
    x = torch.cat([torch.zeros(1, 1, 32, 32), channels[None]], 1)
    np.testing.assert_array_equal(conditioning_mask(x, geometry.mask_threshold)[0, 0].numpy(), other.mask)
    masks = torch.as_tensor(np.stack([other.mask] * 3))
    target = model.target(phase, mask=masks)
    assert float(target[:, ~torch.as_tensor(other.mask)].abs().max()) == 0
    np.testing.assert_allclose(target[:, torch.as_tensor(other.mask)].mean(1).numpy(), 0, atol=1e-6)


def test_target_is_masked_and_zero_mean(model):
    target = model.target(random_phase(4))
    mask = model.mask
    assert torch.all(target[:, ~mask] == 0)
    np.testing.assert_allclose(target[:, mask].mean(-1).numpy(), 0, atol=1e-6)


def test_simulated_dataset_calibration_and_counts(geometry):
    ds = simulate_dataset(geometry, scan_shape=(6, 5), scan_step=0.25, dose=1.6e6, seed=2)
    dc = ds.datacube
    assert dc.data.shape == (6, 5, 32, 32)
    assert dc.calibration.get_R_pixel_size() == 0.25 and dc.calibration.get_R_pixel_units() == "A"
    assert dc.calibration.get_Q_pixel_size() == 2.0 and dc.calibration.get_Q_pixel_units() == "mrad"
    assert ds.electrons_per_pattern == pytest.approx(1e5)
    assert dc.data.sum((2, 3)).mean() == pytest.approx(1e5, rel=0.01)
    assert np.all(dc.data == np.round(dc.data))  # Poisson counts
    noiseless = simulate_dataset(geometry, scan_shape=(6, 5), scan_step=0.25, dose=1.6e6, seed=2, noise=False)
    np.testing.assert_allclose(noiseless.datacube.data.sum((2, 3)), 1e5, rtol=1e-4)
    np.testing.assert_allclose(np.diff(ds.positions[:2], axis=0), [[0, 0.25]], atol=1e-9)


def test_ptychography_contract_with_py4dstem_epie(geometry):
    """Our simulator and py4DSTEM's ePIE agree on every convention: the true phase comes back, not its twin."""
    ds = simulate_dataset(geometry, scan_shape=(20, 20), scan_step=0.5, electrons=1e6, seed=1)
    p = py4DSTEM.process.phase.SingleslicePtychography(
        energy=geometry.energy, datacube=ds.datacube, semiangle_cutoff=geometry.semiangle_cutoff,
        polar_parameters=dict(geometry.aberrations), device="cpu", verbose=False, object_type="complex",
    )
    p.preprocess(force_com_rotation=0, force_com_transpose=False, plot_center_of_mass=False, plot_rotation=False,
                 plot_probe_overlaps=False)
    p.reconstruct(num_iter=8, reconstruction_method="GD", max_batch_size=1, step_size=0.5, fix_probe=True,
                  progress_bar=False, seed_random=0)
    recon = np.angle(p.object)
    # ePIE pixel (i, j) is truth pixel (i, j) + offset; the offset follows from the two position lists
    offset = np.round((ds.positions / ds.sampling - np.asarray(p._positions_px)).mean(0)).astype(int)
    lo = np.ceil(np.asarray(p._positions_px).min(0)).astype(int) + 2
    hi = np.floor(np.asarray(p._positions_px).max(0)).astype(int) - 2
    rec = recon[lo[0]:hi[0], lo[1]:hi[1]]
    truth = ds.phase[lo[0] + offset[0]:hi[0] + offset[0], lo[1] + offset[1]:hi[1] + offset[1]]

    def corr(a, b):
        a, b = a - a.mean(), b - b.mean()
        return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))

    assert corr(rec, truth) >= 0.95
    assert corr(rec, truth[::-1, ::-1]) < 0.5  # not flipped
    assert corr(rec, truth.T) < 0.5  # not transposed
    assert corr(-rec, truth) < 0  # not conjugated


def test_target_out_and_mask_keywords(model, geometry):
    """``target(phase, out=..., mask=...)`` writes into ``out`` and bounds the patch by the given mask."""
    phase = random_phase(2, seed=9)
    out = torch.empty(2, 32, 32)
    assert model.target(phase, out=out) is out
    torch.testing.assert_close(out, model.target(phase))
    small = torch.zeros(32, 32, dtype=torch.bool)
    small[12:20, 12:20] = True
    masked = model.target(phase, mask=small)
    assert float(masked[:, ~small].abs().max()) == 0
    np.testing.assert_allclose(masked[:, small].mean(-1).numpy(), 0, atol=1e-6)


def test_dataset_is_reproducible_and_rejects_bad_input(geometry):
    a = simulate_dataset(geometry, scan_shape=(3, 4), scan_step=0.5, dose=1e4, seed=3)
    b = simulate_dataset(geometry, scan_shape=(3, 4), scan_step=0.5, dose=1e4, seed=3)
    np.testing.assert_array_equal(a.datacube.data, b.datacube.data)
    assert a.scan_step == (0.5, 0.5) and a.positions.shape == (12, 2)
    with pytest.raises(ValueError, match="electrons must be positive"):
        simulate_dataset(geometry, scan_shape=(3, 4), electrons=0.0)
    with pytest.raises(ValueError, match="scan_shape"):
        simulate_dataset(geometry, scan_shape=(0, 4))
    with pytest.raises(ValueError, match="2-D"):
        simulate_dataset(geometry, scan_shape=(3, 4), phase=np.zeros(5))
    with pytest.raises(ValueError, match="too small"):
        simulate_dataset(geometry, scan_shape=(3, 4), phase=np.zeros((8, 8)))


def test_lattice_object_scale_and_seed():
    a = lattice_object((40, 30), 0.2, phase_max=0.7, seed=1)
    assert a.shape == (40, 30) and a.dtype == np.float32
    assert 0 <= a.min() and a.max() <= 0.7 + 1e-6
    np.testing.assert_array_equal(a, lattice_object((40, 30), 0.2, phase_max=0.7, seed=1))
    assert not np.array_equal(a, lattice_object((40, 30), 0.2, phase_max=0.7, seed=2))


def test_neighbour_intensity_is_the_object_seen_from_the_neighbouring_positions(model):
    """Shifting the probe by δ over a window equals the centred probe over the object rolled by −δ (whole pixels)."""
    phase = random_phase(2)
    offsets = torch.tensor([[[1.0, 0.0], [0.0, -2.0]], [[-1.0, 1.0], [2.0, 2.0]]])
    total = model.neighbour_intensity(phase, offsets)
    expected = torch.zeros_like(total)
    for b in range(2):
        for delta in offsets[b].long().tolist():
            rolled = torch.roll(phase[b], (-delta[0], -delta[1]), (0, 1))
            expected[b] += model.intensity(rolled[None])[0]
    np.testing.assert_allclose(total.numpy(), expected.numpy(), atol=2e-6)
    np.testing.assert_allclose(total.sum((-2, -1)).numpy(), 2.0, rtol=1e-4)  # each term sums to 1
