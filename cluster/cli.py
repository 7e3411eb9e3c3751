"""`virnucpro` command line: embed, preprocess, predict, train, plot (docs/design.md, "Command-line contract").

Options come from the dataclasses in `virnucpro.options`, where each is defined once with its help,
choices and bounds; `virnucpro COMMAND --help` lists them. Only the standard library is imported
before the arguments are parsed, so `--help` answers at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import functools
import logging
import os
import re
import sys
import time
import traceback
from pathlib import Path

from virnucpro.errors import VirNucProError
from virnucpro.options import (PIPELINE_EMBED_OPTIONS, EmbedOptions, OptionError, PredictOptions, TrainOptions,
                               add_arguments, from_args)

from .session import RaySession, local_dashboard

log = logging.getLogger("virnucpro")

MODEL_HELP = ("a fair-esm checkpoint name (esm2_t36_3B_UR50D, from the torch hub cache) or .pt path; a Hugging "
              "Face id (zhihan1996/DNABERT-S, from the HF cache) or a model directory")


def create_parser() -> argparse.ArgumentParser:
    # allow_abbrev=False: `--num-actor 2` is a typo to report, not `--num-actors 2` to guess
    parser = argparse.ArgumentParser(prog="virnucpro", description=__doc__.split("\n")[0], allow_abbrev=False)
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser = functools.partial(sub.add_parser, allow_abbrev=False)  # every subcommand, too

    p = sub.add_parser("embed", help="embed every sequence of a FASTA file into Parquet",
                       description="Embed every sequence of a FASTA file (plain or gzip, a path or a URI) with "
                                   "ESM-2 or DNABERT-S on Ray actors (one per GPU, or one on CPU), or with a "
                                   "running service (--service), into Parquet parts and a manifest in OUT_DIR "
                                   "(a path or a URI). Columns: id, index, length, truncated, model, embedding "
                                   "(the mean of the last layer); --repr-layers and --include add more. An "
                                   "interrupted run finishes with --resume.")
    p.add_argument("input", help="FASTA file, plain or gzip: a local path or a URI (s3://bucket/in.fasta.gz, gs://...)")
    p.add_argument("-o", "--out-dir", required=True,
                   help="output directory: a local path or a URI (s3://bucket/run, gs://..., file:///...)")
    p.add_argument("--model", help=MODEL_HELP + " (not with --service: the service's model)")
    add_arguments(p.add_argument_group("compute"), EmbedOptions)

    p = sub.add_parser("serve", help="a long-lived embedding service: models stay loaded between jobs",
                       description="Start, list or stop embedding services on the Ray cluster (RAY_ADDRESS, "
                                   "--address, or the Ray on this machine; `serve start` starts one if none "
                                   "runs). Jobs use a service with `virnucpro embed --service NAME`; HTTP "
                                   "clients POST to http://HOST:PORT/NAME with the cluster's token.")
    verbs = p.add_subparsers(dest="verb", required=True)
    v = verbs.add_parser("start", help="load MODEL on N replicas and keep it loaded")
    v.add_argument("--model", required=True, help=MODEL_HELP)
    v.add_argument("--name", default="virnucpro", help="service name (default: %(default)s)")
    v.add_argument("--replicas", type=int, default=None, help="model replicas, a fixed number (default: 1)")
    v.add_argument("--min-replicas", type=int, default=None, metavar="A",
                   help="autoscale: at least A model replicas (0: none while idle; the first request after "
                        "waits for one to load). Default 1 when --max-replicas is given")
    v.add_argument("--max-replicas", type=int, default=None, metavar="B",
                   help="autoscale: at most B model replicas, added while their queues are long "
                        "(default: --min-replicas, or 1)")
    v.add_argument("--upscale-delay", type=float, default=30.0, metavar="S",
                   help="autoscale: seconds of long queues before a replica is added (default: %(default)s)")
    v.add_argument("--downscale-delay", type=float, default=600.0, metavar="S",
                   help="autoscale: seconds of short queues before a replica is removed (default: %(default)s)")
    v.add_argument("--request-timeout", type=float, default=300.0, metavar="S",
                   help="an HTTP request not answered within S seconds gets 503 with Retry-After "
                        "(default: %(default)s)")
    v.add_argument("--gpus-per-replica", type=float, default=None,
                   help="Ray GPU resource of each replica (default 1 on a GPU cluster, 0 on CPU; 0.5 shares a GPU)")
    v.add_argument("--http-host", default="127.0.0.1", help="where Serve's HTTP proxy listens (default: "
                   "%(default)s, this machine only)")
    v.add_argument("--http-port", type=int, default=8000,
                   help="port of Serve's HTTP proxy, shared by every service of the cluster (default: %(default)s)")
    add_arguments(v.add_argument_group("model"), EmbedOptions,
                  only=("device", "dtype", "toks_per_batch", "truncation_seq_length", "cuda_streams",
                        "attention", "compile", "pin_memory", "expandable_segments", "dashboard_host", "verbose"))
    v.add_argument("--address", default=None,
                   help="Ray cluster address (default: RAY_ADDRESS, else the Ray running on this machine, else "
                        "a Ray started here with `ray start --head`, which stays up after this command)")
    for verb, text in (("status", "list the services and their replicas"), ("stop", "stop a service")):
        v = verbs.add_parser(verb, help=text)
        v.add_argument("--name", default=None if verb == "status" else "virnucpro",
                       help="service name" + ("" if verb == "status" else " (default: %(default)s)"))
        v.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, or the Ray running on this machine)")
        v.add_argument("--verbose", "-v", action="store_true")

    p = sub.add_parser("preprocess", help="VirNucPro chunking and six-frame translation")
    p.add_argument("input", help="nucleotide FASTA (contigs or reads), plain or gzip: a local path or a URI (s3://...)")
    p.add_argument("-o", "--out-dir", type=Path, required=True)
    add_arguments(p, PredictOptions, only=("chunk_size", "chunking", "workers"), required=("chunk_size",))
    p.add_argument("--verbose", "-v", action="store_true")

    p = sub.add_parser("predict", help="VirNucPro prediction: preprocess, embed (DNABERT-S + ESM-2), classify",
                       description="Chunk and translate INPUT as upstream VirNucPro does, embed the kept frames "
                                   "with DNABERT-S and ESM-2 in one Ray session, classify them, and write "
                                   "prediction_results.txt, prediction_results_highestscore.csv (upstream's "
                                   "formats), predictions.parquet and contig_predictions.tsv in OUT_DIR.")
    p.add_argument("input", help="nucleotide FASTA (contigs or reads), plain or gzip: a local path or a URI (s3://...)")
    p.add_argument("-o", "--out-dir", type=Path, required=True)
    p.add_argument("--classifier", type=Path, required=True,
                   help="upstream's 300_model.pth / 500_model.pth, a state dict of the same MLP, or the "
                        "classifier.safetensors that `virnucpro train` writes")
    _add_models(p)
    add_arguments(p, PredictOptions, required=("chunk_size",))
    add_arguments(p.add_argument_group("compute"), EmbedOptions, only=PIPELINE_EMBED_OPTIONS)

    p = sub.add_parser("train", help="train a VirNucPro classifier on viral and non-viral sequences",
                       description="Preprocess and embed --virus and --others as predict does (kept in OUT_DIR/virus "
                                   "and OUT_DIR/others), train upstream VirNucPro's MLP on the frames (90/10 random "
                                   "split, SGD, early stopping), and write classifier.safetensors (predict "
                                   "--classifier loads it), classifier.json and metrics.json in OUT_DIR.")
    p.add_argument("--virus", required=True, help="viral sequences (nucleotide FASTA, a path or URI), label virus")
    p.add_argument("--others", required=True, help="non-viral sequences (nucleotide FASTA, a path or URI), label others")
    p.add_argument("-o", "--out-dir", type=Path, required=True)
    _add_models(p)
    add_arguments(p, PredictOptions, only=("chunk_size", "chunking", "workers"), required=("chunk_size",))
    add_arguments(p.add_argument_group("training"), TrainOptions)
    add_arguments(p.add_argument_group("compute"), EmbedOptions, only=PIPELINE_EMBED_OPTIONS)

    p = sub.add_parser("plot", help="draw prediction.png and contig_scores.png of a predict run (needs matplotlib)",
                       description="Redraw the figures of a `virnucpro predict` run in OUT_DIR: prediction.png "
                                   "(upstream VirNucPro's view: each chunk's winning score along the contig, "
                                   "virus red, others dark blue) and contig_scores.png (histogram of the contig "
                                   "scores). Needs matplotlib: pip install matplotlib.")
    p.add_argument("out_dir", type=Path, metavar="OUT_DIR", help="the output directory of `virnucpro predict`")
    p.add_argument("--contigs", nargs="+", metavar="ID", help="contigs to draw in prediction.png, in this order "
                   "(default: the first --max-contigs with a classified chunk)")
    p.add_argument("--max-contigs", type=int, default=5, metavar="N", help="(default: %(default)s)")
    p.add_argument("--threshold", type=float, default=0.5, metavar="X",
                   help="the line drawn on contig_scores.png: the run's predict --threshold (default: %(default)s)")
    p.add_argument("--verbose", "-v", action="store_true")
    return parser


def _add_models(p: argparse.ArgumentParser) -> None:
    """predict's and train's two models, each a model or a running service."""
    p.add_argument("--esm-model", help="ESM-2 model (default: esm2_t36_3B_UR50D, or --esm-service's)")
    p.add_argument("--dnabert-model", help="DNABERT-S model (default: zhihan1996/DNABERT-S, or --dnabert-service's)")
    for flag, model in (("--esm-service", "ESM-2"), ("--dnabert-service", "DNABERT-S")):
        p.add_argument(flag, metavar="NAME", help=f"embed with the running service NAME (virnucpro serve start) "
                                                  f"instead of starting {model} actors; its model is used")


def run(args: argparse.Namespace, actor_class: type | None = None) -> str:
    """Run the parsed command; returns its one-line summary."""
    if args.command == "serve":
        return _serve(args)
    if args.command == "embed":
        from .checks import check_embed
        from .progress import Timeline, process_start_time

        opts = from_args(EmbedOptions, args)
        timeline = Timeline(process_start_time())
        check_embed(args.input, args.out_dir, args.model, opts)  # before Ray: a mistake costs a second
        # Ray starts while the driver imports torch and checks the model (a job through a service: neither)
        session = _STARTING.session = RaySession(opts.address, opts.dashboard_host,
                                                 local_dashboard(opts.dashboard, args.input),
                                                 on_ready=lambda: timeline.mark("ray_up"))
        from .driver import run_embed

        return run_embed(args.input, args.out_dir, args.model, opts, actor_class, timeline, session).summary()
    if args.command == "preprocess":
        from virnucpro.pipeline.preprocess import default_workers, preprocess_fasta
        from virnucpro.io.fasta import check_fasta

        opts = from_args(PredictOptions, args)
        check_fasta(args.input)
        workers = opts.workers or default_workers(args.input)
        start = time.perf_counter()
        res = preprocess_fasta(args.input, args.out_dir, opts.chunk_size, opts.chunking, workers)
        return f"{res.summary()} ({time.perf_counter() - start:.1f} s, {workers} worker(s))"
    if args.command == "plot":
        from virnucpro.pipeline.plot import draw_figures

        if args.max_contigs < 1:
            raise OptionError(f"--max-contigs {args.max_contigs}: must be at least 1")
        threshold = PredictOptions(threshold=args.threshold).threshold  # OptionError when out of [0, 1]
        return draw_figures(args.out_dir, args.contigs, args.max_contigs, threshold).summary()
    if args.command in ("predict", "train"):  # the inputs, before torch and Ray are imported
        from virnucpro.io.fasta import check_fasta

        for where in (args.input,) if args.command == "predict" else (args.virus, args.others):
            check_fasta(where)
    if args.command == "train":
        from .training import train

        popts, topts, eopts = (from_args(c, args) for c in (PredictOptions, TrainOptions, EmbedOptions))
        embed_options = {k: v for k, v in _fields(eopts).items() if hasattr(args, k)}
        return train(args.virus, args.others, args.out_dir, args.esm_model, args.dnabert_model,
                     chunk_size=popts.chunk_size, chunking=popts.chunking, workers=popts.workers,
                     esm_service=args.esm_service, dnabert_service=args.dnabert_service,
                     **_fields(topts), **embed_options).summary()
    from .pipeline import predict

    popts, eopts = from_args(PredictOptions, args), from_args(EmbedOptions, args)
    embed_options = {k: v for k, v in _fields(eopts).items() if hasattr(args, k)}  # predict's parser has no output columns
    return predict(args.input, args.out_dir, args.classifier, args.esm_model, args.dnabert_model,
                   esm_service=args.esm_service, dnabert_service=args.dnabert_service,
                   **_fields(popts), **embed_options).summary()


def _serve(args: argparse.Namespace) -> str:
    from .service import connect, service_status, start_service, stop_service

    if args.verb == "start":
        from virnucpro.models import check_model, resolve_model

        opts = from_args(EmbedOptions, args)
        scaling, limits = _scaling(args), _limits(args)
        check_model(resolve_model(args.model))  # before a Ray head is started for it, which outlives the command
        connect(opts.address, start_if_missing=True, dashboard_host=opts.dashboard_host)
        s = start_service(args.model, args.name, args.replicas or 1, args.gpus_per_replica, opts, args.http_host,
                          args.http_port, scaling=scaling, limits=limits)
        size = (f"{scaling.min_replicas}-{scaling.max_replicas} replicas (autoscaling; running: {s['replicas']})"
                if scaling else f"{s['replicas']} replica(s)")
        return (f"service '{s['name']}' {s['status']}: {s['model']} on {size}; jobs: virnucpro embed IN -o OUT "
                f"--service {s['name']}; HTTP: http://{args.http_host}:{args.http_port}{s['route']}")
    connect(args.address)
    if args.verb == "stop":
        stop_service(args.name)
        return f"service '{args.name}' stopped"
    rows = service_status(args.name)
    return "\n".join(f"{s['name']}\t{s['status']}\t{s['model']}\treplicas {s['replicas']}\t{s['route']}"
                     for s in rows) or "no virnucpro service is running"


def _scaling(args: argparse.Namespace):
    """`serve start`'s autoscaling bounds (a `Scaling`), or None for a fixed number of replicas."""
    if args.min_replicas is None and args.max_replicas is None:
        if args.replicas is not None and args.replicas < 1:
            raise OptionError(f"--replicas {args.replicas}: must be at least 1")
        return None
    if args.replicas is not None:
        raise OptionError("give --replicas N (a fixed number) or --min-replicas/--max-replicas (autoscaling), not both")
    from .service import Scaling

    low = 1 if args.min_replicas is None else args.min_replicas
    high = max(low, 1) if args.max_replicas is None else args.max_replicas
    if args.upscale_delay < 0 or args.downscale_delay < 0:
        raise OptionError("--upscale-delay and --downscale-delay: seconds, at least 0")
    try:
        return Scaling(low, high, args.upscale_delay, args.downscale_delay)
    except ValueError as e:
        raise OptionError(str(e)) from None


def _limits(args: argparse.Namespace):
    if not args.request_timeout > 0:
        raise OptionError(f"--request-timeout {args.request_timeout}: seconds, more than 0")
    from actors.ingress import Limits

    return Limits(request_timeout_s=args.request_timeout)


def _fields(opts) -> dict:
    return {f.name: getattr(opts, f.name) for f in dataclasses.fields(opts)}


class _STARTING:
    """The command's Ray session, if it started one: a command that fails while Ray is still starting
    exits at once instead of waiting for it (Ray's processes end with this one)."""

    session = None


def main(argv: list[str] | None = None, *, actor_class: type | None = None) -> int:
    """`actor_class`: an `actors.embedder.Embedder` subclass for `embed` (tests inject faults with it)."""
    # a Ray call after the command's own Ray is shut down (a thread still ending) must not start another
    os.environ.setdefault("RAY_ENABLE_AUTO_CONNECT", "0")
    args = create_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    _STARTING.session = None
    try:
        print(run(args, actor_class))
        return 0
    except OptionError as e:
        code = _report(f"virnucpro {args.command}: error: {e}", 2)
    except Exception as e:  # noqa: BLE001 - sorted below: a user's error gets one line, a bug its traceback
        if not _user_error(e):
            traceback.print_exc()
            code = _report(f"virnucpro: this is a bug in VirNucPro {_version()} ({type(e).__name__} in "
                           f"`virnucpro {args.command}`), not something you did: please report it with the traceback "
                           f"above", 1)
        else:
            if args.verbose:  # --verbose keeps the traceback for bug reports
                log.exception("failed")
            text = re.sub(r"\s*\n\s*", " ", str(e).strip()) or type(e).__name__  # one line, whatever raised
            code = _report(f"virnucpro: error: {text}", 1)
    except KeyboardInterrupt:
        resumable = args.command in ("embed", "predict", "train")
        code = _report("virnucpro: interrupted" + ("; rerun with --resume to finish" if resumable else ""), 130)
    session = _STARTING.session
    if session is not None and not session.future.done():
        if argv is None:  # the command: Ray is still starting in a thread, its processes end with this one
            os._exit(code)
        session.close()  # a call from Python (the tests): the process goes on, so Ray is stopped properly
    return code


def _report(line: str, code: int) -> int:
    print(line, file=sys.stderr, flush=True)
    sys.stdout.flush()
    return code


def _version() -> str:
    from virnucpro import __version__

    return __version__


# what the machine or its storage says, not the code: a missing or unreadable file, a full disk, a quota
_ENVIRONMENT = {errno.ENOENT, errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EISDIR,
                errno.ENOTDIR, errno.EEXIST, errno.ENAMETOOLONG, errno.EIO}


def _user_error(e: Exception) -> bool:
    """Whether the message tells the user what to fix: VirNucPro's own errors (`VirNucProError`: input,
    options, model, classifier, a run that cannot finish, the cluster), and what the machine says of a
    file (not found, no permission, no space). Anything else is a bug, and keeps its traceback."""
    return isinstance(e, VirNucProError) or (isinstance(e, OSError) and e.errno in _ENVIRONMENT)


if __name__ == "__main__":
    sys.exit(main())
