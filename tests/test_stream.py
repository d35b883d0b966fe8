import numpy as np
import pytest
import torch

from py4dstem_deepcdi import stream as stream_module
from py4dstem_deepcdi.encoding import conditioning_mask
from py4dstem_deepcdi.probe import AberrationRanges
from py4dstem_deepcdi.stream import StreamConfig, TrainingStream, _turned, read_training_set, write_training_set


def test_poisson_mean_and_variance(geometry):
    noise_only = {"noise": 1.0, "photos": 0, "lattice": 0}
    stream = TrainingStream(geometry, StreamConfig(electrons_range=(1e4, 1e4), batch_size=4000, mix=noise_only))
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

    config = StreamConfig(
        batch_size=64, phase_max_range=(1e-4, 2e-4), electrons_range=(1e9, 1e9), edge_width_range=(0.0, 6.0)
    )
    x, _ = TrainingStream(geometry, config, seed=0).batch(0)
    radii = np.array([radius(p.numpy() ** 2) for p in x[:, 0]])
    sharp, soft = (radius(geometry.aperture_edge(w)) for w in (0.0, 6.0))
    assert sharp > soft + 0.3
    assert radii.max() == pytest.approx(sharp, abs=0.05) and radii.min() == pytest.approx(soft, abs=0.05)
    assert len(np.unique(radii.round(2))) >= 3
    fixed = TrainingStream(geometry, StreamConfig(batch_size=64), seed=0).batch(0)[0]  # no range: stream unchanged
    unset = TrainingStream(geometry, StreamConfig(batch_size=64, edge_width_range=None), seed=0)
    assert torch.equal(fixed, unset.batch(0)[0])
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


@pytest.mark.parametrize("bank_uses", [8, 0])
def test_stream_batch_does_not_depend_on_the_number_of_threads(geometry, monkeypatch, bank_uses):
    monkeypatch.setattr(stream_module, "_BANK_USES", bank_uses)  # 0: fresh images for every sample
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
    images = torch.rand(8, 5, 5)
    expected = [images[0], images[1].flip(-2), images[2].flip(-1), images[3].flip(-2, -1),
                images[4].T, images[5].T.flip(-2), images[6].T.flip(-1), images[7].T.flip(-2, -1)]  # fmt: skip
    turned = _turned(images.clone(), torch.arange(8))
    for t in range(8):
        assert torch.equal(turned[t], expected[t])


def test_stream_objects_come_from_a_shared_bank(geometry):
    n = 256
    period = round(stream_module._BANK_USES * max(stream_module._BANK_IMAGES, n) / n)  # batches served by one bank
    stream = TrainingStream(geometry, StreamConfig(batch_size=n), seed=5)
    stream.batch(0)
    bank = stream._bank[1]
    assert bank.shape == (max(stream_module._BANK_IMAGES, n), 32, 32)
    stream.batch(period - 1)
    assert stream._bank[1] is bank  # the same bank serves the next batches
    stream.batch(period)
    assert stream._bank[1] is not bank and not torch.equal(stream._bank[1], bank)


def test_probe_conditioned_stream(geometry):
    """Every sample of a conditioned stream is simulated with the probe shown in its channels, within the ranges."""
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
    far = np.fft.fft2(np.fft.ifftshift(probe, axes=(-2, -1)), norm="ortho")
    expected = np.abs(np.fft.fftshift(far, axes=(-2, -1))) ** 2
    np.testing.assert_allclose(x[:, 0].numpy() ** 2 / 1024, expected, atol=2e-5)
    with pytest.raises(ValueError, match="too wide"):
        TrainingStream(geometry, StreamConfig(aberration_ranges=AberrationRanges()))


def _energies(x: torch.Tensor) -> list[float]:
    """Σ x² per sample of the amplitude channel (≈ N_pixels: counts / electrons × N_pixels summed)."""
    return (x[:, 0].double() ** 2).sum((-2, -1)).tolist()


def _target_sizes(y: torch.Tensor) -> list[float]:
    return y[:, 0].double().abs().sum((-2, -1)).tolist()


def test_stream_random_draws_are_pinned(geometry):
    """The random streams of checkpointed runs must not change: pinned values of batches drawn before the stream
    left simulation.py (a change of any draw — object, turn, phase scale, dose, probe, Poisson count — moves them
    far beyond the tolerance, which only allows for float rounding)."""
    x, y = TrainingStream(geometry, StreamConfig(batch_size=8, electrons_range=(1e2, 1e6)), seed=7, worker=1).batch(0)
    np.testing.assert_allclose(
        _energies(x),
        [1021.495334, 1022.5906, 1177.166672, 1025.666045, 1034.923314, 974.340938, 1042.636572, 1051.813089],
        rtol=1e-5,
    )
    np.testing.assert_allclose(
        _target_sizes(y), [0.111031, 1.185119, 3.275912, 3.362416, 1.386426, 0.049589, 4.483809, 2.808875], rtol=1e-4
    )
    ranges = AberrationRanges(C10=(-40.0, 0.0), C12=5.0, C21=10.0, C23=10.0)
    x, y = TrainingStream(geometry, StreamConfig(batch_size=4, aberration_ranges=ranges), seed=2).batch(3)
    np.testing.assert_allclose(_energies(x), [1021.609796, 1022.163035, 1024.52692, 1013.571545], rtol=1e-5)
    np.testing.assert_allclose(_target_sizes(y), [0.126437, 0.508166, 0.494683, 0.115648], rtol=1e-4)
    np.testing.assert_allclose(x[:, 1].double().sum((-2, -1)), [5.391292, 5.040572, 5.19261, 5.045352], rtol=1e-5)


def test_pooled_stream_sums_nine_exact_poisson_patterns(geometry):
    """With a vanishing scan step the 9 patterns of a pooled sample coincide: the pooled channel has the centre
    channel's mean and 1/9 of its variance (a sum of Poisson counts), and the illumination is |P|²/max|P|²."""
    config = StreamConfig(batch_size=64, electrons_range=(1e3, 1e3), pool=3, pool_step_range=(1e-6, 1e-6))
    stream = TrainingStream(geometry, config, seed=1)
    assert stream.in_channels == 3 and not stream.conditioned
    flat = TrainingStream(geometry, config, seed=1)
    flat.source.sample = lambda n, shape, sampling, generator: torch.zeros(n, *shape)
    x, y = flat.batch(0)
    assert float(y.abs().max()) == 0
    intensity = np.abs(geometry.probe_fourier) ** 2
    intensity /= intensity.sum()
    centre, pooled = x[:, 0].double() ** 2 / 1024, x[:, 1].double() ** 2 / 1024  # counts / electrons
    np.testing.assert_allclose(pooled.mean(0).numpy(), intensity, atol=4e-4)
    bright = intensity > intensity.max() / 2
    ratio = pooled.var(0)[bright].sum() / centre.var(0)[bright].sum()
    assert float(ratio) == pytest.approx(1 / 9, rel=0.1)
    illumination = np.abs(geometry.probe) ** 2
    np.testing.assert_allclose(x[0, 2].numpy(), illumination / illumination.max(), atol=1e-5)
    torch.testing.assert_close(TrainingStream(geometry, config, seed=1).batch(0)[0], stream.batch(0)[0])


def test_pooled_stream_config_is_checked(geometry):
    with pytest.raises(ValueError, match="pool must be"):
        StreamConfig(pool=2)
    with pytest.raises(ValueError, match="pool_step_range"):
        StreamConfig(pool=3, pool_step_range=(0.5, 0.1))
    with pytest.raises(ValueError, match="cannot be combined"):
        StreamConfig(pool=3, aberration_ranges=AberrationRanges(C10=(-120.0, -60.0)))
