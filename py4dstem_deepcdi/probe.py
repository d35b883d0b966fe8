"""Experiment geometry and the probe: energy, aperture, detector sampling and the 7 aberrations.

The probe is built with py4DSTEM's ``ComplexProbe`` (so the aberration function χ and its conventions are
py4DSTEM's own): ``P(k) = A(k) exp(-iχ(k))``, ``P(r) = IFFT[P(k)]``, ``Σ|P(r)|² = 1``. Here the real-space
probe is returned *centred* in its window (py4DSTEM keeps it corner-centred internally).

Sampling relations (one place for them): the detector has ``N`` pixels of angular size ``dα`` (mrad) per axis,
so its reciprocal pixel is ``dk = dα / λ`` (Å⁻¹) and the real-space window of one pattern is ``1 / dk`` (Å)
wide with pixels of ``1 / (N dk)`` Å.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from os import PathLike
from typing import Any

import numpy as np
from py4DSTEM.process.phase.utils import ComplexProbe
from py4DSTEM.process.utils import electron_wavelength_angstrom

POLAR_NAMES: tuple[str, ...] = ("C10", "C12", "phi12", "C21", "phi21", "C23", "phi23")
"""The 7 probe parameters of the method, py4DSTEM's polar names: magnitudes in Å, angles in rad."""

#: Fraction of the probe intensity whose enclosing circle defines the probe's support (oversampling check).
SUPPORT_FRACTION = 0.9
#: (min, max) pixels per detector side (a 4096² complex probe takes 256 MB)
DETECTOR_PIXELS = (8, 4096)


def _positive(name: str, value: Any) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be a positive number, got {value!r}") from exc
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return value


def normalise_aberrations(aberrations: Mapping[str, float] | None) -> dict[str, float]:
    """Return the 7 parameters as a full dict (missing ones are 0), accepting py4DSTEM's ``defocus = -C10``.

    Raises ``ValueError`` for unknown names or non-finite values, ``TypeError`` when ``aberrations`` is not a mapping.
    """
    if aberrations is not None and not isinstance(aberrations, Mapping):
        raise TypeError(f"aberrations must be a dict of polar parameters ({', '.join(POLAR_NAMES)}), got "
                        f"{type(aberrations).__name__}")
    out = dict.fromkeys(POLAR_NAMES, 0.0)
    for name, value in (aberrations or {}).items():
        if name == "defocus":
            key, value = "C10", -float(value)
        elif name in POLAR_NAMES:
            key = name
        else:
            raise ValueError(
                f"unknown aberration {name!r}: use py4DSTEM's polar names {', '.join(POLAR_NAMES)} "
                "(magnitudes in Å, angles in rad) or 'defocus' (= -C10)"
            )
        try:
            value = float(value)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"aberration {name} must be a number, got {value!r}") from exc
        if not math.isfinite(value):
            raise ValueError(f"aberration {name} must be finite, got {value!r}")
        out[key] = value
    return out


def vacuum_pattern(vacuum_probe_intensity: Any) -> np.ndarray:
    """A measured vacuum probe as a 2-D pattern: accepts an array, a DiffractionSlice or a DataCube (mean pattern).

    Raises ``TypeError`` for a path or other non-numeric input (bool and complex arrays included) and ``ValueError``
    for another shape, NaN or infinite values, or a pattern without counts (sum ≤ 0)."""
    data = vacuum_probe_intensity
    if not isinstance(data, np.ndarray):
        data = getattr(data, "data", data)
    if isinstance(data, (str, bytes, PathLike)):
        raise TypeError(
            f"vacuum_probe_intensity must be an array (the vacuum diffraction pattern), got the path {data!r}: "
            "load it first (numpy.load or py4DSTEM.read)"
        )
    data = np.asarray(data)
    if data.dtype.kind not in "uif":
        raise TypeError(f"vacuum_probe_intensity must hold real counts (integers or floats), got dtype {data.dtype}")
    data = data.astype(np.float64)
    if data.ndim == 4:
        data = data.mean((0, 1))
    if data.ndim != 2:
        raise ValueError(f"vacuum_probe_intensity must be a 2-D pattern or a 4-D DataCube, got shape {data.shape}")
    if not np.all(np.isfinite(data)) or not data.sum() > 0:
        raise ValueError("vacuum_probe_intensity must be finite, non-negative and hold counts (a positive sum)")
    return data


class ProbeGeometry:
    """The geometry one network is trained for: beam, aperture, detector and aberrations.

    Parameters
    ----------
    energy
        Beam energy (eV).
    semiangle_cutoff
        Convergence semi-angle of the probe-forming aperture (mrad).
    detector_shape
        Diffraction-pattern shape (pixels) the network sees, default (32, 32).
    angular_sampling
        Detector pixel size (mrad). Give this or ``reciprocal_sampling``.
    reciprocal_sampling
        Detector pixel size (Å⁻¹).
    aberrations
        The 7 probe parameters under py4DSTEM's names (C10, C12, phi12, C21, phi21, C23, phi23; Å and rad;
        ``defocus`` = -C10 is accepted). Missing ones are 0.
    rolloff
        Width of py4DSTEM's cosine taper of the aperture edge (mrad); 0 gives a sharp aperture. Ignored when
        ``vacuum_probe_intensity`` is given.
    vacuum_probe_intensity
        Measured vacuum diffraction pattern (detector_shape, bright-field disk centred at N//2), used as the
        aperture instead of ``semiangle_cutoff`` + ``rolloff``. Recommended for experimental data.
    mask_threshold
        The illuminated mask is ``|P(r)|² > mask_threshold × max|P(r)|²`` (the paper uses 0.16).
    """

    def __init__(
        self,
        energy: float,
        semiangle_cutoff: float,
        detector_shape: tuple[int, int] = (32, 32),
        angular_sampling: float | None = None,
        reciprocal_sampling: float | None = None,
        aberrations: Mapping[str, float] | None = None,
        rolloff: float = 2.0,
        vacuum_probe_intensity: np.ndarray | None = None,
        mask_threshold: float = 0.16,
    ):
        self.energy = _positive("energy", energy)
        self.semiangle_cutoff = _positive("semiangle_cutoff", semiangle_cutoff)
        shape = tuple(np.atleast_1d(np.asarray(detector_shape)).tolist())
        low, high = DETECTOR_PIXELS
        if len(shape) != 2 or any(
            isinstance(n, (bool, str)) or not isinstance(n, (int, float)) or not float(n).is_integer()
            or not low <= n <= high for n in shape
        ):
            raise ValueError(
                f"detector_shape must be two integers in [{low}, {high}] (a 2-D detector), got {detector_shape!r}"
            )
        self.detector_shape = (int(shape[0]), int(shape[1]))
        if (angular_sampling is None) == (reciprocal_sampling is None):
            raise ValueError("give exactly one of angular_sampling (mrad/pixel) or reciprocal_sampling (Å⁻¹/pixel)")
        if angular_sampling is None:
            reciprocal_sampling = _positive("reciprocal_sampling", reciprocal_sampling)
            angular_sampling = reciprocal_sampling * self.wavelength * 1e3
        self.angular_sampling = _positive("angular_sampling", angular_sampling)
        self.aberrations = normalise_aberrations(aberrations)
        rolloff = float(rolloff)
        if not math.isfinite(rolloff) or rolloff < 0:
            raise ValueError(f"rolloff must be >= 0 mrad, got {rolloff!r}")
        self.rolloff = rolloff
        mask_threshold = float(mask_threshold)
        if not 0 < mask_threshold < 1:
            raise ValueError(f"mask_threshold must lie in (0, 1), got {mask_threshold!r}")
        self.mask_threshold = mask_threshold
        if vacuum_probe_intensity is not None:
            vacuum_probe_intensity = vacuum_pattern(vacuum_probe_intensity)
            if vacuum_probe_intensity.shape != self.detector_shape:
                raise ValueError(
                    f"vacuum_probe_intensity has shape {vacuum_probe_intensity.shape}, expected the detector shape "
                    f"{self.detector_shape}; resample it onto the model's detector with "
                    "preprocessing.resample_vacuum(pattern, angular_sampling, geometry) (deepcdi: "
                    "--vacuum-sampling MRAD)"
                )
            if not np.all(np.isfinite(vacuum_probe_intensity)) or vacuum_probe_intensity.sum() <= 0:
                raise ValueError("vacuum_probe_intensity must be finite with a positive sum")
            vacuum_probe_intensity = np.maximum(vacuum_probe_intensity, 0)
        self.vacuum_probe_intensity = vacuum_probe_intensity
        self.check_sampling()

    # ------------------------------------------------------------------ sampling
    @property
    def wavelength(self) -> float:
        """Relativistic electron wavelength λ (Å)."""
        return float(electron_wavelength_angstrom(self.energy))

    @property
    def reciprocal_sampling(self) -> float:
        """Detector pixel size dk = dα / λ (Å⁻¹)."""
        return self.angular_sampling * 1e-3 / self.wavelength

    @property
    def sampling(self) -> tuple[float, float]:
        """Real-space pixel size of the window, 1 / (N dk) per axis (Å)."""
        return tuple(1.0 / (n * self.reciprocal_sampling) for n in self.detector_shape)

    @property
    def window_size(self) -> tuple[float, float]:
        """Real-space extent of one pattern's window, 1 / dk (Å)."""
        return (1.0 / self.reciprocal_sampling,) * 2

    # ------------------------------------------------------------------ probe
    def _complex_probe(self) -> ComplexProbe:
        vacuum = None
        if self.vacuum_probe_intensity is not None:
            vacuum = np.fft.ifftshift(self.vacuum_probe_intensity)  # py4DSTEM wants it corner-centred
        return ComplexProbe(
            energy=self.energy,
            gpts=self.detector_shape,
            sampling=self.sampling,
            semiangle_cutoff=self.semiangle_cutoff,
            rolloff=self.rolloff,
            vacuum_probe_intensity=vacuum,
            parameters=dict(self.aberrations),  # ComplexProbe mutates the dict it is given
        )

    @cached_property
    def probe(self) -> np.ndarray:
        """Complex real-space probe (detector_shape), centred at (N//2, N//2), Σ|P|² = 1."""
        array = np.asarray(self._complex_probe().build()._array, dtype=np.complex128)
        return np.fft.fftshift(array)

    @cached_property
    def probe_fourier(self) -> np.ndarray:
        """Probe in the detector plane, ``FFT[P]`` with the unitary norm, DC at (N//2, N//2): aperture × exp(-iχ)."""
        return np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(self.probe), norm="ortho"))

    @cached_property
    def mask(self) -> np.ndarray:
        """Illuminated mask ``|P|² > mask_threshold × max|P|²`` (bool, detector_shape)."""
        intensity = np.abs(self.probe) ** 2
        return intensity > self.mask_threshold * intensity.max()

    def aperture_edge(self, width: float) -> np.ndarray:
        """Detector intensity (detector_shape, DC at N//2) of the aperture with a linear edge ``width`` (mrad) wide
        centred on ``semiangle_cutoff``: amplitude ``clip((α + w/2 − |θ|) / w, 0, 1)`` (``width`` 0: sharp).

        Unlike py4DSTEM's ``rolloff``, which tapers inside the semi-angle, this edge straddles it, like a sharp
        aperture integrated over detector pixels or blurred by the detector; pass it as ``vacuum_probe_intensity``.
        """
        width = float(width)
        if not (math.isfinite(width) and width >= 0):
            raise ValueError(f"width must be >= 0 mrad, got {width!r}")
        n0, n1 = self.detector_shape
        theta = np.hypot(
            *np.meshgrid(
                (np.arange(n0) - n0 // 2) * self.angular_sampling,
                (np.arange(n1) - n1 // 2) * self.angular_sampling,
                indexing="ij",
            )
        )
        if width == 0:
            return (theta <= self.semiangle_cutoff).astype(np.float64)
        return np.clip((self.semiangle_cutoff + width / 2 - theta) / width, 0, 1) ** 2

    @property
    def mask_area(self) -> float:
        """Area of the illuminated mask (Å²)."""
        return float(self.mask.sum() * self.sampling[0] * self.sampling[1])

    def _radii(self) -> tuple[np.ndarray, np.ndarray]:
        """Distances (Å) of the window's pixels from the probe's centre of intensity, and the intensity."""
        intensity = np.abs(self.probe) ** 2
        nx, ny = self.detector_shape
        x = (np.arange(nx) - nx // 2)[:, None] * self.sampling[0]
        y = (np.arange(ny) - ny // 2)[None, :] * self.sampling[1]
        cx, cy = (intensity * x).sum(), (intensity * y).sum()
        return np.sqrt((x - cx) ** 2 + (y - cy) ** 2), intensity

    def support_radius(self, fraction: float = SUPPORT_FRACTION) -> float:
        """Radius (Å) of the circle about the probe's centre of intensity holding ``fraction`` of its intensity."""
        if not 0 < fraction <= 1:
            raise ValueError(f"fraction must lie in (0, 1], got {fraction!r}")
        r, intensity = (a.ravel() for a in self._radii())
        order = np.argsort(r)
        cumulative = np.cumsum(intensity[order])
        return float(r[order][np.searchsorted(cumulative, fraction * cumulative[-1])])

    def support_mask(self, fraction: float) -> np.ndarray:
        """The disk about the probe's centre of intensity that holds ``fraction`` of its intensity (bool)."""
        return self._radii()[0] <= self.support_radius(fraction)

    @property
    def oversampling_ratio(self) -> float:
        """Window width over the probe's support diameter; at least 2 is needed for phase retrieval."""
        return min(self.window_size) / (2 * self.support_radius())

    def check_sampling(self) -> None:
        """Refuse a geometry whose bright-field disk leaves the detector or whose probe is undersampled."""
        radius_px = self.semiangle_cutoff / self.angular_sampling
        if radius_px > min(self.detector_shape) / 2 - 1:
            raise ValueError(
                f"angular_sampling: the bright-field disk (radius {radius_px:.1f} px = {self.semiangle_cutoff} mrad "
                f"/ {self.angular_sampling:.3g} mrad) does not fit on a {self.detector_shape} detector; "
                "increase angular_sampling (bin the detector) or the detector shape"
            )
        if radius_px < 2:
            raise ValueError(
                f"angular_sampling: the bright-field disk is only {radius_px:.2f} px in radius; "
                "decrease angular_sampling (less binning)"
            )
        if self.support_radius() == 0:
            raise ValueError(
                "the probe is a single pixel: the aperture (semiangle_cutoff, or vacuum_probe_intensity) fills the "
                "whole detector; the bright-field disk must lie inside it"
            )
        ratio = self.oversampling_ratio
        if ratio < 2:
            raise ValueError(
                "aberrations/angular_sampling: the probe is undersampled: its support "
                f"({2 * self.support_radius():.2f} Å "
                f"across, {SUPPORT_FRACTION:.0%} of the intensity) is more than half the window "
                f"({self.window_size[0]:.2f} Å), oversampling ratio {ratio:.2f} < 2. Reduce the defocus or "
                "aberrations, or use a finer angular_sampling (a wider window)"
            )

    # ------------------------------------------------------------------ metadata
    def to_dict(self) -> dict[str, Any]:
        """JSON-able description (without the vacuum probe array, see ``has_vacuum_probe``)."""
        return {
            "energy_eV": self.energy,
            "semiangle_cutoff_mrad": self.semiangle_cutoff,
            "detector_shape": list(self.detector_shape),
            "angular_sampling_mrad": self.angular_sampling,
            "aberrations": dict(self.aberrations),
            "rolloff_mrad": self.rolloff,
            "mask_threshold": self.mask_threshold,
            "has_vacuum_probe": self.vacuum_probe_intensity is not None,
            "wavelength_A": self.wavelength,
            "sampling_A": list(self.sampling),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], vacuum_probe_intensity: np.ndarray | None = None) -> ProbeGeometry:
        """Inverse of :meth:`to_dict`."""
        return cls(
            energy=d["energy_eV"],
            semiangle_cutoff=d["semiangle_cutoff_mrad"],
            detector_shape=tuple(d["detector_shape"]),
            angular_sampling=d["angular_sampling_mrad"],
            aberrations=d["aberrations"],
            rolloff=d["rolloff_mrad"],
            mask_threshold=d["mask_threshold"],
            vacuum_probe_intensity=vacuum_probe_intensity,
        )

    def replace(self, **changes: Any) -> ProbeGeometry:
        """A copy with some constructor arguments changed."""
        kwargs = {
            "energy": self.energy,
            "semiangle_cutoff": self.semiangle_cutoff,
            "detector_shape": self.detector_shape,
            "angular_sampling": self.angular_sampling,
            "aberrations": self.aberrations,
            "rolloff": self.rolloff,
            "vacuum_probe_intensity": self.vacuum_probe_intensity,
            "mask_threshold": self.mask_threshold,
        }
        kwargs.update(changes)
        return ProbeGeometry(**kwargs)

    def check_compatible(
        self, other: ProbeGeometry, rtol: float = 0.02, aberration_atol: float = 5.0, what: str = "model"
    ) -> None:
        """Raise ``ValueError`` naming both values when ``other`` differs beyond tolerance.

        Energy, semi-angle and angular sampling are compared with relative tolerance ``rtol``; the detector shape
        exactly; aberration magnitudes with ``aberration_atol`` (Å).
        """
        problems = []
        for label, a, b in (
            ("energy (eV)", self.energy, other.energy),
            ("semiangle_cutoff (mrad)", self.semiangle_cutoff, other.semiangle_cutoff),
            ("angular_sampling (mrad/pixel)", self.angular_sampling, other.angular_sampling),
        ):
            if abs(a - b) > rtol * abs(a):
                problems.append(f"{label}: {what} {a:.6g} vs data {b:.6g}")
        if self.detector_shape != other.detector_shape:
            problems.append(f"detector_shape: {what} {self.detector_shape} vs data {other.detector_shape}")
        for name in POLAR_NAMES:
            a, b = self.aberrations[name], other.aberrations[name]
            tol = aberration_atol if name.startswith("C") else 0.1
            magnitude = "C" + name[3:] if name.startswith("phi") else None
            if magnitude and max(abs(self.aberrations[magnitude]), abs(other.aberrations[magnitude])) < aberration_atol:
                continue  # the angle of a negligible aberration does not matter
            if abs(a - b) > tol:
                problems.append(f"{name}: {what} {a:.6g} vs data {b:.6g}")
        if problems:
            raise ValueError(
                f"the {what} was trained for another geometry: "
                + "; ".join(problems)
                + ". Use a model trained for this geometry (or train one with `deepcdi train`), or resample the data."
            )

    def __repr__(self) -> str:
        ab = ", ".join(f"{k}={v:g}" for k, v in self.aberrations.items() if v)
        return (
            f"ProbeGeometry({self.energy / 1e3:g} keV, {self.semiangle_cutoff:g} mrad, {self.detector_shape}, "
            f"{self.angular_sampling:.4g} mrad/px, {self.sampling[0]:.4g} Å/px{', ' + ab if ab else ''})"
        )


#: The 7 parameters in Cartesian form (Å): C10, then (a, b) = C (cos nφ, sin nφ) for C12 (n=2), C21 (1), C23 (3).
#: Searching and drawing probes in these coordinates avoids the angles' periodicity and their degeneracy at C = 0.
CARTESIAN_NAMES: tuple[str, ...] = ("C10", "C12a", "C12b", "C21a", "C21b", "C23a", "C23b")
_SYMMETRY = {"C12": 2, "C21": 1, "C23": 3}  # χ ∝ C cos(n (φ − φ_C))


def to_cartesian(aberrations: Mapping[str, float]) -> np.ndarray:
    """The 7 polar parameters (py4DSTEM names, Å and rad) as the Cartesian vector of :data:`CARTESIAN_NAMES` (Å)."""
    ab = normalise_aberrations(aberrations)
    out = [ab["C10"]]
    for name, n in _SYMMETRY.items():
        angle = n * ab["phi" + name[1:]]
        out += [ab[name] * math.cos(angle), ab[name] * math.sin(angle)]
    return np.asarray(out)


def from_cartesian(vector) -> dict[str, float]:
    """Inverse of :func:`to_cartesian`: polar parameters with magnitudes ≥ 0 and angles in [0, 2π/n)."""
    v = np.asarray(vector, dtype=np.float64).reshape(-1)
    if v.shape != (7,):
        raise ValueError(f"a Cartesian aberration vector has 7 entries {CARTESIAN_NAMES}, got shape {np.shape(vector)}")
    out = {"C10": float(v[0])}
    for i, (name, n) in enumerate(_SYMMETRY.items()):
        a, b = v[1 + 2 * i], v[2 + 2 * i]
        out[name] = float(math.hypot(a, b))
        out["phi" + name[1:]] = float(math.atan2(b, a) % (2 * math.pi) / n)
    return out


@dataclass(frozen=True)
class AberrationRanges:
    """Ranges of the probe parameters a probe-conditioned network is trained over and a probe search explores.

    Defaults cover typical aberration-corrected STEM practice; a detector window may hold only part of them
    (see :meth:`check`). Probes are drawn with C10 uniform in its range and each other aberration with a magnitude
    uniform in [0, max] and a uniform angle.

    Parameters
    ----------
    C10
        (min, max) defocus term (Å); py4DSTEM's ``defocus`` is −C10.
    C12
        Largest twofold astigmatism (Å).
    C21
        Largest axial coma (Å).
    C23
        Largest threefold astigmatism (Å).
    """

    C10: tuple[float, float] = field(
        default=(-300.0, 300.0), metadata={"help": "C10 range (Å)", "flag": "--C10-range", "metavar": ("MIN", "MAX")}
    )
    C12: float = field(default=50.0, metadata={"help": "largest twofold astigmatism (Å)", "flag": "--C12-max"})
    C21: float = field(default=500.0, metadata={"help": "largest axial coma (Å)", "flag": "--C21-max"})
    C23: float = field(default=500.0, metadata={"help": "largest threefold astigmatism (Å)", "flag": "--C23-max"})

    def __post_init__(self):
        try:
            lo, hi = (float(v) for v in self.C10)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"C10 range must be a (min, max) pair in Å, got {self.C10!r}") from exc
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise ValueError(f"C10 range must be finite, got {self.C10!r}")
        if lo >= hi:
            raise ValueError(
                f"C10 range ({lo:g}, {hi:g}) Å is {'inverted' if lo > hi else 'empty'}: give (min, max) with min < max"
            )
        object.__setattr__(self, "C10", (lo, hi))
        for name in _SYMMETRY:
            value = getattr(self, name)
            try:
                value = float(value)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"{name} must be a largest magnitude in Å, got {value!r}") from exc
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a largest magnitude >= 0 Å, got {value!r}")
            object.__setattr__(self, name, value)

    # ------------------------------------------------------------------ search box
    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """Lower and upper bounds of the Cartesian parameters (:data:`CARTESIAN_NAMES`, Å)."""
        m = [self.C12, self.C12, self.C21, self.C21, self.C23, self.C23]
        return np.array([self.C10[0], *(-x for x in m)]), np.array([self.C10[1], *m])

    def clip(self, vectors: np.ndarray) -> np.ndarray:
        """Cartesian vectors (..., 7) moved into the ranges: C10 clipped, each (a, b) pair shrunk to its disk."""
        v = np.array(vectors, dtype=np.float64)
        v[..., 0] = np.clip(v[..., 0], *self.C10)
        for i, name in enumerate(_SYMMETRY):
            pair = v[..., 1 + 2 * i : 3 + 2 * i]
            norm = np.hypot(pair[..., 0], pair[..., 1])
            scale = np.where(norm > getattr(self, name), getattr(self, name) / np.maximum(norm, 1e-300), 1.0)
            v[..., 1 + 2 * i : 3 + 2 * i] = pair * scale[..., None]
        return v

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """``n`` random Cartesian vectors (n, 7) drawn as the class docstring says."""
        return self.from_uniform(rng.random((n, 7)))

    def from_uniform(self, u: np.ndarray) -> np.ndarray:
        """Cartesian vectors (n, 7) from uniform numbers in [0, 1) (n, 7), as :meth:`sample` draws them."""
        u = np.asarray(u, dtype=np.float64)
        n = len(u)
        out = np.empty((n, 7))
        out[:, 0] = self.C10[0] + (self.C10[1] - self.C10[0]) * u[:, 0]
        for i, name in enumerate(_SYMMETRY):
            magnitude, angle = getattr(self, name) * u[:, 1 + 2 * i], 2 * math.pi * u[:, 2 + 2 * i]
            out[:, 1 + 2 * i], out[:, 2 + 2 * i] = magnitude * np.cos(angle), magnitude * np.sin(angle)
        return out

    def contains(self, aberrations: Mapping[str, float], tolerance: float = 1.0) -> list[str]:
        """The parameters of ``aberrations`` outside the ranges (by more than ``tolerance`` Å), as messages."""
        ab = normalise_aberrations(aberrations)
        problems = []
        lo, hi = self.C10
        if not lo - tolerance <= ab["C10"] <= hi + tolerance:
            problems.append(f"C10 = {ab['C10']:g} Å outside ({lo:g}, {hi:g})")
        for name in _SYMMETRY:
            if ab[name] > getattr(self, name) + tolerance:
                problems.append(f"{name} = {ab[name]:g} Å above {getattr(self, name):g}")
        return problems

    def check(self, geometry: ProbeGeometry) -> None:
        """Refuse ranges whose largest probes do not fit the geometry's window (oversampling ratio < 2)."""
        for c10 in self.C10:
            corner = {"C10": c10, "C12": self.C12, "C21": self.C21, "C23": self.C23}
            try:
                geometry.replace(aberrations=corner)
            except ValueError as exc:
                raise ValueError(
                    f"aberration ranges too wide for this geometry: the probe with "
                    f"{', '.join(f'{k}={v:g} Å' for k, v in corner.items())} does not fit the "
                    f"{geometry.window_size[0]:.3g} Å window ({exc}). Narrow the ranges (mostly C10) or use a finer "
                    "angular sampling (a larger detector)"
                ) from None

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return {"C10": list(self.C10), "C12": self.C12, "C21": self.C21, "C23": self.C23}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> AberrationRanges:
        """Inverse of :meth:`to_dict`."""
        return cls(C10=tuple(d["C10"]), C12=d["C12"], C21=d["C21"], C23=d["C23"])
