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
import torch
import torch.nn.functional as F

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
        from skimage.transform import resize  # noqa: PLC0415 - heavy import, only needed here

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

    @classmethod
    def from_skimage(cls, names: Sequence[str] = SKIMAGE_PHOTOS, **kwargs) -> PhotoSource:
        """The photographs installed with scikit-image (read locally, never downloaded)."""
        import skimage.data  # noqa: PLC0415

        return cls([getattr(skimage.data, name)() for name in names], **kwargs)

    @classmethod
    def from_folder(cls, folder: str | Path, **kwargs) -> PhotoSource:
        """All png/jpg/tif/bmp images in ``folder`` (not recursive)."""
        import skimage.io  # noqa: PLC0415

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
        atlas = self.atlas.to(device)
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
        cos, sin = torch.cos(angle) * half, torch.sin(angle) * half
        theta = torch.stack(
            [torch.stack([cos * flip, -sin, centre[:, 0]], -1), torch.stack([sin * flip, cos, centre[:, 1]], -1)], 1
        )
        grid = F.affine_grid(theta, (n, 1, h, w), align_corners=False)  # (n, h, w, 2) in tile coordinates
        # map tile coordinates to atlas rows: tiles are stacked along the first axis of a tall image
        grid_y = (grid[..., 1] + 1 + 2 * index[:, None, None]) / self.n_images - 1
        grid = torch.stack([grid[..., 0], grid_y], -1).reshape(1, n * h, w, 2)
        tall = atlas.reshape(1, 1, self.n_images * _TILE, _TILE)
        out = F.grid_sample(tall, grid, mode="bilinear", padding_mode="border", align_corners=False)
        out = out.reshape(n, h, w)
        gamma = torch.exp(_uniform(n, math.log(self.gamma_range[0]), math.log(self.gamma_range[1]), generator))
        out = _stretch(out).clamp_min(0) ** gamma[:, None, None]
        invert = torch.rand(n, generator=generator, device=device) < 0.5
        return _stretch(torch.where(invert[:, None, None], 1 - out, out))


def _stretch(images: torch.Tensor) -> torch.Tensor:
    """Min-max stretch each image to [0, 1] (constant images become 0)."""
    lo = images.amin(dim=(-2, -1), keepdim=True)
    hi = images.amax(dim=(-2, -1), keepdim=True)
    return (images - lo) / (hi - lo).clamp_min(1e-6)


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

        Atoms are splatted bilinearly as points on a grid twice the size (no wrap-around) and blurred with a
        per-sample Gaussian by FFT.
        """
        device = generator.device
        h, w = shape
        pad = (2 * h, 2 * w)
        extent = torch.tensor([pad[0] * sampling[0], pad[1] * sampling[1]], device=device, dtype=torch.float32)  # Å

        a = _uniform(n, *self.spacing_range, generator)
        gamma = _uniform(n, math.pi / 3, math.pi / 2, generator)  # angle between the lattice vectors
        b = a * _uniform(n, 0.8, 1.25, generator)
        rot = _uniform(n, 0, 2 * math.pi, generator)
        a1 = torch.stack([torch.cos(rot), torch.sin(rot)], -1) * a[:, None]
        a2 = torch.stack([torch.cos(rot + gamma), torch.sin(rot + gamma)], -1) * b[:, None]
        # enough sites to cover the padded grid for the smallest cell
        k = int(math.ceil(float(extent.max()) / (self.spacing_range[0] * 0.8 * math.sin(math.pi / 3)))) // 2 + 1
        idx = torch.arange(-k, k + 1, device=device, dtype=torch.float32)
        ii, jj = (t.reshape(1, -1, 1) for t in torch.meshgrid(idx, idx, indexing="ij"))
        origin = extent / 2 + torch.rand(n, 1, 2, generator=generator, device=device) * a[:, None, None]
        sites = origin + ii * a1[:, None, :] + jj * a2[:, None, :]  # (n, S, 2) in Å
        frac = torch.rand(n, 1, 2, generator=generator, device=device)
        second = sites + frac[..., :1] * a1[:, None, :] + frac[..., 1:] * a2[:, None, :]
        second_weight = torch.where(
            torch.rand(n, generator=generator, device=device) < 0.5, 0.0, _uniform(n, 0.2, 1.0, generator)
        )
        vacancy = _uniform(n, *self.vacancy_range, generator)
        positions = torch.cat([sites, second], 1)
        weights = torch.cat(
            [torch.ones_like(sites[..., 0]), second_weight[:, None].expand_as(second[..., 0])], 1
        ) * (torch.rand(positions.shape[:2], generator=generator, device=device) >= vacancy[:, None])

        # amorphous samples: random atom clouds instead of a lattice
        n_atoms = positions.shape[1]
        density = _uniform(n, 0.05, 0.3, generator)  # atoms per Å²
        cloud = torch.rand(n, n_atoms, 2, generator=generator, device=device) * extent
        cloud_weight = _uniform(n * n_atoms, 0.3, 1.0, generator).reshape(n, n_atoms) * (
            torch.rand(n, n_atoms, generator=generator, device=device)
            < (density * extent.prod() / n_atoms)[:, None]
        )
        amorphous = torch.rand(n, generator=generator, device=device) < self.amorphous_fraction
        positions = torch.where(amorphous[:, None, None], cloud, positions)
        weights = torch.where(amorphous[:, None], cloud_weight, weights)

        sigma = _uniform(n, *self.sigma_range, generator)
        image = _splat(positions / torch.tensor(sampling, device=device, dtype=torch.float32), weights, pad)
        qx = torch.fft.fftfreq(pad[0], d=sampling[0], device=device)[:, None]
        qy = torch.fft.fftfreq(pad[1], d=sampling[1], device=device)[None, :]
        blur = torch.exp(-2 * math.pi**2 * sigma[:, None, None] ** 2 * (qx**2 + qy**2)[None])
        image = torch.fft.ifft2(torch.fft.fft2(image) * blur).real
        r0, c0 = (pad[0] - h) // 2, (pad[1] - w) // 2
        return _stretch(image[:, r0 : r0 + h, c0 : c0 + w])


def _splat(positions_px: torch.Tensor, weights: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Add point weights at sub-pixel positions (n, S, 2) onto (n, H, W) grids with bilinear weights."""
    n = positions_px.shape[0]
    h, w = shape
    base = torch.floor(positions_px)
    frac = positions_px - base
    base = base.to(torch.int64)
    out = torch.zeros(n * h * w, device=positions_px.device)
    batch = torch.arange(n, device=positions_px.device)[:, None] * (h * w)
    for dr in (0, 1):
        for dc in (0, 1):
            r = base[..., 0] + dr
            c = base[..., 1] + dc
            f = (frac[..., 0] if dr else 1 - frac[..., 0]) * (frac[..., 1] if dc else 1 - frac[..., 1])
            inside = (r >= 0) & (r < h) & (c >= 0) & (c < w)
            index = (batch + r.clamp(0, h - 1) * w + c.clamp(0, w - 1)).flatten()
            out.index_add_(0, index, (weights * f * inside).flatten())
    return out.reshape(n, h, w)


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
        qy = torch.fft.fftfreq(w, device=device)[None, :]
        q = torch.sqrt(qx**2 + qy**2).clamp_min(1.0 / max(h, w))
        beta = _uniform(n, *self.beta_range, generator)
        filt = q[None] ** (-beta[:, None, None] / 2)
        return _stretch(torch.fft.ifft2(torch.fft.fft2(noise) * filt).real)


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
                out[idx] = source.sample(len(idx), shape, sampling, generator)
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
