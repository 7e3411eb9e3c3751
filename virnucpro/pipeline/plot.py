"""Figures of a predict run: upstream VirNucPro's `prediction.png` and a histogram of contig scores.

`draw_figures(OUT_DIR)` reads what `virnucpro predict` wrote there and draws, beside it:

  * prediction.png (upstream's `drew_fig.py` view): one panel per contig (the first five that have a
    classified chunk, or those named), one horizontal segment per chunk over the bases it covers, at
    the chunk's winning score, red where the chunk is virus and dark blue where it is others. A
    chunk's winning score and verdict are upstream's per-chunk rule (prediction_results_highestscore.csv):
    virus iff its best score2 >= its best score1 over its kept frames, drawn at the larger of the two
    (so always >= 0.5). Upstream draws one segment per frame, several on top of each other where a
    chunk has several stop-free frames; one per chunk shows the verdict that its files report.
    Chunks without a stop-free frame (no score) are a grey band at the bottom.
  * contig_scores.png: how the contig verdicts of contig_predictions.tsv fall: contigs per bin of
    `mean_score`, virus and others stacked, the threshold as a dashed line.

Positions are exact when the input FASTA named in `_preprocess.json` is still there, unchanged: the
contig's length gives its chunks' bounds (`virnucpro.pipeline.preprocess.chunk_bounds`, same chunk size and
mode). Otherwise chunk k is drawn at (k-1) x chunk size, and the axis says so.

matplotlib is optional (`pip install matplotlib`). Nothing here imports it before a figure is
drawn, and figures are drawn on matplotlib's Agg canvas through `matplotlib.figure.Figure`, without
pyplot: no display is needed and no global backend is switched in the caller's process.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from virnucpro.io.fasta import iter_records
from virnucpro.pipeline.classify import CONTIGS_TSV, PREDICTIONS_PARQUET, PREPROCESS_MARKER, UNCLASSIFIED
from virnucpro.pipeline.preprocess import chunk_bounds
from virnucpro.errors import PlotError  # noqa: F401 - also imported from here

log = logging.getLogger("virnucpro")

PREDICTION_PNG = "prediction.png"
CONTIG_SCORES_PNG = "contig_scores.png"
MAX_CONTIGS = 5  # upstream draws the first five contigs
INSTALL_HINT = "pip install matplotlib"
COLORS = {"virus": "red", "others": "darkblue", UNCLASSIFIED: "lightgray"}  # upstream's two colours
_DPI = 120


class MatplotlibMissing(PlotError):
    """matplotlib is not installed (it is an optional extra)."""


@dataclass(frozen=True)
class Track:
    """One panel of prediction.png: a contig, its chunks' bounds and their scores."""

    contig_id: str
    length: int  # bases (nominal, n x chunk size, when `exact` is False)
    bounds: list[tuple[int, int]]  # chunk k's [start, end) at index k-1
    maxima: list[tuple[float, float] | None]  # chunk k's (best score1, best score2); None: no kept frame
    label: str  # the contig verdict of contig_predictions.tsv
    mean_score: float | None
    exact: bool  # bounds from the contig's length in the input, not nominal


@dataclass(frozen=True)
class Figures:
    """What `draw_figures` wrote: both files, and the contigs drawn in prediction.png (in order)."""

    prediction_png: Path
    contig_scores_png: Path
    contigs: list[str]

    def summary(self) -> str:
        drawn = ", ".join(self.contigs) or "no contig"
        return f"wrote {self.prediction_png} ({drawn}) and {self.contig_scores_png}"


# -----------------------------------------------------------------------------
# reading a predict output directory

def read_contig_table(out: Path) -> pa.Table:
    """contig_predictions.tsv as a table (ids as strings, NA scores as nulls), in input order."""
    path = out / CONTIGS_TSV
    if not path.is_file():
        raise PlotError(f"{out}: no {CONTIGS_TSV}; is it the output directory of a finished `virnucpro predict`?")
    types = {"contig_id": pa.string(), "label": pa.string(), "chunks": pa.int64(), "mean_score": pa.float64()}
    return pacsv.read_csv(path, parse_options=pacsv.ParseOptions(delimiter="\t", quote_char=False),
                          convert_options=pacsv.ConvertOptions(column_types=types, null_values=["NA"],
                                                               strings_can_be_null=False))


def choose_contigs(table: pa.Table, contigs: Sequence[str] | None, max_contigs: int) -> list[str]:
    """The contigs to draw: those named (in the order given, each must be in the table), else the
    first `max_contigs` that have a classified chunk (upstream's first five of prediction_results.txt)."""
    ids = table.column("contig_id").to_pylist()
    if contigs:
        known = set(ids)
        missing = [c for c in contigs if c not in known]
        if missing:
            raise PlotError(f"not in {CONTIGS_TSV}: {', '.join(missing)}")
        return list(dict.fromkeys(contigs))
    labels = table.column("label").to_pylist()
    return [c for c, label in zip(ids, labels) if label != UNCLASSIFIED][:max_contigs]


def chunk_maxima(out: Path, contigs: Sequence[str]) -> dict[str, dict[int, tuple[float, float]]]:
    """Per contig, per chunk number (from 1): (best score1, best score2) over the chunk's kept frames,
    read from predictions.parquet for these contigs only."""
    path = out / PREDICTIONS_PARQUET
    if not path.is_file():
        raise PlotError(f"{out}: no {PREDICTIONS_PARQUET}")
    if not contigs:
        return {}
    table = pq.read_table(path, columns=["chunk_id", "contig_id", "score1", "score2"],
                          filters=[("contig_id", "in", list(contigs))])
    best = table.group_by(["contig_id", "chunk_id"]).aggregate([("score1", "max"), ("score2", "max")])
    result: dict[str, dict[int, tuple[float, float]]] = {c: {} for c in contigs}
    for contig, chunk, s1, s2 in zip(*(best.column(n).to_pylist()
                                       for n in ("contig_id", "chunk_id", "score1_max", "score2_max"))):
        if contig in result:
            result[contig][_chunk_number(contig, chunk)] = (s1, s2)
    return result


def _chunk_number(contig: str, chunk: str) -> int:
    """k of `{contig}_chunk_{k}` (virnucpro.pipeline.ids)."""
    return int(chunk[len(contig) + len("_chunk_"):])


def input_lengths(out: Path, contigs: Sequence[str]) -> tuple[dict[str, int], dict]:
    """(length of each of these contigs in the input FASTA, preprocessing params). The lengths are
    empty when the input named by _preprocess.json is gone or changed since (size or mtime)."""
    path = out / PREPROCESS_MARKER
    params = json.loads(path.read_text()).get("params", {}) if path.is_file() else {}
    source = Path(params.get("input", ""))
    try:
        st = source.stat()
    except OSError:
        return {}, params
    if (st.st_size, st.st_mtime_ns) != (params.get("input_bytes"), params.get("input_mtime_ns")):
        log.info("%s changed since the predict run; chunk positions in %s are nominal", source, PREDICTION_PNG)
        return {}, params
    wanted, lengths = set(contigs), {}
    for record_id, seq in iter_records(source):
        if record_id in wanted and record_id not in lengths:
            lengths[record_id] = len(seq)
            if len(lengths) == len(wanted):
                break
    return lengths, params


def contig_tracks(out: Path, table: pa.Table, contigs: Sequence[str]) -> list[Track]:
    """One Track per contig to draw, with exact chunk bounds where the input allows."""
    rows = {c: i for i, c in enumerate(table.column("contig_id").to_pylist())}
    maxima = chunk_maxima(out, contigs)
    lengths, params = input_lengths(out, contigs)
    size, mode = int(params.get("chunk_size", 500)), params.get("chunking", "compat")
    tracks = []
    for contig in contigs:
        i = rows[contig]
        n = table.column("chunks")[i].as_py()
        bounds = chunk_bounds(lengths[contig], size, mode) if contig in lengths else []
        exact = len(bounds) == n  # a mismatch (input edited, ids renamed) falls back to nominal bounds
        if not exact:
            bounds = [((k - 1) * size, k * size) for k in range(1, n + 1)]
        tracks.append(Track(contig, bounds[-1][1] if bounds else 0, bounds,
                            [maxima[contig].get(k) for k in range(1, n + 1)], table.column("label")[i].as_py(),
                            table.column("mean_score")[i].as_py(), exact))
    return tracks


# -----------------------------------------------------------------------------
# drawing

def _matplotlib():
    """matplotlib's Figure class, or MatplotlibMissing saying how to install it."""
    try:
        from matplotlib.figure import Figure
    except ImportError as e:
        raise MatplotlibMissing(f"the figures need matplotlib: {INSTALL_HINT}") from e
    return Figure


def draw_prediction(tracks: Sequence[Track], path: Path) -> None:
    """prediction.png: per contig, each chunk's winning score along the contig (see the module doc)."""
    Figure = _matplotlib()
    from matplotlib.lines import Line2D
    from matplotlib.ticker import StrMethodFormatter

    fig = Figure(figsize=(12, 0.7 + 2.3 * max(1, len(tracks))), dpi=_DPI, constrained_layout=True)
    if not tracks:
        fig.text(0.5, 0.5, "no contig has a classified chunk", ha="center", va="center", fontsize=14)
    axes = fig.subplots(len(tracks), 1, squeeze=False)[:, 0] if tracks else []
    for ax, track in zip(axes, tracks):
        _draw_track(ax, track)
        ax.xaxis.set_major_formatter(StrMethodFormatter("{x:,.0f}"))
    if tracks:
        handles = [Line2D([], [], color=COLORS[k], lw=3, label=text) for k, text in
                   (("virus", "virus"), ("others", "others"), (UNCLASSIFIED, "no stop-free frame"))]
        fig.legend(handles=handles, loc="outside upper right" if _has_outside_legends() else "upper right",
                   ncol=3, frameon=False, fontsize=11)
    fig.savefig(path)


def _draw_track(ax, track: Track) -> None:
    """One contig's panel: a segment per chunk at its winning score, coloured by its verdict."""
    for (start, end), m in zip(track.bounds, track.maxima):
        if m is None:
            ax.hlines(0.47, start, end, colors=COLORS[UNCLASSIFIED], lw=5)
            continue
        virus = m[1] >= m[0]  # upstream's Is_Virus
        ax.hlines(max(m), start, end, colors=COLORS["virus" if virus else "others"], lw=2.5)
    verdict = track.label if track.mean_score is None else f"{track.label}, score {track.mean_score:.3f}"
    ax.set_title(f"{track.contig_id}  ({track.length:,} bp, {len(track.bounds)} chunks; contig: {verdict})",
                 fontsize=12, fontweight="bold", loc="left")
    where = "position along the contig (bp)" if track.exact else \
        "position along the contig (bp, nominal: chunk k at (k-1) x chunk size; the input FASTA is gone or changed)"
    ax.set_xlabel(where, fontsize=10)
    ax.set_ylabel("winning score", fontsize=10)
    ax.set_xlim(0, max(track.length, 1))
    ax.set_ylim(0.45, 1.05)  # upstream's range: a winning score is >= 0.5
    ax.set_yticks([0.5, 0.75, 1.0])
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


def _has_outside_legends() -> bool:
    """Figure legends placed outside the axes ('outside upper right') exist from matplotlib 3.7."""
    import matplotlib

    return tuple(int(p) for p in matplotlib.__version__.split(".")[:2]) >= (3, 7)


def draw_score_histogram(table: pa.Table, threshold: float, path: Path) -> None:
    """contig_scores.png: contigs per bin of mean_score, virus and others stacked, the threshold marked."""
    Figure = _matplotlib()
    from matplotlib.ticker import MaxNLocator

    labels = table.column("label")
    scores = {k: pc.filter(table.column("mean_score"), pc.equal(labels, k)).to_numpy(zero_copy_only=False)
              for k in ("others", "virus")}
    unclassified = len(table) - sum(len(v) for v in scores.values())
    fig = Figure(figsize=(8, 4.5), dpi=_DPI, constrained_layout=True)
    ax = fig.subplots()
    ax.hist([scores["others"], scores["virus"]], bins=np.linspace(0, 1, 41), stacked=True,
            color=[COLORS["others"], COLORS["virus"]],
            label=[f"others ({len(scores['others']):,})", f"virus ({len(scores['virus']):,})"])
    ax.axvline(threshold, color="black", ls="--", lw=1.2, label=f"threshold {threshold:g}")
    ax.set_xlim(0, 1)
    ax.set_xlabel("contig score: mean over its chunks of the best frame's P(virus)")
    ax.set_ylabel("contigs")
    ax.set_ylim(0, max(1, ax.get_ylim()[1]))  # counts from 0, an empty histogram included
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    note = f"; {unclassified:,} without a stop-free frame, not shown" if unclassified else ""
    ax.set_title(f"{len(table):,} contigs{note}", fontsize=11)
    ax.legend(frameon=False)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    fig.savefig(path)


# -----------------------------------------------------------------------------
# entry points

def draw_figures(out_dir: str | Path, contigs: Sequence[str] | None = None, max_contigs: int = MAX_CONTIGS,
                 threshold: float = 0.5) -> Figures:
    """Draw prediction.png and contig_scores.png in a predict run's OUT_DIR (`virnucpro plot`).

    contigs: the contigs of prediction.png, in this order (default: the first `max_contigs` with a
    classified chunk). threshold: the line on the histogram (predict's --threshold; the verdicts in
    contig_predictions.tsv are the ones predict made). Raises PlotError (MatplotlibMissing without
    matplotlib) before writing anything when the figures cannot be drawn.
    """
    out = Path(out_dir)
    _matplotlib()
    table = read_contig_table(out)
    chosen = choose_contigs(table, contigs, max_contigs)
    figures = Figures(out / PREDICTION_PNG, out / CONTIG_SCORES_PNG, chosen)
    draw_prediction(contig_tracks(out, table, chosen), figures.prediction_png)
    draw_score_histogram(table, threshold, figures.contig_scores_png)
    return figures


def figures_after_predict(out_dir: str | Path, contigs: Sequence[str] | None, threshold: float) -> Figures | None:
    """The figures at the end of `predict`: drawn when matplotlib is there, else one line saying how to
    get them. A figure that fails is a warning, not an error: the predictions are written by then and
    must not be lost to their picture."""
    try:
        figures = draw_figures(out_dir, contigs, threshold=threshold)
    except MatplotlibMissing:
        log.info("figures: matplotlib is not installed; %s, then `virnucpro plot %s`", INSTALL_HINT, out_dir)
        return None
    except Exception as e:  # noqa: BLE001 - see the docstring
        log.warning("figures not drawn (%s: %s); redraw them with `virnucpro plot %s`", type(e).__name__, e,
                    out_dir)
        return None
    log.info("figures: %s", figures.summary())
    return figures


__all__ = ["draw_figures", "figures_after_predict", "Figures", "Track", "PlotError", "MatplotlibMissing",
           "PREDICTION_PNG", "CONTIG_SCORES_PNG"]
