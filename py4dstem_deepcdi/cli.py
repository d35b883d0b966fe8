"""The ``deepcdi`` command line."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
import types
import typing
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import py4DSTEM
import torch

from .backend import torch_device
from .comparison import compare_with_epie
from .io import atomic_path, check_outputs, check_writable, read_result, save_json, terminate_raises, to_json
from .models import as_model, list_pretrained, load_model
from .preprocessing import resample_vacuum
from .probe import POLAR_NAMES, AberrationRanges, ProbeGeometry
from .probe_recovery import METHODS, SEARCHABLE, EPIESearchOptions, RecoveryOptions, recover_probe
from .reconstruction import DeepCDIReconstruction, read_reconstruction
from .runtimes import DEFAULT_PRECISIONS, RUNTIMES
from .simulation import attach_truth, simulate_dataset
from .stitching import StitchOptions
from .stream import StreamConfig
from .training import TrainConfig, Trainer, plot_history


# ------------------------------------------------------------------------------- options from dataclasses
def _field_default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory()


def _not_optional(hint):
    """A field annotation without its ``| None``: ``tuple[float, float] | None`` → ``tuple[float, float]``."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 1:
        return args[0]
    return hint


#: RecoveryOptions set elsewhere on the command line (--precision) or only from Python (ranges, search)
RECOVERY_NOT_ON_CLI = ("ranges", "search", "precision")


def _dest(cls, name: str) -> str:
    """The namespace attribute of a dataclass field's flag (prefixed: two classes may share a field name)."""
    return f"{cls.__name__}.{name}"


def add_options(parser, cls, exclude: Iterable[str] = ()) -> None:
    """Add one command-line flag per field of the dataclass ``cls`` that carries a ``help`` in its metadata.

    The default, the type and the choices come from the field (written once, in the dataclass); the flag is
    ``--field-name`` unless the metadata names another (``flag``); ``negate`` names a store-false flag for a
    boolean field; tuples take as many values as their default (``metavar``), dicts one value per key.
    """
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if "help" not in meta or f.name in exclude:
            continue
        if "negate" in meta:
            parser.add_argument(meta["negate"], action="store_false", dest=_dest(cls, f.name), help=meta["help"])
            continue
        default = _field_default(f)
        hint = _not_optional(hints[f.name])
        kind = typing.get_origin(hint) or hint
        kwargs = {"dest": _dest(cls, f.name), "default": default, "help": f"{meta['help']} (default: %(default)s)"}
        flag = meta.get("flag", "--" + f.name.replace("_", "-"))
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif kind is tuple:
            item = typing.get_args(hint)
            kwargs.update(nargs=len(item), type=item[0], metavar=meta.get("metavar", ("MIN", "MAX")))
        elif kind is dict:
            kwargs.update(nargs=len(default), type=float, metavar=tuple(k.upper() for k in default))
            kwargs["default"] = tuple(default.values())
        else:
            metavar = None if "choices" in meta else meta.get("metavar", f.name.upper())
            kwargs.update(type=kind, choices=meta.get("choices"), metavar=metavar)
        parser.add_argument(flag, **kwargs)


def options_from_args(cls, args: argparse.Namespace, exclude: Iterable[str] = ()) -> dict:
    """The keyword arguments of ``cls`` that :func:`add_options` parsed into ``args``."""
    out = {}
    for f in dataclasses.fields(cls):
        if "help" not in f.metadata or f.name in exclude or not hasattr(args, _dest(cls, f.name)):
            continue
        value = getattr(args, _dest(cls, f.name))
        default = _field_default(f)
        if isinstance(default, dict):
            value = dict(zip(default, value))
        elif isinstance(value, list):
            value = tuple(value)
        out[f.name] = value
    return out


def _add_geometry_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("geometry (defaults: the shipped hBN model, 300 keV, 17.1 mrad, 32×32)")
    g.add_argument("--energy", type=float, default=300e3, help="beam energy (eV)")
    g.add_argument("--semiangle", type=float, default=17.1, help="convergence semi-angle (mrad)")
    g.add_argument(
        "--detector", type=int, nargs=2, default=(32, 32), metavar=("QX", "QY"), help="pattern shape (pixels)"
    )
    g.add_argument("--angular-sampling", type=float, default=2.0, help="detector pixel size (mrad)")
    g.add_argument("--rolloff", type=float, default=2.0, help="aperture edge taper (mrad), 0 = sharp")
    g.add_argument("--mask-threshold", type=float, default=0.1, help="illuminated mask: |P|² > t·max|P|²")
    g.add_argument("--vacuum-probe", type=Path, default=None, help="measured vacuum pattern (.npy) used as aperture")
    g.add_argument(
        "--vacuum-sampling",
        type=float,
        default=None,
        help="pixel size of the vacuum pattern (mrad): resample it onto the model's detector",
    )
    for name in POLAR_NAMES:
        unit = "rad" if name.startswith("phi") else "Å"
        g.add_argument(f"--{name}", type=float, default=-100.0 if name == "C10" else 0.0, help=f"{name} ({unit})")


def geometry_from_args(args: argparse.Namespace):
    """Build the ProbeGeometry described by the geometry arguments."""
    geometry = ProbeGeometry(
        energy=args.energy,
        semiangle_cutoff=args.semiangle,
        detector_shape=tuple(args.detector),
        angular_sampling=args.angular_sampling,
        aberrations={name: getattr(args, name) for name in POLAR_NAMES},
        rolloff=args.rolloff,
        mask_threshold=args.mask_threshold,
    )
    if not args.vacuum_probe:
        return geometry
    vacuum = np.load(args.vacuum_probe)
    if args.vacuum_sampling is not None:
        vacuum = resample_vacuum(vacuum, args.vacuum_sampling, geometry)
    return geometry.replace(vacuum_probe_intensity=vacuum)


# ------------------------------------------------------------------------------- checks before any computation
def _require(ok: bool, flag: str, value, allowed: str) -> None:
    """``ValueError`` naming the flag, its value and what it may be unless ``ok``."""
    if not ok:
        raise ValueError(f"{flag} must be {allowed}, got {value!r}")


def _positive(value: float | None) -> bool:
    """None (not given) or a positive finite number."""
    return value is None or (math.isfinite(value) and value > 0)


def check_common_arguments(args: argparse.Namespace) -> None:
    """``ValueError`` for a --threads below 0 or a --device that does not exist, before anything is computed."""
    _require(getattr(args, "threads", 0) >= 0, "--threads", getattr(args, "threads", 0), ">= 0 (0: torch's default)")
    if hasattr(args, "device"):
        torch_device(args.device)


def _model_input(model) -> Path | None:
    """The model file a --model/--init-from value names (None for a shipped model's name or none)."""
    return Path(model) if model is not None and Path(model).is_file() else None


def cmd_train(args: argparse.Namespace) -> int:
    check_common_arguments(args)
    checkpoint = args.checkpoint or args.output.with_suffix(".ckpt")
    outputs = {"--output": args.output, "history": args.output.with_suffix(".history.json"),
               "history figure": args.output.with_suffix(".history.png")}
    inputs = {"--init-from": _model_input(getattr(args, _dest(TrainConfig, "init_from"))),
              "--vacuum-probe": args.vacuum_probe, "--checkpoint": checkpoint}
    check_outputs(outputs, inputs, overwrite=args.overwrite)
    check_writable(checkpoint)  # resumed if it exists, written either way
    _threads(args)
    geometry = geometry_from_args(args)
    stream = StreamConfig(
        **options_from_args(StreamConfig, args, exclude=("aberration_ranges",)),
        aberration_ranges=AberrationRanges(**options_from_args(AberrationRanges, args))
        if args.condition_probe
        else None,
    )
    config = TrainConfig(**options_from_args(TrainConfig, args), stream=stream)
    trainer = Trainer(geometry, config, checkpoint=checkpoint, device=args.device, portable_checkpoint=args.portable)
    if trainer.step >= config.steps:
        print(f"{checkpoint} is already at step {trainer.step} = --steps: exported as it is", file=sys.stderr)
    elif trainer.step:
        print(f"resuming from {checkpoint} at step {trainer.step}", file=sys.stderr)
    history = trainer.train(progress=not args.quiet)
    model = trainer.export(name=args.name, description=args.description)
    model.save(args.output, half_precision=args.half, overwrite=args.overwrite)
    if history:
        plot_history(history, args.output.with_suffix(".history.png"), loss=config.loss)
    save_json(args.output.with_suffix(".history.json"), history)
    last = model.metadata["training"]
    print(
        f"step {trainer.step}/{config.steps}: {last['samples']} samples in {last['minutes']:.1f} min, "
        f"validation masked L1 {last['val_l1']:.4f} rad (predicting zero: {last['val_l1_zero']:.4f}), "
        f"correlation {last['val_corr']:.3f}; model written to {args.output}"
    )
    return 0


def _threads(args: argparse.Namespace) -> None:
    """Set torch's CPU threads from --threads (0: leave torch's default)."""
    if getattr(args, "threads", 0):
        torch.set_num_threads(args.threads)


def _read_datacube(path: Path):
    """The DataCube stored in an EMD file (the root or the first DataCube in its tree), with its ground truth if any."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        root = py4DSTEM.read(str(path))
    except Exception as exc:
        raise ValueError(f"{path} is not a readable EMD/py4DSTEM file: {exc}") from exc
    if not isinstance(root, py4DSTEM.DataCube):
        raise ValueError(f"{path} holds a {type(root).__name__}, not a DataCube")
    truth = root.tree("ground_truth_phase") if "ground_truth_phase" in root.treekeys else None
    return root, truth


def cmd_simulate(args: argparse.Namespace) -> int:
    _threads(args)
    if args.output.exists() and not args.overwrite:
        raise FileExistsError(f"{args.output} exists; pass --overwrite to replace it")
    geometry = geometry_from_args(args)
    ds = simulate_dataset(
        geometry,
        scan_shape=tuple(args.scan),
        scan_step=args.step,
        dose=args.dose,
        rotation_deg=args.rotation,
        seed=args.seed,
    )
    attach_truth(ds.datacube, ds)  # its own calibration (object pixel, Å) and probe positions, not the scan step's
    with atomic_path(args.output) as tmp:
        py4DSTEM.save(str(tmp), ds.datacube, mode="w")
    print(
        f"simulated {args.scan[0]}×{args.scan[1]} patterns ({ds.electrons_per_pattern:.3g} "
        f"e⁻/pattern, step {args.step} Å, "
        f"rotation {args.rotation}°) over a lattice with ground truth; written to {args.output}"
    )
    return 0


def _add_data_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments that describe an experimental dataset and the model applied to it."""
    p.add_argument("input", type=Path, help="EMD/py4DSTEM file holding a calibrated DataCube")
    p.add_argument("--energy", type=float, required=True, help="beam energy (eV)")
    p.add_argument("--semiangle", type=float, required=True, help="convergence semi-angle (mrad)")
    for name in POLAR_NAMES:
        p.add_argument(
            f"--{name}", type=float, default=None, help=f"{name} ({'rad' if name.startswith('phi') else 'Å'})"
        )
    p.add_argument("--model", default=None, help="model file (.pt) or shipped model name (default: the shipped one)")
    p.add_argument("--step", type=float, default=None, help="scan step (Å), if the file lacks the calibration")
    p.add_argument("--angular-sampling", type=float, default=None, help="detector pixel (mrad), if the file lacks it")
    p.add_argument("--rotation", type=float, default=None, help="scan rotation (deg); estimated if omitted")
    p.add_argument("--transpose", action=argparse.BooleanOptionalAction, default=None, help="scan transpose")
    p.add_argument("--subsample", type=int, default=1, help="use every n-th scan position")
    p.add_argument(
        "--precision", choices=("bf16", "fp32", "int8"), default=None,
        help="network arithmetic (default bf16; fp32 for --runtime onnxruntime; int8: onnxruntime or openvino)",
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--quiet", action="store_true")


def check_data_arguments(args: argparse.Namespace) -> None:
    """``ValueError`` for a data argument (:func:`_add_data_arguments`) out of its range, before the data are read.

    --energy, --semiangle, --step, --angular-sampling: positive and finite; --rotation and the aberrations: finite;
    --subsample: >= 1; --threads: >= 0; --device: one that exists here.
    """
    check_common_arguments(args)
    for flag, value in (("--energy", args.energy), ("--semiangle", args.semiangle), ("--step", args.step),
                        ("--angular-sampling", args.angular_sampling)):
        _require(_positive(value), flag, value, "a positive finite number")
    for flag, value in [("--rotation", args.rotation), *((f"--{n}", getattr(args, n)) for n in POLAR_NAMES)]:
        _require(value is None or math.isfinite(value), flag, value, "a finite number")
    _require(args.subsample >= 1, "--subsample", args.subsample, ">= 1 (every n-th scan position)")


def _data_outputs(args: argparse.Namespace) -> None:
    """Check the data arguments and the output files of `reconstruct`/`recover-probe` before reading anything."""
    check_data_arguments(args)
    inputs = {"input": args.input, "--model": _model_input(args.model), "--probe": getattr(args, "probe", None)}
    check_outputs({"--output": args.output, "--png": args.png}, inputs, overwrite=args.overwrite)


def _reconstruction_from_args(args: argparse.Namespace, probe=None):
    """The DeepCDIReconstruction (not yet preprocessed) that the data arguments describe."""
    _threads(args)
    datacube, _ = _read_datacube(args.input)
    aberrations = {name: getattr(args, name) for name in POLAR_NAMES if getattr(args, name) is not None}
    return DeepCDIReconstruction(
        datacube, energy=args.energy, semiangle_cutoff=args.semiangle, model=args.model, device=args.device,
        scan_step=args.step, angular_sampling=args.angular_sampling, rotation_deg=args.rotation,
        transpose=args.transpose, subsample=args.subsample, verbose=not args.quiet, probe=probe, **aberrations
    )


def cmd_recover_probe(args: argparse.Namespace) -> int:
    _data_outputs(args)
    epie = args.method == "epie"
    cls = EPIESearchOptions if epie else RecoveryOptions
    settings = options_from_args(cls, args, exclude=RECOVERY_NOT_ON_CLI)
    settings.update({"search": tuple(args.search)} if args.search else {})
    cls(**settings)  # invalid search settings fail here, before the data are read
    model = as_model(args.model)  # epie: its aberrations are the start, its aperture roll-off the default
    given = {**model.geometry.aberrations,
             **{name: getattr(args, name) for name in POLAR_NAMES if getattr(args, name) is not None}}
    if epie:
        _threads(args)
        rolloff = args.rolloff if args.rolloff is not None else model.geometry.rolloff
        result = recover_probe(
            _read_datacube(args.input)[0], initial=given, method="epie", progress=not args.quiet, energy=args.energy,
            semiangle_cutoff=args.semiangle, scan_step=args.step, angular_sampling=args.angular_sampling,
            rotation_deg=args.rotation, transpose=args.transpose, subsample=args.subsample, rolloff=rolloff,
            vacuum_probe_intensity=np.load(args.vacuum_probe) if args.vacuum_probe else None, **settings,
        )  # fmt: skip
    else:
        model.require_conditioned("recover-probe --method overlap")
        args.model = model
        recon = _reconstruction_from_args(args, probe=given)
        result = recover_probe(recon, initial=None if args.random_start else given, method="overlap",
                               precision=args.precision or "bf16", progress=not args.quiet, **settings)
    save_json(args.output, result.to_dict())
    if args.png:
        result.visualize(path=args.png)
    print(result, f"recovered aberrations written to {args.output}; use them with `deepcdi reconstruct ... --probe "
          f"{args.output}`", sep="\n")
    return 0


def _probe_file(path: Path) -> dict:
    """The record `recover-probe` stored (aberrations, which came from the data, their errors)."""
    try:
        record = json.loads(path.read_text())
        dict(record["aberrations"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path} is not a `deepcdi recover-probe` result (JSON with 'aberrations'): {exc}") from exc
    return record


def cmd_reconstruct(args: argparse.Namespace) -> int:
    _data_outputs(args)
    stitching = StitchOptions(**options_from_args(StitchOptions, args))
    fraction = args.stitch_fraction
    _require(fraction is None or 0 < fraction <= 1, "--stitch-fraction", fraction, "in (0, 1] (of the probe intensity)")
    recon = _reconstruction_from_args(args, probe=_probe_file(args.probe) if args.probe else None)
    recon.preprocess().reconstruct(
        precision=args.precision or DEFAULT_PRECISIONS[args.runtime],
        runtime=args.runtime,
        stitching=stitching,
        symmetrize=args.symmetrize,
        stitch_fraction=args.stitch_fraction,
        anchor_ramp=args.anchor_ramp,
    )
    recon.save(args.output, overwrite=args.overwrite)
    if args.png:
        recon.visualize(path=args.png)
    print(f"phase image {recon.object_phase.shape} ({recon.sampling[0]:.4g} Å/pixel) written to {args.output}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    check_common_arguments(args)
    _require(args.scan >= 2, "--scan", args.scan, ">= 2 (positions per side)")
    for flag, value in (("--step", args.step), ("--dose", args.dose)):
        _require(_positive(value), flag, value, "a positive finite number")
    _require(args.epie_iters >= 1, "--epie-iters", args.epie_iters, ">= 1")
    for name in ("demo.h5", "demo.png"):  # overwritten by design
        check_writable(args.out / name)
    _threads(args)
    start = time.perf_counter()
    model = as_model(args.model)
    geometry = model.geometry
    print(f"model: {model!r}")
    ds = simulate_dataset(
        geometry, scan_shape=(args.scan, args.scan), scan_step=args.step, dose=args.dose, seed=args.seed
    )
    print(
        f"simulated {args.scan}×{args.scan} patterns of {geometry.detector_shape[0]}×{geometry.detector_shape[1]} "
        f"pixels over a lattice ({ds.electrons_per_pattern:.3g} e⁻/pattern = {args.dose:.3g} e⁻/Å² × "
        f"{args.step}² Å²)"
    )
    recon = DeepCDIReconstruction(
        ds.datacube, geometry.energy, geometry.semiangle_cutoff, model=model, rotation_deg=0.0, transpose=False,
        **geometry.aberrations
    )
    recon.preprocess().reconstruct()
    comparison = compare_with_epie(recon, num_iter=args.epie_iters, ground_truth=ds)
    args.out.mkdir(parents=True, exist_ok=True)
    emd = comparison.save(args.out / "demo.h5", overwrite=True)
    comparison.visualize(path=args.out / "demo.png")
    print(comparison)
    print(f"wrote {emd} and {args.out / 'demo.png'} in {time.perf_counter() - start:.1f} s")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    if args.path is None:
        models = list_pretrained()
        if not models:
            print("no shipped models")
        for name, info in models.items():
            g, t, ranges = info["geometry"], info["training"], info["aberration_ranges"]
            probe = f"probe-conditioned over {ranges} (Å)" if ranges else f"C10 {g['aberrations']['C10']:g} Å"
            print(
                f"{name}: {g['energy_eV'] / 1e3:g} keV, {g['semiangle_cutoff_mrad']:g} mrad, "
                f"{tuple(g['detector_shape'])} "
                f"pixels of {g['angular_sampling_mrad']:g} mrad, {probe}; "
                f"{t.get('samples', '?')} training samples, validation L1 {t.get('val_l1', float('nan')):.4f} rad"
            )
        return 0
    if args.path.suffix == ".pt":
        model = load_model(args.path)
        print(json.dumps(model.metadata, indent=1))
        return 0
    try:
        phase, metadata, arrays = read_result(args.path)  # a comparison (or a reconstruction of version <= 0.1)
    except ValueError:
        recon = read_reconstruction(args.path)
        arrays = recon.stored_arrays(include_patches=True)
        print(f"{recon!r}; arrays: {', '.join(f'{k} {v.shape}' for k, v in arrays.items())}")
        print(to_json(recon.summary(), indent=1))
        return 0
    print(f"phase image {phase.shape}; arrays: {', '.join(f'{k} {v.shape}' for k, v in arrays.items())}")
    print(json.dumps(metadata, indent=1))
    return 0


def _train_parser(sub) -> None:
    p = sub.add_parser("train", help="train a network for one probe geometry on simulated data (resumable)")
    _add_geometry_arguments(p)
    p.add_argument(
        "--output", type=Path, required=True,
        help="model file to write (.pt), with OUTPUT.history.json/.png; an existing one is kept unless --overwrite",
    )
    p.add_argument(
        "--overwrite", action="store_true", help="replace an existing --output (and its history files)"
    )
    p.add_argument(
        "--checkpoint", type=Path, default=None, help="checkpoint file (default OUTPUT.ckpt); resumes if present"
    )
    add_options(p.add_argument_group("training (TrainConfig)"), TrainConfig)
    add_options(p.add_argument_group("training data (StreamConfig)"), StreamConfig)
    c = p.add_argument_group("probe conditioning (one network for a range of probes, needed by recover-probe)")
    c.add_argument(
        "--condition-probe", action="store_true", help="train a probe-conditioned network over the ranges below"
    )
    add_options(c, AberrationRanges)
    p.add_argument(
        "--portable",
        action="store_true",
        help="checkpoint with bfloat16 optimiser moments (2/3 the size, to commit; resume not bit-exact)",
    )
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    p.add_argument("--device", default="cpu", help="cpu or gpu")
    p.add_argument("--half", action="store_true", help="store weights as float16")
    p.add_argument("--name", default="unnamed", help="model name stored in the file")
    p.add_argument("--description", default="")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_train)


def _simulate_parser(sub) -> None:
    p = sub.add_parser(
        "simulate", help="simulate a calibrated 4D-STEM DataCube (EMD) over a lattice, with ground truth"
    )
    _add_geometry_arguments(p)
    p.add_argument("--output", type=Path, required=True, help="EMD file to write (.h5)")
    p.add_argument("--scan", type=int, nargs=2, default=(32, 32), metavar=("RX", "RY"), help="scan positions")
    p.add_argument("--step", type=float, default=0.25, help="scan step (Å)")
    p.add_argument("--dose", type=float, default=1.6e6, help="dose (e⁻/Å²)")
    p.add_argument("--rotation", type=float, default=0.0, help="scan rotation (deg)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_simulate, rolloff=0.0)  # the shipped model's sharp aperture (its geometry's defaults)


def _reconstruct_parser(sub) -> None:
    p = sub.add_parser("reconstruct", help="reconstruct the phase of an EMD DataCube with a trained model")
    _add_data_arguments(p)
    p.add_argument("--output", type=Path, required=True, help="EMD file for the phase image (.h5)")
    p.add_argument("--probe", type=Path, default=None, help="JSON file of `recover-probe` whose aberrations to use")
    p.add_argument("--runtime", choices=RUNTIMES, default="torch",
                   help="network runtime (onnxruntime, openvino: CPU, pip extras 'onnx', 'openvino')")
    add_options(p.add_argument_group("stitching (StitchOptions)"), StitchOptions)
    p.add_argument(
        "--symmetrize",
        action="store_true",
        help="average each patch over the probe's symmetries (slower, more accurate)",
    )
    p.add_argument(
        "--stitch-fraction",
        type=float,
        default=None,
        help="stitch only the disk of each patch holding this fraction of the probe's intensity "
        "(default: the model's mask)",
    )
    p.add_argument(
        "--anchor-ramp",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="set the image's mean phase gradient from the patterns' centres of mass (zero after disk centring); "
        "--no-anchor-ramp for a field of view with a real net phase gradient (a wedge, an edge)",
    )
    p.add_argument("--png", type=Path, default=None, help="also write a figure")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_reconstruct)


def _recover_probe_parser(sub) -> None:
    p = sub.add_parser("recover-probe", help="find the probe's aberrations from the data (default: py4DSTEM's ePIE)")
    _add_data_arguments(p)
    p.add_argument("--output", type=Path, required=True, help="JSON file: aberrations, which came from the data, "
                   "their error estimates, warnings")
    p.add_argument("--method", choices=METHODS, default=METHODS[0], help="epie: the probe with which py4DSTEM's ePIE "
                   "explains the scan best (start: --C10 ...); overlap: a probe-conditioned --model's search")
    p.add_argument("--search", nargs="+", choices=SEARCHABLE, default=None, help="aberrations searched (with their "
                   "angles); default C10 C12 (epie), all four (overlap)")
    p.add_argument("--vacuum-probe", type=Path, default=None, help="epie: vacuum pattern (.npy, data's detector)")
    p.add_argument("--rolloff", type=float, default=None, help="epie: aperture edge (mrad; default the model's)")
    add_options(p.add_argument_group("epie search (EPIESearchOptions)"), EPIESearchOptions)
    add_options(p.add_argument_group("overlap search (RecoveryOptions)"), RecoveryOptions, exclude=RECOVERY_NOT_ON_CLI)
    p.add_argument("--random-start", action="store_true", help="overlap: start from a random probe")
    p.add_argument("--png", type=Path, default=None, help="also write the figure (probes, search)")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_recover_probe)


def _demo_parser(sub) -> None:
    p = sub.add_parser(
        "demo", help="quick start: simulate a lattice, reconstruct with the shipped model, compare with ePIE"
    )
    p.add_argument(
        "--out", type=Path, default=Path("demo_output"), help="folder for demo.h5 and demo.png (overwritten)"
    )
    p.add_argument("--model", default=None, help="model file or shipped name (default: the shipped model)")
    p.add_argument("--scan", type=int, default=40, help="scan positions per side")
    p.add_argument("--step", type=float, default=0.25, help="scan step (Å)")
    p.add_argument("--dose", type=float, default=1.6e6, help="dose (e⁻/Å²)")
    p.add_argument("--epie-iters", type=int, default=10, help="ePIE iterations for the comparison")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0)
    p.set_defaults(func=cmd_demo)


def _info_parser(sub) -> None:
    p = sub.add_parser("info", help="list shipped models, or describe a model (.pt) or result (.h5) file")
    p.add_argument("path", type=Path, nargs="?", default=None)
    p.set_defaults(func=cmd_info)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deepcdi",
        description="Deep-learning coherent diffractive imaging for 4D-STEM (a py4DSTEM plugin).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub)
    _simulate_parser(sub)
    _reconstruct_parser(sub)
    _recover_probe_parser(sub)
    _demo_parser(sub)
    _info_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one `deepcdi` command; returns the exit status (2 with a one-line message for a refused input, an
    unwritable output or a full disk). SIGTERM ends the command through its ``finally`` clauses (no temporary
    files left, :func:`~py4dstem_deepcdi.io.terminate_raises`) with status 143."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with terminate_raises():
            return args.func(args)
    except (ValueError, OSError, RuntimeError) as exc:
        print(f"deepcdi {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
