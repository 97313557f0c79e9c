"""The artifact store: checksummed files and directories on any fsspec filesystem.

Writes return an ``ArtifactRef`` (uri, sha256, size); reads verify the sha256
recorded in the registry and refuse a file whose bytes changed. Every URI must
lie under the configured root: ``..`` tricks and foreign URLs are refused.

A directory artifact (a Hugging Face model folder) has the sha256 of its
manifest: the sorted lines ``<relative path>\\t<sha256>\\t<size>`` of its files.
Files are written to a temporary name and moved into place, so a crash never
leaves a file that looks complete; a directory is complete once its manifest
checks out, which is what a read verifies.
"""

from __future__ import annotations

import hashlib
import tempfile
import posixpath
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import fsspec
from sqlalchemy import select
from sqlalchemy.orm import Session

from store.errors import ArtifactError, ChecksumMismatch, Conflict, NotFound, UriOutsideRoot
from store.models import Artifact

CHUNK = 1 << 20


@dataclass(frozen=True)
class ArtifactRef:
    """Where an artifact lives and what its bytes hash to."""

    uri: str
    sha256: str
    size_bytes: int
    is_dir: bool = False


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def _manifest_sha(entries: list[tuple[str, str, int]]) -> str:
    lines = "".join(f"{rel}\t{sha}\t{size}\n" for rel, sha, size in sorted(entries))
    return sha256_bytes(lines.encode())


class ArtifactStore:
    """Artifacts under one root URL (a local folder, ``s3://bucket/prefix``, ``memory://x``)."""

    def __init__(self, root_url: str):
        self.fs, root = fsspec.core.url_to_fs(root_url)
        self.root = posixpath.normpath(root).rstrip("/") or "/"
        self.root_url = self.fs.unstrip_protocol(self.root)
        self.fs.makedirs(self.root, exist_ok=True)

    # --- paths -------------------------------------------------------------

    def _key_path(self, key: str) -> str:
        if not key or key.startswith("/") or "\\" in key:
            raise UriOutsideRoot(f"artifact key {key!r} must be a relative posix path")
        return self._inside(posixpath.join(self.root, key), shown=key)

    def _inside(self, path: str, shown: str) -> str:
        norm = posixpath.normpath(path)
        if norm != self.root and not norm.startswith(self.root.rstrip("/") + "/"):
            raise UriOutsideRoot(f"{shown!r} lies outside the artifact root {self.root_url}")
        return norm

    def path_of(self, uri: str) -> str:
        """The filesystem path of ``uri``; refuses URIs outside the root."""
        fs, path = fsspec.core.url_to_fs(uri)
        if fs.protocol != self.fs.protocol and set(_protocols(fs)).isdisjoint(_protocols(self.fs)):
            raise UriOutsideRoot(f"{uri!r} is not on the artifact filesystem {self.root_url}")
        return self._inside(path, shown=uri)

    def uri_of(self, key: str) -> str:
        """The URI an artifact stored under ``key`` gets."""
        return self.fs.unstrip_protocol(self._key_path(key))

    # --- writes ------------------------------------------------------------

    def put_bytes(self, key: str, data: bytes) -> ArtifactRef:
        """Write ``data`` under ``key`` atomically; returns its ref."""
        path = self._key_path(key)
        self._atomic_write(path, [data])
        return ArtifactRef(self.fs.unstrip_protocol(path), sha256_bytes(data), len(data))

    def put_file(self, key: str, local_path: str | Path) -> ArtifactRef:
        """Copy a local file under ``key`` atomically; returns its ref."""
        path = self._key_path(key)
        digest, size = hashlib.sha256(), 0

        def chunks() -> Iterator[bytes]:
            nonlocal size
            with open(local_path, "rb") as fh:
                while block := fh.read(CHUNK):
                    digest.update(block)
                    size += len(block)
                    yield block

        self._atomic_write(path, chunks())
        return ArtifactRef(self.fs.unstrip_protocol(path), digest.hexdigest(), size)

    def put_dir(self, key: str, local_dir: str | Path) -> ArtifactRef:
        """Copy a local directory (e.g. a Hugging Face model folder) under ``key``."""
        local_dir = Path(local_dir)
        if not local_dir.is_dir():
            raise NotFound(f"{local_dir} is not a directory")
        path = self._key_path(key)
        entries = []
        for file in sorted(p for p in local_dir.rglob("*") if p.is_file()):
            rel = file.relative_to(local_dir).as_posix()
            ref = self.put_file(posixpath.join(key, rel), file)
            entries.append((rel, ref.sha256, ref.size_bytes))
        return ArtifactRef(
            self.fs.unstrip_protocol(path), _manifest_sha(entries), sum(e[2] for e in entries), is_dir=True
        )

    def _atomic_write(self, path: str, chunks) -> None:
        self.fs.makedirs(posixpath.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        try:
            with self.fs.open(tmp, "wb") as fh:
                for block in chunks:
                    fh.write(block)
            self.fs.mv(tmp, path)
        except BaseException:
            if self.fs.exists(tmp):
                self.fs.rm(tmp)
            raise

    # --- reads -------------------------------------------------------------

    def read_bytes(self, uri: str, sha256: str) -> bytes:
        """The bytes of a file artifact, after checking them against ``sha256``."""
        path = self.path_of(uri)
        if not self.fs.exists(path):
            raise NotFound(f"artifact {uri} does not exist")
        data = self.fs.cat_file(path)
        actual = sha256_bytes(data)
        if actual != sha256:
            raise ChecksumMismatch(
                f"artifact {uri} is corrupt or was tampered with: sha256 {actual}, the registry says {sha256}"
            )
        return data

    def fetch_file(self, uri: str, sha256: str, dest: str | Path) -> Path:
        """Copy a file artifact to ``dest``, verifying it; a bad copy is removed."""
        dest = Path(dest)
        path = self.path_of(uri)
        if not self.fs.exists(path):
            raise NotFound(f"artifact {uri} does not exist")
        dest.parent.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        with self.fs.open(path, "rb") as src, open(dest, "wb") as out:
            while block := src.read(CHUNK):
                digest.update(block)
                out.write(block)
        if digest.hexdigest() != sha256:
            dest.unlink()
            raise ChecksumMismatch(
                f"artifact {uri} is corrupt or was tampered with: sha256 {digest.hexdigest()}, "
                f"the registry says {sha256}"
            )
        return dest

    def fetch_dir(self, uri: str, sha256: str, dest: str | Path) -> Path:
        """Copy a directory artifact to ``dest`` and verify its manifest sha256."""
        dest = Path(dest)
        root = self.path_of(uri)
        if not self.fs.isdir(root):
            raise NotFound(f"directory artifact {uri} does not exist")
        entries = []
        for path in sorted(self.fs.find(root)):
            if ".tmp-" in posixpath.basename(path):
                continue
            rel = posixpath.relpath(path, root)
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            digest, size = hashlib.sha256(), 0
            with self.fs.open(path, "rb") as src, open(target, "wb") as out:
                while block := src.read(CHUNK):
                    digest.update(block)
                    size += len(block)
                    out.write(block)
            entries.append((rel, digest.hexdigest(), size))
        actual = _manifest_sha(entries)
        if actual != sha256:
            raise ChecksumMismatch(
                f"directory artifact {uri} is corrupt, incomplete or was tampered with: "
                f"manifest sha256 {actual}, the registry says {sha256}"
            )
        return dest

    def verify(self, ref: ArtifactRef | Artifact) -> None:
        """Raise ``ChecksumMismatch`` unless the stored bytes match ``ref``."""
        if ref.is_dir:
            with tempfile.TemporaryDirectory() as tmp:
                self.fetch_dir(ref.uri, ref.sha256, tmp)
        else:
            self.read_bytes(ref.uri, ref.sha256)


def _protocols(fs) -> tuple[str, ...]:
    proto = fs.protocol
    return tuple(proto) if isinstance(proto, (tuple, list)) else (proto,)


# --- registry rows ------------------------------------------------------------


def register_artifact(session: Session, ref: ArtifactRef) -> Artifact:
    """The registry row for ``ref``; an existing row for the same URI and bytes is reused."""
    existing = session.scalar(select(Artifact).where(Artifact.uri == ref.uri))
    if existing is not None:
        if existing.sha256 != ref.sha256:
            raise Conflict(
                f"artifact {ref.uri} is registered with sha256 {existing.sha256}; "
                f"refusing to re-register it as {ref.sha256}"
            )
        return existing
    row = Artifact(uri=ref.uri, sha256=ref.sha256, size_bytes=ref.size_bytes, is_dir=ref.is_dir)
    session.add(row)
    session.flush()
    return row


def get_artifact(session: Session, artifact_id: int) -> Artifact:
    """The artifact row ``artifact_id``."""
    row = session.get(Artifact, artifact_id)
    if row is None:
        raise NotFound(f"artifact {artifact_id} does not exist")
    return row


__all__ = [
    "ArtifactError",
    "ArtifactRef",
    "ArtifactStore",
    "get_artifact",
    "register_artifact",
    "sha256_bytes",
]
