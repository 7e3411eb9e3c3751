"""The models' tokenizers: sequences -> packed token ids, numpy only.

Apart from the model code (`virnucpro.models`, which imports torch): a driver plans with the tokenizer
alone, and one that sends its batches to a running service gets it from the service and imports no
torch (`virnucpro.checkpoint`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from virnucpro.errors import CheckpointError

# fair-esm's "ESM-1b" alphabet, used by every ESM-2 checkpoint: 4 specials, 25 residues, '.', '-',
# one filler to a multiple of 8, then <mask>.
ALPHABET = ["<cls>", "<pad>", "<eos>", "<unk>", *"LAGVSERTIDPKQNFYMHWCXBUZO.-", "<null_1>", "<mask>"]
CLS, PAD, EOS, UNK, MASK = 0, 1, 2, 3, 32


class ESM2Tokenizer:
    """Residues -> ESM-2 token ids, as fair-esm's BatchConverter: <cls> seq[:truncation] <eos>."""

    exact = True  # `num_tokens` is the count `encode` gives (one token a residue)

    def __init__(self, truncation_seq_length: int | None = 1022):
        self.truncation_seq_length = truncation_seq_length
        # J (Leu/Ile), the one letter missing from the vocabulary (fair-esm raises KeyError on it),
        # is read as X, the unknown residue ESM-2 saw in training; validation lets no other byte in.
        lut = np.full(256, ALPHABET.index("X"), dtype=np.int32)
        for i, tok in enumerate(ALPHABET):
            if len(tok) == 1:
                lut[ord(tok)] = i
        self._lut = lut

    def num_tokens(self, length: int) -> int:
        trunc = self.truncation_seq_length
        return (length if trunc is None else min(length, trunc)) + 2

    @property
    def max_residues(self) -> int | None:
        """Residues of a sequence that `encode` uses: reading more of a long record is wasted."""
        return self.truncation_seq_length


    def encode(self, sequences: list[str] | list[bytes]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Packed token ids int32 [T], tokens per sequence int32 [B], truncated bool [B]."""
        trunc = self.truncation_seq_length
        pieces, lengths, truncated = [], [], []
        for seq in sequences:
            raw = np.frombuffer(seq if isinstance(seq, bytes) else seq.encode("ascii"), dtype=np.uint8)
            truncated.append(trunc is not None and len(raw) > trunc)
            if trunc is not None:
                raw = raw[:trunc]
            pieces.append(np.concatenate(([CLS], self._lut[raw], [EOS])).astype(np.int32))
            lengths.append(len(raw) + 2)
        return np.concatenate(pieces), np.asarray(lengths, np.int32), np.asarray(truncated, bool)


def check_esm_vocab(model_dir: Path) -> None:
    """vocab.txt, when present, must be fair-esm's alphabet in its order: our tokenizer is that alphabet."""
    vocab = model_dir / "vocab.txt"
    if not vocab.is_file():
        return
    tokens = [line.strip() for line in vocab.read_text().splitlines()]
    while tokens and not tokens[-1]:
        tokens.pop()
    if tokens != ALPHABET:
        i = next((i for i, (a, b) in enumerate(zip(tokens, ALPHABET)) if a != b), min(len(tokens), len(ALPHABET)))
        got = tokens[i] if i < len(tokens) else "(end)"
        want = ALPHABET[i] if i < len(ALPHABET) else "(end)"
        raise CheckpointError(f"{vocab}: not ESM-2's alphabet ({len(tokens)} tokens; token {i} is '{got}', "
                              f"expected '{want}')")



class DNABERTSTokenizer:
    """The model's own BPE `tokenizer.json` (HF tokenizers), template `[CLS] $A [SEP]`, no padding."""

    exact = False  # `num_tokens` estimates (see `calibrate`)

    def __init__(self, model_dir: str | Path, truncation_seq_length: int | None = 1022):
        from tokenizers import Tokenizer

        path = Path(model_dir) / "tokenizer.json"
        if not path.is_file():
            raise CheckpointError(f"{model_dir}: no tokenizer.json")
        self._tok = Tokenizer.from_file(str(path))
        self._tok.no_padding()
        self._tok.no_truncation()
        self.truncation_seq_length = truncation_seq_length  # in tokens between [CLS] and [SEP]
        self.bases_per_token = self.DEFAULT_BASES_PER_TOKEN  # planning's estimate (`calibrate`)
        self._longest: int | None = None  # longest token in bases, for max_residues
        probe = self._tok.encode("ACGT").ids
        self.cls_id, self.sep_id = self._tok.token_to_id("[CLS]"), self._tok.token_to_id("[SEP]")
        if probe[0] != self.cls_id or probe[-1] != self.sep_id:
            raise CheckpointError(f"{path}: tokenizer does not add [CLS] ... [SEP] (no template processor)")

    DEFAULT_BASES_PER_TOKEN = 4.0
    CALIBRATION_MARGIN = 0.95  # the estimate counts this much fewer bases per token than the sample had

    def num_tokens(self, length: int) -> int:
        """An estimate for planning (BPE merges about 4-5 bases a token; `calibrate` measures it on the
        input); exact counts come when a batch is tokenised, in its actor."""
        est = int(length / self.bases_per_token) + 1
        trunc = self.truncation_seq_length
        return (est if trunc is None else min(est, trunc)) + 2

    def calibrate(self, sample: list[str] | list[bytes]) -> float:
        """Set the planning estimate's bases per token from a sample of the input (the driver tokenises a
        few hundred records, not the input), with a margin so that batches rarely exceed their budget;
        returns it. An empty sample keeps the default."""
        if sample:
            _, seq_tokens, _ = self.encode(sample)
            bases = sum(len(s) for s in sample)
            self.bases_per_token = round(max(1.0, self.CALIBRATION_MARGIN * bases / max(1, int(seq_tokens.sum()) - 2 * len(sample))), 3)
        return self.bases_per_token

    @property
    def max_residues(self) -> int | None:
        """Bases of a sequence worth reading: truncation is in tokens, and no token is longer than
        the vocabulary's longest (at least 16 assumed), so this prefix yields more tokens than are
        kept, with a margin of thousands of bases after the kept ones for BPE's merges at the cut."""
        trunc = self.truncation_seq_length
        if trunc is None:
            return None
        if self._longest is None:
            self._longest = max((len(t) for t in self._tok.get_vocab() if t.isalpha()), default=1)
        return max(16, self._longest) * (trunc + 2) + 4096

    def __getstate__(self):  # tokenizers objects pickle as their JSON
        return {"json": self._tok.to_str(), "trunc": self.truncation_seq_length,
                "cls": self.cls_id, "sep": self.sep_id, "bases_per_token": self.bases_per_token}

    def __setstate__(self, state):
        from tokenizers import Tokenizer

        self._tok = Tokenizer.from_str(state["json"])
        self._longest = None
        self.truncation_seq_length, self.cls_id, self.sep_id = state["trunc"], state["cls"], state["sep"]
        self.bases_per_token = state.get("bases_per_token", self.DEFAULT_BASES_PER_TOKEN)

    def encode(self, sequences: list[str] | list[bytes]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Packed token ids int32 [T], tokens per sequence int32 [B], truncated bool [B]."""
        sequences = [s.decode("ascii") if isinstance(s, bytes) else s for s in sequences]
        # tokenizers >= 0.21's encode_batch_fast skips the character offsets, which we do not use, and
        # their cost
        encode = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)
        encodings = encode(sequences, add_special_tokens=True)
        trunc = self.truncation_seq_length
        pieces, lengths, truncated = [], [], []
        for enc in encodings:
            ids = np.asarray(enc.ids, dtype=np.int32)
            cut = trunc is not None and len(ids) - 2 > trunc
            if cut:
                ids = np.concatenate((ids[: trunc + 1], [self.sep_id])).astype(np.int32)
            pieces.append(ids)
            lengths.append(len(ids))
            truncated.append(cut)
        return np.concatenate(pieces), np.asarray(lengths, np.int32), np.asarray(truncated, bool)
