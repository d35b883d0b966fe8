"""Training-stream throughput: simulated (input, target) patterns per second.

    python bench/simulator.py [--threads 2] [--batch 1024] [--batches 16] [--stages]

Prints the rate of each training-object source and of the whole stream (forward model + Poisson noise +
normalisation) for the quick-start geometry (300 keV, 17.1 mrad, 32×32 patterns of 2 mrad, 100 Å defocus): the
throughput over ``--batches`` batches after a warm-up batch (16 = two periods of the stream's bank of objects,
whose refresh is part of the cost) and the rate of the median batch; the last row draws fresh objects for every
sample (no bank). ``--stages`` adds the time of each stage of one default-mix batch (fresh source images). The load
average is printed too: on a shared machine the rates follow it.
"""

import argparse
import math
import os
import platform
import statistics
import time

import torch

from py4dstem_deepcdi import stream as stream_module
from py4dstem_deepcdi.encoding import network_input
from py4dstem_deepcdi.poisson import poisson
from py4dstem_deepcdi.probe import ProbeGeometry
from py4dstem_deepcdi.simulation import ForwardModel
from py4dstem_deepcdi.stream import StreamConfig, TrainingStream


def timings(fn, repeats: int) -> list[float]:
    """Wall-clock seconds of ``repeats`` calls of ``fn`` after one warm-up call."""
    fn()
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def stages(geometry: ProbeGeometry, n: int, repeats: int) -> None:
    """Median time (ms) of each stage of a default-mix batch of ``n`` patterns, single-threaded like the stream's
    own operations (the whole batch runs with the threads given)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    stream = TrainingStream(geometry, StreamConfig(batch_size=n), seed=0)
    photos, lattice, noise = stream.source.sources
    model: ForwardModel = stream.model
    shape, sampling = geometry.detector_shape, geometry.sampling
    weights = stream.config.mix
    total = sum(weights.values())
    generator = torch.Generator().manual_seed(1)
    images = stream.source.sample(n, shape, sampling, generator)
    phase = images * 1.0
    electrons = torch.exp(math.log(2e4) + math.log(50) * torch.rand(n, generator=generator))
    rate = model.intensity(phase) * electrons[:, None, None]
    counts = poisson(rate, generator)
    share = {name: round(n * weight / total) for name, weight in weights.items()}
    batch_numbers = iter(range(10**9))
    rows = [
        (f"photos ({share['photos']})", lambda: photos.sample(share["photos"], shape, sampling, generator)),
        (f"lattice ({share['lattice']})", lambda: lattice.sample(share["lattice"], shape, sampling, generator)),
        (f"noise ({share['noise']})", lambda: noise.sample(share["noise"], shape, sampling, generator)),
        ("forward model intensity", lambda: model.intensity(phase)),
        ("Poisson counts", lambda: poisson(rate, generator)),
        ("network input", lambda: network_input(counts, electrons)),
        ("target", lambda: model.target(phase)),
        ("batch (stream, with bank)", lambda c=batch_numbers: stream.batch(next(c))),
    ]  # fmt: skip
    print(f"\n{'stage, ' + str(n) + ' patterns':<28}{'ms':>12}")
    for label, fn in rows:
        if label.startswith("batch"):
            torch.set_num_threads(threads)
        print(f"{label:<28}{statistics.median(timings(fn, repeats)) * 1e3:>12.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--batches", type=int, default=16)
    parser.add_argument("--stages", action="store_true", help="also time each stage of one batch")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    geometry = ProbeGeometry(300e3, 17.1, angular_sampling=2.0, aberrations={"C10": -100.0}, mask_threshold=0.1)
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    machine = platform.processor() or platform.machine()
    print(f"{machine}, torch {torch.__version__}, {args.threads} threads, batch {args.batch}")
    print(f"load average {load} on {os.cpu_count()} cores")
    print(f"{'source':<28}{'patterns/s':>12}{'median batch':>14}")
    bank_uses = stream_module._BANK_USES
    mixes = {
        "photos only": {"photos": 1, "lattice": 0, "noise": 0},
        "lattices only": {"photos": 0, "lattice": 1, "noise": 0},
        "filtered noise only": {"photos": 0, "lattice": 0, "noise": 1},
        "default mix (stream)": None,
        "default mix, fresh objects": None,
    }
    for label, mix in mixes.items():
        config = StreamConfig(batch_size=args.batch, **({"mix": mix} if mix else {}))
        stream = TrainingStream(geometry, config, seed=0)
        counter = iter(range(10**9))
        stream_module._BANK_USES = 0 if "fresh" in label else bank_uses  # 0: no bank of objects
        seconds = timings(lambda s=stream, c=counter: s.batch(next(c)), args.batches)
        median, mean = statistics.median(seconds), statistics.fmean(seconds)
        print(f"{label:<28}{args.batch / mean:>12,.0f}{args.batch / median:>14,.0f}")
    stream_module._BANK_USES = bank_uses
    if args.stages:
        stages(geometry, args.batch, args.batches)


if __name__ == "__main__":
    main()
