"""Tables as input: a Parquet, CSV or TSV file (a path or a URI) with an id column and a sequence column,
and columns to keep beside the embeddings (labels, organism, ...).

    virnucpro embed proteins.parquet --id-column accession --sequence-column seq --keep-columns label,taxon ...

The table is read once, streamed in record batches, into two files in the run's scratch space
(`OUT_DIR/.work/`): a FASTA of its ids and sequences, which the embedding reads as it reads any FASTA
(indexed, validated, read back by byte range), and the kept columns as an Arrow IPC file whose row i is
record i. The driver hands each batch the kept values of its records, and the actor writes them into
the batch's part, after the embedding columns. An id must be a FASTA id: not empty, no whitespace.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from virnucpro.errors import SequenceError
from virnucpro.io.fasta import open_input
from virnucpro.io.storage import InputFile, Location, is_uri

TABLE_SUFFIXES = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".tsv": "tsv", ".csv.gz": "csv",
                  ".tsv.gz": "tsv"}
FASTA_NAME = "table.fasta"  # the table's ids and sequences, in OUT_DIR/.work
COLUMNS_NAME = "kept-columns.arrow"  # the kept columns, row i = record i


def table_format(where: str) -> str | None:
    """"parquet", "csv" or "tsv" for a table input (by its name), None for anything else (FASTA)."""
    name = str(where).lower()
    return next((fmt for suffix, fmt in TABLE_SUFFIXES.items() if name.endswith(suffix)), None)


@dataclass(frozen=True)
class TableInput:
    """Which columns of a table input are the ids, the sequences and the ones to keep."""

    id_column: str = "id"
    sequence_column: str = "sequence"
    keep: tuple[str, ...] = ()

    @property
    def columns(self) -> list[str]:
        return [self.id_column, self.sequence_column, *self.keep]


def check_table(where: str, table: TableInput) -> InputFile:
    """The table input, once it is found to have the columns asked for (its schema or header read)."""
    source = open_input(where)
    try:
        names = _column_names(source)
    except (OSError, pa.ArrowInvalid) as e:
        raise SequenceError(f"{source.uri}: not a readable {table_format(where)} table ({e})") from None
    missing = [c for c in table.columns if c not in names]
    if missing:
        raise SequenceError(f"{source.uri}: no column {', '.join(repr(c) for c in missing)} (its columns: "
                            f"{', '.join(names)}); name them with --id-column, --sequence-column, --keep-columns")
    return source


def _column_names(source: InputFile) -> list[str]:
    fmt = table_format(source.uri)
    if fmt == "parquet":
        with source.random_access() as f:
            return pq.read_schema(f).names
    with source.stream() as f:
        return _csv_reader(f, fmt, None).schema.names


def _csv_reader(f, fmt: str, columns: list[str] | None):
    parse = pacsv.ParseOptions(delimiter="\t" if fmt == "tsv" else ",")
    convert = pacsv.ConvertOptions(include_columns=columns,
                                   column_types={c: pa.string() for c in columns[:2]} if columns else None)
    return pacsv.open_csv(f, parse_options=parse, convert_options=convert)


def _batches(source: InputFile, table: TableInput):
    fmt = table_format(source.uri)
    if fmt == "parquet":
        with source.random_access() as f:
            yield from pq.ParquetFile(f).iter_batches(batch_size=65536, columns=table.columns)
        return
    with source.stream() as f:
        yield from _csv_reader(f, fmt, table.columns)


def convert_table(where: str, table: TableInput, out: str) -> tuple[str, str | None]:
    """Write the table's ids and sequences as FASTA, and its kept columns (if any) as Arrow IPC, into the
    directory `out` (a path or URI), each whole or not at all; returns their paths or URIs."""
    source, loc = open_input(where), Location.parse(out)
    loc.make_dirs()

    def fasta_and(kept) -> None:
        def write(fasta) -> None:
            writer, row = None, 0
            for batch in _batches(source, table):
                fasta.write(_fasta_text(batch, table, source.uri, row))
                if kept is not None:
                    columns = batch.select(list(table.keep))
                    writer = writer or pa.ipc.new_file(kept, columns.schema)
                    writer.write_batch(columns)
                row += batch.num_rows
            if not row:
                raise SequenceError(f"{source.uri}: no rows")
            if writer is not None:
                writer.close()
        return write

    if table.keep:
        loc.write_atomic(COLUMNS_NAME, lambda kept: loc.write_atomic(FASTA_NAME, fasta_and(kept)))
        return _path(loc, FASTA_NAME), _path(loc, COLUMNS_NAME)
    loc.write_atomic(FASTA_NAME, fasta_and(None))
    return _path(loc, FASTA_NAME), None


def _path(loc: Location, name: str) -> str:
    return str(loc.local_path / name) if loc.local_path is not None else f"{loc.uri.rstrip('/')}/{name}"


def _fasta_text(batch: pa.RecordBatch, table: TableInput, uri: str, first_row: int) -> bytes:
    ids = batch.column(table.id_column).cast(pa.string()).to_pylist()
    seqs = batch.column(table.sequence_column).cast(pa.string()).to_pylist()
    lines = []
    for k, (rid, seq) in enumerate(zip(ids, seqs)):
        if not rid or seq is None or any(c.isspace() for c in rid):
            what = ("no id" if not rid else "no sequence" if seq is None
                    else f"id {rid!r} holds whitespace, which a FASTA id cannot")
            raise SequenceError(f"{uri}: row {first_row + k + 1}: {what}")
        lines.append(f">{rid}\n{seq}\n")
    return "".join(lines).encode()


def kept_columns(path: str) -> pa.Table:
    """The kept columns written by `convert_table` (memory-mapped when local)."""
    if not is_uri(path):
        return pa.ipc.open_file(pa.memory_map(path)).read_all()
    with open_input(path).random_access() as f:
        return pa.ipc.open_file(f).read_all()


__all__ = ["TableInput", "table_format", "check_table", "convert_table", "kept_columns", "FASTA_NAME", "COLUMNS_NAME"]
