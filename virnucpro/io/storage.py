"""Where inputs and outputs live: one filesystem layer (pyarrow.fs) for local paths, shared filesystems
and object stores.

    Location.parse("s3://bucket/run")        # a directory: the output of a run
    InputFile.open("s3://bucket/in.fasta.gz") # a file: an input, streamed or read by byte range

Both take a local path, a `file://` URI, a URI that pyarrow understands (`s3://`, `gs://`, `hdfs://`,
`abfs://`) or any URI an installed fsspec implementation handles. Every process (driver, actors, Ray
tasks) parses the same URI string itself, so credentials come from each node's environment (for S3:
the standard `AWS_*` variables, `AWS_ENDPOINT_URL` included).

Writes are atomic (`Location.write_atomic`): a temporary file renamed into place on filesystems, one
PUT of the final object on object stores. Files are created as `open()` creates them, with the
permissions the user's umask gives.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import pyarrow as pa
import pyarrow.fs as pafs
from virnucpro.errors import OptionError

GZIP_MAGIC = b"\x1f\x8b"


def resolve(where: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path in its own terms) of a local path or a URI."""
    text = os.fspath(where)
    if "://" not in text:
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(text))
    try:
        return pafs.FileSystem.from_uri(text)
    except (pa.ArrowInvalid, ValueError):
        import fsspec  # any other scheme: through fsspec, if an implementation is installed

        try:
            ffs, path = fsspec.core.url_to_fs(text)
        except (ImportError, ValueError) as e:
            raise OptionError(f"{text}: no filesystem for this URI ({e})") from None
        return pafs.PyFileSystem(pafs.FSSpecHandler(ffs)), path


def is_uri(where: str | os.PathLike) -> bool:
    return "://" in os.fspath(where)


# Filesystems whose writes are atomic per object (a reader sees the whole object or nothing) and which
# have no cheap rename: files are written straight to their final key there.
_OBJECT_STORES = {"s3", "s3a", "gcs", "gs", "abfs", "abfss", "az", "adl", "oss", "r2"}


def is_object_store(fs: pafs.FileSystem) -> bool:
    name = fs.type_name
    if name.startswith("py::fsspec+"):
        name = name.removeprefix("py::fsspec+").strip("()' ").split("'")[0].split(",")[0]
    return name in _OBJECT_STORES


def _temporary_name(name: str) -> str:
    """Where `name` is written before it is renamed into place: hidden, unique per writer, and
    recognisable as a write cut short (`.NAME.<random>.tmp`)."""
    return f".{name}.{uuid.uuid4().hex[:12]}.tmp"


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path next to `path` for the caller to write; when the block ends without an
    error, the file is flushed to disk and renamed over `path`, so readers see the old file or the
    new one, never part of it. On an error it is removed. The one implementation of an atomic local write."""
    path = Path(path)
    tmp = path.with_name(_temporary_name(path.name))
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)  # the data is on disk before the rename makes it visible
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write(path: str | Path, write: Callable[[BinaryIO], object]) -> None:
    """Call write(f) on a binary file that then atomically becomes `path` (see `atomic_path`)."""
    with atomic_path(path) as tmp:
        with open(tmp, "xb") as f:
            write(f)


@dataclass(frozen=True)
class Location:
    """A directory on any pyarrow / fsspec filesystem: a run's output, or its scratch space."""

    fs: pafs.FileSystem
    path: str  # the directory, in the filesystem's own terms
    uri: str  # what another process parses to reach the same directory

    @classmethod
    def parse(cls, where: "str | Path | Location") -> "Location":
        if isinstance(where, Location):
            return where
        fs, path = resolve(where)
        text = os.fspath(where)
        return cls(fs, path.rstrip("/") or "/", path if not is_uri(text) else text)

    def __str__(self) -> str:
        return self.uri

    @property
    def local_path(self) -> Path | None:
        """The directory as a local Path, when it is on the local filesystem."""
        if isinstance(self.fs, pafs.LocalFileSystem):
            return Path(self.path)
        return None

    @property
    def object_store(self) -> bool:
        return is_object_store(self.fs)

    def join(self, name: str) -> str:
        return f"{self.path.rstrip('/')}/{name}"

    def child(self, name: str) -> "Location":
        """The subdirectory `name` (not created)."""
        uri = self.uri.rstrip("/") + "/" + name
        return Location(self.fs, self.join(name), uri)

    def make_dirs(self) -> None:
        self.fs.create_dir(self.path, recursive=True)

    def exists_dir(self) -> bool:
        return self.fs.get_file_info(self.path).type == pafs.FileType.Directory

    def delete_dir_if_empty(self) -> None:
        """Remove the directory if nothing is in it (on object stores a directory is only a prefix)."""
        try:
            if not self.fs.get_file_info(pafs.FileSelector(self.path, allow_not_found=True)):
                self.fs.delete_dir(self.path)
        except (FileNotFoundError, OSError):
            pass

    def exists(self, name: str) -> bool:
        return self.fs.get_file_info(self.join(name)).type == pafs.FileType.File

    def list_files(self) -> dict[str, int]:
        """File name -> size, for the files directly in the directory (one listing call)."""
        infos = self.fs.get_file_info(pafs.FileSelector(self.path, allow_not_found=True))
        return {i.base_name: i.size for i in infos if i.type == pafs.FileType.File}

    def read_bytes(self, name: str) -> bytes | None:
        try:
            with self.fs.open_input_stream(self.join(name), compression=None) as f:
                return f.read()
        except FileNotFoundError:
            return None

    def delete(self, name: str) -> None:
        try:
            self.fs.delete_file(self.join(name))
        except FileNotFoundError:
            pass

    def delete_tree(self) -> None:
        """Remove the directory and everything below it (nothing if it does not exist)."""
        try:
            self.fs.delete_dir(self.path)
        except (FileNotFoundError, OSError):
            pass

    def write_atomic(self, name: str, write: Callable[[BinaryIO], object]) -> None:
        """Make `name` appear whole or not at all: a temporary file renamed into place (local disks,
        HDFS, ...), or one PUT of the final object on object stores (atomic per object there)."""
        local = self.local_path
        if local is not None:
            atomic_write(local / name, write)
            return
        if self.object_store:
            try:
                with self.fs.open_output_stream(self.join(name), compression=None) as f:
                    write(f)
            except BaseException:  # closing the stream completed the upload: take the partial object back
                self.delete(name)
                raise
            return
        tmp = self.join(_temporary_name(name))
        try:
            with self.fs.open_output_stream(tmp, compression=None) as f:
                write(f)
            self.fs.move(tmp, self.join(name))
        except BaseException:
            try:
                self.fs.delete_file(tmp)
            except (FileNotFoundError, OSError):
                pass
            raise


@dataclass(frozen=True)
class InputFile:
    """An input file wherever it lives, with what identifies its content for --resume (size, mtime).

    `stream()` reads it from the start, gzip decompressed (by its magic bytes, not its name);
    `random_access()` reads byte ranges of a plain file (the index's offsets)."""

    uri: str  # as given (a local path is made absolute)
    fs: pafs.FileSystem
    path: str
    size: int
    mtime_ns: int | None
    gzip: bool

    @classmethod
    def open(cls, where: str | os.PathLike) -> "InputFile":
        """Look the file up (one metadata call); FileNotFoundError / IsADirectoryError as for a local file."""
        fs, path = resolve(where)
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            raise FileNotFoundError(2, "No such file or directory", os.fspath(where))
        if info.type == pafs.FileType.Directory:
            raise IsADirectoryError(21, "Is a directory", os.fspath(where))
        with fs.open_input_stream(path, compression=None) as f:
            gzip = f.read(2) == GZIP_MAGIC
        uri = os.fspath(where) if is_uri(where) else path
        return cls(uri, fs, path, int(info.size or 0), info.mtime_ns, gzip)

    @property
    def name(self) -> str:
        return self.path.rstrip("/").rsplit("/", 1)[-1]

    def identity(self) -> tuple:
        """What says the content is the one indexed before, wherever the file now is: its size, modification
        time and a hash of its first and last MiB (two reads, however large the file)."""
        digest = hashlib.sha256()
        with self.random_access() as f:
            digest.update(f.read_at(min(self.size, 1 << 20), 0))
            digest.update(f.read_at(min(self.size, 1 << 20), max(0, self.size - (1 << 20))))
        return (self.size, self.mtime_ns, digest.hexdigest()[:16])

    def stream(self, decompress: bool = True) -> pa.NativeFile:
        """The file from its start, sequentially; gzip decompressed unless `decompress` is False."""
        raw = self.fs.open_input_stream(self.path, compression=None)
        return pa.CompressedInputStream(raw, "gzip") if self.gzip and decompress else raw

    def random_access(self) -> pa.NativeFile:
        """The (plain) file for reads at byte offsets (`read_at`)."""
        return self.fs.open_input_file(self.path)


__all__ = ["Location", "InputFile", "atomic_path", "atomic_write", "resolve", "is_uri", "is_object_store"]
