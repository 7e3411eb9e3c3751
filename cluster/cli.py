"""`virnucpro` command line: embed, preprocess, predict (docs/design.md, "Command-line contract").

Options come from the dataclasses in `virnucpro.options`, where each is defined once with its help,
choices and bounds; `virnucpro COMMAND --help` lists them. Only the standard library is imported
before the arguments are parsed, so `--help` answers at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import re
import sys
import time
from pathlib import Path

from virnucpro.options import EmbedOptions, OptionError, PredictOptions, add_arguments, from_args

from .session import start_ray

log = logging.getLogger("virnucpro")

MODEL_HELP = ("a fair-esm checkpoint name (esm2_t36_3B_UR50D, from the torch hub cache) or .pt path; a Hugging "
              "Face id (zhihan1996/DNABERT-S, from the HF cache) or a model directory")


def create_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="virnucpro", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("embed", help="embed every sequence of a FASTA file into Parquet")
    p.add_argument("input", type=Path, help="FASTA file, plain or gzip")
    p.add_argument("-o", "--out-dir", required=True,
                   help="output directory: a local path or a URI (s3://bucket/run, gs://..., file:///...)")
    p.add_argument("--model", required=True, help=MODEL_HELP)
    add_arguments(p.add_argument_group("compute"), EmbedOptions)

    p = sub.add_parser("preprocess", help="VirNucPro chunking and six-frame translation")
    p.add_argument("input", type=Path, help="nucleotide FASTA (contigs or reads), plain or gzip")
    p.add_argument("-o", "--out-dir", type=Path, required=True)
    add_arguments(p, PredictOptions, only=("chunk_size", "chunking", "workers"), required=("chunk_size",))
    p.add_argument("--verbose", "-v", action="store_true")

    p = sub.add_parser("predict", help="VirNucPro prediction: preprocess, embed (DNABERT-S + ESM-2), classify",
                       description="Chunk and translate INPUT as upstream VirNucPro does, embed the kept frames "
                                   "with DNABERT-S and ESM-2 in one Ray session, classify them, and write "
                                   "prediction_results.txt, prediction_results_highestscore.csv (upstream's "
                                   "formats), predictions.parquet and contig_predictions.tsv in OUT_DIR.")
    p.add_argument("input", type=Path, help="nucleotide FASTA (contigs or reads), plain or gzip")
    p.add_argument("-o", "--out-dir", type=Path, required=True)
    p.add_argument("--classifier", type=Path, required=True,
                   help="upstream's 300_model.pth / 500_model.pth, or a state dict of the same MLP")
    p.add_argument("--esm-model", default="esm2_t36_3B_UR50D", help="ESM-2 model (default: %(default)s)")
    p.add_argument("--dnabert-model", default="zhihan1996/DNABERT-S", help="DNABERT-S model (default: %(default)s)")
    add_arguments(p, PredictOptions, required=("chunk_size",))
    add_arguments(p.add_argument_group("compute"), EmbedOptions)
    return parser


def run(args: argparse.Namespace, actor_class: type | None = None) -> str:
    """Run the parsed command; returns its one-line summary."""
    if args.command == "embed":
        opts = from_args(EmbedOptions, args)
        ray_up = start_ray(opts.address, opts.dashboard_host)  # starts while the driver imports torch
        from .driver import run_embed
        from .progress import Timeline, process_start_time

        return run_embed(args.input, args.out_dir, args.model, opts, actor_class or _embedder(),
                         Timeline(process_start_time()), ray_up).summary()
    if args.command == "preprocess":
        from virnucpro.preprocess import default_workers, preprocess_fasta

        opts = from_args(PredictOptions, args)
        workers = opts.workers or default_workers(args.input)
        start = time.perf_counter()
        res = preprocess_fasta(args.input, args.out_dir, opts.chunk_size, opts.chunking, workers)
        return f"{res.summary()} ({time.perf_counter() - start:.1f} s, {workers} worker(s))"
    from .predict import predict

    popts, eopts = from_args(PredictOptions, args), from_args(EmbedOptions, args)
    return predict(args.input, args.out_dir, args.classifier, args.esm_model, args.dnabert_model,
                   **_fields(popts), **_fields(eopts)).summary()


def _embedder() -> type:
    from actors.embedder import Embedder

    return Embedder


def _fields(opts) -> dict:
    return {f.name: getattr(opts, f.name) for f in dataclasses.fields(opts)}


def main(argv: list[str] | None = None, *, actor_class: type | None = None) -> int:
    """`actor_class`: an `actors.embedder.Embedder` subclass for `embed` (tests inject faults with it)."""
    args = create_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        print(run(args, actor_class))
    except OptionError as e:
        print(f"virnucpro {args.command}: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - sorted below: a user's error gets one line, a bug its traceback
        if not _user_error(e):
            raise
        if args.verbose:  # --verbose keeps the traceback for bug reports
            log.exception("failed")
        text = re.sub(r"\s*\n\s*", " ", str(e).strip()) or type(e).__name__  # one line, whatever raised
        print(f"virnucpro: error: {text}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("virnucpro: interrupted; rerun with --resume to finish", file=sys.stderr)
        return 130
    return 0


def _user_error(e: Exception) -> bool:
    """Errors whose message tells the user what to fix: bad input, checkpoint or classifier, a run that
    cannot finish, an unwritable output."""
    return isinstance(e, (RuntimeError, OSError, ValueError))


if __name__ == "__main__":
    sys.exit(main())
