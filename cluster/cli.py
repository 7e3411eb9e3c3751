"""`virnucpro` command line: embed, preprocess, predict (DESIGN.md's command-line contract)."""

from __future__ import annotations

import argparse
import logging
import re
import sys
from pathlib import Path

log = logging.getLogger("virnucpro")


def _add_run_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("compute")
    g.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto",
                   help="where actors run (auto: GPUs when the Ray cluster has any)")
    g.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                   help="auto: bfloat16 on Ampere or newer GPUs, float16 on older ones, float32 on CPU")
    g.add_argument("--num-actors", type=int, default=None,
                   help="model replicas (default: one per visible GPU, or one on CPU)")
    g.add_argument("--gpus-per-actor", type=float, default=None,
                   help="Ray GPU resource each actor reserves (default 1 with --device cuda, 0 on CPU); "
                        "0.5 puts two actors of a small model on one GPU. Honoured with --device cpu too: "
                        "placement follows Ray resources alone")
    g.add_argument("--address", default=None,
                   help="Ray cluster address (default: RAY_ADDRESS if set, else start a local Ray)")
    g.add_argument("--dashboard-host", default="127.0.0.1",
                   help="where a local Ray started by this command serves its dashboard and job API "
                        "(default %(default)s: this machine only; 0.0.0.0 exposes it to the network, "
                        "token authentication stays on)")
    g.add_argument("--toks-per-batch", type=int, default=None,
                   help="token budget of a packed batch (default 65536 on GPU, 4096 on CPU)")
    g.add_argument("--truncation-seq-length", type=int, default=1022,
                   help="longest sequence embedded, in residues (ESM-2) or tokens (DNABERT-S); longer "
                        "ones are truncated and flagged in the 'truncated' column")
    g.add_argument("--dataloader-workers", type=int, default=None,
                   help="threads that read and tokenise batches ahead of the actors "
                        "(default min(cpu_count // num_gpus, 8))")
    g.add_argument("--pin-memory", action=argparse.BooleanOptionalAction, default=True,
                   help="page-locked host buffers for asynchronous host-to-GPU copies")
    g.add_argument("--expandable-segments", action="store_true",
                   help="set PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True in the actors before CUDA "
                        "starts: less fragmentation with varying batch shapes; helps most on GPUs with "
                        "little memory headroom (16-40 GB cards, or large models on any card)")
    g.add_argument("--cuda-streams", type=int, default=2,
                   help="concurrent batches per GPU actor, each on its own copy and compute streams")
    g.add_argument("--attention", choices=["auto", "sdpa", "flex"], default="auto",
                   help="auto: FlashAttention where the GPU supports it (ESM-2), SDPA with the ALiBi "
                        "bias for DNABERT-S; sdpa: force the PyTorch SDPA fallback; flex: FlexAttention "
                        "for DNABERT-S")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model layers (default: on for CUDA, off on CPU)")
    g.add_argument("--profile", metavar="DIR", default=None,
                   help="write torch profiler traces (CPU and CUDA) of each actor's first 3 batches to DIR "
                        "on the actor's node; open them in Perfetto or chrome://tracing")
    g.add_argument("--resume", action="store_true", help="finish a previous run in OUT_DIR")
    g.add_argument("--overwrite", action="store_true", help="replace a previous run in OUT_DIR")
    g.add_argument("--no-progress", dest="progress", action="store_false", default=None,
                   help="no progress line on the terminal")
    g.add_argument("--verbose", "-v", action="store_true", help="debug logging (streams, batches)")


def _run_kwargs(args: argparse.Namespace) -> dict:
    keys = ["device", "dtype", "num_actors", "gpus_per_actor", "address", "dashboard_host", "toks_per_batch",
            "truncation_seq_length", "dataloader_workers", "pin_memory", "expandable_segments",
            "cuda_streams", "attention", "compile", "profile", "resume", "overwrite", "progress", "verbose"]
    return {k: getattr(args, k) for k in keys}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="virnucpro", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("embed", help="embed every sequence of a FASTA file into Parquet")
    p.add_argument("input", type=Path, help="FASTA file, plain or gzip")
    p.add_argument("-o", "--out-dir", required=True,
                   help="output directory: a local path or a URI (s3://bucket/run, gs://..., file:///...)")
    p.add_argument("--model", required=True,
                   help="fair-esm checkpoint name or .pt path (ESM-2); HF id or directory (DNABERT-S)")
    _add_run_options(p)

    p = sub.add_parser("preprocess", help="VirNucPro chunking and six-frame translation")
    p.add_argument("input", type=Path)
    p.add_argument("-o", "--out-dir", type=Path, required=True)
    p.add_argument("--chunk-size", type=int, choices=[300, 500], required=True)
    p.add_argument("--chunking", choices=["compat", "even"], default="compat",
                   help="compat: upstream VirNucPro's split, quirks included; even: overlap spread evenly")
    p.add_argument("--workers", type=int, default=None,
                   help="processes for translation (default: 1 below ~64 Mbp of input, else one per CPU, "
                        "at most 8)")
    p.add_argument("--verbose", "-v", action="store_true")

    p = sub.add_parser("predict", help="VirNucPro prediction: preprocess, embed (DNABERT-S + ESM-2), classify",
                       description="Chunk and translate INPUT as upstream VirNucPro does, embed the kept frames "
                                   "with DNABERT-S and ESM-2 in one Ray session, classify them, and write "
                                   "prediction_results.txt, prediction_results_highestscore.csv (upstream's "
                                   "formats), predictions.parquet and contig_predictions.tsv in OUT_DIR.")
    p.add_argument("input", type=Path, help="nucleotide FASTA (contigs or reads), plain or gzip")
    p.add_argument("-o", "--out-dir", type=Path, required=True)
    p.add_argument("--chunk-size", type=int, choices=[300, 500], required=True,
                   help="chunk length the classifier was trained on (300_model.pth / 500_model.pth)")
    p.add_argument("--chunking", choices=["compat", "even"], default="compat",
                   help="compat: upstream VirNucPro's split, quirks included; even: overlap spread evenly")
    p.add_argument("--classifier", type=Path, required=True,
                   help="upstream's 300_model.pth / 500_model.pth, or a state dict of the same MLP")
    p.add_argument("--esm-model", default="esm2_t36_3B_UR50D", help="ESM-2 MODEL (default: %(default)s)")
    p.add_argument("--dnabert-model", default="zhihan1996/DNABERT-S", help="DNABERT-S MODEL (default: %(default)s)")
    p.add_argument("--threshold", type=float, default=0.5,
                   help="contig verdict: virus when the mean chunk virus score >= this (default %(default)s); "
                        "a chunk's score is its best frame's P(virus)")
    p.add_argument("--keep-embeddings", action="store_true",
                   help="keep OUT_DIR/embeddings/{dnabert_s,esm2} (Parquet) for reuse")
    p.add_argument("--workers", type=int, default=None, help="preprocessing processes (default: by input size)")
    _add_run_options(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    from virnucpro.classifier import ClassifierLoadError
    from virnucpro.models import CheckpointError
    from virnucpro.sequences import SequenceError

    try:
        if args.command == "embed":
            from .driver import embed
            result = embed(args.input, args.out_dir, args.model, **_run_kwargs(args))
            print(result.summary())
        elif args.command == "preprocess":
            import time
            from virnucpro.preprocess import default_workers, preprocess_fasta
            workers = args.workers or default_workers(args.input)
            start = time.perf_counter()
            res = preprocess_fasta(args.input, args.out_dir, args.chunk_size, args.chunking, workers)
            print(f"{res.summary()} ({time.perf_counter() - start:.1f} s, {workers} worker(s))")
        elif args.command == "predict":
            from .predict import predict
            result = predict(args.input, args.out_dir, args.classifier, args.esm_model, args.dnabert_model,
                             chunk_size=args.chunk_size, chunking=args.chunking, threshold=args.threshold,
                             keep_embeddings=args.keep_embeddings, workers=args.workers, **_run_kwargs(args))
            print(result.summary())
    except (SequenceError, CheckpointError, ClassifierLoadError, RuntimeError, OSError, ValueError) as e:
        # one line a user can act on, never a traceback; --verbose keeps the traceback for bug reports
        if args.verbose:
            log.exception("failed")
        text = re.sub(r"\s*\n\s*", " ", str(e).strip()) or type(e).__name__  # one line, whatever raised
        print(f"virnucpro: error: {text}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("virnucpro: interrupted; rerun with --resume to finish", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
