"""Where results go: a local folder today, S3-compatible stores behind the same interface.

Names come from a template and are sanitised so that no row (nor its `output` column)
can write outside the output prefix. Local writes are atomic: a reader never sees half
a file, and a crash leaves the old file or none.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path, PurePosixPath
from typing import Protocol

from soundpatch.errors import ConfigError, RowError

DEFAULT_TEMPLATE = "{run_id}/{stem}-{row_id}.{ext}"
_UNSAFE = re.compile(r"[^A-Za-z0-9._\-]+")


class OutputStore(Protocol):
    def put(self, name: str, data: bytes, content_type: str, metadata: dict[str, str]) -> str: ...

    def exists(self, name: str) -> bool: ...

    def uri(self, name: str) -> str: ...

    def exists_uri(self, uri: str) -> bool:
        """Whether a result this store returned from put() is still there."""
        ...


def output_name(template: str | None, fields: dict[str, str]) -> str:
    """Render a name template ({run_id}, {row_id}, {stem}, {seed}, {ext}) into a safe relative path.

    A row's `output` without placeholders is taken as a name; the extension is added
    when missing. Each path part is reduced to letters, digits, `.`, `_` and `-`, and
    `..` or absolute paths cannot climb out of the prefix.
    """
    template = template or DEFAULT_TEMPLATE
    try:
        rendered = template.format(**fields)
    except (KeyError, IndexError, ValueError) as exc:
        raise RowError(
            f"output template {template!r} is not valid ({exc}); use {{run_id}}, {{row_id}}, "
            "{stem}, {seed}, {ext}"
        ) from None
    parts = []
    for part in PurePosixPath(rendered.replace("\\", "/")).parts:
        if part in ("/", ".", ".."):
            continue
        safe = _UNSAFE.sub("_", part).strip("._") or "_"
        parts.append(safe[:200])
    if not parts:
        raise RowError(f"output name {template!r} is empty after removing unsafe characters")
    name = "/".join(parts)
    ext = "." + fields["ext"]
    if not name.lower().endswith(ext):
        name += ext
    return name


class LocalFolder:
    """Outputs under a local folder; metadata goes in a `<name>.json` sidecar."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser().resolve()
        if self.root.exists() and not self.root.is_dir():
            raise ConfigError(f"output.uri {self.root} is a file, not a folder.")

    def _path(self, name: str) -> Path:
        path = (self.root / name).resolve()
        if self.root not in path.parents:
            raise RowError(f"output name {name!r} would leave the output folder")
        return path

    def put(self, name: str, data: bytes, content_type: str, metadata: dict[str, str]) -> str:
        path = self._path(name)
        atomic_write(path, data)
        sidecar = {"content_type": content_type, **metadata}
        atomic_write(path.with_name(path.name + ".json"), json.dumps(sidecar, indent=2).encode())
        return str(path)

    def exists(self, name: str) -> bool:
        return self._path(name).is_file()

    def uri(self, name: str) -> str:
        return str(self._path(name))

    def exists_uri(self, uri: str) -> bool:
        return Path(uri).is_file()


def atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def open_store(uri: str) -> OutputStore:
    if uri.startswith("s3://"):
        raise ConfigError("output.uri s3:// is not supported by this version of soundpatch yet; use a local folder.")
    if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", uri):
        raise ConfigError(f"output.uri {uri!r} must be a local folder or s3://bucket/prefix/.")
    return LocalFolder(uri)
