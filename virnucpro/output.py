"""The output contract: Parquet part files, written atomically, and the manifest that says a run is done.

OUT_DIR/
  part-000000.parquet ...   one file per planned batch, written by the actor that computed it
  _manifest.json            the run's identity (model, input, plan), finished parts, and `complete`

A part is written to a temporary name and renamed into place, so a part file either is whole or does
not exist; a batch that is computed twice (a retry after an actor died) replaces its own file, so
every sequence appears exactly once. `complete: true` is written last, only after the driver has
counted every input sequence in the finished parts.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

MANIFEST = "_manifest.json"  # "_" prefix: pyarrow datasets skip it, so read_table(OUT_DIR) works
FORMAT_VERSION = 1


def embedding_schema(dim: int) -> pa.Schema:
    return pa.schema([
        pa.field("id", pa.string(), nullable=False),
        pa.field("index", pa.int64(), nullable=False),  # record number in the input, 0-based
        pa.field("length", pa.int32(), nullable=False),  # residues / bases before truncation
        pa.field("truncated", pa.bool_(), nullable=False),
        pa.field("model", pa.dictionary(pa.int8(), pa.string()), nullable=False),
        pa.field("embedding", pa.list_(pa.float32(), dim), nullable=False),
    ])


def part_name(batch_id: int) -> str:
    return f"part-{batch_id:06d}.parquet"


def write_part(out_dir: str | Path, batch_id: int, ids: list[str], index: np.ndarray, length: np.ndarray,
               truncated: np.ndarray, embeddings: np.ndarray, model: str) -> tuple[str, int]:
    """Write one batch's rows atomically; returns (file name, rows)."""
    embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
    n, dim = embeddings.shape
    table = pa.Table.from_arrays([
        pa.array(ids, pa.string()),
        pa.array(index, pa.int64()),
        pa.array(length, pa.int32()),
        pa.array(truncated, pa.bool_()),
        pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, np.int8)), pa.array([model])),
        pa.FixedSizeListArray.from_arrays(pa.array(embeddings.reshape(-1)), dim),
    ], schema=embedding_schema(dim))
    name = part_name(batch_id)
    atomic_write(Path(out_dir) / name, lambda f: pq.write_table(table, f, compression="zstd"))
    return name, n


def atomic_write(path: Path, write) -> None:
    """Write through a temporary file in the same directory, then rename over `path`."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@dataclass
class Manifest:
    """What a run is (model, input, plan) and how far it got."""

    model: str
    family: str
    dim: int
    input: str
    fingerprint: str
    num_sequences: int
    num_batches: int
    parts: dict[str, int] = field(default_factory=dict)  # part file name -> rows
    skipped_empty: list[str] = field(default_factory=list)
    complete: bool = False
    version: int = FORMAT_VERSION
    created: float = field(default_factory=time.time)
    finished: float | None = None

    def save(self, out_dir: str | Path) -> None:
        data = json.dumps(asdict(self), indent=1).encode()
        atomic_write(Path(out_dir) / MANIFEST, lambda f: f.write(data))

    @classmethod
    def load(cls, out_dir: str | Path) -> "Manifest | None":
        path = Path(out_dir) / MANIFEST
        if not path.is_file():
            return None
        raw = json.loads(path.read_text())
        return cls(**{k: v for k, v in raw.items() if k in cls.__dataclass_fields__})

    @property
    def rows_done(self) -> int:
        return sum(self.parts.values())


def read_embeddings(out_dir: str | Path) -> pa.Table:
    """All rows of a finished run, in input order (refuses an incomplete run)."""
    manifest = Manifest.load(out_dir)
    if manifest is None or not manifest.complete:
        raise FileNotFoundError(f"{out_dir}: no complete run here (manifest missing or not complete)")
    table = pq.read_table([str(Path(out_dir) / p) for p in sorted(manifest.parts)])
    return table.sort_by("index")
