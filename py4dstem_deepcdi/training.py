"""Training: the masked L1 loss, a resumable training loop with checkpoints, validation and history.

Loss (one place): ``L = mean_b [ Σ_r mask(r) |f(x_b)(r) − φ_b(r)| / Σ_r mask(r) ]`` — the L1 error inside the
illuminated mask of every sample, averaged over the batch (not only the first sample of a batch).
Checkpoints hold weights, optimiser state, RNG state, the step and the history; they are written atomically
and loaded with ``weights_only=True``. Batch ``k`` of the stream is a pure function of ``(seed, k)``, so a run
resumed from a checkpoint continues exactly as if it had not been interrupted.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import torch
from tqdm.auto import tqdm

from .backend import torch_device
from .encoding import conditioning_mask
from .io import MIN_FREE_BYTES, atomic_path, check_writable, same_file, save_figure
from .models import DeepCDIModel, as_model
from .network import ResUNet, count_parameters, load_widened
from .probe import ProbeGeometry
from .runtime import bf16_supported
from .stream import StreamConfig, TrainingStream

CHECKPOINT_FORMAT = "py4dstem-deepcdi-checkpoint"
VALIDATION_WORKER = 10_000  # the validation set is drawn by a worker id no training run uses
L1_STAGE_PHASES = (0.1, 1.5)  # rad, peak-to-valley phases (uniform) of the first stage (TrainConfig.l1_stage)


RELATIVE_FLOOR = 0.01  # rad: the relative loss divides by max(mean |target|, this)


def masked_l1(
    prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, relative: bool = False
) -> torch.Tensor:
    """Per-sample mean |prediction − target| inside ``mask``, averaged over the batch (rad).

    ``prediction`` and ``target`` are (B, 1, N, N); ``mask`` is one (N, N) mask or one per sample (B, 1, N, N).
    ``relative``: divide each sample's L1 by its target's mean |φ| inside the mask (at least ``RELATIVE_FLOOR``
    rad), so that a weak object's errors count as much as a strong one's (dimensionless).
    """
    mask = mask.to(prediction.dtype).expand_as(prediction)
    area = mask.sum((-3, -2, -1)).clamp_min(1)
    per_sample = ((prediction - target).abs() * mask).sum((-3, -2, -1)) / area
    if relative:
        per_sample = per_sample / ((target.abs() * mask).sum((-3, -2, -1)) / area).clamp_min(RELATIVE_FLOOR)
    return per_sample.mean()


def masked_correlation(prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of prediction and target inside ``mask`` ((N, N) or (B, 1, N, N)), per sample (B,)."""
    m = mask.to(prediction.dtype).expand_as(prediction).flatten(1)
    n = m.sum(1, keepdim=True).clamp_min(1)
    p = prediction.flatten(1)
    t = target.flatten(1)
    p = (p - (p * m).sum(1, keepdim=True) / n) * m
    t = (t - (t * m).sum(1, keepdim=True) / n) * m
    return (p * t).sum(1) / torch.sqrt((p * p).sum(1) * (t * t).sum(1)).clamp_min(1e-12)


@dataclass
class TrainConfig:
    """Training settings.

    Parameters
    ----------
    steps
        Total optimiser steps.
    loss
        ``"relative"`` (default: each sample's masked L1 divided by its target's mean |φ|, see :func:`masked_l1`; weak
        objects weigh as much as strong ones) or ``"l1"`` (the paper's masked L1 in rad).
    optimizer
        ``"adam"`` (default: Adam, cosine learning-rate decay from ``lr`` to ``lr_final``) or ``"sgd"`` (the paper's
        tutorial: plain SGD, constant ``lr`` 1e-4, batch 16).
    lr, lr_final
        Initial and final learning rate.
    width, depth, dropout
        Network options (see :class:`ResUNet`).
    bf16
        bfloat16 autocast for the forward pass where it is native (CPUs with AVX512-BF16 or AMX, CUDA); float32
        elsewhere (emulated bf16 is many times slower, docs/training.md).
    val_size
        Samples in the fixed validation set.
    val_every, checkpoint_every
        Steps between validations and between checkpoints.
    max_minutes
        Stop cleanly (after a checkpoint) when this wall-clock budget is spent.
    seed
        Seed of the data stream, the initial weights and dropout.
    stream
        The training-set settings (doses, phase range, mix, batch size; ``aberration_ranges`` makes the network
        probe-conditioned).
    init_from
        Start from the weights of this model (file path or shipped name), e.g. a probe-conditioned network from a
        fixed-probe one of the same width and depth (its extra input weights start at zero).
    l1_stage
        Fraction of the run (of its steps or of its ``max_minutes``, whichever runs out first, as the learning rate)
        trained first with the paper's loss on the paper's phases (masked L1 in rad, peak-to-valley phases drawn
        uniformly in ``L1_STAGE_PHASES`` rad) before ``loss`` and ``stream`` take over. None (default): 0.5 for a
        run from scratch with the relative loss (which alone stays on its starting plateau), 0 otherwise (a
        fine-tune, or the L1 already).
    """

    steps: int = field(default=20_000, metadata={"help": "optimiser steps"})
    loss: str = field(
        default="relative",
        metadata={
            "help": "masked L1 divided by each target's mean |phase| (relative) or in rad (l1, the paper's)",
            "choices": ("l1", "relative"),
        },
    )
    optimizer: str = field(default="adam", metadata={"help": "optimiser", "choices": ("adam", "sgd")})
    lr: float = field(default=1e-3, metadata={"help": "initial learning rate"})
    lr_final: float = field(default=2e-5, metadata={"help": "final learning rate (cosine decay)"})
    width: float = field(default=1.0, metadata={"help": "network width multiplier (1 = the paper's)"})
    depth: int = field(default=4, metadata={"help": "stride-2 levels (4 = the paper's)"})
    dropout: float = field(default=0.2, metadata={"help": "dropout after every stage"})
    bf16: bool = field(default=True, metadata={"help": "train in float32 instead of bf16 autocast", "negate": "--fp32"})
    val_size: int = field(default=512, metadata={"help": "samples in the fixed validation set"})
    val_every: int = field(default=500, metadata={"help": "steps between validations"})
    checkpoint_every: int = field(default=500, metadata={"help": "steps between checkpoints"})
    max_minutes: float | None = field(default=None, metadata={"help": "stop cleanly after this many minutes"})
    seed: int = field(default=0, metadata={"help": "seed of the data stream, initial weights and dropout"})
    stream: StreamConfig = field(default_factory=StreamConfig)
    init_from: str | None = field(
        default=None, metadata={"help": "start from this model's weights (file or shipped name)"}
    )
    l1_stage: float | None = field(
        default=None,
        metadata={
            "help": "fraction of the run trained first with the paper's L1 on phases 0.1-1.5 rad "
            "(default: 0.5 from scratch with the relative loss, else 0)",
            "metavar": "FRACTION",
        },
    )

    def __post_init__(self):
        if isinstance(self.stream, dict):
            self.stream = StreamConfig(**self.stream)
        if self.loss not in ("l1", "relative"):
            raise ValueError(f"loss must be 'l1' or 'relative', got {self.loss!r}")
        if self.optimizer not in ("adam", "sgd"):
            raise ValueError(f"optimizer must be 'adam' or 'sgd', got {self.optimizer!r}")
        for name in ("steps", "val_size", "val_every", "checkpoint_every"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not (self.lr > 0 and self.lr_final > 0):
            raise ValueError("lr and lr_final must be positive")
        if self.l1_stage is not None and not 0 <= self.l1_stage < 1:
            raise ValueError(f"l1_stage must be a fraction in [0, 1), got {self.l1_stage}")

    def resolved(self) -> TrainConfig:
        """These settings with ``l1_stage`` decided (see the parameter)."""
        if self.l1_stage is not None:
            return self
        from_scratch = self.loss == "relative" and not self.init_from
        return dataclasses.replace(self, l1_stage=0.5 if from_scratch else 0.0)

    @classmethod
    def paper(cls, **changes) -> TrainConfig:
        """The tutorial's recipe: SGD, learning rate 1e-4, batch 16, the L1 in rad."""
        recipe = {"optimizer": "sgd", "lr": 1e-4, "lr_final": 1e-4, "loss": "l1", "stream": StreamConfig(batch_size=16)}
        return cls(**{**recipe, **changes})

    def to_dict(self) -> dict[str, Any]:
        """JSON-able settings."""
        return dataclasses.asdict(self)

    def progress(self, step: int, elapsed: float = 0.0) -> float:
        """Fraction of the run done at ``step`` after ``elapsed`` s: of the steps or of the budget, the larger."""
        t = step / max(self.steps - 1, 1)
        if self.max_minutes:
            t = max(t, elapsed / (60 * self.max_minutes))
        return min(t, 1.0)

    def in_l1_stage(self, step: int, elapsed: float = 0.0) -> bool:
        """Whether ``step`` belongs to the first stage trained with the paper's L1 (``l1_stage``)."""
        return bool(self.l1_stage) and self.progress(step, elapsed) < self.l1_stage

    def learning_rate(self, step: int, elapsed: float = 0.0) -> float:
        """Learning rate at ``step`` (cosine decay for Adam, constant for SGD).

        With a ``max_minutes`` budget the decay follows whichever runs out first, the steps or the time spent
        (``elapsed``, s), so a run stopped by its budget still ends at ``lr_final``.
        """
        if self.optimizer == "sgd":
            return self.lr
        t = self.progress(step, elapsed)
        return self.lr_final + 0.5 * (self.lr - self.lr_final) * (1 + math.cos(math.pi * t))


def _read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a training checkpoint safely (``weights_only=True``); ``ValueError`` for a corrupt or foreign file."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"checkpoint {str(path)!r} cannot be read (corrupt or foreign): {exc}") from exc
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{str(path)!r} is not a py4dstem-deepcdi training checkpoint")
    return payload


def _saved_config(payload: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's settings as JSON with newer defaults filled; a run written before ``l1_stage`` existed had no
    first stage (0)."""
    saved = json.loads(json.dumps(TrainConfig(**json.loads(payload["config"])).to_dict()))
    saved["l1_stage"] = saved["l1_stage"] or 0.0
    return saved


def _resumed(config: TrainConfig, payload: dict[str, Any], checkpoint: Path) -> TrainConfig:
    """The settings of a run resumed from a checkpoint: its own ``l1_stage`` and ``init_from`` where not given.

    Raises ``ValueError`` for another ``init_from`` (the model would claim a false lineage).
    """
    saved = _saved_config(payload)
    if config.l1_stage is None:  # the run's own choice, whatever init_from says now
        config = dataclasses.replace(config, l1_stage=saved["l1_stage"])
    if config.init_from is None:
        config = dataclasses.replace(config, init_from=saved["init_from"])
    elif saved["init_from"] is None or not same_file(config.init_from, saved["init_from"]):
        raise ValueError(
            f"checkpoint {str(checkpoint)!r} continues a run started from "
            f"{repr(saved['init_from']) if saved['init_from'] else 'scratch'}, not from init_from "
            f"{config.init_from!r}: resume without init_from (--init-from) or start a new checkpoint file"
        )
    return config


def checkpoint_geometry(payload: dict[str, Any]) -> ProbeGeometry:
    """The geometry a checkpoint was trained for, with its vacuum pattern if it had one."""
    saved = json.loads(payload["geometry"])
    vacuum = payload.get("vacuum_probe_intensity")
    if saved.get("has_vacuum_probe") and vacuum is None:
        raise ValueError(
            "this checkpoint was trained with a vacuum pattern that it does not store (written before checkpoints "
            "carried it); build the Trainer with ProbeGeometry(..., vacuum_probe_intensity=...) and this checkpoint"
        )
    return ProbeGeometry.from_dict(saved, vacuum_probe_intensity=None if vacuum is None else vacuum.numpy())


class Trainer:
    """Train a :class:`ResUNet` for one geometry from the simulated stream, with checkpoints and resume.

    Parameters
    ----------
    geometry
        The probe/detector geometry to train for.
    config
        Training settings.
    checkpoint
        Checkpoint file; if it exists, training resumes from it (its settings and ``init_from`` must match, ``steps``
        may not be fewer than it has done); its folder is checked for writing and free space before any step.
    device
        ``"cpu"`` or ``"gpu"``.
    portable_checkpoint
        Write the checkpoint with the optimiser's moments in bfloat16 (two thirds of the size of an exact one:
        19 MB instead of 29 MB for a width-0.5 network, small enough to commit). A run resumed from it continues
        the same schedule and data stream; its weights differ from an uninterrupted run's only by that rounding.
        A run resumed from a portable checkpoint keeps writing portable ones.

    Raises ``ValueError`` for a checkpoint of another run and ``OSError`` (naming it) for an unwritable checkpoint.
    """

    def __init__(
        self,
        geometry: ProbeGeometry,
        config: TrainConfig | None = None,
        checkpoint: str | Path | None = None,
        device: str = "cpu",
        portable_checkpoint: bool = False,
    ):
        self.geometry = geometry
        self.portable_checkpoint = bool(portable_checkpoint)
        self.device = torch_device(device)
        self.checkpoint = Path(checkpoint) if checkpoint else None
        resuming = self.checkpoint is not None and self.checkpoint.exists()
        payload = _read_checkpoint(self.checkpoint) if resuming else None
        config = config or TrainConfig()
        self.config = (_resumed(config, payload, self.checkpoint) if resuming else config).resolved()
        torch.manual_seed(self.config.seed)
        self.stream = TrainingStream(geometry, self.config.stream, seed=self.config.seed, device=str(self.device))
        self.l1_stream = None
        if self.config.l1_stage:
            first = dataclasses.replace(
                self.config.stream, phase_max_range=L1_STAGE_PHASES, phase_max_sampling="uniform"
            )
            self.l1_stream = TrainingStream(geometry, first, seed=self.config.seed, device=str(self.device))
        self.network = ResUNet(self.config.width, self.config.depth, self.config.dropout, self.stream.in_channels)
        if self.checkpoint is not None:  # weights and two moments of float32, before any step
            check_writable(self.checkpoint, MIN_FREE_BYTES + 12 * count_parameters(self.network))
        if self.config.loss == "relative" and not self.config.init_from and not self.config.l1_stage and not resuming:
            warnings.warn(
                "training from scratch with the relative loss alone (l1_stage=0): measured to stay on its starting "
                "plateau far longer than the paper's L1 (validation correlation 0.01 vs 0.55 after 64,000 samples, "
                "docs/training.md); leave l1_stage at its default (deepcdi train --l1-stage) or start from a model",
                stacklevel=2,
            )
        if self.config.init_from and not resuming:  # a resumed run takes its weights from the checkpoint
            self._warm_start(self.config.init_from)
        self.network = self.network.to(self.device, memory_format=torch.channels_last)
        if self.config.optimizer == "adam":
            self.optimizer = torch.optim.Adam(self.network.parameters(), lr=self.config.lr)
        else:
            self.optimizer = torch.optim.SGD(self.network.parameters(), lr=self.config.lr)
        self.mask = self.stream.model.mask
        self.step = 0
        self.elapsed = 0.0
        self.history: list[dict[str, float]] = []
        self._validation: tuple[torch.Tensor, torch.Tensor] | None = None
        if resuming:
            self._load_checkpoint(payload)

    @classmethod
    def from_checkpoint(cls, checkpoint: str | Path, device: str = "cpu", **changes: Any) -> Trainer:
        """Rebuild the trainer stored in a checkpoint (its settings and geometry), e.g. to export or continue it.

        ``changes`` may alter ``steps`` or ``max_minutes`` (the other settings must stay those of the run).
        """
        payload = _read_checkpoint(checkpoint)
        config = json.loads(payload["config"])
        geometry = checkpoint_geometry(payload)
        config.update(changes)
        return cls(geometry, TrainConfig(**config), checkpoint=checkpoint, device=device)

    def _warm_start(self, source: str) -> None:
        model = as_model(source)
        mine, theirs = self.network.config(), model.network.config()
        if (mine["width"], mine["depth"]) != (theirs["width"], theirs["depth"]):
            raise ValueError(
                f"init_from {source!r} is a width {theirs['width']}, depth {theirs['depth']} network; this run trains "
                f"width {mine['width']}, depth {mine['depth']}: use the same --width and --depth"
            )
        self.geometry.check_compatible(model.geometry, aberration_atol=float("inf"), what="init_from model")
        load_widened(self.network, model.network.state_dict())

    def loss_mask(self, inputs: torch.Tensor) -> torch.Tensor:
        """The illuminated mask(s) the loss is taken over: the geometry's, or one per sample when conditioned."""
        if not self.stream.conditioned:
            return self.mask
        return conditioning_mask(inputs, self.geometry.mask_threshold)

    # ------------------------------------------------------------------ validation
    def validation_set(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The fixed validation samples (inputs, targets), drawn from a worker id no training run uses."""
        if self._validation is None:
            config, seed = self.config.stream, self.config.seed
            stream = TrainingStream(self.geometry, config, seed=seed, worker=VALIDATION_WORKER, device=str(self.device))
            xs, ys, index = [], [], 0
            while sum(len(x) for x in xs) < self.config.val_size:
                x, y = stream.batch(index)
                xs.append(x)
                ys.append(y)
                index += 1
            self._validation = (torch.cat(xs)[: self.config.val_size], torch.cat(ys)[: self.config.val_size])
        return self._validation

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Masked L1 (rad) and mean per-patch correlation on the validation set."""
        x, y = self.validation_set()
        self.network.eval()
        predictions = []
        for start in range(0, len(x), 256):
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self._use_bf16):
                predictions.append(
                    self.network(x[start : start + 256].contiguous(memory_format=torch.channels_last)).float()
                )
        self.network.train()
        p = torch.cat(predictions)
        mask = self.loss_mask(x)
        return {
            "val_l1": float(masked_l1(p, y, mask)),
            "val_corr": float(masked_correlation(p, y, mask).mean()),
            "val_l1_zero": float(masked_l1(torch.zeros_like(y), y, mask)),
        }

    @property
    def _use_bf16(self) -> bool:
        return bool(self.config.bf16 and bf16_supported(self.device))

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, path: str | Path | None = None) -> Path:
        """Write weights, optimiser, RNG state, step and history atomically (moments in bfloat16 if portable)."""
        path = Path(path or self.checkpoint)
        optimizer = self.optimizer.state_dict()
        if self.portable_checkpoint:
            optimizer["state"] = {
                i: {k: v.to(torch.bfloat16) if v.is_floating_point() and v.ndim else v for k, v in state.items()}
                for i, state in optimizer["state"].items()
            }
        payload = {
            "format": CHECKPOINT_FORMAT,
            "config": json.dumps(self.config.to_dict()),
            "geometry": json.dumps(self.geometry.to_dict()),
            "step": self.step,
            "elapsed": self.elapsed,
            "history": json.dumps(self.history),
            "network": self.network.state_dict(),
            "optimizer": optimizer,
            "portable": self.portable_checkpoint,
            "rng": torch.get_rng_state(),
        }
        if self.geometry.vacuum_probe_intensity is not None:  # the checkpoint alone rebuilds the geometry
            payload["vacuum_probe_intensity"] = torch.as_tensor(self.geometry.vacuum_probe_intensity)
        with atomic_path(path) as tmp, open(tmp, "wb") as f:  # a file object: a full disk raises OSError (errno)
            torch.save(payload, f)
        return path

    def _load_checkpoint(self, payload: dict[str, Any]) -> None:
        saved = _saved_config(payload)
        mine = json.loads(json.dumps(self.config.to_dict()))
        # the budget and the schedule's length may change between runs; everything else must match
        different = [k for k in mine if k not in ("max_minutes", "steps", "init_from") and saved.get(k) != mine[k]]
        if different:
            raise ValueError(
                f"checkpoint {str(self.checkpoint)!r} was made with other settings ({', '.join(different)}); "
                "resume with the same settings or start a new checkpoint file"
            )
        if json.loads(payload["geometry"]) != json.loads(json.dumps(self.geometry.to_dict())):
            raise ValueError(f"checkpoint {str(self.checkpoint)!r} was made for another geometry")
        saved_vacuum = payload.get("vacuum_probe_intensity")
        if saved_vacuum is not None and not np.allclose(saved_vacuum.numpy(), self.geometry.vacuum_probe_intensity):
            raise ValueError(
                f"checkpoint {str(self.checkpoint)!r} was made with another vacuum pattern; resume with the same "
                "--vacuum-probe or start a new checkpoint file"
            )
        if self.config.steps < int(payload["step"]):  # equal: exported as it is
            step = int(payload["step"])
            raise ValueError(
                f"checkpoint {str(self.checkpoint)!r} is at step {step}, beyond steps = {self.config.steps}: a run "
                f"cannot be shortened; pass steps >= {step} (= {step} exports it as it is) or start a new checkpoint"
            )
        self.network.load_state_dict(payload["network"])
        self.optimizer.load_state_dict(payload["optimizer"])  # casts bfloat16 moments back to the weights' dtype
        self.portable_checkpoint = self.portable_checkpoint or bool(payload.get("portable", False))
        torch.set_rng_state(payload["rng"])
        self.step = int(payload["step"])
        self.elapsed = float(payload["elapsed"])
        self.history = json.loads(payload["history"])

    # ------------------------------------------------------------------ the loop
    def train(self, progress: bool = True, until: int | None = None) -> list[dict[str, float]]:
        """Run until ``config.steps`` (or step ``until``, or ``config.max_minutes``); returns the history.

        The history has one entry per validation; a checkpoint is written at the end of the run.
        """
        config = self.config
        budget = None if config.max_minutes is None else config.max_minutes * 60
        start_time = time.perf_counter() - self.elapsed
        self.network.train()
        running, seen = 0.0, 0
        bar = tqdm(total=config.steps, initial=self.step, desc="training", unit="step", disable=not progress)
        last_step = config.steps if until is None else min(int(until), config.steps)
        while self.step < last_step:
            for group in self.optimizer.param_groups:
                group["lr"] = config.learning_rate(self.step, self.elapsed)
            first = config.in_l1_stage(self.step, self.elapsed)
            x, y = (self.l1_stream if first else self.stream).batch(self.step)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self._use_bf16):
                prediction = self.network(x.contiguous(memory_format=torch.channels_last))
            loss = masked_l1(prediction.float(), y, self.loss_mask(x), relative=config.loss == "relative" and not first)
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"training loss became {loss.detach().item()} at step {self.step}; lower the learning rate"
                )
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.step += 1
            running += loss.detach().item()
            seen += 1
            bar.update(1)
            self.elapsed = time.perf_counter() - start_time
            out_of_time = budget is not None and self.elapsed >= budget
            if self.step % config.val_every == 0 or self.step == config.steps or out_of_time:
                record = {
                    "step": self.step,
                    "samples": self.step * config.stream.batch_size,
                    "minutes": self.elapsed / 60,
                    "lr": self.optimizer.param_groups[0]["lr"],
                    "train_l1": running / max(seen, 1),
                    "loss": "l1" if first else config.loss,  # the training loss of these steps
                    **self.validate(),
                }
                self.history.append(record)
                running, seen = 0.0, 0
                bar.set_postfix(train=f"{record['train_l1']:.4f}", val=f"{record['val_l1']:.4f}")
            if self.checkpoint is not None and (
                self.step % config.checkpoint_every == 0 or self.step == last_step or out_of_time
            ):
                self.save_checkpoint()
            if out_of_time:
                break
        bar.close()
        return self.history

    def export(self, name: str = "unnamed", description: str = "") -> DeepCDIModel:
        """The trained network as a :class:`DeepCDIModel` with its metadata (training set, length, validation)."""
        last = self.history[-1] if self.history else self.validate()
        network = ResUNet(**self.network.config())
        network.load_state_dict({k: v.cpu() for k, v in self.network.state_dict().items()})
        metadata = {
            "name": name,
            "description": description,
            "training_set": {  # the ranges the network was trained for, read back by DeepCDIModel
                **dataclasses.asdict(self.config.stream),
                "semiangle_cutoff_mrad": self.geometry.semiangle_cutoff,
                "aperture": "measured vacuum pattern" if self.geometry.vacuum_probe_intensity is not None else
                f"modelled ({self.geometry.rolloff:g} mrad roll-off)",
                "sources": "photos (scikit-image) + lattices + filtered noise",
            },
            "training": {
                "steps": self.step,
                "samples": self.step * self.config.stream.batch_size,
                "minutes": self.elapsed / 60,
                "optimizer": self.config.optimizer,
                "lr": self.config.lr,
                "lr_final": self.config.lr_final,
                "seed": self.config.seed,
                "parameters": count_parameters(network),
                "val_l1": last["val_l1"],
                "val_corr": last["val_corr"],
                "val_l1_zero": last["val_l1_zero"],
                "loss": self.config.loss,
                "l1_stage": self.config.l1_stage,
                "bf16": self._use_bf16,
            },
        }
        if self.config.init_from:
            metadata["training"]["init_from"] = _lineage(self.config.init_from)
            metadata["training"]["total_samples"] = metadata["training"]["samples"] + metadata["training"][
                "init_from"
            ].get("total_samples", 0)
        return DeepCDIModel(network.eval(), self.geometry, metadata)


def _lineage(source: str) -> dict[str, Any]:
    """What a warm start started from: the model's name and training record (its own lineage included), so that a
    fine-tuned model carries its whole training cost; just the source if it can no longer be read."""
    try:
        metadata = as_model(source).metadata
    except (OSError, ValueError):
        return {"source": str(source)}
    training = metadata.get("training", {})
    return {
        "source": str(source),
        "name": metadata.get("name"),
        "training": training,
        "total_samples": training.get("total_samples", training.get("samples", 0)),
    }


def plot_history(history: list[dict[str, float]], path: str | Path | None = None, loss: str = "l1"):
    """Loss-history figure: training loss and validation masked L1 (rad), and validation correlation, vs samples.

    ``loss`` is the training loss (:class:`TrainConfig`) of records that do not name theirs: the relative loss has no
    unit and gets its own (right-hand) axis, the L1 (in rad, as the validation L1) the left one; a run with an
    ``l1_stage`` has both."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5))
    samples = [h["samples"] for h in history]
    kinds = [h.get("loss", loss) for h in history]
    relative_axis = ax1.twinx() if "relative" in kinds else None
    for kind, axis, label in (("l1", ax1, "training"), ("relative", relative_axis, "training (relative L1)")):
        points = [(n, h["train_l1"]) for n, h, k in zip(samples, history, kinds) if k == kind]
        if points:
            axis.semilogy(*zip(*points), color="C0" if kind == "l1" else "C2", label=label)
    ax1.semilogy(samples, [h["val_l1"] for h in history], color="C1", label="validation")
    if history:
        ax1.axhline(history[-1]["val_l1_zero"], color="grey", ls=":", label="predict zero")
    ax1.set_xlabel("samples")
    ax1.set_ylabel("masked L1 (rad)")
    if relative_axis is not None:
        relative_axis.set_ylabel("training relative L1")
        fig.legend(loc="upper right", bbox_to_anchor=(0.45, 0.88))
    else:
        ax1.legend()
    ax2.plot(samples, [h["val_corr"] for h in history])
    ax2.set_xlabel("samples")
    ax2.set_ylabel("validation correlation per patch")
    for ax in (ax1, ax2):
        ax.ticklabel_format(axis="x", style="sci", scilimits=(0, 0))
    fig.tight_layout()
    if path is not None:
        save_figure(fig, path)
    return fig
