"""Deep-CDI image quality against the ground truth on datasets simulated by the package.

    python bench/quality.py [--model NAME_OR_PATH] [--threads 2] [--scan 40]

Cases (issue: the stitched phase must correlate ≥ 0.9 with the truth): a lattice and a random object, integer
and non-integer scan steps in pixels, a rotated scan, scans subsampled every 2nd/3rd/4th position, and doses
10× below and above the nominal one. Prints correlation, RMS, phase scale and FRC(0.143) vs truth, each
with offset removal and with ramp removal.
"""

import argparse
import time

import numpy as np
import torch

from py4dstem_deepcdi.comparison import score_reconstruction
from py4dstem_deepcdi.images import NoiseSource
from py4dstem_deepcdi.models import as_model
from py4dstem_deepcdi.reconstruction import DeepCDIReconstruction
from py4dstem_deepcdi.simulation import simulate_dataset


def random_object(shape, phase_max=0.8, seed=0):
    """A smooth random (non-lattice) phase object (rad)."""
    g = torch.Generator().manual_seed(seed)
    return NoiseSource(beta_range=(2.5, 2.5)).sample(1, shape, (1.0, 1.0), g)[0].numpy() * phase_max


def cases(scan: int, pixel: float, random_seeds=(0,)):
    dose = 1.6e6  # e⁻/Å²: 1e5 electrons per pattern at 0.25 Å steps
    yield "lattice, step 0.25 Å (0.81 px)", dict(scan_shape=(scan, scan), scan_step=0.25, dose=dose), {}
    yield f"lattice, step {pixel:.4f} Å (1 px)", dict(scan_shape=(scan, scan), scan_step=pixel, dose=dose), {}
    yield "lattice, rotated 17°", dict(scan_shape=(scan, scan), scan_step=0.25, dose=dose, rotation_deg=17.0), {}
    for n in (2, 3, 4):
        yield (
            f"lattice, every {n}th position",
            dict(scan_shape=(scan, scan), scan_step=0.25, dose=dose),
            {"subsample": n},
        )
    yield "lattice, dose ÷10", dict(scan_shape=(scan, scan), scan_step=0.25, dose=dose / 10), {}
    yield "lattice, dose ×10", dict(scan_shape=(scan, scan), scan_step=0.25, dose=dose * 10), {}
    for seed in random_seeds:
        yield (
            f"random object {seed}, step 0.25 Å",
            dict(scan_shape=(scan, scan), scan_step=0.25, dose=dose, phase=("random", seed)),
            {},
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model file or shipped name (default: the shipped model)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--scan", type=int, default=40)
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--random-seeds", type=int, nargs="+", default=[0], help="draws of the random object")
    parser.add_argument("--symmetrize", action="store_true", help="average patches over the probe's symmetries")
    parser.add_argument(
        "--stitch-fraction", type=float, default=None, help="stitch the disk holding this fraction of |P|²"
    )
    parser.add_argument("--anchor-ramp", action=argparse.BooleanOptionalAction, default=True,
                        help="anchor the ramp to the patterns' centres of mass (the default)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = as_model(args.model)
    g = model.geometry
    print(f"model {model!r}")
    print("| case | patterns | corr | corr (ramp removed) | RMS (rad) | phase scale | FRC 0.143 (Å) | time (s) |")
    print("|---|---|---|---|---|---|---|---|")
    for label, sim, options in cases(args.scan, g.sampling[0], args.random_seeds):
        if "phase" in sim:
            margin = g.detector_shape[0] + 8
            extent = int(np.ceil(args.scan * sim["scan_step"] / g.sampling[0])) + margin
            sim["phase"] = random_object((extent, extent), seed=sim["phase"][1])
        ds = simulate_dataset(g, seed=1, **sim)
        start = time.perf_counter()
        recon = (
            DeepCDIReconstruction(
                ds.datacube,
                g.energy,
                g.semiangle_cutoff,
                model=model,
                rotation_deg=ds.rotation_deg,
                transpose=False,
                verbose=False,
                **g.aberrations,
                **options,
            )
            .preprocess()
            .reconstruct(
                precision=args.precision,
                symmetrize=args.symmetrize,
                stitch_fraction=args.stitch_fraction,
                anchor_ramp=args.anchor_ramp,
            )
        )
        elapsed = time.perf_counter() - start
        plain = score_reconstruction(recon, ds)
        ramp = score_reconstruction(recon, ds, remove_ramp=True)
        print(
            f"| {label} | {len(recon.patches)} | {plain['correlation']:.3f} | {ramp['correlation']:.3f} | "
            f"{plain['rms_rad']:.3f} | {plain['phase_scale']:.2f} | "
            f"{plain['resolution_A']['0.143']:.2f} | {elapsed:.1f} |"
        )


if __name__ == "__main__":
    main()
