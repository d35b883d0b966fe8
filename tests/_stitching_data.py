"""Test data shared by the tests/test_stitching_*.py modules: exact phase patches of smooth objects."""

import math

import numpy as np

H = W = 32
RADIUS = 6.0


def circular_mask(radius=RADIUS, size=H):
    yy, xx = np.mgrid[:size, :size]
    return (yy - size // 2) ** 2 + (xx - size // 2) ** 2 <= radius**2


class PlaneWaves:
    """A smooth random phase object (rad): a sum of plane waves with periods >= ``min_period`` pixels."""

    def __init__(self, rng, n_waves=12, min_period=24.0):
        kmax = 2 * math.pi / min_period
        self.k = rng.uniform(-kmax, kmax, (n_waves, 2))
        self.amp = rng.uniform(0.3, 1.0, n_waves) / math.sqrt(n_waves / 2)
        self.phase = rng.uniform(0, 2 * math.pi, n_waves)

    def __call__(self, y, x):
        out = np.zeros(np.broadcast(y, x).shape)
        for (ky, kx), a, ph in zip(self.k, self.amp, self.phase):
            out += a * np.cos(ky * y + kx * x + ph)
        return out


def cut_patches(obj, positions, mask):
    """Exact patches of ``obj`` at (sub-pixel) positions: patch pixel u sits at position + u - centre. NaN outside."""
    uy, ux = np.nonzero(mask)
    uy, ux = uy - H // 2, ux - W // 2
    patches = np.full((len(positions), H, W), np.nan)
    patches[:, mask] = obj(positions[:, :1] + uy[None, :], positions[:, 1:] + ux[None, :])
    return patches


def truth_on_canvas(obj, result, where):
    rr, cc = np.nonzero(where)
    return rr, cc, obj(rr - result.origin_px[0], cc - result.origin_px[1])


def integer_scan(rng, n=14, step=2):
    """A raster with random integer jitter: integer positions, irregular neighbourhoods."""
    gy, gx = np.mgrid[:n, :n] * step
    pos = np.stack([gy.ravel(), gx.ravel()], axis=1) + rng.integers(-1, 2, (n * n, 2))
    return pos.astype(np.float64) + 40.0


def rotated_lattice(n=16, step=1.5, degrees=23.0, offset=0.3):
    """A row-major raster rotated by ``degrees``: every relative position is fractional."""
    theta = math.radians(degrees)
    gy, gx = np.mgrid[:n, :n] * step
    pos = np.stack([math.cos(theta) * gy - math.sin(theta) * gx, math.sin(theta) * gy + math.cos(theta) * gx], -1)
    return pos.reshape(-1, 2) + offset


def exact_data(rng):
    """``(obj, mask, positions, patches, offsets)``: exact patches on a jittered integer scan plus random offsets."""
    obj = PlaneWaves(rng, min_period=12.0)
    mask = circular_mask()
    pos = integer_scan(rng)
    patches = cut_patches(obj, pos, mask)
    offsets = rng.uniform(-math.pi, math.pi, len(pos))
    patches += offsets[:, None, None]
    return obj, mask, pos, patches, offsets
