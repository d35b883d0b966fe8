import numpy as np
import pytest
from py4DSTEM.process.phase.utils import ComplexProbe

from py4dstem_deepcdi.probe import POLAR_NAMES, ProbeGeometry


def test_sampling_relations(geometry):
    # λ at 300 keV is 0.019687 Å; window = λ / dα; pixel = window / N
    assert geometry.wavelength == pytest.approx(0.0196875, rel=1e-4)
    assert geometry.reciprocal_sampling == pytest.approx(2e-3 / 0.0196875, rel=1e-4)
    assert geometry.window_size[0] == pytest.approx(0.0196875 / 2e-3, rel=1e-4)
    assert geometry.sampling[0] == pytest.approx(geometry.window_size[0] / 32)
    same = ProbeGeometry(
        300e3, 17.1, reciprocal_sampling=geometry.reciprocal_sampling, aberrations=geometry.aberrations
    )
    assert same.angular_sampling == pytest.approx(2.0)


def test_probe_matches_py4dstem_complexprobe(geometry):
    direct = (
        ComplexProbe(
            energy=300e3,
            gpts=(32, 32),
            sampling=geometry.sampling,
            semiangle_cutoff=17.1,
            rolloff=2.0,
            parameters={"C10": -100.0, "C12": 20.0, "phi12": 0.5},
        )
        .build()
        ._array
    )
    np.testing.assert_allclose(geometry.probe, np.fft.fftshift(direct), atol=1e-6)
    assert np.sum(np.abs(geometry.probe) ** 2) == pytest.approx(1.0, rel=1e-6)


def test_probe_fourier_is_aperture_times_aberrations(geometry):
    amplitude = np.abs(geometry.probe_fourier)
    n = 32
    k = (np.arange(n) - n // 2) * geometry.angular_sampling  # mrad
    alpha = np.hypot(k[:, None], k[None, :])
    assert np.all(amplitude[alpha > 17.1 + 1e-6] < 1e-6)  # nothing outside the aperture
    inner = alpha < 17.1 - 2.0 - 1e-6  # inside the rolloff: flat amplitude
    assert np.ptp(amplitude[inner]) < 1e-5 * amplitude[inner].max()
    # defocus phase: chi = π/λ α² C10 (radial part), compare phase differences along an axis without astigmatism
    flat = ProbeGeometry(300e3, 17.1, angular_sampling=2.0, aberrations={"C10": -100.0})
    phase = -np.angle(flat.probe_fourier[n // 2, n // 2 : n // 2 + 6] / flat.probe_fourier[n // 2, n // 2])
    alpha_rad = np.arange(6) * 2e-3
    expected = np.pi / flat.wavelength * alpha_rad**2 * -100.0
    np.testing.assert_allclose(np.angle(np.exp(1j * (phase - expected))), 0, atol=1e-4)


def test_mask_and_area(geometry):
    intensity = np.abs(geometry.probe) ** 2
    expected = intensity > 0.1 * intensity.max()
    np.testing.assert_array_equal(geometry.mask, expected)
    assert geometry.mask_area == pytest.approx(expected.sum() * geometry.sampling[0] ** 2)
    # a stricter threshold keeps fewer pixels
    assert geometry.replace(mask_threshold=0.16).mask.sum() < geometry.mask.sum()


def test_in_focus_probe_radius_is_airy_like():
    g = ProbeGeometry(300e3, 17.1, angular_sampling=2.0, rolloff=0.0)
    # the first Airy zero sits at 0.61 λ/α; 50% of the intensity lies well inside it
    r50 = g.support_radius(0.5)
    assert 0.2 * 0.61 * g.wavelength / 17.1e-3 < r50 < 0.61 * g.wavelength / 17.1e-3


def test_aperture_edge_straddles_the_semiangle(geometry):
    """A linear edge w wide centred on α: amplitude 1 inside α − w/2, 0 beyond α + w/2, 1/2 at α; width 0 is the sharp
    disk; as vacuum_probe_intensity it becomes the probe's detector-plane intensity."""
    n = geometry.detector_shape[0]
    theta = np.hypot(*np.meshgrid((np.arange(n) - n // 2) * 2.0, (np.arange(n) - n // 2) * 2.0, indexing="ij"))
    width = 5.0
    edge = geometry.aperture_edge(width)
    assert np.all(edge[theta <= 17.1 - width / 2] == 1) and np.all(edge[theta >= 17.1 + width / 2] == 0)
    ring = np.abs(theta - 17.1) < width / 2
    np.testing.assert_allclose(np.sqrt(edge[ring]), (17.1 + width / 2 - theta[ring]) / width)
    np.testing.assert_array_equal(geometry.aperture_edge(0.0), theta <= 17.1)
    probe = geometry.replace(vacuum_probe_intensity=edge)
    intensity = np.abs(probe.probe_fourier) ** 2
    np.testing.assert_allclose(intensity / intensity.sum(), edge / edge.sum(), atol=1e-9)
    with pytest.raises(ValueError, match="width"):
        geometry.aperture_edge(-1.0)


def test_support_mask_holds_its_fraction_of_the_intensity(geometry):
    intensity = np.abs(geometry.probe) ** 2
    previous = 0
    for fraction in (0.3, 0.5, 0.7, 0.9):
        disk = geometry.support_mask(fraction)
        held = intensity[disk].sum() / intensity.sum()
        assert held >= fraction - 1e-9 and disk.sum() > previous  # at least the fraction; grows with it
        # one pixel ring less would hold less than the fraction: the disk is the smallest such one
        radius = geometry.support_radius(fraction)
        r, _ = geometry._radii()
        assert intensity[r < radius - 1e-9].sum() / intensity.sum() < fraction
        previous = disk.sum()
    with pytest.raises(ValueError, match="fraction"):
        geometry.support_radius(0.0)


def test_aberrated_probe_breaks_twin_symmetry(geometry):
    p = geometry.probe
    flipped = np.roll(np.flip(p), 1, axis=(0, 1))  # P(-r) on the centred grid (centre at N//2)
    assert np.abs(p - np.conj(flipped)).max() > 0.1 * np.abs(p).max()


def test_defocus_alias_and_names():
    g = ProbeGeometry(300e3, 17.1, angular_sampling=2.0, aberrations={"defocus": 50})
    assert g.aberrations["C10"] == -50
    assert set(g.aberrations) == set(POLAR_NAMES)


@pytest.mark.parametrize(
    "kwargs, word",
    [
        ({"energy": 0}, "energy"),
        ({"energy": -3e5}, "energy"),
        ({"semiangle_cutoff": 0}, "semiangle_cutoff"),
        ({"semiangle_cutoff": float("nan")}, "semiangle_cutoff"),
        ({"detector_shape": (32,)}, "detector_shape"),
        ({"detector_shape": (32, 32, 32)}, "detector_shape"),
        ({"aberrations": {"C30": 1.0}}, "unknown aberration"),
        ({"aberrations": {"C10": float("nan")}}, "C10"),
        ({"aberrations": {"C10": -1000.0}}, "undersampled"),
        ({"angular_sampling": 0.5}, "does not fit"),
        ({"angular_sampling": -2.0}, "angular_sampling"),
        ({"mask_threshold": 1.5}, "mask_threshold"),
        ({"rolloff": -1.0}, "rolloff"),
        ({"vacuum_probe_intensity": np.ones((16, 16))}, "vacuum_probe_intensity"),
    ],
)
def test_bad_geometry_is_refused(kwargs, word):
    args = {"energy": 300e3, "semiangle_cutoff": 17.1, "angular_sampling": 2.0}
    args.update(kwargs)
    with pytest.raises(ValueError, match=word):
        ProbeGeometry(**args)


def test_both_or_no_sampling_refused():
    with pytest.raises(ValueError, match="exactly one"):
        ProbeGeometry(300e3, 17.1)
    with pytest.raises(ValueError, match="exactly one"):
        ProbeGeometry(300e3, 17.1, angular_sampling=2.0, reciprocal_sampling=0.1)


def test_vacuum_probe_replaces_aperture(geometry):
    n = 32
    k = (np.arange(n) - n // 2) * 2.0
    alpha = np.hypot(k[:, None], k[None, :])
    vacuum = (alpha < 15.0).astype(float) * 1234.0  # a sharp, smaller measured aperture
    g = geometry.replace(vacuum_probe_intensity=vacuum)
    amplitude = np.abs(g.probe_fourier)
    assert np.all(amplitude[alpha >= 15.0] < 1e-6)
    assert np.ptp(amplitude[alpha < 15.0]) < 1e-5
    assert np.sum(np.abs(g.probe) ** 2) == pytest.approx(1.0, rel=1e-6)


def test_compatibility_check_names_values(geometry):
    geometry.check_compatible(geometry.replace(energy=300.5e3))  # within tolerance
    with pytest.raises(ValueError, match=r"energy \(eV\): model 300000 vs data 200000"):
        geometry.check_compatible(geometry.replace(energy=200e3))
    with pytest.raises(ValueError, match="detector_shape"):
        geometry.check_compatible(
            ProbeGeometry(300e3, 17.1, (64, 64), angular_sampling=2.0, aberrations=geometry.aberrations)
        )
    with pytest.raises(ValueError, match="C10"):
        geometry.check_compatible(geometry.replace(aberrations={**geometry.aberrations, "C10": -60.0}))


def test_dict_round_trip(geometry):
    again = ProbeGeometry.from_dict(geometry.to_dict())
    np.testing.assert_allclose(again.probe, geometry.probe)
