"""The Comparison's figure and file (comparison/result.py, comparison/figure.py)."""

import warnings

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pytest
from comparison_cases import comparison, finished_reconstruction

from py4dstem_deepcdi.comparison import compare_with_epie, read_comparison
from py4dstem_deepcdi.comparison.figure import inset_box
from py4dstem_deepcdi.comparison.result import CONVERGED_WITHIN, converged_iterations

matplotlib.use("Agg")


def test_figure_layout(tmp_path):
    c = comparison()
    fig = c.visualize(path=tmp_path / "comparison.png")
    assert isinstance(fig, matplotlib.figure.Figure) and c.figure is fig
    assert len(fig.axes) == 2 * 4 + 1  # deep CDI, ePIE, truth, ADF / three magnified views, FRC; + colour bar
    assert (tmp_path / "comparison.png").stat().st_size > 0
    frc_axis = fig.axes[7]
    labels = " ".join(t.get_text() for t in frc_axis.texts)
    assert "Å" in labels
    plt.close(fig)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        no_truth = compare_with_epie(finished_reconstruction(), epie=c.epie, progress=False)
    fig = no_truth.visualize()
    assert len(fig.axes) == 2 * 3 + 1
    plt.close(fig)
    with pytest.raises(ValueError, match="does not fit"):
        c.visualize(inset=(0.0, 0.0, 1e3))


def test_inset_box():
    assert inset_box((30, 24), (0.5, 0.5)) == (11, 8, 8)  # central third: 24 // 3 = 8 pixels
    assert inset_box((6, 6), (0.5, 0.5)) == (0, 0, 6)  # at most the image
    assert inset_box((30, 24), (0.5, 0.25), (2.0, 1.0, 3.0)) == (4, 4, 6)  # Å → pixels of each axis
    for bad in ((0.0, 0.0, 0.5), (-1.0, 0.0, 2.0), (14.0, 0.0, 2.0)):
        with pytest.raises(ValueError, match="does not fit"):
            inset_box((30, 24), (0.5, 0.5), bad)


def test_save_and_read_round_trip(tmp_path):
    c = comparison()
    path = c.save(tmp_path / "comparison.h5")
    back = read_comparison(path)
    np.testing.assert_allclose(back["deep_phase"], c.deep_phase)
    np.testing.assert_allclose(back["epie_phase_rad"], c.epie_phase)
    np.testing.assert_allclose(back["truth_phase_rad"], c.truth_phase)
    np.testing.assert_allclose(back["frc"], c.frc["frc"])
    np.testing.assert_allclose(back["frc_q_per_A"], c.frc["q"])
    np.testing.assert_allclose(back["epie_error"], c.epie.error_history)
    np.testing.assert_allclose(back["epie_truth_correlation"], c.epie_truth_correlation)
    np.testing.assert_allclose(back["adf"], c.adf)
    np.testing.assert_allclose(back["frc_truth_epie"], c.vs_truth["epie"]["frc"]["frc"])
    assert back["sampling"] == pytest.approx(c.sampling)
    assert back["summary"]["frc_resolution_A"] == pytest.approx(c.resolution_A)
    assert back["summary"]["timings"]["epie_s"] == pytest.approx(c.timings["epie_s"])
    assert back["metadata"]["box_px"] == list(c.box)
    assert back["metadata"]["epie_parameters"]["seed"] == 0
    with pytest.raises(FileExistsError):
        c.save(path)
    c.save(path, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["comparison.h5"]


def test_read_refuses_another_result(tmp_path):
    recon = finished_reconstruction()
    path = recon.save(tmp_path / "recon.h5")
    with pytest.raises(ValueError, match="not a comparison"):
        read_comparison(path)


def test_epie_speed_is_quoted_at_its_converged_iteration_count():
    """The honest ratio: ePIE's time for the fewest iterations within CONVERGED_WITHIN of its best correlation."""
    c = comparison()
    correlations = c.epie_truth_correlation
    assert len(correlations) == c.timings["epie_iterations"]
    best = max(correlations)
    k = min(i + 1 for i, v in enumerate(correlations) if v >= best - CONVERGED_WITHIN)
    assert c.epie_converged_iterations == k
    assert c.epie_converged_s == pytest.approx(c.timings["epie_s"] * k / len(correlations))
    assert f"ePIE converged after {k} iteration" in repr(c)
    summary = c.summary()
    assert summary["epie_converged_iterations"] == k
    assert summary["epie_converged_s"] == pytest.approx(c.epie_converged_s)


def test_converged_iterations_among_scored_counts():
    """The fewest scored counts within CONVERGED_WITHIN of the best of those counts (the bench scripts' baseline)."""
    correlations = [0.5, 0.8, 0.9, 0.97, 0.9, 0.6]
    assert converged_iterations(correlations) == 4  # every iteration: the best is 0.97 after 4
    assert converged_iterations(correlations, [1, 2, 3, 5]) == 3  # 0.97 not scored: 0.9 after 3 ties 0.9 after 5
    assert converged_iterations(correlations, [6, 1]) == 6  # the best of (0.5, 0.6): still improving at the last
    tie = [0.9, 0.9 + CONVERGED_WITHIN / 2, 0.95]
    assert converged_iterations(tie, [1, 2]) == 1
    assert converged_iterations(None) is None and converged_iterations([]) is None
    for bad in ([0, 1], [1, 7], []):
        with pytest.raises(ValueError, match="counts"):
            converged_iterations(correlations, bad)
