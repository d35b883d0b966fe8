"""Probe recovery from a wrong start: simulated scans with known random aberrations and the abTEM multislice sets.

For every case the start is the true defocus ± 20–40 Å (the sign alternating, the size drawn per case) with no
astigmatism, coma or threefold astigmatism, and

- ``recover_probe`` (default ``method="epie"``: the probe with which py4DSTEM's ePIE explains a central block of the
  scan best, C10 and C12 searched) recovers the probe, timed; its error estimates and warnings are recorded;
- with ``--full-search`` (simulated scans) a second run also searches coma and threefold astigmatism;
- with ``--overlap`` the paper's overlap search with the probe-conditioned model runs from the same start;
- with ``--probe-updates`` py4DSTEM's ePIE with probe updates (``fix_probe=False``) runs on the whole scan and its
  probe is reduced to the 7 parameters by ``fit_aberration_surface`` (aperture from the vacuum pattern if any);
- the scan is reconstructed with the probe-conditioned model with the true and the recovered probe; correlation of
  each image with the ground truth.

Simulated scans: 40×40 at 0.25 Å over random lattices (this package's forward model), truth drawn in the
conditioned model's ranges. abTEM sets (``bench/multislice.py make``): C10 = −100 Å at the potential's entrance
plane; the specimen's atoms lie 2–6 Å below it, which a single-slice probe sees as a defocus smaller by that depth,
so the table gives the error against both the nominal value and the atoms' mid-plane.

    python bench/probe_recovery.py --seeds 0 1 2 --multislice runs/multislice --threads 1 --full-search
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from py4dstem_deepcdi.comparison import run_epie, score_reconstruction
from py4dstem_deepcdi.models import as_model
from py4dstem_deepcdi.probe import ProbeGeometry, from_cartesian
from py4dstem_deepcdi.probe_recovery import aberration_errors, fit_probe_aberrations, recover_probe
from py4dstem_deepcdi.reconstruction import DeepCDIReconstruction
from py4dstem_deepcdi.scan import calibrated_datacube
from py4dstem_deepcdi.simulation import simulate_dataset

#: abTEM sets: depth (Å) of the atoms' mid-plane below the potential's entrance (2 Å vacuum, then the atoms)
ATOM_DEPTH = {"hbn_monolayer": 2.0, "mos2_monolayer": 2.0 + 3.19 / 2, "srtio3_8A": 2.0 + 3 * 3.905 / 4}


def rounded(d: dict, digits: int = 3) -> dict:
    return {k: (None if v is None or not np.isfinite(v) else round(float(v), digits)) for k, v in d.items()}


def start_for(truth: dict, index: int, seed: int) -> dict:
    """The start: the true C10 ± 20–40 Å (sign alternating with ``index``), nothing else."""
    offset = 20 + 20 * np.random.default_rng(500 + seed + 37 * index).random()
    return {"C10": truth["C10"] + (offset if index % 2 == 0 else -offset)}


def simulated_cases(model, seeds: list[int], scan: int, step: float):
    """(name, datacube, calibration keywords, truth, ground truth for scoring) of each simulated seed."""
    for seed in seeds:
        truth = from_cartesian(model.aberration_ranges.sample(1, np.random.default_rng(1000 + seed))[0])
        ds = simulate_dataset(model.geometry.replace(aberrations=truth), scan_shape=(scan, scan), scan_step=step,
                              seed=seed)
        g = model.geometry
        keywords = {"energy": g.energy, "semiangle_cutoff": g.semiangle_cutoff, "rotation_deg": 0.0,
                    "transpose": False, "rolloff": g.rolloff}
        yield f"simulated seed {seed}", ds.datacube, keywords, truth, ds


def multislice_cases(folder: Path, names: list[str]):
    """The same for the abTEM sets (vacuum pattern as the aperture)."""
    for name in names:
        path = folder / f"{name}.npz"
        if not path.is_file():
            print(f"skipping {name}: {path} not found (bench/multislice.py make)")
            continue
        f = np.load(path)
        dc = calibrated_datacube(f["counts"], float(f["scan_step_A"]), float(f["angular_sampling_mrad"]))
        keywords = {"energy": float(f["energy_eV"]), "semiangle_cutoff": float(f["semiangle_mrad"]),
                    "rotation_deg": 0.0, "transpose": False, "vacuum_probe_intensity": f["vacuum"]}
        truth = {"C10": float(f["C10_A"])}
        yield name, dc, keywords, truth, (f["truth_phase"], tuple(f["truth_sampling_A"]), f["truth_positions_A"])


def image_correlation(datacube, keywords: dict, model, aberrations: dict, ground_truth) -> float:
    """Correlation with the ground truth of the conditioned model's image with ``aberrations``."""
    recon = DeepCDIReconstruction(datacube, keywords["energy"], keywords["semiangle_cutoff"], model=model,
                                  rotation_deg=0.0, transpose=False, verbose=False, probe=dict(aberrations))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        recon.preprocess().reconstruct(progress=False)
    return float(score_reconstruction(recon, ground_truth)["correlation"])


def probe_update_fit(datacube, keywords: dict, start: dict, iterations: int) -> tuple[dict, float]:
    """py4DSTEM's ePIE with probe updates on the whole scan from ``start``, its probe fitted; (parameters, s)."""
    array = np.asarray(datacube.data)
    angular = float(datacube.calibration.get_Q_pixel_size())
    geometry = ProbeGeometry(keywords["energy"], keywords["semiangle_cutoff"], detector_shape=array.shape[2:],
                             angular_sampling=angular, aberrations=start, rolloff=keywords.get("rolloff", 0.0))
    t = time.perf_counter()
    result = run_epie(datacube, geometry, num_iter=iterations, fix_probe=False, rotation_deg=0.0, transpose=False,
                      vacuum_probe_intensity=keywords.get("vacuum_probe_intensity"), progress=False,
                      on_divergence="warn")
    fitted = fit_probe_aberrations(result.probe, geometry, aperture=keywords.get("vacuum_probe_intensity"))
    return fitted, time.perf_counter() - t


def run_case(name, datacube, keywords, truth, ground_truth, index, args, model) -> dict:
    """One row: the recoveries and the image correlations."""
    start = start_for(truth, index, args.seed)
    row = {"case": name, "truth": rounded(truth), "start": rounded(start),
           "errors_start_A": rounded(aberration_errors(start, truth))}
    t = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        found = recover_probe(datacube, initial=start, progress=False, **keywords)
    row.update({
        "recovered": rounded(found.aberrations), "errors_A": rounded(aberration_errors(found.aberrations, truth)),
        "uncertainty": rounded(found.uncertainty), "warnings": [str(w.message) for w in caught],
        "search_s": round(found.time_s, 1), "total_s": round(time.perf_counter() - t, 1),
        "evaluations": found.evaluations,
    })
    if name in ATOM_DEPTH:
        plane = {"C10": truth["C10"] + ATOM_DEPTH[name]}
        row["errors_vs_atom_plane_A"] = rounded(aberration_errors(found.aberrations, plane))
    if args.full_search and name.startswith("simulated"):
        t = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            full = recover_probe(datacube, initial=start, search=("C10", "C12", "C21", "C23"), progress=False,
                                 **keywords)
        row["full_search"] = {
            "recovered": rounded(full.aberrations), "errors_A": rounded(aberration_errors(full.aberrations, truth)),
            "uncertainty": rounded(full.uncertainty), "warned": sorted({str(w.message).split()[0] for w in caught}),
            "total_s": round(time.perf_counter() - t, 1),
        }
    if args.overlap:
        overlap = recover_probe(datacube, model, initial=start, method="overlap", progress=False,
                                energy=keywords["energy"], semiangle_cutoff=keywords["semiangle_cutoff"],
                                rotation_deg=0.0, transpose=False)
        row["overlap"] = {"errors_A": rounded(aberration_errors(overlap.aberrations, truth)),
                          "time_s": round(overlap.time_s, 1)}
    if args.probe_updates:
        fitted, seconds = probe_update_fit(datacube, keywords, start, args.epie_iters)
        row["probe_updates_fit"] = {"errors_A": rounded(aberration_errors(fitted, truth)), "time_s": round(seconds, 1)}
    row["corr_true_probe"] = round(image_correlation(datacube, keywords, model, truth, ground_truth), 4)
    row["corr_recovered_probe"] = round(image_correlation(datacube, keywords, model, found.aberrations,
                                                          ground_truth), 4)
    return row


def table(rows: list[dict]) -> str:
    """Markdown table of the rows."""
    lines = ["| case | true C10, C12 (Å) | start C10 (Å) | C10 error: start → recovered (Å) | ± estimate | "
             "C12 error (Å) | ± | image corr. true / recovered probe | time (s) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        plane = r.get("errors_vs_atom_plane_A")
        c10 = f"{r['errors_start_A']['C10']:+.1f} → **{r['errors_A']['C10']:+.2f}**"
        if plane:
            c10 += f" (atoms' plane {plane['C10']:+.2f})"
        u = r["uncertainty"]
        lines.append(
            f"| {r['case']} | {r['truth']['C10']:.1f}, {r['truth'].get('C12', 0.0):.1f} | {r['start']['C10']:.1f} "
            f"| {c10} | {u['C10']} | {r['errors_A']['C12']:.2f} | {u['C12']} "
            f"| {r['corr_true_probe']:.4f} / {r['corr_recovered_probe']:.4f} | {r['total_s']:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="hbn-300kv-17mrad-probe", help="probe-conditioned model for the images")
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2], help="simulated scans")
    parser.add_argument("--multislice", type=Path, default=Path("runs/multislice"), help="folder of the abTEM sets")
    parser.add_argument("--datasets", nargs="*", default=list(ATOM_DEPTH), help="abTEM sets to run")
    parser.add_argument("--scan", type=int, default=40, help="simulated scan positions per side")
    parser.add_argument("--step", type=float, default=0.25, help="simulated scan step (Å)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the start offsets")
    parser.add_argument("--full-search", action="store_true", help="also search coma and threefold (simulated)")
    parser.add_argument("--overlap", action="store_true", help="also run the overlap search (slow)")
    parser.add_argument("--probe-updates", action="store_true", help="also run ePIE with probe updates + fit")
    parser.add_argument("--epie-iters", type=int, default=20, help="iterations of --probe-updates")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("runs/probe_recovery.json"))
    parser.add_argument("--png", type=Path, default=None, help="figure of the first case's recovery")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = as_model(args.model)
    model.require_conditioned("bench/probe_recovery.py")
    cases = [*simulated_cases(model, args.seeds, args.scan, args.step),
             *multislice_cases(args.multislice, args.datasets)]
    rows = []
    for index, case in enumerate(cases):
        rows.append(run_case(*case, index, args, model))
        print(json.dumps(rows[-1]), flush=True)
        if args.png and index == 0:
            name, datacube, keywords, truth, _ = case
            recover_probe(datacube, initial=start_for(truth, 0, args.seed), progress=False, **keywords).visualize(
                path=args.png)
    print(table(rows))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"settings": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=1))
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
