"""Sources of training phase objects: photographs, a user's image folder, procedural images.

Every source draws a batch of images with values in [0, 1] on a grid of given shape and real-space sampling:
``source.sample(n, shape, sampling, generator) -> torch.Tensor (n, H, W)``. The simulator scales them to phase
(rad). All sampling is batched torch code, so it runs on the CPU or a CUDA device alike (the generator's device
decides).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import skimage.data
import skimage.io
import torch
import torch.nn.functional as F
from skimage.transform import resize

#: scikit-image photographs that ship inside the package (no download needed).
SKIMAGE_PHOTOS: tuple[str, ...] = (
    "astronaut", "brick", "camera", "cat", "cell", "clock", "coffee", "coins", "grass", "gravel",
    "hubble_deep_field", "immunohistochemistry", "moon", "retina", "rocket", "page", "text",
)  # fmt: skip
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
_TILE = 512


def _uniform(n: int, low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=generator, device=generator.device)


def _to_gray(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim == 3:
        image = image[..., :3].astype(np.float64) @ np.array([0.2125, 0.7154, 0.0721])
    if image.ndim != 2:
        raise ValueError(f"an image must be 2-D (grey) or 3-D (colour), got shape {image.shape}")
    image = image.astype(np.float64)
    lo, hi = np.percentile(image, [0.5, 99.5])
    if hi <= lo:
        raise ValueError("an image is constant: it carries no phase structure")
    return np.clip((image - lo) / (hi - lo), 0, 1)


class PhotoSource:
    """Augmented crops of photographs: random photo, scale, rotation, flip, position, contrast and gamma.

    The photos are resized to 512×512 tiles of one atlas; each sample is a rotated, scaled crop resampled
    bilinearly to the output grid, so the number of distinct objects is effectively unlimited.

    Parameters
    ----------
    images
        Grey or colour images (any size ≥ 32×32).
    scale_range
        Range of the crop's side as a multiple of the output side (a scale of 4 crops 4× the output).
    gamma_range
        Range of the random gamma applied to the intensities (log-uniform).
    """

    def __init__(
        self,
        images: Sequence[np.ndarray],
        scale_range: tuple[float, float] = (1.0, 8.0),
        gamma_range: tuple[float, float] = (0.5, 2.0),
    ):
        if len(images) == 0:
            raise ValueError("PhotoSource needs at least one image")
        tiles = []
        for image in images:
            gray = _to_gray(image)
            if min(gray.shape) < 32:
                raise ValueError(f"an image of shape {gray.shape} is too small (need at least 32×32 pixels)")
            tiles.append(resize(gray, (_TILE, _TILE), anti_aliasing=True, preserve_range=True))
        self.n_images = len(tiles)
        self.atlas = torch.from_numpy(np.stack(tiles).astype(np.float32))
        if not (0 < scale_range[0] <= scale_range[1]) or not (0 < gamma_range[0] <= gamma_range[1]):
            raise ValueError("scale_range and gamma_range must be increasing positive pairs")
        self.scale_range = scale_range
        self.gamma_range = gamma_range

    def _atlas_on(self, device: torch.device) -> torch.Tensor:
        """The atlas on ``device`` (copied once per device, not per batch)."""
        if self.atlas.device == device:
            return self.atlas
        cache = self.__dict__.setdefault("_atlas_cache", {})
        if str(device) not in cache:
            cache[str(device)] = self.atlas.to(device)
        return cache[str(device)]

    @classmethod
    def from_skimage(cls, names: Sequence[str] = SKIMAGE_PHOTOS, **kwargs) -> PhotoSource:
        """The photographs installed with scikit-image (read locally, never downloaded)."""
        return cls([getattr(skimage.data, name)() for name in names], **kwargs)

    @classmethod
    def from_folder(cls, folder: str | Path, **kwargs) -> PhotoSource:
        """All png/jpg/tif/bmp images in ``folder`` (not recursive)."""
        folder = Path(folder)
        if not folder.is_dir():
            raise ValueError(f"image folder {str(folder)!r} does not exist or is not a folder")
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ValueError(f"image folder {str(folder)!r} holds no {'/'.join(IMAGE_SUFFIXES)} images")
        images = []
        for path in files:
            try:
                images.append(skimage.io.imread(path))
            except Exception as exc:
                raise ValueError(f"cannot read image {str(path)!r}: {exc}") from exc
        return cls(images, **kwargs)

    def sample(
        self, n: int, shape: tuple[int, int], sampling: tuple[float, float], generator: torch.Generator
    ) -> torch.Tensor:
        """``n`` augmented crops of ``shape`` with values in [0, 1] (``sampling`` is unused: photos have no scale)."""
        device = generator.device
        atlas = self._atlas_on(device)
        h, w = shape
        index = torch.randint(self.n_images, (n,), generator=generator, device=device)
        scale = torch.exp(_uniform(n, math.log(self.scale_range[0]), math.log(self.scale_range[1]), generator))
        angle = _uniform(n, 0, 2 * math.pi, generator)
        flip = torch.where(torch.rand(n, generator=generator, device=device) < 0.5, -1.0, 1.0)
        # crop half-size in normalised tile units ([-1, 1] spans _TILE pixels); keep the rotated crop inside
        half = scale * max(h, w) / _TILE
        half = torch.clamp(half, max=1 / math.sqrt(2) * 0.99)
        room = 1 - half * math.sqrt(2)
        centre = (2 * torch.rand(n, 2, generator=generator, device=device) - 1) * room[:, None]
        gamma = torch.exp(_uniform(n, math.log(self.gamma_range[0]), math.log(self.gamma_range[1]), generator))
        invert = torch.rand(n, generator=generator, device=device) < 0.5

        # Resample in the order (photo, crop size), so consecutive crops read the same tile: the atlas is far
        # larger than the caches and random reads from it otherwise dominate the cost. The order is undone below.
        order = torch.argsort(index * 16.0 + half, stable=True)
        index, half, angle, flip, centre = index[order], half[order], angle[order], flip[order], centre[order]
        cos, sin = torch.cos(angle) * half, torch.sin(angle) * half
        # the affine map [[cos·flip, -sin, cx], [sin·flip, cos, cy]] of the output grid (align_corners=False), with
        # the tile's y coordinate mapped to the rows of the tall atlas where the tiles are stacked
        xs = (2 * torch.arange(w, device=device, dtype=torch.float32) + 1) / w - 1
        ys = (2 * torch.arange(h, device=device, dtype=torch.float32) + 1) / h - 1
        rows = 1.0 / self.n_images
        grid = torch.empty(n, h, w, 2, device=device)
        torch.add(
            (cos * flip)[:, None, None] * xs - sin[:, None, None] * ys[:, None],
            centre[:, 0, None, None],
            out=grid[..., 0],
        )
        torch.add(
            ((sin * flip * rows)[:, None, None] * xs + (cos * rows)[:, None, None] * ys[:, None]),
            ((centre[:, 1] + 1 + 2 * index) * rows - 1)[:, None, None],
            out=grid[..., 1],
        )
        tall = atlas.reshape(1, 1, self.n_images * _TILE, _TILE)
        grid = grid.reshape(1, n * h, w, 2)
        crops = F.grid_sample(tall, grid, mode="bilinear", padding_mode="border", align_corners=False).reshape(n, h, w)
        # min-max stretch (exactly 0 and 1 at the extremes), random gamma, random inversion (constant crops stay 0)
        lo, hi = crops.amin(dim=(-2, -1)), crops.amax(dim=(-2, -1))
        out = crops.sub_(lo[:, None, None]).div_((hi - lo).clamp_min(1e-30)[:, None, None])
        out = out.log_().mul_(gamma[order][:, None, None]).exp_()
        inv = invert[order]
        sign = torch.where(inv, -1.0, 1.0)
        offset = (inv & (hi > lo)).to(out.dtype)
        out = torch.addcmul(offset[:, None, None], out, sign[:, None, None])
        return out.index_select(0, torch.argsort(order))  # back to the order of the draws


def _stretch(images: torch.Tensor) -> torch.Tensor:
    """Min-max stretch each image to [0, 1] (constant images become 0)."""
    lo, hi = images.amin(dim=(-2, -1)), images.amax(dim=(-2, -1))
    return (images - lo[..., None, None]).div_((hi - lo).clamp_min(1e-6)[..., None, None])


class LatticeSource:
    """Atom-like phase images: Gaussian atoms on random 2-D lattices with a basis, vacancies and thermal blur.

    Parameters
    ----------
    spacing_range
        Range of the lattice constant (Å).
    sigma_range
        Range of the atoms' Gaussian width, thermal blur included (Å).
    vacancy_range
        Range of the fraction of empty sites.
    amorphous_fraction
        Fraction of samples that are random (non-periodic) atom clouds instead of lattices.
    """

    def __init__(
        self,
        spacing_range: tuple[float, float] = (1.2, 4.0),
        sigma_range: tuple[float, float] = (0.15, 0.5),
        vacancy_range: tuple[float, float] = (0.0, 0.2),
        amorphous_fraction: float = 0.2,
    ):
        self.spacing_range = spacing_range
        self.sigma_range = sigma_range
        self.vacancy_range = vacancy_range
        self.amorphous_fraction = amorphous_fraction

    def sample(
        self, n: int, shape: tuple[int, int], sampling: tuple[float, float], generator: torch.Generator
    ) -> torch.Tensor:
        """``n`` lattice images of ``shape`` on a grid of ``sampling`` (Å/pixel), values in [0, 1].

        Atoms are splatted bilinearly as points on a grid padded by the atoms' reach (4σ, so the blur does not wrap
        around into the image) and blurred with a per-sample Gaussian (the FFT convolution on that periodic grid,
        done as two matrix products that keep only the image). Only the atoms on the padded grid are made: lattice
        rows are clipped to it, amorphous clouds get a Poisson number of atoms.
        """
        device = generator.device
        h, w = shape
        s0, s1 = float(sampling[0]), float(sampling[1])
        reach = 4 * float(self.sigma_range[1])  # Å; farther away an atom adds less than e^-8 of its peak
        grid = (h + 2 * math.ceil(reach / s0), w + 2 * math.ceil(reach / s1))
        extent = (grid[0] * s0, grid[1] * s1)  # Å

        # per sample, uniform in these ranges: spacing a, angle γ between the lattice vectors, b/a, rotation, origin
        # (2) and second atom (2) in cell coordinates, second atom present (< 0.5: no), its weight, vacancies,
        # amorphous density (atoms/Å²), amorphous (< amorphous_fraction: yes), atom width σ
        ranges = [
            self.spacing_range, (math.pi / 3, math.pi / 2), (0.8, 1.25), (0, 2 * math.pi), (0, 1), (0, 1), (0, 1),
            (0, 1), (0, 1), (0.2, 1.0), self.vacancy_range, (0.05, 0.3), (0, 1), self.sigma_range,
        ]  # fmt: skip
        low, high = torch.tensor(ranges, dtype=torch.float32, device=device).T
        p = torch.rand(n, len(ranges), generator=generator, device=device).mul_(high - low).add_(low)
        a, gamma, ratio, rot = p[:, 0], p[:, 1], p[:, 2], p[:, 3]
        second_weight = torch.where(p[:, 8] < 0.5, 0.0, p[:, 9])
        vacancy, density, sigma = p[:, 10], p[:, 11], p[:, 13]
        amorphous = p[:, 12] < self.amorphous_fraction

        # lattice samples: a lattice with a two-atom basis is two lattices (the second only where it has a weight)
        angles = torch.stack([rot, rot + gamma], 1)
        cells = torch.stack([torch.cos(angles), torch.sin(angles)], -1) * torch.stack([a, a * ratio], 1)[..., None]
        crystal = torch.nonzero(~amorphous).flatten()
        second = crystal[second_weight[crystal] > 0]
        lattices = torch.cat([crystal, second])
        origin = p[lattices, 4:6]
        origin[len(crystal) :] += p[second, 6:8]
        weight = torch.cat([torch.ones(len(crystal), device=device), second_weight[second]])
        lattice, rows_c, cols_c = _lattice_sites(cells[lattices], origin, extent)
        sample_c = lattices[lattice]
        keep = torch.rand(len(sample_c), generator=generator, device=device) >= vacancy[sample_c]
        weight_c = weight[lattice] * keep

        # amorphous samples: random atom clouds instead of a lattice
        cloud = torch.nonzero(amorphous).flatten()
        n_atoms = torch.poisson(density[cloud] * (extent[0] * extent[1]), generator=generator).long()
        sample_a = cloud.repeat_interleave(n_atoms)
        atoms = torch.rand(len(sample_a), 3, generator=generator, device=device)

        image = _splat(
            torch.cat([sample_c, sample_a]),
            torch.cat([rows_c / s0, atoms[:, 0] * grid[0]]),
            torch.cat([cols_c / s1, atoms[:, 1] * grid[1]]),
            torch.cat([weight_c, atoms[:, 2].mul_(0.7).add_(0.3)]),  # amorphous atoms weigh 0.3 to 1
            n,
            grid,
        )
        blur = _blur_matrices(sigma, grid, (h, w), (s0, s1))
        image = torch.matmul(torch.matmul(blur[0], image), blur[1].transpose(-1, -2))
        return _stretch(image)


def _blur_matrices(
    sigma: torch.Tensor, grid: tuple[int, int], shape: tuple[int, int], sampling: tuple[float, float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample matrices (n, h, H) and (n, w, W) of the circular Gaussian blur on a (H, W) grid, restricted to
    the centred output window (h, w): ``out = Bx @ image @ By.T`` is the centre of ``ifft2(fft2(image)·G)``.

    ``B[i, j] = kernel[(i + first - j) mod H]`` with the kernel the inverse real DFT of ``G(q) = exp(-2π²σ²q²)``,
    written as one matrix product of ``G`` with the cosines of that DFT.
    """
    out = []
    for size, length, d in zip(grid, shape, sampling):
        q = torch.arange(size // 2 + 1, device=sigma.device, dtype=torch.float32)
        weight = torch.full_like(q, 2.0 / size)
        weight[0] = 1.0 / size
        if size % 2 == 0:
            weight[-1] = 1.0 / size
        first = (size - length) // 2
        lag = torch.arange(length, device=sigma.device)[:, None] + first - torch.arange(size, device=sigma.device)
        cosines = torch.cos((2 * math.pi / size) * q[:, None] * lag.flatten().float()) * weight[:, None]
        transfer = torch.exp((-2 * math.pi**2 / (size * d) ** 2) * sigma[:, None] ** 2 * q**2)
        out.append((transfer @ cosines).reshape(-1, length, size))
    if grid[0] == grid[1] and shape[0] == shape[1] and sampling[0] == sampling[1]:
        out[1] = out[0]
    return out[0], out[1]


def _lattice_sites(cells: torch.Tensor, origin: torch.Tensor, extent: tuple[float, float]) -> tuple[torch.Tensor, ...]:
    """The sites ``c + (i + o1)·a1 + (j + o2)·a2`` of L lattices inside the rectangle ``[0, extent)`` (Å).

    ``cells`` (L, 2, 2) holds the lattice vectors a1, a2 (Å), ``origin`` (L, 2) the offsets ``(o1, o2)`` in cell
    coordinates, ``c`` is the centre of the rectangle. Each lattice row ``i`` is clipped to the rectangle, so only
    sites inside it are made. Returns the lattice of every site and its two coordinates (Å).
    """
    device = cells.device
    if len(cells) == 0:
        empty = torch.zeros(0, device=device)
        return torch.zeros(0, dtype=torch.int64, device=device), empty, empty
    a1, a2 = cells[:, 0], cells[:, 1]
    ext = torch.tensor(extent, dtype=torch.float32, device=device)
    # the rows that reach the rectangle have |i + o1| <= R |a2| / |a1 × a2|, R its half diagonal; +2: o1 < 2
    area = (a1[:, 0] * a2[:, 1] - a1[:, 1] * a2[:, 0]).abs()
    k = int(math.ceil(float((a2.norm(dim=-1) / area).max()) * 0.5 * math.hypot(*extent))) + 2
    i = torch.arange(-k, k + 1, dtype=torch.float32, device=device)
    base = ext / 2 + (i[:, None] + origin[:, None, :1]) * a1[:, None, :]  # (L, I, 2): the point j = -o2 of each row
    step = torch.where(a2.abs() < 1e-6, 1e-6, a2)[:, None, :]
    t0, t1 = base.neg() / step, (ext - base) / step  # the row is inside between these multiples of a2, per axis
    first = torch.ceil(torch.minimum(t0, t1).amax(-1) - origin[:, 1:2]).flatten()
    count = (torch.floor(torch.maximum(t0, t1).amin(-1) - origin[:, 1:2]).flatten() - first + 1).clamp_min_(0)
    count = count.long()
    row = torch.repeat_interleave(count)
    j = torch.arange(len(row), device=device) - (torch.cumsum(count, 0) - count)[row] + first[row]
    lattice = row // len(i)
    pos = base.reshape(-1, 2)[row] + (j + origin[lattice, 1])[:, None] * a2[lattice]
    inside = ((pos >= 0) & (pos < ext)).all(-1)  # rounding at the edges
    pos = pos[inside]
    return lattice[inside], pos[:, 0], pos[:, 1]


def _splat(
    samples: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, weights: torch.Tensor, n: int, shape: tuple[int, int]
) -> torch.Tensor:
    """Add point weights at sub-pixel positions (pixels) onto n periodic (n, H, W) grids with bilinear weights."""
    h, w = shape
    r0, c0 = torch.floor(rows), torch.floor(cols)
    fr, fc = rows - r0, cols - c0
    r0, c0 = r0.long() % h, c0.long() % w
    r1, c1 = (r0 + 1) % h, (c0 + 1) % w
    r0, r1, base = r0 * w, r1 * w, samples * (h * w)
    index = torch.cat([base + r0 + c0, base + r0 + c1, base + r1 + c0, base + r1 + c1])
    value = torch.cat([(1 - fr) * (1 - fc), (1 - fr) * fc, fr * (1 - fc), fr * fc]) * weights.repeat(4)
    out = torch.zeros(n * h * w, device=rows.device)
    return out.index_add_(0, index, value).reshape(n, h, w)


class NoiseSource:
    """High-entropy procedural images: Gaussian noise filtered to a random power-law spectrum 1/q^β.

    Parameters
    ----------
    beta_range
        Range of the spectral exponent β (0 = white noise, 4 = very smooth).
    """

    def __init__(self, beta_range: tuple[float, float] = (1.0, 4.0)):
        self.beta_range = beta_range

    def sample(
        self, n: int, shape: tuple[int, int], sampling: tuple[float, float], generator: torch.Generator
    ) -> torch.Tensor:
        """``n`` filtered-noise images of ``shape``, values in [0, 1]."""
        device = generator.device
        h, w = shape
        noise = torch.randn(n, h, w, generator=generator, device=device)
        qx = torch.fft.fftfreq(h, device=device)[:, None]
        qy = torch.fft.rfftfreq(w, device=device)[None, :]  # real noise, real filter: half the spectrum suffices
        log_q = torch.log(torch.sqrt(qx**2 + qy**2).clamp_min(1.0 / max(h, w)))
        beta = _uniform(n, *self.beta_range, generator)
        filt = torch.exp(log_q * (-beta[:, None, None] / 2))  # q^(-β/2)
        return _stretch(torch.fft.irfft2(torch.fft.rfft2(noise).mul_(filt), s=(h, w)))


class MixedSource:
    """Draw each sample from one of several sources with given weights."""

    def __init__(self, sources: Sequence, weights: Sequence[float]):
        if len(sources) != len(weights) or not sources:
            raise ValueError("MixedSource needs one weight per source and at least one source")
        weights = torch.as_tensor(weights, dtype=torch.float64)
        if torch.any(weights < 0) or weights.sum() <= 0:
            raise ValueError("MixedSource weights must be non-negative with a positive sum")
        self.sources = list(sources)
        self.weights = weights / weights.sum()

    def sample(
        self, n: int, shape: tuple[int, int], sampling: tuple[float, float], generator: torch.Generator
    ) -> torch.Tensor:
        """``n`` images, each from a source chosen with the mixture's weights."""
        device = generator.device
        choice = torch.multinomial(self.weights.to(device), n, replacement=True, generator=generator)
        out = torch.empty(n, *shape, device=device)
        for k, source in enumerate(self.sources):
            idx = torch.nonzero(choice == k).flatten()
            if len(idx):
                out.index_copy_(0, idx, source.sample(len(idx), shape, sampling, generator))
        return out


def default_source(image_folder: str | Path | None = None, mix: dict[str, float] | None = None) -> MixedSource:
    """The training mix: photographs (scikit-image or ``image_folder``), lattices and filtered noise.

    ``mix`` maps ``"photos"``, ``"lattice"``, ``"noise"`` to weights (default 0.5, 0.35, 0.15).
    """
    mix = dict({"photos": 0.5, "lattice": 0.35, "noise": 0.15}, **(mix or {}))
    unknown = set(mix) - {"photos", "lattice", "noise"}
    if unknown:
        raise ValueError(f"unknown training-set sources {sorted(unknown)}; use photos, lattice, noise")
    photos = PhotoSource.from_folder(image_folder) if image_folder else PhotoSource.from_skimage()
    return MixedSource([photos, LatticeSource(), NoiseSource()], [mix["photos"], mix["lattice"], mix["noise"]])
