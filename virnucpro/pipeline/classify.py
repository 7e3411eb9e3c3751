"""VirNucPro prediction without Ray: the output directory, its markers, and the stages after embedding.

`cluster.pipeline` runs the pipeline: preprocessing (virnucpro.pipeline.preprocess), then both embedding jobs
on Ray. What else a run needs, none of which needs Ray, is here:

  * OUT_DIR's layout (the file names below, EMBED_DIRS) and `prepare_out_dir`, which refuses,
    resumes or replaces a previous run's output;
  * the preprocessing marker `_preprocess.json` (`preprocess_params`, `reusable_preprocessing`,
    `save_preprocess_marker`), which lets a resumed run skip preprocessing;
  * `Classification`, stages 3 and 4: join the two embedding runs per frame, apply the MLP, write
    prediction_results.txt and prediction_results_highestscore.csv (upstream's formats),
    predictions.parquet and contig_predictions.tsv, and the `_predict.json` marker that lets a
    resumed run reuse them;
  * the tables: `predictions_table` (one row per frame) and `contig_rows` (one verdict per contig).

The join. nucleotide.fasta and protein.faa are written from the same frame list: record i of both is
frame i, with the same id. Each embedding row carries `id` and `index` (its record ordinal), so
rows are matched by `index` and every match is checked by id against the other model's row and
against protein.faa; nothing relies on part-file or row order. Features are DNABERT-S then ESM-2
(768 + 2560 = 3328 for the real models), as upstream concatenates them.

Memory. The driver never holds all embeddings. DNABERT-S rows (the narrower ones) are scattered by
index into a disk-backed memmap under OUT_DIR/.work (4*768 bytes per frame on disk); ESM-2 parts
are then streamed one at a time, joined with their DNABERT-S rows and classified. What stays in
memory per frame: two float32 scores, a 64-bit id hash and a flag (17 bytes; 10 M frames: 170 MB),
plus one entry per chunk with frames for the per-chunk maxima (upstream's highest-score file is
sorted by chunk id, so all chunk ids are needed before it can be written).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from torch import nn

from virnucpro.pipeline.classifier import (LABELS, PREDICTION_HEADER, ChunkMaxima, predict_proba, prediction_lines,
                         write_highest_score_rows)
from virnucpro.io.fasta import fasta_ids
from virnucpro.pipeline.ids import chunk_of, contig_of
from virnucpro.models import DNABERT_S_FAMILY, ESM2_FAMILY
from virnucpro.io.output import Manifest, atomic_path, atomic_write
from virnucpro.pipeline.preprocess import CHUNKS_FASTA, NUCLEOTIDE_FASTA, PROTEIN_FASTA, PreprocessResult
from virnucpro.io.storage import InputFile
from virnucpro.errors import PredictError  # noqa: F401 - also imported from here

log = logging.getLogger("virnucpro")

# OUT_DIR's layout (preprocessing's three FASTA files are named in virnucpro.pipeline.preprocess)
PREPROCESS_MARKER = "_preprocess.json"
PREDICT_MARKER = "_predict.json"
RESULTS_TXT = "prediction_results.txt"
HIGHEST_CSV = "prediction_results_highestscore.csv"
PREDICTIONS_PARQUET = "predictions.parquet"
CONTIGS_TSV = "contig_predictions.tsv"
EMBED_DIRS = {DNABERT_S_FAMILY: Path("embeddings") / "dnabert_s", ESM2_FAMILY: Path("embeddings") / "esm2"}
WORK_DIR = ".work"  # scratch of the join, removed at the end
# the stages whose wall seconds a run reports (summary line, _predict.json "seconds"); `embed` is Ray's
# start and both embedding jobs to the end of the later (they run at once), dnabert_s and esm2 each
# job's own call (its actors' start-up included)
STAGE_TIMES = ("preprocess", "embed", DNABERT_S_FAMILY, ESM2_FAMILY, "classify", "write")
# what preprocessing counts of letters outside A/C/G/T and the IUPAC codes (_preprocess.json, _predict.json)
LETTER_COUNTS = ("chunks_with_nonstandard_letters", "nonstandard_letters")

CONTIG_COLUMNS = ("contig_id", "chunks", "classified_chunks", "viral_chunks", "viral_fraction",
                  "mean_score", "max_score", "label")
UNCLASSIFIED = "unclassified"
PREDICTIONS_SCHEMA = pa.schema([
    pa.field("frame_id", pa.string(), nullable=False),  # `id` in the embeddings; upstream's Sequence_ID
    pa.field("chunk_id", pa.string(), nullable=False),
    pa.field("contig_id", pa.string(), nullable=False),
    pa.field("score1", pa.float32(), nullable=False),  # P(others)
    pa.field("score2", pa.float32(), nullable=False),  # P(virus)
    pa.field("label", pa.string(), nullable=False),  # virus if score2 > score1 (upstream's Prediction)
])
_ROWS_PER_WRITE = 65536  # frames per block of the output pass (one Parquet row group)


# -----------------------------------------------------------------------------
# the output directory

def our_paths(out: Path) -> list[Path]:
    """Everything a predict run writes in OUT_DIR (what --overwrite removes)."""
    names = [CHUNKS_FASTA, NUCLEOTIDE_FASTA, PROTEIN_FASTA, PREPROCESS_MARKER, PREDICT_MARKER,
             RESULTS_TXT, HIGHEST_CSV, PREDICTIONS_PARQUET, CONTIGS_TSV, WORK_DIR]
    return [out / n for n in names] + [out / d for d in EMBED_DIRS.values()]


def prepare_out_dir(out: Path, resume: bool, overwrite: bool) -> None:
    """Create OUT_DIR; a previous run's output there is kept (resume), removed (overwrite), or an error."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PredictError(f"{out}: cannot create the output directory ({e.strerror or e})") from None
    previous = [p for p in our_paths(out) if p.exists()]
    if previous and overwrite:
        for p in previous:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    elif previous and not resume:
        raise PredictError(f"{out}: holds the output of a previous run ({previous[0].name}); use "
                           f"--resume to finish it or --overwrite to replace it")


def remove_scratch(out: Path, keep_embeddings: bool) -> None:
    """At the end of a run: the join's scratch files, and the embeddings unless they are to be kept."""
    if not keep_embeddings:
        for d in EMBED_DIRS.values():
            shutil.rmtree(out / d, ignore_errors=True)
        try:
            (out / "embeddings").rmdir()  # only if nothing else is in it
        except OSError:
            pass
    shutil.rmtree(out / WORK_DIR, ignore_errors=True)


def _save_json(path: Path, value: dict) -> None:
    data = json.dumps(value, indent=1).encode()
    atomic_write(path, lambda f: f.write(data))


# -----------------------------------------------------------------------------
# stage 1's marker

def preprocess_params(input: str | Path, chunk_size: int, chunking: str) -> dict:
    """What preprocessing's output depends on: the input file (path or URI, size, mtime) and the options."""
    source = InputFile.open(input)
    return {"input": source.uri, "input_bytes": source.size, "input_mtime_ns": source.mtime_ns,
            "chunk_size": chunk_size, "chunking": chunking}


def reusable_preprocessing(out: Path, params: dict) -> dict | None:
    """The marker of a finished preprocessing in OUT_DIR with these params whose files are unchanged,
    or None (none there, or its files changed since). A marker of other input or options is an error:
    resuming it would mix two runs."""
    path = out / PREPROCESS_MARKER
    if not path.is_file():
        return None
    marker = json.loads(path.read_text())
    if marker.get("params") != params:
        raise PredictError(f"{out}: holds a run on other input or options "
                           f"({marker.get('params')}); use --overwrite to replace it")
    sizes = marker.get("files", {})
    if all((out / n).is_file() and (out / n).stat().st_size == s for n, s in sizes.items()):
        return marker
    log.warning("%s: preprocessed files changed since they were written; preprocessing again", out)
    return None


def forget_markers(out: Path) -> None:
    """Before preprocessing again: a new preprocessing invalidates any classification made from the
    previous one, and the old marker must not outlive its files."""
    (out / PREDICT_MARKER).unlink(missing_ok=True)
    (out / PREPROCESS_MARKER).unlink(missing_ok=True)


def save_preprocess_marker(out: Path, params: dict, res: PreprocessResult) -> dict:
    """Record a finished preprocessing (once its files are whole); returns the marker."""
    marker = {"params": params, "contigs": res.contigs, "chunks": res.chunks, "frames": res.frames,
              "chunks_with_frames": res.chunks_with_frames, "chunks_with_nonstandard_letters": res.odd.chunks,
              "nonstandard_letters": res.odd.letters,
              "files": {n: (out / n).stat().st_size for n in (CHUNKS_FASTA, NUCLEOTIDE_FASTA, PROTEIN_FASTA)}}
    _save_json(out / PREPROCESS_MARKER, marker)
    return marker


# -----------------------------------------------------------------------------
# stages 3 and 4

EmbeddingPart = tuple[list[str], np.ndarray, np.ndarray]  # (ids, index, embeddings [n, D]) of one part


class Classification:
    """Stages 3 and 4 of a predict run in OUT_DIR, given both complete embedding runs and the classifier.

    classify: join the embeddings per frame and apply the MLP. write_frame_outputs: the per-frame
    files (and the per-chunk maxima). write_highest_scores, write_contig_table: the per-chunk and
    per-contig files. `reusable` and `save_marker` let a resumed run skip what is done.
    """

    def __init__(self, out: Path, classifier_path: Path, model: nn.Module, models: dict[str, str],
                 dims: dict[str, int], embed_dirs: dict[str, Path] | None = None):
        """models, dims: per model family, the model's name and embedding width; embed_dirs: per
        family, its embedding run (default: OUT_DIR/EMBED_DIRS)."""
        self.out, self.classifier_path, self.model = out, classifier_path, model
        self.models, self.dims = models, dims
        self.embed_dirs = embed_dirs or {f: out / d for f, d in EMBED_DIRS.items()}
        self.id_hash: np.ndarray | None = None  # per frame, hash of its id, once the embeddings are joined

    # --- the marker ----------------------------------------------------------------------------------

    def identity(self) -> dict:
        """What the classification depends on besides the frames: classifier file and both models."""
        st = self.classifier_path.stat()
        return {"classifier": str(self.classifier_path.resolve()), "classifier_bytes": st.st_size,
                "classifier_mtime_ns": st.st_mtime_ns, "models": self.models, "dims": self.dims}

    def reusable(self, frames: int) -> bool:
        """Whether OUT_DIR holds this classification of these frames, complete."""
        path = self.out / PREDICT_MARKER
        if not path.is_file():
            return False
        marker = json.loads(path.read_text())
        identity = self.identity()
        same = {k: marker.get(k) for k in identity} == identity
        files = all((self.out / n).is_file() for n in (RESULTS_TXT, PREDICTIONS_PARQUET))
        ok = same and files and marker.get("complete") and marker.get("frames") == frames
        if ok:
            log.info("classification: reusing %s and %s", RESULTS_TXT, PREDICTIONS_PARQUET)
        return bool(ok)

    def save_marker(self, frames: int) -> None:
        _save_json(self.out / PREDICT_MARKER, {**self.identity(), "frames": frames, "complete": True})

    def record_run(self, report: dict) -> None:
        """Add what the last run did (stage seconds, letter counts) to the marker; a resumed run
        replaces it with its own."""
        path = self.out / PREDICT_MARKER
        _save_json(path, {**json.loads(path.read_text()), **report})

    # --- stage 3: join and classify ------------------------------------------------------------------

    def classify(self, n: int) -> np.ndarray:
        """Join both embeddings by frame and classify; probs [n, 2] in frame (index) order."""
        t = time.perf_counter()
        work = self.out / WORK_DIR
        work.mkdir(exist_ok=True)
        shape = (n, self.dims[DNABERT_S_FAMILY])
        dna = np.lib.format.open_memmap(work / "dnabert_s.npy", mode="w+", dtype=np.float32, shape=shape)
        self.id_hash = self._scatter_dnabert_s(dna)
        probs = np.zeros((n, 2), np.float32)
        seen = np.zeros(n, bool)
        for ids, index, emb in self._parts(ESM2_FAMILY):
            _claim(seen, index, n, ESM2_FAMILY)
            bad = np.flatnonzero(self.id_hash[index] != _hashes(ids))
            if len(bad):
                raise PredictError(f"frame {int(index[bad[0]])}: ESM-2 row '{ids[bad[0]]}' has no DNABERT-S "
                                   f"row with the same id; the two embedding runs are of different inputs")
            order = np.argsort(index)  # sequential reads of the memmap
            x = np.concatenate([dna[index[order]], emb[order]], axis=1)
            probs[index[order]] = predict_proba(self.model, x)
        if not seen.all():
            raise PredictError(f"ESM-2 embeddings are missing for {int((~seen).sum())} frame(s)")
        del dna
        log.info("classified %d frames in %.1f s", n, time.perf_counter() - t)
        return probs

    def _scatter_dnabert_s(self, rows: np.ndarray) -> np.ndarray:
        """Write the DNABERT-S embeddings (the narrower ones) into `rows` [n, D] by frame index;
        returns each frame's id hash, against which the ESM-2 rows and protein.faa are checked."""
        n = len(rows)
        id_hash = np.zeros(n, np.int64)
        seen = np.zeros(n, bool)
        for ids, index, emb in self._parts(DNABERT_S_FAMILY):
            _claim(seen, index, n, DNABERT_S_FAMILY)
            rows[index] = emb
            id_hash[index] = _hashes(ids)
        if not seen.all():
            raise PredictError(f"DNABERT-S embeddings are missing for {int((~seen).sum())} frame(s)")
        return id_hash

    def _parts(self, family: str) -> Iterator[EmbeddingPart]:
        """(ids, index, embeddings [n, D]) of each part of a complete embedding run."""
        path = self.embed_dirs[family]
        manifest = Manifest.load(path)
        if manifest is None or not manifest.complete:
            raise PredictError(f"{path}: the {family} embeddings are not complete")
        dim = self.dims[family]
        for name in manifest.part_names():
            table = pq.read_table(path / name, columns=["id", "index", "embedding"])
            emb = table.column("embedding").combine_chunks().flatten().to_numpy(zero_copy_only=False)
            yield (table.column("id").to_pylist(), table.column("index").to_numpy(),
                   emb.reshape(-1, dim).astype(np.float32, copy=False))

    # --- stage 3: the per-frame and per-chunk files --------------------------------------------------

    def write_frame_outputs(self, probs: np.ndarray) -> tuple[ChunkMaxima, int]:
        """prediction_results.txt and predictions.parquet in frame order (ids from protein.faa, checked
        against the embeddings' when `classify` ran); returns the per-chunk maxima and the virus frames."""
        maxima = ChunkMaxima()
        virus = lo = 0
        with atomic_path(self.out / RESULTS_TXT) as txt, atomic_path(self.out / PREDICTIONS_PARQUET) as parquet, \
                open(txt, "w", encoding="utf-8", newline="\n") as f, \
                pq.ParquetWriter(parquet, PREDICTIONS_SCHEMA, compression="zstd") as writer:
            f.write(PREDICTION_HEADER)
            for ids in _blocks(fasta_ids(self.out / PROTEIN_FASTA), _ROWS_PER_WRITE):
                hi = lo + len(ids)
                self._check_frame_ids(ids, lo, len(probs))
                p = probs[lo:hi]
                f.write(prediction_lines(ids, p))
                writer.write_table(predictions_table(ids, p))
                maxima.update(ids, p)
                virus += int((p[:, 1] > p[:, 0]).sum())
                lo = hi
            if lo != len(probs):
                raise PredictError(f"{PROTEIN_FASTA} has {lo} records, but {len(probs)} frames were classified")
            if lo == 0:
                writer.write_table(predictions_table([], probs))
        return maxima, virus

    def _check_frame_ids(self, ids: list[str], lo: int, frames: int) -> None:
        """protein.faa's records lo, lo+1, ... must be the frames that were classified."""
        hi = lo + len(ids)
        if hi > frames:
            raise PredictError(f"{PROTEIN_FASTA} has more records than frames were classified")
        if self.id_hash is not None and (self.id_hash[lo:hi] != _hashes(ids)).any():
            raise PredictError(f"{PROTEIN_FASTA} does not list the embedded frames; rerun with --overwrite")

    def maxima_from_parquet(self) -> tuple[ChunkMaxima, int]:
        """The per-chunk maxima and the virus frames of a finished classification, from predictions.parquet."""
        maxima, virus = ChunkMaxima(), 0
        reader = pq.ParquetFile(self.out / PREDICTIONS_PARQUET)
        for batch in reader.iter_batches(batch_size=_ROWS_PER_WRITE, columns=["frame_id", "score1", "score2"]):
            p = np.stack([batch.column(1).to_numpy(), batch.column(2).to_numpy()], axis=1)
            maxima.update(batch.column(0).to_pylist(), p)
            virus += int((p[:, 1] > p[:, 0]).sum())
        return maxima, virus

    def write_highest_scores(self, maxima: ChunkMaxima) -> int:
        """prediction_results_highestscore.csv (upstream's per-chunk verdict); returns the virus chunks."""
        rows = maxima.rows()
        with atomic_path(self.out / HIGHEST_CSV) as tmp:
            write_highest_score_rows(tmp, rows)
        return sum(v for _, v in rows)

    # --- stage 4 -------------------------------------------------------------------------------------

    def write_contig_table(self, maxima: ChunkMaxima, threshold: float) -> dict[str, int]:
        """contig_predictions.tsv, one row per contig of chunks.fasta (see `contig_rows`); returns
        the number of contigs per label."""
        counts: dict[str, int] = {}
        with atomic_path(self.out / CONTIGS_TSV) as tmp, open(tmp, "w", encoding="utf-8", newline="\n") as f:
            f.write("\t".join(CONTIG_COLUMNS) + "\n")
            for row in contig_rows(fasta_ids(self.out / CHUNKS_FASTA), maxima, threshold):
                counts[row[-1]] = counts.get(row[-1], 0) + 1
                f.write("\t".join(map(str, row)) + "\n")
        return counts


def _claim(seen: np.ndarray, index: np.ndarray, n: int, family: str) -> None:
    """Mark the frames of one embedding part as seen: each in range, and none seen before."""
    if len(index) and (index.min() < 0 or index.max() >= n):
        raise PredictError(f"{family} embeddings hold frame index {int(index.max())}, but "
                           f"preprocessing kept {n} frames; rerun with --overwrite")
    if seen[index].any() or len(np.unique(index)) != len(index):
        raise PredictError(f"{family} embeddings hold a frame twice; rerun with --overwrite")
    seen[index] = True


def _hashes(ids: list[str]) -> np.ndarray:
    return np.fromiter(map(hash, ids), np.int64, len(ids))


def _blocks(items: Iterable[str], size: int) -> Iterator[list[str]]:
    block = []
    for item in items:
        block.append(item)
        if len(block) == size:
            yield block
            block = []
    if block:
        yield block


# -----------------------------------------------------------------------------
# the tables

def predictions_table(ids: list[str], probs: np.ndarray) -> pa.Table:
    """predictions.parquet's rows for a block of frames (PREDICTIONS_SCHEMA)."""
    chunks = [chunk_of(i) for i in ids]
    return pa.Table.from_arrays([
        pa.array(ids, pa.string()), pa.array(chunks, pa.string()),
        pa.array([contig_of(c) for c in chunks], pa.string()),
        pa.array(probs[:, 0], pa.float32()), pa.array(probs[:, 1], pa.float32()),
        pa.array([LABELS[int(v)] for v in probs[:, 1] > probs[:, 0]], pa.string()),
    ], schema=PREDICTIONS_SCHEMA)


def contig_rows(chunk_ids: Iterable[str], maxima: ChunkMaxima, threshold: float) -> Iterator[tuple]:
    """contig_predictions.tsv rows, one per contig, in input order, from chunks.fasta's ids.

    A chunk's virus score is the highest score2 (P(virus)) among its kept frames; a chunk without
    any stop-free frame has no score. Per contig:
      chunks             all chunks of the contig
      classified_chunks  chunks with a score
      viral_chunks       chunks whose score >= threshold
      viral_fraction     viral_chunks / classified_chunks
      mean_score         mean chunk score; max_score: the highest chunk score
      label              `virus` if mean_score >= threshold, else `others`; `unclassified` when no
                         chunk has a score (NA in the score columns)
    """
    def row(contig: str, scores: list[float], n: int) -> tuple:
        if not scores:
            return (contig, n, 0, 0, "NA", "NA", "NA", UNCLASSIFIED)
        viral = sum(s >= threshold for s in scores)
        mean = math.fsum(scores) / len(scores)
        return (contig, n, len(scores), viral, f"{viral / len(scores):.4f}", f"{mean:.6f}",
                f"{max(scores):.6f}", LABELS[int(mean >= threshold)])

    current, scores, n = None, [], 0
    for chunk in chunk_ids:
        contig = contig_of(chunk)
        if contig != current:
            if current is not None:
                yield row(current, scores, n)
            current, scores, n = contig, [], 0
        n += 1
        m = maxima.maxima(chunk)
        if m is not None:
            scores.append(float(m[1]))
    if current is not None:
        yield row(current, scores, n)
