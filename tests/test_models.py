import pickle

import numpy as np
import pytest
import torch

from py4dstem_deepcdi.models import DeepCDIModel, load_model
from py4dstem_deepcdi.network import ResUNet
from py4dstem_deepcdi.probe import AberrationRanges


@pytest.fixture
def model(geometry):
    net = ResUNet(width=0.125, depth=2).eval()
    return DeepCDIModel(net, geometry, {"name": "tiny", "training": {"samples": 10}})


def test_round_trip_keeps_weights_and_metadata(tmp_path, model, geometry):
    path = model.save(tmp_path / "m.pt")
    again = load_model(path)
    x = torch.randn(2, 1, 32, 32)
    assert torch.allclose(again.network(x), model.network(x), atol=1e-6)
    assert again.metadata["name"] == "tiny" and again.metadata["training"]["samples"] == 10
    assert again.metadata["version"]
    assert again.geometry.to_dict() == geometry.to_dict()
    with pytest.raises(FileExistsError):
        model.save(path)


def test_half_precision_file_is_smaller(tmp_path, geometry):
    model = DeepCDIModel(ResUNet(width=0.25, depth=3).eval(), geometry, {})
    full = model.save(tmp_path / "full.pt").stat().st_size
    half = model.save(tmp_path / "half.pt", half_precision=True).stat().st_size
    assert half < 0.7 * full
    x = torch.randn(1, 1, 32, 32)
    assert torch.allclose(load_model(tmp_path / "half.pt").network(x), model.network(x), atol=1e-2)


def test_vacuum_probe_travels_with_the_model(tmp_path, model, geometry):
    k = np.arange(32) - 16
    vacuum = (np.hypot(k[:, None], k[None, :]) < 7).astype(float)
    m = DeepCDIModel(model.network, geometry.replace(vacuum_probe_intensity=vacuum), {})
    again = load_model(m.save(tmp_path / "v.pt"))
    np.testing.assert_allclose(again.geometry.vacuum_probe_intensity, vacuum)


class Exploit:
    def __reduce__(self):
        return (print, ("executed!",))


def test_loading_never_runs_pickled_code(tmp_path, capsys):
    path = tmp_path / "evil.pt"
    torch.save({"format": "py4dstem-deepcdi-model", "payload": Exploit()}, path)
    with pytest.raises(ValueError, match="not a readable"):
        load_model(path)
    assert "executed!" not in capsys.readouterr().out
    with open(tmp_path / "plain.pkl", "wb") as f:
        pickle.dump(Exploit(), f)
    with pytest.raises(ValueError):
        load_model(tmp_path / "plain.pkl")


def test_truncated_foreign_and_missing_files(tmp_path, model):
    path = model.save(tmp_path / "m.pt")
    data = path.read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="not a readable"):
        load_model(tmp_path / "cut.pt")
    torch.save({"weights": torch.zeros(3)}, tmp_path / "foreign.pt")
    with pytest.raises(ValueError, match="not a py4dstem-deepcdi model"):
        load_model(tmp_path / "foreign.pt")
    with pytest.raises(FileNotFoundError):
        load_model(tmp_path / "nothing.pt")


def test_model_for_another_geometry_is_refused(model, geometry):
    model.check_compatible(geometry)
    with pytest.raises(ValueError, match=r"semiangle_cutoff \(mrad\): model 17.1 vs data 20"):
        model.check_compatible(geometry.replace(semiangle_cutoff=20.0))


def test_probe_conditioned_model_file_and_compatibility(tmp_path, geometry):
    ranges = AberrationRanges(C10=(-120.0, -60.0), C12=25.0, C21=300.0, C23=300.0)
    model = DeepCDIModel(
        ResUNet(width=0.125, depth=2, in_channels=3).eval(),
        geometry,
        {"training_set": {"aberration_ranges": ranges.to_dict()}},
    )
    again = load_model(model.save(tmp_path / "c.pt"))
    assert again.conditioned and again.network.in_channels == 3 and again.aberration_ranges == ranges
    again.check_compatible(geometry.replace(aberrations={"C10": -70.0, "C21": 250.0, "phi21": 1.0}))
    with pytest.raises(ValueError, match="C10 = -20"):
        again.check_compatible(geometry.replace(aberrations={"C10": -20.0}))
    with pytest.raises(ValueError, match="energy"):
        again.check_compatible(geometry.replace(energy=200e3))
    fixed = DeepCDIModel(ResUNet(width=0.125, depth=2).eval(), geometry, {"name": "fixed"})
    assert not fixed.conditioned and fixed.aberration_ranges is None
    with pytest.raises(ValueError, match="recover_probe needs a probe-conditioned model"):
        fixed.require_conditioned("recover_probe")
