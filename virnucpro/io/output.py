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

import base64
import json
import re
import zlib
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from virnucpro.io.storage import Location, atomic_path, atomic_write  # noqa: F401 - atomic_*: this module's API too
from virnucpro.errors import OptionError

MANIFEST = "_manifest.parquet"  # a Parquet file with no rows, so that every reader of OUT_DIR accepts it
MANIFEST_KEY = "virnucpro.manifest"  # the key of the manifest's JSON in that file's key-value metadata
LEGACY_MANIFEST = "_manifest.json"  # format 1: JSON beside the parts (polars refused such a directory)
FORMAT_VERSION = 3  # 3: finished batches as a bitmap; 2: parts by name in a Parquet footer; 1: JSON
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
            raise OptionError(f"--repr-layers {layer}: this model's layers are 0..{num_layers} "
                             f"(or -{num_layers + 1}..-1 from the end)")
        if absolute not in layers:
            layers.append(absolute)
    columns = []
    for what in dict.fromkeys(include or ("mean",)):
        if what == "logits":
            if not has_logits:
                raise OptionError("--include logits: this model has no language-model head (ESM-2 checkpoints "
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


# Embeddings are float32 noise to a dictionary encoder: trying one per column (pyarrow's default) is time
# spent for nothing. Byte-stream-split puts the floats' exponent bytes together, so zstd finds something
# to compress. Lossless either way.
PARQUET_OPTIONS = dict(compression="zstd", use_dictionary=["model"],
                       column_encoding={"embedding.list.element": "BYTE_STREAM_SPLIT"})


def part_name(batch_id: int) -> str:
    return f"part-{batch_id:06d}.parquet"


def write_part(out_dir: "str | Path | OutputLocation", batch_id: int, ids: list[str], index: np.ndarray,
               length: np.ndarray, truncated: np.ndarray, embeddings: np.ndarray | dict[str, np.ndarray],
               model: str, metadata: dict[str, str] | None = None, *, columns: list[Column] | None = None,
               residues: np.ndarray | None = None, extra: pa.Table | None = None) -> tuple[str, int]:
    """Write one batch's rows atomically; returns (file name, rows).

    `embeddings`: the `embedding` column [n, D] float32, or with `columns` one array per column name:
    [n, D] for a per-sequence column, [sum(residues), D] for a per-token one (`residues`: each
    sequence's count, in row order). float16 arrays give float16 columns. `metadata` becomes the
    file's key-value metadata (the driver records which actor and node wrote the part there). `extra`: a
    table input's kept columns, one row per sequence, written after the embedding columns."""
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
    for name in extra.column_names if extra is not None else ():  # a table input's kept columns, last
        table = table.append_column(extra.field(name), extra.column(name))
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


def is_cut_short(name: str) -> bool:
    """Whether `name` is what a write of a part, the manifest or the write test left when it was cut
    short (its writer killed): safe to delete, and nothing else is."""
    m = _TEMPORARY.fullmatch(name)
    return m is not None and (PART_NAME.fullmatch(m[1]) is not None or m[1] in (MANIFEST, LEGACY_MANIFEST, WRITE_TEST))


OutputLocation = Location  # the output directory of a run (see virnucpro.io.storage)


@dataclass
class Manifest:
    """What a run is (model, input, plan) and how far it got: which batches' parts are written.

    Saved as MANIFEST: a Parquet file with the parts' schema and no rows, the fields below as JSON in
    its key-value metadata. `schema` is not part of the JSON: it is the file's own schema. Finished
    batches are a bitmap (`done`), compressed in the JSON: a run of 10^6 parts saves ~100 KiB, not a
    name per part (format 2 listed each part's name and rows; such a manifest still loads)."""

    model: str
    family: str
    dim: int
    input: str
    fingerprint: str
    num_sequences: int
    num_batches: int
    done: np.ndarray | None = field(default=None, repr=False)  # bool [num_batches]: batch b's part is written
    rows_done: int = 0  # rows in the parts written
    skipped_empty: list[str] = field(default_factory=list)
    toks_per_batch: int | None = None
    complete: bool = False
    version: int = FORMAT_VERSION  # below FORMAT_VERSION: written by an earlier VirNucPro
    created: float = field(default_factory=time.time)
    finished: float | None = None
    schema: pa.Schema | None = field(default=None, repr=False, compare=False)  # None: embedding_schema(dim)

    def __post_init__(self) -> None:
        if self.done is None:
            self.done = np.zeros(self.num_batches, bool)

    @property
    def batches_done(self) -> int:
        return int(self.done.sum())

    def mark_done(self, batch: int, rows: int) -> None:
        if not self.done[batch]:
            self.done[batch] = True
            self.rows_done += rows

    def part_names(self) -> list[str]:
        """The part files of the finished batches, in batch order."""
        return [part_name(int(b)) for b in np.flatnonzero(self.done)]

    def to_json(self) -> bytes:
        """The fields as saved (in this format's version)."""
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("schema", "done")}
        bits = base64.b64encode(zlib.compress(np.packbits(self.done).tobytes())).decode()
        return json.dumps({**data, "done": bits, "version": FORMAT_VERSION}, indent=1).encode()

    def save(self, out_dir: "str | Path | OutputLocation") -> None:
        """Write the manifest atomically; a manifest loaded from LEGACY_MANIFEST then replaces that file."""
        loc = OutputLocation.parse(out_dir)
        schema, data = self.schema or embedding_schema(self.dim), self.to_json()

        def write(f: BinaryIO) -> None:
            with pq.ParquetWriter(f, schema) as w:  # no row groups: the footer alone
                w.add_key_value_metadata({MANIFEST_KEY: data})

        loc.write_atomic(MANIFEST, write)
        if self.version == 1:
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
        fields_ = {k: v for k, v in raw.items() if k in cls.__dataclass_fields__ and k not in ("schema", "done")}
        manifest = cls(**fields_)
        if "parts" in raw:  # formats 1 and 2: part name -> rows
            for name, rows in raw["parts"].items():
                m = PART_NAME.fullmatch(name)
                if m and int(m.group(1)) < manifest.num_batches:
                    manifest.mark_done(int(m.group(1)), rows)
        elif raw.get("done"):
            bits = np.unpackbits(np.frombuffer(zlib.decompress(base64.b64decode(raw["done"])), np.uint8))
            manifest.done = bits[:manifest.num_batches].astype(bool)
        manifest.schema = schema.remove_metadata() if schema is not None else None
        return manifest


def to_numpy(table: pa.Table, column: str = "embedding") -> np.ndarray:
    """A fixed-size-list column (one vector per row) as an array [rows, D], without a Python object per row."""
    values = table.column(column).combine_chunks()
    return values.flatten().to_numpy(zero_copy_only=False).reshape(len(values), values.type.list_size)


def read_embeddings(out_dir: "str | Path | OutputLocation") -> pa.Table:
    """All rows of a finished run, in input order (refuses an incomplete run). `out_dir` may be a
    local path or a URI (see `OutputLocation`)."""
    loc = OutputLocation.parse(out_dir)
    manifest = Manifest.load(loc)
    if manifest is None or not manifest.complete:
        raise FileNotFoundError(f"{out_dir}: no complete run here (manifest missing or not complete)")
    table = pq.read_table([loc.join(p) for p in manifest.part_names()], filesystem=loc.fs)
    return table.sort_by("index")
