"""Where results go: a local folder or an S3-compatible prefix, behind one interface.

Names come from a template and are sanitised so that no row (nor its `output` column)
can write outside the output prefix. Local writes are atomic: a reader never sees half
a file, and a crash leaves the old file or none.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import os
import re
import secrets
import shutil
import tempfile
import unicodedata
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path, PurePosixPath
from typing import Protocol
from urllib.parse import quote

from soundpatch.disk_room import full_disk
from soundpatch.errors import ConfigError, OutOfRoom, RowError
from soundpatch.s3 import S3, NoConditionalWrites, S3Uri

DEFAULT_TEMPLATE = "{run_id}/{stem}-{row_id}.{ext}"
_UNSAFE = re.compile(r"[^\w.\-]+")  # \w: letters and digits of any script, and _
MAX_PART_BYTES = 200  # a file name; most file systems take 255 bytes


class OutputStore(Protocol):
    """A folder or bucket prefix that results, their index records and run reports go into."""

    remote: bool  # reports are copied next to the outputs when True

    def ready(self) -> None:
        """Raise ConfigError once, before any row, if the store cannot be written."""
        ...

    def put(self, name: str, data: bytes | Path, content_type: str, metadata: dict[str, str]) -> str:
        """A result under `name`: its bytes, or a file of this run's scratch folder (which the
        store may take as it is: the caller removes its own name for it afterwards)."""
        ...

    def put_file(self, name: str, data: bytes, content_type: str) -> str:
        """A plain file under the prefix (a report), without result metadata."""
        ...

    def read_file(self, name: str, max_bytes: int) -> tuple[bytes, str] | None:
        """A plain file under the prefix (a dataset's index) and a tag of its version, for
        `put_file_if`; None if there is none. RowError if it is over `max_bytes`."""
        ...

    def put_file_if(self, name: str, data: bytes, content_type: str, version: str | None) -> bool:
        """`put_file`, only if the file is still at `version` (`read_file`'s; None: there is
        none yet); False if another process wrote it meanwhile."""
        ...

    def names(self, folder: str) -> set[str]:
        """The names of the plain files right in `folder` under the prefix (the answers kept
        with the results), listed at once: a bucket's thousand a request."""
        ...

    def copy(self, uri: str, name: str, metadata: dict[str, str]) -> str:
        """A result this store holds, copied under a new name with new metadata."""
        ...

    def opened(self, uri: str) -> AbstractContextManager[Path]:
        """A result this store holds, as a file to read (never held as bytes): a local one
        where it is, a bucket's spooled to a temporary file while the context lasts."""
        ...

    def uri(self, name: str) -> str: ...

    def name_key(self, name: str) -> str:
        """What two names that are one file here have in common: the name itself, or where
        upper and lower case are one (macOS's and Windows' usual disks) the name case-folded."""
        ...

    def holds(self, uri: str, identity: str | None) -> bool:
        """Whether a result this store returned from put() is still there, and still the
        result of edit `identity` (its metadata says so): a later result given the same
        name (another run, a changed row) replaces it. None: whatever result is there."""
        ...

    def get_record(self, identity: str) -> dict | None:
        """The index record of the result with this edit identity, if one was published here."""
        ...

    def put_record(self, identity: str, record: dict) -> None: ...


INDEX_PREFIX = ".soundpatch/results"  # user names cannot start with "." (see output_name)


def output_name(template: str | None, fields: dict[str, str]) -> str:
    """Render a name template ({run_id}, {row_id}, {stem}, {seed}, {ext}, ...) into a safe relative path.

    A row's `output` without placeholders is taken as a name; the extension is added
    when missing. Each path part is reduced to letters and digits (of any script, composed
    as NFC, so a name from macOS matches the same name from elsewhere), `.`, `_` and `-`,
    and `..` or absolute paths cannot climb out of the prefix.
    """
    template = template or DEFAULT_TEMPLATE
    try:
        rendered = template.format(**fields)
    except KeyError as exc:
        raise RowError(
            f"output template {template!r} names {{{exc.args[0]}}}, which is not a column of this row nor one of "
            "{run_id}, {row_id} (or {id}), {stem}, {seed}, {steps}, {guidance_scale}, {ext}, {prompt}, {start}, {end}, "
            "{variation}"
        ) from None
    except (IndexError, ValueError) as exc:
        raise RowError(
            f"output template {template!r} is not valid ({exc}); use {{run_id}}, {{row_id}}, "
            "{stem}, {seed}, {steps}, {guidance_scale}, {ext}, {prompt}, {start}, {end}, {variation} or a column of "
            "the manifest"
        ) from None
    parts = []
    for part in _path_parts(rendered.replace("\\", "/")):
        if part in ("/", ".", ".."):
            continue
        safe = _UNSAFE.sub("_", unicodedata.normalize("NFC", part)).strip("._") or "_"
        parts.append(safe.encode()[:MAX_PART_BYTES].decode("utf-8", "ignore"))
    if not parts:
        raise RowError(f"output name {template!r} is empty after removing unsafe characters")
    name = "/".join(parts)
    ext = "." + fields["ext"]
    if not name.lower().endswith(ext):
        name += ext
    return name


def _path_parts(path: str) -> list[str]:
    """PurePosixPath(path).parts, without building a path (a third of naming 100,000 rows):
    its parts between slashes, without empty ones and `.`, after its root (`//` kept as one,
    as POSIX leaves it to the system; one or three or more slashes are `/`)."""
    parts = [part for part in path.split("/") if part not in ("", ".")]
    if path.startswith("/"):
        parts.insert(0, "//" if path.startswith("//") and not path.startswith("///") else "/")
    return parts


def part_name(name: str, row_id: str) -> str:
    """Where a row's own result goes when its edit is combined with others into `name`:
    `restored/tape.flac` -> `restored/tape.rows/<row_id>.flac`."""
    path = PurePosixPath(name)
    safe = _UNSAFE.sub("_", row_id).strip("._") or "_"
    return str(path.with_name(f"{path.stem}.rows") / f"{safe[:200]}{path.suffix}")


class LocalFolder:
    """Outputs under a local folder; metadata goes in a `<name>.json` sidecar."""

    remote = False

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser().resolve()
        self._folders: dict[str, tuple[Path, bool]] = {}
        if self.root.exists() and not self.root.is_dir():
            raise ConfigError(f"output.uri {self.root} is a file, not a folder.")

    def ready(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"Cannot create the output folder {self.root}: {exc.strerror or exc}.") from None
        if not os.access(self.root, os.W_OK):
            raise ConfigError(f"The output folder {self.root} is not writable.")

    def _path(self, name: str) -> Path:
        folder, _, leaf = name.rpartition("/")
        resolved, inside = self._folder(folder)
        path = resolved / leaf
        if leaf in ("", ".", "..") or path.is_symlink():
            path = path.resolve()
            inside = self.root in path.parents
        if not inside:
            raise RowError(f"output name {name!r} would leave the output folder")
        return path

    def _folder(self, folder: str) -> tuple[Path, bool]:
        """`folder` (a name's folders) resolved under the root, and whether a file in it is
        inside the root, remembered: a manifest's rows share a few folders, and resolving
        each row's whole path took a quarter of `validate` on 100,000 rows."""
        known = self._folders.get(folder)
        if known is None:
            if len(self._folders) >= 4096:
                self._folders.clear()
            resolved = (self.root / folder).resolve() if folder else self.root
            known = self._folders[folder] = (resolved, resolved == self.root or self.root in resolved.parents)
        return known

    def put(self, name: str, data: bytes | Path, content_type: str, metadata: dict[str, str]) -> str:
        return self._put(name, data, content_type, metadata, link=True)

    def _put(self, name: str, data: bytes | Path, content_type: str, metadata: dict[str, str], link: bool) -> str:
        """`link`: a file given is linked into place where it can be (see atomic_write); a
        result copied from another name is not, so that the two stay apart."""
        path = self._path(name)
        # The metadata first: cut short between the two, a result under this name never
        # claims the identity of the one it replaces (see `holds`).
        sidecar = {"content_type": content_type, **metadata}
        _write(path.with_name(path.name + ".json"), json.dumps(sidecar, indent=2).encode())
        _write(path, data, link)
        return str(path)

    def put_file(self, name: str, data: bytes, content_type: str) -> str:
        path = self._path(name)
        atomic_write(path, data)
        return str(path)

    def read_file(self, name: str, max_bytes: int) -> tuple[bytes, str] | None:
        path = self._path(name)
        try:
            with open(path, "rb") as f:
                data = f.read(max_bytes + 1)
        except FileNotFoundError:
            return None
        if len(data) > max_bytes:
            raise RowError(f"{path} is over {max_bytes >> 20} MB")
        return data, hashlib.sha256(data).hexdigest()

    def put_file_if(self, name: str, data: bytes, content_type: str, version: str | None) -> bool:
        path = self._path(name)
        lock = self.root / ".soundpatch" / "files.lock"  # other processes writing here wait
        lock.parent.mkdir(parents=True, exist_ok=True)
        with open(lock, "a") as held:
            fcntl.flock(held, fcntl.LOCK_EX)
            try:
                with open(path, "rb") as f:
                    now: str | None = hashlib.file_digest(f, "sha256").hexdigest()
            except FileNotFoundError:
                now = None
            if now != version:
                return False
            atomic_write(path, data)
        return True

    def names(self, folder: str) -> set[str]:
        try:
            return {entry.name for entry in os.scandir(self.root / folder) if entry.is_file()}
        except FileNotFoundError:
            return set()

    def copy(self, uri: str, name: str, metadata: dict[str, str]) -> str:
        source = Path(uri)
        if self._path(name) == source.resolve():
            return str(source)  # the result already has this name: referenced, not copied
        sidecar = source.with_name(source.name + ".json")
        content_type = "application/octet-stream"
        if sidecar.is_file():
            content_type = json.loads(sidecar.read_text(encoding="utf-8")).get("content_type", content_type)
        return self._put(name, source, content_type, metadata, link=False)

    @contextmanager
    def opened(self, uri: str) -> Iterator[Path]:
        yield Path(uri)

    def uri(self, name: str) -> str:
        return str(self._path(name))

    def name_key(self, name: str) -> str:
        return name.casefold() if self._blind_to_case else name

    @functools.cached_property
    def _blind_to_case(self) -> bool:
        return blind_to_case(self.root)

    def holds(self, uri: str, identity: str | None) -> bool:
        return local_result_holds(Path(uri), identity)

    def get_record(self, identity: str) -> dict | None:
        path = self.root / INDEX_PREFIX / f"{identity}.json"
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (FileNotFoundError, ValueError):
            return None

    def put_record(self, identity: str, record: dict) -> None:
        _write(self.root / INDEX_PREFIX / f"{identity}.json", json.dumps(record, indent=2).encode())


def blind_to_case(folder: Path) -> bool:
    """Whether names differing only in case are one file in `folder` (or, not made yet, in
    the nearest folder above it): asked of the disk with a file of its own, as APFS, NTFS
    and a case-folding ext4 folder tell it no other way. False when that cannot be asked."""
    made_in = next((p for p in (folder, *folder.parents) if p.is_dir()), None)
    try:
        fd, made = tempfile.mkstemp(prefix=".soundpatch-case-", dir=made_in)  # in lower case
    except OSError:
        return False
    os.close(fd)
    try:
        head, tail = os.path.split(made)
        return os.path.exists(os.path.join(head, tail.upper()))
    finally:
        os.unlink(made)


def _write(path: Path, data: bytes | Path, link: bool = False) -> None:
    """A file of the output folder, written whole; a full disk or a folder in the way is the
    row's error (its paid result is then kept elsewhere), not an unexpected one."""
    try:
        atomic_write(path, data, link)
    except OSError as exc:
        full = full_disk(path.parent, exc)
        if full is not None:
            raise OutOfRoom(f"{path} could not be written: {full}; free some space and run it again") from None
        raise RowError(f"{path} could not be written ({exc.strerror or exc})") from None


class S3Prefix:
    """Outputs under s3://bucket/prefix/: content type and metadata on each object, multipart
    past `storage.s3.multipart_threshold_mb`. An S3 PUT is atomic: readers see the old object
    or the new one, never a part."""

    remote = True

    def __init__(self, s3: S3, uri: str) -> None:
        self.s3 = s3
        self.prefix = S3Uri.parse(uri if uri.endswith("/") else uri + "/")

    def ready(self) -> None:
        self.s3.check_bucket(self.prefix, "output.uri")

    def _uri(self, name: str) -> S3Uri:
        if name.startswith("/") or ".." in PurePosixPath(name).parts:
            raise RowError(f"output name {name!r} would leave the output prefix")
        target = self.prefix.child(name)
        if len(target.key.encode()) > MAX_KEY_BYTES:
            raise RowError(
                f"output name {name[:60]}... makes an S3 key of {len(target.key.encode())} bytes, "
                f"where S3 takes {MAX_KEY_BYTES}; give the rows shorter output names"
            )
        return target

    def put(self, name: str, data: bytes | Path, content_type: str, metadata: dict[str, str]) -> str:
        target = self._uri(name)
        self.s3.upload(target, data, content_type, s3_metadata(metadata))
        return str(target)

    def put_file(self, name: str, data: bytes, content_type: str) -> str:
        target = self._uri(name)
        self.s3.upload(target, data, content_type, {})
        return str(target)

    def read_file(self, name: str, max_bytes: int) -> tuple[bytes, str] | None:
        # One GET: its ETag is the version of the bytes it brought (a HEAD before it cost a
        # request more, each kept answer a row found); one written since fails put_file_if.
        return self.s3.get_tagged(self._uri(name), max_bytes)

    def put_file_if(self, name: str, data: bytes, content_type: str, version: str | None) -> bool:
        try:
            return self.s3.put_if(self._uri(name), data, {}, version, content_type) is not None
        except NoConditionalWrites:  # a store without them: the last writer's stands
            self.put_file(name, data, content_type)
            return True

    def names(self, folder: str) -> set[str]:
        under = self.prefix.child(folder.rstrip("/") + "/")
        leaves = (key[len(under.key) :] for key in self.s3.keys(under))
        return {leaf for leaf in leaves if leaf and "/" not in leaf}

    def copy(self, uri: str, name: str, metadata: dict[str, str]) -> str:
        target = self._uri(name)
        if str(target) == uri:
            return uri  # the result already has this name: referenced, not copied
        self.s3.copy(S3Uri.parse(uri), target, s3_metadata(metadata))
        return str(target)

    @contextmanager
    def opened(self, uri: str) -> Iterator[Path]:
        with tempfile.NamedTemporaryFile(prefix="soundpatch-result.") as spool:
            self.s3.read_into(S3Uri.parse(uri), MAX_RESULT_BYTES, spool)
            spool.flush()
            yield Path(spool.name)

    def uri(self, name: str) -> str:
        return str(self._uri(name))

    def name_key(self, name: str) -> str:
        return name  # S3 keys differing in case are two objects

    def holds(self, uri: str, identity: str | None) -> bool:
        head = self.s3.head(S3Uri.parse(uri)) if uri.startswith("s3://") else None
        return head is not None and _made_by(head.get("Metadata", {}).get("identity"), identity)

    def get_record(self, identity: str) -> dict | None:
        data = self.s3.get(self.prefix.child(f"{INDEX_PREFIX}/{identity}.json"), 1 << 20)
        if data is None:
            return None
        try:
            return json.loads(data)
        except ValueError:
            return None

    def put_record(self, identity: str, record: dict) -> None:
        target = self.prefix.child(f"{INDEX_PREFIX}/{identity}.json")
        self.s3.upload(target, json.dumps(record, indent=2).encode(), "application/json", {})


MAX_RESULT_BYTES = 4 << 30
MAX_KEY_BYTES = 1024  # S3's limit on an object key
_METADATA_BYTES = 2048  # S3's limit for all user metadata keys and values together
# Printable ASCII but '%': kept as is in metadata values; everything else is percent-encoded.
_METADATA_SAFE = "".join(chr(c) for c in range(32, 127) if chr(c) != "%")


# Never shortened to fit: what a result is recognised and priced by.
_METADATA_KEPT = ("identity", "run_id", "row_id", "source_sha256", "prediction_id", "provider", "model", "cost_usd")


def s3_metadata(metadata: dict[str, str]) -> dict[str, str]:
    """Metadata as S3 carries it: lowercase ASCII keys, values percent-encoded UTF-8 where not
    plain ASCII (a prompt in any language survives). Past S3's 2 KB limit the longest values
    are shortened to one common length, as long as the limit allows (a long prompt, whose
    full text is in the result's index record; a long extra column; a combined file's list
    of rows), each marked `<key>-truncated: true`; what identifies the result never is."""
    out: dict[str, str] = {}
    texts: dict[str, str] = {}
    for key, value in metadata.items():
        safe_key = re.sub(r"[^a-z0-9_-]+", "-", key.lower()).strip("-") or "x"
        texts[safe_key] = str(value)
        out[safe_key] = quote(str(value), safe=_METADATA_SAFE)
    if sum(len(k) + len(v) for k, v in out.items()) <= _METADATA_BYTES:
        return out
    shrinkable = [k for k in out if k not in _METADATA_KEPT]
    fixed = sum(len(k) + len(v) for k, v in out.items() if k not in shrinkable)
    fixed += sum(len(k) + len(f"{k}-truncated") + len("true") for k in shrinkable)  # markers, to be safe
    cap = max(0, _METADATA_BYTES - fixed)  # the common length: the largest the limit allows
    while cap > 0 and sum(min(len(out[k]), cap) for k in shrinkable) > _METADATA_BYTES - fixed:
        cap -= 1 + cap // 50
    for key in shrinkable:
        if len(out[key]) > cap:
            text = texts[key]
            while text and len(quote(text, safe=_METADATA_SAFE)) > cap:
                text = text[: len(text) * 9 // 10]
            out[key] = quote(text, safe=_METADATA_SAFE)
            out[f"{key}-truncated"] = "true"
    return out


def local_result_holds(path: Path, identity: str | None) -> bool:
    """A result file's own answer to `holds`, from the metadata file written beside it."""
    if not path.is_file():
        return False
    try:
        recorded = json.loads(path.with_name(path.name + ".json").read_text(encoding="utf-8")).get("identity")
    except (OSError, ValueError, AttributeError):
        recorded = None
    return _made_by(recorded, identity)


def _made_by(recorded: str | None, identity: str | None) -> bool:
    """Results written before their identity travelled with them cannot say: taken as theirs."""
    return identity is None or recorded is None or recorded == identity


def atomic_write(path: Path, data: bytes | Path, link: bool = False) -> None:
    """`data` (bytes, or a file's contents) under `path`, whole or not at all, on disk before
    it is named. With `link`, a file is linked into place where it can be (a file of the
    run's scratch folder: no copy of an hour-long result), else copied."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if link and isinstance(data, Path) and _linked(data, path):
        return
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; a result is an ordinary file
        with os.fdopen(fd, "wb") as f:
            if isinstance(data, Path):
                with open(data, "rb") as source:
                    shutil.copyfileobj(source, f, 1 << 20)
            else:
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


def _linked(source: Path, path: Path) -> bool:
    """`source` also named `path` (on disk first); False where it cannot be linked there
    (another file system, or one without hard links)."""
    with open(source, "rb") as f:
        os.fchmod(f.fileno(), 0o666 & ~_UMASK)
        os.fsync(f.fileno())
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.part")
    try:
        os.link(source, tmp)
    except OSError:
        return False
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return True


def _read_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# Read once, at import (single-threaded): os.umask can only be read by setting it.
_UMASK = _read_umask()


def open_store(uri: str, s3: S3) -> OutputStore:
    if uri.startswith("s3://"):
        if not uri[len("s3://") :].split("/", 1)[0]:
            raise ConfigError(f"output.uri {uri!r} names no bucket; write it as s3://bucket/prefix/.")
        return S3Prefix(s3, uri)
    if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", uri):
        raise ConfigError(f"output.uri {uri!r} must be a local folder or s3://bucket/prefix/.")
    return LocalFolder(uri)
