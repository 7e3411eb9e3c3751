"""What a run is refused for before Ray or torch starts: options that contradict each other, an input that
is not there or not FASTA, an output directory that holds another run, a model that is not there.

Each check costs milliseconds (a stat, a first block read, a directory listing), so a mistake costs the
user a second, not Ray's start-up, and leaves nothing behind. The checks that need torch (a checkpoint's
shapes, `--repr-layers` against its layers) are the driver's, made while Ray starts.
"""

from __future__ import annotations

from pathlib import Path

from virnucpro.models.registry import ModelSource, resolve_model
from virnucpro.options import EmbedOptions, OptionError
from virnucpro.io.output import MANIFEST, PART_NAME, PREVIOUS_RUN, Manifest, OutputLocation
from virnucpro.io.fasta import check_fasta
from virnucpro.io.storage import InputFile
from virnucpro.io.tables import TableInput, check_table, table_format

from .scheduling import EmbedError


class PreviousRun(EmbedError):
    """OUT_DIR holds another run's output, and neither --resume nor --overwrite was given."""


def check_embed(input: str | Path, out_dir: str | Path, model: str | None, opts: EmbedOptions
                ) -> tuple[InputFile, ModelSource | None]:
    """The input and the model of an `embed` run, once its options, input and output are found fit to run
    (OptionError, SequenceError, CheckpointError or PreviousRun otherwise). `model` None: the service's."""
    if model is not None and opts.service:
        raise OptionError("give --model or --service NAME, not both (a service embeds with its own model)")
    if model is None and not opts.service:
        raise OptionError("give --model MODEL, or --service NAME to use a running service's model")
    table = table_input(input, opts)
    source = check_table(str(input), table) if table else check_fasta(input)
    refuse_previous_run(out_dir, opts)
    return source, (resolve_model(model) if model is not None else None)


def table_input(input: str | Path, opts: EmbedOptions) -> TableInput | None:
    """The table options of a table input (.parquet, .csv, .tsv); None for FASTA, which takes none."""
    if table_format(str(input)) is not None:
        return TableInput(opts.id_column, opts.sequence_column, opts.keep_columns or ())
    if opts.keep_columns or (opts.id_column, opts.sequence_column) != ("id", "sequence"):
        raise OptionError(f"--id-column, --sequence-column and --keep-columns are for a table input (.parquet, "
                          f".csv, .tsv); {input} is read as FASTA")
    return None


def holds_run(out: OutputLocation, files: dict[str, int]) -> bool:
    """Whether OUT_DIR's files (`list_files()`) are a run worth keeping: parts, or a manifest of a run that
    finished batches. A manifest alone, of a run that wrote nothing (one refused by an actor at its first
    batch), protects nothing: a rerun replaces it."""
    if any(PART_NAME.fullmatch(f) for f in files):
        return True
    if MANIFEST in files or "_manifest.json" in files:
        manifest = Manifest.load(out)
        return manifest is None or manifest.complete or manifest.batches_done > 0
    return False


def refuse_previous_run(out_dir: str | Path, opts: EmbedOptions) -> None:
    """Refuse an OUT_DIR that holds a run, unless --resume or --overwrite says what to do with it. A local
    directory only: listing a bucket can take seconds, better spent beside Ray's start (the driver checks
    it there)."""
    if opts.resume or opts.overwrite or "://" in str(out_dir):
        return
    try:
        out = OutputLocation.parse(out_dir)
        previous = holds_run(out, out.list_files())
    except Exception:  # noqa: BLE001 - an unreachable or odd location: the driver's full check reports it
        return
    if previous:
        raise PreviousRun(f"{out}: {PREVIOUS_RUN}")


__all__ = ["check_embed", "table_input", "holds_run", "refuse_previous_run", "PreviousRun"]
