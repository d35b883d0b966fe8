import json
import os
import signal
import subprocess
import sys
import time
import types
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from py4dstem_deepcdi import io, training
from py4dstem_deepcdi.models import DeepCDIModel
from py4dstem_deepcdi.network import ResUNet
from py4dstem_deepcdi.probe import AberrationRanges
from py4dstem_deepcdi.stream import StreamConfig
from py4dstem_deepcdi.training import TrainConfig, Trainer, _lineage, masked_correlation, masked_l1, plot_history

ROOT = Path(__file__).resolve().parents[1]


def small_config(**changes):
    base = dict(steps=6, width=0.125, depth=2, val_size=16, val_every=2, checkpoint_every=2, bf16=False,
                stream=StreamConfig(batch_size=4))
    base.update(changes)
    return TrainConfig(**base)


def test_masked_l1_averages_every_sample():
    mask = torch.zeros(4, 4, dtype=torch.bool)
    mask[1:3, 1:3] = True
    target = torch.zeros(2, 1, 4, 4)
    prediction = torch.zeros(2, 1, 4, 4)
    prediction[1, 0, 1:3, 1:3] = 2.0  # only the second sample is wrong
    prediction[0, 0, 0, 0] = 100.0  # outside the mask: ignored
    assert float(masked_l1(prediction, target, mask)) == pytest.approx(1.0)  # (0 + 2) / 2
    corr = masked_correlation(torch.arange(16.0).reshape(1, 1, 4, 4), torch.arange(16.0).reshape(1, 1, 4, 4) * 3, mask)
    assert float(corr[0]) == pytest.approx(1.0)


def test_relative_l1_weighs_each_sample_by_its_phase():
    mask = torch.ones(4, 4, dtype=torch.bool)
    target = torch.stack([torch.full((1, 4, 4), 0.05), torch.full((1, 4, 4), 1.0)])
    prediction = target * 1.1  # both 10 % too strong
    assert float(masked_l1(prediction, target, mask)) == pytest.approx((0.005 + 0.1) / 2)
    assert float(masked_l1(prediction, target, mask, relative=True)) == pytest.approx(0.1)  # the same for both
    flat = torch.zeros(1, 1, 4, 4)  # a flat target: divided by the floor, not by zero
    assert float(masked_l1(flat + 0.001, flat, mask, relative=True)) == pytest.approx(0.001 / 0.01)
    with pytest.raises(ValueError, match="loss"):
        TrainConfig(loss="l2")


def test_learning_rate_schedules():
    c = TrainConfig(steps=101, lr=1e-3, lr_final=1e-5)
    assert c.learning_rate(0) == pytest.approx(1e-3)
    assert c.learning_rate(100) == pytest.approx(1e-5)
    budget = TrainConfig(steps=10**6, lr=1e-3, lr_final=1e-5, max_minutes=1)
    assert budget.learning_rate(10, elapsed=60) == pytest.approx(1e-5)  # the budget ends the decay
    paper = TrainConfig.paper()
    assert paper.optimizer == "sgd" and paper.stream.batch_size == 16 and paper.learning_rate(50) == 1e-4


def test_training_reduces_validation_loss(geometry):
    torch.set_num_threads(2)
    config = small_config(steps=60, val_every=30, lr=2e-3, lr_final=2e-3, width=0.25, depth=3, val_size=64,
                          stream=StreamConfig(batch_size=16, mix={"photos": 0.0, "lattice": 0.0, "noise": 1.0}))
    trainer = Trainer(geometry, config)
    before = trainer.validate()["val_l1"]
    history = trainer.train(progress=False)
    assert len(history) == 2
    assert history[-1]["val_l1"] < 0.9 * before


def test_bf16_only_where_native(geometry, monkeypatch):
    """Emulated bf16 (AVX2-only CPUs) is ~11x slower than float32: the trainer asks the same question as inference."""
    monkeypatch.setattr(training, "bf16_supported", lambda device="cpu": False)
    assert not Trainer(geometry, small_config(bf16=True))._use_bf16
    monkeypatch.setattr(training, "bf16_supported", lambda device="cpu": True)
    assert Trainer(geometry, small_config(bf16=True))._use_bf16
    assert not Trainer(geometry, small_config(bf16=False))._use_bf16


def test_resume_is_exact(tmp_path, geometry):
    full = Trainer(geometry, small_config(), checkpoint=tmp_path / "full.ckpt")
    full.train(progress=False)
    first = Trainer(geometry, small_config(), checkpoint=tmp_path / "part.ckpt")
    first.train(progress=False, until=4)
    resumed = Trainer(geometry, small_config(), checkpoint=tmp_path / "part.ckpt")
    assert resumed.step == 4
    resumed.train(progress=False)
    for (k, a), b in zip(full.network.state_dict().items(), resumed.network.state_dict().values()):
        assert torch.equal(a, b), k
    assert [h["step"] for h in resumed.history] == [2, 4, 6]


def test_portable_checkpoint_is_smaller_and_resumes_closely(tmp_path, geometry):
    config = small_config(width=0.25, depth=3)
    full = Trainer(geometry, config, checkpoint=tmp_path / "full.ckpt")
    full.train(progress=False, until=4)
    portable = Trainer(geometry, config, checkpoint=tmp_path / "portable.ckpt", portable_checkpoint=True)
    portable.train(progress=False, until=4)
    size_full, size_portable = (tmp_path / "full.ckpt").stat().st_size, (tmp_path / "portable.ckpt").stat().st_size
    assert size_portable < 0.75 * size_full  # weights fp32 + two moments in bf16: 2/3 of the exact checkpoint
    full.train(progress=False)
    resumed = Trainer(geometry, config, checkpoint=tmp_path / "portable.ckpt")  # no flag needed to read one
    assert resumed.step == 4 and resumed.portable_checkpoint
    resumed.train(progress=False)
    moved = scale = 0.0
    for a, b in zip(full.network.parameters(), resumed.network.parameters()):
        moved += float((a - b).detach().norm() ** 2)
        scale += float(a.detach().norm() ** 2)
    assert 0 < moved ** 0.5 < 1e-3 * scale ** 0.5  # not bit-exact, but the same run to bf16 rounding of Adam's moments
    moments = torch.load(tmp_path / "portable.ckpt", weights_only=True)["optimizer"]["state"][0]
    assert moments["exp_avg"].dtype == torch.bfloat16


def test_killed_training_resumes(tmp_path):
    """A training process killed mid-run (SIGKILL) leaves a valid checkpoint and resumes from it."""
    out = tmp_path / "model.pt"
    ckpt = tmp_path / "model.ckpt"
    args = [sys.executable, "-m", "py4dstem_deepcdi.cli", "train", "--output", str(out), "--checkpoint", str(ckpt),
            "--width", "0.125", "--depth", "2", "--batch-size", "4", "--val-size", "8", "--val-every", "1000",
            "--checkpoint-every", "1", "--fp32", "--quiet", "--threads", "1"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([*args, "--steps", "100000"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not ckpt.exists() and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert ckpt.exists() and not out.exists()
    step = torch.load(ckpt, weights_only=True)["step"]  # the checkpoint is whole (a kill can only orphan a .part file)
    assert step >= 1
    done = subprocess.run([*args, "--steps", str(step + 2)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"resuming from {ckpt} at step {step}" in done.stderr
    assert torch.load(ckpt, weights_only=True)["step"] == step + 2
    assert out.exists()


def test_budget_stops_cleanly(tmp_path, geometry):
    trainer = Trainer(geometry, small_config(steps=10**6, max_minutes=0.05), checkpoint=tmp_path / "c.ckpt")
    history = trainer.train(progress=False)
    assert 0 < trainer.step < 10**6
    assert history[-1]["step"] == trainer.step
    assert torch.load(tmp_path / "c.ckpt", weights_only=True)["step"] == trainer.step


def test_checkpoint_mismatch_and_corruption(tmp_path, geometry):
    Trainer(geometry, small_config(steps=2), checkpoint=tmp_path / "c.ckpt").train(progress=False)
    with pytest.raises(ValueError, match="other settings.*width"):
        Trainer(geometry, small_config(width=0.25), checkpoint=tmp_path / "c.ckpt")
    with pytest.raises(ValueError, match="another geometry"):
        Trainer(geometry.replace(energy=200e3, semiangle_cutoff=17.1), small_config(), checkpoint=tmp_path / "c.ckpt")
    (tmp_path / "bad.ckpt").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="cannot be read"):
        Trainer(geometry, small_config(), checkpoint=tmp_path / "bad.ckpt")


def test_l1_stage_defaults_and_warning(geometry):
    """The relative loss stalls from scratch (measured): a run from scratch first trains with the paper's L1; a
    fine-tune or an L1 run does not; turning the stage off from scratch warns."""

    assert TrainConfig().resolved().l1_stage == 0.5
    assert TrainConfig(init_from="hbn-300kv-17mrad").resolved().l1_stage == 0.0
    assert TrainConfig(loss="l1").resolved().l1_stage == 0.0
    assert TrainConfig(l1_stage=0.2).resolved().l1_stage == 0.2
    with pytest.raises(ValueError, match="l1_stage"):
        TrainConfig(l1_stage=1.0)
    with pytest.warns(UserWarning, match="starting plateau"):
        Trainer(geometry, small_config(l1_stage=0.0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Trainer(geometry, small_config())
        Trainer(geometry, small_config(loss="l1"))


@pytest.mark.parametrize("l1_stage", [0.5, 0.0])
def test_l1_stage_trains_the_paper_loss_on_the_paper_phases(geometry, l1_stage):
    """The first step's recorded loss is the L1 in rad on the uniform 0.1-1.5 rad stream during the stage, the
    relative loss on the run's own stream after it; the records say which."""
    config = small_config(steps=4, val_every=1, dropout=0.0, l1_stage=l1_stage)
    reference = Trainer(geometry, config)  # same seed, same initial weights
    trainer = Trainer(geometry, config)
    history = trainer.train(progress=False)
    first = l1_stage > 0
    assert [h["loss"] for h in history] == (["l1", "l1", "relative", "relative"] if first else ["relative"] * 4)
    assert (trainer.l1_stream is not None) == first
    if first:
        assert trainer.l1_stream.config.phase_max_range == training.L1_STAGE_PHASES
        assert trainer.l1_stream.config.phase_max_sampling == "uniform"
    x, y = (reference.l1_stream if first else reference.stream).batch(0)
    with torch.no_grad():
        expected = masked_l1(reference.network(x), y, reference.mask, relative=not first)
    assert history[0]["train_l1"] == pytest.approx(float(expected), rel=1e-5)


def test_l1_stage_survives_resume(tmp_path, geometry):
    """A resumed run keeps its own stage and its own init_from (a fine-tune resumed without init_from is still a
    fine-tune, not a run from scratch with the L1 stage); checkpoints from before the option: none."""
    base = DeepCDIModel(ResUNet(width=0.125, depth=2).eval(), geometry, {"name": "base"}).save(tmp_path / "base.pt")
    Trainer(geometry, small_config(steps=2, init_from=str(base)), checkpoint=tmp_path / "f.ckpt").train(progress=False)
    resumed = Trainer(geometry, small_config(steps=4), checkpoint=tmp_path / "f.ckpt")
    assert resumed.config.l1_stage == 0.0 and resumed.config.init_from == str(base) and resumed.step == 2
    Trainer(geometry, small_config(steps=2), checkpoint=tmp_path / "c.ckpt").train(progress=False)
    assert Trainer(geometry, small_config(steps=4), checkpoint=tmp_path / "c.ckpt").config.l1_stage == 0.5
    payload = torch.load(tmp_path / "c.ckpt", weights_only=True)
    config = json.loads(payload["config"])
    del config["l1_stage"]
    payload["config"] = json.dumps(config)
    torch.save(payload, tmp_path / "old.ckpt")
    assert Trainer(geometry, small_config(), checkpoint=tmp_path / "old.ckpt").config.l1_stage == 0.0


def test_checkpoint_carries_the_vacuum_pattern(tmp_path, geometry):
    """A run trained with a vacuum pattern can be rebuilt from its checkpoint alone and refuses another pattern."""
    own = np.abs(geometry.probe_fourier) ** 2
    vacuum = geometry.replace(vacuum_probe_intensity=own)
    Trainer(vacuum, small_config(steps=2), checkpoint=tmp_path / "v.ckpt").train(progress=False)
    rebuilt = Trainer.from_checkpoint(tmp_path / "v.ckpt", steps=4)
    np.testing.assert_array_equal(rebuilt.geometry.vacuum_probe_intensity, vacuum.vacuum_probe_intensity)
    assert rebuilt.step == 2
    rebuilt.train(progress=False)
    assert rebuilt.step == 4
    wider = geometry.replace(vacuum_probe_intensity=np.abs(geometry.replace(semiangle_cutoff=19.0).probe_fourier) ** 2)
    with pytest.raises(ValueError, match="another vacuum pattern"):
        Trainer(wider, small_config(steps=2), checkpoint=tmp_path / "v.ckpt")
    with pytest.raises(ValueError, match="another geometry"):  # no vacuum pattern at all
        Trainer(geometry, small_config(steps=2), checkpoint=tmp_path / "v.ckpt")
    payload = torch.load(tmp_path / "v.ckpt", weights_only=True)
    del payload["vacuum_probe_intensity"]  # as written before checkpoints carried it
    torch.save(payload, tmp_path / "old.ckpt")
    with pytest.raises(ValueError, match="does not store"):
        Trainer.from_checkpoint(tmp_path / "old.ckpt")


def test_export_and_history_figure(tmp_path, geometry):
    trainer = Trainer(geometry, small_config(steps=2))
    history = trainer.train(progress=False)
    model = trainer.export(name="tiny")
    assert model.metadata["training"]["steps"] == 2
    assert model.metadata["training"]["samples"] == 8
    assert model.metadata["training"]["val_l1"] == history[-1]["val_l1"]
    plot_history(history, tmp_path / "h.png")
    assert (tmp_path / "h.png").stat().st_size > 1000
    fig = plot_history(history, tmp_path / "r.png", loss="relative")  # unitless training loss on its own axis
    assert [ax.get_ylabel() for ax in fig.axes] == ["masked L1 (rad)", "validation correlation per patch",
                                                   "training relative L1"]


def test_bad_settings():
    with pytest.raises(ValueError, match="optimizer"):
        TrainConfig(optimizer="lbfgs")
    with pytest.raises(ValueError, match="steps"):
        TrainConfig(steps=0)


def test_masked_losses_with_one_mask_per_sample():
    torch.manual_seed(0)
    p, t = torch.randn(3, 1, 8, 8), torch.randn(3, 1, 8, 8)
    masks = torch.rand(3, 1, 8, 8) > 0.5
    expected = torch.stack([(p[i] - t[i]).abs()[masks[i]].mean() for i in range(3)]).mean()
    assert float(masked_l1(p, t, masks)) == pytest.approx(float(expected), rel=1e-6)
    corr = masked_correlation(p, t, masks)
    for i in range(3):
        a, b = p[i][masks[i]], t[i][masks[i]]
        assert float(corr[i]) == pytest.approx(float(torch.corrcoef(torch.stack([a, b]))[0, 1]), abs=1e-5)


def test_fine_tuned_model_carries_its_lineage(tmp_path, geometry):
    """A warm-started model records what it started from, with that model's own training, so the total cost adds up
    over a chain of fine-tunes; a source that is gone is still named."""

    base = DeepCDIModel(ResUNet(width=0.125, depth=2).eval(), geometry, {"name": "base", "training": {"samples": 100}})
    base_path = base.save(tmp_path / "base.pt")
    first = Trainer(geometry, small_config(steps=2, init_from=str(base_path), loss="relative"))
    first.train(progress=False)
    tuned = first.export("tuned")
    record = tuned.metadata["training"]
    assert record["loss"] == "relative" and record["samples"] == 8
    assert record["init_from"]["name"] == "base" and record["init_from"]["training"] == {"samples": 100}
    assert record["total_samples"] == 108
    tuned_path = tuned.save(tmp_path / "tuned.pt")
    second = Trainer(geometry, small_config(steps=2, init_from=str(tuned_path)))
    second.train(progress=False)
    tuned_path.unlink()
    assert second.export("again").metadata["training"]["init_from"] == {"source": str(tuned_path)}
    assert _lineage(str(base_path))["total_samples"] == 100


def test_probe_conditioned_training_from_a_fixed_model(tmp_path, geometry):
    """A conditioned run warm-started from a fixed-probe model begins with that model's predictions, trains with
    per-sample masks, exports a conditioned model and resumes from its checkpoint."""

    fixed = DeepCDIModel(ResUNet(width=0.125, depth=2).eval(), geometry, {"name": "fixed"})
    fixed_path = fixed.save(tmp_path / "fixed.pt")
    ranges = AberrationRanges(C10=(-120.0, -60.0), C12=25.0, C21=300.0, C23=300.0)
    config = small_config(stream=StreamConfig(batch_size=4, aberration_ranges=ranges), init_from=str(fixed_path))
    trainer = Trainer(geometry, config, checkpoint=tmp_path / "c.ckpt")
    x, _ = trainer.validation_set()
    trainer.network.eval()
    with torch.no_grad():
        torch.testing.assert_close(trainer.network(x), fixed.network(x[:, :1]))
    trainer.network.train()
    assert trainer.loss_mask(x).shape == (16, 1, 32, 32)
    trainer.train(progress=False, until=4)
    model = trainer.export("c")
    assert model.conditioned and model.aberration_ranges == ranges
    again = Trainer(geometry, config, checkpoint=tmp_path / "c.ckpt")
    assert again.step == 4
    with pytest.raises(ValueError, match="width"):
        Trainer(geometry, small_config(width=0.25, stream=config.stream, init_from=str(fixed_path)))


def test_pooled_training_from_a_one_pattern_model(tmp_path, geometry):
    """A pooled run warm-started from a one-pattern model begins with its predictions, takes the loss over the
    geometry's mask, and exports a pooled (not probe-conditioned) model that carries its step range."""
    single = DeepCDIModel(ResUNet(width=0.125, depth=2).eval(), geometry, {"name": "single"})
    single_path = single.save(tmp_path / "single.pt")
    stream = StreamConfig(batch_size=4, pool=3, pool_step_range=(0.2, 0.4))
    trainer = Trainer(geometry, small_config(stream=stream, init_from=str(single_path)))
    x, _ = trainer.validation_set()
    assert x.shape[1] == 3
    trainer.network.eval()
    with torch.no_grad():
        torch.testing.assert_close(trainer.network(x), single.network(x[:, :1]))
    trainer.network.train()
    assert trainer.loss_mask(x) is trainer.mask
    trainer.train(progress=False, until=2)
    model = trainer.export("pooled")
    assert model.pool == 3 and not model.conditioned and model.pool_step_range == (0.2, 0.4)
    assert "pooled" in repr(model)
    with pytest.raises(ValueError, match="probe-conditioned"):
        model.require_conditioned("recover_probe")


def test_resume_refuses_another_lineage_and_fewer_steps(tmp_path, geometry):
    """A checkpoint continues only the run it was made by: another init_from (the model would claim a false lineage)
    and fewer steps than it has done are refused with the reason; the same source through a link, and steps equal to
    its step (export as it is), are accepted."""
    base = DeepCDIModel(ResUNet(width=0.125, depth=2).eval(), geometry, {"name": "base"}).save(tmp_path / "base.pt")
    other = DeepCDIModel(ResUNet(width=0.125, depth=2).eval(), geometry, {"name": "other"}).save(tmp_path / "o.pt")
    (tmp_path / "link.pt").symlink_to(base)
    ckpt = tmp_path / "c.ckpt"
    Trainer(geometry, small_config(steps=2, init_from=str(base)), checkpoint=ckpt).train(progress=False)
    with pytest.raises(ValueError, match=rf"continues a run started from '{base}', not from init_from '{other}'"):
        Trainer(geometry, small_config(steps=4, init_from=str(other)), checkpoint=ckpt)
    assert Trainer(geometry, small_config(steps=4, init_from=str(tmp_path / "link.pt")), checkpoint=ckpt).step == 2
    with pytest.raises(ValueError, match=r"is at step 2, beyond steps = 1: a run cannot be shortened"):
        Trainer(geometry, small_config(steps=1, init_from=str(base)), checkpoint=ckpt)
    same = Trainer(geometry, small_config(steps=2), checkpoint=ckpt)
    same.train(progress=False)
    model = same.export("again")
    assert same.step == 2 and model.metadata["training"]["init_from"]["name"] == "base"
    scratch = tmp_path / "s.ckpt"
    Trainer(geometry, small_config(steps=2), checkpoint=scratch).train(progress=False)
    with pytest.raises(ValueError, match="continues a run started from scratch"):
        Trainer(geometry, small_config(steps=4, init_from=str(base)), checkpoint=scratch)


def test_unwritable_checkpoint_is_refused_before_training(tmp_path, geometry, monkeypatch):
    (tmp_path / "file").write_text("")
    with pytest.raises(NotADirectoryError, match=f"cannot write {tmp_path / 'file' / 'c.ckpt'}"):
        Trainer(geometry, small_config(), checkpoint=tmp_path / "file" / "c.ckpt")
    monkeypatch.setattr(io.shutil, "disk_usage", lambda path: types.SimpleNamespace(free=10 * 2**20))
    with pytest.raises(OSError, match=rf"cannot write {tmp_path / 'c.ckpt'}: only 10.0 MiB free .*disk is full"):
        Trainer(geometry, small_config(), checkpoint=tmp_path / "c.ckpt")


def test_exported_model_carries_its_trained_ranges(geometry):
    """What the reconstruction compares the data with: doses, aperture edges, the semi-angle and its aperture, the
    pooled steps."""
    stream = StreamConfig(batch_size=4, electrons_range=(1e3, 1e5), edge_width_range=(0.0, 3.0))
    trainer = Trainer(geometry, small_config(steps=1, stream=stream))
    trainer.train(progress=False)
    model = trainer.export("ranges")
    trained = model.metadata["training_set"]
    assert model.electrons_range == (1e3, 1e5) and model.edge_width_range == (0.0, 3.0)
    assert trained["semiangle_cutoff_mrad"] == 17.1 and trained["aperture"] == "modelled (2 mrad roll-off)"
    assert trained["pool"] == 1 and trained["pool_step_range"] == (0.1, 0.6)
