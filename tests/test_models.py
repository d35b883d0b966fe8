import errno
import json
import pickle

import numpy as np
import pytest
import torch

from py4dstem_deepcdi import models
from py4dstem_deepcdi.models import DeepCDIModel, list_pretrained, load_model, load_pretrained
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


# ------------------------------------------------------------------ a model file is not trusted
def rewritten(tmp_path, model, change, name="v.pt"):
    """The model's file with its metadata changed by ``change(metadata)`` (and its payload by the return value)."""
    payload = torch.load(model.save(tmp_path / "base.pt", overwrite=True), weights_only=True)
    metadata = json.loads(payload["metadata"])
    payload = change(metadata, payload) or payload
    payload["metadata"] = json.dumps(metadata)
    torch.save(payload, tmp_path / name)
    return tmp_path / name


@pytest.mark.parametrize("field, value, message", [
    ("network.depth", 9, r"network.depth = 9 is outside the allowed integers \[1, 6\]"),
    ("network.width", 1000.0, r"network.width = 1000.0 is outside the allowed range"),
    ("network.width", "1", r"network.width = '1'"),
    ("network.dropout", 1.5, r"network.dropout = 1.5"),
    ("network.in_channels", 2, r"network.in_channels = 2 is outside the allowed values \(1 or 3\)"),
    ("network.kernel", 5, r"metadata field network = \['depth', 'dropout', 'in_channels', 'kernel', 'width'\]"),
    ("geometry.energy_eV", 300, r"geometry.energy_eV = 300 is outside the allowed range \[1000, 5e\+06\]"),
    ("geometry.semiangle_cutoff_mrad", -17.1, r"geometry.semiangle_cutoff_mrad = -17.1"),
    ("geometry.angular_sampling_mrad", 0, r"geometry.angular_sampling_mrad = 0"),
    ("geometry.detector_shape", [32, 30], r"geometry.detector_shape = \[32, 30\] is outside the allowed shapes: "
                                          r"divisible by 2\*\*depth = 4"),
    ("geometry.detector_shape", [10**6, 10**6], r"geometry.detector_shape = 1000000"),
    ("geometry.aberrations", {"C10": float("nan")}, r"geometry.aberrations.C10 = nan"),
    ("geometry.aberrations", {"Cs": 1e7}, r"geometry.aberrations = \{'Cs'"),
    ("training_set.electrons_range", [1e6, 1e3], r"training_set.electrons_range = \[1000000.0, 1000.0\]"),
    ("training_set.electrons_range", [0, 1e3], r"training_set.electrons_range\[0\] = 0"),
    ("training_set.edge_width_range", [0, 1e9], r"training_set.edge_width_range\[1\]"),
    ("training_set.pool_step_range", "0.2-0.4", r"training_set.pool_step_range = '0.2-0.4'"),
    ("training_set.pool", 2, r"training_set.pool = 2 is outside the allowed values \(1 or 3\)"),
    ("training_set.pool", 3, r"network.in_channels = 1 is outside the allowed value: 3 for a probe-conditioned"),
])
def test_out_of_bounds_metadata_is_refused_before_building(tmp_path, model, monkeypatch, field, value, message):
    """Every metadata field is checked against sane bounds before any network or probe is built: the message names
    the field, its value and the allowed range (a depth of 9 would have built a 38.7 GB network)."""
    section, name = field.split(".")

    def change(metadata, payload):
        metadata.setdefault(section, {})[name] = value

    path = rewritten(tmp_path, model, change)
    built = []
    monkeypatch.setattr(models, "ProbeGeometry", lambda *a, **k: built.append(a))
    with pytest.raises(ValueError, match=message):
        load_model(path)
    assert not built


def test_a_network_too_large_is_refused_without_memory(tmp_path, model):
    """Width and depth inside their bounds can still declare a huge network: its size is counted on the meta device."""
    def change(metadata, payload):
        metadata["network"].update(width=4.0, depth=6)
        metadata["geometry"]["detector_shape"] = [64, 64]

    with pytest.raises(ValueError, match=r"network \(width, depth\) = '2,416,047,184 parameters' .*\(<= 100,000,000\)"):
        load_model(rewritten(tmp_path, model, change))


def test_weights_must_fit_the_declared_network(tmp_path, model):
    with pytest.raises(ValueError, match=r"weight stem.conv1.weight has shape \(2, 1, 3, 3\), the declared network"):
        load_model(rewritten(tmp_path, model, lambda m, p: m["network"].update(width=0.25)))

    def drop(metadata, payload):
        del payload["state_dict"]["head.1.conv2.bias"]

    with pytest.raises(ValueError, match=r"missing \['head.1.conv2.bias'\]"):
        load_model(rewritten(tmp_path, model, drop))

    def poison(metadata, payload):
        payload["state_dict"]["stem.conv1.weight"][0, 0, 0, 0] = float("nan")

    with pytest.raises(ValueError, match="stem.conv1.weight holds NaN"):
        load_model(rewritten(tmp_path, model, poison))
    with pytest.raises(ValueError, match="state_dict is not a dictionary of tensors"):
        load_model(rewritten(tmp_path, model, lambda m, p: p.update(state_dict={"a": 1})))
    with pytest.raises(ValueError, match="has_vacuum_probe = True"):
        load_model(rewritten(tmp_path, model, lambda m, p: m["geometry"].update(has_vacuum_probe=True)))
    with pytest.raises(ValueError, match=r"geometry.sampling_A = \[0.6, 0.6\] .* \[0.3076"):
        load_model(rewritten(tmp_path, model, lambda m, p: m["geometry"].update(sampling_A=[0.6, 0.6])))
    with pytest.raises(ValueError, match="format_version 'one'"):
        load_model(rewritten(tmp_path, model, lambda m, p: p.update(format_version="one")))


def test_save_refuses_metadata_the_loader_would_refuse(tmp_path, geometry):
    """A 3-channel network that is neither probe-conditioned nor pooled would be refused on loading: not written."""
    odd = DeepCDIModel(ResUNet(width=0.125, depth=2, in_channels=3).eval(), geometry, {"name": "odd"})
    with pytest.raises(ValueError, match="network.in_channels = 3"):
        odd.save(tmp_path / "odd.pt")
    assert not (tmp_path / "odd.pt").exists()
    (tmp_path / "file").write_text("")
    with pytest.raises(OSError, match=f"cannot write {tmp_path / 'file' / 'm.pt'}"):
        DeepCDIModel(ResUNet(width=0.125, depth=2).eval(), geometry, {}).save(tmp_path / "file" / "m.pt")


def test_shipped_models_pass_the_checks():
    for name in list_pretrained():
        model = load_pretrained(name)
        assert model.electrons_range == (2e4, 1e6)
    assert load_pretrained().edge_width_range == (0.0, 4.0)


def test_full_disk_while_saving_names_the_file(tmp_path, model, monkeypatch):
    """A disk that fills during the write: an OSError naming the model file (not torch's RuntimeError about its zip
    writer), and neither the file nor a temporary one left."""
    def full(payload, f):
        f.write(b"half a model")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(models.torch, "save", full)
    with pytest.raises(OSError, match=rf"cannot write {tmp_path / 'm.pt'}: No space left on device \(the disk is full"):
        model.save(tmp_path / "m.pt")
    assert list(tmp_path.iterdir()) == []
