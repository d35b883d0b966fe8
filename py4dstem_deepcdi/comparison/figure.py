"""The comparison figure: both phase images on one colour scale, magnified views, the virtual ADF and the FRC."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from .metrics import format_resolution

if TYPE_CHECKING:
    from .result import Comparison

#: FRC thresholds drawn on the figure and the colours of their lines
_THRESHOLDS = ((0.5, "tab:red"), (0.143, "tab:green"))


def inset_box(
    shape: tuple[int, int], sampling: tuple[float, float], inset: tuple[float, float, float] | None = None
) -> tuple[int, int, int]:
    """The magnified region as pixels ``(row, column, size)`` of an image of ``shape`` and ``sampling`` Å/pixel.

    ``inset`` is ``(row Å, column Å, size Å)`` from the top-left corner; default the central third (at least 8
    pixels, at most the image). Raises ``ValueError`` when the region does not fit in the image.
    """
    h, w = shape
    sy, sx = sampling
    if inset is None:
        size_px = max(min(h, w) // 3, min(8, h, w))
        return (h - size_px) // 2, (w - size_px) // 2, size_px
    r0, c0, size_px = int(round(inset[0] / sy)), int(round(inset[1] / sx)), int(round(inset[2] / sy))
    if size_px < 2 or r0 < 0 or c0 < 0 or r0 + size_px > h or c0 + size_px > w:
        raise ValueError(f"inset {inset} (Å) does not fit in the {h * sy:.1f}×{w * sx:.1f} Å field of view")
    return r0, c0, size_px


def _phase_panels(axes, images, sampling, box, cmap: str):
    """Each phase image (top row, the inset's box drawn) and its magnified view (bottom row) on one colour scale;
    returns the last image artist (for the colour bar)."""
    stack = np.concatenate([im.ravel() for _, im in images])
    vmin, vmax = np.percentile(stack, [0.5, 99.5])
    h, w = images[0][1].shape
    sy, sx = sampling
    r0, c0, size_px = box
    extent = [0, w * sx, h * sy, 0]
    zoom_extent = [c0 * sx, (c0 + size_px) * sx, (r0 + size_px) * sy, r0 * sy]
    for k, (title, image) in enumerate(images):
        top, bottom = axes[0, k], axes[1, k]
        artist = top.imshow(image, cmap=cmap, vmin=vmin, vmax=vmax, extent=extent)
        top.add_patch(Rectangle((c0 * sx, r0 * sy), size_px * sx, size_px * sy, fill=False, ec="cyan", lw=1.2))
        top.set_title(title)
        top.set_xlabel("Å")
        zoom = image[r0 : r0 + size_px, c0 : c0 + size_px]
        bottom.imshow(zoom, cmap=cmap, vmin=vmin, vmax=vmax, extent=zoom_extent)
        for spine in bottom.spines.values():
            spine.set_edgecolor("cyan")
        bottom.set_title(f"{title}, magnified")
        bottom.set_xlabel("Å")
    return artist


def _adf_panel(ax, comparison: Comparison) -> None:
    """The virtual ADF image in the scan frame (Å), or the reason there is none."""
    if comparison.adf is None:
        reason = comparison.adf_info.get("reason", "")
        ax.text(0.5, 0.5, "no virtual ADF\n" + reason, ha="center", va="center", wrap=True)
        ax.set_axis_off()
        return
    adf, step, info = comparison.adf, comparison.scan_step, comparison.adf_info
    ax.imshow(adf, cmap="gray", extent=[0, adf.shape[1] * step[1], adf.shape[0] * step[0], 0])
    ax.set_title(f"virtual ADF {info['inner_mrad']:.0f}–{info['outer_mrad']:.0f} mrad")
    ax.set_xlabel("Å (scan frame)")


def _frc_panel(ax, comparison: Comparison) -> None:
    """The FRC of the two methods (and of each with the truth), the half-bit curve, the 0.5 and 0.143 thresholds
    with their resolutions (Å) marked, and the three resolutions as text."""
    frc = comparison.frc
    ax.plot(frc["q"], frc["frc"], color="k", label="deep CDI vs ePIE")
    if comparison.vs_truth is not None:
        for method, label, colour in (("deep_cdi", "deep CDI", "tab:blue"), ("epie", "ePIE", "tab:orange")):
            f = comparison.vs_truth[method]["frc"]
            ax.plot(f["q"], f["frc"], color=colour, lw=0.9, ls="--", label=f"{label} vs truth")
    ax.plot(frc["q"], frc["half_bit"], color="gray", ls=":", label="half-bit")
    for level, colour in _THRESHOLDS:
        ax.axhline(level, color=colour, lw=0.8)
        resolution = frc["resolution_A"][f"{level:g}"]
        if math.isfinite(resolution) and resolution > 0:
            ax.axvline(1 / resolution, color=colour, lw=0.8, ls="--")
            ax.annotate(f"{resolution:.2f} Å", (1 / resolution, level), textcoords="offset points", xytext=(4, 4),
                        color=colour, fontsize=9)
    text = "\n".join(
        f"{name}: {format_resolution(frc['resolution_A'][key], comparison.sampling)}"
        for key, name in (("0.5", "0.5"), ("0.143", "0.143"), ("half_bit", "half-bit"))
    )
    ax.text(0.03, 0.04, text, transform=ax.transAxes, fontsize=8, va="bottom")
    ax.set_ylim(-0.2, 1.05)
    ax.set_xlim(0, float(np.max(frc["q"])))
    ax.set_xlabel("spatial frequency (Å⁻¹)")
    ax.set_ylabel("FRC")
    ax.set_title("Fourier ring correlation")
    ax.legend(fontsize=7, loc="upper right")


def _title(comparison: Comparison) -> str:
    t, r, s = comparison.timings, comparison.resolution_A, comparison.sampling
    return (
        f"deep CDI {t['deep_cdi_s']:.2f} s vs ePIE {t['epie_s']:.2f} s ({comparison.epie.num_iter} it.); "
        f"phase correlation {comparison.correlation:.3f}; "
        f"FRC resolution {format_resolution(r['0.5'], s)} (0.5), {format_resolution(r['0.143'], s)} (0.143)"
    )


def comparison_figure(
    comparison: Comparison,
    inset: tuple[float, float, float] | None = None,
    cmap: str = "magma",
    figsize: tuple[float, float] | None = None,
) -> Figure:
    """The paper's figure of a :class:`~.result.Comparison`.

    Top row: deep CDI, ePIE and (if known) the truth on one colour scale (rad), the inset's box drawn, then the
    virtual ADF; bottom row: the magnified views, then the FRC with the 0.5/0.143/half-bit thresholds and the
    resolutions in Å; a colour bar. ``inset`` is ``(row Å, column Å, size Å)`` from the top-left of the common
    field of view (default: the central third; ``ValueError`` if it does not fit); ``figsize`` in inches (default
    3.8 per column + 1 by 7.6). Returns the matplotlib Figure.
    """
    images = [("deep CDI", comparison.deep_phase), (f"ePIE ({comparison.epie.num_iter} it.)", comparison.epie_phase)]
    if comparison.truth_phase is not None:
        images.append(("ground truth", comparison.truth_phase))
    box = inset_box(comparison.deep_phase.shape, comparison.sampling, inset)
    columns = len(images) + 1
    fig, axes = plt.subplots(2, columns, figsize=figsize or (3.8 * columns + 1, 7.6), squeeze=False,
                             layout="constrained")
    artist = _phase_panels(axes, images, comparison.sampling, box, cmap)
    fig.colorbar(artist, ax=list(axes[0, : len(images)]), shrink=0.9, label="phase (rad)")
    _adf_panel(axes[0, -1], comparison)
    _frc_panel(axes[1, -1], comparison)
    fig.suptitle(_title(comparison), fontsize=10)
    return fig

