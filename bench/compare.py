"""Benchmark: deep CDI against py4DSTEM's ePIE on simulated scans: speed, and quality against the ground truth.

For every scan size ``n`` (n × n positions) the package simulates a dataset with the model's geometry (32×32
patterns, ``--electrons`` e⁻/pattern, ``--step`` Å, a random lattice object), then

* deep CDI: ``DeepCDIReconstruction(...).preprocess().reconstruct()`` timed as a whole (preprocess + inference +
  stitching);
* ePIE: :func:`py4dstem_deepcdi.comparison.run_epie` (py4DSTEM ``SingleslicePtychography``, ``"GD"``,
  ``max_batch_size=1``, fixed probe) for ``--iters`` iterations on the same data, probe and positions, keeping the
  object after every iteration (py4DSTEM's ``store_iterations``, the cheapest per-iteration record: one copy of the
  object per iteration, no restart) to find the iteration at which ePIE reaches deep CDI's correlation with the truth;
* both are scored against the truth on the common field of view by
  :func:`~py4dstem_deepcdi.comparison.compare_with_epie`.

Large scans: ``--epie-iters-large K`` runs only K ePIE iterations for sizes ≥ ``--large-from`` and extrapolates the
time of ``--iters`` iterations linearly (py4DSTEM's cost per iteration is constant); such rows are marked.

    python bench/compare.py --sizes 64 128 256 --iters 50 --threads 2 --model runs/hbn-300kv-17mrad.pt \\
        --epie-iters-large 10 --out docs/benchmarks.md
    python bench/compare.py --sizes 16 32 --iters 5 --threads 1 --model untrained      # smoke test
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
import warnings
from pathlib import Path

THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def limit_threads(argv: list[str]) -> None:
    """Set the BLAS/OpenMP thread limits from ``--threads`` (default 2); they count only before numpy and torch
    are imported, so this runs before the imports below when the file is run as a script."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--threads", type=int, default=2)
    threads = parser.parse_known_args(argv)[0].threads
    for variable in THREAD_VARIABLES:
        os.environ[variable] = str(threads)


if __name__ == "__main__":
    limit_threads(sys.argv[1:])

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import py4DSTEM
import torch

from py4dstem_deepcdi import DeepCDIModel, DeepCDIReconstruction, ResUNet, load_pretrained, simulate_dataset
from py4dstem_deepcdi import load_model as load_file
from py4dstem_deepcdi.comparison import compare_with_epie, run_epie
from py4dstem_deepcdi.probe import ProbeGeometry

MARK_START = "<!-- bench/compare.py: start -->"
MARK_END = "<!-- bench/compare.py: end -->"
DEFAULT_MODEL_FILE = "runs/hbn-300kv-17mrad.pt"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256], help="scan sizes n (n × n positions)")
    parser.add_argument("--iters", type=int, default=50, help="ePIE iterations (default 50)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for torch, numpy and py4DSTEM")
    parser.add_argument("--model", default=None,
                        help=f"model file or shipped model name; 'untrained' = a tiny random network (smoke test); "
                             f"default {DEFAULT_MODEL_FILE} if it exists, else the shipped default")
    parser.add_argument("--step", type=float, default=0.25, help="scan step (Å)")
    parser.add_argument("--electrons", type=float, default=1e5, help="electrons per pattern")
    parser.add_argument("--seed", type=int, default=0, help="seed of the objects, noise and ePIE's pattern order")
    parser.add_argument("--batch-size", type=int, default=1024, help="deep-CDI patterns per network pass")
    parser.add_argument("--precision", default="bf16", choices=("bf16", "fp32"), help="deep-CDI network arithmetic")
    parser.add_argument("--step-size", type=float, default=0.5, help="ePIE step size")
    parser.add_argument("--epie-iters-large", type=int, default=None,
                        help="for sizes >= --large-from run only this many ePIE iterations and extrapolate the time")
    parser.add_argument("--large-from", type=int, default=256, help="smallest size that counts as large")
    parser.add_argument("--remove-ramp", action="store_true", help="also remove a linear phase ramp before scoring")
    parser.add_argument("--figures", type=Path, default=None, help="folder for one comparison figure per size")
    parser.add_argument("--out", type=Path, default=None,
                        help="markdown file (e.g. docs/benchmarks.md) to write the section into (between markers)")
    return parser.parse_args(argv)


def machine_description(threads: int) -> str:
    """CPU model, cores, threads used and library versions."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return (
        f"{cpu}, {os.cpu_count()} logical CPUs, {threads} thread(s) used; Python {platform.python_version()}, "
        f"torch {torch.__version__}, numpy {np.__version__}, py4DSTEM {py4DSTEM.__version__}"
    )


def load_model(name: str | None):
    """The model to benchmark and its label: 'untrained' (a tiny random network), a model file, a shipped name, or
    (None) runs/hbn-300kv-17mrad.pt if it exists, else the shipped default."""
    if name == "untrained":
        geometry = ProbeGeometry(300e3, 17.1, angular_sampling=2.0, aberrations={"C10": -100.0}, mask_threshold=0.1)
        network = ResUNet(width=0.125, depth=2).eval()
        return DeepCDIModel(network, geometry, {"name": "untrained (smoke test)"}), "untrained tiny network"
    if name is None:
        name = DEFAULT_MODEL_FILE if Path(DEFAULT_MODEL_FILE).is_file() else None
    if name is None:
        return load_pretrained(), "shipped default"
    path = Path(name)
    if path.suffix == ".pt" or path.exists():
        return load_file(path), str(path)
    return load_pretrained(name), f"shipped {name}"


def _fmt_res(value: float, sampling: float) -> str:
    return f"{value:.2f}" if math.isfinite(value) else f"≤{2 * sampling:.2f}"


def _header(args: argparse.Namespace, model_label: str, geometry) -> list[str]:
    """The section's first lines: title, machine, model, data and method settings, the table header."""
    return [
        MARK_START,
        "## Deep CDI vs ePIE (py4DSTEM) on simulated scans",
        "",
        f"- machine: {machine_description(args.threads)}",
        f"- model: {model_label} ({geometry!r})",
        "- data: simulated by `py4dstem_deepcdi.simulate_dataset`, "
        f"{geometry.detector_shape[0]}×{geometry.detector_shape[1]} patterns, {args.electrons:.3g} e⁻/pattern, "
        f"step {args.step} Å, Poisson noise, random lattice object",
        f"- deep CDI: preprocess + inference ({args.precision}, batch {args.batch_size}) + stitching (lsq)",
        f"- ePIE: py4DSTEM SingleslicePtychography GD, max_batch_size=1, step size {args.step_size}, fixed probe, "
        f"{args.iters} iterations (time of `reconstruct` only; its preprocess is listed separately)",
        "- scores on the common field of view after offset removal"
        + (" and linear-ramp removal" if args.remove_ramp else "")
        + "; FRC resolution at 0.143 in Å (≤x: no crossing up to Nyquist)",
        "",
        f"| scan | positions | deep CDI (s) | ePIE {args.iters} it. (s) | ePIE / deep CDI | corr. deep CDI "
        "| corr. ePIE | FRC 0.143 deep CDI (Å) | FRC 0.143 ePIE (Å) | ePIE it. to match "
        "| FRC deep vs ePIE 0.5 / 0.143 (Å) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]


def run(args: argparse.Namespace) -> str:
    """Benchmark every scan size of ``args``; returns the markdown section (between the markers)."""
    torch.set_num_threads(args.threads)
    model, model_label = load_model(args.model)
    geometry = model.geometry
    lines = _header(args, model_label, geometry)
    notes = []
    print("\n".join(lines[1:]), flush=True)
    for n in args.sizes:
        ds = simulate_dataset(geometry, scan_shape=(n, n), scan_step=args.step, electrons=args.electrons,
                              seed=args.seed + n)
        start = time.perf_counter()
        recon = DeepCDIReconstruction(
            ds.datacube, geometry.energy, geometry.semiangle_cutoff, polar_parameters=geometry.aberrations,
            model=model, rotation_deg=0.0, transpose=False, verbose=False,
        )
        recon.preprocess().reconstruct(batch_size=args.batch_size, precision=args.precision, progress=False)
        deep_s = time.perf_counter() - start
        large = args.epie_iters_large is not None and n >= args.large_from
        iters = min(args.epie_iters_large, args.iters) if large else args.iters
        epie = run_epie(recon, num_iter=iters, step_size=args.step_size, store_iterations=True, progress=False,
                        seed=args.seed)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            c = compare_with_epie(recon, epie=epie, ground_truth=ds, remove_ramp=args.remove_ramp,
                                  adf=args.figures is not None, progress=False)
        for w in caught:
            notes.append(f"{n}×{n}: {w.message}")
        epie_s = epie.time_s * args.iters / iters
        extrapolated = iters < args.iters
        s = c.sampling[0]
        deep_t, epie_t = c.vs_truth["deep_cdi"], c.vs_truth["epie"]
        match = c.epie_iterations_to_match
        row = (
            f"| {n}×{n} | {n * n} | {deep_s:.2f} | {'≈' if extrapolated else ''}{epie_s:.1f}"
            f"{f' (from {iters} it.)' if extrapolated else ''} | {'≈' if extrapolated else ''}{epie_s / deep_s:.1f}× "
            f"| {deep_t['correlation']:.3f} "
            f"| {epie_t['correlation']:.3f}{f' (at {iters} it.)' if extrapolated else ''} "
            f"| {_fmt_res(deep_t['resolution_A']['0.143'], s)} | {_fmt_res(epie_t['resolution_A']['0.143'], s)} "
            f"| {match if match is not None else f'>{iters}'} "
            f"| {_fmt_res(c.resolution_A['0.5'], s)} / {_fmt_res(c.resolution_A['0.143'], s)} |"
        )
        lines.append(row)
        print(row, flush=True)
        notes.append(
            f"{n}×{n}: deep CDI preprocess {recon.timings['preprocess_s']:.2f} s, "
            f"inference {recon.timings['inference_s']:.2f} s ({recon.timings['patterns_per_s']:.0f} patterns/s), "
            f"stitching {recon.timings['stitching_s']:.2f} s; ePIE preprocess {epie.preprocess_s:.2f} s, "
            f"{epie.ms_per_position_iteration:.3f} ms/position/iteration; phase scale (1 = right contrast) "
            f"deep CDI {deep_t['phase_scale']:.2f}, ePIE {epie_t['phase_scale']:.2f}; "
            f"common field of view {c.deep_phase.shape[0]}×{c.deep_phase.shape[1]} px"
        )
        if args.figures is not None:
            matplotlib.use("Agg")
            args.figures.mkdir(parents=True, exist_ok=True)
            plt.close(c.visualize(path=args.figures / f"compare_{n}x{n}.png"))
        del recon, ds, epie, c
    if any(args.epie_iters_large is not None and n >= args.large_from for n in args.sizes):
        notes.append(
            f"rows marked ≈ ran {args.epie_iters_large} ePIE iterations; their time is extrapolated linearly to "
            f"{args.iters} iterations and their ePIE correlation is the one after {args.epie_iters_large} iterations"
        )
    lines += ["", "Notes:", *[f"- {note}" for note in notes], MARK_END]
    print("\n".join(lines[-len(notes) - 2 : -1]), flush=True)
    return "\n".join(lines) + "\n"


def write_section(path: Path, section: str) -> None:
    """Put ``section`` into ``path``, replacing an earlier section between the markers (else appending)."""
    text = path.read_text() if path.exists() else ""
    if MARK_START in text and MARK_END in text:
        head, rest = text.split(MARK_START, 1)
        tail = rest.split(MARK_END, 1)[1].lstrip("\n")
        text = head + section + tail
    else:
        text = text + ("\n" if text and not text.endswith("\n") else "") + ("\n" if text else "") + section
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def main(argv=None) -> None:
    args = parse_args(argv)
    section = run(args)
    if args.out is not None:
        write_section(args.out, section)
        print(f"wrote the section into {args.out}")


if __name__ == "__main__":
    main()
