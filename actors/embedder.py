"""The GPU (or CPU) actor: loads one model once, turns batch descriptions into Parquet part files.

Following Ray's batch-inference pattern, the constructor loads and `embed` computes. The driver deals
each batch as a description (`BatchSpec`: where its records are in the input); the actor reads and
tokenises it, computes and writes the part. The driver runs the class as a Ray actor with
`max_concurrency = cuda_streams + loaders (+ writers)`: a call reads and tokenises its batch in its own
thread, then takes a pair of CUDA streams (copy, compute) from a pool, so the next batches' reading and
tokenising, one batch's host-to-device copy, another's forward pass and a third's Parquet write
overlap. Embeddings go straight from the actor to the output directory (a local path or any
pyarrow/fsspec URI); only a few numbers travel back to the driver. Each actor reports Ray metrics (`_Metrics`): sequences, tokens and batches embedded, seconds
per batch, its tokens/s, GPU memory, failures.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from virnucpro.kernels.attention import Packing
from virnucpro.batching import BatchError, BatchSpec, PartResult, TokenBatch, load_batch
from virnucpro.io.index import RecordReader
from virnucpro.models import ModelSource, default_toks_per_batch, load_model, load_tokenizer
from virnucpro.models.columns import compute_columns, residue_counts
from virnucpro.options import EmbedOptions
from virnucpro.io.output import Column, OutputLocation, plan_columns, write_part
from virnucpro.errors import EmbedError

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
COMPILE_WAIT_SECONDS = 300  # at most, a batch caught by the compiler's tracing waits for the compile to end


def resolve_device(device: str) -> torch.device:
    """The worker's device; for CUDA the GPU Ray assigned (it sets CUDA_VISIBLE_DEVICES), with its index."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise EmbedError(f"--device cuda but this worker ({socket.gethostname()}) sees no CUDA GPU")
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """auto: bf16 on Ampere or newer, fp16 on older GPUs, fp32 on CPU."""
    if dtype != "auto":
        return DTYPES[dtype]
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def batch_shape(seq_tokens: np.ndarray) -> tuple[int, int, int]:
    """(sequences, tokens, longest sequence) of a batch given its sequences' token counts: what its
    memory grows with (packed activations with tokens; a padded attention grid with sequences x longest)."""
    return len(seq_tokens), int(np.sum(seq_tokens)), int(np.max(seq_tokens, initial=0))


def recommend_toks_per_batch(batch_tokens: int, peak_bytes: int, weight_bytes: int, total_bytes: int) -> int:
    """A token budget that should fit, from what this batch used: activations scale with tokens."""
    per_token = max(peak_bytes - weight_bytes, 1) / max(batch_tokens, 1)
    usable = 0.8 * (total_bytes - weight_bytes)
    return max(256, int(usable / per_token) // 256 * 256)


class _Metrics:
    """The actor's Ray metrics (`ray.util.metrics`), exported by each node's metrics agent to Prometheus
    (names get Ray's `ray_` prefix, counters a `_total` suffix) and so to the dashboard's Grafana."""

    def __init__(self, model: str, device: str):
        from ray.util.metrics import Counter, Gauge, Histogram

        keys = ("model", "device")
        self.tags = {"model": model, "device": device}
        self.sequences = Counter("virnucpro_sequences_embedded", "sequences embedded", keys)
        self.tokens = Counter("virnucpro_tokens_embedded", "tokens embedded (specials included)", keys)
        self.batches = Counter("virnucpro_batches_embedded", "batches embedded and written", keys)
        self.failures = Counter("virnucpro_batch_failures", "batches that raised in an actor",
                                keys + ("reason",))
        self.seconds = Histogram("virnucpro_batch_seconds", "seconds per batch: forward and Parquet write",
                                 [0.01, 0.03, 0.1, 0.3, 1, 3, 10, 30, 100], keys)
        self.rate = Gauge("virnucpro_actor_tokens_per_second", "tokens/s of the actor's last batch", keys)
        self.gpu_memory = Gauge("virnucpro_gpu_memory_bytes", "GPU memory of this actor's process",
                                keys + ("kind",))

    def batch_done(self, rows: int, tokens: int, seconds: float, device: torch.device) -> None:
        self.sequences.inc(rows, self.tags)
        self.tokens.inc(tokens, self.tags)
        self.batches.inc(1, self.tags)
        self.seconds.observe(seconds, self.tags)
        self.rate.set(tokens / max(seconds, 1e-9), self.tags)
        if device.type == "cuda":
            self.gpu_memory.set(torch.cuda.memory_allocated(device), {**self.tags, "kind": "allocated"})
            self.gpu_memory.set(torch.cuda.memory_reserved(device), {**self.tags, "kind": "reserved"})
            self.gpu_memory.set(torch.cuda.max_memory_allocated(device), {**self.tags, "kind": "peak"})

    def failed(self, reason: str) -> None:
        self.failures.inc(1, {**self.tags, "reason": reason})


def _ray_context() -> tuple[str, list]:
    """(node id, GPU ids Ray assigned) when running under Ray, else ("", [])."""
    try:
        import ray

        if ray.is_initialized():
            return ray.get_runtime_context().get_node_id(), [str(g) for g in ray.get_gpu_ids()]
    except Exception:  # noqa: BLE001 - outside Ray, or an older Ray
        pass
    return "", []


@dataclass(frozen=True)
class ActorConfig:
    """Everything an `Embedder` is built from: one picklable object the driver hands to each actor."""

    source: ModelSource
    out_dir: str | None  # a local path or a URI (see OutputLocation), or None: given with each batch
    device: str = "auto"  # "cuda", "cpu" or "auto"
    options: EmbedOptions = field(default_factory=EmbedOptions)  # dtype, streams, attention, compile, ...
    profile_batches: int = 3  # batches traced with --profile
    cpu_threads: int = 0  # on a CPU: torch's intra-op threads, this actor's share of the node (0: torch's default)


class Embedder:
    """Loads a model on this worker's device; `embed` computes pooled embeddings and writes a part.

    >>> actor = Embedder(ActorConfig(resolve_model("esm2_t33_650M_UR50D"), "out/", "cuda"))
    >>> actor.embed(batch)  # a TokenBatch from virnucpro.batching.make_batch
    PartResult(batch_id=0, file='part-000000.parquet', rows=..., ...)
    """

    def __init__(self, config: ActorConfig):
        # wall-clock times of the start-up phases (the driver lines them up with its own: bench_startup)
        self.timeline = {"actor_placed": time.time()}
        opts = config.options
        logging.basicConfig(level=logging.DEBUG if opts.verbose else logging.INFO,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.source = source = config.source
        self.locations: dict[str, OutputLocation] = {}
        self.out_dir = self._location(config.out_dir) if config.out_dir else None
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(opts.dtype, self.device)
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        self.node_id, self.gpu_ids = _ray_context()
        self.metrics = _Metrics(source.name, self.device.type) if self.node_id else None
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
            torch.backends.cuda.matmul.allow_tf32 = True
        elif config.cpu_threads:
            # set here, not as OMP_NUM_THREADS in the actor's runtime_env: an actor with a runtime_env of its
            # own cannot take one of Ray's idle workers, which may have imported torch already (docs/cluster.md)
            torch.set_num_threads(config.cpu_threads)
        self.model = load_model(source, self.device, self.dtype, opts.attention)
        self.timeline["weights_loaded"] = time.time()
        self.tokenizer = load_tokenizer(source, opts.truncation_seq_length)
        self.readers: dict[str, RecordReader] = {}  # each input's, opened once
        self.readers_lock = threading.Lock()
        # (sequences, tokens, longest) of each batch shape warmed up on: a service's replica is asked to
        # prepare for every job, and a batch within one of them needs no warm-up of its own
        self.warmed_up_on: list[tuple[int, int, int]] = []
        if self.device.type == "cuda":
            # pyarrow imports pandas (if installed) at its first pa.array, in the first part's write. Done
            # beside the GPU warm-up, it is off the first part's path. (Not on a CPU, where no warm-up waits:
            # it slowed the first batch's forward more than it saved.)
            threading.Thread(target=pa.array, args=([0],), name="virnucpro-warm-pyarrow", daemon=True).start()
        self.plans: dict[tuple, tuple[list[Column], torch.dtype]] = {}
        # the output columns of this actor's own jobs (--repr-layers, --include, --output-dtype)
        self.outputs = self._plan(opts.repr_layers, opts.include, opts.output_dtype)
        # the layers batches run through: the model's own (eager) until their compiled versions are ready
        self.layers: list | None = None
        self.compiled = (self.device.type == "cuda" and self.model.compile_pays) if opts.compile is None else opts.compile
        self.toks_per_batch = opts.toks_per_batch or default_toks_per_batch(source, self.device.type)
        # the compile starts after the warm-up and the first batch (`_start_compile`), not here
        self.compile_started = False
        self.compile_lock = threading.Lock()
        self.compile_done = threading.Event()
        self.weight_bytes = sum(p.numel() * p.element_size() for p in self.model.parameters())
        self.pin_memory = opts.pin_memory and self.device.type == "cuda"
        self.profile_dir, self.profile_left = opts.profile, config.profile_batches if opts.profile else 0
        self.profile_lock = threading.Lock()  # the torch profiler is per process: one batch at a time
        self.streams: queue.Queue = queue.Queue()
        for _ in range(opts.cuda_streams if self.device.type == "cuda" else 1):
            pair = (torch.cuda.Stream(self.device), torch.cuda.Stream(self.device)) if self.device.type == "cuda" else None
            self.streams.put(pair)
        if self.device.type == "cuda":
            log.debug("actor %s: %d CUDA stream pair(s) (copy, compute) on %s", self.name,
                      self.streams.qsize(), torch.cuda.get_device_name(self.device))

    def _start_compile(self) -> None:
        """Start compiling the layers in a thread of their own, once. Called after the first batch, or at
        once by a `prepare()` with no batch to warm up on (a service's replica, idle until a job comes):
        the compile thread imports the compiler (seconds, holding the GIL much of it), which slowed the
        eager warm-up and first batch beside it (bench/README.md, "Start-up"); a first part should not
        wait for a compile it does not use."""
        with self.compile_lock:
            if not self.compiled or self.compile_started:
                return
            self.compile_started = True
        threading.Thread(target=self._compile_in_background, name="virnucpro-compile", daemon=True).start()

    def _compile_in_background(self) -> None:
        """Compile the layers in this one thread, for the shapes batches will have (several sequences,
        or one alone), then switch the batches to them. Meanwhile batches run eagerly: a compile takes
        longer than a small job's whole run, so the first parts do not wait for it. A compile that fails
        leaves the actor eager, and says so.

        Most of a compile from a warm cache is importing the compiler (torch._dynamo and torch._inductor).
        Importing it before the weights load finished the compile sooner but held the load up more (the
        two threads' imports contend), so the import stays after the load (bench/README.md, "Where the
        actor's compile goes")."""
        start = time.perf_counter()
        # Batches run beside this thread: with Python's default 5 ms GIL switch interval each of their
        # kernel launches can wait that long for the compiling thread, and the compile itself took 2x as
        # long (bench/results/probe-startup-*.json). A short interval while compiling serves both.
        switch = sys.getswitchinterval()
        sys.setswitchinterval(1e-4)
        try:
            layers = self.model.compiled_layers()
            stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
            with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                for lengths in self._compile_shapes():
                    self._run_random(lengths, layers)
            if stream is not None:
                stream.synchronize()
        except Exception:  # noqa: BLE001 - eager layers compute the same embeddings, only slower
            log.warning("actor %s: compiling the layers failed; they stay eager", self.name, exc_info=True)
            self.compiled = False
            return
        finally:
            sys.setswitchinterval(switch)
            self.compile_done.set()  # (batches caught by the tracing wait for this: `_compute`)
        self.layers = layers
        self.timeline["compiled"] = time.time()
        log.info("actor %s: layers compiled in %.1f s; batches now run compiled", self.name,
                 time.perf_counter() - start)

    def _compile_shapes(self) -> list[np.ndarray]:
        """The token counts of the sequences the compiled layers first run on. Inductor takes its size
        hints from the first call's shapes and tunes each kernel's launch on its first launch (kept in
        its disk cache), so the first is batch-sized, not a toy: a quarter of the token budget (it runs
        beside the eager batches in flight) in 128-token sequences. Then one sequence alone, which
        compiles a graph of its own (a dimension of size 1 is specialised); a run rarely has one."""
        n = max(2, self.toks_per_batch // 4 // 128)
        return [np.full(n, 128, np.int64), np.array([7], np.int64)]

    @torch.inference_mode()
    def _run_random(self, seq_tokens: np.ndarray, layers: list | None = None) -> None:
        """One forward pass over random tokens, sequences of the given token counts (warm-ups)."""
        lengths = torch.tensor(seq_tokens, device=self.device)  # a copy: Ray hands over read-only arrays
        tokens = torch.randint(5, 20, (int(seq_tokens.sum()),), device=self.device)
        self.model.embed(tokens, Packing.from_lengths(lengths, int(seq_tokens.max())), layers)

    def _warm_up(self, seq_tokens: np.ndarray) -> None:
        start = time.perf_counter()
        try:
            self._run_random(seq_tokens, self.layers)
            torch.cuda.synchronize(self.device)
        except torch.cuda.OutOfMemoryError:
            raise BatchError(self._oom_report(f"the plan's largest batch ({len(seq_tokens)} sequences, "
                                              f"{int(seq_tokens.sum())} tokens, longest {int(seq_tokens.max())}), "
                                              f"tried at start-up", int(seq_tokens.sum()))) from None
        log.info("actor %s: warmed up on the plan's largest batch (%d tokens) in %.1f s, peak %.1f GiB",
                 self.name, int(seq_tokens.sum()), time.perf_counter() - start,
                 torch.cuda.max_memory_allocated(self.device) / (1 << 30))

    def prepare(self, largest_batch: np.ndarray | None = None) -> dict:
        """Get ready for a plan whose most demanding batch has these token counts, then return `info()`.

        On a GPU the actor runs one batch of that shape first, so that memory is grown, kernels are
        chosen and shape-specific attention plans are built before the first real batch, and so that
        a budget that cannot fit fails here, with the out-of-memory report, not mid-run. The driver
        calls this once its plan exists; the constructor (model load, compile) runs meanwhile. A batch
        no larger in sequences, tokens and longest sequence than one it warmed up on before (a service's
        next job) is not run again: the memory it needs was grown then, and a warm-up costs a batch's
        time."""
        if largest_batch is not None and self.device.type == "cuda":
            largest = np.asarray(largest_batch, np.int64)
            shape = batch_shape(largest)
            # within one shape that ran, not a mix of several: the padded attention grid grows with
            # sequences x longest, which no single earlier batch may have reached
            if any(all(a <= b for a, b in zip(shape, ran)) for ran in self.warmed_up_on):
                log.debug("actor %s: the plan's largest batch (%d tokens) is within one it warmed up on", self.name,
                          shape[1])
            else:
                self._warm_up(largest)
                self.warmed_up_on.append(shape)
        self.timeline.setdefault("warmed_up", time.time())
        if largest_batch is None:
            self._start_compile()  # no batch is on its way: compile while idle
        return self.info()

    def info(self) -> dict:
        """What this actor runs, and when its start-up phases ended (wall clock): shown by the driver."""
        gpu = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"
        return {"actor": self.name, "device": str(self.device), "gpu": gpu,
                "dtype": str(self.dtype).removeprefix("torch."), "attention": self.model.backend.describe(),
                "compiled": self.layers is not None, "compiling": self.compiled and self.layers is None,
                "fused": bool(getattr(self.model, "fused", False)),  # DNABERT-S's elementwise kernels in Triton
                "streams": self.streams.qsize(), "dim": self.model.dim,
                "pid": os.getpid(), "node_id": self.node_id, "gpu_ids": self.gpu_ids,
                "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"), "timeline": self.timeline}

    def embed(self, batch: BatchSpec | TokenBatch, attempt: int = 0, out_dir: str | None = None,
              outputs: tuple | None = None) -> PartResult:
        """Read and tokenise one batch (given as its description), compute it and write its part;
        `attempt` counts the times the driver dealt it before. `out_dir`: where the part goes, if not the
        actor's own output location (a service's jobs); `outputs`: that job's (repr_layers, include,
        output_dtype), if not the actor's own."""
        start = time.perf_counter()
        out = self.out_dir if out_dir is None else self._location(out_dir)
        columns, dtype = self.outputs if outputs is None else self._plan(*outputs)
        if isinstance(batch, BatchSpec):
            batch = load_batch(batch, self._reader(batch.input, batch.kind), self.tokenizer)
        loaded = time.perf_counter()
        if attempt:
            log.debug("actor %s: %s, attempt %d", self.name, batch.describe(), attempt + 1)
        try:
            with self._profiled(batch.batch_id):
                values, forward_seconds = self._compute(batch, columns, dtype, attempt)
            written = time.perf_counter()
            file, rows = self._write(batch, values, columns, out)
        except BatchError:
            self._failed("out_of_memory")
            raise
        except Exception:
            self._failed("error")
            raise
        end = time.perf_counter()
        seconds = end - start
        self._start_compile()  # (once) after the first part is written: the compiler's imports did not hold it up
        if self.metrics is not None:
            self.metrics.batch_done(rows, batch.num_tokens, seconds, self.device)
        return PartResult(batch.batch_id, file, rows, batch.num_tokens, seconds, self.name, self.node_id,
                          forward_seconds, end - written, loaded - start)

    def _reader(self, uri: str, kind: str) -> RecordReader:
        """The reader of input `uri`, opened once (an s3:// file resolves its region once)."""
        with self.readers_lock:
            if uri not in self.readers:
                self.readers[uri] = RecordReader(uri, kind)
            return self.readers[uri]

    def compute(self, batch: TokenBatch) -> np.ndarray:
        """Pooled embeddings [B, D] float32 of one batch, nothing written (a service's HTTP requests)."""
        columns = [Column("embedding", "mean", self.model.num_layers)]
        values = self._compute(batch, columns, torch.float32)[0]["embedding"]
        self._start_compile()
        return values

    def _plan(self, repr_layers: tuple | None, include: tuple | None, output_dtype: str) -> tuple[list[Column], torch.dtype]:
        """The columns and float type asked for, checked against this model (a layer it lacks, logits
        without an LM head: a one-line ValueError)."""
        key = (repr_layers, include, output_dtype)
        if key not in self.plans:
            columns = plan_columns(repr_layers, include, self.model.num_layers, self.model.bos_name,
                                   getattr(self.model, "lm_head", None) is not None)
            self.plans[key] = columns, DTYPES[output_dtype]
        return self.plans[key]

    def _location(self, uri: str) -> OutputLocation:
        """Each job's output location, parsed once (an s3:// URI resolves its region)."""
        if uri not in self.locations:
            self.locations[uri] = OutputLocation.parse(uri)
        return self.locations[uri]

    def _write(self, batch: TokenBatch, values: dict[str, np.ndarray], columns: list[Column],
               out: OutputLocation) -> tuple[str, int]:
        """Write the batch's Parquet part to `out` (atomically); returns (file name, rows)."""
        return write_part(out, batch.batch_id, batch.ids, batch.index, batch.length, batch.truncated,
                          values, self.source.name,
                          {"actor": self.name, "node_id": self.node_id, "batch_id": batch.batch_id},
                          columns=columns, residues=residue_counts(self.model, batch.seq_tokens), extra=batch.extra)

    @contextlib.contextmanager
    def _profiled(self, batch_id: int):
        """Record a torch profiler trace (CPU and CUDA) of the actor's first few batches (--profile)."""
        if self.profile_left <= 0:
            yield
            return
        self.profile_lock.acquire()  # the profiler traces one batch at a time: concurrent batches wait their turn
        if self.profile_left <= 0:
            self.profile_lock.release()
            yield
            return
        try:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            with torch.profiler.profile(activities=activities) as prof:
                yield
            self.profile_left -= 1
            path = Path(self.profile_dir) / f"trace-{socket.gethostname()}-{os.getpid()}-batch{batch_id}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            prof.export_chrome_trace(str(path))
            log.info("actor %s: profiler trace of batch %d written to %s (open in Perfetto or chrome://tracing)",
                     self.name, batch_id, path)
        finally:
            self.profile_lock.release()

    def _compute(self, batch: TokenBatch, columns: list[Column], dtype: torch.dtype,
                 attempt: int = 0) -> tuple[dict[str, np.ndarray], float]:
        """The batch's columns on the host (see `compute_columns`), and the seconds the forward took
        once it had its streams. `attempt`: times the driver dealt this batch before (0 the first time)."""
        streams = self.streams.get()
        try:
            start = time.perf_counter()
            try:
                values = self._forward(batch, streams, columns, dtype)
            except NameError as e:
                if not self._caught_by_tracing(e):
                    raise
                # The compile thread's FX tracing patches nn.Module.__call__ for every thread while it
                # traces, and an eager batch that calls a module then fails (torch.fx's "module is not
                # installed as a submodule"). Such a batch waits for the compile and runs again.
                log.debug("actor %s: %s met the compiler's tracing; running it again after the compile",
                          self.name, batch.describe())
                self.compile_done.wait(COMPILE_WAIT_SECONDS)
                values = self._forward(batch, streams, columns, dtype)
            return values, time.perf_counter() - start
        except torch.cuda.OutOfMemoryError:
            raise BatchError(self._oom_report(batch.describe(), batch.num_tokens)) from None
        finally:
            self.streams.put(streams)

    def _caught_by_tracing(self, e: NameError) -> bool:
        """Whether an eager batch's NameError is torch.fx's, raised while this actor compiles."""
        return self.compile_started and not self.compile_done.is_set() and "installed as a submodule" in str(e)

    def _failed(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.failed(reason)

    @torch.inference_mode()
    def _forward(self, batch: TokenBatch, streams, columns: list[Column], dtype: torch.dtype) -> dict[str, np.ndarray]:
        # one copy out of the (read-only) object-store buffers, straight into page-locked memory
        tokens = torch.empty(batch.tokens.shape, dtype=torch.int32, pin_memory=self.pin_memory)
        lengths = torch.empty(batch.seq_tokens.shape, dtype=torch.int32, pin_memory=self.pin_memory)
        tokens.numpy()[:], lengths.numpy()[:] = batch.tokens, batch.seq_tokens
        max_len = int(batch.seq_tokens.max())
        if streams is None:  # CPU
            packing = Packing.from_lengths(lengths, max_len)
            values = compute_columns(self.model, tokens.long(), packing, columns, dtype, self.layers)
            return {k: v.numpy() for k, v in values.items()}
        copy, compute = streams
        with torch.cuda.stream(copy):
            tokens_d = tokens.to(self.device, non_blocking=True)
            lengths_d = lengths.to(self.device, non_blocking=True)
        compute.wait_stream(copy)
        with torch.cuda.stream(compute):
            tokens_d.record_stream(compute)
            lengths_d.record_stream(compute)
            packing = Packing.from_lengths(lengths_d, max_len)
            values = compute_columns(self.model, tokens_d.long(), packing, columns, dtype, self.layers)
            host = {}
            for name, value in values.items():  # converted to the output dtype on the GPU: fewer bytes to copy
                host[name] = torch.empty(value.shape, dtype=value.dtype, pin_memory=self.pin_memory)
                host[name].copy_(value, non_blocking=True)
        compute.synchronize()
        return {k: v.numpy() for k, v in host.items()}

    def _oom_report(self, what: str, num_tokens: int) -> str:
        peak = torch.cuda.max_memory_allocated(self.device)
        total = torch.cuda.get_device_properties(self.device).total_memory
        torch.cuda.empty_cache()
        rec = recommend_toks_per_batch(num_tokens, peak, self.weight_bytes, total)
        gib = 1 << 30
        return (f"CUDA out of memory on {self.name} ({torch.cuda.get_device_name(self.device)}, "
                f"{total / gib:.1f} GiB) in {what}: peak {peak / gib:.1f} GiB allocated, "
                f"model weights {self.weight_bytes / gib:.1f} GiB. Try --toks-per-batch {rec}"
                + ("" if os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "").find("expandable") >= 0
                   else " and --expandable-segments"))
