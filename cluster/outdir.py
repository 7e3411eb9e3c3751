"""A run's output directory: made ready (refusing another run's output, or replacing it), the manifest of
the run being resumed, the batches already done, and the last step that marks it complete.

OUT_DIR holds part files named by batch, `_manifest.parquet`, and while the run is incomplete `.work/`
(the saved plan, a gzip input's plain copy, a table's FASTA): see virnucpro.io.output.
"""

from __future__ import annotations

import time

import numpy as np
import pyarrow.parquet as pq

from virnucpro.batching import BatchPlan
from virnucpro.errors import EmbedError
from virnucpro.io.output import (LEGACY_MANIFEST, MANIFEST, PART_NAME, PREVIOUS_RUN, WRITE_TEST, Manifest, OutputLocation,
                                 is_cut_short, part_name, part_schema)
from virnucpro.io.storage import Location
from virnucpro.options import EmbedOptions

from .checks import holds_run

WORK_DIR = ".work"  # OUT_DIR/.work: the saved plan and a gzip input's plain copy, until the run is complete


def file_in(where: Location, name: str) -> str:
    return str(where.local_path / name) if where.local_path is not None else f"{where.uri.rstrip('/')}/{name}"


def prepare_out_dir(out: OutputLocation, opts: EmbedOptions) -> None:
    try:
        out.make_dirs()
        out.write_atomic(WRITE_TEST, lambda f: f.write(b""))
        out.delete(WRITE_TEST)
        files = out.list_files()
    except Exception as e:  # noqa: BLE001 - OSError locally, pyarrow / fsspec errors elsewhere
        raise EmbedError(f"{out}: output directory is not writable ({getattr(e, 'strerror', None) or e})") from None
    parts = [name for name in files if PART_NAME.fullmatch(name)]
    previous = holds_run(out, files)
    if opts.resume or opts.overwrite:  # temporaries of writes a killed run left behind
        remove_temporaries(out, files)
    if previous and opts.overwrite:
        for name in parts:
            out.delete(name)
        out.delete(MANIFEST)
        out.delete(LEGACY_MANIFEST)
        out.child(WORK_DIR).delete_tree()
    elif previous and not opts.resume:
        raise EmbedError(f"{out}: {PREVIOUS_RUN}")


def remove_temporaries(out: OutputLocation, files: dict[str, int]) -> None:
    """Delete what writes cut short left (an actor killed while it wrote a part): nothing else."""
    for name in files:
        if is_cut_short(name):
            out.delete(name)


def resumable_manifest(out: OutputLocation, fingerprint: str) -> Manifest | None:
    """The manifest of the run `--resume` finishes, if it is this run (same model, input, options)."""
    old = Manifest.load(out)
    if old is None:
        return None
    if old.fingerprint != fingerprint:
        raise EmbedError(f"{out}: holds a different run (model, input or batching options differ: "
                         f"{old.model} on {old.input}); use --overwrite to replace it")
    return old


def finished_batches(out: OutputLocation, manifest: Manifest, plan: BatchPlan) -> np.ndarray:
    """Batches that need no recomputation (a bool mask): marked done in the manifest and present, or
    present and whole but not yet marked (the driver died between an actor's write and its own
    manifest update). One directory listing; only unmarked parts are opened."""
    files = out.list_files()
    present = np.zeros(len(plan), bool)
    for name in files:
        m = PART_NAME.fullmatch(name)
        if m and int(m.group(1)) < len(plan):
            present[int(m.group(1))] = True
    manifest.done &= present  # marked done, but the part is gone: computed again
    manifest.rows_done = int(np.diff(plan.bounds)[manifest.done].sum())
    for b in np.flatnonzero(present & ~manifest.done).tolist():
        name = part_name(b)
        try:
            rows = pq.read_metadata(out.join(name), filesystem=out.fs).num_rows
        except Exception:  # noqa: BLE001 - a damaged file is recomputed
            rows = -1
        if rows == plan.rows(b):
            manifest.mark_done(b, rows)
    return manifest.done.copy()


def complete(out: OutputLocation, manifest: Manifest, num_sequences: int, num_batches: int) -> None:
    """Mark the run complete, after counting every input sequence in the finished parts."""
    if manifest.rows_done != num_sequences or manifest.batches_done != num_batches:
        manifest.save(out)
        raise EmbedError(f"{out}: {manifest.rows_done} rows in {manifest.batches_done} parts, expected "
                         f"{num_sequences} rows in {num_batches} parts; the run is not complete")
    remove_temporaries(out, out.list_files())  # a reader of OUT_DIR by its path sees parts alone
    if manifest.batches_done:  # the manifest's schema is the parts' (see Manifest), as they were written
        manifest.schema = part_schema(out, manifest.part_names()[0])
    manifest.complete, manifest.finished = True, time.time()
    manifest.save(out)


__all__ = ["WORK_DIR", "file_in", "prepare_out_dir", "remove_temporaries", "resumable_manifest", "finished_batches",
           "complete"]
