import numpy as np
import pytest
import torch

from py4dstem_deepcdi.encoding import conditioning_mask, probe_channels
from py4dstem_deepcdi.simulation import (
    ForwardModel,
    StreamConfig,
    TrainingStream,
    read_training_set,
    simulate_dataset,
    write_training_set,
)


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


def test_poisson_mean_and_variance(geometry):
    stream = TrainingStream(geometry, StreamConfig(electrons_range=(1e4, 1e4), batch_size=4000, mix={"noise": 1.0, "photos": 0, "lattice": 0}))
    model = stream.model
    phase = torch.zeros(4000, 32, 32)
    expected = model.intensity(phase) * 1e4
    g = torch.Generator().manual_seed(1)
    counts = torch.poisson(expected, generator=g)
    pixel = (16, 18)
    lam = float(expected[0][pixel])
    sample = counts[:, pixel[0], pixel[1]].double()
    assert float(sample.mean()) == pytest.approx(lam, rel=4 / np.sqrt(lam * 4000) + 0.01)
    assert float(sample.var()) == pytest.approx(lam, rel=0.1)
    # the stream's totals follow the dose: N_e counts per pattern on average
    x, _ = stream.batch(0, batch_size=256)
    totals = (x[:, 0] ** 2).sum((-2, -1)) / 1024 * 1e4
    assert float(totals.mean()) == pytest.approx(1e4, rel=0.01)


def test_target_is_masked_and_zero_mean(model):
    target = model.target(random_phase(4))
    mask = model.mask
    assert torch.all(target[:, ~mask] == 0)
    np.testing.assert_allclose(target[:, mask].mean(-1).numpy(), 0, atol=1e-6)


def test_stream_reproducible_and_differs_between_workers(geometry):
    config = StreamConfig(batch_size=8)
    a = TrainingStream(geometry, config, seed=7)
    b = TrainingStream(geometry, config, seed=7)
    c = TrainingStream(geometry, config, seed=7, worker=1)
    xa, ya = next(a)
    xb, yb = next(b)
    assert torch.equal(xa, xb) and torch.equal(ya, yb)
    xc, _ = next(c)
    assert not torch.equal(xa, xc)
    xa2, _ = next(a)
    assert not torch.equal(xa, xa2)
    resumed = TrainingStream(geometry, config, seed=7, start=1)
    assert torch.equal(next(resumed)[0], xa2)
    assert xa.shape == (8, 1, 32, 32) and xa.dtype == torch.float32


def test_log_phase_sampling_draws_more_weak_objects(geometry):
    """Targets' peak-to-valley phase: log-uniform over (0.01, 1) rad has its median near 0.1·(image range), uniform
    near 0.5·(image range); both stay within the range."""
    spans = {}
    for sampling in ("uniform", "log"):
        config = StreamConfig(batch_size=256, phase_max_range=(0.01, 1.0), phase_max_sampling=sampling,
                              mix={"photos": 0.0, "lattice": 0.0, "noise": 1.0})
        _, y = TrainingStream(geometry, config, seed=3).batch(0)
        mask = torch.as_tensor(geometry.mask)
        inside = y[:, 0][:, mask]
        spans[sampling] = (inside.amax(1) - inside.amin(1)).numpy()
        assert spans[sampling].max() <= 1.0 + 1e-6
    assert np.median(spans["log"]) < 0.4 * np.median(spans["uniform"])
    with pytest.raises(ValueError, match="phase_max_sampling"):
        StreamConfig(phase_max_sampling="normal")


def test_edge_width_range_varies_the_aperture_edge(geometry):
    """With a range of aperture edges, the bright-field disks of a batch span the radii of the two extreme
    apertures (half-maximum radius; nearly empty objects, many electrons)."""
    def radius(pattern):
        return float(np.sqrt((pattern > 0.5 * pattern.max()).sum() / np.pi))

    config = StreamConfig(batch_size=64, phase_max_range=(1e-4, 2e-4), electrons_range=(1e9, 1e9), edge_width_range=(0.0, 6.0))
    x, _ = TrainingStream(geometry, config, seed=0).batch(0)
    radii = np.array([radius(p.numpy() ** 2) for p in x[:, 0]])
    sharp, soft = (radius(geometry.aperture_edge(w)) for w in (0.0, 6.0))
    assert sharp > soft + 0.3
    assert radii.max() == pytest.approx(sharp, abs=0.05) and radii.min() == pytest.approx(soft, abs=0.05)
    assert len(np.unique(radii.round(2))) >= 3
    fixed = TrainingStream(geometry, StreamConfig(batch_size=64), seed=0).batch(0)[0]  # no range: stream unchanged
    assert torch.equal(fixed, TrainingStream(geometry, StreamConfig(batch_size=64, edge_width_range=None), seed=0).batch(0)[0])
    with pytest.raises(ValueError, match="edge_width_range must be"):
        StreamConfig(edge_width_range=(2.0, 1.0))
    with pytest.raises(ValueError, match="measured vacuum probe"):
        TrainingStream(geometry.replace(vacuum_probe_intensity=geometry.aperture_edge(2.0)), config)


def test_training_set_hdf5_round_trip(tmp_path, geometry):
    stream = TrainingStream(geometry, StreamConfig(batch_size=16), seed=1)
    path = write_training_set(tmp_path / "train.h5", stream, 40)
    x, y, mask = read_training_set(path)
    assert x.shape == (40, 1, 32, 32) and y.shape == (40, 1, 32, 32)
    np.testing.assert_array_equal(mask, geometry.mask)
    again = TrainingStream(geometry, StreamConfig(batch_size=16), seed=1)
    assert torch.equal(x[:16], next(again)[0])
    with pytest.raises(FileExistsError):
        write_training_set(path, stream, 4)
    assert list(tmp_path.iterdir()) == [path]  # no temporary files left


def test_stream_config_rejects_bad_ranges():
    with pytest.raises(ValueError, match="electrons_range"):
        StreamConfig(electrons_range=(1e5, 1e3))
    with pytest.raises(ValueError, match="phase_max_range"):
        StreamConfig(phase_max_range=(-1, 1))


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
    import py4DSTEM

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


def test_intensity_equals_shifted_unitary_fft_for_odd_and_even_shapes():
    # the fftshift and the unitary norm are folded into the probe: check against the plain formula
    from py4dstem_deepcdi.probe import ProbeGeometry

    geometry = ProbeGeometry(300e3, 17.1, detector_shape=(33, 30), angular_sampling=2.0, aberrations={"C10": -100.0})
    model = ForwardModel(geometry)
    phase = random_phase(3, seed=7, shape=(33, 30))
    shifts = torch.tensor([[0.3, -0.7], [1.0, 2.0], [0.0, 0.0]])
    for shifts_px in (None, shifts):
        probe = model.probe[None] if shifts_px is None else model.shifted_probes(shifts_px)
        far = torch.fft.fft2(probe * torch.exp(1j * phase), norm="ortho")
        expected = torch.fft.fftshift(far.abs() ** 2, dim=(-2, -1))
        np.testing.assert_allclose(model.intensity(phase, shifts_px).numpy(), expected.numpy(), atol=1e-6)


def test_cpu_poisson_sampler_is_exact_inversion():
    # below λ = 16 the sampler returns min{k: u < F(k; λ)} for its uniform u: compare with a direct float64 inversion
    from py4dstem_deepcdi.simulation import _K_MAX, _poisson_ambiguous, _poisson_tables

    tables = _poisson_tables()
    g = torch.Generator().manual_seed(2)
    m = 200_000
    lam = torch.rand(m, generator=g) * 16
    lam[:1024] = torch.arange(1024) / 64.0  # the cell edges
    u24 = torch.randint(0, 2**24, (m,), generator=g)
    cell = (lam * 64).to(torch.int64) * 1024 + (u24 >> 14)
    code = tables["cell"][cell].long()
    u = u24.double() * 2.0**-24
    k = code.double()
    ambiguous = code <= -2
    assert 0 < float(ambiguous.double().mean()) < 0.06
    k[ambiguous] = _poisson_ambiguous(lam[ambiguous], u[ambiguous], (-2 - code[ambiguous]).double())
    i = torch.arange(_K_MAX, dtype=torch.float64)
    log_pmf = i * lam.double()[:, None].clamp_min(1e-300).log() - lam.double()[:, None] - torch.lgamma(i + 1)
    expected = (torch.exp(log_pmf).cumsum(1) <= u[:, None]).sum(1).double()
    assert torch.equal(k, expected)


@pytest.mark.parametrize("lam", [0.0, 0.002, 0.7, 5.3, 15.99, 16.0, 140.0, 5000.0])
def test_cpu_poisson_counts_follow_the_poisson_law(lam):
    from scipy import stats

    from py4dstem_deepcdi.simulation import _poisson

    counts = _poisson(torch.full((400_000,), lam), torch.Generator().manual_seed(3)).numpy()
    assert np.all(counts == np.round(counts)) and counts.min() >= 0
    if lam == 0:
        assert counts.max() == 0
        return
    values, observed = np.unique(counts.astype(int), return_counts=True)
    expected = stats.poisson.pmf(values, lam) * len(counts)
    keep = expected > 20
    chi2 = (((observed - expected) ** 2 / expected)[keep]).sum()
    assert stats.chi2.sf(chi2, max(keep.sum() - 1, 1)) > 1e-4
    assert counts.mean() == pytest.approx(lam, abs=5 * np.sqrt(lam / len(counts)))
    assert counts.var() == pytest.approx(lam, rel=5 * np.sqrt(1 / (lam * len(counts)) + 2 / len(counts)))


@pytest.mark.parametrize("bank_uses", [8, 0])
def test_stream_batch_does_not_depend_on_the_number_of_threads(geometry, monkeypatch, bank_uses):
    import py4dstem_deepcdi.simulation as sim

    monkeypatch.setattr(sim, "_BANK_USES", bank_uses)  # 0: fresh images for every sample
    stream = TrainingStream(geometry, StreamConfig(batch_size=600), seed=4)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        x1, y1 = stream.batch(3)
        torch.set_num_threads(2)
        x2, y2 = stream.batch(3)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert torch.get_num_threads() == threads
    assert not torch.equal(x1[:300], x1[300:])  # the two halves draw different samples


def test_turned_applies_the_symmetries_of_the_square():
    from py4dstem_deepcdi.simulation import _turned

    images = torch.rand(8, 5, 5)
    expected = [images[0], images[1].flip(-2), images[2].flip(-1), images[3].flip(-2, -1),
                images[4].T, images[5].T.flip(-2), images[6].T.flip(-1), images[7].T.flip(-2, -1)]  # fmt: skip
    turned = _turned(images.clone(), torch.arange(8))
    for t in range(8):
        assert torch.equal(turned[t], expected[t])


def test_stream_objects_come_from_a_shared_bank(geometry):
    import py4dstem_deepcdi.simulation as sim

    n = 256
    period = round(sim._BANK_USES * max(sim._BANK_IMAGES, n) / n)  # batches served by one bank
    stream = TrainingStream(geometry, StreamConfig(batch_size=n), seed=5)
    stream.batch(0)
    bank = stream._bank[1]
    assert bank.shape == (max(sim._BANK_IMAGES, n), 32, 32)
    stream.batch(period - 1)
    assert stream._bank[1] is bank  # the same bank serves the next batches
    stream.batch(period)
    assert stream._bank[1] is not bank and not torch.equal(stream._bank[1], bank)


def test_per_pattern_probes_and_masks(model, geometry):
    """Given the geometry's own probe per pattern, the forward model and the target are those of the fixed probe;
    another probe's patterns still sum to 1 (Parseval)."""

    phase = random_phase(3)
    probes = torch.as_tensor(np.stack([geometry.probe] * 3), dtype=torch.complex64)
    torch.testing.assert_close(model.intensity(phase, probes=probes), model.intensity(phase), atol=1e-7, rtol=1e-5)
    shifts = torch.tensor([[0.3, -0.2]] * 3)
    torch.testing.assert_close(model.intensity(phase, shifts, probes), model.intensity(phase, shifts), atol=1e-7, rtol=1e-5)
    other = geometry.replace(aberrations={"C10": -70.0, "C21": 200.0})
    intensity = model.intensity(phase, probes=torch.as_tensor(np.stack([other.probe] * 3), dtype=torch.complex64))
    np.testing.assert_allclose(intensity.sum((-2, -1)).numpy(), 1.0, rtol=1e-5)
    channels = probe_channels(other.probe)
    assert channels.shape == (2, 32, 32) and float(torch.hypot(channels[0], channels[1]).max()) == pytest.approx(1.0)
    x = torch.cat([torch.zeros(1, 1, 32, 32), channels[None]], 1)
    np.testing.assert_array_equal(conditioning_mask(x, geometry.mask_threshold)[0, 0].numpy(), other.mask)
    masks = torch.as_tensor(np.stack([other.mask] * 3))
    target = model._target(phase, mask=masks)
    assert float(target[:, ~torch.as_tensor(other.mask)].abs().max()) == 0
    np.testing.assert_allclose(target[:, torch.as_tensor(other.mask)].mean(1).numpy(), 0, atol=1e-6)


def test_probe_conditioned_stream(geometry):
    """Every sample of a conditioned stream is simulated with the probe shown in its channels, within the ranges."""
    from py4dstem_deepcdi.probe import AberrationRanges

    ranges = AberrationRanges(C10=(-120.0, -60.0), C12=25.0, C21=300.0, C23=300.0)
    config = StreamConfig(batch_size=6, aberration_ranges=ranges, electrons_range=(1e12, 1e12))
    stream = TrainingStream(geometry, config, seed=4)
    assert stream.in_channels == 3
    x, y = stream.batch(0)
    assert x.shape == (6, 3, 32, 32) and y.shape == (6, 1, 32, 32)
    torch.testing.assert_close(stream.batch(0)[0], x)  # reproducible
    masks = conditioning_mask(x, geometry.mask_threshold)
    assert len({int(m.sum()) for m in masks}) > 1  # the probes (and their masks) differ
    assert float(y[~masks].abs().max()) == 0
    # with empty objects and (almost) no noise, each pattern is |FFT P|² of the probe shown in its channels
    flat = TrainingStream(geometry, config, seed=5)
    flat.source.sample = lambda n, shape, sampling, generator: torch.zeros(n, *shape)
    x, _ = flat.batch(0)
    probe = torch.complex(x[:, 1], x[:, 2]).numpy()
    probe /= np.sqrt((np.abs(probe) ** 2).sum((-2, -1), keepdims=True))
    expected = np.abs(np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(probe, axes=(-2, -1)), norm="ortho"), axes=(-2, -1))) ** 2
    np.testing.assert_allclose(x[:, 0].numpy() ** 2 / 1024, expected, atol=2e-5)
    with pytest.raises(ValueError, match="too wide"):
        TrainingStream(geometry, StreamConfig(aberration_ranges=AberrationRanges()))
