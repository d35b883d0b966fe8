"""Samples-to-quality curve: stitched-image quality of snapshots of one training run.

    # while a run trains, keep a copy of its checkpoint every 15 minutes
    while sleep 900; do cp runs/main/hbn-main.ckpt runs/main/snap-$(date +%H%M).ckpt; done &
    python bench/training_curve.py runs/main/snap-*.ckpt runs/main/hbn-main.ckpt --threads 2

Each checkpoint (or model file) is scored on a simulated 40×40 lattice scan (0.5 rad, 10⁵ e⁻/pattern, step 0.25 Å,
the package's own forward model and the snapshot's own probe) and, if present, on the abTEM hBN monolayer of
``bench/multislice.py`` (its vacuum pattern only for ePIE; the network sees the data as they are), plainly and with
``anchor_ramp=True, stitch_fraction=0.5``. Prints samples, training minutes and the correlation with the truth (ramp
removed in brackets).
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from inference import model_from_checkpoint  # noqa: E402
from multislice import _deep_cdi, _load  # noqa: E402

from py4dstem_deepcdi.comparison import score_reconstruction  # noqa: E402
from py4dstem_deepcdi.models import as_model  # noqa: E402
from py4dstem_deepcdi.reconstruction import DeepCDIReconstruction  # noqa: E402
from py4dstem_deepcdi.simulation import simulate_dataset  # noqa: E402


def _scores(recon, truth) -> str:
    plain, flat = (score_reconstruction(recon, truth, remove_ramp=r)["correlation"] for r in (False, True))
    return f"{plain:.3f} ({flat:.3f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("snapshots", nargs="+", type=Path, help="training checkpoints (.ckpt) or model files (.pt)")
    parser.add_argument("--multislice", type=Path, default=Path("runs/multislice/hbn_monolayer.npz"))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=UserWarning)  # the aperture-edge warnings are the point here
    print(
        "| snapshot | samples | minutes | lattice | abTEM hBN | abTEM hBN, anchored, 50% disk "
        "|\n|---|---|---|---|---|---|"
    )
    for path in args.snapshots:
        if path.suffix == ".ckpt":
            payload = torch.load(path, map_location="cpu", weights_only=True)
            history = json.loads(payload["history"])
            model = model_from_checkpoint(path)
        else:
            model = as_model(str(path))
            history = [model.metadata.get("training", {})]
        last = history[-1] if history else {}
        if path.suffix == ".ckpt":  # the snapshot's own step, not its last validation's
            batch = json.loads(payload["config"])["stream"]["batch_size"]
            last = {"samples": int(payload["step"]) * batch, "minutes": float(payload["elapsed"]) / 60}
        g = model.geometry
        ds = simulate_dataset(g, scan_shape=(40, 40), scan_step=0.25, dose=1.6e6, seed=1)
        lattice = (
            DeepCDIReconstruction(
                ds.datacube, g.energy, g.semiangle_cutoff, model=model, rotation_deg=0, transpose=False,
                verbose=False, **g.aberrations
            )
            .preprocess()
            .reconstruct()
        )
        hbn = anchored = "–"
        if args.multislice.exists():
            dc, truth, f = _load(args.multislice)
            hbn = _scores(_deep_cdi(dc, f, model), truth)
            anchored = _scores(_deep_cdi(dc, f, model, anchor_ramp=True, stitch_fraction=0.5), truth)
        print(
            f"| {path.name} | {last.get('samples', '?')} | {last.get('minutes', float('nan')):.0f} | "
            f"{_scores(lattice, ds)} | {hbn} | {anchored} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
