"""Ten million sequences through the real driver: memory, time per phase, the manifest, a kill and a resume.

    python bench/bench_scale.py --out bench/results/scale-1e7-<machine>.json [-n 10000000] [--toks 65536]

Writes n short proteins (20-60 aa, ~0.5 GB of FASTA for 10^7) and a tiny ESM-2 (16 wide), then runs
`cluster.embed` in a child process with a local Ray and `NullEmbedder` actors (they read, tokenise and
write real Parquet parts; no forward pass), so the driver and the data path are what is measured:

  1. first run: SIGKILLed (the whole process; its own Ray dies with it) once half the parts are written;
  2. resume: `--resume` in a fresh process, to the end; then every sequence is checked to be there once.

Reported for each: wall clock from the child's start, the driver's peak resident and anonymous memory
(/proc/self/status, sampled every 50 ms), the bytes the driver process read (/proc/self/io `rchar`: the
resume must not read the input again), its timeline (phases, seconds from the process start), tokens and
batches computed; and the output: parts, bytes, the manifest's and the saved plan's size.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, os, sys, threading, time
sys.path.insert(0, {root!r})
peak = {{"VmRSS": 0, "RssAnon": 0}}
from bench.bench_driver import NullEmbedder
from cluster.driver import embed
from cluster.progress import Timeline, process_start_time
timeline = Timeline(process_start_time())
def sample():  # the peaks and the phases so far, in a file: a run that is killed leaves them
    last = 0.0
    while True:
        with open("/proc/self/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in peak:
                    peak[k] = max(peak[k], int(v.split()[0]) * 1024)
        if time.monotonic() - last > 0.5:
            last = time.monotonic()
            io = dict(line.split(": ") for line in open("/proc/self/io").read().splitlines())
            with open({stats!r} + ".tmp", "w") as f:
                json.dump({{"timeline": dict(timeline.marks), "peak_rss_mib": peak["VmRSS"] / 2**20,
                           "peak_anon_mib": peak["RssAnon"] / 2**20, "driver_read_mib": int(io["rchar"]) / 2**20}}, f)
            os.replace({stats!r} + ".tmp", {stats!r})
        time.sleep(0.05)
threading.Thread(target=sample, daemon=True).start()
res = embed({fasta!r}, {out!r}, {model!r}, actor_class=NullEmbedder, timeline=timeline, device="cpu",
            toks_per_batch={toks}, progress=False, resume={resume}, dashboard=False)
io = dict(line.split(": ") for line in open("/proc/self/io").read().splitlines())
print("RESULT " + json.dumps({{"timeline": res.timeline, "sequences": res.num_sequences, "batches": res.num_batches,
      "batches_computed": res.batches_computed, "tokens_computed": res.tokens_computed,
      "seconds": res.seconds, "peak_rss_mib": peak["VmRSS"] / 2**20, "peak_anon_mib": peak["RssAnon"] / 2**20,
      "driver_read_mib": int(io["rchar"]) / 2**20}}), flush=True)
"""


def write_proteins(path: Path, n: int, seed: int = 0) -> int:
    rng = np.random.default_rng(seed)
    amino = np.frombuffer(b"ACDEFGHIKLMNPQRSTVWY", np.uint8)
    with open(path, "wb") as f:
        for start in range(0, n, 100_000):
            m = min(100_000, n - start)
            lengths = rng.integers(20, 61, m)
            letters = rng.choice(amino, int(lengths.sum())).tobytes()
            ends = np.cumsum(lengths)
            f.write(b"".join(b">p%d\n%s\n" % (start + i, letters[e - n_:e])
                             for i, (e, n_) in enumerate(zip(ends.tolist(), lengths.tolist()))))
    return path.stat().st_size


def run_child(fasta: Path, out: Path, model: Path, toks: int, resume: bool, kill_at: int | None) -> dict:
    """Run the driver in a child process; with `kill_at`, SIGKILL it once that many parts exist."""
    stats = out.parent / f"stats-{'resume' if resume else 'first'}.json"
    code = CHILD.format(root=str(ROOT), fasta=str(fasta), out=str(out), model=str(model), toks=toks, resume=resume,
                        stats=str(stats))
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True, start_new_session=True)
    if kill_at is not None:
        while proc.poll() is None:
            if sum(1 for p in os.scandir(out) if p.name.startswith("part-")) >= kill_at if out.exists() else False:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                return {"killed_after_seconds": round(time.perf_counter() - start, 1),
                        "parts_at_kill": sum(1 for p in os.scandir(out) if p.name.startswith("part-")),
                        "as_it_was_killed": json.loads(stats.read_text())}
            time.sleep(0.25)
    stdout, _ = proc.communicate()
    row = next((json.loads(line[7:]) for line in stdout.splitlines() if line.startswith("RESULT ")), None)
    if row is None:
        raise RuntimeError(f"the driver failed (exit {proc.returncode}): {stdout[-2000:]}")
    row["wall_seconds"] = round(time.perf_counter() - start, 1)
    return row


def tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("-n", type=int, default=10_000_000)
    p.add_argument("--toks", type=int, default=65536, help="toks_per_batch (ESM-2's default on a GPU)")
    p.add_argument("--work", type=Path, default=None)
    args = p.parse_args()

    from virnucpro.models.tiny import write_esm2_checkpoint

    work = args.work or Path(tempfile.mkdtemp(prefix="bench-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    model = write_esm2_checkpoint(work / "esm2_tiny.pt", 2, 16, 2)
    fasta = work / "proteins.faa"
    t = time.perf_counter()
    fasta_bytes = fasta.stat().st_size if fasta.exists() else write_proteins(fasta, args.n)
    print(f"input: {fasta_bytes / 2**20:.0f} MiB in {time.perf_counter() - t:.0f} s", flush=True)
    out = work / "out"
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    # how many batches: a dry plan from the lengths is what the driver does; count parts as they come
    est_batches = int(args.n * 42 / args.toks) + 1
    first = run_child(fasta, out, model, args.toks, False, kill_at=est_batches // 2)
    print("first run:", first, flush=True)
    work_dir = out / ".work"
    saved = {"manifest_bytes": (out / "_manifest.parquet").stat().st_size,
             "plan_bytes": tree_bytes(work_dir / "plan") if (work_dir / "plan").exists() else None}
    resumed = run_child(fasta, out, model, args.toks, True, kill_at=None)
    print("resume:", resumed, flush=True)
    import pyarrow.parquet as pq

    index = pq.read_table(out, columns=["index"]).column("index").to_numpy()
    once = bool(len(index) == args.n and np.array_equal(np.sort(index), np.arange(args.n)))
    parts = sorted(out.glob("part-*.parquet"))
    result = {
        "benchmark": "bench_scale", "machine": f"{platform.node()} ({os.cpu_count()} CPUs)",
        "device": "cpu (null actors, local Ray)", "sequences": args.n, "input_mib": round(fasta_bytes / 2**20),
        "toks_per_batch": args.toks, "first_run": first, "resume": resumed, "saved_while_incomplete": saved,
        "output": {"parts": len(parts), "bytes": sum(p.stat().st_size for p in parts),
                   "manifest_bytes": (out / "_manifest.parquet").stat().st_size,
                   "work_dir_left": work_dir.exists(), "every_sequence_once": once},
        "commit": subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                                 text=True).stdout.strip(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result["output"]))


if __name__ == "__main__":
    main()
