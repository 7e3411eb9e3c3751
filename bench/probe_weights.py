"""Where an actor's time from placement to loaded weights goes (bench_startup measures the whole).

    python bench/probe_weights.py --ckpt CKPT.pt --out bench/results/probe-weights-<gpu>.json

In a fresh process, as an actor starts: import torch, import the actor's module, initialise CUDA, then
`load_esm2`'s steps one by one (read the checkpoint memory-mapped, copy each tensor to the GPU, build
the module, pick the attention backend, which checks our kernel), twice; then `load_esm2` whole, as
the actor calls it (the kernel check in a thread beside the copies), twice. Then, in the same process with the
file in the page cache, other ways of moving the same bytes to the GPU, each timed after a
synchronise: the per-tensor pageable copies `to_device` makes, the same from 8 threads, and the whole
file read with `readinto` into a page-locked staging buffer and copied from there (the floor).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

STEPS = r"""
import json, sys, time
t0 = time.perf_counter(); marks = {}
def mark(name): marks[name] = round(time.perf_counter() - t0, 3)
import torch; mark("import torch")
import actors.embedder; mark("import actors.embedder")
torch.cuda.set_device(0); torch.empty(1, device="cuda"); torch.cuda.synchronize(); mark("CUDA initialised")
from virnucpro.models import esm2 as m
config, state = m.read_checkpoint(sys.argv[1]); mark("checkpoint read (memory-mapped)")
state = m.to_device({k: v for k, v in state.items() if not m._IGNORED.match(k)}, "cuda", torch.bfloat16)
torch.cuda.synchronize(); mark("tensors on the GPU")
model, ours = m._matched(Path(sys.argv[1]), config, state, config.num_layers); model.load_state_dict(ours, assign=True)
torch.cuda.synchronize(); mark("module built")
backend = m.select_backend(torch.device("cuda"), torch.bfloat16, alibi=False, requested="auto",
                           head_dim=config.embed_dim // config.attention_heads)
mark("attention backend chosen: " + backend.describe())
print("STEPS " + json.dumps(marks))
"""

WHOLE = r"""
import json, sys, time
t0 = time.perf_counter(); marks = {}
def mark(name): marks[name] = round(time.perf_counter() - t0, 3)
import torch; mark("import torch")
import actors.embedder; mark("import actors.embedder")
torch.cuda.set_device(0); torch.empty(1, device="cuda"); torch.cuda.synchronize(); mark("CUDA initialised")
from virnucpro.models import esm2 as m
model = m.load_esm2(sys.argv[1], "cuda", torch.bfloat16); torch.cuda.synchronize()
mark("load_esm2 (kernel check beside the copies): " + model.backend.describe())
print("WHOLE " + json.dumps(marks))
"""

COPIES = r"""
import json, os, sys, time
from concurrent.futures import ThreadPoolExecutor
import torch
from virnucpro.models import esm2 as m
path = sys.argv[1]; size = os.path.getsize(path)
torch.empty(1, device="cuda"); out = {"file_bytes": size}
def timed(name, fn, repeat=2):
    best = None
    for _ in range(repeat):
        torch.cuda.synchronize(); t = time.perf_counter(); r = fn(); torch.cuda.synchronize()
        s = time.perf_counter() - t; best = s if best is None else min(best, s); del r
        torch.cuda.empty_cache()
    out[name] = {"seconds": round(best, 3), "GB_per_s": round(size / best / 1e9, 2)}
    print(name, out[name], flush=True)
def per_tensor():
    _, state = m.read_checkpoint(path)
    return m.to_device(state, "cuda", torch.bfloat16)
def threaded():
    _, state = m.read_checkpoint(path)
    with ThreadPoolExecutor(8) as ex:
        return dict(zip(state, ex.map(lambda v: v.to("cuda", non_blocking=False), state.values())))
def staged(chunk=256 << 20):
    dst = torch.empty(size, dtype=torch.uint8, device="cuda")
    bufs = [torch.empty(chunk, dtype=torch.uint8).pin_memory() for _ in range(2)]
    events = [None, None]; stream = torch.cuda.Stream()
    with open(path, "rb", buffering=0) as f:
        offset, i = 0, 0
        while offset < size:
            if events[i] is not None: events[i].synchronize()
            n = f.readinto(memoryview(bufs[i].numpy()))
            with torch.cuda.stream(stream):
                dst[offset:offset + n].copy_(bufs[i][:n], non_blocking=True)
                events[i] = torch.cuda.Event(); events[i].record(stream)
            offset += n; i ^= 1
    stream.synchronize()
    return dst
t = time.perf_counter(); torch.empty(256 << 20, dtype=torch.uint8).pin_memory(); out["pin_256MiB_seconds"] = round(time.perf_counter() - t, 3)
timed("per-tensor pageable copies (to_device)", per_tensor)
timed("per-tensor copies from 8 threads", threaded)
timed("whole file via readinto a pinned 2x256 MiB staging buffer", staged)
print("COPIES " + json.dumps(out))
"""


def run(code: str, ckpt: Path, tag: str) -> dict:
    p = subprocess.run([sys.executable, "-c", "from pathlib import Path\n" + code, str(ckpt)], capture_output=True,
                       text=True, cwd=ROOT, env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith(tag + " ")]
    if p.returncode or not lines:
        return {"error": (p.stderr or p.stdout)[-2000:]}
    return json.loads(lines[-1].removeprefix(tag + " "))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ckpt", type=Path, required=True, help="a fair-esm .pt (bench_e2e.write_inputs writes one)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    import torch

    subprocess.run(["cat", str(args.ckpt)], stdout=subprocess.DEVNULL, check=True)  # in the page cache
    result = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
              "ckpt": str(args.ckpt), "steps_fresh_process": [run(STEPS, args.ckpt, "STEPS") for _ in range(2)],
              "load_esm2_fresh_process": [run(WHOLE, args.ckpt, "WHOLE") for _ in range(2)],
              "copies": run(COPIES, args.ckpt, "COPIES")}
    print(json.dumps(result, indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
