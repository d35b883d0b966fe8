"""Fourier ring correlation (FRC) and sub-pixel image registration.

``fourier_ring_correlation`` compares two images of the same field of view ring by ring in Fourier space,

    FRC(q_k) = Re sum_{ring k} F1 conj(F2) / sqrt( sum_{ring k} |F1|^2  sum_{ring k} |F2|^2 ),

and reports the resolution (Å) where the curve first falls below a threshold: 0.5, 0.143 or the half-bit curve of
van Heel & Schatz (J. Struct. Biol. 151, 250 (2005)),

    T_1/2bit(n) = (0.2071 + 1.9102 / sqrt(n)) / (1.2071 + 0.9102 / sqrt(n)),

``n`` the number of Fourier pixels in the ring (both Friedel halves counted, as van Heel & Schatz count the voxels
of a shell; the apodisation window's loss of independent pixels is not accounted for, as usual). ``T(1) = 1`` and
``T`` decreases with ``n``, so it stays below 1 on every ring except a ring of a single pixel (the DC ring).
(py4DSTEM's ``2 / sqrt(n / 2)`` exceeds 1 on its first rings.)

Resolution: the first ring after DC where the FRC falls below the threshold, linearly interpolated with the ring
before it; NaN when it never falls below up to Nyquist (see :meth:`FRCResult.resolution`).

``register_images`` aligns one image onto another by phase correlation with an upsampled-DFT refinement of the
peak, then a few Gauss-Newton steps on the squared difference (translation only), through the same array module
(numpy or CuPy).

Conventions
-----------
* Images are 2-D real arrays on the same grid; ``pixel_size`` is in Å (one number, or ``(row, col)``).
* Frequencies: ``q = sqrt(qy^2 + qx^2)`` in Å⁻¹ with ``qy = fftfreq(ny, pixel_size_row)``; rectangular images are
  handled directly: the ring width is ``bin_width`` times the coarser of the two frequency spacings
  ``1 / (ny * p_row)``, ``1 / (nx * p_col)``, so every ring gets samples from both axes. Rings are centred on
  ``q_k = k * dq`` and go up to the Nyquist frequency of the coarser axis (``min(0.5 / p)``).
* Results are returned as numpy arrays on the host (they are short 1-D curves).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from .backend import asnumpy, get_array_module

__all__ = ["FRCResult", "Registration", "fourier_ring_correlation", "half_bit_threshold", "register_images"]

_THRESHOLD_NAMES = {"half_bit": "half_bit", "half-bit": "half_bit", "halfbit": "half_bit", "1/2-bit": "half_bit"}

#: rings after DC that may lie below a threshold before the curve first rises above it (apodisation dip)
LEADING_RINGS = 1


def half_bit_threshold(n_per_ring) -> np.ndarray:
    """Half-bit information threshold (van Heel & Schatz 2005) for rings of ``n`` Fourier pixels.

    ``n <= 0`` (an empty ring) gives NaN. The curve is 1 for ``n = 1`` and decreases towards 0.2071 / 1.2071.
    """
    n = np.asarray(n_per_ring, dtype=np.float64)
    out = np.full(n.shape, np.nan)
    ok = n > 0
    inv = 1.0 / np.sqrt(n[ok])
    out[ok] = (0.2071 + 1.9102 * inv) / (1.2071 + 0.9102 * inv)
    return out


@dataclass
class FRCResult:
    """A Fourier ring correlation curve.

    Attributes
    ----------
    q:
        Ring centres in Å⁻¹ (``q[0] = 0`` is the DC ring), numpy.
    frc:
        The correlation on each ring, in [-1, 1]. NaN where a ring is empty or both images have no power there
        (e.g. the DC ring after the mean is removed by the apodisation).
    half_bit:
        The half-bit threshold curve on the same rings.
    n_per_ring:
        Number of Fourier pixels per ring (fractional with ``binning="linear"``).
    pixel_size:
        ``(row, col)`` pixel size in Å used for the frequencies.
    shape:
        Shape of the images that were compared (after cropping by ``register=True``).
    shift:
        With ``register=True``: the displacement of ``image_2`` relative to ``image_1`` in pixels (row, col); else
        ``None``.
    """

    q: np.ndarray
    frc: np.ndarray
    half_bit: np.ndarray
    n_per_ring: np.ndarray
    pixel_size: tuple[float, float]
    shape: tuple[int, int]
    shift: np.ndarray | None = None
    resolutions: dict = field(init=False)

    def __post_init__(self):
        self.resolutions = {
            "0.5": self.resolution(0.5),
            "0.143": self.resolution(0.143),
            "half_bit": self.resolution("half_bit"),
        }

    def threshold_curve(self, threshold: float | str) -> np.ndarray:
        """The threshold on every ring: a constant, or the half-bit curve for ``"half_bit"``."""
        if isinstance(threshold, str):
            name = _THRESHOLD_NAMES.get(threshold.lower().replace(" ", ""))
            if name is None:
                raise ValueError(f"threshold must be a number or 'half_bit', got {threshold!r}")
            return self.half_bit
        value = float(threshold)
        if not (-1.0 < value < 1.0):
            raise ValueError(f"a numeric FRC threshold must lie in (-1, 1), got {threshold}")
        return np.full(self.q.shape, value)

    def resolution(self, threshold: float | str = 0.143) -> float:
        """Resolution in Å (``1 / q``) where the FRC first falls below ``threshold`` after having been above it.

        The search starts at the first ring after DC (ring 1) and skips empty/NaN rings. The lowest ring of a small,
        apodised field of view can dip below the threshold (the window dominates it): up to ``LEADING_RINGS`` such
        leading rings are passed over, and the crossing is the first fall below the threshold after the curve has
        been above it, interpolated linearly between the last ring above and the first ring below.

        Returns NaN when the curve never falls below the threshold up to the Nyquist frequency (the resolution is
        then at least ``2 * pixel_size``, the data cannot tell more). If it never rises above the threshold, returns
        ``1 / q[1]`` (the field of view: no resolution to speak of).
        """
        thr = self.threshold_curve(threshold)
        d = self.frc - thr
        prev = None
        for k in range(1, len(self.q)):
            if not np.isfinite(d[k]):
                continue
            if d[k] < 0:
                if prev is not None:
                    q0, q1, d0, d1 = self.q[prev], self.q[k], d[prev], d[k]
                    qc = q0 + (q1 - q0) * d0 / (d0 - d1)
                    return float(1.0 / qc)
                if k > LEADING_RINGS:
                    return float(1.0 / self.q[1])
            else:
                prev = k
        return float("nan") if prev is not None else float(1.0 / self.q[1])


class Registration(NamedTuple):
    """Result of :func:`register_images`: ``shift`` (pixels, row/col) and the ``aligned`` second image."""

    shift: np.ndarray
    aligned: Any


# --------------------------------------------------------------------------------------------------------------
# helpers


def _pixel_pair(pixel_size) -> tuple[float, float]:
    arr = np.asarray(pixel_size, dtype=np.float64).ravel()
    if arr.size == 1:
        arr = np.repeat(arr, 2)
    if arr.size != 2 or not np.all(np.isfinite(arr)) or np.any(arr <= 0):
        raise ValueError(f"pixel_size must be a positive number of Å (or a (row, col) pair), got {pixel_size!r}")
    return float(arr[0]), float(arr[1])


def _check_pair(xp, image_1, image_2):
    a = xp.asarray(image_1)
    b = xp.asarray(image_2)
    for name, img in (("image_1", a), ("image_2", b)):
        if img.ndim != 2:
            raise ValueError(f"{name} must be a 2-D image, got shape {tuple(img.shape)}")
        if xp.iscomplexobj(img):
            raise ValueError(f"{name} must be real (e.g. a phase image), got dtype {img.dtype}")
        if min(img.shape) < 4:
            raise ValueError(f"{name} is too small for Fourier analysis: shape {tuple(img.shape)}")
    if a.shape != b.shape:
        raise ValueError(f"image_1 and image_2 must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    a = a.astype(xp.float64)
    b = b.astype(xp.float64)
    if not bool(xp.isfinite(a).all()) or not bool(xp.isfinite(b).all()):
        raise ValueError("the images contain NaN or infinite values (crop to the covered area first)")
    return a, b


def tukey_window(xp, n: int, taper: float):
    """1-D Tukey window of length ``n``: cosine tapers over ``taper / 2`` of the length at each end (1 = Hann)."""
    if taper <= 0:
        return xp.ones(n)
    x = xp.arange(n, dtype=xp.float64) / max(n - 1, 1)
    w = xp.ones(n)
    edge = taper / 2.0
    lo = x < edge
    hi = x > 1.0 - edge
    w[lo] = 0.5 * (1.0 - xp.cos(2.0 * math.pi * x[lo] / taper))
    w[hi] = 0.5 * (1.0 - xp.cos(2.0 * math.pi * (1.0 - x[hi]) / taper))
    return w


def _apodise(xp, img, taper: float):
    """Remove the window-weighted mean and multiply by a separable Tukey window."""
    win = tukey_window(xp, img.shape[0], taper)[:, None] * tukey_window(xp, img.shape[1], taper)[None, :]
    mean = (img * win).sum() / win.sum()
    return (img - mean) * win


def _fourier_shift(xp, img, shift):
    """Translate ``img`` by ``shift`` pixels (row, col), periodically: out(r) = img(r - shift)."""
    ky = xp.fft.fftfreq(img.shape[0])[:, None]
    kx = xp.fft.fftfreq(img.shape[1])[None, :]
    ramp = xp.exp(-2j * math.pi * (ky * float(shift[0]) + kx * float(shift[1])))
    return xp.real(xp.fft.ifft2(xp.fft.fft2(img) * ramp))


def _upsampled_cc(xp, spec, centre, half_width: float, upsample: int):
    """Cross-correlation ``sum_k spec(k) exp(2 pi i k . s)`` on a fine grid of ``s`` around ``centre`` (matrix DFT)."""
    ny, nx = spec.shape
    n_fine = int(math.ceil(2 * half_width * upsample)) + 1
    offs = (xp.arange(n_fine, dtype=xp.float64) - (n_fine - 1) / 2.0) / upsample
    sy = float(centre[0]) + offs
    sx = float(centre[1]) + offs
    ky = xp.fft.fftfreq(ny)
    kx = xp.fft.fftfreq(nx)
    ey = xp.exp(2j * math.pi * sy[:, None] * ky[None, :])  # (n_fine, ny)
    ex = xp.exp(2j * math.pi * kx[:, None] * sx[None, :])  # (nx, n_fine)
    cc = xp.real(ey @ spec @ ex)
    return cc, sy, sx


def _parabola_vertex(fm, f0, fp) -> float:
    den = fm - 2.0 * f0 + fp
    if den >= 0 or not math.isfinite(den):
        return 0.0
    return float(np.clip(0.5 * (fm - fp) / den, -0.5, 0.5))


def _gauss_newton_shift(xp, a, b, shift, iterations: int):
    """Refine ``shift`` by weighted least squares ``min_s,c sum w (b(r + s) - a(r) + c)^2`` (Gauss-Newton).

    ``b(r + s)`` and its gradient come from Fourier interpolation; the weight is a Tukey window with wide tapers,
    so the periodic wrap and the ringing of a non-periodic border barely matter. Unlike a windowed correlation
    peak, this estimate has no bias towards zero shift.
    """
    ny, nx = a.shape
    wgt = (tukey_window(xp, ny, 0.5)[:, None] * tukey_window(xp, nx, 0.5)[None, :]).ravel()
    ky = xp.fft.fftfreq(ny)[:, None]
    kx = xp.fft.fftfreq(nx)[None, :]
    fb = xp.fft.fft2(b)
    s = np.array(shift, dtype=np.float64)
    ones = xp.ones(a.size)
    for _ in range(iterations):
        spec = fb * xp.exp(2j * math.pi * (ky * s[0] + kx * s[1]))
        bs = xp.real(xp.fft.ifft2(spec)).ravel()
        gy = xp.real(xp.fft.ifft2(spec * (2j * math.pi) * ky)).ravel()
        gx = xp.real(xp.fft.ifft2(spec * (2j * math.pi) * kx)).ravel()
        jac = xp.stack([gy, gx, ones], axis=1)
        hess = asnumpy(jac.T @ (jac * wgt[:, None]))
        grad = asnumpy(jac.T @ (wgt * (bs - a.ravel())))
        try:
            step = np.linalg.solve(hess, grad)
        except np.linalg.LinAlgError:
            break
        s = s - step[:2]
        if np.abs(step[:2]).max() < 1e-6:
            break
    return s


def register_images(image_1, image_2, *, upsample: int = 20, apodize: bool = True, taper: float = 0.25,
                    refine: bool = True, device: str = "cpu") -> Registration:
    """Sub-pixel translation of ``image_2`` relative to ``image_1`` by phase correlation.

    The normalised cross-power spectrum of the (optionally Tukey-apodised, mean-removed) images is inverted to find
    the integer peak, refined on a grid ``1 / upsample`` pixel fine within ±1.5 px by a matrix DFT and by a parabola
    through the three best samples on each axis. With ``refine=True`` (default) a few Gauss-Newton steps on the
    window-weighted squared difference then remove the bias that windowing gives the correlation peak (typically
    from a few hundredths to about a thousandth of a pixel on smooth images); a step that would move the estimate by
    more than one pixel is rejected.

    Parameters
    ----------
    image_1, image_2:
        2-D real images of the same shape (numpy or CuPy).
    upsample:
        Refinement factor of the DFT grid (``>= 1``; 20 → 0.05 px grid before the parabolic step).
    refine:
        Finish with Gauss-Newton steps on the weighted squared difference (see above).
    apodize, taper:
        Apply a separable Tukey window (``taper`` = tapered fraction, 1 = Hann) before correlating; recommended for
        non-periodic images.
    device:
        ``"cpu"`` (numpy) or ``"gpu"`` (CuPy).

    Returns
    -------
    Registration
        ``shift``: numpy ``(2,)`` float, pixels (row, col): ``image_2`` is ``image_1`` moved by ``+shift``, i.e.
        ``image_2(r) ~ image_1(r - shift)``. ``aligned``: ``image_2`` moved by ``-shift`` (Fourier shift, periodic
        wrap at the borders) so that it overlays ``image_1``; same array type as the inputs.
    """
    xp = get_array_module(device)
    a, b = _check_pair(xp, image_1, image_2)
    if int(upsample) < 1:
        raise ValueError(f"upsample must be >= 1, got {upsample}")
    fa = xp.fft.fft2(_apodise(xp, a, taper) if apodize else a - a.mean())
    fb = xp.fft.fft2(_apodise(xp, b, taper) if apodize else b - b.mean())
    cross = fb * xp.conj(fa)
    mag = xp.abs(cross)
    scale = float(asnumpy(mag.max()))
    if scale == 0.0:
        raise ValueError("cannot register constant images")
    spec = cross / (mag + 1e-6 * scale)
    corr = xp.real(xp.fft.ifft2(spec))
    ny, nx = corr.shape
    peak = np.unravel_index(int(asnumpy(xp.argmax(corr))), (ny, nx))
    coarse = np.array(
        [peak[0] if peak[0] <= ny // 2 else peak[0] - ny, peak[1] if peak[1] <= nx // 2 else peak[1] - nx],
        dtype=np.float64,
    )
    cc, sy, sx = _upsampled_cc(xp, spec, coarse, 1.5, int(upsample))
    cc_h = asnumpy(cc)
    iy, ix = np.unravel_index(int(np.argmax(cc_h)), cc_h.shape)
    step = 1.0 / int(upsample)
    fine = np.array([float(asnumpy(sy[iy])), float(asnumpy(sx[ix]))])
    if 0 < iy < cc_h.shape[0] - 1:
        fine[0] += step * _parabola_vertex(cc_h[iy - 1, ix], cc_h[iy, ix], cc_h[iy + 1, ix])
    if 0 < ix < cc_h.shape[1] - 1:
        fine[1] += step * _parabola_vertex(cc_h[iy, ix - 1], cc_h[iy, ix], cc_h[iy, ix + 1])
    if refine:
        better = _gauss_newton_shift(xp, a, b, fine, iterations=8)
        if np.all(np.isfinite(better)) and np.abs(better - fine).max() <= 1.0:
            fine = better
    aligned = _fourier_shift(xp, b, -fine)
    return Registration(shift=fine, aligned=aligned)


def fourier_ring_correlation(
    image_1,
    image_2,
    pixel_size,
    *,
    bin_width: float = 1.0,
    apodize: bool = True,
    taper: float = 0.25,
    register: bool = False,
    upsample: int = 20,
    binning: str = "nearest",
    device: str = "cpu",
) -> FRCResult:
    """Fourier ring correlation of two images of the same field of view.

    Parameters
    ----------
    image_1, image_2:
        2-D real images of the same shape (numpy or CuPy), e.g. two phase reconstructions (rad).
    pixel_size:
        Pixel size in Å (a number or ``(row, col)``).
    bin_width:
        Ring width in units of the (coarser) Fourier pixel ``1 / (N * pixel_size)``.
    apodize, taper:
        Remove each image's window-weighted mean and multiply both by the same separable Tukey window (``taper`` =
        tapered fraction of each axis; 1.0 = Hann) to suppress the edge discontinuity of non-periodic images. With
        the mean removed the DC ring is NaN. ``apodize=False`` uses the raw images (periodic assumption).
    register:
        First align ``image_2`` onto ``image_1`` with :func:`register_images` (sub-pixel translation) and crop both
        to the area they share (the wrapped border is discarded).
    upsample:
        Registration refinement factor.
    binning:
        ``"nearest"``: each Fourier pixel goes to its nearest ring; ``"linear"``: it is split between the two
        neighbouring rings by linear interpolation (py4DSTEM's ``return_1D_profile`` does this).
    device:
        ``"cpu"`` (numpy) or ``"gpu"`` (CuPy).

    Returns
    -------
    FRCResult
        ``q`` (Å⁻¹), ``frc``, ``half_bit``, ``n_per_ring`` as numpy arrays; ``resolution(threshold)`` and the
        ``resolutions`` dict for 0.5, 0.143 and half-bit (Å; NaN if the curve never crosses).
    """
    xp = get_array_module(device)
    a, b = _check_pair(xp, image_1, image_2)
    py, px = _pixel_pair(pixel_size)
    if not (bin_width > 0 and math.isfinite(bin_width)):
        raise ValueError(f"bin_width must be a positive number of Fourier pixels, got {bin_width}")
    if binning not in ("nearest", "linear"):
        raise ValueError(f"binning must be 'nearest' or 'linear', got {binning!r}")
    if not (0.0 <= taper <= 1.0):
        raise ValueError(f"taper must be in [0, 1], got {taper}")

    shift = None
    if register:
        reg = register_images(a, b, upsample=upsample, apodize=True, taper=taper, device=device)
        shift = reg.shift
        ny, nx = a.shape
        r0, r1 = int(math.ceil(max(0.0, -shift[0]))), ny - int(math.ceil(max(0.0, shift[0])))
        c0, c1 = int(math.ceil(max(0.0, -shift[1]))), nx - int(math.ceil(max(0.0, shift[1])))
        if r1 - r0 < 4 or c1 - c0 < 4:
            raise ValueError(f"the registered images barely overlap (shift {shift} px): nothing to compare")
        a = a[r0:r1, c0:c1]
        b = reg.aligned[r0:r1, c0:c1]

    if apodize:
        a = _apodise(xp, a, taper)
        b = _apodise(xp, b, taper)
    fa = xp.fft.fft2(a)
    fb = xp.fft.fft2(b)
    cross = xp.real(fa * xp.conj(fb)).ravel()
    pa = (xp.abs(fa) ** 2).ravel()
    pb = (xp.abs(fb) ** 2).ravel()

    ny, nx = a.shape
    qy = xp.fft.fftfreq(ny, d=py)[:, None]
    qx = xp.fft.fftfreq(nx, d=px)[None, :]
    qabs = xp.sqrt(qy**2 + qx**2).ravel()
    dq = bin_width * max(1.0 / (ny * py), 1.0 / (nx * px))
    q_nyq = min(0.5 / py, 0.5 / px)
    n_rings = int(math.floor(q_nyq / dq + 1e-9)) + 1
    pos = qabs / dq
    if binning == "nearest":
        idx = xp.rint(pos).astype(xp.int64)
        idx = xp.where(idx < n_rings, idx, n_rings)  # beyond Nyquist -> a discarded bin
        sums = [xp.bincount(idx, weights=v, minlength=n_rings + 1)[:n_rings] for v in (cross, pa, pb)]
        counts = xp.bincount(idx, minlength=n_rings + 1)[:n_rings].astype(xp.float64)
    else:
        lo = xp.floor(pos).astype(xp.int64)
        frac = pos - lo
        lo_c = xp.where(lo < n_rings, lo, n_rings)
        hi_c = xp.where(lo + 1 < n_rings, lo + 1, n_rings)

        def split(v):
            return (xp.bincount(lo_c, weights=v * (1 - frac), minlength=n_rings + 1)
                    + xp.bincount(hi_c, weights=v * frac, minlength=n_rings + 1))[:n_rings]

        sums = [split(v) for v in (cross, pa, pb)]
        counts = split(xp.ones_like(pos))
    s12, s11, s22 = (asnumpy(v) for v in sums)
    counts = asnumpy(counts)
    den = np.sqrt(s11 * s22)
    with np.errstate(invalid="ignore", divide="ignore"):
        frc = np.where((den > 0) & (counts > 0), s12 / np.where(den > 0, den, 1.0), np.nan)
    if apodize:  # both means were removed: the DC ring holds rounding noise only
        frc[0] = np.nan
    q = np.arange(n_rings) * dq
    return FRCResult(
        q=q,
        frc=frc,
        half_bit=half_bit_threshold(counts),
        n_per_ring=counts,
        pixel_size=(py, px),
        shape=(int(ny), int(nx)),
        shift=shift,
    )
