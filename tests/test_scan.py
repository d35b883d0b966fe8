import numpy as np
import pytest

from py4dstem_deepcdi.scan import calibrated_datacube, electrons_per_pattern, neighbour_offsets, scan_positions


def test_electrons_per_pattern_and_bad_doses():
    assert electrons_per_pattern(1.6e6, 0.25) == pytest.approx(1e5)
    assert electrons_per_pattern(1e6, (0.2, 0.5)) == pytest.approx(1e5)
    for bad in (0, -1, float("nan")):
        with pytest.raises(ValueError, match="dose"):
            electrons_per_pattern(bad, 0.25)
    with pytest.raises(ValueError, match="scan_step"):
        electrons_per_pattern(1e6, 0)


def test_scan_positions_rotation():
    p = scan_positions((3, 4), 0.5)
    assert p.shape == (12, 2)
    np.testing.assert_allclose(p[1] - p[0], [0, 0.5])
    r = scan_positions((3, 4), 0.5, rotation_deg=90)  # py4DSTEM's convention: row vectors times R(θ)
    np.testing.assert_allclose(r[1] - r[0], [0.5, 0], atol=1e-6)
    t = scan_positions((3, 4), 0.5, transpose=True)
    np.testing.assert_allclose(t[1] - t[0], [0.5, 0])


def test_calibrated_datacube_carries_step_and_detector_pixel():
    data = np.zeros((2, 3, 4, 4), dtype=np.float32)
    dc = calibrated_datacube(data, 0.25, 1.5)
    assert dc.data is data
    assert dc.calibration.get_R_pixel_size() == pytest.approx(0.25) and dc.calibration.get_R_pixel_units() == "A"
    assert dc.calibration.get_Q_pixel_size() == pytest.approx(1.5) and dc.calibration.get_Q_pixel_units() == "mrad"


@pytest.mark.parametrize("rotation, transpose", [(0.0, False), (17.0, False), (-40.0, True)])
def test_neighbour_offsets_are_those_of_the_scan(rotation, transpose):
    """The 3×3 neighbourhood of an inner position of a scan, centre first: the scan's own position differences."""
    offsets = neighbour_offsets((0.25, 0.3), rotation, transpose)
    positions = scan_positions((5, 6), (0.25, 0.3), rotation, transpose).reshape(5, 6, 2)
    around = positions[1:4, 2:5].reshape(9, 2) - positions[2, 3]
    np.testing.assert_allclose(offsets[0], 0, atol=1e-12)
    np.testing.assert_allclose(np.sort(offsets, 0), np.sort(around, 0), atol=1e-12)
    np.testing.assert_allclose(offsets[1:], np.delete(around, 4, 0), atol=1e-12)
    if not rotation and not transpose:
        np.testing.assert_allclose(offsets[1], [-0.25, -0.3])
