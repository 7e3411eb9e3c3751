"""The output contract: Parquet part files, written atomically, and the manifest that says a run is done.

OUT_DIR/
  part-000000.parquet ...   one file per planned batch, written by the actor that computed it
  _manifest.parquet         the run's identity (model, input, plan), finished parts, and `complete`

A part is written to a temporary name and renamed into place, so a part file either is whole or does
not exist; a batch that is computed twice (a retry after an actor died) replaces its own file, so
every sequence appears exactly once. `complete: true` is written last, only after the driver has
counted every input sequence in the finished parts.

The directory is read by its path: `pyarrow.parquet.read_table(OUT_DIR)`, `pandas.read_parquet`,
`polars.read_parquet` / `scan_parquet`, duckdb's `read_parquet('OUT_DIR/*.parquet')`. Readers disagree
on what else a directory may hold: pyarrow and pandas skip `_`- and `.`-prefixed files, polars reads
every non-empty file below OUT_DIR (hidden ones and hidden subdirectories included) and refuses mixed
extensions, duckdb's globs match hidden files. So the manifest is itself a Parquet file: no rows, the
parts' schema, and the manifest's JSON in the file's key-value metadata (`virnucpro.manifest`); every
reader sees zero rows of the same table in it, or skips it. A directory written before (manifest
`_manifest.json`) is still read here, and `--resume` moves its manifest to the new name.

Files are created as `open()` creates them, with the permissions the user's umask gives.

OUT_DIR may be a local directory or a URI on any pyarrow or fsspec filesystem (`s3://bucket/run`,
`gs://...`, `file:///...`): see `OutputLocation`. On object stores a part is one PUT of the final
object, which is atomic per object; elsewhere it is a temporary file renamed into place.
"""

from __future__ import annotations

import json
import os
import re
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

MANIFEST = "_manifest.parquet"  # a Parquet file with no rows, so that every reader of OUT_DIR accepts it
MANIFEST_KEY = "virnucpro.manifest"  # the key of the manifest's JSON in that file's key-value metadata
LEGACY_MANIFEST = "_manifest.json"  # format 1: JSON beside the parts (polars refused such a directory)
FORMAT_VERSION = 2
PART_NAME = re.compile(r"part-(\d{6,})\.parquet")  # part-000042.parquet: batch 42's rows
PREVIOUS_RUN = ("holds the output of a previous run; use --resume to finish it or --overwrite to replace it "
                "(--resume needs the same model, input and batching options)")


OUTPUT_DTYPES = {"float32": pa.float32(), "float16": pa.float16()}


@dataclass(frozen=True)
class Column:
    """One embedding column of the output: `what` of layer `layer` (fair-esm's numbering, absolute)."""

    name: str  # embedding, mean_<L>, bos_<L> / cls_<L>, per_token_<L>, logits
    what: str  # "mean", "bos", "per_token" or "logits"
    layer: int

    @property
    def per_token(self) -> bool:
        """One vector per residue (a list column), not one per sequence."""
        return self.what in ("per_token", "logits")


def default_columns(repr_layers: tuple[int, ...] | None, include: tuple[str, ...] | None,
                    output_dtype: str = "float32") -> bool:
    """Whether these options ask for the default output: one float32 `embedding` column."""
    return repr_layers is None and include in (None, ("mean",)) and output_dtype == "float32"


def plan_columns(repr_layers: tuple[int, ...] | None, include: tuple[str, ...] | None, num_layers: int,
                 bos_name: str = "bos", has_logits: bool = False) -> list[Column]:
    """The columns `--repr-layers` and `--include` ask of a model with `num_layers` layers.

    Neither given: one `embedding` column, the mean of the last layer (VirNucPro's input, and what
    earlier runs wrote). Otherwise one column per (include, layer): `mean_<L>`, `bos_<L>` (`cls_<L>`
    for DNABERT-S: `bos_name`), `per_token_<L>`, and `logits` once; L is absolute (-1 -> num_layers).

    >>> [c.name for c in plan_columns((0, -1), ("mean", "per-token"), 33)]
    ['mean_0', 'mean_33', 'per_token_0', 'per_token_33']
    """
    if default_columns(repr_layers, include):
        return [Column("embedding", "mean", num_layers)]
    layers: list[int] = []
    for layer in repr_layers or (num_layers,):
        absolute = layer + num_layers + 1 if layer < 0 else layer
        if not 0 <= absolute <= num_layers:
            raise ValueError(f"--repr-layers {layer}: this model's layers are 0..{num_layers} "
                             f"(or -{num_layers + 1}..-1 from the end)")
        if absolute not in layers:
            layers.append(absolute)
    columns = []
    for what in dict.fromkeys(include or ("mean",)):
        if what == "logits":
            if not has_logits:
                raise ValueError("--include logits: this model has no language-model head (ESM-2 checkpoints "
                                 "with lm_head weights have one)")
            columns.append(Column("logits", "logits", num_layers))
            continue
        what = "bos" if what in ("bos", "cls") else what.replace("-", "_")
        columns += [Column(f"{bos_name if what == 'bos' else what}_{layer}", what, layer) for layer in layers]
    return columns


def embedding_schema(dim: int, columns: list[Column] | None = None, dtype: str = "float32",
                     vocab_size: int | None = None) -> pa.Schema:
    """The parts' schema: the sequence's identity, then its embedding columns (default: `embedding`,
    fixed_size_list<float32>[dim]); per-token columns are list<fixed_size_list<float>[dim]> in residue
    order, `logits` the same over the vocabulary."""
    value = OUTPUT_DTYPES[dtype]
    fields = [
        pa.field("id", pa.string(), nullable=False),
        pa.field("index", pa.int64(), nullable=False),  # record number in the input, 0-based
        pa.field("length", pa.int32(), nullable=False),  # residues / bases before truncation
        pa.field("truncated", pa.bool_(), nullable=False),
        pa.field("model", pa.dictionary(pa.int8(), pa.string()), nullable=False),
    ]
    for c in columns or [Column("embedding", "mean", 0)]:
        vector = pa.list_(value, vocab_size if c.what == "logits" else dim)
        fields.append(pa.field(c.name, pa.list_(vector) if c.per_token else vector, nullable=False))
    return pa.schema(fields)


# Embeddings are float32 noise to a dictionary encoder: trying one per column (pyarrow's default) doubled
# the time to write a part. Byte-stream-split puts the floats' exponent bytes together, so zstd finds
# something to compress (parts ~15% smaller) at no measurable cost. Lossless either way.
PARQUET_OPTIONS = dict(compression="zstd", use_dictionary=["model"],
                       column_encoding={"embedding.list.element": "BYTE_STREAM_SPLIT"})


def part_name(batch_id: int) -> str:
    return f"part-{batch_id:06d}.parquet"


def write_part(out_dir: "str | Path | OutputLocation", batch_id: int, ids: list[str], index: np.ndarray,
               length: np.ndarray, truncated: np.ndarray, embeddings: np.ndarray | dict[str, np.ndarray],
               model: str, metadata: dict[str, str] | None = None, *, columns: list[Column] | None = None,
               residues: np.ndarray | None = None) -> tuple[str, int]:
    """Write one batch's rows atomically; returns (file name, rows).

    `embeddings`: the `embedding` column [n, D] float32, or with `columns` one array per column name:
    [n, D] for a per-sequence column, [sum(residues), D] for a per-token one (`residues`: each
    sequence's count, in row order). float16 arrays give float16 columns. `metadata` becomes the
    file's key-value metadata (the driver records which actor and node wrote the part there)."""
    if columns is None:
        columns, embeddings = [Column("embedding", "mean", 0)], {"embedding": embeddings}
    n = len(ids)
    arrays = [
        pa.array(ids, pa.string()),
        pa.array(index, pa.int64()),
        pa.array(length, pa.int32()),
        pa.array(truncated, pa.bool_()),
        pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, np.int8)), pa.array([model])),
    ]
    dtype, dim, vocab = "float32", 0, None
    for c in columns:
        values = np.ascontiguousarray(embeddings[c.name])
        dtype = "float16" if values.dtype == np.float16 else "float32"
        values = values.astype(dtype, copy=False)
        # from the buffer, zero-copy (pa.array converts float16 value by value)
        flat = pa.Array.from_buffers(OUTPUT_DTYPES[dtype], values.size, [None, pa.py_buffer(values)])
        vectors = pa.FixedSizeListArray.from_arrays(flat, values.shape[1])
        if c.what == "logits":
            vocab = values.shape[1]
        else:
            dim = values.shape[1]
        if c.per_token:
            offsets = np.zeros(n + 1, np.int32)
            np.cumsum(residues, out=offsets[1:])
            vectors = pa.ListArray.from_arrays(pa.array(offsets), vectors)
        arrays.append(vectors)
    table = pa.Table.from_arrays(arrays, schema=embedding_schema(dim, columns, dtype, vocab))
    if metadata:
        table = table.replace_schema_metadata({f"virnucpro.{k}": str(v) for k, v in metadata.items()})
    name = part_name(batch_id)
    options = parquet_options(columns, dtype)
    OutputLocation.parse(out_dir).write_atomic(name, lambda f: pq.write_table(table, f, **options))
    return name, n


def parquet_options(columns: list[Column], dtype: str = "float32") -> dict:
    """PARQUET_OPTIONS for these columns. Per-token columns are written uncompressed: they are most of
    the bytes, float noise to zstd, and compressing them made the write path, not the GPU, the limit
    (bench/results/per-token-*.json). float16 values keep the plain encoding."""
    if columns == [Column("embedding", "mean", columns[0].layer)] and dtype == "float32":
        return PARQUET_OPTIONS
    compression = {c.name: "none" if c.per_token else "zstd" for c in columns}
    split = {} if dtype != "float32" else {
        (f"{c.name}.list.element.list.element" if c.per_token else f"{c.name}.list.element"): "BYTE_STREAM_SPLIT"
        for c in columns}
    identity = ("id", "index", "length", "truncated", "model")
    return dict(compression=compression | {n: "zstd" for n in identity}, use_dictionary=["model"],
                column_encoding=split or None,
                # min/max of every float of a per-token column cost a quarter of the write; no reader prunes on them
                write_statistics=[*identity, *(c.name for c in columns if not c.per_token)])


def part_metadata(out_dir: "str | Path | OutputLocation", name: str) -> dict[str, str]:
    """The `virnucpro.*` key-value metadata of a part file (actor, node, ...), prefix removed."""
    loc = OutputLocation.parse(out_dir)
    meta = pq.read_metadata(loc.join(name), filesystem=loc.fs).metadata or {}
    return {k.decode().removeprefix("virnucpro."): v.decode() for k, v in meta.items()
            if k.startswith(b"virnucpro.")}


def part_schema(out_dir: "str | Path | OutputLocation", name: str) -> pa.Schema:
    """The Arrow schema of a part file, without its key-value metadata."""
    loc = OutputLocation.parse(out_dir)
    return pq.read_schema(loc.join(name), filesystem=loc.fs).remove_metadata()


WRITE_TEST = ".write-test"  # what a run writes and deletes first, to find an unwritable output early
_TEMPORARY = re.compile(r"\.(.+)\.[0-9a-f]{12}\.tmp")  # _temporary_name's pattern


def _temporary_name(name: str) -> str:
    """Where `name` is written before it is renamed into place: hidden, unique per writer, and
    recognisable as a write cut short (`.NAME.<random>.tmp`)."""
    return f".{name}.{uuid.uuid4().hex[:12]}.tmp"


def is_cut_short(name: str) -> bool:
    """Whether `name` is what a write of a part, the manifest or the write test left when it was cut
    short (its writer killed): safe to delete, and nothing else is."""
    m = _TEMPORARY.fullmatch(name)
    return m is not None and (PART_NAME.fullmatch(m[1]) is not None or m[1] in (MANIFEST, LEGACY_MANIFEST, WRITE_TEST))


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path next to `path` for the caller to write; when the block ends without an
    error, the file is flushed to disk and renamed over `path`, so readers see the old file or the
    new one, never part of it. On an error it is removed. The file is created as `open()` creates
    files (permissions from the umask). The one implementation of an atomic local write."""
    path = Path(path)
    tmp = path.with_name(_temporary_name(path.name))
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)  # the data is on disk before the rename makes it visible
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write(path: str | Path, write: Callable[[BinaryIO], object]) -> None:
    """Call write(f) on a binary file that then atomically becomes `path` (see `atomic_path`)."""
    with atomic_path(path) as tmp:
        with open(tmp, "xb") as f:
            write(f)


# Filesystems whose writes are atomic per object (a reader sees the whole object or nothing) and which
# have no cheap rename: parts are written straight to their final key there.
_OBJECT_STORES = {"s3", "s3a", "gcs", "gs", "abfs", "abfss", "az", "adl", "oss", "r2"}


@dataclass(frozen=True)
class OutputLocation:
    """Where a run's output lives: a local directory or a directory on any pyarrow / fsspec filesystem.

    `parse` takes a local path, a `file://` URI, a URI that pyarrow understands (`s3://`, `gs://`,
    `hdfs://`, `abfs://`) or any URI an installed fsspec implementation handles. Every process (driver
    and actors) parses the same `uri` string itself, so credentials come from each node's environment.
    """

    fs: pafs.FileSystem
    path: str  # the directory, in the filesystem's own terms
    uri: str  # what another process parses to reach the same directory

    @classmethod
    def parse(cls, where: "str | Path | OutputLocation") -> "OutputLocation":
        if isinstance(where, OutputLocation):
            return where
        text = os.fspath(where)
        if "://" not in text:
            path = os.path.abspath(os.path.expanduser(text))
            return cls(pafs.LocalFileSystem(), path, path)
        try:
            fs, path = pafs.FileSystem.from_uri(text)
        except (pa.ArrowInvalid, ValueError):
            import fsspec  # any other scheme: through fsspec, if an implementation is installed

            try:
                ffs, path = fsspec.core.url_to_fs(text)
            except (ImportError, ValueError) as e:
                raise ValueError(f"{text}: no filesystem for this URI ({e})") from None
            fs = pafs.PyFileSystem(pafs.FSSpecHandler(ffs))
        return cls(fs, path.rstrip("/") or "/", text)

    def __str__(self) -> str:
        return self.uri

    @property
    def local_path(self) -> Path | None:
        """The directory as a local Path, when it is on the local filesystem."""
        if isinstance(self.fs, pafs.LocalFileSystem):
            return Path(self.path)
        return None

    @property
    def object_store(self) -> bool:
        name = self.fs.type_name
        if name.startswith("py::fsspec+"):
            name = name.removeprefix("py::fsspec+").strip("()' ").split("'")[0].split(",")[0]
        return name in _OBJECT_STORES

    def join(self, name: str) -> str:
        return f"{self.path.rstrip('/')}/{name}"

    def make_dirs(self) -> None:
        self.fs.create_dir(self.path, recursive=True)

    def exists(self, name: str) -> bool:
        return self.fs.get_file_info(self.join(name)).type == pafs.FileType.File

    def list_files(self) -> dict[str, int]:
        """File name -> size, for the files directly in the directory (one listing call)."""
        infos = self.fs.get_file_info(pafs.FileSelector(self.path, allow_not_found=True))
        return {i.base_name: i.size for i in infos if i.type == pafs.FileType.File}

    def holds_run(self, files: dict[str, int] | None = None) -> bool:
        """Whether the directory holds a run's output (a manifest or parts); `files`: its `list_files()`."""
        files = self.list_files() if files is None else files
        return MANIFEST in files or LEGACY_MANIFEST in files or any(PART_NAME.fullmatch(f) for f in files)

    def read_bytes(self, name: str) -> bytes | None:
        try:
            with self.fs.open_input_stream(self.join(name), compression=None) as f:
                return f.read()
        except FileNotFoundError:
            return None

    def delete(self, name: str) -> None:
        try:
            self.fs.delete_file(self.join(name))
        except FileNotFoundError:
            pass

    def write_atomic(self, name: str, write) -> None:
        """Make `name` appear whole or not at all: a temporary file renamed into place (local disks,
        HDFS, ...), or one PUT of the final object on object stores (atomic per object there)."""
        local = self.local_path
        if local is not None:
            atomic_write(local / name, write)
            return
        if self.object_store:
            with self.fs.open_output_stream(self.join(name), compression=None) as f:
                write(f)
            return
        tmp = self.join(_temporary_name(name))
        try:
            with self.fs.open_output_stream(tmp, compression=None) as f:
                write(f)
            self.fs.move(tmp, self.join(name))
        except BaseException:
            try:
                self.fs.delete_file(tmp)
            except (FileNotFoundError, OSError):
                pass
            raise


@dataclass
class Manifest:
    """What a run is (model, input, plan) and how far it got.

    Saved as MANIFEST: a Parquet file with the parts' schema and no rows, the fields below as JSON in
    its key-value metadata. `schema` is not part of the JSON: it is the file's own schema."""

    model: str
    family: str
    dim: int
    input: str
    fingerprint: str
    num_sequences: int
    num_batches: int
    parts: dict[str, int] = field(default_factory=dict)  # part file name -> rows
    skipped_empty: list[str] = field(default_factory=list)
    toks_per_batch: int | None = None
    complete: bool = False
    version: int = FORMAT_VERSION  # below FORMAT_VERSION: loaded from LEGACY_MANIFEST
    created: float = field(default_factory=time.time)
    finished: float | None = None
    schema: pa.Schema | None = field(default=None, repr=False, compare=False)  # None: embedding_schema(dim)

    def to_json(self) -> bytes:
        """The fields as saved (in this format's version)."""
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "schema"}
        return json.dumps({**data, "version": FORMAT_VERSION}, indent=1).encode()

    def save(self, out_dir: "str | Path | OutputLocation") -> None:
        """Write the manifest atomically; a manifest loaded from LEGACY_MANIFEST then replaces that file."""
        loc = OutputLocation.parse(out_dir)
        schema, data = self.schema or embedding_schema(self.dim), self.to_json()

        def write(f: BinaryIO) -> None:
            with pq.ParquetWriter(f, schema) as w:  # no row groups: the footer alone
                w.add_key_value_metadata({MANIFEST_KEY: data})

        loc.write_atomic(MANIFEST, write)
        if self.version < FORMAT_VERSION:
            loc.delete(LEGACY_MANIFEST)
            self.version = FORMAT_VERSION

    @classmethod
    def load(cls, out_dir: "str | Path | OutputLocation") -> "Manifest | None":
        """The manifest in out_dir (MANIFEST, else a LEGACY_MANIFEST), or None if there is none."""
        loc = OutputLocation.parse(out_dir)
        data = loc.read_bytes(MANIFEST)
        if data is not None:
            meta = pq.read_metadata(pa.BufferReader(data))
            raw, schema = json.loads(meta.metadata[MANIFEST_KEY.encode()]), meta.schema.to_arrow_schema()
        else:
            data = loc.read_bytes(LEGACY_MANIFEST)
            if data is None:
                return None
            raw, schema = {**json.loads(data), "version": 1}, None
        manifest = cls(**{k: v for k, v in raw.items() if k in cls.__dataclass_fields__ and k != "schema"})
        manifest.schema = schema.remove_metadata() if schema is not None else None
        return manifest

    @property
    def rows_done(self) -> int:
        return sum(self.parts.values())


def read_embeddings(out_dir: "str | Path | OutputLocation") -> pa.Table:
    """All rows of a finished run, in input order (refuses an incomplete run). `out_dir` may be a
    local path or a URI (see `OutputLocation`)."""
    loc = OutputLocation.parse(out_dir)
    manifest = Manifest.load(loc)
    if manifest is None or not manifest.complete:
        raise FileNotFoundError(f"{out_dir}: no complete run here (manifest missing or not complete)")
    table = pq.read_table([loc.join(p) for p in sorted(manifest.parts)], filesystem=loc.fs)
    return table.sort_by("index")
