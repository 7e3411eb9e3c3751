"""Where an actor's start-up goes, measured piece by piece (bench_startup.py measures the whole).

    python bench/probe_startup.py --out bench/results/probe-startup-<gpu>.json

1. `ray.init()` alone in a fresh process, twice, and without the dashboard.
2. ESM-2 3B (random weights, built on the GPU in bf16): the eager forward of a 65,536-token batch, alone,
   and while another thread compiles the layers (`compiled_layers()` + the actor's two warm-up shapes),
   under Python's default GIL switch interval (5 ms) and a short one (0.1 ms). Each variant runs in a
   fresh process, so each compiles from the same on-disk cache state.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def ray_init_seconds() -> dict:
    out = {}
    for name, kwargs in (("first", ""), ("second", ""), ("no_dashboard", "include_dashboard=False")):
        code = (f"import time; t=time.time(); import ray; i=time.time(); ray.init(logging_level='ERROR', {kwargs}); "
                "u=time.time(); ray.shutdown(); print(round(i-t,2), round(u-i,2))")
        t = time.time()
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        imp, init = map(float, p.stdout.split())
        out[name] = {"import": imp, "init": init, "process": round(time.time() - t, 2)}
        print("ray", name, out[name], flush=True)
    return out


def forward_variant(switch: float | None, compile_beside: bool) -> dict:
    import numpy as np
    import torch

    from virnucpro.kernels.attention import Packing
    from virnucpro.models.esm2 import ESM2, ESM2Config
    from virnucpro.kernels.attention import select_backend

    if switch:
        sys.setswitchinterval(switch)
    with torch.device("cuda"):
        model = ESM2(ESM2Config(36, 2560, 40)).to(torch.bfloat16).eval().requires_grad_(False)
    model.backend = select_backend(torch.device("cuda"), torch.bfloat16, alibi=False, requested="auto",
                                   head_dim=model.config.embed_dim // model.config.attention_heads)
    lengths = np.full(65536 // 168, 168)

    @torch.inference_mode()
    def run(seq_tokens, layers=None):
        lens = torch.tensor(seq_tokens, device="cuda")
        tokens = torch.randint(5, 20, (int(seq_tokens.sum()),), device="cuda")
        model.embed(tokens, Packing.from_lengths(lens, int(seq_tokens.max())), layers)
        torch.cuda.synchronize()

    times, compile_s = [], None
    t = time.perf_counter()
    run(lengths)
    first = time.perf_counter() - t
    done = threading.Event()

    def compile_thread():
        nonlocal compile_s
        s = time.perf_counter()
        layers = model.compiled_layers()
        with torch.cuda.stream(torch.cuda.Stream()):
            for ln in ([9, 6, 4], [7]):
                run(np.array(ln), layers)
        compile_s = time.perf_counter() - s
        done.set()

    if compile_beside:
        threading.Thread(target=compile_thread, daemon=True).start()
    for _ in range(40):
        t = time.perf_counter()
        run(lengths)
        times.append(round(time.perf_counter() - t, 3))
        if compile_beside and done.is_set() or not compile_beside and len(times) >= 5:
            break
    return {"switch_interval": sys.getswitchinterval(), "compile_beside": compile_beside,
            "first_forward": round(first, 3), "forwards": times, "compile_seconds": compile_s and round(compile_s, 2)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.variant:
        switch, beside = args.variant.split(",")
        print("RESULT " + json.dumps(forward_variant(float(switch) or None, beside == "1")), flush=True)
        return
    import torch

    result = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
              "dont_write_bytecode": sys.dont_write_bytecode or bool(os.environ.get("PYTHONDONTWRITEBYTECODE")),
              "ray_init": ray_init_seconds(), "forward_3B": []}
    for variant in ("0,0", "0,1", "0.0001,1"):
        p = subprocess.run([sys.executable, __file__, "--out", "-", "--variant", variant], capture_output=True,
                           text=True, cwd=ROOT)
        line = next((ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")), None)
        res = json.loads(line[7:]) if line else {"variant": variant, "error": p.stderr[-2000:]}
        print(res, flush=True)
        result["forward_3B"].append(res)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
