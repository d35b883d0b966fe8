"""Dose sweep: deep CDI and py4DSTEM's ePIE (at its best iteration count) on the same data thinned to lower doses.

Every dataset is thinned binomially (``dose.thin_counts``: exact Poisson data at the lower dose, same object, probe
and scan) to each dose at or below its own, then reconstructed by deep CDI (one network pass per pattern) and by ePIE
run for each of ``--epie-iters`` iterations (a fixed probe from the dataset's vacuum pattern; each count a separate
run from a blank object with the same seed). ePIE's row is its *best* count: the fewest iterations whose correlation
with the truth is within 0.005 of the highest, with that run's time. Scores: ``comparison.score_reconstruction``
on the common field of view (correlation, RMS after scale and offset, phase scale).

    python bench/dose_sweep.py --data runs/multislice --datasets hbn_monolayer mos2_monolayer srtio3_8A --threads 1
    python bench/dose_sweep.py --simulated --threads 1     # the package's own lattice (no abTEM files needed)
    python bench/dose_sweep.py --no-epie --model runs/dose/hbn-dose.pt    # another model, deep CDI alone

The abTEM files come from ``bench/multislice.py make``; ``--model`` takes a shipped name or a .pt file, and
``--anchor-ramp`` / ``--stitch-fraction`` / ``--symmetrize`` set deep CDI's options.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from py4dstem_deepcdi.comparison import compare_with_epie, score_reconstruction
from py4dstem_deepcdi.dose import thin_counts
from py4dstem_deepcdi.models import as_model
from py4dstem_deepcdi.reconstruction import DeepCDIReconstruction
from py4dstem_deepcdi.scan import calibrated_datacube
from py4dstem_deepcdi.simulation import simulate_dataset

DOSES = (1e2, 3e2, 1e3, 3e3, 1e4, 1e5)
EPIE_ITERATIONS = (1, 2, 3, 5, 10)
BEST_WITHIN = 0.005


def _abtem_cases(data: Path, names: list[str] | None):
    """(name, counts, calibrations, truth, reconstruction keywords) of each abTEM file of ``bench/multislice.py``."""
    for path in sorted(data.glob("*.npz")):
        if names and path.stem not in names:
            continue
        f = np.load(path)
        calibration = (float(f["scan_step_A"]), float(f["angular_sampling_mrad"]))
        truth = (f["truth_phase"], tuple(f["truth_sampling_A"]), f["truth_positions_A"])
        setup = {"energy": float(f["energy_eV"]), "semiangle_cutoff": float(f["semiangle_mrad"]),
                 "C10": float(f["C10_A"]), "vacuum_probe_intensity": f["vacuum"]}
        yield path.stem, f["counts"], calibration, truth, setup


def _simulated_case(model, scan: int):
    """The package's own lattice at 10⁵ e⁻ per pattern, with its truth (the shipped model's geometry)."""
    g = model.geometry
    ds = simulate_dataset(g, scan_shape=(scan, scan), scan_step=0.25, electrons=1e5, seed=0)
    calibration = (0.25, g.angular_sampling)
    setup = {"energy": g.energy, "semiangle_cutoff": g.semiangle_cutoff, **g.aberrations}
    yield "simulated lattice", ds.datacube.data, calibration, ds, setup


def _scores(s: dict) -> dict:
    return {"corr": round(s["correlation"], 4), "rms_rad": round(s["rms_rad"], 4), "scale": round(s["phase_scale"], 3)}


def sweep_one(counts, calibration, truth, setup, model, doses, iterations, options) -> list[dict]:
    """Rows of one dataset: deep CDI and ePIE's best count at every dose at or below the data's own."""
    own = float(counts.sum((-2, -1)).mean())
    rows = []
    for dose in [d for d in doses if d <= own * 1.05]:  # the nominal dose of data that lost a few electrons
        thinned = thin_counts(counts, min(dose / own, 1.0), rng=int(dose))
        datacube = calibrated_datacube(thinned, *calibration)
        recon = DeepCDIReconstruction(datacube, model=model, rotation_deg=0.0, transpose=False, verbose=False, **setup)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the dose warning is the point of the sweep
            t0 = time.perf_counter()
            recon.preprocess().reconstruct(progress=False, **options)
        deep_s = time.perf_counter() - t0
        if not iterations:  # deep CDI alone, on its own field of view
            rows.append({"electrons": dose, "deep_cdi": _scores(score_reconstruction(recon, truth)),
                         "deep_cdi_s": round(deep_s, 2)})
            print(json.dumps(rows[-1]), flush=True)
            continue
        runs = {}
        for k in iterations:
            c = compare_with_epie(recon, num_iter=k, ground_truth=truth, adf=False, progress=False,
                                  epie_kwargs={"vacuum_probe_intensity": setup.get("vacuum_probe_intensity")})
            runs[k] = (c.vs_truth, c.timings["epie_s"])
        best = max(v[0]["epie"]["correlation"] for v in runs.values())
        k_best = min(k for k, v in runs.items() if v[0]["epie"]["correlation"] >= best - BEST_WITHIN)
        vs_truth, epie_s = runs[k_best]
        rows.append({
            "electrons": dose, "deep_cdi": _scores(vs_truth["deep_cdi"]), "deep_cdi_s": round(deep_s, 2),
            "epie": _scores(vs_truth["epie"]), "epie_iterations": k_best, "epie_s": round(epie_s, 2),
            "epie_corr_by_iterations": {k: round(v[0]["epie"]["correlation"], 4) for k, v in runs.items()},
        })
        print(json.dumps(rows[-1]), flush=True)
    return rows


def table(results: dict[str, list[dict]]) -> str:
    lines = [
        "| dataset | e⁻/pattern | deep CDI corr. | RMS (rad) | scale | time (s) | ePIE corr. (iterations) "
        "| RMS (rad) | scale | time (s) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, rows in results.items():
        for r in rows:
            d, e = r["deep_cdi"], r.get("epie")
            if e is None:
                lines.append(f"| {name} | {r['electrons']:.0e} | {d['corr']:.3f} | {d['rms_rad']:.4f} | "
                             f"{d['scale']:.2f} | {r['deep_cdi_s']:.1f} | – | – | – | – |")
                continue
            lines.append(f"| {name} | {r['electrons']:.0e} | {d['corr']:.3f} | {d['rms_rad']:.4f} | {d['scale']:.2f} | "
                         f"{r['deep_cdi_s']:.1f} | {e['corr']:.3f} ({r['epie_iterations']}) | {e['rms_rad']:.4f} | "
                         f"{e['scale']:.2f} | {r['epie_s']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("runs/multislice"), help="bench/multislice.py's files")
    parser.add_argument("--datasets", nargs="*", default=None, help="dataset names (default: every file)")
    parser.add_argument("--simulated", action="store_true", help="the package's own lattice instead of abTEM files")
    parser.add_argument("--scan", type=int, default=32, help="scan positions per side of --simulated")
    parser.add_argument("--model", default="hbn-300kv-17mrad", help="shipped model name or .pt file")
    parser.add_argument("--doses", type=float, nargs="+", default=DOSES, help="electrons per pattern")
    parser.add_argument("--epie-iters", type=int, nargs="+", default=EPIE_ITERATIONS, help="ePIE counts tried")
    parser.add_argument("--no-epie", action="store_true", help="deep CDI alone (scored on its own field of view)")
    parser.add_argument("--anchor-ramp", action=argparse.BooleanOptionalAction, default=True, help="the default")
    parser.add_argument("--stitch-fraction", type=float, default=None)
    parser.add_argument("--symmetrize", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("runs/dose_sweep.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = as_model(args.model)
    options = {"anchor_ramp": args.anchor_ramp, "stitch_fraction": args.stitch_fraction, "symmetrize": args.symmetrize}
    cases = _simulated_case(model, args.scan) if args.simulated else _abtem_cases(args.data, args.datasets)
    results = {}
    for name, counts, calibration, truth, setup in cases:
        print(f"{name}: {counts.shape}, {counts.sum((-2, -1)).mean():.3g} e⁻/pattern", flush=True)
        iterations = () if args.no_epie else args.epie_iters
        results[name] = sweep_one(counts, calibration, truth, setup, model, args.doses, iterations, options)
    if not results:
        raise SystemExit(f"no datasets in {args.data}: make them with bench/multislice.py make, or pass --simulated")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"model": args.model, "options": options, "results": results}, indent=1))
    print(f"model {args.model}, options {options}\n" + table(results))


if __name__ == "__main__":
    main()
