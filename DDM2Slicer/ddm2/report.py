"""The QC report: a PNG figure and a self-contained HTML page (the figure embedded, tables as HTML).

Rows are axial slices (voxel axis 2, the axis the denoiser works along); columns are
noisy | [Stage I] | denoised | residual | colour FA input | colour FA denoised. Slices are displayed in
the radiological convention (patient right on the left of the screen, anterior up).
"""

from __future__ import annotations

import base64
import html
import os
from pathlib import Path

import numpy as np

from ddm2.dwi import DWI, atomic_path

B0_THRESHOLD = 50.0
GREY_PERCENTILE = 99.5  # grey window top: robust to a few bright voxels (vessels, artefacts)
RESIDUAL_PERCENTILE = 99.0
PALETTE = {"ink": "#1f2430", "muted": "#5c6370", "flag": "#d1495b", "curve": "#7f8fa6", "mark": "#e09f3e"}


# ----------------------------------------------------------------------------------------- helpers

def _display_orientation(affine: np.ndarray) -> tuple[bool, bool, bool, tuple[str, str] | None]:
    """How to turn an (axis 0, axis 1) slice into a screen image: transpose, flip rows, flip columns.

    Also returns the labels of the left and right screen edges when the horizontal axis is left-right.
    """
    import nibabel as nib

    codes = nib.aff2axcodes(affine)[:2]
    horizontal = 0 if codes[0] in "LR" or codes[1] not in "LR" else 1
    vertical = 1 - horizontal
    transpose = horizontal == 0  # screen rows must run along the vertical axis
    # Anterior/superior up: the highest index must land in row 0 when the axis points there.
    flip_rows = codes[vertical] in "AS"
    # Radiological: indices must grow towards the patient's left across the screen.
    flip_columns = codes[horizontal] == "R"
    edges = ("R", "L") if codes[horizontal] in "LR" else None
    return transpose, flip_rows, flip_columns, edges


def _screen(image: np.ndarray, orientation: tuple) -> np.ndarray:
    transpose, flip_rows, flip_columns, _ = orientation
    if transpose:
        image = np.swapaxes(image, 0, 1)
    if flip_rows:
        image = image[::-1]
    if flip_columns:
        image = image[:, ::-1]
    return image


def choose_slices(mask: np.ndarray, count: int = 3) -> list[int]:
    """Axial slice indices spread through the brain (30 %, 50 %, 70 % of its extent for three)."""
    occupied = np.flatnonzero(np.asarray(mask, dtype=bool).any(axis=(0, 1)))
    if occupied.size == 0:
        occupied = np.arange(mask.shape[2])
    fractions = np.linspace(0.3, 0.7, count) if count > 1 else np.array([0.5])
    picks = occupied[np.round(fractions * (occupied.size - 1)).astype(int)]
    return sorted(set(int(z) for z in picks))


def _shown_volume(bvals: np.ndarray) -> int:
    weighted = np.flatnonzero(np.asarray(bvals) > B0_THRESHOLD)
    return int(weighted[0]) if weighted.size else 0


def _format_value(value: float) -> str:
    if not np.isfinite(value):
        return "–"
    magnitude = abs(value)
    if magnitude != 0 and (magnitude < 1e-2 or magnitude >= 1e4):
        return f"{value:.3g}"
    return f"{value:.3f}" if magnitude < 10 else f"{value:.2f}"


def _check_inputs(noisy: DWI, denoised: DWI, stage1, slice_scores, outlier_curves, outlier_flags):
    shape = noisy.data.shape
    if noisy.data.ndim != 4:
        raise ValueError(f"noisy must hold a 4-D DWI (X, Y, Z, N); got shape {shape}")
    if denoised.data.shape != shape:
        raise ValueError(f"denoised has shape {denoised.data.shape} but noisy has {shape}: they must match")
    if stage1 is not None and np.shape(stage1) != shape:
        raise ValueError(f"stage1 must have the shape of the noisy data {shape}; got {np.shape(stage1)}")
    for name, values in (slice_scores or {}).items():
        if np.shape(values) != (shape[2],):
            raise ValueError(f"slice_scores[{name!r}] must hold one value per axial slice ({shape[2]},); "
                             f"got shape {np.shape(values)}")
    if outlier_flags is not None:
        if outlier_curves is None or len(outlier_flags) != len(outlier_curves):
            raise ValueError("outlier_flags needs outlier_curves and one flag per curve; got "
                             f"{len(outlier_flags)} flags for "
                             f"{0 if outlier_curves is None else len(outlier_curves)} curves")


# ------------------------------------------------------------------------------------------ figure

def _figure(noisy: DWI, denoised: DWI, mask, maps_input, maps_denoised, slice_scores, outlier_curves,
            outlier_flags, stage1, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.gridspec import GridSpec

    volume = _shown_volume(noisy.bvals)
    slices = choose_slices(mask)
    orientation = _display_orientation(noisy.affine)
    noisy_volume = noisy.data[..., volume]
    denoised_volume = denoised.data[..., volume]
    residual = noisy_volume - denoised_volume
    inside = mask if mask.any() else np.ones(mask.shape, dtype=bool)
    grey_top = float(np.percentile(noisy_volume[inside], GREY_PERCENTILE)) or 1.0
    residual_limit = float(np.percentile(np.abs(residual[inside]), RESIDUAL_PERCENTILE)) or 1.0

    columns = [("noisy", noisy_volume, "grey")]
    if stage1 is not None:
        columns.append(("Stage I", np.asarray(stage1)[..., volume], "grey"))
    columns += [("denoised", denoised_volume, "grey"),
                ("residual (noisy − denoised)", residual, "residual"),
                ("colour FA, input", maps_input, "fa"),
                ("colour FA, denoised", maps_denoised, "fa")]
    has_plots = bool(slice_scores) or bool(outlier_curves)
    n_columns, n_rows = len(columns), len(slices)
    panel = 2.55
    # image rows, the colour-bar row, then (spacer, plots) when there is something to plot
    heights = [1.0] * n_rows + [0.07] + ([0.45, 1.2] if has_plots else [])
    label_width, bottom = 1.25, (0.55 if has_plots else 0.45)  # inches for slice labels, tick labels
    width, height = panel * n_columns + label_width + 0.2, panel * sum(heights) + 0.7 + bottom
    figure = plt.figure(figsize=(width, height), facecolor="white")
    grid = GridSpec(len(heights), n_columns, figure=figure, height_ratios=heights, hspace=0.08,
                    wspace=0.04, left=label_width / width, right=1 - 0.2 / width, top=1 - 0.7 / height,
                    bottom=bottom / height)
    b_value = float(noisy.bvals[volume])
    figure.suptitle((title + "  ·  " if title else "") + f"volume {volume} (b = {b_value:.0f} s/mm²)",
                    fontsize=13, color=PALETTE["ink"], fontweight="bold", x=label_width / width, ha="left")

    handles = {}
    for row, z in enumerate(slices):
        for column, (label, array, kind) in enumerate(columns):
            axes = figure.add_subplot(grid[row, column])
            axes.set_xticks([])
            axes.set_yticks([])
            for spine in axes.spines.values():
                spine.set_visible(False)
            if kind == "grey":
                handles[kind] = axes.imshow(_screen(array[:, :, z], orientation), cmap="gray", vmin=0,
                                            vmax=grey_top, interpolation="nearest")
            elif kind == "residual":
                handles[kind] = axes.imshow(_screen(array[:, :, z], orientation), cmap="RdBu_r",
                                            vmin=-residual_limit, vmax=residual_limit,
                                            interpolation="nearest")
            else:
                rgb = np.clip(array["color_fa"][:, :, z], 0, 1)
                axes.imshow(_screen(rgb, orientation), interpolation="nearest")
                axes.set_facecolor("black")
            if row == 0:
                axes.set_title(label, fontsize=10, color=PALETTE["ink"])
            if column == 0:
                text = f"slice {z}"
                for name, values in (slice_scores or {}).items():
                    text += f"\n{name} {_format_value(float(values[z]))}"
                axes.set_ylabel(text, fontsize=8.5, color=PALETTE["ink"], rotation=0, ha="right",
                                va="center", labelpad=6)
                edges = orientation[3]
                if edges and row == 0:
                    for x, edge, align in ((0.02, edges[0], "left"), (0.98, edges[1], "right")):
                        axes.text(x, 0.03, edge, transform=axes.transAxes, color="#f2c14e",
                                  fontsize=8, ha=align, va="bottom", fontweight="bold")

    bar_row = n_rows
    kinds = [kind for _, _, kind in columns]
    for kind, text in (("grey", "intensity"), ("residual", "residual")):
        column = kinds.index(kind)
        bar = figure.add_subplot(grid[bar_row, column])
        figure.colorbar(handles[kind], cax=bar, orientation="horizontal")
        bar.tick_params(labelsize=7, colors=PALETTE["muted"])
        bar.set_xlabel(text, fontsize=7.5, color=PALETTE["muted"], labelpad=1)
    legend = figure.add_subplot(grid[bar_row, kinds.index("fa"):])
    legend.axis("off")
    legend.text(0.5, 0.5, "colour FA: brightness = FA, red = left-right, green = anterior-posterior, "
                "blue = superior-inferior", ha="center", va="center", fontsize=7.5, color=PALETTE["muted"])

    if has_plots:
        plot_row = grid[n_rows + 2, :].subgridspec(1, 2 if slice_scores and outlier_curves else 1,
                                                   wspace=0.18)
        place = 0
        if slice_scores:
            _plot_slice_scores(figure.add_subplot(plot_row[0, place]), slice_scores, slices)
            place += 1
        if outlier_curves:
            _plot_outliers(figure.add_subplot(plot_row[0, place]), outlier_curves, outlier_flags)
    return figure


def _style(axes, title: str, xlabel: str, ylabel: str) -> None:
    axes.set_title(title, fontsize=10, color=PALETTE["ink"], loc="left")
    axes.set_xlabel(xlabel, fontsize=8.5, color=PALETTE["muted"])
    axes.set_ylabel(ylabel, fontsize=8.5, color=PALETTE["muted"])
    axes.tick_params(labelsize=7.5, colors=PALETTE["muted"])
    axes.grid(alpha=0.25)
    for side in ("top", "right"):
        axes.spines[side].set_visible(False)


def _plot_slice_scores(axes, slice_scores: dict, shown: list[int]) -> None:
    for name, values in slice_scores.items():
        values = np.asarray(values, dtype=np.float64)
        axes.plot(np.arange(values.size), values, marker="o", markersize=2.5, linewidth=1.3, label=name)
    for z in shown:
        axes.axvline(z, color=PALETTE["mark"], linestyle="--", linewidth=1)
    axes.legend(fontsize=7.5, frameon=False)
    _style(axes, "per-slice scores (dashed: slices shown)", "axial slice", "score")


def _plot_outliers(axes, curves: list, flags) -> None:
    from matplotlib.ticker import MaxNLocator

    flags = np.zeros(len(curves), dtype=bool) if flags is None else np.asarray(flags, dtype=bool)
    if max(len(curve) for curve in curves) <= 2:
        _plot_outlier_distances(axes, curves, flags)
        return
    for curve, flagged in sorted(zip(curves, flags), key=lambda item: item[1]):  # flagged drawn on top
        curve = np.asarray(curve, dtype=np.float64)
        axes.plot(np.arange(curve.size), curve, color=PALETTE["flag"] if flagged else PALETTE["curve"],
                  linewidth=1.6 if flagged else 0.7, alpha=0.95 if flagged else 0.45)
    axes.plot([], [], color=PALETTE["curve"], label=f"{int((~flags).sum())} slices")
    axes.plot([], [], color=PALETTE["flag"], linewidth=1.6, label=f"{int(flags.sum())} flagged flat")
    axes.legend(fontsize=7.5, frameon=False)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers (a 5-step chain too)
    _style(axes, "outlier check: RMSE(input, estimate) along the reverse chain", "reverse step", "RMSE")


def _plot_outlier_distances(axes, curves: list, flags: np.ndarray) -> None:
    """One-step chains: each curve is the input and one estimate, so a line per slice says nothing; plot
    how far the step moved each slice from its input, against the flagging threshold."""
    from ddm2.metrics import FLAT_CURVE_FRACTION, curve_rises

    rises = curve_rises(curves)
    index = np.arange(len(rises))
    axes.scatter(index[~flags], rises[~flags], s=5, color=PALETTE["curve"], label=f"{int((~flags).sum())} slices")
    axes.scatter(index[flags], rises[flags], s=14, color=PALETTE["flag"], label=f"{int(flags.sum())} flagged flat")
    axes.axhline(FLAT_CURVE_FRACTION * float(np.median(rises)), color=PALETTE["mark"], linestyle="--", linewidth=1,
                 label=f"flagged below {FLAT_CURVE_FRACTION:.0%} of the median")
    axes.set_ylim(bottom=0)
    axes.legend(fontsize=7.5, frameon=False)
    _style(axes, "outlier check: RMSE(input, estimate) after the one reverse step",
           "slice (shell by shell, volume by volume)", "RMSE")


# -------------------------------------------------------------------------------------------- HTML

_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1500px;
color:#1f2430;padding:0 1.5em}
h1{font-size:1.5em;margin-bottom:.2em}h2{font-size:1.15em;margin-top:1.6em;border-bottom:1px solid #ddd}
.meta{color:#5c6370;font-size:.9em}img{max-width:100%;border:1px solid #e3e3e3}
pre{background:#f6f7f9;padding:1em;border-radius:6px;overflow-x:auto;font-size:.85em}
table{border-collapse:collapse;font-size:.85em}td,th{padding:.25em .8em;text-align:right;
border-bottom:1px solid #eee}th{background:#f6f7f9}tr.flag td{color:#d1495b;font-weight:600}
"""


def _html_page(noisy: DWI, png: bytes, title: str, table: str | None, slice_scores: dict | None,
               slices: list[int], outlier_flags) -> str:
    weighted = int((noisy.bvals > B0_THRESHOLD).sum())
    shells = ", ".join(f"{b:.0f}" for b in np.unique(np.round(noisy.bvals[noisy.bvals > B0_THRESHOLD], -1)))
    parts = [
        "<!DOCTYPE html>", "<html lang='en'><head><meta charset='utf-8'>",
        f"<title>{html.escape(title or 'DDM2 QC report')}</title><style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title or 'DDM2 QC report')}</h1>",
        f"<p class='meta'>input: {html.escape(os.path.basename(noisy.source) or 'in memory')} · "
        f"{' × '.join(str(s) for s in noisy.data.shape[:3])} voxels · {noisy.n_volumes} volumes "
        f"({noisy.n_volumes - weighted} b = 0, {weighted} weighted, b = {shells or '–'} s/mm²) · "
        f"slices shown: {', '.join(map(str, slices))}</p>",
        f"<img alt='QC figure' src='data:image/png;base64,{base64.b64encode(png).decode('ascii')}'>",
    ]
    if table:
        parts += ["<h2>Scores</h2>", f"<pre>{html.escape(table)}</pre>"]
    if slice_scores:
        names = list(slice_scores)
        parts += ["<h2>Per-slice scores</h2>", "<table><tr><th>slice</th>"
                  + "".join(f"<th>{html.escape(name)}</th>" for name in names) + "</tr>"]
        for z in range(len(next(iter(slice_scores.values())))):
            cells = "".join(f"<td>{_format_value(float(slice_scores[name][z]))}</td>" for name in names)
            parts.append(f"<tr><td>{z}</td>{cells}</tr>")
        parts.append("</table>")
    if outlier_flags is not None:
        flagged = np.flatnonzero(np.asarray(outlier_flags, dtype=bool))
        parts += ["<h2>Outlier check (appendix F)</h2>",
                  f"<p>{flagged.size} of {len(outlier_flags)} RMSE curves stay flat"
                  + (f": curves {', '.join(map(str, flagged.tolist()))}." if flagged.size else ".")
                  + " A flat curve means the reverse chain hardly changed that slice.</p>"]
    parts.append("</body></html>")
    return "\n".join(parts)


# -------------------------------------------------------------------------------------- public API

def write_report(noisy: DWI, denoised: DWI, png_path: str | os.PathLike, html_path: str | os.PathLike,
                 maps_input: dict | None = None, maps_denoised: dict | None = None,
                 slice_scores: dict | None = None, outlier_curves: list | None = None,
                 outlier_flags=None, stage1: np.ndarray | None = None, title: str = "",
                 table: str | None = None) -> list[Path]:
    """Write the QC figure (PNG) and a self-contained HTML page that embeds it.

    Parameters
    ----------
    noisy, denoised : DWIs of the same shape (X, Y, Z, N). The first diffusion-weighted volume is shown.
    png_path, html_path : output files, written under a temporary name and renamed when complete.
    maps_input, maps_denoised : outputs of ``ddm2.maps.dti_maps`` (``color_fa`` is used); fitted inside
        the brain mask when None.
    slice_scores : optional ``{name: (Z,) array}`` of per-axial-slice scores; plotted, printed beside
        the shown slices and tabulated in the HTML.
    outlier_curves : optional list of 1-D RMSE curves (see ``ddm2.metrics.flag_flat_curves``).
    outlier_flags : optional bool array, one per curve; flagged curves are drawn in red.
    stage1 : optional (X, Y, Z, N) Stage I output, shown between noisy and denoised.
    title : heading of the figure and the page.
    table : optional plain-text table (e.g. ``evaluation.format_score_table``) shown in the HTML.

    Returns
    -------
    [png_path, html_path] as Paths.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ddm2.maps import brain_mask, dti_maps

    _check_inputs(noisy, denoised, stage1, slice_scores, outlier_curves, outlier_flags)
    mask = brain_mask(noisy.data, noisy.bvals)
    if maps_input is None:
        maps_input = dti_maps(noisy.data, noisy.bvals, noisy.bvecs_voxel(), mask=mask)
    if maps_denoised is None:
        maps_denoised = dti_maps(denoised.data, denoised.bvals, denoised.bvecs_voxel(), mask=mask)

    figure = _figure(noisy, denoised, mask, maps_input, maps_denoised, slice_scores, outlier_curves,
                     outlier_flags, stage1, title)
    png_path, html_path = Path(png_path), Path(html_path)
    try:
        with atomic_path(png_path) as temporary:
            figure.savefig(temporary, format="png", dpi=110, facecolor="white")
    finally:
        plt.close(figure)
    page = _html_page(noisy, png_path.read_bytes(), title, table, slice_scores, choose_slices(mask),
                      outlier_flags)
    with atomic_path(html_path) as temporary:
        temporary.write_text(page, encoding="utf-8")
    return [png_path, html_path]
