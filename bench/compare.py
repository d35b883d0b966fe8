"""Benchmark: deep CDI against py4DSTEM's ePIE on simulated scans: speed, and quality against the ground truth.

For every scan size ``n`` (n × n positions) the package simulates a dataset with the model's geometry (32×32
patterns, ``--electrons`` e⁻/pattern, ``--step`` Å, a random lattice object), then

* deep CDI: ``DeepCDIReconstruction(...).preprocess().reconstruct()`` timed as a whole (preprocess + inference +
  stitching), with its parts;
* ePIE: :func:`py4dstem_deepcdi.comparison.run_epie` (py4DSTEM ``SingleslicePtychography``, ``"GD"``,
  ``max_batch_size=1``, fixed probe) for ``--iters`` iterations (default 10) on the same data, probe and positions,
  keeping the object after every iteration (py4DSTEM's ``store_iterations``);
* ePIE is reported at the count where it stops improving (``bench/_epie_baseline.py``): of the counts 1, 2, 3, 5, 10
  (those up to ``--iters``, and ``--iters``), the fewest whose correlation with the truth is within
  ``CONVERGED_WITHIN`` (0.005) of the best of them; its image is the object after that iteration, its time the run's
  ``reconstruct`` time × count / iterations run (py4DSTEM's time per iteration is constant; its preprocess is listed
  separately). The speed ratio is that time over deep CDI's whole time; ``≥`` marks ePIE still improving at its
  last count (its converged time is then at least the one shown);
* both are scored against the truth on the common field of view by
  :func:`~py4dstem_deepcdi.comparison.compare_with_epie`.

Large scans: ``--epie-iters-large K`` runs fewer ePIE iterations for sizes ≥ ``--large-from``: the largest of K, 3
and the converged counts of the smaller sizes (at most ``--iters``); such rows say how many ran.

    python bench/compare.py --sizes 64 128 256 --threads 1 --model hbn-300kv-17mrad
    python bench/compare.py --sizes 64 128 256 --threads 2 --model hbn-300kv-17mrad --epie-iters-large 3 \\
        --large-from 256 --out docs/benchmarks.md
    python bench/compare.py --sizes 16 32 --threads 1 --model untrained      # smoke test
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
from _epie_baseline import DEFAULT_ITERATIONS, MIN_ITERATIONS, EPIEBaseline, run_baselines, scored_counts

from py4dstem_deepcdi import DeepCDIModel, DeepCDIReconstruction, ResUNet, load_pretrained, simulate_dataset
from py4dstem_deepcdi import load_model as load_file
from py4dstem_deepcdi.comparison.result import CONVERGED_WITHIN
from py4dstem_deepcdi.probe import ProbeGeometry

MARK_START = "<!-- bench/compare.py: start -->"
MARK_END = "<!-- bench/compare.py: end -->"
DEFAULT_MODEL_FILE = "runs/hbn-300kv-17mrad.pt"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256], help="scan sizes n (n × n positions)")
    parser.add_argument("--iters", type=int, default=DEFAULT_ITERATIONS,
                        help=f"ePIE iterations run (default {DEFAULT_ITERATIONS}); scored at 1, 2, 3, 5, 10 up to it")
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
                        help=f"for sizes >= --large-from run only this many ePIE iterations, but at least "
                             f"{MIN_ITERATIONS} and the converged counts of the smaller sizes")
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
    counts = ", ".join(str(k) for k in scored_counts(args.iters))
    return [
        MARK_START,
        "## Deep CDI vs ePIE (py4DSTEM) on simulated scans",
        "",
        f"- machine: {machine_description(args.threads)}",
        f"- model: {model_label} ({geometry!r})",
        "- data: simulated by `py4dstem_deepcdi.simulate_dataset`, "
        f"{geometry.detector_shape[0]}×{geometry.detector_shape[1]} patterns, {args.electrons:.3g} e⁻/pattern, "
        f"step {args.step} Å, Poisson noise, random lattice object",
        f"- deep CDI: preprocess + inference ({args.precision}, batch {args.batch_size}) + stitching (lsq), timed as "
        "a whole (the parts in brackets)",
        f"- ePIE: py4DSTEM SingleslicePtychography GD, max_batch_size=1, step size {args.step_size}, fixed probe, "
        f"{args.iters} iterations run, the object kept after each; scored at {counts} iterations and reported at its "
        f"converged count: the fewest of those within {CONVERGED_WITHIN} of their best correlation with the truth "
        "(≥: still improving at the last count). Its time at that count = `reconstruct` time × count / iterations "
        "run (constant time per iteration); its preprocess is in the notes, not in the ratio",
        "- ePIE / deep CDI: ePIE's time at its converged count over deep CDI's whole time (< 1: deep CDI slower)",
        "- scores on the common field of view after offset removal"
        + (" and linear-ramp removal" if args.remove_ramp else "")
        + ", ePIE's at its converged count; FRC resolution against the truth at 0.143 in Å (≤x: no crossing up to "
        "Nyquist); phase scale: 1 = right contrast",
        "",
        "| scan | positions | deep CDI (s) (preprocess / inference / stitching) | ePIE converged (it.) "
        "| ePIE at that count (s) | ePIE / deep CDI | corr. deep CDI | corr. ePIE | corr. ePIE at 1 it. "
        "| phase scale deep CDI / ePIE | FRC 0.143 deep CDI / ePIE (Å) | ePIE it. to match deep CDI |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]


def epie_iterations(args: argparse.Namespace, n: int, converged: list[int]) -> int:
    """ePIE iterations to run for size ``n``: ``--iters``, or for a large scan with ``--epie-iters-large`` the largest
    of that, :data:`MIN_ITERATIONS` and the converged counts of the smaller sizes (``converged``), at most
    ``--iters``."""
    if args.epie_iters_large is None or n < args.large_from:
        return args.iters
    return min(args.iters, max(args.epie_iters_large, MIN_ITERATIONS, *converged))


def _row(n: int, deep_s: float, timings: dict[str, float], b: EPIEBaseline, full_iters: int) -> str:
    """The table row of one scan size."""
    c, s = b.comparison, b.comparison.sampling[0]
    deep_t, epie_t = c.vs_truth["deep_cdi"], c.vs_truth["epie"]
    match = b.full.epie_iterations_to_match
    shortened = f", of {b.run} run" if b.run < full_iters else ""
    return (
        f"| {n}×{n} | {n * n} | {deep_s:.2f} ({timings['preprocess_s']:.2f} / {timings['inference_s']:.2f} / "
        f"{timings['stitching_s']:.2f}) | {b.count_text()}{shortened} | {'≥' if b.still_improving else ''}"
        f"{b.seconds:.2f} | {b.ratio_text(deep_s)} | {deep_t['correlation']:.3f} | {epie_t['correlation']:.3f} "
        f"| {b.correlations[1]:.3f} | {deep_t['phase_scale']:.2f} / {epie_t['phase_scale']:.2f} "
        f"| {_fmt_res(deep_t['resolution_A']['0.143'], s)} / {_fmt_res(epie_t['resolution_A']['0.143'], s)} "
        f"| {match if match is not None else f'>{b.run}'} |"
    )


def _note(n: int, recon, b: EPIEBaseline) -> str:
    """The notes line of one scan size: rates, ePIE's preprocess and its correlation at every scored count."""
    c, s = b.comparison, b.comparison.sampling[0]
    by_count = ", ".join(f"{k} it. {v:.3f}" for k, v in b.correlations.items())
    return (
        f"{n}×{n}: deep CDI {recon.timings['patterns_per_s']:.0f} patterns/s; ePIE preprocess "
        f"{b.full.epie.preprocess_s:.2f} s, {b.full.epie.ms_per_position_iteration:.3f} ms/position/iteration, "
        f"{b.full.timings['epie_s']:.1f} s for the {b.run} iterations run; ePIE corr. with the truth by iterations: "
        f"{by_count}; FRC deep CDI vs ePIE at {b.iterations} it. {_fmt_res(c.resolution_A['0.5'], s)} (0.5) / "
        f"{_fmt_res(c.resolution_A['0.143'], s)} (0.143) Å; common field of view "
        f"{c.deep_phase.shape[0]}×{c.deep_phase.shape[1]} px"
    )


def run(args: argparse.Namespace) -> str:
    """Benchmark every scan size of ``args``; returns the markdown section (between the markers)."""
    torch.set_num_threads(args.threads)
    model, model_label = load_model(args.model)
    geometry = model.geometry
    lines = _header(args, model_label, geometry)
    notes, converged = [], []
    print("\n".join(lines[1:]), flush=True)
    for n in sorted(args.sizes):
        ds = simulate_dataset(geometry, scan_shape=(n, n), scan_step=args.step, electrons=args.electrons,
                              seed=args.seed + n)
        start = time.perf_counter()
        recon = DeepCDIReconstruction(
            ds.datacube, geometry.energy, geometry.semiangle_cutoff, polar_parameters=geometry.aberrations,
            model=model, rotation_deg=0.0, transpose=False, verbose=False,
        )
        recon.preprocess().reconstruct(batch_size=args.batch_size, precision=args.precision, progress=False)
        deep_s = time.perf_counter() - start
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            b = run_baselines(recon, ds, num_iter=epie_iterations(args, n, converged), remove_ramp=(args.remove_ramp,),
                              epie_kwargs={"step_size": args.step_size, "seed": args.seed},
                              adf=args.figures is not None)[0]
        notes += sorted({f"{n}×{n}: {w.message}" for w in caught})
        converged.append(b.run if b.still_improving else b.iterations)
        row = _row(n, deep_s, recon.timings, b, args.iters)
        lines.append(row)
        print(row, flush=True)
        notes.append(_note(n, recon, b))
        if args.figures is not None:
            matplotlib.use("Agg")
            args.figures.mkdir(parents=True, exist_ok=True)
            plt.close(b.comparison.visualize(path=args.figures / f"compare_{n}x{n}.png"))
        del recon, ds, b
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
