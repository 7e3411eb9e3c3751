"""Where an actor's compile of its layers goes (bench_e2e and bench_startup time it whole).

    python bench/probe_compile.py --out bench/results/probe-compile-<gpu>.json [--model dnabert_s]

Each variant runs in a fresh process, as an actor does, with random weights of the real shape on the
GPU in bf16, and times: importing torch._dynamo and torch._inductor, then `compiled_layers()` and the
actor's two warm-up shapes (what `Embedder._compile_in_background` runs), and dynamo's own breakdown.
  cold          an empty compile cache (TORCHINDUCTOR_CACHE_DIR, TRITON_CACHE_DIR)
  warm          the cache the cold run left
  warm_1thread  the same, compiling in this process only (TORCHINDUCTOR_COMPILE_THREADS=1: no pool of
                compile workers to start)
  warm_beside   the same as warm, while the main thread runs eager batches (as an actor does)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def variant(model_name: str, beside: bool) -> dict:
    t0 = time.perf_counter()
    import numpy as np
    import torch

    from bench.bench_models import random_dnabert_s, random_esm2
    from virnucpro.kernels.attention import Packing

    out = {"import_torch": time.perf_counter() - t0}
    model = random_dnabert_s(torch.bfloat16) if model_name == "dnabert_s" else random_esm2(model_name)

    @torch.inference_mode()
    def run(seq_tokens, layers=None):
        lens = torch.tensor(seq_tokens, device="cuda")
        tokens = torch.randint(5, 20, (int(seq_tokens.sum()),), device="cuda")
        model.embed(tokens, Packing.from_lengths(lens, int(seq_tokens.max())), layers)

    run(np.full(100, 120))  # the eager path's first use (kernels loaded) is not the compile's
    torch.cuda.synchronize()
    done, eager_batches = threading.Event(), 0

    def compile_layers():
        sys.setswitchinterval(1e-4)  # as the actor does while it compiles
        t = time.perf_counter()
        import torch._dynamo  # noqa: F401
        out["import_dynamo"] = time.perf_counter() - t
        t = time.perf_counter()
        import torch._inductor.compile_fx  # noqa: F401
        out["import_inductor"] = time.perf_counter() - t
        t = time.perf_counter()
        layers = model.compiled_layers()
        with torch.cuda.stream(torch.cuda.Stream()):
            for lengths in ([9, 6, 4], [7]):
                run(np.array(lengths), layers)
        torch.cuda.synchronize()
        out["compile"] = time.perf_counter() - t
        done.set()

    t = time.perf_counter()
    thread = threading.Thread(target=compile_layers)
    thread.start()
    while beside and not done.is_set():
        run(np.full(2000, 120))
        torch.cuda.synchronize()
        eager_batches += 1
    thread.join()
    out["total"] = time.perf_counter() - t
    out["eager_batches_beside"] = eager_batches

    from torch._dynamo.utils import compilation_time_metrics, counters
    out["dynamo_seconds"] = dict(sorted(((k, round(sum(v), 3)) for k, v in compilation_time_metrics.items()),
                                        key=lambda kv: -kv[1])[:12])
    out["counters"] = {"stats": dict(counters["stats"]), "inductor": dict(counters["inductor"]),
                       "graph_breaks": len(counters["graph_break"])}
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path)
    ap.add_argument("--model", default="dnabert_s", choices=["dnabert_s", "esm2_650M"])
    ap.add_argument("--variant", help=argparse.SUPPRESS)  # a child process: run one variant, print JSON
    args = ap.parse_args()
    if args.variant:
        print("RESULT " + json.dumps(variant(args.model, args.variant.endswith("beside"))), flush=True)
        return
    cache = Path(tempfile.mkdtemp())
    result = {"model": args.model, "date": time.strftime("%Y-%m-%d"), "variants": {}}
    for name, env in (("cold", {}), ("warm", {}), ("warm_1thread", {"TORCHINDUCTOR_COMPILE_THREADS": "1"}),
                      ("warm_beside", {})):
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache / "inductor"),
               "TRITON_CACHE_DIR": str(cache / "triton"), **env}
        t = time.perf_counter()
        proc = subprocess.run([sys.executable, __file__, "--model", args.model, "--variant", name], env=env,
                              capture_output=True, text=True)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            raise RuntimeError(proc.stderr[-3000:])
        result["variants"][name] = {**json.loads(line[7:]), "process": round(time.perf_counter() - t, 2)}
        print(name, json.dumps(result["variants"][name]), flush=True)
    import torch
    result.update(gpu=torch.cuda.get_device_name(), torch=torch.__version__)
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
