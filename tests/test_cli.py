import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from py4dstem_deepcdi.cli import RECOVERY_NOT_ON_CLI, build_parser, geometry_from_args, main, options_from_args
from py4dstem_deepcdi.models import DeepCDIModel, load_model
from py4dstem_deepcdi.network import ResUNet
from py4dstem_deepcdi.probe import AberrationRanges, ProbeGeometry
from py4dstem_deepcdi.probe_recovery import RecoveryOptions
from py4dstem_deepcdi.reconstruction import read_reconstruction
from py4dstem_deepcdi.stitching import StitchOptions
from py4dstem_deepcdi.stream import StreamConfig
from py4dstem_deepcdi.training import TrainConfig

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    geometry = ProbeGeometry(300e3, 17.1, angular_sampling=2.0, aberrations={"C10": -100.0}, mask_threshold=0.1)
    path = tmp_path_factory.mktemp("m") / "tiny.pt"
    DeepCDIModel(ResUNet(width=0.125, depth=2).eval(), geometry, {"name": "tiny"}).save(path)
    return path


def test_help_is_microscopist_readable():
    out = subprocess.run([sys.executable, "-m", "py4dstem_deepcdi.cli", "--help"], capture_output=True, text=True,
                         cwd=ROOT, check=True).stdout
    for word in ("demo", "simulate", "train", "reconstruct", "recover-probe", "info"):
        assert word in out
    out = subprocess.run([sys.executable, "-m", "py4dstem_deepcdi.cli", "reconstruct", "--help"], capture_output=True,
                         text=True, cwd=ROOT, check=True).stdout
    assert "semi-angle (mrad)" in out and "scan step (Å)" in out


def test_simulate_reconstruct_info(tmp_path, model_file, capsys):
    data = tmp_path / "data.h5"
    assert main(["simulate", "--output", str(data), "--scan", "8", "8", "--step", "0.3"]) == 0
    assert main(["simulate", "--output", str(data)]) == 2  # refuses to overwrite
    assert "exists" in capsys.readouterr().err
    out = tmp_path / "phase.h5"
    png = tmp_path / "phase.png"
    assert main(["reconstruct", str(data), "--output", str(out), "--energy", "300e3", "--semiangle", "17.1",
                 "--C10", "-100", "--model", str(model_file), "--rotation", "0", "--no-transpose", "--png", str(png),
                 "--quiet", "--precision", "fp32"]) == 0
    result = read_reconstruction(out)
    assert result["phase"].ndim == 2 and np.isfinite(result["phase"]).all()
    assert result["metadata"]["preprocessing"]["scan_shape"] == [8, 8]
    assert png.stat().st_size > 1000
    assert main(["info", str(out)]) == 0
    assert "positions_A" in capsys.readouterr().out
    assert main(["info", str(model_file)]) == 0
    assert '"name": "tiny"' in capsys.readouterr().out
    core = tmp_path / "core.h5"
    assert main(["reconstruct", str(data), "--output", str(core), "--energy", "300e3", "--semiangle", "17.1",
                 "--C10", "-100", "--model", str(model_file), "--rotation", "0", "--no-transpose", "--quiet",
                 "--precision", "fp32", "--stitch-fraction", "0.5", "--anchor-ramp", "--stitching", "relaxation",
                 "--relaxation-sweeps", "5", "--min-overlap", "0.3"]) == 0
    stitching = read_reconstruction(core)["metadata"]["stitching"]
    assert stitching["stitch_fraction"] == 0.5
    assert (stitching["method"], stitching["min_overlap"]) == ("relaxation", 0.3)
    assert stitching["anchor_ramp"] and len(stitching["ramp_removed_rad_per_A"]) == 2
    assert result["metadata"]["stitching"]["anchor_ramp"]  # the default
    kept = tmp_path / "kept.h5"
    assert main(["reconstruct", str(data), "--output", str(kept), "--energy", "300e3", "--semiangle", "17.1",
                 "--C10", "-100", "--model", str(model_file), "--rotation", "0", "--no-transpose", "--quiet",
                 "--precision", "fp32", "--no-anchor-ramp"]) == 0
    assert not read_reconstruction(kept)["metadata"]["stitching"]["anchor_ramp"]
    assert read_reconstruction(core)["coverage"].sum() < result["coverage"].sum()  # a smaller stitching mask


def test_reconstruct_errors_are_clear(tmp_path, model_file, capsys):
    data = tmp_path / "data.h5"
    main(["simulate", "--output", str(data), "--scan", "6", "6"])
    code = main(["reconstruct", str(data), "--output", str(tmp_path / "p.h5"), "--energy", "200e3",
                 "--semiangle", "17.1", "--C10", "-100", "--model", str(model_file)])
    assert code == 2 and "energy (eV): model 300000 vs data 200000" in capsys.readouterr().err
    assert not (tmp_path / "p.h5").exists()
    (tmp_path / "junk.h5").write_text("junk")
    code = main(["reconstruct", str(tmp_path / "junk.h5"), "--output", str(tmp_path / "p.h5"), "--energy", "300e3",
                 "--semiangle", "17.1"])
    assert code == 2 and "not a readable" in capsys.readouterr().err


def test_recover_probe_then_reconstruct_with_it(tmp_path, model_file, capsys):
    """`recover-probe` writes the aberrations (JSON) and a figure; `reconstruct --probe` uses them; a fixed-probe
    model is refused with the reason."""


    geometry = ProbeGeometry(300e3, 17.1, angular_sampling=2.0, aberrations={"C10": -100.0}, mask_threshold=0.1)
    ranges = AberrationRanges(C10=(-120.0, -60.0), C12=25.0, C21=300.0, C23=300.0)
    conditioned = tmp_path / "cond.pt"
    DeepCDIModel(ResUNet(width=0.125, depth=2, in_channels=3).eval(), geometry,
                 {"name": "c", "training_set": {"aberration_ranges": ranges.to_dict()}}).save(conditioned)
    data = tmp_path / "data.h5"
    assert main(["simulate", "--output", str(data), "--scan", "10", "10", "--step", "0.3"]) == 0
    common = ["--energy", "300e3", "--semiangle", "17.1", "--rotation", "0", "--no-transpose", "--quiet"]
    found = tmp_path / "probe.json"
    assert main(["recover-probe", str(data), "--output", str(found), "--model", str(conditioned), "--pairs", "10",
                 "--iterations", "3", "--trials", "4", "--png", str(tmp_path / "probe.png"), *common]) == 0
    result = json.loads(found.read_text())
    assert set(result["aberrations"]) >= {"C10", "C12", "phi12"} and len(result["history"]) == 3
    assert (tmp_path / "probe.png").stat().st_size > 1000
    out = tmp_path / "phase.h5"
    assert main(["reconstruct", str(data), "--output", str(out), "--model", str(conditioned), "--probe", str(found),
                 "--precision", "fp32", *common]) == 0
    stored = read_reconstruction(out)["metadata"]["geometry"]["aberrations"]
    assert stored["C10"] == pytest.approx(result["aberrations"]["C10"])
    capsys.readouterr()
    code = main(["recover-probe", str(data), "--output", str(tmp_path / "x.json"), "--model", str(model_file), *common])
    assert code == 2 and "needs a probe-conditioned model" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


def test_vacuum_probe_on_another_detector_is_resampled(tmp_path, geometry):
    own = np.abs(geometry.probe_fourier) ** 2
    path = tmp_path / "vacuum.npy"
    np.save(path, np.repeat(np.repeat(own, 2, 0), 2, 1))  # 64×64 pixels of 1 mrad
    args = build_parser().parse_args(["train", "--output", str(tmp_path / "m.pt"), "--vacuum-probe", str(path),
                                      "--vacuum-sampling", "1.0"])
    vacuum = geometry_from_args(args).vacuum_probe_intensity
    assert vacuum.shape == (32, 32) and vacuum.sum() == pytest.approx(1.0)
    np.testing.assert_allclose(vacuum, own / own.sum(), atol=1e-6 * own.max() / own.sum())
    args = build_parser().parse_args(["train", "--output", str(tmp_path / "m.pt"), "--vacuum-probe", str(path)])
    with pytest.raises(ValueError, match="--vacuum-sampling"):
        geometry_from_args(args)


def test_train_takes_the_l1_stage(tmp_path):
    """`--l1-stage` reaches the run (stored in the model's training record); by default a run from scratch gets 0.5."""
    tiny = ["--width", "0.125", "--depth", "2", "--batch-size", "4", "--val-size", "8", "--steps", "4", "--val-every",
            "1", "--fp32", "--quiet", "--threads", "1"]
    for stage, expected in ((["--l1-stage", "0.3"], 0.3), ([], 0.5)):
        out = tmp_path / f"m{expected}.pt"
        assert main(["train", "--output", str(out), *tiny, *stage]) == 0
        assert load_model(out).metadata["training"]["l1_stage"] == expected
    history = json.loads((tmp_path / "m0.5.history.json").read_text())
    assert [h["loss"] for h in history] == ["l1", "l1", "relative", "relative"]


@pytest.mark.parametrize("command, classes", [
    ("train", (TrainConfig, StreamConfig, AberrationRanges)),
    ("reconstruct", (StitchOptions,)),
    ("recover-probe", (RecoveryOptions,)),
])
def test_option_flags_take_their_defaults_from_the_dataclasses(command, classes):
    """Each flag built from an options dataclass parses back, with no value given, to that class's defaults."""
    argv = {"train": [command, "--output", "m.pt"],
            "reconstruct": [command, "x.h5", "--output", "p.h5", "--energy", "3e5", "--semiangle", "17"],
            "recover-probe": [command, "x.h5", "--output", "p.json", "--energy", "3e5", "--semiangle", "17"]}[command]
    args = build_parser().parse_args(argv)
    for cls in classes:
        parsed = cls(**options_from_args(cls, args, exclude=RECOVERY_NOT_ON_CLI if cls is RecoveryOptions else ()))
        default = cls()
        for f in dataclasses.fields(cls):
            if "help" in f.metadata:
                assert getattr(parsed, f.name) == getattr(default, f.name), (cls.__name__, f.name)


def test_train_flags_reach_the_configs():
    args = build_parser().parse_args([
        "train", "--output", "m.pt", "--fp32", "--lr", "3e-4", "--electrons", "100", "1e6", "--mix", "1", "0", "0",
        "--batch-size", "32", "--C10-range", "-150", "-50", "--loss", "l1",
    ])
    config = TrainConfig(**options_from_args(TrainConfig, args))
    assert (config.bf16, config.lr, config.loss) == (False, 3e-4, "l1")
    stream = StreamConfig(**options_from_args(StreamConfig, args, exclude=("aberration_ranges",)))
    assert stream.electrons_range == (100.0, 1e6) and stream.batch_size == 32
    assert stream.mix == {"photos": 1.0, "lattice": 0.0, "noise": 0.0}
    assert AberrationRanges(**options_from_args(AberrationRanges, args)).C10 == (-150.0, -50.0)
