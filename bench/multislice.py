"""Validation on data from an independent multislice code (abTEM): deep CDI and py4DSTEM ePIE, same metric.

abTEM pins numpy >= 2 and py4DSTEM 0.14 pins numpy < 2, so the data are made in a separate environment and scored in
this package's one:

    python -m venv ../abtem-env && ../abtem-env/bin/pip install abtem h5py
    ../abtem-env/bin/python bench/multislice.py make --out runs/multislice      # writes one .npz per dataset
    python bench/multislice.py score --data runs/multislice --threads 2         # table of deep CDI vs ePIE
    python bench/multislice.py ramps --model hbn-300kv-17mrad                   # stitching options vs the ramp
    python bench/multislice.py vacuum --dataset hbn_monolayer                   # its vacuum pattern, to fine-tune with
    python bench/multislice.py resimulate --datasets srtio3_8A --epie-iters 10  # abTEM's truth, this package's physics

Datasets (300 keV, 17.1 mrad, C10 = −100 Å as the shipped model, sharp aperture as in abTEM, 0.25 Å steps, 1.6·10⁶
e⁻/Å², Poisson noise): a monolayer of hexagonal BN, a monolayer of 2H-MoS2 and [001] SrTiO3 of 39 Å (10 unit cells)
and of 7.8 Å (2 unit cells) thickness (``make --datasets NAME...`` makes some of them). Each
file holds the counts (Rx, Ry, Qx, Qy), the calibrations, abTEM's vacuum diffraction pattern on the same detector, and
the ground-truth phase σ·V_projected (rad) band-limited to the ptychographic information limit 2α/λ, on a 0.05 Å grid,
with the scan positions in that grid's frame.

Scores (``comparison.score_against_truth``): correlation with and without ramp removal, RMS after scale+offset, phase
scale, and the twin check (correlation with the point-reflected truth). ePIE (``score`` and ``resimulate``) runs
``--epie-iters`` iterations (default 10 for ``score``) once and is reported at its converged count
(``bench/_epie_baseline.py``: the fewest of 1, 2, 3, 5, 10 within 0.005 of their best correlation with the truth),
with its time at that count (run time × count / iterations run); deep CDI's time is preprocess + inference +
stitching, and the speed ratio is ePIE's time at that count over it.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

ENERGY, SEMIANGLE, C10 = 300e3, 17.1, -100.0
STEP, DOSE, SCAN = 0.25, 1.6e6, 40
MAX_ANGLE = 36.0  # mrad, covers the model's ±32 mrad detector


# ============================================================================================ make (abTEM env)
def _structures():
    import ase
    from ase.build import graphene, mx2

    hbn = graphene(formula="BN", a=2.504, size=(1, 1, 1), vacuum=2.0)
    import abtem

    hbn = abtem.orthogonalize_cell(hbn) * (7, 4, 1)  # 17.53 × 17.35 Å
    hbn.center(vacuum=2.0, axis=2)
    cell = ase.Atoms(
        "SrTiOOO",
        scaled_positions=[(0, 0, 0), (0.5, 0.5, 0.5), (0.5, 0.5, 0), (0.5, 0, 0.5), (0, 0.5, 0.5)],
        cell=[3.905] * 3,
        pbc=True,
    )
    sto, sto_thin = cell * (5, 5, 10), cell * (5, 5, 2)
    for slab in (sto, sto_thin):
        slab.center(vacuum=2.0, axis=2)
    mos2 = abtem.orthogonalize_cell(mx2("MoS2", kind="2H", a=3.19, thickness=3.19, vacuum=2.0)) * (
        6,
        4,
        1,
    )  # 19.1 × 22.1 Å
    mos2.center(vacuum=2.0, axis=2)
    return {"hbn_monolayer": hbn, "srtio3_39A": sto, "mos2_monolayer": mos2, "srtio3_8A": sto_thin}


def _square_pixels(intensity: np.ndarray, vacuum: np.ndarray, angular: np.ndarray):
    """Patterns of a non-square cell have different angular pixels along the two axes; py4DSTEM calibrates one.
    Interpolate (linearly, about the zero angle, sums kept) onto square pixels of the larger size."""
    from scipy.ndimage import map_coordinates

    pixel = float(max(angular))
    shape = intensity.shape[-2:]
    centre = np.array(shape) // 2
    new_shape = tuple(int(n) for n in np.floor((np.array(shape) - 1) * angular / pixel) // 2 * 2 + 1)
    new_centre = np.array(new_shape) // 2
    grid = np.stack(
        np.meshgrid(
            *[(np.arange(n) - c) * pixel / a + c0 for n, c, a, c0 in zip(new_shape, new_centre, angular, centre)],
            indexing="ij",
        )
    )

    def resample(pattern):
        out = map_coordinates(pattern, grid, order=1, mode="constant")
        return out * (pattern.sum() / max(out.sum(), 1e-300))

    flat = intensity.reshape(-1, *shape)
    resampled = np.stack([resample(p) for p in flat]).reshape(*intensity.shape[:-2], *new_shape)
    return resampled, resample(vacuum), pixel


def make(out: Path, seed: int, datasets: list[str] | None = None) -> None:
    import abtem

    abtem.config.set({"device": "cpu"})
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    sigma = abtem.core.energy.energy2sigma(ENERGY)
    for name, atoms in _structures().items():
        if datasets and name not in datasets:
            continue
        t0 = time.perf_counter()
        potential = abtem.Potential(
            atoms, sampling=0.05, slice_thickness=1.0, parametrization="lobato", projection="infinite"
        )
        probe = abtem.Probe(energy=ENERGY, semiangle_cutoff=SEMIANGLE, C10=C10)
        probe.grid.match(potential)
        extent = np.asarray(potential.extent)
        span = STEP * (SCAN - 1)
        start = (extent - span) / 2
        scan = abtem.GridScan(start=tuple(start), end=tuple(start + span), gpts=(SCAN, SCAN), endpoint=True)
        detector = abtem.PixelatedDetector(max_angle=MAX_ANGLE)
        patterns = probe.scan(potential, scan=scan, detectors=detector).compute()
        intensity = np.asarray(patterns.array, dtype=np.float64)  # (Rx, Ry, Qx, Qy), each pattern sums to ≤ 1
        angular = np.asarray(patterns.angular_sampling, dtype=float)
        vacuum = np.asarray(probe.build().diffraction_patterns(max_angle=MAX_ANGLE).array, dtype=np.float64)
        intensity, vacuum, pixel = _square_pixels(intensity, vacuum, angular)
        electrons = DOSE * STEP * STEP
        counts = rng.poisson(intensity * electrons).astype(np.float32)
        projected = np.asarray(potential.build().project().compute().array, dtype=np.float64)  # V·Å
        phase = sigma * projected
        sampling = np.asarray(potential.sampling, dtype=float)
        # band-limit to the ptychographic information limit 2α/λ (soft edge over 5%)
        kx = np.fft.fftfreq(phase.shape[0], sampling[0])[:, None]
        ky = np.fft.fftfreq(phase.shape[1], sampling[1])[None, :]
        k_max = 2 * SEMIANGLE * 1e-3 / probe.wavelength
        k = np.sqrt(kx**2 + ky**2) / k_max
        window = np.clip((1.05 - k) / 0.1, 0, 1)
        phase_bl = np.fft.ifft2(np.fft.fft2(phase) * window).real
        x, y = np.meshgrid(start[0] + STEP * np.arange(SCAN), start[1] + STEP * np.arange(SCAN), indexing="ij")
        positions = np.stack([x.ravel(), y.ravel()], -1)
        np.savez_compressed(
            out / f"{name}.npz", counts=counts, angular_sampling_mrad=pixel, scan_step_A=STEP, energy_eV=ENERGY,
            semiangle_mrad=SEMIANGLE, C10_A=C10, dose=DOSE, vacuum=vacuum, truth_phase=phase_bl.astype(np.float32),
            truth_sampling_A=sampling, truth_positions_A=positions, thickness_A=float(atoms.cell[2, 2]),
            abtem_version=abtem.__version__
        )
        print(
            f"{name}: {counts.shape} patterns of {pixel:.4g} mrad, truth phase "
            f"{phase.min():.3f}..{phase.max():.3f} rad, "
            f"{time.perf_counter() - t0:.0f} s"
        )


# ============================================================================================ score (this package)
def _dataset_files(data: Path, datasets: list[str] | None) -> list[Path]:
    """The dataset files in ``data``, those named in ``datasets`` only if given."""
    return [path for path in sorted(data.glob("*.npz")) if not datasets or path.stem in datasets]


def _load(path: Path):
    """The dataset as a calibrated DataCube, its ground truth (phase, sampling, positions) and the raw file."""
    from py4dstem_deepcdi.scan import calibrated_datacube

    f = np.load(path)
    dc = calibrated_datacube(f["counts"], float(f["scan_step_A"]), float(f["angular_sampling_mrad"]))
    truth = (f["truth_phase"], tuple(f["truth_sampling_A"]), f["truth_positions_A"])
    return dc, truth, f


def _deep_cdi(dc, f, model: str, centre: bool = True, **reconstruct):
    from py4dstem_deepcdi.reconstruction import DeepCDIReconstruction

    return (
        DeepCDIReconstruction(
            dc,
            float(f["energy_eV"]),
            float(f["semiangle_mrad"]),
            model=model,
            C10=float(f["C10_A"]),
            rotation_deg=0.0,
            transpose=False,
            verbose=False,
            vacuum_probe_intensity=f["vacuum"],
        )
        .preprocess(centre=centre)
        .reconstruct(progress=False, **reconstruct)
    )


def _epie_scores(row: dict, recon, truth, epie_iters: int, vacuum: np.ndarray, deep_s: float) -> None:
    """Add ePIE at its converged count (``bench/_epie_baseline.py``: one run of ``epie_iters`` iterations, scored at
    1, 2, 3, 5, 10 up to it) and deep CDI to ``row``: correlations with and without ramp removal, RMS, phase scale,
    twin check, ePIE's count, its time at that count and the speed ratio against deep CDI's ``deep_s`` (s)."""
    from _epie_baseline import run_baselines

    from py4dstem_deepcdi.comparison import remove_background, score_against_truth

    baselines = run_baselines(recon, truth, num_iter=epie_iters, remove_ramp=(False, True),
                              epie_kwargs={"vacuum_probe_intensity": vacuum})
    for b in baselines:
        comparison = b.comparison
        ramp = comparison.remove_ramp
        suffix = "_ramp_removed" if ramp else ""
        for method in ("deep_cdi", "epie"):
            s = comparison.vs_truth[method]
            row[f"{method}_corr{suffix}"] = round(s["correlation"], 4)
            if not ramp:
                row[f"{method}_rms_rad"] = round(s["rms_rad"], 4)
                row[f"{method}_scale"] = round(s["phase_scale"], 3)
                image = comparison.deep_phase if method == "deep_cdi" else comparison.epie_phase
                twin = score_against_truth(
                    image, remove_background(comparison.truth_phase[::-1, ::-1]), comparison.sampling
                )
                row[f"{method}_twin_corr"] = round(twin["correlation"], 4)
    b = baselines[0]
    row.update({
        "epie_iterations": b.iterations,
        "epie_still_improving": b.still_improving,
        "epie_iterations_run": b.run,
        "epie_corr_by_iterations": {k: round(v, 4) for k, v in b.correlations.items()},
        "epie_s": round(b.seconds, 2),
        "epie_preprocess_s": round(b.full.epie.preprocess_s, 2),
        "epie_over_deep_cdi": round(b.ratio(deep_s), 3),
        "speed": b.ratio_text(deep_s),
    })


def _score_table(rows: list[dict]) -> str:
    """The markdown table of ``score``'s rows: correlations (ramp removed in brackets), ePIE's converged count and
    both times (s), the speed ratio against that count."""
    lines = [
        "| dataset | deep CDI corr. | ePIE corr. | ePIE converged (it.) | ePIE corr. at 1 it. | scale deep / ePIE "
        "| time deep CDI / ePIE at that count (s) | ePIE / deep CDI |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "epie_iterations" not in r:
            lines.append(f"| {r['dataset']} | {r['deep_cdi_corr']:.3f} ({r['deep_cdi_corr_ramp_removed']:.3f}) "
                         f"| | | | {r['deep_cdi_scale']:.2f} | {r['deep_cdi_s']:.1f} | |")
            continue
        count = f"{'≥' if r['epie_still_improving'] else ''}{r['epie_iterations']} of {r['epie_iterations_run']}"
        lines.append(
            f"| {r['dataset']} | {r['deep_cdi_corr']:.3f} ({r['deep_cdi_corr_ramp_removed']:.3f}) "
            f"| {r['epie_corr']:.3f} ({r['epie_corr_ramp_removed']:.3f}) | {count} "
            f"| {r['epie_corr_by_iterations'][1]:.3f} | {r['deep_cdi_scale']:.2f} / {r['epie_scale']:.2f} "
            f"| {r['deep_cdi_s']:.1f} / {r['epie_s']:.1f} | {r['speed']} |"
        )
    return "\n".join(lines)


def score(
    data: Path,
    model: str,
    epie_iters: int,
    threads: int,
    out: Path,
    symmetrize: bool = False,
    epie: bool = True,
    stitch_fraction: float | None = None,
    datasets: list[str] | None = None,
    anchor_ramp: bool = False,
) -> None:
    """Deep CDI (timed as a whole: preprocess + inference + stitching) and, unless ``epie`` is False, ePIE at its
    converged count, scored against every dataset's truth; prints one JSON row per dataset and a markdown table, and
    writes the rows to ``out``."""
    import torch

    from py4dstem_deepcdi.comparison import score_reconstruction

    torch.set_num_threads(threads)
    rows = []
    for path in _dataset_files(data, datasets):
        dc, truth, f = _load(path)
        t0 = time.perf_counter()
        recon = _deep_cdi(dc, f, model, symmetrize=symmetrize, stitch_fraction=stitch_fraction, anchor_ramp=anchor_ramp)
        deep_s = time.perf_counter() - t0
        row = {
            "dataset": path.stem,
            "thickness_A": float(f["thickness_A"]),
            "patterns": int(np.prod(f["counts"].shape[:2])),
            "deep_cdi_s": round(deep_s, 2),
        }
        if epie:
            _epie_scores(row, recon, truth, epie_iters, f["vacuum"], deep_s)
        else:  # deep CDI alone, with the same scores
            for ramp in (False, True):
                s = score_reconstruction(recon, truth, remove_ramp=ramp)
                row["deep_cdi_corr_ramp_removed" if ramp else "deep_cdi_corr"] = round(s["correlation"], 4)
                if not ramp:
                    row["deep_cdi_rms_rad"], row["deep_cdi_scale"] = round(s["rms_rad"], 4), round(s["phase_scale"], 3)
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(_score_table(rows))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "model": model,
                "symmetrize": symmetrize,
                "stitch_fraction": stitch_fraction,
                "anchor_ramp": anchor_ramp,
                "rows": rows,
            },
            indent=1,
        )
    )


STITCHING_VARIANTS = {
    "offsets (default)": {},
    "offsets, ramp anchored to the centres of mass": {"anchor_ramp": True},
    "no disk centring": {"centre": False},
    "stitch the disk of 70% of |P|²": {"stitch_fraction": 0.7},
    "stitch the disk of 60% of |P|²": {"stitch_fraction": 0.6},
    "stitch the disk of 50% of |P|²": {"stitch_fraction": 0.5},
    "stitch the disk of 40% of |P|²": {"stitch_fraction": 0.4},
    "anchored ramp, 50% disk": {"anchor_ramp": True, "stitch_fraction": 0.5},
    "anchored ramp, no disk centring": {"anchor_ramp": True, "centre": False},
}


def ramps(data: Path, model: str, threads: int, datasets: list[str] | None) -> None:
    """Deep CDI with each stitching option: correlation with the truth with and without ramp removal."""
    import torch

    from py4dstem_deepcdi.comparison import score_reconstruction

    torch.set_num_threads(threads)
    print(
        f"model {model}\n| dataset | stitching | corr. | corr. (ramp removed) | RMS (rad) | scale | "
        "time (s) |\n|---|---|---|---|---|---|---|"
    )
    for path in _dataset_files(data, datasets):
        dc, truth, f = _load(path)
        for label, options in STITCHING_VARIANTS.items():
            t0 = time.perf_counter()
            recon = _deep_cdi(dc, f, model, **options)
            elapsed = time.perf_counter() - t0
            plain, flat = (score_reconstruction(recon, truth, remove_ramp=r) for r in (False, True))
            print(
                f"| {path.stem} | {label} | {plain['correlation']:.3f} | {flat['correlation']:.3f} | "
                f"{plain['rms_rad']:.4f} | {plain['phase_scale']:.2f} | {elapsed:.1f} |",
                flush=True,
            )


def resimulate(
    data: Path,
    model: str,
    threads: int,
    datasets: list[str] | None,
    epie_iters: int,
    phase_scales: list[float],
    **reconstruct,
) -> None:
    """The abTEM truth re-simulated with this package's forward model and the model's own probe (same scan, same
    electrons per pattern), reconstructed and scored: separates the network's error from the physics mismatch."""
    import torch
    from _epie_baseline import run_baselines
    from scipy.ndimage import map_coordinates

    from py4dstem_deepcdi.comparison import score_reconstruction
    from py4dstem_deepcdi.models import as_model
    from py4dstem_deepcdi.reconstruction import DeepCDIReconstruction
    from py4dstem_deepcdi.simulation import simulate_dataset

    torch.set_num_threads(threads)
    loaded = as_model(model)
    g = loaded.geometry
    print(
        f"model {model}\n| dataset | phase × | deep CDI corr. (ramp removed) | RMS (rad) | scale | "
        "ePIE corr. (ramp removed), converged count |"
        "\n|---|---|---|---|---|---|"
    )
    for path in _dataset_files(data, datasets):
        f = np.load(path)
        truth, truth_sampling = f["truth_phase"].astype(np.float64), np.asarray(f["truth_sampling_A"], dtype=float)
        n = g.detector_shape[0] + int(np.ceil(SCAN * STEP / g.sampling[0])) + 8
        grid = np.indices((n, n), dtype=float) * g.sampling[0] / truth_sampling[:, None, None]
        phase = map_coordinates(truth, grid, order=3, mode="grid-wrap")  # the cell is periodic
        electrons = float(f["counts"].sum((-2, -1)).mean())
        for scale in phase_scales:
            ds = simulate_dataset(
                g, scan_shape=(SCAN, SCAN), scan_step=STEP, electrons=electrons, phase=phase * scale, seed=1
            )
            recon = (
                DeepCDIReconstruction(
                    ds.datacube, g.energy, g.semiangle_cutoff, model=loaded, rotation_deg=0.0, transpose=False,
                    verbose=False, vacuum_probe_intensity=g.vacuum_probe_intensity, **g.aberrations
                )
                .preprocess()
                .reconstruct(progress=False, **reconstruct)
            )
            plain, flat = (score_reconstruction(recon, ds, remove_ramp=r) for r in (False, True))
            epie = ""
            if epie_iters:  # one ePIE run, scored at its converged count with and without ramp removal
                plain_b, flat_b = run_baselines(recon, ds, num_iter=epie_iters, remove_ramp=(False, True),
                                                epie_kwargs={"vacuum_probe_intensity": g.vacuum_probe_intensity})
                plain_c, flat_c = (b.comparison.vs_truth["epie"]["correlation"] for b in (plain_b, flat_b))
                epie = f"{plain_c:.3f} ({flat_c:.3f}), {plain_b.count_text()} it."
            print(
                f"| {path.stem} | {scale:g} | {plain['correlation']:.3f} ({flat['correlation']:.3f}) | "
                f"{plain['rms_rad']:.4f} | {plain['phase_scale']:.2f} | {epie} |",
                flush=True,
            )


def vacuum(data: Path, dataset: str) -> None:
    """Write a dataset's vacuum pattern (its own detector) as .npy for `deepcdi train --vacuum-probe`."""
    f = np.load(data / f"{dataset}.npz")
    out = data / f"{dataset}_vacuum.npy"
    np.save(out, f["vacuum"])
    print(
        f"{out}: {f['vacuum'].shape} pixels; train with --vacuum-probe {out} "
        f"--vacuum-sampling {float(f['angular_sampling_mrad']):.6g}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("make", help="simulate the datasets with abTEM (run in the abTEM environment)")
    p.add_argument("--out", type=Path, default=Path("runs/multislice"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--datasets", nargs="+", default=None, help="dataset names (default: all)")
    p = sub.add_parser("score", help="deep CDI and ePIE against the ground truth")
    p.add_argument("--data", type=Path, default=Path("runs/multislice"))
    p.add_argument("--model", default="hbn-300kv-17mrad")
    p.add_argument("--epie-iters", type=int, default=10,
                   help="ePIE iterations run; reported at its converged count of 1, 2, 3, 5, 10 up to it")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("runs/multislice/scores.json"))
    p.add_argument("--symmetrize", action="store_true", help="average deep-CDI patches over the probe's symmetries")
    p.add_argument("--no-epie", action="store_true", help="score deep CDI alone")
    p.add_argument("--stitch-fraction", type=float, default=None, help="stitch the disk holding this fraction of |P|²")
    p.add_argument("--datasets", nargs="+", default=None, help="dataset names (default: all)")
    p.add_argument(
        "--anchor-ramp", action="store_true", help="anchor the deep-CDI ramp to the patterns' centres of mass"
    )
    p = sub.add_parser("ramps", help="deep CDI with each stitching option (ramp study)")
    p.add_argument("--data", type=Path, default=Path("runs/multislice"))
    p.add_argument("--model", default="hbn-300kv-17mrad")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--datasets", nargs="+", default=None, help="dataset names (default: all)")
    p = sub.add_parser("resimulate", help="the truth re-simulated with this package's forward model, scored")
    p.add_argument("--data", type=Path, default=Path("runs/multislice"))
    p.add_argument("--model", default="hbn-300kv-17mrad")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--datasets", nargs="+", default=None, help="dataset names (default: all)")
    p.add_argument("--epie-iters", type=int, default=0,
                   help="also ePIE on the re-simulated data, this many iterations run, reported at its converged count "
                        "(0: not)")
    p.add_argument("--phase-scales", type=float, nargs="+", default=[1.0], help="multiply the truth by these")
    p.add_argument("--stitch-fraction", type=float, default=None, help="stitch the disk holding this fraction of |P|²")
    p.add_argument(
        "--anchor-ramp", action="store_true", help="anchor the deep-CDI ramp to the patterns' centres of mass"
    )
    p = sub.add_parser("vacuum", help="write a dataset's vacuum pattern for fine-tuning with --vacuum-probe")
    p.add_argument("--data", type=Path, default=Path("runs/multislice"))
    p.add_argument("--dataset", default="hbn_monolayer")
    args = parser.parse_args()
    if args.command == "vacuum":
        vacuum(args.data, args.dataset)
    elif args.command == "make":
        make(args.out, args.seed, args.datasets)
    elif args.command == "resimulate":
        resimulate(
            args.data,
            args.model,
            args.threads,
            args.datasets,
            args.epie_iters,
            args.phase_scales,
            stitch_fraction=args.stitch_fraction,
            anchor_ramp=args.anchor_ramp,
        )
    elif args.command == "ramps":
        ramps(args.data, args.model, args.threads, args.datasets)
    else:
        score(
            args.data,
            args.model,
            args.epie_iters,
            args.threads,
            args.out,
            args.symmetrize,
            not args.no_epie,
            args.stitch_fraction,
            args.datasets,
            args.anchor_ramp,
        )


if __name__ == "__main__":
    main()
