"""Read a CSV or YAML manifest into edits: one edit is one result to produce.

A row that cannot be used becomes an edit with `error` set: it is reported as `invalid`,
costs nothing, and the rest of the batch goes on. Only a manifest that cannot be read at
all raises `ManifestError` (the CLI exits 2).

Columns (interfaces.md): input, start, end (or region "a-b"), prompt, and optionally id,
seed, steps, guidance_scale, variations, output, provider. Anything else is carried
through to the report and output metadata.
"""

from __future__ import annotations

import csv
import difflib
import hashlib
import io
import itertools
import json
import math
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from soundpatch.config import PROVIDERS
from soundpatch.errors import ManifestError, SoundpatchError, as_sentence
from soundpatch.outcome import REPORT_COLUMNS

KNOWN_COLUMNS = (
    "id",
    "input",
    "start",
    "end",
    "region",
    "prompt",
    "seed",
    "steps",
    "guidance_scale",
    "variations",
    "output",
    "provider",
)


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
MAX_PROMPT_CHARS = 2000
MAX_VARIATIONS = 1000
MAX_SEED = 2**32 - 1
REMOTE_SCHEMES = ("s3://", "https://", "http://")
GLOB_CHARS = re.compile(r"[*?\[]")


def is_pattern(source: str) -> bool:
    """Whether an input names many files (`*`, `?`, `[...]`) rather than one."""
    return not source.startswith(("http://", "https://")) and bool(GLOB_CHARS.search(source))


@dataclass(frozen=True)
class Edit:
    """One result to produce: a region of one input replaced according to one prompt.

    `error` is set when the row is invalid; then other fields hold what could be parsed.
    """

    row_id: str
    line: str  # where the row is in the manifest, for messages ("line 7", "row 3")
    input: str
    start: float | None
    end: float | None
    prompt: str
    seed: int | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    output: str | None = None
    provider: str | None = None
    extra: Mapping[str, str] = field(default_factory=dict)
    error: str | None = None

    @property
    def valid(self) -> bool:
        return self.error is None

    @property
    def is_remote(self) -> bool:
        return self.input.startswith(REMOTE_SCHEMES)


@dataclass(frozen=True)
class Manifest:
    path: Path
    edits: list[Edit]

    @property
    def base_dir(self) -> Path:
        return self.path.parent

    def resolve_input(self, edit: Edit) -> str:
        """Local paths are relative to the manifest's folder, so a manifest travels with its audio."""
        if edit.is_remote:
            return edit.input
        p = Path(edit.input).expanduser()
        return str(p if p.is_absolute() else (self.base_dir / p))

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
                    edits.append(_invalid_copy(edit, str(exc)))
                    continue
            if not matched[edit.input]:
                edits.append(_invalid_copy(edit, f"input {edit.input} matches no files"))
                continue
            fixed = GLOB_CHARS.split(self.resolve_input(edit), 1)[0]
            for found in matched[edit.input]:
                name = found[len(fixed) :] if found.startswith(fixed) else found
                suffix = _UNSAFE_ID.sub("_", name.rsplit(".", 1)[0]).strip("_") or "file"
                edits.append(_replace(edit, input=self._as_given(found), row_id=f"{edit.row_id}-{suffix}"))
        return Manifest(self.path, edits)

    def _as_given(self, found: str) -> str:
        """A matched local file relative to the manifest's folder when it is inside it."""
        if found.startswith(REMOTE_SCHEMES):
            return found
        try:
            return str(Path(found).relative_to(self.base_dir))
        except ValueError:
            return found


# --------------------------------------------------------------------------- times


_TIMECODE = re.compile(r"^(?:(\d+):)?(\d+):(\d+(?:\.\d*)?)$")


def parse_time(value: Any, what: str = "time") -> float:
    """Seconds from `12.5`, `"12.5"`, `"1:02.5"` (mm:ss.f) or `"1:02:03.25"` (hh:mm:ss.f)."""
    if isinstance(value, bool):
        raise ValueError(f"{what} must be a number of seconds, not {value!r}")
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        text = str(value).strip()
        if not text:
            raise ValueError(f"{what} is empty")
        m = _TIMECODE.match(text)
        if m:
            hours, minutes, secs = m.groups()
            if float(secs) >= 60 or (hours is not None and int(minutes) >= 60):
                raise ValueError(f"{what} {text!r} is not a valid timecode")
            seconds = int(hours or 0) * 3600 + int(minutes) * 60 + float(secs)
        else:
            try:
                seconds = float(text)
            except ValueError:
                hint = " (write decimals with a point, as in 0.5)" if re.search(r"\d,\d", text) else ""
                raise ValueError(f"{what} {text!r} is not a number of seconds or a mm:ss.f timecode{hint}") from None
    if not math.isfinite(seconds):
        raise ValueError(f"{what} must be a finite number of seconds, not {value!r}")
    if seconds < 0:
        raise ValueError(f"{what} {value!r} is negative")
    if seconds > 7 * 24 * 3600:
        raise ValueError(f"{what} {value!r} is longer than a week of audio")
    return seconds


_REGION = re.compile(r"^\s*([^\s\-–]+)\s*(?:-|–|\.\.)\s*([^\s\-–]+)\s*$")


def parse_region(text: Any) -> tuple[float, float]:
    """`"12.5-15"`, `"0:12.5-0:15"` or `"12.5..15"` into (start, end) seconds."""
    m = _REGION.match(str(text))
    if not m:
        raise ValueError(f"region {text!r} is not of the form start-end, e.g. 12.5-15")
    return parse_time(m.group(1), "region start"), parse_time(m.group(2), "region end")


# --------------------------------------------------------------------------- reading


def load_manifest(path: str | Path) -> Manifest:
    """Read and validate a manifest; raises ManifestError only when it cannot be read at all."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise ManifestError(f"Manifest {p} does not exist.") from None
    except IsADirectoryError:
        raise ManifestError(f"Manifest {p} is a folder, not a CSV or YAML file.") from None
    except OSError as exc:
        raise ManifestError(f"Cannot read manifest {p}: {exc.strerror or exc}.") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ManifestError(
            f"Manifest {p} is not UTF-8 text (bad byte at position {exc.start}); save it as UTF-8 and try again."
        ) from None
    suffix = p.suffix.lower()
    if suffix in (".yaml", ".yml"):
        records = list(_yaml_records(text, p))
    elif suffix in (".csv", ".tsv", ".txt"):
        records = list(_csv_records(text, p))
    else:
        raise ManifestError(f"Manifest {p} must end in .csv, .yaml or .yml.")
    if not records:
        raise ManifestError(f"Manifest {p} has no rows.")
    return Manifest(path=p, edits=list(expand_rows(records)))


def _csv_records(text: str, path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
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


_NUMBERS = ("start", "end", "region", "guidance_scale")
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


def _check_header(columns: list[str], path: Path) -> None:
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


def _yaml_records(text: str, path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
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


def _matrix_records(matrix: Any, defaults: dict[str, Any], path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """`matrix: {input: [...], prompt: [...], seed: [...]}` -> the cartesian product as rows."""
    if not isinstance(matrix, dict) or not matrix:
        raise ManifestError(f"Manifest {path}: 'matrix' must map columns to lists of values.")
    keys = [column_name(k) for k in matrix]
    if len(set(keys)) < len(keys):
        raise ManifestError(f"Manifest {path}: 'matrix' names a column twice.")
    axes = [v if isinstance(v, list) else [v] for v in matrix.values()]
    for i, combo in enumerate(itertools.product(*axes), start=1):
        yield f"matrix entry {i}", {**defaults, **dict(zip(keys, combo, strict=True))}


# --------------------------------------------------------------------------- rows


def expand_rows(records: list[tuple[str, dict[str, Any]]]) -> Iterator[Edit]:
    """Validate each record and expand `variations`; ids stay stable and unique."""
    seen_ids: dict[str, str] = {}
    derived_count: dict[str, int] = {}
    for where, record in records:
        for edit in _record_to_edits(where, record):
            row_id = edit.row_id
            if row_id in seen_ids:
                if _has_explicit_id(record):
                    edit = _invalid_copy(edit, f"id {row_id!r} is already used by {seen_ids[row_id]}")
                    row_id = f"{row_id}@{where.replace(' ', '')}"
                else:
                    # Identical rows: keep both, distinguished by occurrence (stable for a
                    # given manifest); sending them once is the dedup layer's job.
                    derived_count[row_id] = derived_count.get(row_id, 1) + 1
                    row_id = f"{row_id}-{derived_count[row_id]}"
                edit = _replace(edit, row_id=row_id)
            seen_ids[row_id] = where
            yield edit


def _has_explicit_id(record: Mapping[str, Any]) -> bool:
    return str(record.get("id") or "").strip() != ""


def _record_to_edits(where: str, record: dict[str, Any]) -> list[Edit]:
    record = {str(k).strip(): v for k, v in record.items()}
    text = {k: ("" if v is None else str(v)).strip() for k, v in record.items()}
    extra = {}
    for k, v in text.items():
        if k not in KNOWN_COLUMNS and not k.startswith("__"):
            extra[f"manifest_{k}" if k in REPORT_COLUMNS else k] = v
    row_id = text.get("id") or _derived_id(text)
    base = Edit(
        row_id=row_id,
        line=where,
        input=text.get("input", ""),
        start=None,
        end=None,
        prompt=text.get("prompt", ""),
        extra=extra,
    )
    if "__error__" in record:
        return [_invalid_copy(base, f"{where} {record['__error__']}")]
    try:
        fields = _parse_fields(record, text)
    except ValueError as exc:
        return [_invalid_copy(_replace(base, **_partial_region(record)), str(exc))]
    variations = fields.pop("variations")
    base = _replace(base, **fields)
    if variations == 1:
        seed = base.seed if base.seed is not None else _derived_seed(row_id, 1)
        return [_replace(base, seed=seed)]
    edits = []
    for k in range(1, variations + 1):
        seed = (base.seed + k - 1) % (MAX_SEED + 1) if base.seed is not None else _derived_seed(row_id, k)
        edits.append(_replace(base, row_id=f"{row_id}-v{k}", seed=seed))
    return edits


def _parse_fields(record: dict[str, Any], text: dict[str, str]) -> dict[str, Any]:
    for column in KNOWN_COLUMNS:  # a YAML list or mapping would be sent as its Python spelling
        value = record.get(column)
        if isinstance(value, (list, dict)):
            kind = "a list" if isinstance(value, list) else "a mapping"
            hint = "; a list under matrix: makes a row of each" if isinstance(value, list) else ""
            raise ValueError(f"{column} is {kind} ({text[column][:60]}), not one value{hint}")
        if isinstance(value, bool) and column in ("id", "input", "prompt", "output", "provider"):
            raise ValueError(f"{column} reads as {str(value).lower()} in YAML (yes, no, on, off do); put it in quotes")
    if len(text.get("id", "")) > 128:
        raise ValueError("id is longer than 128 characters")
    if any(ord(c) < 32 for c in text.get("id", "")):
        raise ValueError("id contains control characters")
    source = text.get("input", "")
    if not source:
        raise ValueError("input is empty; give a file path, s3://bucket/key or https:// URL")
    scheme = re.match(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://", source)
    if scheme and not source.startswith(REMOTE_SCHEMES):
        raise ValueError(
            f"input scheme {scheme.group(1)}:// is not supported; use a file path, s3://bucket/key or https:// URL"
        )
    start, end = _region_of(record, text)
    if end <= start:
        raise ValueError(f"region end {end:g} s is not after its start {start:g} s")
    prompt = text.get("prompt", "")
    if not prompt:
        raise ValueError("prompt is empty; say what the region should become")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise ValueError(f"prompt is {len(prompt)} characters long; the limit is {MAX_PROMPT_CHARS}")
    provider = text.get("provider") or None
    if provider is not None and provider not in PROVIDERS:
        raise ValueError(f"provider {provider!r} is unknown; choose one of {', '.join(PROVIDERS)}")
    return {
        "start": start,
        "end": end,
        "prompt": prompt,
        "seed": _int_field(text, "seed", 0, MAX_SEED),
        "steps": _int_field(text, "steps", 1, 1000),
        "guidance_scale": _float_field(text, "guidance_scale", 0.0, 100.0),
        "variations": _int_field(text, "variations", 1, MAX_VARIATIONS) or 1,
        "output": text.get("output") or None,
        "provider": provider,
    }


def _region_of(record: dict[str, Any], text: dict[str, str]) -> tuple[float, float]:
    has_bounds = bool(text.get("start")) or bool(text.get("end"))
    if text.get("region"):
        if has_bounds:
            raise ValueError("give either region or start/end, not both")
        return parse_region(text["region"])
    if not text.get("start"):
        raise ValueError("start is missing; give start and end in seconds or region: a-b")
    if not text.get("end"):
        raise ValueError("end is missing; give start and end in seconds or region: a-b")
    return parse_time(record["start"], "start"), parse_time(record["end"], "end")


def _partial_region(record: dict[str, Any]) -> dict[str, float]:
    """What of the region parses, so an invalid row still shows it in the report."""
    out = {}
    for key in ("start", "end"):
        try:
            out[key] = parse_time(record.get(key), key)
        except (ValueError, TypeError):
            pass
    return out


def _number_field(text: dict[str, str], key: str, low: float, high: float, whole: bool) -> float | None:
    raw = text.get(key, "")
    if raw == "":
        return None
    kind = "a whole number" if whole else "a number"
    try:
        number = float(raw)
    except ValueError:
        raise ValueError(f"{key} {raw!r} is not {kind}") from None
    if not math.isfinite(number) or (whole and number != int(number)):
        raise ValueError(f"{key} {raw!r} is not {kind}")
    if not low <= number <= high:
        bounds = f"{int(low)}..{int(high)}" if whole else f"{low:g}..{high:g}"
        raise ValueError(f"{key} {raw} is outside {bounds}")
    return number


def _int_field(text: dict[str, str], key: str, low: int, high: int) -> int | None:
    number = _number_field(text, key, low, high, whole=True)
    return None if number is None else int(number)


def _float_field(text: dict[str, str], key: str, low: float, high: float) -> float | None:
    return _number_field(text, key, low, high, whole=False)


def _derived_id(text: Mapping[str, str]) -> str:
    """A short id from the row's content: the same row gets the same id in every run."""
    keys = [c for c in KNOWN_COLUMNS if c != "id"]
    canonical = json.dumps({k: text.get(k, "") for k in keys}, sort_keys=True)
    return "r" + hashlib.sha256(canonical.encode()).hexdigest()[:10]


def _derived_seed(row_id: str, variation: int) -> int:
    digest = hashlib.sha256(f"{row_id}/{variation}".encode()).digest()
    return int.from_bytes(digest[:4], "big") % (2**31)


def _replace(edit: Edit, **changes: Any) -> Edit:
    return replace(edit, **changes)


def _invalid_copy(edit: Edit, reason: str) -> Edit:
    return _replace(edit, error=as_sentence(reason))
