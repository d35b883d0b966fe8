"""Inference runtimes side by side on the CPU: torch, ONNX Runtime and OpenVINO at each of their precisions.

For one model (default the shipped ``hbn-300kv-17mrad``, or a model file), one row per runtime × precision:

- patterns/s of ``predict`` end to end (input checks, network, masking and de-meaning) on ``--patterns`` patterns
  of the training stream in batches of ``--batch``, at ``--threads`` threads: one warm-up call (it exports,
  quantises and compiles: the ``setup`` column), then the median and the best of ``--repeats`` timed calls;
- the correlation of its patches with torch fp32's on those patterns;
- the correlation with the truth of the stitched image of one simulated lattice scan (``--scan`` × ``--scan``
  positions, 0.25 Å steps, 1.6e6 e⁻/Å², as in bench/quality.py), and its difference to torch fp32's. An int8 row
  passes when it is within 0.005 of torch fp32's image correlation.

Prints a markdown table and the command that made it. Other processes on the machine slow every row alike only if
they are steady; the load average is printed with the table.

    python bench/runtimes.py                                   # 2 threads, 1024 patterns, 5 repeats, 32×32 scan
    python bench/runtimes.py --threads 1 --patterns 256 --repeats 3 --scan 16     # smoke
    python bench/runtimes.py --model runs/my-model.pt --rows torch:fp32 openvino:int8
"""

from __future__ import annotations

import argparse
import importlib
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from py4dstem_deepcdi import runtimes  # noqa: E402
from py4dstem_deepcdi.comparison import score_reconstruction  # noqa: E402
from py4dstem_deepcdi.inference import calibration_inputs, predict  # noqa: E402
from py4dstem_deepcdi.models import as_model  # noqa: E402
from py4dstem_deepcdi.reconstruction import DeepCDIReconstruction  # noqa: E402
from py4dstem_deepcdi.runtime import bf16_supported  # noqa: E402
from py4dstem_deepcdi.simulation import simulate_dataset  # noqa: E402

DEFAULT_ROWS = ("torch:fp32", "torch:bf16", "onnxruntime:fp32", "onnxruntime:int8", "openvino:fp32", "openvino:bf16",
                "openvino:int8")
INT8_TOLERANCE = 0.005  # image correlation with the truth, below torch fp32's
SEED = 11  # the stream seed of the timed patterns (int8 graphs are calibrated on seed 0)


def machine_summary() -> str:
    caps = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    isa = [name for name in ("avx2", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8") if caps.get(name)]
    versions = [f"torch {torch.__version__}"]
    for name in ("onnxruntime", "openvino"):
        try:
            versions.append(f"{name} {importlib.import_module(name).__version__.split('-')[0]}")
        except ImportError:
            versions.append(f"{name} missing")
    return f"{', '.join(versions)}; CPU {caps.get('cpu_name', '?')} ({os.cpu_count()} logical cores, {'/'.join(isa)})"


def load_note() -> str:
    one, five, _ = os.getloadavg()
    busy = " -- OTHER PROCESSES ARE RUNNING: compare rows with each other" if max(one, five) > 0.5 else ""
    return f"load average {one:.2f} (1 min) {five:.2f} (5 min){busy}"


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Correlation of two sets of patches (zero outside the mask and zero-mean inside: no centring needed)."""
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / np.sqrt((a @ a) * (b @ b)))


def precision_note(runtime: str, precision: str) -> str:
    """Why a row does not run as named, or ''."""
    missing = runtimes.missing_modules(runtime, precision)
    if missing:
        return f"missing {', '.join(missing)}: ran torch"
    if precision == "bf16" and runtime == "torch" and not bf16_supported("cpu"):
        return "bf16 not native: ran fp32"
    if precision == "bf16" and runtime == "openvino" and not runtimes.openvino_bf16_supported():
        return "bf16 not native: ran fp32"
    return ""


def time_row(model, amplitudes: np.ndarray, runtime: str, precision: str, batch: int, repeats: int):
    """(setup s, [patterns/s per repeat], patches) of predict in this runtime."""
    kwargs = {"runtime": runtime, "precision": precision, "batch_size": batch}
    start = time.perf_counter()
    patches = predict(model, amplitudes[:batch], **kwargs)
    setup = time.perf_counter() - start
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        patches = predict(model, amplitudes, **kwargs)
        rates.append(len(amplitudes) / (time.perf_counter() - start))
    return setup, rates, patches


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="hbn-300kv-17mrad", help="shipped model name or model file")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--patterns", type=int, default=1024, help="training-stream patterns per timed call")
    parser.add_argument("--batch", type=int, default=1024, help="patterns per network pass")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per row (median and best reported)")
    parser.add_argument("--scan", type=int, default=32, help="scan positions per side of the simulated lattice")
    parser.add_argument("--rows", nargs="+", default=list(DEFAULT_ROWS), metavar="RUNTIME:PRECISION")
    args = parser.parse_args(argv)
    rows = [tuple(row.split(":")) for row in args.rows]
    for runtime, precision in rows:
        runtimes.check_runtime(runtime, precision)
    rows = [("torch", "fp32")] + [row for row in dict.fromkeys(rows) if row != ("torch", "fp32")]  # the reference

    torch.set_num_threads(args.threads)
    model = as_model(args.model)
    geometry = model.geometry
    print(machine_summary())
    print(f"model {model!r}")
    amplitudes = calibration_inputs(model, args.patterns, seed=SEED)[:, 0]
    dataset = simulate_dataset(geometry, seed=1, scan_shape=(args.scan, args.scan), scan_step=0.25, dose=1.6e6)
    recon = DeepCDIReconstruction(dataset.datacube, geometry.energy, geometry.semiangle_cutoff, model=model,
                                  rotation_deg=dataset.rotation_deg, transpose=False, verbose=False,
                                  **geometry.aberrations).preprocess()

    results = []
    reference = None
    for runtime, precision in rows:
        note = precision_note(runtime, precision)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # the notes say what a fallback ran
            setup, rates, patches = time_row(model, amplitudes, runtime, precision, args.batch, args.repeats)
            recon.reconstruct(runtime=runtime, precision=precision, progress=False)
        image = score_reconstruction(recon, dataset)["correlation"]
        if reference is None:
            reference = (patches, image)
        results.append({
            "runtime": runtime, "precision": precision, "note": note, "setup_s": setup,
            "median": statistics.median(rates), "best": max(rates), "patch_corr": correlation(patches, reference[0]),
            "image_corr": image, "delta": image - reference[1],
        })
        print(f"  {runtime} {precision}: {statistics.median(rates):.0f} patterns/s", flush=True)

    print()
    print(load_note())
    print(f"{args.patterns} training-stream patterns, batch {args.batch}, {args.threads} thread(s), median (best) of "
          f"{args.repeats}; image: {args.scan}×{args.scan} lattice scan, correlation with the truth")
    print()
    print("| runtime | precision | patterns/s | setup (s) | corr. with torch fp32 patches | image corr. with truth | "
          "Δ image corr. | note |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['runtime']} | {r['precision']} | {r['median']:.0f} ({r['best']:.0f}) | {r['setup_s']:.1f} | "
              f"{r['patch_corr']:.5f} | {r['image_corr']:.4f} | {r['delta']:+.4f} | {r['note']} |")
    for r in results:
        if r["precision"] == "int8" and not r["note"]:
            verdict = "within" if r["delta"] >= -INT8_TOLERANCE else "NOT within"
            print(f"{r['runtime']} int8: image correlation {r['delta']:+.4f} vs torch fp32, {verdict} "
                  f"{INT8_TOLERANCE} of it")
    print()
    print("command: python bench/runtimes.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
