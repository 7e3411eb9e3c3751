"""`make demo`: the main job end to end on a fresh machine, with tiny random-weight models.

Writes a tiny ESM-2 checkpoint (fair-esm `.pt` format) and a tiny DNABERT-S directory (config.json,
weights, tokenizer.json), then embeds the FASTA files in `examples/` through a local Ray with two
actors on CPU (one per GPU on a GPU machine), exactly as `virnucpro embed` does with real
checkpoints. Then runs `virnucpro predict` end to end on examples/contigs.fasta with the same models and a random classifier of matching width: every
output file is real, but the embeddings and the virus verdicts are meaningless, since the weights
are random. See README.md for real models.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import pyarrow.parquet as pq
import ray
import torch

from virnucpro.pipeline.classifier import MLPClassifier

from virnucpro.models.tiny import write_dnabert_s_dir, write_esm2_checkpoint

from .driver import embed
from .pipeline import predict

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=ROOT / "demo_out")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    models = args.out / "models"
    esm = write_esm2_checkpoint(models / "esm2_tiny_random.pt", num_layers=4, embed_dim=160, attention_heads=20)
    dnabert = write_dnabert_s_dir(models / "dnabert_s_tiny_random", hidden=96, layers=4, heads=12, intermediate=192)
    print(f"demo: tiny RANDOM-weight models written to {models} (embeddings are meaningless)")

    jobs = [("ESM-2", ROOT / "examples" / "proteins.faa", esm, args.out / "proteins_esm2"),
            ("DNABERT-S", ROOT / "examples" / "contigs.fasta", dnabert, args.out / "contigs_dnabert_s")]
    ray.init(include_dashboard=False, logging_level=logging.WARNING)  # one local Ray for both jobs
    # two actors on CPU show batches dealt to several actors; on GPUs, one per GPU (the default)
    actors = None if ray.cluster_resources().get("GPU") else 2
    for label, fasta, model, out in jobs:
        result = embed(fasta, out, model, device=args.device, num_actors=actors, toks_per_batch=4096,
                       overwrite=True, progress=False)
        table = pq.read_table(out)
        print(f"demo: {label}: {result.summary()}")
        print(f"demo:   Parquet: {out}  rows={table.num_rows} columns={table.column_names} "
              f"dim={table.schema.field('embedding').type.list_size}")
    print("demo: read the output with pyarrow.parquet.read_table(OUT_DIR); real checkpoints: see README.md")

    classifier = write_random_classifier(models / "500_model_tiny_random.pth", 96 + 160)
    out = args.out / "predict"
    result = predict(ROOT / "examples" / "contigs.fasta", out, classifier, esm, dnabert, chunk_size=500,
                     device=args.device, toks_per_batch=4096, overwrite=True, progress=False)
    ray.shutdown()
    print(f"demo: predict: {result.summary()}")
    for name in ("prediction_results.txt", "prediction_results_highestscore.csv", "predictions.parquet",
                 "contig_predictions.tsv"):
        path = out / name
        print(f"demo:   {path}  ({path.stat().st_size} bytes)")
        if name.endswith((".txt", ".tsv")):
            for line in path.read_text().splitlines()[:4]:
                print(f"demo:     {line}")
    note = ["THE VERDICTS ABOVE ARE MEANINGLESS: the ESM-2, DNABERT-S and classifier weights are random.",
            "They only show the pipeline and its file formats. For real predictions, give upstream's",
            "500_model.pth with esm2_t36_3B_UR50D and zhihan1996/DNABERT-S (README.md)."]
    width = max(map(len, note))
    print("demo: " + "!" * (width + 6))
    for line in note:
        print(f"demo: !! {line:<{width}} !!")
    print("demo: " + "!" * (width + 6))
    return 0


def write_random_classifier(path: Path, input_dim: int) -> Path:
    """A random VirNucPro MLP of the given input width, saved as a state dict (upstream's key names)."""
    torch.manual_seed(0)
    model = MLPClassifier(input_dim, 64, 2)
    with torch.no_grad():
        model.output_layer.weight *= 8  # spread the scores over (0, 1); they mean nothing either way
    torch.save(model.state_dict(), path)
    return path


if __name__ == "__main__":
    sys.exit(main())
