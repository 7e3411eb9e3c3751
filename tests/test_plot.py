"""Figures of a predict run (virnucpro.pipeline.plot, `virnucpro plot`): drawn from the files predict writes,
without Ray or models: the output directory is made by the real preprocessing and the real writers
of stages 3-4, fed random scores."""

from __future__ import annotations

import json
import logging
import shutil
import struct
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

pytest.importorskip("matplotlib")

from cluster.cli import create_parser, main  # noqa: E402
from virnucpro.options import PredictOptions, from_args  # noqa: E402
from virnucpro.pipeline.plot import (CONTIG_SCORES_PNG, PREDICTION_PNG, MatplotlibMissing, PlotError,  # noqa: E402
                            contig_tracks, draw_figures, figures_after_predict, read_contig_table)
from virnucpro.pipeline.classify import (PREDICTIONS_PARQUET, PREPROCESS_MARKER, Classification,  # noqa: E402
                               preprocess_params, save_preprocess_marker)
from virnucpro.pipeline.preprocess import chunk_bounds, preprocess_fasta  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NO_FRAME = "AACT" * 200  # a stop in all six frames of every chunk: an unclassified contig


def predict_output(tmp: Path, fasta_text: str, seed: int = 0) -> Path:
    """OUT_DIR as `virnucpro predict` leaves it, with random frame scores instead of models."""
    fasta, out = tmp / "contigs.fasta", tmp / "out"
    fasta.write_text(fasta_text)
    res = preprocess_fasta(fasta, out, 500, "compat", workers=1)
    save_preprocess_marker(out, preprocess_params(fasta, 500, "compat"), res)
    cls = Classification(out, fasta, None, {}, {})
    p_virus = np.random.default_rng(seed).uniform(size=res.frames).astype(np.float32)
    maxima, _ = cls.write_frame_outputs(np.stack([1 - p_virus, p_virus], axis=1))
    cls.write_highest_scores(maxima)
    cls.write_contig_table(maxima, 0.5)
    return out


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> Path:
    text = f">stopper\n{NO_FRAME}\n" + (ROOT / "examples" / "contigs.fasta").read_text()
    return predict_output(tmp_path_factory.mktemp("plot"), text)


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) of a PNG file, from its header; fails on anything that is not a PNG."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", f"{path} is not a PNG"
    assert data[-8:-4] == b"IEND", f"{path} is truncated"
    return struct.unpack(">II", data[16:24])


def classified_contigs(out: Path) -> list[str]:
    table = read_contig_table(out)
    return [c for c, lab in zip(table.column("contig_id").to_pylist(), table.column("label").to_pylist())
            if lab != "unclassified"]


def test_both_figures_default_to_the_first_five_classified_contigs(out):
    figures = draw_figures(out)
    assert figures.contigs == classified_contigs(out)[:5] and "stopper" not in figures.contigs
    width, height = png_size(out / PREDICTION_PNG)
    assert width >= 1200 and height >= 5 * 200  # a readable panel per contig
    width, height = png_size(out / CONTIG_SCORES_PNG)
    assert width >= 800 and height >= 400
    assert (out / PREDICTION_PNG).stat().st_size > 20_000  # drawn, not blank


def test_named_contigs_are_drawn_in_the_order_given(out, tmp_path):
    last, first = classified_contigs(out)[-1], classified_contigs(out)[0]
    figures = draw_figures(out, contigs=[last, "stopper", first])
    assert figures.contigs == [last, "stopper", first]  # an unclassified contig may be asked for
    three = png_size(out / PREDICTION_PNG)[1]
    assert draw_figures(out, max_contigs=1).contigs == [first]
    assert png_size(out / PREDICTION_PNG)[1] < three
    with pytest.raises(PlotError, match="not in contig_predictions.tsv: nope"):
        draw_figures(out, contigs=[first, "nope"])


def test_chunks_are_drawn_where_they_lie_in_the_contig(out, tmp_path):
    """Bounds from the contig's length in the input (upstream's chunking); per chunk the best score of
    each class over its frames, as in predictions.parquet; nominal bounds once the input is gone."""
    contigs = classified_contigs(out)[:3] + ["stopper"]
    tracks = contig_tracks(out, read_contig_table(out), contigs)
    frames = pq.read_table(out / PREDICTIONS_PARQUET).to_pylist()
    lengths = {"stopper": len(NO_FRAME)}
    for line in (ROOT / "examples" / "contigs.fasta").read_text().split(">")[1:]:
        header, *seq = line.splitlines()
        lengths[header.split()[0]] = len("".join(seq))
    for track in tracks:
        assert track.exact and track.length == lengths[track.contig_id]
        assert track.bounds == chunk_bounds(track.length, 500, "compat")
        for k, m in enumerate(track.maxima, start=1):
            rows = [f for f in frames if f["chunk_id"] == f"{track.contig_id}_chunk_{k}"]
            assert m == (None if not rows else (max(f["score1"] for f in rows), max(f["score2"] for f in rows)))
    assert tracks[-1].maxima == [None, None] and tracks[-1].label == "unclassified"

    moved = tmp_path / "moved"
    shutil.copytree(out, moved)
    marker = json.loads((moved / PREPROCESS_MARKER).read_text())
    marker["params"]["input"] = str(tmp_path / "gone.fasta")
    (moved / PREPROCESS_MARKER).write_text(json.dumps(marker))
    nominal = contig_tracks(moved, read_contig_table(moved), contigs[:1])[0]
    assert not nominal.exact and nominal.bounds[1] == (500, 1000) and nominal.maxima == tracks[0].maxima


def test_a_run_without_frames_still_gets_its_figures(tmp_path):
    out = predict_output(tmp_path, f">a\n{NO_FRAME}\n>b\nAC\n")
    figures = draw_figures(out)
    assert figures.contigs == []
    png_size(figures.prediction_png), png_size(figures.contig_scores_png)


def test_without_matplotlib_predict_says_how_to_get_the_figures(out, tmp_path, monkeypatch, caplog, capsys):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    copy = tmp_path / "out"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("*.png"))
    with pytest.raises(MatplotlibMissing):
        draw_figures(copy)
    with caplog.at_level(logging.INFO, logger="virnucpro"):
        assert figures_after_predict(copy, None, 0.5) is None
    hints = [r.getMessage() for r in caplog.records if "pip install matplotlib" in r.getMessage()]
    assert len(hints) == 1 and f"virnucpro plot {copy}" in hints[0]
    assert not list(copy.glob("*.png"))
    assert main(["plot", str(copy)]) == 1
    assert "pip install matplotlib" in capsys.readouterr().err


def test_a_failing_figure_does_not_fail_predict(tmp_path, caplog):
    (tmp_path / "contig_predictions.tsv").write_text("not a contig table\n")
    with caplog.at_level(logging.WARNING, logger="virnucpro"):
        assert figures_after_predict(tmp_path, None, 0.5) is None
    assert "figures not drawn" in caplog.text and "virnucpro plot" in caplog.text


def test_cli_plot_and_predict_options(out, capsys):
    first = classified_contigs(out)[1]
    assert main(["plot", str(out), "--contigs", first, "--threshold", "0.7"]) == 0
    assert f"({first})" in capsys.readouterr().out
    assert main(["plot", str(out), "--max-contigs", "0"]) == 2
    args = create_parser().parse_args(["predict", "in.fa", "-o", "o", "--classifier", "m.pth", "--chunk-size",
                                       "500", "--plot-contigs", "c1", "c2", "--no-plots"])
    opts = from_args(PredictOptions, args)
    assert list(opts.plot_contigs) == ["c1", "c2"] and opts.plots is False
    defaults = from_args(PredictOptions, create_parser().parse_args(
        ["predict", "in.fa", "-o", "o", "--classifier", "m.pth", "--chunk-size", "500"]))
    assert defaults.plot_contigs is None and defaults.plots is True


def test_predict_draws_the_figures_at_its_end(out, tmp_path, monkeypatch, caplog):
    """cluster.pipeline.predict: its run (stubbed here; test_predict runs it whole) is followed by the
    figures, of the contigs named; plots=False draws none."""
    import cluster.pipeline as cp

    copy = tmp_path / "out"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("*.png"))

    class Run:
        def __init__(self, *args):
            pass

        def run(self):
            return cp.PredictResult(copy, 0, 0, 0, 0, 0, {}, {})

    monkeypatch.setattr(cp, "PipelineRun", Run)
    cp.predict("in.fa", copy, "m.pth", plots=False)
    assert not list(copy.glob("*.png"))
    name = classified_contigs(out)[2]
    with caplog.at_level(logging.INFO, logger="virnucpro"):
        cp.predict("in.fa", copy, "m.pth", plot_contigs=[name])
    assert f"{copy / PREDICTION_PNG} ({name})" in caplog.text
    assert png_size(copy / PREDICTION_PNG) and png_size(copy / CONTIG_SCORES_PNG)
