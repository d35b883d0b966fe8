"""Training-stream throughput: simulated (input, target) patterns per second.

    python bench/simulator.py [--threads 2] [--batch 1024] [--batches 10]

Prints the rate of each training-object source and of the whole stream (forward model + Poisson noise +
normalisation) for the quick-start geometry (300 keV, 17.1 mrad, 32×32 patterns of 2 mrad, 100 Å defocus).
"""

import argparse
import platform
import time

import torch

from py4dstem_deepcdi.probe import ProbeGeometry
from py4dstem_deepcdi.simulation import StreamConfig, TrainingStream


def rate(fn, n_per_call: int, repeats: int) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return n_per_call * repeats / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--batches", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    geometry = ProbeGeometry(300e3, 17.1, angular_sampling=2.0, aberrations={"C10": -100.0}, mask_threshold=0.1)
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} threads, batch {args.batch}")
    print(f"{'source':<28}{'patterns/s':>12}")
    mixes = {
        "photos only": {"photos": 1, "lattice": 0, "noise": 0},
        "lattices only": {"photos": 0, "lattice": 1, "noise": 0},
        "filtered noise only": {"photos": 0, "lattice": 0, "noise": 1},
        "default mix (stream)": None,
    }
    for label, mix in mixes.items():
        config = StreamConfig(batch_size=args.batch, **({"mix": mix} if mix else {}))
        stream = TrainingStream(geometry, config, seed=0)
        counter = iter(range(10**9))
        r = rate(lambda s=stream, c=counter: s.batch(next(c)), args.batch, args.batches)
        print(f"{label:<28}{r:>12,.0f}")


if __name__ == "__main__":
    main()
