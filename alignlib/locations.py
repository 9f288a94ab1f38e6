"""Where outputs live: a local `Path`, or a `RemotePath` in an object store (`s3://bucket/key`).

`location()` turns an `output_dir` (or any path or URI) into one of the two; both offer the part of
`pathlib.Path` the stages use, and the helpers here (`rmtree`, `copytree`, `move`, `local_copy`)
work on either. Object-store access goes through pyarrow's filesystems, which take the endpoint and
credentials from the standard environment (`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, ...).
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import shutil
import uuid
from pathlib import Path
from typing import Union

import pyarrow.fs as pafs

from alignlib.uri import is_uri


class RemotePath:
    """A file or directory in an object store, with the part of `pathlib.Path` the stages use.

    `str()` is the URI, which Ray Data, Ray Train and pyarrow resolve with the environment's
    credentials; the filesystem object itself is made once per process from the URI.
    """

    def __init__(self, uri: str, fs: pafs.FileSystem | None = None, path: str | None = None):
        scheme, _, rest = uri.partition("://")
        self.scheme = scheme
        self.path = (path if path is not None else rest).rstrip("/")
        self.fs = fs if fs is not None else _filesystem(scheme, self.path.split("/", 1)[0])

    def __str__(self) -> str:
        return f"{self.scheme}://{self.path}"

    def __repr__(self) -> str:
        return f"RemotePath({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RemotePath) and str(self) == str(other)

    def __hash__(self) -> int:
        return hash(str(self))

    def __truediv__(self, part: str) -> RemotePath:
        return RemotePath(self.scheme + "://", self.fs, f"{self.path}/{str(part).strip('/')}")

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    @property
    def parent(self) -> RemotePath:
        return RemotePath(self.scheme + "://", self.fs, self.path.rsplit("/", 1)[0])

    def with_name(self, name: str) -> RemotePath:
        return self.parent / name

    def _info(self) -> pafs.FileInfo:
        return self.fs.get_file_info(self.path)

    def exists(self) -> bool:
        return self._info().type != pafs.FileType.NotFound

    def is_dir(self) -> bool:
        return self._info().type == pafs.FileType.Directory

    def is_file(self) -> bool:
        return self._info().type == pafs.FileType.File

    def read_bytes(self) -> bytes:
        with self.fs.open_input_stream(self.path) as f:
            return f.read()

    def read_text(self) -> str:
        return self.read_bytes().decode()

    def write_text(self, text: str) -> None:
        with self.fs.open_output_stream(self.path) as f:
            f.write(text.encode())

    def mkdir(self, parents: bool = True, exist_ok: bool = True) -> None:
        """Nothing to do: an object store's directories are the keys' prefixes (markers only get in the way)."""

    def iterdir(self) -> list[RemotePath]:
        if not self.is_dir():
            return []
        infos = self.fs.get_file_info(pafs.FileSelector(self.path, allow_not_found=True))
        return [RemotePath(self.scheme + "://", self.fs, i.path) for i in infos]

    def glob(self, pattern: str) -> list[RemotePath]:
        return [p for p in self.iterdir() if fnmatch.fnmatchcase(p.name, pattern)]

    def rglob(self, pattern: str) -> list[RemotePath]:
        if not self.is_dir():
            return []
        infos = self.fs.get_file_info(pafs.FileSelector(self.path, recursive=True, allow_not_found=True))
        found = [RemotePath(self.scheme + "://", self.fs, i.path) for i in infos]
        return [p for p in found if fnmatch.fnmatchcase(p.name, pattern)]

    def unlink(self, missing_ok: bool = False) -> None:
        if missing_ok and not self.exists():
            return
        self.fs.delete_file(self.path)

    @property
    def suffix(self) -> str:
        return Path(self.name).suffix


StorePath = Union[Path, RemotePath]
_FILESYSTEMS: dict[tuple[str, str], pafs.FileSystem] = {}


def _filesystem(scheme: str, bucket: str) -> pafs.FileSystem:
    key = (scheme, bucket)
    if key not in _FILESYSTEMS:
        _FILESYSTEMS[key] = pafs.FileSystem.from_uri(f"{scheme}://{bucket}")[0]
    return _FILESYSTEMS[key]


def location(value: str | StorePath) -> StorePath:
    """A path or URI as a `Path` (local, absolute) or a `RemotePath` (object store)."""
    if isinstance(value, RemotePath):
        return value
    if is_uri(str(value)):
        return RemotePath(str(value))
    return Path(value).expanduser().resolve()


def fs_path(where: StorePath) -> tuple[pafs.FileSystem | None, str]:
    """(filesystem, path) for pyarrow readers; filesystem None means local."""
    return (where.fs, where.path) if isinstance(where, RemotePath) else (None, str(where))


def rmtree(where: StorePath) -> None:
    """Delete a directory tree (or file) if it exists."""
    if isinstance(where, RemotePath):
        info = where._info()
        if info.type == pafs.FileType.Directory:
            where.fs.delete_dir_contents(where.path, missing_dir_ok=True)
            try:  # the directory itself: in S3 only a marker object, which a store may not have kept
                where.fs.delete_dir(where.path)
            except FileNotFoundError:
                pass
        elif info.type == pafs.FileType.File:
            where.fs.delete_file(where.path)
    else:
        shutil.rmtree(where, ignore_errors=True)


def copytree(source: StorePath, target: StorePath) -> None:
    """Copy a directory tree between any two locations (local, object store, or one of each)."""
    if isinstance(source, Path) and isinstance(target, Path):
        shutil.copytree(source, target)
        return
    source_fs, source_path = fs_path(source)
    target_fs, target_path = fs_path(target)
    local = pafs.LocalFileSystem()
    if isinstance(target, Path):
        target.mkdir(parents=True, exist_ok=True)
    pafs.copy_files(
        source_path,
        target_path,
        source_filesystem=source_fs or local,
        destination_filesystem=target_fs or local,
        use_threads=True,
    )


def move(source: StorePath, target: StorePath) -> None:
    """Move a directory tree: a rename on a local disk, a copy then delete in an object store."""
    if isinstance(source, Path) and isinstance(target, Path):
        source.rename(target)
        return
    copytree(source, target)
    rmtree(source)


def local_copy(where: StorePath, cache: Path) -> Path:
    """A local directory holding `where`'s files: itself when local, else a copy under `cache`.

    The cache key is the URI and its files' names, sizes and modification times, so a rewritten
    object is fetched again and an unchanged one only once (engines load from local disk).
    """
    if isinstance(where, Path):
        return where
    target = cache / f"{where.name}-{listing_key(where)}"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
        copytree(where, tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process fetched it first; its copy is the same files
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def listing_key(where: RemotePath) -> str:
    """A digest of the URI and its files' names, sizes and modification times (no download)."""
    infos = where.fs.get_file_info(pafs.FileSelector(where.path, recursive=True, allow_not_found=True))
    listing = sorted((i.path, i.size, i.mtime_ns) for i in infos if i.type == pafs.FileType.File)
    if not listing:
        raise FileNotFoundError(f"{where} holds no files")
    return hashlib.sha256(json.dumps([str(where), listing]).encode()).hexdigest()[:16]
