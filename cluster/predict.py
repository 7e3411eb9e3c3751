"""`virnucpro predict`: upstream VirNucPro's prediction pipeline on the embedding service, and beyond it.

Stages, each resumable (`resume=True` skips what a previous run in OUT_DIR finished):

1. preprocess  INPUT -> chunks.fasta, nucleotide.fasta, protein.faa (virnucpro.preprocess, upstream's
               rules); `_preprocess.json` records the parameters and counts once the files are whole.
2. embed       nucleotide.fasta with DNABERT-S -> embeddings/dnabert_s/, protein.faa with ESM-2 ->
               embeddings/esm2/ (cluster.driver.embed; its manifest makes each job resumable). Both
               jobs run at once in one Ray session. On GPUs every GPU hosts one actor of each model
               (a placement-group bundle per GPU; Ray shares: ESM-2 0.75, DNABERT-S 0.25), so neither
               model's stage waits for the other and no GPU idles while either has work. ESM-2 3B
               costs ~40x DNABERT-S per frame, so the DNABERT-S job finishes early and ESM-2 then
               has the GPUs to itself.
3. classify    join the two embeddings per frame and apply the MLP; write prediction_results.txt and
               prediction_results_highestscore.csv (upstream's formats) and predictions.parquet.
               `_predict.json` records what was classified; a resumed complete run is not recomputed.
4. contigs     contig_predictions.tsv: one verdict per input contig (rule in `contig_rows`).

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
import re
import shutil
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from virnucpro.classifier import (LABELS, ChunkMaxima, PREDICTION_HEADER, load_classifier,
                                  predict_proba, prediction_lines, write_highest_score_rows)
from virnucpro.fasta import fasta_ids
from virnucpro.ids import chunk_of, contig_of
from virnucpro.models import DNABERT_S_FAMILY, ESM2_FAMILY, check_model, resolve_model
from virnucpro.output import Manifest, atomic_path, atomic_write
from virnucpro.preprocess import (CHUNKS_FASTA, NUCLEOTIDE_FASTA, PROTEIN_FASTA, chunk_bounds,
                                  default_workers, preprocess_fasta)

from .driver import EmbedOptions, EmbedResult, embed
from .session import init_ray

log = logging.getLogger("virnucpro")

PREPROCESS_MARKER = "_preprocess.json"
PREDICT_MARKER = "_predict.json"
RESULTS_TXT = "prediction_results.txt"
HIGHEST_CSV = "prediction_results_highestscore.csv"
PREDICTIONS_PARQUET = "predictions.parquet"
CONTIGS_TSV = "contig_predictions.tsv"
EMBED_DIRS = {DNABERT_S_FAMILY: Path("embeddings") / "dnabert_s", ESM2_FAMILY: Path("embeddings") / "esm2"}
WORK_DIR = ".work"
# Ray's GPU share of each model's actor on a GPU they share. Ray does not cap memory or compute by
# it: both actors use the whole chip; the shares only make Ray place exactly one of each per GPU.
GPU_SHARE = {ESM2_FAMILY: 0.75, DNABERT_S_FAMILY: 0.25}
CONTIG_COLUMNS = ("contig_id", "chunks", "classified_chunks", "viral_chunks", "viral_fraction",
                  "mean_score", "max_score", "label")
UNCLASSIFIED = "unclassified"
_ROWS_PER_WRITE = 65536  # frames per block of the output pass (one Parquet row group)


class PredictError(RuntimeError):
    """A predict run that cannot go on; the message says why and what to do."""


@dataclass
class PredictResult:
    out_dir: Path
    contigs: int
    chunks: int
    frames: int
    virus_frames: int  # Prediction == virus in prediction_results.txt
    virus_chunks: int  # Is_Virus == True in prediction_results_highestscore.csv
    contig_labels: dict[str, int]  # contig_predictions.tsv: label -> contigs
    stages: dict[str, str]  # stage -> computed / resumed / reused / skipped
    embeddings: dict[str, EmbedResult] = field(default_factory=dict)  # the embed jobs this call ran
    seconds: float = 0.0

    def summary(self) -> str:
        labels = ", ".join(f"{n} {k}" for k, n in sorted(self.contig_labels.items()))
        stages = ", ".join(f"{k} {v}" for k, v in self.stages.items())
        return (f"{self.contigs} contigs -> {self.chunks} chunks -> {self.frames} frames classified "
                f"({self.virus_frames} virus); {self.virus_chunks} chunks virus by upstream's rule; "
                f"contigs: {labels or 'none'}; stages: {stages}; {self.seconds:.1f} s -> {self.out_dir}")


def predict(input: str | Path, out_dir: str | Path, classifier: str | Path,
            esm_model: str | Path = "esm2_t36_3B_UR50D", dnabert_model: str | Path = "zhihan1996/DNABERT-S",
            *, chunk_size: int = 500, chunking: str = "compat", threshold: float = 0.5,
            keep_embeddings: bool = False, workers: int | None = None, **options) -> PredictResult:
    """Classify the contigs of a FASTA file as upstream VirNucPro does (the API of `virnucpro predict`).

    classifier: upstream's `300_model.pth` / `500_model.pth` (pickled module) or a state dict of the
    same MLP, trained for `chunk_size`. threshold: the contig verdict's cut (see `contig_rows`).
    keep_embeddings: keep OUT_DIR/embeddings/ (Parquet, readable with virnucpro.output.read_embeddings).
    workers: preprocessing processes (default: by input size). Other options are `EmbedOptions`
    fields (device, dtype, num_actors, toks_per_batch, resume, overwrite, ...), applied to both
    models; on GPUs `num_actors` is the number of GPUs used (one actor of each model per GPU).
    """
    unknown = set(options) - {f.name for f in fields(EmbedOptions)}
    if unknown:
        raise TypeError(f"predict() got unexpected option(s): {', '.join(sorted(unknown))}")
    return _Run(Path(input), Path(out_dir), Path(classifier), str(esm_model), str(dnabert_model),
                chunk_size, chunking, threshold, keep_embeddings, workers, EmbedOptions(**options)).run()


class _Run:
    def __init__(self, input: Path, out: Path, classifier: Path, esm_model: str, dnabert_model: str,
                 chunk_size: int, chunking: str, threshold: float, keep_embeddings: bool,
                 workers: int | None, opts: EmbedOptions):
        self.input, self.out, self.classifier_path = input, out, classifier
        self.chunk_size, self.chunking, self.threshold = chunk_size, chunking, threshold
        self.keep_embeddings, self.workers, self.opts = keep_embeddings, workers, opts
        self.start = time.perf_counter()
        self.stages: dict[str, str] = {}
        self.embed_results: dict[str, EmbedResult] = {}
        self._check_arguments(esm_model, dnabert_model)

    # --- checks made before anything is written or any model is loaded ---------------------------

    def _check_arguments(self, esm_model: str, dnabert_model: str) -> None:
        if not self.input.is_file():
            raise PredictError(f"{self.input}: no such file")
        chunk_bounds(1, self.chunk_size, self.chunking)  # ValueError names the bad argument
        if not 0.0 <= self.threshold <= 1.0:
            raise PredictError(f"--threshold must be within [0, 1], got {self.threshold}")
        if self.opts.resume and self.opts.overwrite:
            raise PredictError("--resume and --overwrite exclude each other")
        self.sources = {DNABERT_S_FAMILY: resolve_model(dnabert_model), ESM2_FAMILY: resolve_model(esm_model)}
        for family, flag in ((DNABERT_S_FAMILY, "--dnabert-model"), (ESM2_FAMILY, "--esm-model")):
            got = self.sources[family]
            if got.family != family:
                raise PredictError(f"{flag} {got.name}: a {got.family} model, expected {family}")
        self.dims = {f: check_model(s) for f, s in self.sources.items()}
        self.model = load_classifier(self.classifier_path)
        want = self.model.hidden_layer.in_features
        dna, esm = self.dims[DNABERT_S_FAMILY], self.dims[ESM2_FAMILY]
        if want != dna + esm:
            raise PredictError(
                f"{self.classifier_path}: the classifier takes {want} input features, but DNABERT-S "
                f"({self.sources[DNABERT_S_FAMILY].name}) gives {dna} and ESM-2 "
                f"({self.sources[ESM2_FAMILY].name}) gives {esm}: {dna} + {esm} = {dna + esm}")
        m = re.match(r"(300|500)_model", self.classifier_path.name)
        if m and int(m.group(1)) != self.chunk_size:
            log.warning("%s was trained on %s bp chunks, but --chunk-size is %d", self.classifier_path.name,
                        m.group(1), self.chunk_size)
        if self.opts.gpus_per_actor not in (None, 1.0):
            log.warning("predict places one actor of each model per GPU; --gpus-per-actor is ignored")

    # --- the pipeline --------------------------------------------------------------------------------

    def run(self) -> PredictResult:
        self._prepare_out_dir()
        pre = self._preprocess()
        frames = pre["frames"]
        if self._classification_reusable(pre):
            self.stages.update({"embed": "skipped", "classify": "reused"})
            maxima, virus_frames = self._maxima_from_parquet()
        elif frames == 0:
            self.stages.update({"embed": "skipped (no frames)", "classify": "computed"})
            maxima, virus_frames = self._write_frame_outputs(np.zeros((0, 2), np.float32))
            self._save_predict_marker(pre)
        else:
            self._embed(pre, reuse_complete=self.stages["preprocess"] == "reused")
            probs = self._classify(frames)
            maxima, virus_frames = self._write_frame_outputs(probs)
            self._save_predict_marker(pre)
            self.stages["classify"] = "computed"
        rows = maxima.rows()
        with atomic_path(self.out / HIGHEST_CSV) as tmp:
            write_highest_score_rows(tmp, rows)
        labels = self._write_contig_table(maxima)
        if not self.keep_embeddings:
            self._remove_embeddings()
        shutil.rmtree(self.out / WORK_DIR, ignore_errors=True)
        result = PredictResult(self.out, pre["contigs"], pre["chunks"], frames, virus_frames,
                               sum(v for _, v in rows), labels, self.stages, self.embed_results,
                               time.perf_counter() - self.start)
        log.info("done: %s", result.summary())
        return result

    def _our_paths(self) -> list[Path]:
        names = [CHUNKS_FASTA, NUCLEOTIDE_FASTA, PROTEIN_FASTA, PREPROCESS_MARKER, PREDICT_MARKER,
                 RESULTS_TXT, HIGHEST_CSV, PREDICTIONS_PARQUET, CONTIGS_TSV, WORK_DIR]
        return [self.out / n for n in names] + [self.out / d for d in EMBED_DIRS.values()]

    def _prepare_out_dir(self) -> None:
        try:
            self.out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise PredictError(f"{self.out}: cannot create the output directory ({e.strerror or e})") from None
        previous = [p for p in self._our_paths() if p.exists()]
        if previous and self.opts.overwrite:
            for p in previous:
                shutil.rmtree(p) if p.is_dir() else p.unlink()
        elif previous and not self.opts.resume:
            raise PredictError(f"{self.out}: holds the output of a previous run ({previous[0].name}); use "
                               f"--resume to finish it or --overwrite to replace it")

    # stage 1 -----------------------------------------------------------------------------------------

    def _preprocess(self) -> dict:
        st = self.input.stat()
        params = {"input": str(self.input.resolve()), "input_bytes": st.st_size,
                  "input_mtime_ns": st.st_mtime_ns, "chunk_size": self.chunk_size, "chunking": self.chunking}
        marker_path = self.out / PREPROCESS_MARKER
        if self.opts.resume and marker_path.is_file():
            marker = json.loads(marker_path.read_text())
            if marker.get("params") != params:
                raise PredictError(f"{self.out}: holds a run on other input or options "
                                   f"({marker.get('params')}); use --overwrite to replace it")
            sizes = marker.get("files", {})
            if all((self.out / n).is_file() and (self.out / n).stat().st_size == s for n, s in sizes.items()):
                self.stages["preprocess"] = "reused"
                log.info("preprocess: reusing %s (%d frames)", self.out, marker["frames"])
                return marker
            log.warning("%s: preprocessed files changed since they were written; preprocessing again", self.out)
        # a new preprocessing invalidates any classification made from the previous one
        (self.out / PREDICT_MARKER).unlink(missing_ok=True)
        marker_path.unlink(missing_ok=True)
        workers = self.workers or default_workers(self.input)
        t = time.perf_counter()
        try:
            res = preprocess_fasta(self.input, self.out, self.chunk_size, self.chunking, workers)
        except ValueError as e:
            raise PredictError(str(e)) from None
        log.info("preprocess: %s (%.1f s, %d worker(s))", res.summary(), time.perf_counter() - t, workers)
        marker = {"params": params, "contigs": res.contigs, "chunks": res.chunks, "frames": res.frames,
                  "chunks_with_frames": res.chunks_with_frames,
                  "files": {n: (self.out / n).stat().st_size for n in (CHUNKS_FASTA, NUCLEOTIDE_FASTA, PROTEIN_FASTA)}}
        data = json.dumps(marker, indent=1).encode()
        atomic_write(marker_path, lambda f: f.write(data))
        self.stages["preprocess"] = "computed"
        return marker

    # stage 2 -----------------------------------------------------------------------------------------

    def _embed_dir(self, family: str) -> Path:
        return self.out / EMBED_DIRS[family]

    def _embeddings_complete(self, family: str, frames: int) -> bool:
        manifest = Manifest.load(self._embed_dir(family))
        return (manifest is not None and manifest.complete and manifest.model == self.sources[family].name
                and manifest.num_sequences == frames and manifest.dim == self.dims[family])

    def _embed(self, pre: dict, reuse_complete: bool) -> None:
        frames = pre["frames"]
        todo = []
        for family in (ESM2_FAMILY, DNABERT_S_FAMILY):  # the long job first
            if reuse_complete and self.opts.resume and self._embeddings_complete(family, frames):
                self.stages[family] = "reused"
                log.info("embed %s: reusing the complete run in %s", family, self._embed_dir(family))
            else:
                todo.append(family)
        if not todo:
            return
        started_ray = init_ray(self.opts.address, self.opts.dashboard_host)
        pg = None
        try:
            layout, pg = self._layout(len(todo))
            inputs = {DNABERT_S_FAMILY: self.out / NUCLEOTIDE_FASTA, ESM2_FAMILY: self.out / PROTEIN_FASTA}
            jobs = {}
            with ThreadPoolExecutor(max_workers=len(todo), thread_name_prefix="virnucpro-embed") as pool:
                for i, family in enumerate(todo):
                    kw = {k.name: getattr(self.opts, k.name) for k in fields(EmbedOptions)}
                    kw.update(layout[family])
                    kw["progress"] = self.opts.progress if i == 0 else False  # one progress line
                    kw["resume"] = self.opts.resume
                    jobs[family] = pool.submit(embed, inputs[family], self._embed_dir(family),
                                               self.sources[family].name, **kw)
                errors = []
                for family, fut in jobs.items():
                    try:
                        res = fut.result()
                    except Exception as e:  # noqa: BLE001 - wait for the other job, then report
                        errors.append(e)
                        continue
                    self.embed_results[family] = res
                    self.stages[family] = ("computed" if res.batches_computed == res.num_batches else
                                           f"resumed ({res.batches_computed} of {res.num_batches} batches computed)")
            if errors:
                raise errors[0]
        finally:
            if pg is not None:
                ray.util.remove_placement_group(pg)
            if started_ray:
                ray.shutdown()

    def _layout(self, num_jobs: int) -> tuple[dict[str, dict], object]:
        """Per-model EmbedOptions overrides, and the placement group made for them (GPU only)."""
        resources = ray.cluster_resources()
        gpus, cpus = int(resources.get("GPU", 0)), float(resources.get("CPU", 1))
        device = self.opts.device if self.opts.device != "auto" else ("cuda" if gpus else "cpu")
        if device == "cuda" and gpus == 0:
            raise PredictError("--device cuda, but the Ray cluster has no GPU resources")
        n = self.opts.num_actors or (gpus if device == "cuda" else 1)
        if device != "cuda":
            # both jobs' actors must fit at once: an actor holds its CPUs until its job ends, so two
            # jobs each waiting for CPUs the other holds would never start
            opts = {"num_cpus": min(1.0, cpus / (num_jobs * n))}
            return {f: {"device": device, "num_actors": n, "gpus_per_actor": None,
                        "actor_options": lambda i, o=opts: o} for f in GPU_SHARE}, None
        if n > gpus:
            raise PredictError(f"--num-actors {n}: the Ray cluster has {gpus} GPU(s)")
        return gpu_layout(n)

    # stage 3 -----------------------------------------------------------------------------------------

    def _parts(self, family: str) -> Iterator[tuple[list[str], np.ndarray, np.ndarray]]:
        """(ids, index, embeddings [n, D]) of each part of a complete embedding run."""
        path = self._embed_dir(family)
        manifest = Manifest.load(path)
        if manifest is None or not manifest.complete:
            raise PredictError(f"{path}: the {family} embeddings are not complete")
        dim = self.dims[family]
        for name in sorted(manifest.parts):
            table = pq.read_table(path / name, columns=["id", "index", "embedding"])
            emb = table.column("embedding").combine_chunks().flatten().to_numpy(zero_copy_only=False)
            yield (table.column("id").to_pylist(), table.column("index").to_numpy(),
                   emb.reshape(-1, dim).astype(np.float32, copy=False))

    def _classify(self, n: int) -> np.ndarray:
        """Join both embeddings by frame and classify; probs [n, 2] in frame (index) order."""
        t = time.perf_counter()
        d = self.dims[DNABERT_S_FAMILY]
        work = self.out / WORK_DIR
        work.mkdir(exist_ok=True)
        dna = np.lib.format.open_memmap(work / "dnabert_s.npy", mode="w+", dtype=np.float32, shape=(n, d))
        self.id_hash = np.zeros(n, np.int64)
        seen = np.zeros(n, bool)
        for ids, index, emb in self._parts(DNABERT_S_FAMILY):
            self._claim(seen, index, n, DNABERT_S_FAMILY)
            dna[index] = emb
            self.id_hash[index] = [hash(s) for s in ids]
        if not seen.all():
            raise PredictError(f"DNABERT-S embeddings are missing for {int((~seen).sum())} frame(s)")
        probs = np.zeros((n, 2), np.float32)
        seen[:] = False
        for ids, index, emb in self._parts(ESM2_FAMILY):
            self._claim(seen, index, n, ESM2_FAMILY)
            bad = np.flatnonzero(self.id_hash[index] != np.fromiter(map(hash, ids), np.int64, len(ids)))
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

    @staticmethod
    def _claim(seen: np.ndarray, index: np.ndarray, n: int, family: str) -> None:
        if len(index) and (index.min() < 0 or index.max() >= n):
            raise PredictError(f"{family} embeddings hold frame index {int(index.max())}, but "
                               f"preprocessing kept {n} frames; rerun with --overwrite")
        if seen[index].any() or len(np.unique(index)) != len(index):
            raise PredictError(f"{family} embeddings hold a frame twice; rerun with --overwrite")
        seen[index] = True

    def _write_frame_outputs(self, probs: np.ndarray) -> tuple[ChunkMaxima, int]:
        """prediction_results.txt and predictions.parquet in frame order; the per-chunk maxima."""
        maxima = ChunkMaxima()
        virus = 0
        check = getattr(self, "id_hash", None)
        with atomic_path(self.out / RESULTS_TXT) as txt, atomic_path(self.out / PREDICTIONS_PARQUET) as parquet, \
                open(txt, "w", encoding="utf-8", newline="\n") as f, \
                pq.ParquetWriter(parquet, PREDICTIONS_SCHEMA, compression="zstd") as writer:
            f.write(PREDICTION_HEADER)
            lo = 0
            for ids in _blocks(fasta_ids(self.out / PROTEIN_FASTA), _ROWS_PER_WRITE):
                hi = lo + len(ids)
                if hi > len(probs):
                    raise PredictError(f"{PROTEIN_FASTA} has more records than frames were classified")
                if check is not None and (check[lo:hi] != np.fromiter(map(hash, ids), np.int64, len(ids))).any():
                    raise PredictError(f"{PROTEIN_FASTA} does not list the embedded frames; rerun with --overwrite")
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

    def _classifier_identity(self) -> dict:
        st = self.classifier_path.stat()
        return {"classifier": str(self.classifier_path.resolve()), "classifier_bytes": st.st_size,
                "classifier_mtime_ns": st.st_mtime_ns,
                "models": {f: s.name for f, s in self.sources.items()}, "dims": self.dims}

    def _save_predict_marker(self, pre: dict) -> None:
        marker = {**self._classifier_identity(), "frames": pre["frames"], "complete": True}
        data = json.dumps(marker, indent=1).encode()
        atomic_write(self.out / PREDICT_MARKER, lambda f: f.write(data))

    def _classification_reusable(self, pre: dict) -> bool:
        path = self.out / PREDICT_MARKER
        if not (self.opts.resume and self.stages.get("preprocess") == "reused" and path.is_file()):
            return False
        marker = json.loads(path.read_text())
        same = {k: marker.get(k) for k in self._classifier_identity()} == self._classifier_identity()
        files = all((self.out / n).is_file() for n in (RESULTS_TXT, PREDICTIONS_PARQUET))
        ok = same and files and marker.get("complete") and marker.get("frames") == pre["frames"]
        if ok:
            log.info("classification: reusing %s and %s", RESULTS_TXT, PREDICTIONS_PARQUET)
        return bool(ok)

    def _maxima_from_parquet(self) -> tuple[ChunkMaxima, int]:
        maxima, virus = ChunkMaxima(), 0
        reader = pq.ParquetFile(self.out / PREDICTIONS_PARQUET)
        for batch in reader.iter_batches(batch_size=_ROWS_PER_WRITE, columns=["frame_id", "score1", "score2"]):
            p = np.stack([batch.column(1).to_numpy(), batch.column(2).to_numpy()], axis=1)
            maxima.update(batch.column(0).to_pylist(), p)
            virus += int((p[:, 1] > p[:, 0]).sum())
        return maxima, virus

    # stage 4 -----------------------------------------------------------------------------------------

    def _write_contig_table(self, maxima: ChunkMaxima) -> dict[str, int]:
        counts: dict[str, int] = {}

        with atomic_path(self.out / CONTIGS_TSV) as tmp, open(tmp, "w", encoding="utf-8", newline="\n") as f:
            f.write("\t".join(CONTIG_COLUMNS) + "\n")
            for row in contig_rows(fasta_ids(self.out / CHUNKS_FASTA), maxima, self.threshold):
                counts[row[-1]] = counts.get(row[-1], 0) + 1
                f.write("\t".join(map(str, row)) + "\n")
        return counts

    def _remove_embeddings(self) -> None:
        for d in EMBED_DIRS.values():
            shutil.rmtree(self.out / d, ignore_errors=True)
        try:
            (self.out / "embeddings").rmdir()  # only if nothing else is in it
        except OSError:
            pass


def gpu_layout(num_gpus: int, wait_seconds: float = 600) -> tuple[dict[str, dict], object]:
    """EmbedOptions overrides that put one ESM-2 and one DNABERT-S actor on each of `num_gpus` GPUs.

    A placement group reserves one bundle per GPU ({GPU: 1, CPU: 1}); actor i of each model goes to
    bundle i with its GPU_SHARE (0.75 + 0.25) and half a CPU. Without the group, Ray's fractional
    placement depends on which job's actors come first (two ESM-2 actors could share a GPU while
    another GPU holds only DNABERT-S). Returns (overrides per model family, placement group); the
    caller removes the group when both jobs are done.
    """
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    pg = placement_group([{"GPU": 1, "CPU": 1}] * num_gpus, strategy="PACK")
    waited = 0.0
    while not ray.wait([pg.ready()], timeout=min(30.0, wait_seconds))[0]:
        waited += min(30.0, wait_seconds)
        if waited >= wait_seconds:
            remove_placement_group(pg)
            raise PredictError(f"could not reserve {num_gpus} GPU(s), each with a free CPU, in {waited:.0f} s")
        log.warning("waited %.0f s for %d GPU(s) with a free CPU each", waited, num_gpus)
    log.info("%d GPU(s): one ESM-2 and one DNABERT-S actor on each", num_gpus)

    def place(i: int) -> dict:
        return {"num_cpus": 0.5, "scheduling_strategy": PlacementGroupSchedulingStrategy(pg, i)}

    return {f: {"device": "cuda", "num_actors": num_gpus, "gpus_per_actor": share, "actor_options": place}
            for f, share in GPU_SHARE.items()}, pg


# -----------------------------------------------------------------------------
# output helpers

PREDICTIONS_SCHEMA = pa.schema([
    pa.field("frame_id", pa.string(), nullable=False),  # `id` in the embeddings; upstream's Sequence_ID
    pa.field("chunk_id", pa.string(), nullable=False),
    pa.field("contig_id", pa.string(), nullable=False),
    pa.field("score1", pa.float32(), nullable=False),  # P(others)
    pa.field("score2", pa.float32(), nullable=False),  # P(virus)
    pa.field("label", pa.string(), nullable=False),  # virus if score2 > score1 (upstream's Prediction)
])


def predictions_table(ids: list[str], probs: np.ndarray) -> pa.Table:
    chunks = [chunk_of(i) for i in ids]
    return pa.Table.from_arrays([
        pa.array(ids, pa.string()), pa.array(chunks, pa.string()),
        pa.array([contig_of(c) for c in chunks], pa.string()),
        pa.array(probs[:, 0], pa.float32()), pa.array(probs[:, 1], pa.float32()),
        pa.array([LABELS[int(v)] for v in probs[:, 1] > probs[:, 0]], pa.string()),
    ], schema=PREDICTIONS_SCHEMA)


def contig_rows(chunk_ids, maxima: ChunkMaxima, threshold: float) -> Iterator[tuple]:
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


def _blocks(items: Iterator[str], size: int) -> Iterator[list[str]]:
    block = []
    for item in items:
        block.append(item)
        if len(block) == size:
            yield block
            block = []
    if block:
        yield block


__all__ = ["predict", "PredictResult", "PredictError", "contig_rows", "gpu_layout"]
