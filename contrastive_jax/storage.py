"""One filesystem layer for workdirs, checkpoints, metrics and data: local paths, ``s3://``, ``gs://``.

Local paths (anything without a ``scheme://`` prefix, or ``file://``) go straight to :mod:`os` and
the built-in :func:`open`, so they behave exactly as before this module existed. Remote URLs go
through `fsspec <https://filesystem-spec.readthedocs.io>`_ (``s3fs`` for ``s3://``, ``gcsfs`` for
``gs://``), imported only when a remote path is first used, so importing this module costs nothing.

Credentials and endpoints come from the usual places of each backend (for S3: ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``, ``~/.aws/``; an S3-compatible server such as
MinIO or moto is chosen with ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL``).

Atomicity: :func:`write_text` / :func:`write_json` never leave a half-written file under the final
name: locally they write ``<name>.tmp-<pid>`` and :func:`os.replace` it; on object stores a PUT is
atomic per object (readers see the old object or the new one). Object stores have no rename of
directories and no append, so code that needs "complete or absent" for a directory writes a marker
object last (see :mod:`contrastive_jax.train.checkpoint`).
"""
from __future__ import annotations

import builtins
import contextlib
import json
import os
import re
import shutil
import tempfile
from typing import IO, Any, Iterator

__all__ = ["abspath", "append_text", "basename", "copy_dir_from", "copy_dir_to", "exists", "filesystem", "isdir", "isfile",
           "is_remote", "join", "listdir", "makedirs", "open", "read_json", "read_text", "reading_locally", "remove",
           "rmtree", "write_json", "write_text", "writing_locally"]

_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")


def is_remote(path: str) -> bool:
    """True for ``scheme://...`` URLs other than ``file://`` (``s3://b/k``, ``gs://b/k``, ``memory://x``)."""
    m = _SCHEME.match(str(path))
    return bool(m) and m.group(1).lower() != "file"


def _local(path: str) -> str:
    path = str(path)
    return path[len("file://"):] if path.lower().startswith("file://") else path


def abspath(path: str) -> str:
    """Local: ``os.path.abspath(os.path.expanduser(path))``; remote: the URL without a trailing ``/``."""
    if is_remote(path):
        return str(path).rstrip("/")
    return os.path.abspath(os.path.expanduser(_local(path)))


def join(base: str, *parts: str) -> str:
    """``os.path.join`` for local paths; ``/``-joined for URLs (object keys always use ``/``)."""
    if not is_remote(base):
        return os.path.join(_local(base), *parts)
    out = str(base).rstrip("/")
    for p in parts:
        out += "/" + str(p).strip("/")
    return out


def basename(path: str) -> str:
    """The last component (``s3://b/run/metrics.jsonl`` -> ``metrics.jsonl``)."""
    return str(path).rstrip("/").rsplit("/", 1)[-1] if is_remote(path) else os.path.basename(_local(path))


def filesystem(path: str):
    """``(fs, fs_path)``: the fsspec filesystem for a URL and the path in that filesystem's terms
    (the URL without its scheme). Raises ImportError naming the package to install for the scheme."""
    import fsspec  # lazily: local-only runs never import it

    try:
        return fsspec.core.url_to_fs(str(path))
    except ImportError as e:
        scheme = _SCHEME.match(str(path)).group(1)
        package = {"s3": "s3fs", "gs": "gcsfs", "gcs": "gcsfs"}.get(scheme.lower(), f"the fsspec backend for {scheme}://")
        raise ImportError(f"{path}: reading/writing {scheme}:// needs {package} (pip install {package})") from e


def exists(path: str) -> bool:
    """Whether a file or directory (for object stores: an object or a key prefix) exists."""
    if not is_remote(path):
        return os.path.exists(_local(path))
    fs, p = filesystem(path)
    return fs.exists(p)


def isdir(path: str) -> bool:
    """Local directory, or a key prefix with at least one object below it."""
    if not is_remote(path):
        return os.path.isdir(_local(path))
    fs, p = filesystem(path)
    fs.invalidate_cache(p)
    return fs.isdir(p)


def isfile(path: str) -> bool:
    """Local regular file, or an object with exactly this key."""
    if not is_remote(path):
        return os.path.isfile(_local(path))
    fs, p = filesystem(path)
    fs.invalidate_cache(p)
    return fs.isfile(p)


def makedirs(path: str, exist_ok: bool = True) -> None:
    """``os.makedirs``; for object stores nothing is needed below the bucket (prefixes are implicit),
    so only the bucket's existence is checked (FileNotFoundError names it)."""
    if not is_remote(path):
        os.makedirs(_local(path), exist_ok=exist_ok)
        return
    fs, p = filesystem(path)
    bucket = p.split("/", 1)[0]
    if not fs.exists(bucket):
        raise FileNotFoundError(f"{path}: bucket {bucket!r} does not exist (create it first)")


def listdir(path: str) -> list[str]:
    """Names (not paths) directly under ``path``, like ``os.listdir``; [] for a missing remote prefix."""
    if not is_remote(path):
        return os.listdir(_local(path))
    fs, p = filesystem(path)
    fs.invalidate_cache(p)
    try:
        entries = fs.ls(p, detail=False)
    except FileNotFoundError:
        return []
    return sorted({e.rstrip("/").rsplit("/", 1)[-1] for e in entries if e.rstrip("/") != p.rstrip("/")})


def open(path: str, mode: str = "r", encoding: str | None = None, **kwargs: Any) -> IO:  # noqa: A001 - mirrors builtins.open
    """``builtins.open`` for local paths; ``fsspec`` open for URLs (text modes default to UTF-8 there).

    A remote file opened for writing becomes visible only when closed (one PUT / multipart upload).
    """
    if not is_remote(path):
        return builtins.open(_local(path), mode, encoding=encoding, **kwargs)
    import fsspec

    if "b" not in mode and encoding is None:
        encoding = "utf-8"
    return fsspec.open(str(path), mode, encoding=encoding, **kwargs).open()


def read_text(path: str, encoding: str = "utf-8") -> str:
    """The whole file as text."""
    with open(path, "r", encoding=encoding) as fh:
        return fh.read()


def read_json(path: str) -> Any:
    """The parsed JSON of a file."""
    return json.loads(read_text(path))


def write_text(path: str, text: str, encoding: str = "utf-8") -> None:
    """Writes ``text`` so that readers see the old content or the new one, never a prefix.

    Local: written to ``<path>.tmp-<pid>``, flushed and fsync'ed, then :func:`os.replace`; the temp
    file is removed if writing fails (e.g. ENOSPC) and the error re-raised. Remote: one PUT.
    """
    if is_remote(path):
        with open(path, "w", encoding=encoding) as fh:
            fh.write(text)
        return
    path = _local(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with builtins.open(tmp, "w", encoding=encoding) as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_json(path: str, payload: Any, indent: int | None = 2) -> None:
    """:func:`write_text` of ``json.dumps(payload)`` (atomic, see there)."""
    write_text(path, json.dumps(payload, indent=indent) + "\n")


def append_text(path: str, text: str) -> None:
    """Appends ``text``. Object stores cannot append: the object is read, extended and rewritten
    (one PUT, so it is still never half-written; cost grows with the file, fine for metrics logs
    flushed every few hundred steps)."""
    if not is_remote(path):
        with builtins.open(_local(path), "a", encoding="utf-8") as fh:
            fh.write(text)
        return
    old = read_text(path) if isfile(path) else ""
    write_text(path, old + text)


def remove(path: str) -> None:
    """Deletes one file (object); FileNotFoundError if missing, like ``os.remove``."""
    if not is_remote(path):
        os.remove(_local(path))
        return
    fs, p = filesystem(path)
    if not fs.exists(p):
        raise FileNotFoundError(path)
    fs.rm_file(p)


def rmtree(path: str) -> None:
    """Deletes a directory (every object under a prefix) and everything in it."""
    if not is_remote(path):
        shutil.rmtree(_local(path))
        return
    fs, p = filesystem(path)
    fs.rm(p, recursive=True)
    fs.invalidate_cache(p)


def copy_dir_to(local_dir: str, dest: str) -> None:
    """Copies a local directory tree to ``dest`` (local or remote), file by file; ``dest`` then
    holds the same relative paths. Used to upload checkpoints staged locally."""
    if not is_remote(dest):
        shutil.copytree(local_dir, _local(dest), dirs_exist_ok=True)
        return
    fs, p = filesystem(dest)
    for root, _, files in os.walk(local_dir):
        rel = os.path.relpath(root, local_dir)
        for name in files:
            key = p.rstrip("/") + "/" + (name if rel == "." else f"{rel.replace(os.sep, '/')}/{name}")
            fs.put_file(os.path.join(root, name), key)
    fs.invalidate_cache(p)


def copy_dir_from(src: str, local_dir: str) -> None:
    """Copies the tree under ``src`` (local or remote) into the local directory ``local_dir``
    (created); the inverse of :func:`copy_dir_to`. Used to read checkpoints kept remotely."""
    if not is_remote(src):
        shutil.copytree(_local(src), local_dir, dirs_exist_ok=True)
        return
    fs, p = filesystem(src)
    fs.invalidate_cache(p)
    prefix = p.rstrip("/") + "/"
    for key in fs.find(p):
        rel = key[len(prefix):] if key.startswith(prefix) else os.path.basename(key)
        target = os.path.join(local_dir, *rel.split("/"))
        os.makedirs(os.path.dirname(target), exist_ok=True)
        fs.get_file(key, target)


@contextlib.contextmanager
def writing_locally(path: str) -> Iterator[str]:
    """A local path to write ``path``'s content to, for writers that only take local paths (a
    tokenizer's ``save``, a library's exporter): ``path`` itself when local; for a URL, a temporary
    file uploaded (one PUT) when the block ends without an error, then deleted.

    Example::

        with storage.writing_locally("s3://b/run/tokenizer.json") as local:
            tokenizer.save(local)
    """
    if not is_remote(path):
        yield _local(path)
        return
    fd, tmp = tempfile.mkstemp(prefix="contrastive_jax_", suffix="-" + basename(path))
    os.close(fd)
    try:
        yield tmp
        fs, p = filesystem(path)
        fs.put_file(tmp, p)
        fs.invalidate_cache(p)
    finally:
        os.remove(tmp)


@contextlib.contextmanager
def reading_locally(path: str) -> Iterator[str]:
    """A local path holding ``path``'s content, for readers that only take local paths: ``path``
    itself when local; for a URL, a temporary download deleted when the block ends."""
    if not is_remote(path):
        yield _local(path)
        return
    fd, tmp = tempfile.mkstemp(prefix="contrastive_jax_", suffix="-" + basename(path))
    os.close(fd)
    try:
        fs, p = filesystem(path)
        fs.get_file(p, tmp)
        yield tmp
    finally:
        os.remove(tmp)
