"""Inference and training throughput of the DeepCDI network on this machine, and the accuracy cost of bf16.

Prints one table: patterns/s for the plain eager network (fp32, unfolded) and for ``prepare_network`` variants
(folded fp32, bf16 weights, bf16 autocast, bf16 + torch.compile, and ``predict`` end to end), per width, batch size and
thread count; the training rate (forward + backward + Adam step, bf16 autocast, batch 64); and, for a model file or
random weights, max and mean |Δphase| (rad) between bf16 and fp32 predictions on a validation batch.

Timings are interleaved (every configuration once per round) and the best round is reported next to the median,
so a background load biases all rows alike; the load average is printed with the table. Re-run on an idle machine:

    PYTHONPATH=. python bench/inference.py                          # full run (compiles: several minutes)
    PYTHONPATH=. python bench/inference.py --no-compile --repeats 2 # quick
    PYTHONPATH=. python bench/inference.py --model runs/hbn-300kv-17mrad.pt --widths --no-train   # accuracy only
    PYTHONPATH=. python bench/inference.py --checkpoint runs/hbn.ckpt --widths --no-train
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from py4dstem_deepcdi.inference import predict  # noqa: E402
from py4dstem_deepcdi.models import DeepCDIModel, load_model  # noqa: E402
from py4dstem_deepcdi.network import ResUNet, count_parameters  # noqa: E402
from py4dstem_deepcdi.probe import ProbeGeometry  # noqa: E402
from py4dstem_deepcdi.runtime import bf16_supported, prepare_network  # noqa: E402
from py4dstem_deepcdi.stream import StreamConfig, TrainingStream  # noqa: E402
from py4dstem_deepcdi.training import VALIDATION_WORKER, checkpoint_geometry, masked_l1  # noqa: E402


def default_geometry() -> ProbeGeometry:
    """The quick-start geometry (300 keV, 17.1 mrad, 32×32 patterns of 2 mrad, 100 Å defocus)."""
    return ProbeGeometry(300e3, 17.1, angular_sampling=2.0, aberrations={"C10": -100.0}, mask_threshold=0.1)


def gflop_per_pattern(network: torch.nn.Module, shape: tuple[int, int]) -> float:
    """Forward GFLOP (2 × multiply-adds) for one pattern."""
    from torch.utils.flop_counter import FlopCounterMode  # noqa: PLC0415

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        network.eval()(torch.zeros(1, 1, *shape))
    return counter.get_total_flops() / 1e9


def machine_summary() -> str:
    caps = {}
    try:
        caps = torch.cpu.get_capabilities()
    except Exception:  # noqa: BLE001
        pass
    isa = [name for name in ("avx512_bf16", "amx_bf16", "avx512_vnni") if caps.get(name)]
    return (
        f"torch {torch.__version__}, CPU {caps.get('cpu_name', '?')} ({os.cpu_count()} logical cores, "
        f"{'/'.join(isa) or 'no bf16 ISA'}), oneDNN bf16 native: {bf16_supported('cpu')}"
    )


def load_note() -> str:
    one, five, _ = os.getloadavg()
    busy = one > 0.5 or five > 0.5
    warning = " -- OTHER PROCESSES ARE RUNNING: absolute numbers are contaminated, compare rows with each other"
    return f"load average {one:.2f} (1 min) {five:.2f} (5 min)" + (warning if busy else "")


# ------------------------------------------------------------------------------------------------ inference
def inference_candidates(network: ResUNet, args) -> dict[str, object]:
    """name → callable(x (B,1,N,N) float32) for every configuration to time."""
    candidates: dict[str, object] = {"eager fp32 (unfolded, NCHW)": network.eval()}
    candidates["prepared fp32"] = prepare_network(network, "fp32")
    if bf16_supported("cpu"):
        candidates["prepared bf16 (bf16 weights)"] = prepare_network(network, "bf16", bf16_mode="weights")
        candidates["prepared bf16 (autocast)"] = prepare_network(network, "bf16", bf16_mode="autocast")
    if args.compile:
        precision = "bf16" if bf16_supported("cpu") else "fp32"
        options = {"freezing": True} if args.compile_mode == "freezing" else None
        mode = None if args.compile_mode in ("default", "freezing") else args.compile_mode
        candidates[f"prepared {precision} + compile ({args.compile_mode})"] = prepare_network(
            network, precision, compile=True, compile_mode=mode, compile_options=options
        )
    return candidates


def time_inference(candidates: dict, batch: int, n_patterns: int, repeats: int, shape) -> dict[str, list[float]]:
    """Interleaved timings: per configuration a list of patterns/s, one per round."""
    generator = torch.Generator().manual_seed(0)
    n_batches = max(1, math.ceil(n_patterns / batch))
    x = torch.rand(batch, 1, *shape, generator=generator) * 2
    rates: dict[str, list[float]] = {name: [] for name in candidates}
    with torch.inference_mode():
        for name, f in list(candidates.items()):  # warm-up: oneDNN primitives, compilation
            start = time.perf_counter()
            f(x)
            seconds = time.perf_counter() - start
            if getattr(f, "compiled", None) is False and "compile" in name:
                rates[name + " [compile FAILED: eager]"] = rates.pop(name)
                candidates[name + " [compile FAILED: eager]"] = candidates.pop(name)
            elif seconds > 20:
                print(f"    warm-up of {name!r} at batch {batch}: {seconds:.0f} s", flush=True)
        for _ in range(repeats):
            for name, f in candidates.items():
                start = time.perf_counter()
                for _ in range(n_batches):
                    f(x)
                rates[name].append(n_batches * batch / (time.perf_counter() - start))
    return rates


def time_predict(network: ResUNet, geometry: ProbeGeometry, batch: int, n_patterns: int, repeats: int) -> list[float]:
    """End-to-end ``predict`` (bf16 where native): input checks, masking and de-meaning included."""
    model = DeepCDIModel(network, geometry)
    amplitudes = np.random.default_rng(0).random((max(batch, n_patterns), *geometry.detector_shape), np.float32) * 2
    predict(model, amplitudes[:batch], batch_size=batch)  # prepare + warm up
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        predict(model, amplitudes, batch_size=batch)
        rates.append(len(amplitudes) / (time.perf_counter() - start))
    return rates


# ------------------------------------------------------------------------------------------------ training
def time_training(width: float, geometry: ProbeGeometry, steps: int, batch: int = 64) -> float:
    """Samples/s of forward + backward + Adam step, bf16 autocast, channels-last (the Trainer's recipe).

    The batch is drawn once from the training stream and reused: the simulation's cost is not included.
    """
    torch.manual_seed(0)
    network = ResUNet(width).to(memory_format=torch.channels_last).train()
    optimizer = torch.optim.Adam(network.parameters(), lr=1e-4)
    stream = TrainingStream(geometry, StreamConfig(batch_size=batch), seed=0)
    x, y = stream.batch(0)
    x = x.contiguous(memory_format=torch.channels_last)
    mask = stream.model.mask
    use_bf16 = bf16_supported("cpu")

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_bf16):
            prediction = network(x)
        loss = masked_l1(prediction.float(), y, mask)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step()  # warm-up
    best = math.inf
    for _ in range(steps):
        start = time.perf_counter()
        step()
        best = min(best, time.perf_counter() - start)
    return batch / best


# ------------------------------------------------------------------------------------------------ accuracy
def bf16_accuracy(model: DeepCDIModel, n: int) -> dict[str, float]:
    """|Δphase| (rad) between bf16 and fp32 predictions inside the mask, and each one's masked L1 to the truth."""
    stream = TrainingStream(model.geometry, StreamConfig(batch_size=n), seed=0, worker=VALIDATION_WORKER)
    x, y = stream.batch(0)
    amplitudes = x[:, 0].numpy()
    fp32 = predict(model, amplitudes, precision="fp32", batch_size=256)
    bf16 = predict(model, amplitudes, precision="bf16", batch_size=256)
    mask = model.geometry.mask
    diff = np.abs(bf16 - fp32)[:, mask]
    truth = torch.from_numpy(np.asarray(y[:, 0]))
    mask_t = torch.from_numpy(mask)
    return {
        "patterns": n,
        "max_abs_dphase": float(diff.max()),
        "mean_abs_dphase": float(diff.mean()),
        "rms_phase_fp32": float(np.sqrt(np.mean(fp32[:, mask] ** 2))),
        "l1_fp32": float(masked_l1(torch.from_numpy(fp32), truth, mask_t)),
        "l1_bf16": float(masked_l1(torch.from_numpy(bf16), truth, mask_t)),
        "l1_zero": float(masked_l1(torch.zeros_like(truth), truth, mask_t)),
    }


def model_from_checkpoint(path: Path) -> DeepCDIModel:
    """The network and geometry of a :class:`~py4dstem_deepcdi.training.Trainer` checkpoint (safe load)."""
    payload = torch.load(path, map_location="cpu", weights_only=True)
    config = json.loads(payload["config"])
    network = ResUNet(config["width"], config["depth"], config["dropout"])
    network.load_state_dict(payload["network"])
    return DeepCDIModel(network.eval(), checkpoint_geometry(payload), {"step": int(payload["step"])})


# ------------------------------------------------------------------------------------------------ main
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--widths", type=float, nargs="*", default=[1.0, 0.5], help="network widths (1.0 = paper)")
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--threads", type=int, nargs="+", default=[2], help="torch.set_num_threads values to run")
    parser.add_argument("--patterns", type=int, default=1024, help="patterns per timed round (at least one batch)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds per configuration (interleaved)")
    parser.add_argument(
        "--compile", action=argparse.BooleanOptionalAction, default=True, help="also time torch.compile"
    )
    parser.add_argument(
        "--compile-mode",
        default="max-autotune-no-cudagraphs",
        help="torch.compile mode, or 'default', or 'freezing' (inductor freezing: constant-folded, prepacked weights)",
    )
    parser.add_argument("--no-predict", dest="predict", action="store_false", help="skip the end-to-end predict() row")
    parser.add_argument("--train", action=argparse.BooleanOptionalAction, default=True, help="time training steps")
    parser.add_argument("--train-steps", type=int, default=3)
    parser.add_argument("--model", type=Path, help="model file for the bf16 accuracy check (default: random weights)")
    parser.add_argument("--checkpoint", type=Path, help="or a training checkpoint (weights of a run in progress)")
    parser.add_argument("--val-size", type=int, default=512, help="validation patterns for the accuracy check")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)

    warnings.simplefilter("default")
    print(machine_summary())
    print(load_note(), flush=True)
    geometry = default_geometry()
    results: dict = {"machine": machine_summary(), "load_before": os.getloadavg(), "inference": [], "training": []}
    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        for width in args.widths:
            torch.manual_seed(0)
            network = ResUNet(width, args.depth).eval()
            gflop = gflop_per_pattern(network, geometry.detector_shape)
            label = f"width {width:g} ({count_parameters(network) / 1e6:.1f} M params, {gflop:.3f} GFLOP/pattern)"
            print(f"[threads {threads}] {label}", flush=True)
            candidates = inference_candidates(network, args)
            for batch in args.batch_sizes:
                rates = time_inference(candidates, batch, args.patterns, args.repeats, geometry.detector_shape)
                if args.predict:
                    rates["predict() end to end (bf16, masked)"] = time_predict(
                        network, geometry, batch, args.patterns, args.repeats
                    )
                for name, values in rates.items():
                    best, median = max(values), statistics.median(values)
                    rows.append((threads, width, batch, name, best, median, best * gflop))
                    results["inference"].append(
                        {"threads": threads, "width": width, "batch": batch, "config": name, "best": best,
                         "median": median, "rates": values, "gflop_per_pattern": gflop}
                    )
                    print(f"    batch {batch:5d}  {name:48s} {best:8.1f} /s (median {median:.1f})", flush=True)
            if args.train:
                rate = time_training(width, geometry, args.train_steps)
                results["training"].append({"threads": threads, "width": width, "samples_per_s": rate})
                print(f"    training (bf16 autocast, batch 64, fwd+bwd+Adam): {rate:.1f} samples/s", flush=True)

    print()
    print(load_note())
    print(f"{'thr':>3} {'width':>5} {'batch':>5}  {'configuration':48s} {'best/s':>8} {'median/s':>8} {'GFLOP/s':>8}")
    for threads, width, batch, name, best, median, gflops in rows:
        print(f"{threads:>3} {width:>5g} {batch:>5}  {name:48s} {best:8.1f} {median:8.1f} {gflops:8.1f}")
    for entry in results["training"]:
        print(f"{entry['threads']:>3} {entry['width']:>5g} {64:>5}  {'training step (bf16 autocast, Adam)':48s} "
              f"{entry['samples_per_s']:8.1f}  samples/s")

    if args.model is not None:
        model = load_model(args.model)
        source = f"model {args.model}"
    elif args.checkpoint is not None:
        model = model_from_checkpoint(args.checkpoint)
        source = f"checkpoint {args.checkpoint} (width {model.network.width:g}, step {model.metadata['step']})"
    else:
        torch.manual_seed(0)
        width = args.widths[0] if args.widths else 1.0
        model = DeepCDIModel(ResUNet(width, args.depth).eval(), geometry)
        source = f"RANDOM weights (width {width:g}; pass --model for a trained network)"
    torch.set_num_threads(args.threads[0])
    accuracy = bf16_accuracy(model, args.val_size)
    results["accuracy"] = {"source": source, **accuracy}
    print(f"\nbf16 vs fp32 on {accuracy['patterns']} validation patterns, {source}:")
    print(
        f"  |Δphase| inside the mask: max {accuracy['max_abs_dphase']:.2e} rad, "
        f"mean {accuracy['mean_abs_dphase']:.2e} rad "
        f"(RMS phase {accuracy['rms_phase_fp32']:.3f} rad); masked L1 to the truth: fp32 {accuracy['l1_fp32']:.4f}, "
        f"bf16 {accuracy['l1_bf16']:.4f}, predicting zero {accuracy['l1_zero']:.4f} rad"
    )
    results["load_after"] = os.getloadavg()
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
