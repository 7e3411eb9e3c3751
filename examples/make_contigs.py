"""Write examples/contigs.fasta: a small, deterministic, synthetic contig set for the demo and docs.

Random DNA almost never holds a 500 bp stretch without a stop in some frame, so a set of random
contigs gives `virnucpro predict` nothing to classify. These contigs are built like real ones:
open reading frames (an ATG, then random sense codons) on either strand, separated by short random
spacers. The set also holds the cases the pipeline must handle: contigs shorter than a chunk,
contigs with no stop-free frame at all, one too short to translate, an N run, and soft-masked
(lower-case) bases. The sequences are synthetic and mean nothing biologically.

    python examples/make_contigs.py            # rewrites examples/contigs.fasta
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

STOPS = {"TAA", "TAG", "TGA"}
SENSE = [a + b + c for a in "ACGT" for b in "ACGT" for c in "ACGT" if a + b + c not in STOPS]
PAIR = str.maketrans("ACGTacgtN", "TGCAtgcaN")


def orf(rng: np.random.Generator, codons: int) -> str:
    return "ATG" + "".join(rng.choice(SENSE, codons - 1))


def random_dna(rng: np.random.Generator, n: int) -> str:
    return "".join(rng.choice(list("ACGT"), n))


def gene_dense(rng: np.random.Generator, length: int) -> str:
    """ORFs of 150-900 codons on random strands, 10-60 bp spacers, cut to `length`."""
    parts, total = [], 0
    while total < length:
        gene = orf(rng, int(rng.integers(150, 900)))
        if rng.random() < 0.4:
            gene = gene.translate(PAIR)[::-1]
        spacer = random_dna(rng, int(rng.integers(10, 60)))
        parts += [spacer, gene]
        total += len(spacer) + len(gene)
    return "".join(parts)[:length]


def contigs(seed: int = 2024) -> list[tuple[str, str]]:
    rng = np.random.default_rng(seed)
    out: list[tuple[str, str]] = []
    for length in rng.integers(600, 3000, 16):  # gene-dense contigs: most chunks have a frame
        out.append(("gene-dense", gene_dense(rng, int(length))))
    for length in (1200, 2100, 800):  # no stop-free frame in any chunk (checked below)
        seq = random_dna(rng, length)
        while _keeps_a_frame(seq):
            seq = random_dna(rng, length)
        out.append(("random, no open frame", seq))
    out.append(("short gene fragment", orf(rng, 60)[:180]))  # shorter than a chunk: one chunk
    out.append(("short, 250 bp", gene_dense(rng, 250)))
    out.append(("too short to translate", "AC"))
    masked = gene_dense(rng, 1500)
    out.append(("soft-masked bases", masked[:400] + masked[400:700].lower() + masked[700:]))
    with_n = gene_dense(rng, 1100)
    out.append(("N run", with_n[:520] + "N" * 30 + with_n[550:]))
    return [(f"contig{i} synthetic: {what}, length {len(seq)}", seq) for i, (what, seq) in enumerate(out, 1)]


def _keeps_a_frame(seq: str) -> bool:
    """Whether any 300 or 500 bp chunk of seq keeps a stop-free frame (VirNucPro's rules)."""
    from virnucpro.pipeline.preprocess import iter_frames

    return any(True for size in (300, 500) for _ in iter_frames([("x", seq)], size))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("-o", "--out", type=Path, default=Path(__file__).with_name("contigs.fasta"))
    ap.add_argument("--seed", type=int, default=2024)
    args = ap.parse_args()
    with open(args.out, "w") as f:
        for header, seq in contigs(args.seed):
            f.write(f">{header}\n")
            for i in range(0, len(seq), 70):
                f.write(seq[i:i + 70] + "\n")


if __name__ == "__main__":
    main()
