"""An embedding output directory is read by its path, as users read Parquet directories.

pyarrow, pandas, polars and duckdb each read OUT_DIR (written here by `virnucpro.io.output` directly, as
the actors and the driver write it) and get every row once with its embedding; the idioms of
docs/embedding.md ("Reading the output") run as written. Also: files follow the umask, a directory of
the previous layout (`_manifest.json`) still reads, resumes or is refused, and the driver's completion
leaves nothing in OUT_DIR that a reader would trip on. pandas, polars and duckdb are test extras: a
reader that is not installed fails its tests (`pip install -e ".[test]"`), it does not pass them by skipping.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import stat
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from virnucpro.io.output import (LEGACY_MANIFEST, MANIFEST, Manifest, OutputLocation, atomic_write, read_embeddings,
                              write_part)

ROOT = Path(__file__).resolve().parents[1]
DIM = 5
BATCHES = [[4, 0, 7], [2, 5], [1, 6, 3, 8]]  # record numbers per part, as a length-sorted plan deals them


def _ids(n: int) -> list[str]:
    return [f"seq{i}" for i in range(n)]


def _embeddings(n: int) -> np.ndarray:
    return np.random.default_rng(7).standard_normal((n, DIM)).astype(np.float32)


def _write_run(out: str | Path, complete: bool = True) -> Manifest:
    """Parts and manifest as a finished run leaves them (through OutputLocation, so `out` may be a URI)."""
    n = sum(map(len, BATCHES))
    ids, emb = _ids(n), _embeddings(n)
    loc = OutputLocation.parse(out)
    loc.make_dirs()
    manifest = Manifest("esm2_tiny", "esm2", DIM, "in.faa", "f" * 16, n, len(BATCHES))
    manifest.save(loc)
    for b, rows in enumerate(BATCHES):
        rows = np.array(rows)
        name, count = write_part(loc, b, [ids[i] for i in rows], rows, rows + 10, rows % 2 == 0, emb[rows],
                                 "esm2_tiny", {"batch_id": b})
        manifest.mark_done(b, count)
    manifest.complete = complete
    manifest.save(loc)
    return manifest


@pytest.fixture
def out(tmp_path) -> Path:
    path = tmp_path / "out"
    _write_run(path.as_uri())  # file:// as a user may give it; read below by its path
    return path


def _check(ids: list[str], emb: np.ndarray, by_index: bool = True) -> None:
    """Every row once, with its own embedding (rows in input order unless `by_index` is False)."""
    n = sum(map(len, BATCHES))
    if not by_index:
        order = np.argsort([int(i.removeprefix("seq")) for i in ids])
        ids, emb = [ids[i] for i in order], emb[order]
    assert ids == _ids(n)
    assert emb.shape == (n, DIM) and emb.dtype == np.float32
    np.testing.assert_array_equal(emb, _embeddings(n))


# --- every reader, by the directory's path -------------------------------------------------------------

def _pyarrow(path: Path):
    t = pq.read_table(path)
    return t.column("id").to_pylist(), np.stack(t.column("embedding").to_numpy(zero_copy_only=False))


def _pyarrow_dataset(path: Path):
    import pyarrow.dataset as ds

    t = ds.dataset(path, format="parquet").to_table()
    return t.column("id").to_pylist(), np.stack(t.column("embedding").to_numpy(zero_copy_only=False))


def _extra(module: str):
    """A reader of the test extras, imported; its absence fails the test that needs it (a skip would let
    a machine without it pass the very checks this file makes)."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        pytest.fail(f"{module} is a test extra and is not installed ({e}): pip install -e \".[test]\"")


def _pandas(path: Path):
    pd = _extra("pandas")
    df = pd.read_parquet(path)
    return df["id"].tolist(), np.stack(df["embedding"].to_numpy())


def _polars(path: Path):
    pl = _extra("polars")
    df = pl.read_parquet(path)
    return df["id"].to_list(), df["embedding"].to_numpy()


def _polars_lazy(path: Path):
    pl = _extra("polars")
    df = pl.scan_parquet(path).collect()
    return df["id"].to_list(), df["embedding"].to_numpy()


def _duckdb(glob: str):
    def read(path: Path):
        duckdb = _extra("duckdb")
        rows = duckdb.connect().sql(f"SELECT id, embedding FROM read_parquet('{path}/{glob}')").fetchnumpy()
        return rows["id"].tolist(), np.stack(rows["embedding"])
    return read


READERS = {"pyarrow.parquet.read_table": _pyarrow, "pyarrow.dataset": _pyarrow_dataset,
           "pandas.read_parquet": _pandas, "polars.read_parquet": _polars, "polars.scan_parquet": _polars_lazy,
           "duckdb **/*.parquet": _duckdb("**/*.parquet"), "duckdb *.parquet": _duckdb("*.parquet")}


@pytest.mark.parametrize("reader", list(READERS))
def test_each_reader_reads_the_directory_by_its_path(out, reader):
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST] + [f"part-{b:06d}.parquet" for b in range(3)]
    ids, emb = READERS[reader](out)
    _check(ids, emb, by_index=False)


def test_manifest_is_zero_rows_of_the_parts_schema(out):
    """What lets polars and duckdb read it with the parts; its JSON is in the key-value metadata."""
    meta = pq.read_metadata(out / MANIFEST)
    assert meta.num_rows == 0 and meta.num_row_groups == 0
    assert meta.schema.to_arrow_schema().remove_metadata() == pq.read_schema(out / "part-000000.parquet").remove_metadata()
    raw = json.loads(meta.metadata[b"virnucpro.manifest"])
    assert raw["complete"] and raw["version"] == 3 and raw["rows_done"] == 9
    assert Manifest.load(out).done.tolist() == [True] * len(BATCHES)
    assert read_embeddings(out).column("id").to_pylist() == _ids(9)


# --- the idioms of docs/embedding.md, run as written ----------------------------------------------------

def _doc_blocks() -> dict[str, str]:
    """The python blocks of the "Reading the output" section, by their first line (a comment)."""
    text = (ROOT / "docs" / "embedding.md").read_text()
    section = text.split("\n## Reading the output\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    return {b.splitlines()[0].lstrip("# ").strip(): b for b in blocks}


DOC_BLOCKS = _doc_blocks()


def test_docs_show_each_reader():
    assert {"pyarrow", "pandas", "polars", "duckdb", "per-token columns, pyarrow"} <= set(DOC_BLOCKS)


@pytest.mark.parametrize("reader", ["pyarrow", "pandas", "polars", "duckdb"])
def test_docs_idiom_gives_the_embedding_matrix(out, reader, monkeypatch):
    _extra(reader)
    monkeypatch.chdir(out.parent)  # the docs read "out"
    scope: dict = {}
    exec(DOC_BLOCKS[reader], scope)
    _check(list(scope["ids"]), scope["emb"])


def test_docs_idiom_for_list_columns():
    """A per-token column (list<fixed_size_list<float>[D]>, one residue per element) back to arrays."""
    lengths = [3, 1, 4]
    tokens = np.arange(sum(lengths) * DIM, dtype=np.float32).reshape(-1, DIM)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    col = pa.ListArray.from_arrays(offsets, pa.FixedSizeListArray.from_arrays(pa.array(tokens.reshape(-1)), DIM))
    table = pa.table({"index": [0, 1, 2], "per_token_33": col})
    table = pa.concat_tables([table.slice(0, 1), table.slice(1)])  # two chunks, the second one sliced
    scope = {"table": table, "np": np}
    exec(DOC_BLOCKS["per-token columns, pyarrow"], scope)
    assert [a.shape for a in scope["per_seq"]] == [(n, DIM) for n in lengths]
    np.testing.assert_array_equal(np.concatenate(scope["per_seq"]), tokens)


def test_docs_merge_keeps_every_row_once_in_fewer_files(out, monkeypatch):
    """The docs' recipe for fewer, larger files: the merged directory holds the run's rows, each once."""
    import pyarrow.dataset as ds
    import pyarrow.parquet as pq

    monkeypatch.chdir(out.parent)  # the docs read "out" and write "out_merged"
    parts = len(list(out.glob("part-*.parquet")))
    assert parts > 1
    exec(DOC_BLOCKS["merging parts"], {})
    merged = sorted((out.parent / "out_merged").iterdir())
    assert 0 < len(merged) < parts
    before = pq.read_table(out).sort_by("index")
    after = ds.dataset(out.parent / "out_merged", format="parquet").to_table().sort_by("index")
    assert after.column("index").to_pylist() == before.column("index").to_pylist()
    assert after.column("embedding").equals(before.column("embedding"))


# --- permissions: what the umask gives, as open() does ----------------------------------------------------

@contextmanager
def _umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


@pytest.mark.parametrize("mask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_files_follow_the_umask(tmp_path, mask, mode):
    seen = []
    with _umask(mask):
        _write_run(tmp_path / "out")
        atomic_write(tmp_path / "out" / "x.bin", lambda f: seen.append(os.fstat(f.fileno()).st_mode))
    assert stat.S_IMODE(seen[0]) == mode  # the temporary file, before it is renamed
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "out").iterdir()}
    assert modes == {name: mode for name in [MANIFEST, "x.bin"] + [f"part-{b:06d}.parquet" for b in range(3)]}
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o777 & ~mask  # the directory itself


# --- the previous layout (_manifest.json beside the parts) ----------------------------------------------

def _to_legacy(out: Path) -> None:
    """The directory as the first version wrote it: the manifest as JSON, version 1, listing the parts."""
    manifest = Manifest.load(out)
    raw = {k: v for k, v in json.loads(manifest.to_json()).items() if k not in ("done", "rows_done")}
    parts = {f"part-{b:06d}.parquet": len(rows) for b, rows in enumerate(BATCHES)}
    (out / MANIFEST).unlink()
    (out / LEGACY_MANIFEST).write_text(json.dumps({**raw, "parts": parts, "version": 1}))


def test_previous_layout_still_reads_and_its_first_save_moves_the_manifest(out):
    _to_legacy(out)
    assert read_embeddings(out).column("id").to_pylist() == _ids(9)
    manifest = Manifest.load(out)
    assert manifest.version == 1 and manifest.complete and manifest.schema is None
    manifest.save(out)  # what the driver does on --resume
    assert not (out / LEGACY_MANIFEST).exists() and Manifest.load(out).version == 3
    assert Manifest.load(out).rows_done == 9 and Manifest.load(out).part_names() == [f"part-{b:06d}.parquet" for b in range(3)]
    _check(*_polars(out), by_index=False)  # polars refused the directory with _manifest.json in it


def test_driver_refuses_resumes_or_replaces_a_previous_layout(out):
    from cluster.driver import EmbedError
    from cluster.outdir import prepare_out_dir as _prepare_out_dir
    from virnucpro.options import EmbedOptions

    _to_legacy(out)
    loc = OutputLocation.parse(out)
    with pytest.raises(EmbedError, match=r"holds the output of a previous run; use --resume .* or --overwrite"):
        _prepare_out_dir(loc, EmbedOptions())
    (out / f".{LEGACY_MANIFEST}.0123456789ab.tmp").write_bytes(b"cut short")
    _prepare_out_dir(loc, EmbedOptions(resume=True))  # kept for _open_manifest: Manifest.load finds it
    assert sorted(p.name for p in out.iterdir()) == [LEGACY_MANIFEST] + [f"part-{b:06d}.parquet" for b in range(3)]
    _prepare_out_dir(loc, EmbedOptions(overwrite=True))
    assert list(out.iterdir()) == []


# --- the driver's completion: the manifest carries the parts' schema, no temporaries stay ---------------

def test_completion_leaves_only_parts_and_a_manifest_of_their_schema(tmp_path):
    from cluster.outdir import complete as _complete

    out = tmp_path / "out"
    manifest = _write_run(out, complete=False)
    manifest.dim = 3  # a manifest whose guess of the schema is wrong: the parts' own schema wins
    manifest.save(out)
    (out / ".part-000001.parquet.0123456789ab.tmp").write_bytes(b"an actor killed while it wrote")
    _complete(OutputLocation.parse(out), Manifest.load(out), 9, 3)
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST] + [f"part-{b:06d}.parquet" for b in range(3)]
    assert Manifest.load(out).complete
    assert Manifest.load(out).schema == pq.read_schema(out / "part-000000.parquet").remove_metadata()
    for reader in ("polars.read_parquet", "duckdb *.parquet"):
        _check(*READERS[reader](out), by_index=False)
