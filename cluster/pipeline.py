"""`virnucpro predict`: upstream VirNucPro's prediction pipeline on the embedding service, and beyond it.

Stages, each resumable (`resume=True` skips what a previous run in OUT_DIR finished):

1. preprocess  INPUT -> chunks.fasta, nucleotide.fasta, protein.faa (virnucpro.pipeline.preprocess, upstream's
               rules); `_preprocess.json` records the parameters and counts once the files are whole.
2. embed       nucleotide.fasta with DNABERT-S -> embeddings/dnabert_s/, protein.faa with ESM-2 ->
               embeddings/esm2/ (cluster.driver.embed; its manifest makes each job resumable). Both
               jobs run at once in one Ray session. On GPUs every GPU hosts one actor of each model
               (a placement-group bundle per GPU; Ray shares: ESM-2 0.75, DNABERT-S 0.25), so neither
               model's stage waits for the other and no GPU idles while either has work. ESM-2 3B
               costs ~40x DNABERT-S per frame, so the DNABERT-S job finishes early and ESM-2 then
               has the GPUs to itself. A model given as a running service (`esm_service`,
               `dnabert_service`: `virnucpro serve start`) is embedded by the service's replicas: it
               gets no actors and no share of a bundle; the other model gets one actor per GPU,
               reserving --gpus-per-actor of it (default 1).
3. classify    join the two embeddings per frame and apply the MLP; write prediction_results.txt and
               prediction_results_highestscore.csv (upstream's formats) and predictions.parquet.
               `_predict.json` records what was classified; a resumed complete run is not recomputed.
4. contigs     contig_predictions.tsv: one verdict per input contig (rule in `contig_rows`).

This module holds what needs Ray or the embedding driver: the checks that load the models, calling
preprocessing, the two embedding jobs and their placement. Stages 3 and 4, the output directory's
layout and the markers need neither and are virnucpro.pipeline.classify's (which also says how the two
embeddings are joined per frame in bounded memory).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import ray

from virnucpro.pipeline.classifier import classifier_chunk_size, load_classifier
from virnucpro.models import (DNABERT_S_FAMILY, ESM2_FAMILY, FAMILIES, CheckpointError, ModelSource, check_model,
                              resolve_model)
from virnucpro.options import PIPELINE_EMBED_OPTIONS
from virnucpro.io.output import Manifest
from virnucpro.pipeline.plot import figures_after_predict
from virnucpro.pipeline.classify import (EMBED_DIRS, LETTER_COUNTS, STAGE_TIMES, Classification, PredictError, forget_markers,
                               prepare_out_dir, preprocess_params, remove_scratch, reusable_preprocessing,
                               save_preprocess_marker)
from virnucpro.pipeline.preprocess import NUCLEOTIDE_FASTA, PROTEIN_FASTA, chunk_bounds, default_workers, preprocess_fasta
from virnucpro.errors import SequenceError
from virnucpro.io.fasta import check_fasta

from .driver import EmbedOptions, EmbedResult, run_embed
from .session import Placement, RaySession, local_dashboard

log = logging.getLogger("virnucpro")

# Ray's GPU share of each model's actor on a GPU they share. Ray does not cap memory or compute by
# it: both actors use the whole chip; the shares only make Ray place exactly one of each per GPU.
GPU_SHARE = {ESM2_FAMILY: 0.75, DNABERT_S_FAMILY: 0.25}
DEFAULT_MODELS = {ESM2_FAMILY: "esm2_t36_3B_UR50D", DNABERT_S_FAMILY: "zhihan1996/DNABERT-S"}
MODEL_FLAGS = {ESM2_FAMILY: "--esm-model", DNABERT_S_FAMILY: "--dnabert-model"}
SERVICE_FLAGS = {ESM2_FAMILY: "--esm-service", DNABERT_S_FAMILY: "--dnabert-service"}


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
    # wall seconds of the stages this call ran (virnucpro.pipeline.classify.STAGE_TIMES); `embed` holds Ray's
    # start and the two embedding jobs (dnabert_s, esm2), which run at once
    stage_seconds: dict[str, float] = field(default_factory=dict)
    chunks_with_nonstandard_letters: int = 0  # letters outside A/C/G/T and the IUPAC codes, read as N

    def summary(self) -> str:
        labels = ", ".join(f"{n} {k}" for k, n in sorted(self.contig_labels.items()))
        stages = ", ".join(f"{k} {v}" for k, v in self.stages.items())
        times = ", ".join(f"{k} {v:.1f}" for k, v in self.stage_seconds.items())
        odd = (f"; {self.chunks_with_nonstandard_letters} chunks with letters outside ACGT/IUPAC (read as N)"
               if self.chunks_with_nonstandard_letters else "")
        return (f"{self.contigs} contigs -> {self.chunks} chunks -> {self.frames} frames classified "
                f"({self.virus_frames} virus); {self.virus_chunks} chunks virus by upstream's rule; "
                f"contigs: {labels or 'none'}{odd}; stages: {stages}; seconds: {times or 'none'}; "
                f"{self.seconds:.1f} s -> {self.out_dir}")


def predict(input: str | Path, out_dir: str | Path, classifier: str | Path,
            esm_model: str | Path | None = None, dnabert_model: str | Path | None = None,
            *, esm_service: str | None = None, dnabert_service: str | None = None,
            chunk_size: int = 500, chunking: str = "compat", threshold: float = 0.5,
            keep_embeddings: bool = False, workers: int | None = None, plot_contigs: Sequence[str] | None = None,
            plots: bool = True, **options) -> PredictResult:
    """Classify the contigs of a FASTA file as upstream VirNucPro does (the API of `virnucpro predict`).

    classifier: upstream's `300_model.pth` / `500_model.pth` (pickled module), a state dict of the
    same MLP, or `virnucpro train`'s .safetensors, trained for `chunk_size` (refused when the file
    says it was trained for another). threshold: the contig verdict's cut (see `contig_rows`).
    esm_model / dnabert_model: default esm2_t36_3B_UR50D / zhihan1996/DNABERT-S, or the service's.
    esm_service / dnabert_service: embed that model with a running service NAME (`virnucpro serve start`)
    instead of the run's own actors; its model is the service's (a contradicting model is refused).
    keep_embeddings: keep OUT_DIR/embeddings/ (Parquet, readable with virnucpro.io.output.read_embeddings).
    workers: preprocessing processes (default: by input size). plots: draw prediction.png (the contigs
    `plot_contigs`, default the first five) and contig_scores.png (virnucpro.pipeline.plot). Other options are `EmbedOptions`
    fields (device, dtype, num_actors, toks_per_batch, resume, overwrite, ...), applied to both
    models; on GPUs `num_actors` is the number of GPUs used (one actor of each model per GPU).
    """
    unknown = set(options) - set(PIPELINE_EMBED_OPTIONS)
    if unknown:
        raise TypeError(f"predict() got unexpected option(s): {', '.join(sorted(unknown))}")
    opts = EmbedOptions(**options)
    models = {ESM2_FAMILY: esm_model, DNABERT_S_FAMILY: dnabert_model}
    services = {f: n for f, n in ((ESM2_FAMILY, esm_service), (DNABERT_S_FAMILY, dnabert_service)) if n}
    with services_cluster(opts.address) if services else nullcontext():
        result = PipelineRun(str(input), Path(out_dir), Path(classifier), models, services, chunk_size, chunking,
                      threshold, keep_embeddings, workers, opts).run()
    if plots:
        figures_after_predict(result.out_dir, plot_contigs, threshold)
    return result


@contextmanager
def services_cluster(address: str | None) -> Iterator[None]:
    """Connected to the cluster that runs the services (`address`, RAY_ADDRESS or this machine's Ray)
    for the whole run: their models are checked before preprocessing, the jobs use them after it."""
    from .service import connect

    connected = not ray.is_initialized()
    connect(address)
    try:
        yield
    finally:
        if connected:
            ray.shutdown()


def _a(title: str) -> str:
    """"an ESM-2", "a DNABERT-S"."""
    return f"{'an' if title[0] in 'AEIOU' else 'a'} {title}"


def _same_model(spec: str, source: ModelSource) -> bool:
    """Whether the MODEL argument `spec` names the model a service loaded (by name, or the same file)."""
    if spec == source.name:
        return True
    try:
        return resolve_model(spec).path.resolve() == Path(source.path).resolve()
    except CheckpointError:
        return False


class PipelineRun:
    """One `predict` run over its stages (preprocess, embed both models, classify, contigs), each skipped when
    a resumed run finished it; `cluster.training` runs each labelled set through the first two."""

    def __init__(self, input: str, out: Path, classifier: Path, models: dict[str, str | Path | None],
                 services: dict[str, str], chunk_size: int, chunking: str, threshold: float, keep_embeddings: bool,
                 workers: int | None, opts: EmbedOptions):
        self.input, self.out, self.classifier_path = input, out, classifier
        self.chunk_size, self.chunking, self.threshold = chunk_size, chunking, threshold
        self.keep_embeddings, self.workers, self.opts = keep_embeddings, workers, opts
        self.start = time.perf_counter()
        self.stages: dict[str, str] = {}
        self.times: dict[str, float] = {}  # stage -> wall seconds, for the stages this run computed
        self.embed_results: dict[str, EmbedResult] = {}
        self.services = services  # model family -> the service that embeds it
        self._check_arguments(models)

    # --- checks made before anything is written or any model is loaded ---------------------------

    def _check_arguments(self, models: dict[str, str | Path | None]) -> None:
        try:
            check_fasta(self.input)  # a local path or a URI (s3://...): there, not empty, FASTA
        except SequenceError as e:
            raise PredictError(str(e)) from None
        chunk_bounds(1, self.chunk_size, self.chunking)  # ValueError names the bad argument
        if not 0.0 <= self.threshold <= 1.0:
            raise PredictError(f"--threshold must be within [0, 1], got {self.threshold}")
        if self.opts.resume and self.opts.overwrite:
            raise PredictError("--resume and --overwrite exclude each other")
        self.sources: dict[str, ModelSource] = {}
        self.dims: dict[str, int] = {}
        for family in (DNABERT_S_FAMILY, ESM2_FAMILY):
            model = None if models[family] is None else str(models[family])
            if family in self.services:
                self.sources[family], self.dims[family] = self._served_model(family, model)
                continue
            got = self.sources[family] = resolve_model(model or DEFAULT_MODELS[family])
            if got.family != family:
                raise PredictError(f"{MODEL_FLAGS[family]} {got.name} is {_a(got.model_family.title)} model; "
                                   f"{MODEL_FLAGS[family]} takes {_a(FAMILIES[family].title)} model")
            self.dims[family] = check_model(got)
        if self.opts.gpus_per_actor not in (None, 1.0) and not self.services:
            log.warning("predict places one actor of each model per GPU; --gpus-per-actor is ignored")
        self.classification = self._classification()

    def _classification(self) -> Classification | None:
        """Load the classifier and check that it fits the models' widths and --chunk-size (`train`'s
        runs, which have none yet, return None)."""
        trained_for = classifier_chunk_size(self.classifier_path)  # the file's record, or 300_model.pth's name
        if trained_for is not None and trained_for != self.chunk_size:
            raise PredictError(f"{self.classifier_path}: the classifier was trained on {trained_for} bp chunks, but "
                               f"--chunk-size is {self.chunk_size}; give --chunk-size {trained_for} or a classifier "
                               f"trained for {self.chunk_size}")
        self.model = load_classifier(self.classifier_path)
        want = self.model.hidden_layer.in_features
        dna, esm = self.dims[DNABERT_S_FAMILY], self.dims[ESM2_FAMILY]
        if want != dna + esm:
            raise PredictError(
                f"{self.classifier_path}: the classifier takes {want} input features, but DNABERT-S "
                f"({self.sources[DNABERT_S_FAMILY].name}) gives {dna} and ESM-2 "
                f"({self.sources[ESM2_FAMILY].name}) gives {esm}: {dna} + {esm} = {dna + esm}")
        return Classification(self.out, self.classifier_path, self.model,
                              {f: s.name for f, s in self.sources.items()}, self.dims,
                              {f: self._embed_dir(f) for f in EMBED_DIRS})

    def _served_model(self, family: str, model: str | None) -> tuple[ModelSource, int]:
        """The model and width of the service that embeds `family`: of that family, and the model the
        user named if any."""
        from .service import describe_service

        name, flag = self.services[family], SERVICE_FLAGS[family]
        info = describe_service(name)  # EmbedError (one line) when it is not running
        source = info["source"]
        if source.family != family:
            raise PredictError(f"{flag} {name}: the service embeds with {source.name}, {_a(source.model_family.title)} "
                               f"model; {flag} takes {_a(FAMILIES[family].title)} service")
        if model is not None and not _same_model(model, source):
            raise PredictError(f"{MODEL_FLAGS[family]} {model}, but {flag} {name} serves {source.name}: "
                               f"give the service alone (its model is used)")
        log.info("%s %s: %s on the service's replicas", flag, name, source.name)
        return source, info["dim"]

    # --- the pipeline --------------------------------------------------------------------------------

    def run(self) -> PredictResult:
        prepare_out_dir(self.out, self.opts.resume, self.opts.overwrite)
        pre = self._preprocess()
        frames = pre["frames"]
        cls = self.classification
        if self.opts.resume and self.stages["preprocess"] == "reused" and cls.reusable(frames):
            self.stages.update({"embed": "skipped", "classify": "reused"})
            maxima, virus_frames = cls.maxima_from_parquet()
        elif frames == 0:
            self.stages.update({"embed": "skipped (no frames)", "classify": "computed"})
            maxima, virus_frames = cls.write_frame_outputs(np.zeros((0, 2), np.float32))
            cls.save_marker(frames)
        else:
            with self._timed("embed"):
                self._embed(pre, reuse_complete=self.stages["preprocess"] == "reused")
            self.times.update({f: r.seconds for f, r in self.embed_results.items()})
            with self._timed("classify"):
                probs = cls.classify(frames)
            with self._timed("write"):
                maxima, virus_frames = cls.write_frame_outputs(probs)
                cls.save_marker(frames)
            self.stages["classify"] = "computed"
        with self._timed("write"):
            virus_chunks = cls.write_highest_scores(maxima)
            labels = cls.write_contig_table(maxima, self.threshold)
            remove_scratch(self.out, self.keep_embeddings)
        result = PredictResult(self.out, pre["contigs"], pre["chunks"], frames, virus_frames, virus_chunks,
                               labels, self.stages, self.embed_results, time.perf_counter() - self.start,
                               self._stage_seconds(), pre.get("chunks_with_nonstandard_letters", 0))
        cls.record_run({"seconds": {**result.stage_seconds, "total": round(result.seconds, 3)},
                        "stages": self.stages, **{k: pre.get(k, 0) for k in LETTER_COUNTS}})
        log.info("done: %s", result.summary())
        return result

    @contextmanager
    def _timed(self, stage: str) -> Iterator[None]:
        """Add the block's wall seconds to `stage`'s time."""
        t = time.perf_counter()
        try:
            yield
        finally:
            self.times[stage] = self.times.get(stage, 0.0) + time.perf_counter() - t

    def _stage_seconds(self) -> dict[str, float]:
        """This run's stage times in pipeline order (STAGE_TIMES), rounded to ms."""
        return {k: round(self.times[k], 3) for k in STAGE_TIMES if k in self.times}

    # stage 1 -----------------------------------------------------------------------------------------

    def _preprocess(self) -> dict:
        params = preprocess_params(self.input, self.chunk_size, self.chunking)
        marker = reusable_preprocessing(self.out, params) if self.opts.resume else None
        if marker is not None:
            self.stages["preprocess"] = "reused"
            log.info("preprocess: reusing %s (%d frames)", self.out, marker["frames"])
            return marker
        forget_markers(self.out)
        workers = self.workers or default_workers(self.input)
        t = time.perf_counter()
        try:
            with self._timed("preprocess"):
                res = preprocess_fasta(self.input, self.out, self.chunk_size, self.chunking, workers)
        except ValueError as e:
            raise PredictError(str(e)) from None
        log.info("preprocess: %s (%.1f s, %d worker(s))", res.summary(), time.perf_counter() - t, workers)
        if "U" in res.odd.letters:
            log.warning("%s: %d U base(s) (RNA): as upstream VirNucPro, codons holding U translate to nothing and "
                        "DNABERT-S reads U as unknown; write the contigs with T for a meaningful prediction",
                        self.input, res.odd.letters["U"])
        self.stages["preprocess"] = "computed"
        return save_preprocess_marker(self.out, params, res)

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
        session = RaySession(self.opts.address, self.opts.dashboard_host,  # already up, with a service
                             local_dashboard(self.opts.dashboard, self.input))
        pg = None
        try:
            session.wait()
            layout, pg = self._layout([f for f in todo if f not in self.services])
            inputs = {DNABERT_S_FAMILY: self.out / NUCLEOTIDE_FASTA, ESM2_FAMILY: self.out / PROTEIN_FASTA}
            jobs, errors = {}, []
            stop = threading.Event()  # Ctrl-C, or one job's failure, stops the other job too
            with ThreadPoolExecutor(max_workers=len(todo), thread_name_prefix="virnucpro-embed") as pool:
                for i, family in enumerate(todo):
                    opts = self.opts.replace(**layout.get(family, {}), service=self.services.get(family),
                                             progress=self.opts.progress if i == 0 else False)
                    model = None if family in self.services else self.sources[family].name  # (a service's own)
                    jobs[family] = pool.submit(run_embed, inputs[family], self._embed_dir(family), model, opts,
                                               stop=stop)
                try:
                    for family, fut in jobs.items():
                        try:
                            res = fut.result()
                        except Exception as e:  # noqa: BLE001 - the other job stops, keeping its parts
                            errors.append(e)
                            stop.set()
                            continue
                        except KeyboardInterrupt:
                            if not stop.is_set():  # the other job's, when this one was stopped
                                raise
                            continue
                        self.embed_results[family] = res
                        self.stages[family] = ("computed" if res.batches_computed == res.num_batches else
                                               f"resumed ({res.batches_computed} of {res.num_batches} batches "
                                               f"computed)")
                except KeyboardInterrupt:
                    stop.set()  # the jobs stop within a second or so; leaving this block waits for them
                    raise
            if errors:
                raise errors[0]
        finally:
            if pg is not None:
                ray.util.remove_placement_group(pg)
            session.close()

    def _layout(self, local: list[str]) -> tuple[dict[str, dict], object]:
        """EmbedOptions overrides for the models embedded by the run's own actors (`local`; a model
        served by a service needs none), and the placement group made for them (GPU only)."""
        if not local:
            return {}, None
        share = self.opts.gpus_per_actor if self.services else None  # alone: as `virnucpro embed` places it
        place = Placement.of(self.opts.replace(gpus_per_actor=share))  # else one actor of each model per GPU
        if place.device != "cuda":
            # both jobs' actors must fit at once: an actor holds its CPUs until its job ends, so two
            # jobs each waiting for CPUs the other holds would never start
            opts = {"num_cpus": min(1.0, place.cluster_cpus / (len(local) * place.num_actors))}
            return {f: {"device": place.device, "num_actors": place.num_actors, "gpus_per_actor": None,
                        "actor_options": lambda i, o=opts: o} for f in local}, None
        if len(local) == 1:  # one actor per GPU (a fraction of one, with --gpus-per-actor, shares it)
            return {local[0]: {"device": "cuda", "num_actors": self.opts.num_actors or max(1, int(place.cluster_gpus)),
                               "gpus_per_actor": place.gpus_per_actor}}, None
        if place.num_actors > place.cluster_gpus:
            raise PredictError(f"--num-actors {place.num_actors}: the Ray cluster has {place.cluster_gpus:g} GPU(s)")
        return gpu_layout(place.num_actors)


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


__all__ = ["predict", "PredictResult", "PredictError", "gpu_layout"]
