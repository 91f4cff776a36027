"""Read a CSV or YAML manifest into edits: one edit is one result to produce.

A row that cannot be used becomes an edit with `error` set: it is reported as `invalid`,
costs nothing, and the rest of the batch goes on. Only a manifest that cannot be read at
all raises `ManifestError` (the CLI exits 2).

Columns (interfaces.md): input, start, end (or region "a-b"), prompt, and optionally id,
seed, steps, guidance_scale, variations, output, provider. Anything else is carried
through to the report and output metadata. How a row becomes edits (its fields read and
checked, its id and seeds, its variations) is edits.py's; this module reads the file.
"""

from __future__ import annotations

import csv
import difflib
import fnmatch
import io
import itertools
import posixpath
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urljoin, urlsplit

import yaml

from soundpatch import web
from soundpatch.edits import (
    KNOWN_COLUMNS,
    REMOTE_SCHEMES,
    Edit,
    expand_rows,
    from_time_stamp,
    invalid_copy,
    spans_for_a_model,
)
from soundpatch.errors import ManifestError, SoundpatchError
from soundpatch.humanize import some_rows


def lookalike_columns(edits: Iterable[Edit]) -> dict[str, str]:
    """Columns soundpatch does not read whose names are close to one it does (`sead`,
    `Promts`): carried through as the user's own, but more likely a typo that silently
    left the row on its default. Column -> the known column it resembles."""
    found: dict[str, str] = {}
    for edit in edits:
        for column in edit.extra:
            if column not in found:
                close = difflib.get_close_matches(column.lower(), KNOWN_COLUMNS, n=1, cutoff=0.72)
                found[column] = close[0] if close else ""
    return {column: known for column, known in found.items() if known}


def lookalike_notes(edits: Iterable[Edit]) -> list[str]:
    return [
        f"The column '{column}' is not one soundpatch reads: it only travels to the report and the "
        f"outputs' metadata. Did you mean '{known}'?"
        for column, known in lookalike_columns(edits).items()
    ]


def column_name(name: Any) -> str:
    """A header as written, stripped; a known column in any case (`Input`, `PROMPT`) is
    that column, as spreadsheets like to capitalise their headers."""
    text = str(name).strip()
    return text.lower() if text.lower() in KNOWN_COLUMNS else text


def _columns(mapping: Mapping[Any, Any]) -> dict[str, Any]:
    """A YAML mapping's keys as columns; the same column twice is an error of that row."""
    out: dict[str, Any] = {}
    for key, value in mapping.items():
        name = column_name(key)
        if name in out:
            return {"__error__": f"names the column {name!r} twice"}
        out[name] = value
    return out


_UNSAFE_ID = re.compile(r"[^A-Za-z0-9._-]+")
GLOB_CHARS = re.compile(r"[*?\[]")


def is_pattern(source: str) -> bool:
    """Whether an input names many files (`*`, `?`, `[...]`) rather than one."""
    return not source.startswith(("http://", "https://")) and bool(GLOB_CHARS.search(source))


@dataclass(frozen=True)
class Manifest:
    path: Path
    edits: list[Edit]
    uri: str = ""  # where it was read from, when that is a bucket or a web server (s3://, https://)

    @property
    def base_dir(self) -> Path:
        return self.path.parent

    def resolve_input(self, edit: Edit) -> str:
        """Local paths are relative to the manifest's folder, so a manifest travels with its
        audio: a manifest in a bucket or on a web server, its inputs' names are relative to
        where it is there (`audio/a.wav` beside `s3://b/jobs/m.csv` is `s3://b/jobs/audio/a.wav`)."""
        if edit.is_remote:
            return edit.input
        p = Path(edit.input).expanduser()
        if p.is_absolute():
            return str(p)
        if self.uri:
            return beside(self.uri, edit.input)
        return str(self.base_dir / p)

    def with_patterns_expanded(self, glob: Callable[[str], list[str]]) -> Manifest:
        """Rows whose input is a pattern (`audio/*.wav`, `s3://bucket/archive/*.wav`) become one
        row per file it matches, sharing the region, prompt and the rest; their ids get the
        file's name appended. A pattern matching nothing is an invalid row."""
        edits: list[Edit] = []
        matched: dict[str, list[str]] = {}
        for edit in self.edits:
            if edit.error or not is_pattern(edit.input):
                edits.append(edit)
                continue
            if edit.input not in matched:
                try:
                    matched[edit.input] = glob(self.resolve_input(edit))
                except SoundpatchError as exc:
                    edits.append(invalid_copy(edit, str(exc)))
                    continue
            if not matched[edit.input]:
                edits.append(invalid_copy(edit, f"input {edit.input} matches no files"))
                continue
            fixed = GLOB_CHARS.split(self.resolve_input(edit), 1)[0]
            for found in matched[edit.input]:
                name = found[len(fixed) :] if found.startswith(fixed) else found
                suffix = _UNSAFE_ID.sub("_", name.rsplit(".", 1)[0]).strip("_") or "file"
                edits.append(replace(edit, input=self._as_given(found), row_id=f"{edit.row_id}-{suffix}"))
        return Manifest(self.path, edits, self.uri)

    def with_times_from_stamps(self, stamp_of: Callable[[str], tuple[float | None, float]]) -> Manifest:
        """Rows whose times are their recording's own timecode (`timecode: source`) with them
        counted from its first sample instead (edits.from_time_stamp). `stamp_of(input)`: its
        time stamp (seconds since midnight, or None) and its length in seconds."""
        edits: list[Edit] = []
        for edit in self.edits:
            if edit.source_timecode and not edit.error:
                try:
                    stamp, duration = stamp_of(self.resolve_input(edit))
                except SoundpatchError as exc:
                    edit = invalid_copy(edit, str(exc))
                else:
                    edit = from_time_stamp(edit, stamp, duration, Path(web.shown_input(edit.input)).name)
            edits.append(edit)
        return Manifest(self.path, edits, self.uri)

    def with_damaged_for_models(self, to_a_model: Callable[[Edit], bool], margin: float) -> Manifest:
        """Rows' `damaged` spans, for rows whose provider is a hosted model (`to_a_model(edit)`),
        as its audio goes into them (edits.spans_for_a_model: `margin` wider each side). Spans
        that come to cover the whole region are dropped: the model's audio goes into all of it,
        as in the same row without them, which is the same edit (identity.py)."""
        edits = []
        for edit in self.edits:
            if edit.damaged and edit.start is not None and edit.end is not None and to_a_model(edit):
                edit = replace(edit, damaged=spans_for_a_model(edit.damaged, edit.start, edit.end, margin))
            edits.append(edit)
        return Manifest(self.path, edits, self.uri)

    def only(self, patterns: Iterable[str]) -> Manifest:
        """The rows whose ids match one of `patterns` (`metal-v1`, `glass-*`: shell-style, as
        ids are after variations and input patterns are expanded); ManifestError naming a
        pattern no row matches (a misspelt id would otherwise run nothing, silently)."""
        patterns = [p.strip() for p in patterns if p.strip()]
        kept = [e for e in self.edits if any(fnmatch.fnmatchcase(e.row_id, p) for p in patterns)]
        for pattern in patterns:
            if not any(fnmatch.fnmatchcase(e.row_id, pattern) for e in self.edits):
                ids = some_rows([e.row_id for e in self.edits])
                raise ManifestError(f"No row of the manifest has an id matching {pattern!r} (--rows); its rows: {ids}.")
        return Manifest(self.path, kept, self.uri)

    def _as_given(self, found: str) -> str:
        """A matched local file relative to the manifest's folder when it is inside it."""
        if found.startswith(REMOTE_SCHEMES) or self.uri:
            return found
        try:
            return str(Path(found).relative_to(self.base_dir))
        except ValueError:
            return found


# --------------------------------------------------------------------------- reading


def load_manifest(path: str | Path, fetch: Callable[[str], bytes] | None = None) -> Manifest:
    """Read and validate a manifest; raises ManifestError only when it cannot be read at all.
    `path`: a local file, or an s3:// or http(s):// one that `fetch(uri)` reads (raising
    ManifestError: manifest_source.py's)."""
    uri = str(path) if str(path).startswith(REMOTE_SCHEMES) else ""
    if uri:
        name, p = web.shown(uri), Path(PurePosixPath(urlsplit(uri).path).name)
        if fetch is None:
            raise ManifestError(f"Manifest {name} is not a local file, and no way to read it from there was given.")
        raw = fetch(uri)
    else:
        p = Path(path)
        name = str(p)
        try:
            raw = p.read_bytes()
        except FileNotFoundError:
            raise ManifestError(f"Manifest {p} does not exist.") from None
        except IsADirectoryError:
            raise ManifestError(f"Manifest {p} is a folder, not a CSV or YAML file.") from None
        except OSError as exc:
            raise ManifestError(f"Cannot read manifest {p}: {exc.strerror or exc}.") from None
    # UTF-16 with its byte-order mark is what Excel's "Unicode Text" writes (tab-separated).
    encoding = "utf-16" if raw[:2] in (b"\xff\xfe", b"\xfe\xff") else "utf-8-sig"
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError as exc:
        raise ManifestError(_not_text(name, raw, exc, encoding)) from None
    suffix = _suffix(name)
    if suffix in (".yaml", ".yml"):
        records = list(_yaml_records(text, name))
    elif suffix in (".csv", ".tsv", ".txt"):
        records = list(_csv_records(text, name))
    else:
        raise ManifestError(f"Manifest {name} must end in .csv, .yaml or .yml.")
    if not records:
        raise ManifestError(f"Manifest {name} has no rows.")
    return Manifest(path=p, edits=list(expand_rows(records)), uri=uri)


def beside(uri: str, name: str) -> str:
    """`name` (a relative path) beside the s3:// or http(s):// file `uri`."""
    if uri.startswith("s3://"):
        bucket, _, key = uri[len("s3://") :].partition("/")
        return f"s3://{bucket}/" + posixpath.normpath(posixpath.join(posixpath.dirname(key), name)).lstrip("/")
    return urljoin(uri, name)


def _suffix(name: str) -> str:
    """The file name's extension, of a path or a URL (its query left out), lower-cased."""
    return PurePosixPath(urlsplit(name).path if "://" in name else name).suffix.lower()


def _csv_records(text: str, path: str) -> Iterator[tuple[str, dict[str, Any]]]:
    first_line = text.split("\n", 1)[0]
    delimiter = ","
    if "," not in first_line:
        delimiter = "\t" if "\t" in first_line else (";" if ";" in first_line else ",")
    reader = csv.reader(io.StringIO(text), delimiter=delimiter)
    try:
        header = next(reader)
    except StopIteration:
        raise ManifestError(f"Manifest {path} is empty.") from None
    except csv.Error as exc:
        raise ManifestError(f"Manifest {path} is not valid CSV: {exc}.") from None
    header = [column_name(h) for h in header]
    _check_header(header, path)
    try:
        for values in reader:
            if not any(v.strip() for v in values):
                continue  # blank lines are not rows
            where = f"line {reader.line_num}"
            if len(values) > len(header):
                yield (
                    where,
                    {
                        "__error__": (
                            f"has {len(values)} fields but the header has {len(header)} "
                            "(an unquoted comma in a prompt?)"
                        )
                    },
                )
                continue
            record = {k: v for k, v in zip(header, values, strict=False) if k}
            yield where, (_decimal_points(record) if delimiter == ";" else record)
    except csv.Error as exc:
        raise ManifestError(f"Manifest {path} is not valid CSV near line {reader.line_num}: {exc}.") from None


_NUMBERS = ("start", "end", "region", "guidance_scale", "damaged")
_DECIMAL_COMMA = re.compile(r"(?<=\d),(?=\d)")


def _decimal_points(record: dict[str, str]) -> dict[str, str]:
    """A semicolon-separated CSV is what a spreadsheet writes where the comma is the decimal
    mark ("0,5"), so a comma between digits in a time or number is read as a point. A value
    that also has a point ("1.234,5", digits grouped) is left to be refused as it is."""
    for key in _NUMBERS:
        value = record.get(key)
        if value and "." not in value:
            record[key] = _DECIMAL_COMMA.sub(".", value)
    return record


def _check_header(columns: list[str], path: str) -> None:
    missing = [c for c in ("input", "prompt") if c not in columns]
    if "region" not in columns and not {"start", "end"} <= set(columns):
        missing.append("start/end or region")
    if missing:
        raise ManifestError(
            f"Manifest {path} has no {' or '.join(repr(m) for m in missing)} column "
            f"(found: {', '.join(c for c in columns if c) or 'nothing'})."
        )
    dupes = sorted({c for c in columns if c and columns.count(c) > 1})
    if dupes:
        raise ManifestError(f"Manifest {path} names the column {dupes[0]!r} twice.")


def _not_text(p: str, raw: bytes, exc: UnicodeDecodeError, encoding: str) -> str:
    """Why the manifest is refused, pointing at where, and at the likely cause: a spreadsheet
    saved as "CSV (Comma delimited)", in Windows' own code page (an em dash or a curly quote
    that autocorrect typed, an accent), not UTF-8."""
    if encoding == "utf-16":
        return f"Manifest {p} starts as UTF-16 text but is cut short or broken; save it again and try again."
    skipped = 3 if raw.startswith(b"\xef\xbb\xbf") else 0  # (the error counts from after a byte-order mark)
    start, end = exc.start + skipped, exc.end + skipped
    line = raw.count(b"\n", 0, start) + 1
    line_start = raw.rfind(b"\n", 0, start) + 1
    before = raw[max(line_start, start - 30) : start].decode("utf-8", "replace").strip()
    where = f"line {line}, after '{before}'" if before else f"line {line}"
    bad = raw[start:end]
    try:
        meant = f", which is '{bad.decode('cp1252')}' in Windows-1252"
    except UnicodeDecodeError:
        meant = ""
    how = "UTF-8"
    if _suffix(p) in (".csv", ".tsv", ".txt"):
        how += ' (a spreadsheet\'s "CSV UTF-8", not "CSV (Comma delimited)")'
    return f"Manifest {p} is not UTF-8 text (byte 0x{bad.hex()} on {where}{meant}); save it as {how} and try again."


def _yaml_records(text: str, path: str) -> Iterator[tuple[str, dict[str, Any]]]:
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ManifestError(f"Manifest {path} is not valid YAML{where}.") from None
    defaults: dict[str, Any] = {}
    matrix: dict[str, Any] | None = None
    if isinstance(doc, list):
        rows = doc
    elif isinstance(doc, dict):
        unknown = set(doc) - {"rows", "defaults", "matrix"}
        if unknown:
            raise ManifestError(
                f"Manifest {path} has unknown top-level key {sorted(unknown)[0]!r} (expected rows, defaults, matrix)."
            )
        rows = doc.get("rows") or []
        defaults = doc.get("defaults") or {}
        matrix = doc.get("matrix")
        if not isinstance(defaults, dict):
            raise ManifestError(f"Manifest {path}: 'defaults' must be a mapping of columns.")
        defaults = _columns(defaults)
        if "__error__" in defaults:
            raise ManifestError(f"Manifest {path}: 'defaults' {defaults['__error__']}.")
        if not isinstance(rows, list):
            raise ManifestError(f"Manifest {path}: 'rows' must be a list of mappings.")
    else:
        raise ManifestError(f"Manifest {path} must hold a 'rows:' list.")
    for i, row in enumerate(rows, start=1):
        if not isinstance(row, dict):
            yield f"row {i}", {"__error__": "is not a mapping of columns"}
            continue
        row = _columns(row)
        yield f"row {i}", row if "__error__" in row else {**defaults, **row}
    if matrix is not None:
        yield from _matrix_records(matrix, defaults, path)


def _matrix_records(matrix: Any, defaults: dict[str, Any], path: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """`matrix: {input: [...], prompt: [...], seed: [...]}` -> the cartesian product as rows."""
    if not isinstance(matrix, dict) or not matrix:
        raise ManifestError(f"Manifest {path}: 'matrix' must map columns to lists of values.")
    keys = [column_name(k) for k in matrix]
    if len(set(keys)) < len(keys):
        raise ManifestError(f"Manifest {path}: 'matrix' names a column twice.")
    axes = [v if isinstance(v, list) else [v] for v in matrix.values()]
    for i, combo in enumerate(itertools.product(*axes), start=1):
        yield f"matrix entry {i}", {**defaults, **dict(zip(keys, combo, strict=True))}
