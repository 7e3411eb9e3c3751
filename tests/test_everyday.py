"""Everyday use, as a new user meets it (issue 28): a mistake costs a second and one line, Ctrl-C stops a
command within seconds, a failed run leaves nothing behind or a state that --resume accepts.

The refusals run `virnucpro` as a user does, in a fresh process, with RAY_ADDRESS pointing at a port where
no Ray listens: a command that started or joined Ray before refusing would say so in its error, and take
seconds more. Each refusal's time from the command's start is printed (`pytest -s`) and bounded loosely,
for a slow CI machine; the figures of record are in the closing note.
"""

from __future__ import annotations

import gzip
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import random_proteins, write_fasta

ROOT = Path(__file__).resolve().parents[1]
NO_RAY = {"RAY_ADDRESS": "127.0.0.1:1"}  # a Ray started or joined here would fail differently, and slowly


def _cli(*argv: str, env: dict | None = None, module: str = "cluster.cli") -> tuple[int, str, float]:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", module, *argv], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=120)
    return proc.returncode, proc.stderr, time.perf_counter() - start


def _protein_fasta(path: Path, n: int = 20, seed: int = 1) -> Path:
    write_fasta(path, random_proteins(n, 10, 80, seed=seed))
    return path


@pytest.fixture
def inputs(tmp_path, esm_tiny):
    ok = _protein_fasta(tmp_path / "ok.faa")
    (tmp_path / "empty.faa").write_bytes(b"")
    return {"ok": ok, "empty": tmp_path / "empty.faa", "missing": tmp_path / "missing.faa", "model": esm_tiny}


REFUSALS = {
    # name: (argv given the inputs, exit code, what the one line says)
    "missing input": (lambda i, o: ["embed", str(i["missing"]), "-o", o, "--model", str(i["model"])], 1,
                      "missing.faa: no such file"),
    "empty FASTA": (lambda i, o: ["embed", str(i["empty"]), "-o", o, "--model", str(i["model"])], 1,
                    "empty.faa: empty file, no FASTA records"),
    "model not there": (lambda i, o: ["embed", str(i["ok"]), "-o", o, "--model", "esm2_t99_typo"], 1,
                        "model 'esm2_t99_typo': not in the torch hub cache"),
    "model and service": (lambda i, o: ["embed", str(i["ok"]), "-o", o, "--model", str(i["model"]), "--service", "x"],
                          2, "give --model or --service NAME, not both"),
    "no model": (lambda i, o: ["embed", str(i["ok"]), "-o", o], 2, "give --model MODEL, or --service NAME"),
    "include of another name": (lambda i, o: ["embed", str(i["ok"]), "-o", o, "--model", str(i["model"]),
                                              "--include", "foo"], 2,
                                "--include foo: foo is not one of mean, bos, cls, per-token, logits"),
    "abbreviated option": (lambda i, o: ["embed", str(i["ok"]), "-o", o, "--model", str(i["model"]),
                                         "--num-actor", "2"], 2, "unrecognized arguments: --num-actor 2"),
    "preprocess of a missing file": (lambda i, o: ["preprocess", str(i["missing"]), "-o", o, "--chunk-size", "500"],
                                     1, "missing.faa: no such file"),
    "predict of an empty FASTA": (lambda i, o: ["predict", str(i["empty"]), "-o", o, "--chunk-size", "500",
                                                "--classifier", str(i["model"]), "--esm-model", str(i["model"])],
                                  1, "empty.faa: empty file, no FASTA records"),
}


@pytest.mark.parametrize("name", list(REFUSALS))
def test_a_mistake_is_refused_in_one_line_before_ray_and_leaves_nothing(name, inputs, tmp_path):
    argv, code, says = REFUSALS[name]
    out = tmp_path / "out"
    rc, err, seconds = _cli(*argv(inputs, str(out)), env=NO_RAY)
    print(f"\n{name}: exit {rc} after {seconds:.2f} s from the command's start")
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith(("usage:", " "))]  # (argparse's usage)
    assert rc == code and len(lines) == 1 and says in lines[0], err
    assert "Ray" not in err and "127.0.0.1:1" not in err  # refused before Ray was started or joined
    assert not out.exists(), "a refused command left its output directory"
    assert seconds < 10


def test_repr_layers_of_another_model_are_refused_before_the_actors_and_a_fixed_rerun_needs_no_overwrite(
        inputs, tmp_path):
    """`--repr-layers 5` of a 2-layer model: refused with exit 2 from the checkpoint's shapes, while Ray
    is still starting (the command does not wait for it), and nothing is left: the same command with the
    option fixed runs without --overwrite."""
    out = tmp_path / "out"
    base = ["embed", str(inputs["ok"]), "-o", str(out), "--model", str(inputs["model"]), "--device", "cpu"]
    rc, err, seconds = _cli(*base, "--repr-layers", "5")
    print(f"\n--repr-layers 5: exit {rc} after {seconds:.2f} s")
    lines = [ln for ln in err.splitlines() if ln.strip() and "Ray" not in ln and "ray" not in ln]
    assert rc == 2 and "--repr-layers 5: this model's layers are 0..2" in err, err
    assert lines[-1].startswith("virnucpro embed: error:")
    assert not out.exists() or not any(out.iterdir())
    rc, err, _ = _cli(*base, "--repr-layers", "2", "--include", "mean")
    assert rc == 0, err[-2000:]


def test_a_run_refused_at_its_first_batch_leaves_nothing_behind(tmp_path, esm_tiny, local_ray):
    """A run whose only batch fails in the actor wrote no part: it leaves no manifest and no .work/, so
    the same command, its cause fixed, runs without --overwrite."""
    from cluster.driver import EmbedError, embed
    from tests import faults

    _protein_fasta(tmp_path / "in.faa", n=5)
    out = tmp_path / "out"
    with pytest.raises(EmbedError, match="injected failure"):
        embed(tmp_path / "in.faa", out, esm_tiny, actor_class=faults.failing_batch(0), device="cpu", progress=False)
    assert not out.exists() or not any(out.iterdir())
    assert embed(tmp_path / "in.faa", out, esm_tiny, device="cpu", progress=False).num_sequences == 5


def test_a_truncated_gzip_leaves_no_plain_copy(tmp_path, esm_tiny, local_ray):
    """A gzip stream that ends early is found while it is decompressed into OUT_DIR/.work: the copy is
    written whole or not at all, and the failed run removes .work/ and the directory it created."""
    from cluster.driver import embed
    from virnucpro.io.alphabet import SequenceError

    data = gzip.compress(b"".join(b">p%d\n%s\n" % (i, b"MKV" * 200) for i in range(5000)))
    (tmp_path / "t.faa.gz").write_bytes(data[: len(data) // 2])
    out = tmp_path / "out"
    with pytest.raises(SequenceError, match="damaged or truncated gzip file"):
        embed(tmp_path / "t.faa.gz", out, esm_tiny, device="cpu", progress=False)
    assert not out.exists()


def _wait_for(path: Path, pattern: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if list(path.glob(pattern)):
            return
        time.sleep(0.05)
    raise AssertionError(f"no {pattern} in {path} (exit {proc.poll()})")


def test_ctrl_c_stops_embed_within_seconds_and_resume_finishes(tmp_path, esm_tiny):
    """Ctrl-C (SIGINT) mid-run: the command says so in one line and exits 130 within 5 s, its finished
    parts kept; --resume finishes the run."""
    _protein_fasta(tmp_path / "in.faa", n=400, seed=3)
    out = tmp_path / "out"
    argv = ["0.2", "embed", str(tmp_path / "in.faa"), "-o", str(out), "--model", str(esm_tiny), "--device", "cpu",
            "--toks-per-batch", "256", "--no-dashboard"]
    proc = subprocess.Popen([sys.executable, "-m", "tests.faults", *argv], cwd=ROOT, stderr=subprocess.PIPE, text=True)
    _wait_for(out, "part-*.parquet", proc)
    start = time.perf_counter()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    seconds = time.perf_counter() - start
    print(f"\nembed: exit {proc.returncode} {seconds:.2f} s after Ctrl-C")
    assert proc.returncode == 130 and "virnucpro: interrupted; rerun with --resume to finish" in err
    assert seconds < 5
    rc, err, _ = _cli("embed", str(tmp_path / "in.faa"), "-o", str(out), "--model", str(esm_tiny), "--device", "cpu",
                      "--toks-per-batch", "256", "--resume")
    assert rc == 0, err[-2000:]


def test_ctrl_c_stops_predict_while_it_embeds(tmp_path, esm_tiny, dnabert_tiny):
    """predict's two embedding jobs run in threads: Ctrl-C stops both within 5 s (it waited for both to
    finish before), and no second local Ray is started on the way out."""
    import torch

    from virnucpro.pipeline.classifier import MLPClassifier

    import numpy as np

    # codons without a stop: every chunk keeps its forward frame 1, so both models have frames to embed
    codons = [a + b + c for a in "ACGT" for b in "ACGT" for c in "ACGT" if a + b + c not in ("TAA", "TAG", "TGA")]
    rng = np.random.default_rng(4)
    write_fasta(tmp_path / "contigs.fa", ["".join(rng.choice(codons, 500)) for _ in range(600)])
    torch.save(MLPClassifier(48 + 64, 32, 2).eval().state_dict(), tmp_path / "500_model.pth")
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "cluster.cli", "predict", str(tmp_path / "contigs.fa"), "-o", str(out),
                             "--chunk-size", "500", "--classifier", str(tmp_path / "500_model.pth"),
                             "--esm-model", str(esm_tiny), "--dnabert-model", str(dnabert_tiny), "--device", "cpu",
                             "--toks-per-batch", "512", "--no-plots"], cwd=ROOT, stderr=subprocess.PIPE, text=True)
    _wait_for(out / "embeddings", "*/part-*.parquet", proc, timeout=180)
    start = time.perf_counter()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    seconds = time.perf_counter() - start
    print(f"\npredict: exit {proc.returncode} {seconds:.2f} s after Ctrl-C")
    assert proc.returncode == 130 and "interrupted" in err.splitlines()[-1], err[-2000:]
    assert seconds < 5
    assert err.count("Started a local Ray instance") <= 1


def test_version_and_help_say_what_they_should():
    from virnucpro import __version__

    rc, _, _ = _cli("--version")
    proc = subprocess.run([sys.executable, "-m", "cluster.cli", "--version"], cwd=ROOT, capture_output=True, text=True)
    assert rc == 0 and proc.stdout.strip() == f"virnucpro {__version__}"
    proc = subprocess.run([sys.executable, "-m", "cluster.cli", "embed", "--help"], cwd=ROOT, capture_output=True,
                          text=True)
    assert "Embed every sequence of a FASTA file" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "cluster.cli", "predict", "--help"], cwd=ROOT, capture_output=True,
                          text=True)
    assert "classifier.safetensors" in proc.stdout


def test_the_classifier_file_follows_the_umask(tmp_path):
    """classifier.safetensors is created as every other output: permissions from the umask (safetensors'
    own writer made it 0600)."""
    from virnucpro.pipeline.classifier import MLPClassifier, save_classifier

    old = os.umask(0o022)
    try:
        save_classifier(MLPClassifier(8, 4, 2), tmp_path / "classifier.safetensors", {"chunk_size": 500})
    finally:
        os.umask(old)
    assert (tmp_path / "classifier.safetensors").stat().st_mode & 0o777 == 0o644
