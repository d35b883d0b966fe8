"""Probe recovery on simulated data with known, random aberrations: deep CDI's search vs py4DSTEM's ePIE probe
refinement.

For each seed: draw true aberrations inside the probe-conditioned model's ranges, simulate a scan over a lattice with
that probe, start from the model's reference probe (the "wrong initial probe": defocus known roughly, no other
aberrations), and

- recover the probe with ``recover_probe`` (pairs × iterations × trials as given), time it;
- reconstruct with the true, the initial and the recovered probe; correlation of each image with the ground truth;
- run py4DSTEM's ePIE with probe updates from the initial probe, fit its probe with py4DSTEM's aberration-surface fit
  (``fit_probe_aberrations``), and score its image the same way.

One more row compares the probe-conditioned model with the shipped fixed-probe model on the fixed model's own probe.

    python bench/probe_recovery.py --model runs/hbn-300kv-17mrad-probe.pt --seeds 0 1 2 --threads 2
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from py4dstem_deepcdi.comparison import compare_with_epie, score_reconstruction
from py4dstem_deepcdi.models import as_model
from py4dstem_deepcdi.probe import from_cartesian
from py4dstem_deepcdi.probe_recovery import aberration_errors, fit_probe_aberrations, recover_probe
from py4dstem_deepcdi.reconstruction import DeepCDIReconstruction
from py4dstem_deepcdi.simulation import simulate_dataset


def reconstruct(ds, model, aberrations) -> DeepCDIReconstruction:
    g = model.geometry
    recon = DeepCDIReconstruction(
        ds.datacube, g.energy, g.semiangle_cutoff, model=model, rotation_deg=0.0, transpose=False, verbose=False,
        probe=dict(aberrations),
    )
    return recon.preprocess().reconstruct(progress=False)


def rounded(d: dict) -> dict:
    return {k: round(float(v), 3) for k, v in d.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="probe-conditioned model (file or shipped name)")
    parser.add_argument("--fixed-model", default="hbn-300kv-17mrad", help="fixed-probe model for the comparison row")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--scan", type=int, default=40, help="scan positions per side")
    parser.add_argument("--step", type=float, default=0.25, help="scan step (Å)")
    parser.add_argument("--pairs", type=int, default=100)
    parser.add_argument("--iterations", type=int, default=50)
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--epie-iters", type=int, default=20, help="ePIE iterations with probe updates")
    parser.add_argument("--no-epie", dest="epie", action="store_false")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("runs/probe_recovery.json"))
    parser.add_argument("--png", type=Path, default=None, help="figure of the first seed's search")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model = as_model(args.model)
    model.require_conditioned("bench/probe_recovery.py")
    ranges = model.aberration_ranges
    initial = dict(model.geometry.aberrations)
    rows = []
    for seed in args.seeds:
        truth = from_cartesian(ranges.sample(1, np.random.default_rng(1000 + seed))[0])
        ds = simulate_dataset(model.geometry.replace(aberrations=truth), scan_shape=(args.scan, args.scan),
                              scan_step=args.step, seed=seed)
        start = reconstruct(ds, model, initial)
        found = recover_probe(start, initial=initial, n_pairs=args.pairs, n_iterations=args.iterations,
                              n_trials=args.trials, seed=seed, progress=False)
        if args.png and seed == args.seeds[0]:
            found.visualize(path=args.png)
        row = {
            "seed": seed,
            "truth": rounded(truth),
            "recovered": rounded(found.aberrations),
            "errors_recovered_A": rounded(aberration_errors(found.aberrations, truth)),
            "errors_initial_A": rounded(aberration_errors(initial, truth)),
            "search_s": round(found.time_s, 1),
            "evaluations": found.evaluations,
            "loss_initial": round(found.initial_loss, 4),
            "loss_recovered": round(found.loss, 4),
        }
        for label, ab in (("true", truth), ("initial", initial), ("recovered", found.aberrations)):
            row[f"corr_{label}_probe"] = round(score_reconstruction(reconstruct(ds, model, ab), ds)["correlation"], 4)
        if args.epie:
            t = time.perf_counter()
            comparison = compare_with_epie(start, num_iter=args.epie_iters, fix_probe=False, ground_truth=ds, adf=False,
                                           progress=False)
            fitted = fit_probe_aberrations(comparison.epie.probe, model.geometry)
            row.update({
                "epie_probe_refined": rounded(fitted),
                "errors_epie_A": rounded(aberration_errors(fitted, truth)),
                "corr_epie": round(comparison.vs_truth["epie"]["correlation"], 4),
                "epie_s": round(time.perf_counter() - t, 1),
            })
        rows.append(row)
        print(json.dumps(row))

    fixed = as_model(args.fixed_model)
    ds = simulate_dataset(fixed.geometry, scan_shape=(args.scan, args.scan), scan_step=args.step, seed=99)
    scores = {}
    for key, with_model in (("corr_fixed_model", fixed), ("corr_conditioned_model", model)):
        recon = reconstruct(ds, with_model, fixed.geometry.aberrations)
        scores[key] = round(score_reconstruction(recon, ds)["correlation"], 4)
    same_probe = {"probe": rounded(fixed.geometry.aberrations), **scores}
    print(json.dumps(same_probe))
    summary = {
        "model": model.metadata.get("name"),
        "ranges": ranges.to_dict(),
        "settings": vars(args) | {"out": str(args.out), "png": str(args.png)},
        "rows": rows,
        "fixed_vs_conditioned": same_probe,
    }
    for key in ("errors_recovered_A", "errors_initial_A", "errors_epie_A"):
        if rows and key in rows[0]:
            summary[f"median_abs_{key}"] = {
                name: round(float(np.median([abs(r[key][name]) for r in rows])), 2) for name in rows[0][key]
            }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=1))
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
