"""Benchmark: how deep CDI's time scales with the number of probe positions and with the batch size.

1. Positions: simulated n × n scans (``--sizes``), each reconstructed as a whole (preprocess + inference +
   stitching, timed per stage, best of ``--repeat``); a least-squares line ``t = a + b·J`` over the J positions is
   fitted to the total and the script reports ``b`` (ms/position), ``a`` (s), R² and the largest relative residual
   of the larger half of the scans, and whether the cost is linear (R² ≥ 0.99 and those residuals ≤ 15 %).
2. Batch size: the inference of one preprocessed ``--batch-scan`` × ``--batch-scan`` scan at every
   ``--batch-sizes`` value (patterns/s).

    python bench/scaling.py --threads 2 --model runs/hbn-300kv-17mrad.pt
    python bench/scaling.py --sizes 8 16 24 --batch-sizes 64 256 --batch-scan 16 --threads 1 --model untrained
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[16, 32, 64, 128], help="scan sizes n (n × n)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 256, 1024, 4096], help="batch sizes to time")
    parser.add_argument("--batch-scan", type=int, default=64, help="scan size n of the batch-size sweep")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads")
    parser.add_argument("--model", default=None, help="model file or shipped name; 'untrained' = tiny random network")
    parser.add_argument("--precision", default="bf16", choices=("bf16", "fp32"))
    parser.add_argument("--batch-size", type=int, default=1024, help="batch size of the positions sweep")
    parser.add_argument("--step", type=float, default=0.25, help="scan step (Å)")
    parser.add_argument("--electrons", type=float, default=1e5, help="electrons per pattern")
    parser.add_argument("--repeat", type=int, default=1, help="runs per point (the best is kept)")
    return parser.parse_args(argv)


def linear_fit(x, y) -> dict:
    """Least-squares line y = a + b·x with R² and the largest |residual| / y."""
    import numpy as np  # noqa: PLC0415

    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    design = np.stack([np.ones_like(x), x], -1)
    (a, b), *_ = np.linalg.lstsq(design, y, rcond=None)
    residual = y - (a + b * x)
    total = ((y - y.mean()) ** 2).sum()
    r2 = 1.0 - (residual**2).sum() / total if total > 0 else float("nan")
    upper = x >= np.median(x)  # small scans are dominated by fixed costs and timing noise
    return {
        "a": float(a),
        "b": float(b),
        "r2": float(r2),
        "max_rel_residual": float(np.max(np.abs(residual[upper]) / y[upper])),
    }


def run(args: argparse.Namespace) -> None:
    import numpy as np  # noqa: PLC0415
    import torch  # noqa: PLC0415

    torch.set_num_threads(args.threads)
    from compare import load_model, machine_description  # noqa: PLC0415

    from py4dstem_deepcdi import DeepCDIReconstruction, simulate_dataset  # noqa: PLC0415

    model, label = load_model(args.model)
    geometry = model.geometry
    print(f"machine: {machine_description(args.threads)}")
    print(f"model: {label} ({geometry!r}); {args.precision}; {args.electrons:.3g} e⁻/pattern, step {args.step} Å")

    def reconstruction(n: int):
        ds = simulate_dataset(geometry, scan_shape=(n, n), scan_step=args.step, electrons=args.electrons, seed=n)
        return DeepCDIReconstruction(
            ds.datacube, geometry.energy, geometry.semiangle_cutoff, polar_parameters=geometry.aberrations,
            model=model, rotation_deg=0.0, transpose=False, verbose=False,
        )

    warm_up = reconstruction(8).preprocess()
    warm_up.reconstruct(batch_size=args.batch_size, precision=args.precision, progress=False)

    print("\n| scan | positions | preprocess (s) | inference (s) | stitching (s) | total (s) | ms/position |")
    print("|---|---|---|---|---|---|---|")
    counts, totals = [], []
    for n in args.sizes:
        recon = reconstruction(n)
        best = None
        for _ in range(max(args.repeat, 1)):
            start = time.perf_counter()
            recon.preprocess().reconstruct(batch_size=args.batch_size, precision=args.precision, progress=False)
            total = time.perf_counter() - start
            if best is None or total < best[0]:
                best = (total, dict(recon.timings))
        total, t = best
        counts.append(n * n)
        totals.append(total)
        print(f"| {n}×{n} | {n * n} | {t['preprocess_s']:.3f} | {t['inference_s']:.3f} | {t['stitching_s']:.3f} "
              f"| {total:.3f} | {1e3 * total / (n * n):.3f} |", flush=True)
        del recon
    if len(counts) >= 2:
        fit = linear_fit(counts, totals)
        linear = fit["r2"] >= 0.99 and fit["max_rel_residual"] <= 0.15
        print(f"\nlinear fit t = a + b·J: b = {1e3 * fit['b']:.3f} ms/position ({1 / fit['b']:.0f} positions/s), "
              f"a = {fit['a']:.3f} s, R² = {fit['r2']:.4f}, "
              f"largest residual (larger half) {100 * fit['max_rel_residual']:.1f} % "
              f"→ {'linear' if linear else 'NOT linear (check the residuals: a fixed cost or a super-linear stage)'}")
        extrapolated = fit["a"] + fit["b"] * 256 * 256
        print(f"extrapolated 256×256 (65,536 positions): {extrapolated:.1f} s")

    n = args.batch_scan
    print(f"\nbatch size sweep ({n}×{n} = {n * n} patterns, inference only):")
    print("| batch size | inference (s) | patterns/s |")
    print("|---|---|---|")
    recon = reconstruction(args.batch_scan).preprocess()
    for batch in args.batch_sizes:
        best = np.inf
        for _ in range(max(args.repeat, 1)):
            recon.reconstruct(batch_size=batch, precision=args.precision, progress=False)
            best = min(best, recon.timings["inference_s"])
        print(f"| {batch} | {best:.3f} | {args.batch_scan ** 2 / best:.0f} |", flush=True)


def main(argv=None) -> None:
    args = parse_args(argv)
    for variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[variable] = str(args.threads)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    run(args)


if __name__ == "__main__":
    main()
