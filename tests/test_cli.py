import dataclasses
import json
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from py4dstem_deepcdi import io
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
    assert result.object_phase.ndim == 2 and np.isfinite(result.object_phase[result.coverage > 0]).all()
    assert result.summary()["preprocessing"]["scan_shape"] == [8, 8]
    assert png.stat().st_size > 1000
    assert main(["info", str(out)]) == 0
    assert "positions (64, 2)" in capsys.readouterr().out
    assert main(["info", str(model_file)]) == 0
    assert '"name": "tiny"' in capsys.readouterr().out
    core = tmp_path / "core.h5"
    assert main(["reconstruct", str(data), "--output", str(core), "--energy", "300e3", "--semiangle", "17.1",
                 "--C10", "-100", "--model", str(model_file), "--rotation", "0", "--no-transpose", "--quiet",
                 "--precision", "fp32", "--stitch-fraction", "0.5", "--anchor-ramp", "--stitching", "relaxation",
                 "--relaxation-sweeps", "5", "--min-overlap", "0.3"]) == 0
    stitching = read_reconstruction(core).stitch_info
    assert stitching["stitch_fraction"] == 0.5
    assert (stitching["method"], stitching["min_overlap"]) == ("relaxation", 0.3)
    assert stitching["anchor_ramp"] and len(stitching["ramp_removed_rad_per_A"]) == 2
    assert result.stitch_info["anchor_ramp"]  # the default
    kept = tmp_path / "kept.h5"
    assert main(["reconstruct", str(data), "--output", str(kept), "--energy", "300e3", "--semiangle", "17.1",
                 "--C10", "-100", "--model", str(model_file), "--rotation", "0", "--no-transpose", "--quiet",
                 "--precision", "fp32", "--no-anchor-ramp"]) == 0
    assert not read_reconstruction(kept).stitch_info["anchor_ramp"]
    assert read_reconstruction(core).coverage.sum() < result.coverage.sum()  # a smaller stitching mask


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
    assert main(["recover-probe", str(data), "--output", str(found), "--method", "overlap", "--model", str(conditioned),
                 "--pairs", "10", "--iterations", "3", "--trials", "4", "--png", str(tmp_path / "probe.png"),
                 *common]) == 0
    result = json.loads(found.read_text())
    assert set(result["aberrations"]) >= {"C10", "C12", "phi12"} and len(result["history"]) == 3
    assert (tmp_path / "probe.png").stat().st_size > 1000
    out = tmp_path / "phase.h5"
    assert main(["reconstruct", str(data), "--output", str(out), "--model", str(conditioned), "--probe", str(found),
                 "--precision", "fp32", *common]) == 0
    reopened = read_reconstruction(out)
    assert reopened.geometry.aberrations["C10"] == pytest.approx(result["aberrations"]["C10"])
    assert reopened.probe_source["method"] == "overlap"
    assert reopened.probe_source["from_data"] == result["from_data"] and "C10" in result["from_data"]
    capsys.readouterr()
    code = main(["recover-probe", str(data), "--output", str(tmp_path / "x.json"), "--method", "overlap",
                 "--model", str(model_file), *common])
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


# ------------------------------------------------------------------ data loss and careless arguments
def test_reconstruct_never_overwrites_its_input(tmp_path, model_file, capsys, monkeypatch):
    """`--output X.h5 --overwrite` on the input X.h5 (directly, through a link or a relative path), a `--png` on it,
    or an output on the model file: refused before anything is read; the input is unchanged."""
    data = tmp_path / "data.h5"
    assert main(["simulate", "--output", str(data), "--scan", "6", "6"]) == 0
    before = data.read_bytes()
    (tmp_path / "link.h5").symlink_to(data)
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")
    common = ["--energy", "300e3", "--semiangle", "17.1", "--C10", "-100", "--model", str(model_file), "--quiet",
              "--overwrite"]
    for source, output in ((str(data), str(data)), (str(data), str(tmp_path / "link.h5")), (str(data), "../data.h5"),
                           ("../link.h5", str(data))):
        assert main(["reconstruct", source, "--output", output, *common]) == 2
        assert "refusing to overwrite an input" in capsys.readouterr().err
    assert main(["reconstruct", str(data), "--output", str(tmp_path / "p.h5"), "--png", "../data.h5", *common]) == 2
    assert "--png ../data.h5 is the input file" in capsys.readouterr().err
    assert main(["reconstruct", str(data), "--output", str(model_file), *common]) == 2
    assert "is the --model file" in capsys.readouterr().err
    assert data.read_bytes() == before and not (tmp_path / "p.h5").exists()


@pytest.mark.parametrize("flags, message", [
    (["--subsample", "0"], "--subsample must be >= 1"),
    (["--step", "-0.3"], "--step must be a positive finite number, got -0.3"),
    (["--angular-sampling", "nan"], "--angular-sampling must be a positive finite number"),
    (["--semiangle", "0"], "--semiangle must be a positive finite number"),
    (["--rotation", "inf"], "--rotation must be a finite number"),
    (["--C12", "nan"], "--C12 must be a finite number"),
    (["--threads", "-1"], "--threads must be >= 0"),
    (["--device", "tpu"], "device must be 'cpu' or 'gpu'"),
    (["--stitch-fraction", "1.5"], "--stitch-fraction must be in (0, 1]"),
    (["--min-overlap", "2"], "min_overlap must be in (0, 1]"),
    (["--output", "{file}/p.h5"], "cannot write {file}/p.h5: "),
])
def test_reconstruct_arguments_are_checked_before_reading(tmp_path, capsys, flags, message):
    """Every bad argument is refused before the data are read (the input here does not even exist)."""
    (tmp_path / "file").write_text("")
    flags = [f.format(file=tmp_path / "file") for f in flags]
    argv = ["reconstruct", str(tmp_path / "nowhere.h5"), "--output", str(tmp_path / "p.h5"), "--energy", "300e3",
            "--semiangle", "17.1", *flags]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message.format(file=tmp_path / "file") in err and "does not exist" not in err


def test_full_disk_is_refused_before_computing(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(io.shutil, "disk_usage", lambda path: types.SimpleNamespace(free=0))
    argv = ["reconstruct", str(tmp_path / "nowhere.h5"), "--output", str(tmp_path / "p.h5"), "--energy", "300e3",
            "--semiangle", "17.1"]
    assert main(argv) == 2
    assert f"cannot write {tmp_path / 'p.h5'}: only 0.0 MiB free on its disk" in capsys.readouterr().err
    assert main(["demo", "--out", str(tmp_path / "demo")]) == 2
    assert "(the disk is full)" in capsys.readouterr().err
    assert main(["demo", "--scan", "1"]) == 2
    assert "--scan must be >= 2" in capsys.readouterr().err


def test_train_keeps_models_and_lineage(tmp_path, model_file, capsys):
    """`train` refuses an existing model without --overwrite (before training), its own input or checkpoint as the
    output, a resume with another --init-from or fewer --steps; it writes the history atomically (no temporary
    files left) and says when a checkpoint is exported as it is."""
    tiny = ["--width", "0.125", "--depth", "2", "--batch-size", "4", "--val-size", "8", "--val-every", "1", "--fp32",
            "--quiet", "--threads", "1"]
    out = tmp_path / "m.pt"
    out.write_bytes(model_file.read_bytes())
    before = out.read_bytes()
    assert main(["train", "--output", str(out), "--steps", "2", *tiny]) == 2
    assert f"{out} exists; pass --overwrite" in capsys.readouterr().err
    assert out.read_bytes() == before and not (tmp_path / "m.ckpt").exists()
    assert main(["train", "--output", str(out), "--init-from", str(out), "--overwrite", *tiny]) == 2
    assert "is the --init-from file" in capsys.readouterr().err
    assert main(["train", "--output", str(out), "--checkpoint", str(out), "--overwrite", *tiny]) == 2
    assert "is the --checkpoint file" in capsys.readouterr().err
    (tmp_path / "file").write_text("")
    assert main(["train", "--output", str(tmp_path / "file" / "m.pt"), *tiny]) == 2
    assert f"cannot write {tmp_path / 'file' / 'm.pt'}" in capsys.readouterr().err
    assert out.read_bytes() == before
    assert main(["train", "--output", str(out), "--steps", "2", "--overwrite", *tiny]) == 0
    assert load_model(out).metadata["training"]["steps"] == 2
    assert len(json.loads(out.with_suffix(".history.json").read_text())) == 2
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".part")]
    capsys.readouterr()
    assert main(["train", "--output", str(out), "--steps", "1", "--overwrite", *tiny]) == 2
    assert "is at step 2, beyond steps = 1" in capsys.readouterr().err
    assert main(["train", "--output", str(out), "--steps", "4", "--init-from", str(model_file), "--overwrite",
                 *tiny]) == 2
    assert "continues a run started from scratch" in capsys.readouterr().err
    assert main(["train", "--output", str(out), "--steps", "2", "--overwrite", *tiny]) == 0
    assert "already at step 2 = --steps: exported as it is" in capsys.readouterr().err
    assert "init_from" not in load_model(out).metadata["training"]
