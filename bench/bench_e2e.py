"""End to end on one GPU: FASTA -> Ray actor -> Parquet, against the bare model on the same batches.

    python bench/bench_e2e.py --out bench/results/e2e-<gpu>.json [--model esm2_3B|esm2_650M|dnabert_s]

Writes a random-weight checkpoint of the real shape in the real format (fair-esm `.pt` in bf16, or a
DNABERT-S directory), a seeded FASTA (VirNucPro's protein lengths, or 300-520 bp DNA), then:
  1. bare model: our loaded model, compiled (and first uncompiled), on the planned batches pre-staged on
     the GPU (CUDA events);
  2. end to end: `cluster.embed(...)` through a local Ray with one GPU actor; its rate counts from the
     first batch dealt to the last Parquet part written (actor start-up and compilation excluded,
     reported separately).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_models import cuda_time  # noqa: E402
from virnucpro.kernels.attention import Packing  # noqa: E402
from virnucpro.batching import plan_batches  # noqa: E402
from virnucpro.models import load_model, load_tokenizer, resolve_model  # noqa: E402
from virnucpro.io.index import FastaIndex  # noqa: E402
from virnucpro.models.tiny import esm2_state_dict, write_dnabert_s_dir  # noqa: E402

SHAPES = {"esm2_3B": (36, 2560, 40), "esm2_650M": (33, 1280, 20),
          "esm2_8M": (6, 320, 20)}  # 8M: start-up on a CPU (bench_startup)


def write_inputs(model: str, n: int, work: Path) -> tuple[Path, Path]:
    rng = np.random.default_rng(0)
    fasta = work / "input.fasta"
    if model.startswith("esm2"):
        layers, d, heads = SHAPES[model]
        lengths = np.where(rng.random(n) < 0.7, 166, rng.integers(30, 166, n))
        letters = np.frombuffer(b"ACDEFGHIKLMNPQRSTVWY", np.uint8)
        import argparse as ap
        state = {k: v.to(torch.bfloat16) for k, v in esm2_state_dict(layers, d, seed=0).items()}
        cfg = ap.Namespace(encoder_layers=layers, encoder_embed_dim=d, encoder_attention_heads=heads,
                           token_dropout=True)
        ckpt = work / f"esm2_{model}.pt"
        torch.save({"model": state, "cfg": {"model": cfg}}, ckpt)
    else:
        lengths = rng.integers(300, 521, n)
        letters = np.frombuffer(b"ACGT", np.uint8)
        ckpt = write_dnabert_s_dir(work / "dnabert_s", hidden=768, layers=12, heads=12, intermediate=3072,
                                   vocab_size=4096, safetensors=True)
    with open(fasta, "wb") as f:
        for i, n_ in enumerate(lengths.tolist()):
            f.write(b">s%d\n" % i + rng.choice(letters, n_).tobytes() + b"\n")
    return fasta, ckpt


def bare_model(ckpt: Path, fasta: Path, toks: int, work: Path) -> dict:
    source = resolve_model(ckpt)
    tokenizer = load_tokenizer(source)
    index = FastaIndex.build(fasta, source.sequence_kind, work)
    records = index.read(np.arange(len(index)))
    tokens_all, seq_tokens, _ = tokenizer.encode([r.sequence for r in records])
    plan = plan_batches(seq_tokens.astype(np.int64), toks)
    starts = np.concatenate(([0], np.cumsum(seq_tokens)))
    staged = []
    for b in plan:
        toks_b = np.concatenate([tokens_all[starts[i]:starts[i + 1]] for i in b])
        lens = torch.from_numpy(seq_tokens[b]).cuda()
        staged.append((torch.from_numpy(toks_b).long().cuda(), Packing.from_lengths(lens, int(seq_tokens[b].max()))))
    model = load_model(source, "cuda", torch.bfloat16)
    layers = None

    def one_pass():
        with torch.inference_mode():
            for t, p in staged:
                model.embed(t, p, layers)
    # uncompiled first (DNABERT-S's fused elementwise kernels where they load), then compiled
    eager = cuda_time(one_pass, warmup=1, repeat=2)
    layers = model.compiled_layers()
    seconds = cuda_time(one_pass, warmup=1, repeat=2)
    out = {"tokens": int(seq_tokens.sum()), "sequences": len(index), "seconds": seconds,
           "tokens_per_s": int(seq_tokens.sum()) / seconds, "batches": len(plan),
           "uncompiled": {"seconds": eager, "tokens_per_s": int(seq_tokens.sum()) / eager,
                          "fused_elementwise": bool(getattr(model, "fused", False))}}
    model = staged = None  # free the GPU memory before the end-to-end run
    torch.cuda.empty_cache()
    return out


def end_to_end(ckpt: Path, fasta: Path, toks: int, work: Path, **options) -> dict:
    from cluster.driver import embed
    from virnucpro.io.output import Manifest

    start = time.perf_counter()
    result = embed(fasta, work / "out", ckpt, device="cuda", toks_per_batch=toks, progress=False, overwrite=True,
                   **options)
    wall = time.perf_counter() - start
    manifest = Manifest.load(work / "out")
    return {"toks_per_batch": manifest.toks_per_batch or toks, "options": options,
            "tokens": result.tokens_computed, "sequences": result.num_sequences,
            "seconds": result.compute_seconds, "tokens_per_s": result.tokens_per_second,
            "wall_seconds_including_startup": wall, "batches": result.num_batches,
            # where the actors' time went (summed over batches; concurrent batches overlap)
            "first_part_seconds": result.first_part_seconds, "forward_seconds_sum": result.forward_seconds,
            "write_seconds_sum": result.write_seconds, "actor": result.actors[0]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--model", default="esm2_3B", choices=[*SHAPES, "dnabert_s"])
    ap.add_argument("-n", type=int, default=20000)
    ap.add_argument("--toks-per-batch", type=int, default=None, help="default: the driver's for this model")
    ap.add_argument("--skip-bare", action="store_true", help="end to end only (e.g. the multi-GPU run)")
    ap.add_argument("--work", type=Path, default=None, help="reuse inputs written here by an earlier run")
    ap.add_argument("--cuda-streams", type=int, default=None)
    ap.add_argument("--no-compile", action="store_true", help="the actor's layers uncompiled (compile=False)")
    ap.add_argument("--profile", type=Path, default=None, help="actor profiler traces of its first batches here")
    args = ap.parse_args()
    options = {k: v for k, v in (("cuda_streams", args.cuda_streams), ("compile", False if args.no_compile else None),
                                 ("profile", str(args.profile) if args.profile else None)) if v is not None}
    work = args.work or Path(tempfile.mkdtemp())
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if (work / "input.fasta").is_file():
        fasta = work / "input.fasta"
        ckpt = next(work.glob("esm2_*.pt"), work / "dnabert_s")
    else:
        fasta, ckpt = write_inputs(args.model, args.n, work)
        print(f"inputs written in {time.perf_counter() - t0:.0f} s", flush=True)
    e2e = end_to_end(ckpt, fasta, args.toks_per_batch, work, **options)
    print(f"end to end on {torch.cuda.device_count()} GPU(s): {e2e['tokens_per_s'] / 1e3:.1f} K tokens/s over "
          f"{e2e['seconds']:.1f} s ({e2e['batches']} batches; first part after {e2e['first_part_seconds']:.2f} s; "
          f"actor forward {e2e['forward_seconds_sum']:.1f} s, Parquet {e2e['write_seconds_sum']:.1f} s summed), "
          f"wall incl. start-up {e2e['wall_seconds_including_startup']:.0f} s", flush=True)
    result = {"gpu": torch.cuda.get_device_name(), "gpus": torch.cuda.device_count(), "torch": torch.__version__,
              "host": platform.node(), "model": args.model, "toks_per_batch": args.toks_per_batch,
              "end_to_end": e2e, "date": time.strftime("%Y-%m-%d")}
    if not args.skip_bare:
        bare = bare_model(ckpt, fasta, e2e["toks_per_batch"], work)
        result["bare_model"], result["ratio"] = bare, e2e["tokens_per_s"] / bare["tokens_per_s"]
        print(f"{args.model}: bare {bare['tokens_per_s'] / 1e3:.1f} K tokens/s (uncompiled "
              f"{bare['uncompiled']['tokens_per_s'] / 1e3:.1f} K), end to end "
              f"{e2e['tokens_per_s'] / 1e3:.1f} K tokens/s ({100 * result['ratio']:.1f}%)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main()
