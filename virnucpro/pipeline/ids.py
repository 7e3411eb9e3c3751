"""Chunk and frame ids: how preprocessing names the pieces of a contig, and how they are read back.

Upstream VirNucPro's names, which its result files carry: contig `C` is cut into chunks `C_chunk_1`,
`C_chunk_2`, ... (numbered from 1, and `_chunk_1` even when the contig is one chunk); a chunk's
kept reading frames are `{chunk}F1`..`F3` (forward strand, frames 1-3) and `{chunk}R1`..`R3` (its
reverse complement). Every id after preprocessing (embedding rows, prediction files, the contig
table) is one of these, so reading them back is exact: a frame id ends in its two-character frame
name, and a chunk's contig is what precedes its last `_chunk_` (a contig id may hold `_chunk_`
itself).
"""

from __future__ import annotations

FRAME_NAMES = ("F1", "F2", "F3", "R1", "R2", "R3")  # upstream's order of the six frames
_CHUNK = "_chunk_"


def chunk_id(contig: str, k: int) -> str:
    """The id of chunk k (from 1) of a contig."""
    return f"{contig}{_CHUNK}{k}"


def frame_id(chunk: str, frame_name: str) -> str:
    """The id of one reading frame (a name in FRAME_NAMES) of a chunk."""
    return chunk + frame_name


def chunk_of(frame: str) -> str:
    """The chunk id of a frame id."""
    return frame[:-2]


def contig_of(chunk: str) -> str:
    """The contig id of a chunk id."""
    return chunk.rsplit(_CHUNK, 1)[0]
