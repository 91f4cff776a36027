"""An edit: one result to produce, a region of one input replaced according to one prompt;
and how a manifest's row (a record of columns, from CSV or YAML: manifest.py) becomes
edits: its fields read and checked, its id and seed derived when not given (the same row
gets the same ones in every run), its variations made one edit each.

A row that cannot be used becomes an edit with `error` set, saying why in one sentence.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from soundpatch.config import PROVIDERS
from soundpatch.errors import as_sentence
from soundpatch.outcome import carried_name

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
    "fps",
    "timecode",
    "damaged",
)
MAX_PROMPT_CHARS = 2000
MAX_VARIATIONS = 1000
MAX_SEED = 2**32 - 1
REMOTE_SCHEMES = ("s3://", "https://", "http://")
# The local engine rebuilds a `damaged` span (a click or a short gap) from the samples around
# it, by its AR interpolation alone (providers/local.py's AR_ONLY_SECONDS): up to this long.
# A hosted model's audio goes into spans of any length (spans_for_a_model).
MAX_DAMAGED_SECONDS = 0.02
# A span a model's audio goes into that comes this close to its region's edge reaches it.
SPAN_REACHES_EDGE_SECONDS = 0.001


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
    variation: int = 1  # which of its row's `variations` (1 when it has one)
    # `timecode: source`: start and end are the recording's own timecode, which begins at its
    # time stamp; made seconds from its first sample (from_time_stamp) before the run uses them.
    source_timecode: bool = False
    # `damaged`: the spans (start, end seconds, in order, apart) inside the region that are
    # damaged, where the rest of it is sound: only those are replaced (the local engine
    # rebuilds them; a model's audio goes into them and its crossfades: spans_for_a_model).
    damaged: tuple[tuple[float, float], ...] = ()

    @property
    def valid(self) -> bool:
        return self.error is None

    @property
    def is_remote(self) -> bool:
        return self.input.startswith(REMOTE_SCHEMES)


_TIMECODE = re.compile(r"^(?:(\d+):)?(\d+):(\d+(?:\.\d*)?)$")


# SMPTE timecode, hours:minutes:seconds:frames; `;` before the frames says drop-frame.
_SMPTE = re.compile(r"^(\d+):(\d{1,2}):(\d{1,2})([:;])(\d{1,2})$")
_NTSC = {"23.976": 24, "23.98": 24, "29.97": 30, "47.952": 48, "59.94": 60}  # 1000/1001 of the whole rate


def frame_rate(text: str) -> tuple[int, float, bool]:
    """(frames counted a second, frames a second, drop-frame) of an `fps` column: `25`,
    `29.97` (NTSC: 30 counted, 30000/1001 a second), `29.97df` (drop-frame counting)."""
    raw = text.strip().lower().replace(" ", "")
    drop = raw.endswith(("df", "drop"))
    number = raw.removesuffix("drop").removesuffix("df").removesuffix("fps")
    if number in _NTSC:
        counted = _NTSC[number]
        return counted, counted * 1000 / 1001, drop
    if not number.isdigit() or not 1 <= int(number) <= 120 or drop:
        raise ValueError(
            f"fps {text!r} is not a frame rate; give 24, 25, 30, 50, 60, or the NTSC 23.976, 29.97, 59.94 "
            "(29.97df for drop-frame timecode)"
        )
    return int(number), float(number), False


def _smpte_seconds(m: re.Match, text: str, what: str, fps: str | None) -> float:
    """Seconds from the start of the recording to timecode `text` at the row's `fps`."""
    if not fps:
        raise ValueError(
            f"{what} {text!r} is a timecode with frames (hh:mm:ss:ff); give its frame rate in an fps column "
            "(25, 29.97, ...) or write it in seconds"
        )
    counted, rate, drop = frame_rate(fps)
    hours, minutes, secs, mark, frames = int(m[1]), int(m[2]), int(m[3]), m[4], int(m[5])
    drop = drop or mark == ";"
    if minutes >= 60 or secs >= 60 or frames >= counted:
        raise ValueError(f"{what} {text!r} is not a valid timecode at {fps} fps")
    total = ((hours * 60 + minutes) * 60 + secs) * counted + frames
    if drop:
        if counted not in (30, 60) or rate == counted:
            raise ValueError(f"{what} {text!r} is drop-frame timecode, which only 29.97 and 59.94 fps use")
        # Two frame numbers (four at 59.94) are skipped each minute but every tenth.
        skipped = counted // 15
        if secs == 0 and frames < skipped and minutes % 10:
            raise ValueError(f"{what} {text!r} is a frame number drop-frame timecode skips")
        every = hours * 60 + minutes
        total -= skipped * (every - every // 10)
    return total / rate


def parse_time(value: Any, what: str = "time", fps: str | None = None) -> float:
    """Seconds from `12.5`, `"12.5"`, `"1:02.5"` (mm:ss.f), `"1:02:03.25"` (hh:mm:ss.f), or
    with the row's `fps` SMPTE timecode `"00:01:02:12"` (hh:mm:ss:ff; `;` for drop-frame)."""
    if isinstance(value, bool):
        raise ValueError(f"{what} must be a number of seconds, not {value!r}")
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        text = str(value).strip()
        if not text:
            raise ValueError(f"{what} is empty")
        m = _TIMECODE.match(text)
        smpte = None if m else _SMPTE.match(text)
        if smpte:
            seconds = _smpte_seconds(smpte, text, what, fps)
        elif m:
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


def _source_timecode(text: str) -> bool:
    """A `timecode` column: `elapsed` (the default), times counted from the recording's
    first sample; `source`, its own timecode, as an edit decision list's source in and out."""
    value = text.strip().lower()
    if value not in ("", "elapsed", "source"):
        raise ValueError(
            f"timecode {text!r} is neither elapsed (counted from the recording's first sample) nor source "
            "(the recording's own timecode, from its time stamp)"
        )
    return value == "source"


def from_time_stamp(edit: Edit, stamp: float | None, duration: float, name: str) -> Edit:
    """An edit whose times are its recording's own timecode (`source_timecode`) with them
    counted from its first sample instead: `stamp` is when that sample was recorded (seconds
    since midnight; None: the file does not say), `duration` how long it is. A region before
    the stamp is after midnight, where the recording runs past it."""
    if stamp is None:
        return invalid_copy(
            edit,
            f"its times are source timecode (timecode: source) but {name} has no time stamp to count them from "
            "(a broadcast WAV's bext time reference, or a field recorder's iXML time stamp); give them from its "
            "first sample (timecode: elapsed)",
        )
    assert edit.start is not None and edit.end is not None
    start, end = edit.start - stamp, edit.end - stamp
    if start < 0 and start + _DAY < duration:  # recorded through midnight, and this after it
        start, end = start + _DAY, end + _DAY
    if start < 0:
        return invalid_copy(
            edit, f"region starts at {clock(edit.start)}, before {name} begins at {clock(stamp)} (its time stamp)"
        )
    shift = start - edit.start
    damaged = tuple((round(a + shift, 9), round(b + shift, 9)) for a, b in edit.damaged)
    # (to the nanosecond: 3601.48 - 3600 is 1.4800000000000182, which a report should not show)
    return replace(edit, start=round(start, 9), end=round(end, 9), source_timecode=False, damaged=damaged)


_DAY = 24 * 3600.0


def clock(seconds: float) -> str:
    """Seconds since midnight as a time of day, `01:00:12.200`."""
    millis = round(seconds * 1000)
    return f"{millis // 3_600_000:02d}:{millis // 60_000 % 60:02d}:{millis // 1000 % 60:02d}.{millis % 1000:03d}"


def parse_region(text: Any, fps: str | None = None) -> tuple[float, float]:
    """`"12.5-15"`, `"0:12.5-0:15"` or `"12.5..15"` into (start, end) seconds."""
    m = _REGION.match(str(text))
    if not m:
        raise ValueError(f"region {text!r} is not of the form start-end, e.g. 12.5-15")
    return parse_time(m.group(1), "region start", fps), parse_time(m.group(2), "region end", fps)


def parse_damaged(value: Any, start: float, end: float, fps: str | None = None) -> tuple[tuple[float, float], ...]:
    """A `damaged` column: spans `a-b` (as a region is written) apart by spaces, or a YAML list
    of them, each inside the region [start, end]. Spans that overlap or touch are one span;
    they come back in order. (How long one may be is the provider's to say: Batch.check.)"""
    items = value if isinstance(value, list) else str(value).split()
    spans = []
    for item in items:
        if isinstance(item, (list, dict)):
            raise ValueError(f"damaged holds {item!r}; give its spans as start-end, e.g. 12.3451-12.3462")
        try:
            a, b = parse_region(item, fps)
        except ValueError:
            raise ValueError(f"damaged span {str(item)!r} is not of the form start-end, e.g. 12.3451-12.3462") from None
        if b <= a:
            raise ValueError(f"damaged span {item} ends before it starts")
        if a < start or b > end:
            raise ValueError(f"damaged span {item} is not inside the region {start:g}-{end:g} s")
        spans.append((a, b))
    joined: list[tuple[float, float]] = []
    for a, b in sorted(spans):
        if joined and a <= joined[-1][1]:
            joined[-1] = (joined[-1][0], max(joined[-1][1], b))
        else:
            joined.append((a, b))
    return tuple(joined)


def spans_text(spans: Sequence[tuple[float, float]]) -> str:
    """Spans as a `damaged` column writes them, `1.29975-1.30075 2.8-2.81` (to the µs)."""

    def seconds(x: float) -> str:
        return f"{x:.6f}".rstrip("0").rstrip(".")

    return " ".join(f"{seconds(a)}-{seconds(b)}" for a, b in spans)


def spans_for_a_model(
    spans: Sequence[tuple[float, float]], start: float, end: float, margin: float
) -> tuple[tuple[float, float], ...]:
    """A row's damaged spans as a hosted model's audio goes into them: each `margin` (the
    splice's crossfade, over which its audio is faded in and out) wider each side, so that the
    fades blend sound, not the damage; those that meet made one, and one within
    SPAN_REACHES_EDGE_SECONDS of the region's edge taken to it. () where they cover the whole
    region: the model's audio goes into all of it, as in a row without spans (the same edit)."""
    wide: list[tuple[float, float]] = []
    for a, b in spans:
        a = start if a - margin - start < SPAN_REACHES_EDGE_SECONDS else a - margin
        b = end if end - b - margin < SPAN_REACHES_EDGE_SECONDS else b + margin
        if wide and a <= wide[-1][1]:
            wide[-1] = (wide[-1][0], max(wide[-1][1], b))
        else:
            wide.append((a, b))
    if wide == [(start, end)]:
        return ()
    return tuple((round(a, 9), round(b, 9)) for a, b in wide)


def expand_rows(records: list[tuple[str, dict[str, Any]]]) -> Iterator[Edit]:
    """Validate each record and expand `variations`; ids stay stable and unique."""
    seen_ids: dict[str, str] = {}
    derived_count: dict[str, int] = {}
    for where, record in records:
        for edit in _record_to_edits(where, record):
            row_id = edit.row_id
            if row_id in seen_ids:
                if _has_explicit_id(record):
                    edit = invalid_copy(edit, f"id {row_id!r} is already used by {seen_ids[row_id]}")
                    row_id = f"{row_id}@{where.replace(' ', '')}"
                else:
                    # Identical rows: keep both, distinguished by occurrence (stable for a
                    # given manifest); sending them once is the dedup layer's job.
                    derived_count[row_id] = derived_count.get(row_id, 1) + 1
                    row_id = f"{row_id}-{derived_count[row_id]}"
                edit = replace(edit, row_id=row_id)
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
            extra[carried_name(k)] = v
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
        return [invalid_copy(base, f"{where} {record['__error__']}")]
    try:
        fields = _parse_fields(record, text)
    except ValueError as exc:
        return [invalid_copy(replace(base, **_partial_region(record)), str(exc))]
    variations = fields.pop("variations")
    base = replace(base, **fields)
    if variations == 1:
        seed = base.seed if base.seed is not None else _derived_seed(row_id, 1)
        return [replace(base, seed=seed)]
    edits = []
    for k in range(1, variations + 1):
        seed = (base.seed + k - 1) % (MAX_SEED + 1) if base.seed is not None else _derived_seed(row_id, k)
        edits.append(replace(base, row_id=f"{row_id}-v{k}", seed=seed, variation=k))
    return edits


def _parse_fields(record: dict[str, Any], text: dict[str, str]) -> dict[str, Any]:
    for column in KNOWN_COLUMNS:  # a YAML list or mapping would be sent as its Python spelling
        value = record.get(column)
        if isinstance(value, list) and column == "damaged":
            continue  # (a list of spans)
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
        "source_timecode": _source_timecode(text.get("timecode", "")),
        "damaged": parse_damaged(record["damaged"], start, end, text.get("fps") or None)
        if text.get("damaged") and record.get("damaged")
        else (),
    }


def _region_of(record: dict[str, Any], text: dict[str, str]) -> tuple[float, float]:
    has_bounds = bool(text.get("start")) or bool(text.get("end"))
    fps = text.get("fps") or None
    if text.get("region"):
        if has_bounds:
            raise ValueError("give either region or start/end, not both")
        return parse_region(text["region"], fps)
    if not text.get("start"):
        raise ValueError("start is missing; give start and end in seconds or region: a-b")
    if not text.get("end"):
        raise ValueError("end is missing; give start and end in seconds or region: a-b")
    return parse_time(record["start"], "start", fps), parse_time(record["end"], "end", fps)


def _partial_region(record: dict[str, Any]) -> dict[str, float]:
    """What of the region parses, so an invalid row still shows it in the report."""
    out = {}
    for key in ("start", "end"):
        try:
            out[key] = parse_time(record.get(key), key, str(record.get("fps") or "") or None)
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
    """A short id from the row's content: the same row gets the same id in every run. Not
    from its damaged spans: a row whose spans change is the same row (its derived seed, and so
    what a hosted model is sent, stay; what an earlier attempt or run paid for is collected)."""
    keys = [c for c in KNOWN_COLUMNS if c not in ("id", "fps", "timecode", "damaged")]
    fields = {k: text.get(k, "") for k in keys}
    for later in ("fps", "timecode"):  # (only where given: the ids of rows without them stay what they were)
        if text.get(later):
            fields[later] = text[later]
    canonical = json.dumps(fields, sort_keys=True)
    return "r" + hashlib.sha256(canonical.encode()).hexdigest()[:10]


def _derived_seed(row_id: str, variation: int) -> int:
    digest = hashlib.sha256(f"{row_id}/{variation}".encode()).digest()
    return int.from_bytes(digest[:4], "big") % (2**31)


def invalid_copy(edit: Edit, reason: str) -> Edit:
    return replace(edit, error=as_sentence(reason))
