"""Putting a finished result where users find it: encoded, named, described, stored.

The container follows `output.format` (or the input's own with `same`), or a row's own
`output` name where it ends in one (`takes/{stem}-{seed}.mp3`); the sample format follows
the input wherever the container allows it, which is what keeps the audio outside the
region identical to the input.

A result is encoded into a file of the run's scratch folder, not into memory: the file
of an hour-long recording is 635 MB, and rows of several at once would each hold theirs
until the output store had it. The store takes the file from there (a local folder links
it into place; a bucket uploads it in parts), and the file is removed once published.
"""

from __future__ import annotations

import functools
import os
import posixpath
import re
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath

from soundpatch import audio as audio_ops
from soundpatch.audio import Audio, AudioInfo, Patched, Stored
from soundpatch.disk_room import full_disk
from soundpatch.edits import Edit, spans_text
from soundpatch.errors import OutOfRoom, RowError
from soundpatch.humanize import plural
from soundpatch.outcome import written_name
from soundpatch.quality import context_span
from soundpatch.sources import file_sha256
from soundpatch.storage import OutputStore, output_name, part_name

CONTENT_TYPES = {
    "wav": "audio/wav",
    "flac": "audio/flac",
    "mp3": "audio/mpeg",
    "ogg": "audio/ogg",
    "aiff": "audio/aiff",
}
WRITABLE_CONTAINERS = ("WAV", "FLAC", "OGG", "MP3", "AIFF")


class Publisher:
    def __init__(self, store: OutputStore, output_format: str, run_id: str, scratch: Path) -> None:
        """`scratch`: the folder results are encoded into before they are published."""
        self.store = store
        self.scratch = scratch
        self.output_format = output_format
        self.run_id = run_id
        # Rows of one recording that name one file: row id -> that file's name (see clashes).
        self.combined: dict[str, str] = {}

    def container(self, info: AudioInfo | None, edit: Edit | None = None) -> str:
        """`info` is needed only with output.format: same; `edit`: a row whose own `output`
        name may say the container (`.mp3`), over output.format."""
        named = named_container(edit.output) if edit is not None else None
        if named is not None:
            return named
        if self.output_format == "same":
            assert info is not None
            return info.format if info.format in WRITABLE_CONTAINERS else "WAV"
        return audio_ops.OUTPUT_CONTAINERS[self.output_format]

    def ext(self, info: AudioInfo | None, edit: Edit | None = None) -> str:
        container = self.container(info, edit)
        return audio_ops.EXTENSIONS.get(container, container.lower())

    def bytes_bound(self, info: AudioInfo, edit: Edit | None = None, whole: bool = False) -> int:
        """The most this recording's result weighs as a file (what it takes on disk); with
        `edit`, that row's own result (a row of a combined file holds only its `part_span`),
        unless `whole` (the combined file the row names)."""
        span = None if edit is None or whole else self.part_span(edit, info)
        shape = info if span is None else replace(info, frames=span[1] - span[0])
        return audio_ops.encoded_bytes_bound(shape, self.container(info, edit))

    def part_span(self, edit: Edit, info: AudioInfo) -> tuple[int, int] | None:
        """The frames of its recording a row's own result holds, when the row's edit goes
        into a combined file with others': its region and a second each side (what the
        checks read; the combined file takes the region). None when the result is the whole
        recording: a long tape's forty dropouts are not forty copies of the tape."""
        if edit.row_id not in self.combined:
            return None
        a, b = audio_ops.region_frames(edit.start or 0.0, edit.end or 0.0, info.rate, info.frames)
        return context_span(a, b, info.rate, info.frames)

    def check_encodable(self, info: AudioInfo, edit: Edit | None = None) -> None:
        """Raises RowError when the output format (the row's) cannot hold this recording's layout."""
        named = named_container(edit.output) if edit is not None else None
        if named is None:
            audio_ops.check_encodable(info, self.container(info))
        else:
            audio_ops.check_encodable(info, named, "end the row's output name in another container's extension")

    def rounding_notes(self, infos: Iterable[tuple[str, AudioInfo]]) -> list[str]:
        """What to say of inputs whose samples the output format cannot hold as they are (a
        32-bit float WAV into a FLAC): said before anything is spent, as their rows' results
        will differ from them outside the regions too (and be flagged for it)."""
        found = ((shown, audio_ops.rounded_in(info, self.container(info))) for shown, info in infos)
        rounded = sorted((shown, why) for shown, why in found if why)
        if not rounded:
            return []
        one = len(rounded) == 1
        listed = "; ".join(f"{shown} ({why})" for shown, why in rounded[:3]) + ("; ..." if len(rounded) > 3 else "")
        container = self.container(None) if self.output_format != "same" else "its format"
        return [
            f"{plural(len(rounded), 'input')} cannot be held in {container} as {'it is' if one else 'they are'}: "
            f"{listed}. Outside the regions {'its' if one else 'their'} results will not be the input's bit for "
            f"bit, and {'its rows are' if one else 'their rows are'} flagged so; output.format: wav keeps "
            f"{'it' if one else 'them'} as {'it is' if one else 'they are'}."
        ]

    def name(self, edit: Edit, info: AudioInfo | None) -> str:
        """The result's name under the output prefix; raises RowError for an unusable template.

        Checked while validating, before any money is spent, not first when publishing.
        Without `info` (the input not read yet) the extension is a stand-in when the
        container follows the input's own (output.format: same)."""
        unknown = info is None and self.output_format == "same" and named_container(edit.output) is None
        ext = "same" if unknown else self.ext(info, edit)
        fields = {"run_id": self.run_id, "row_id": edit.row_id, "stem": _stem(edit.input), "seed": str(edit.seed)}
        if edit.output and "{" in edit.output:
            fields = {**_template_fields(edit), **fields}
        name = output_name(edit.output, {**fields, "ext": ext})
        return part_name(name, edit.row_id) if edit.row_id in self.combined else name

    def clashes(self, edits: Sequence[Edit], info_of: Callable[[Edit], AudioInfo | None]) -> dict[str, str]:
        """Rows whose result would take the name of an earlier row's result (in manifest
        order), which it would overwrite: the row, and why. The result would be paid
        for and lost. Found before anything is spent. Rows asking for the very same edit may
        share a name, and so may rows of one recording whose regions do not overlap: their
        edits are combined into that one file (`combined`), each row's own result kept
        beside it (`part_name`). `info_of` is asked only where the name follows the input's
        own format (output.format: same) and two rows might share it."""
        key = self.store.name_key  # names one file in the output store
        candidates: dict[str, list[Edit]] = {}
        for edit in edits:
            if edit.error:
                continue
            try:
                candidates.setdefault(key(self.name(edit, None)), []).append(edit)
            except RowError:
                continue  # its own check says what is wrong with its name
        reasons: dict[str, str] = {}
        for group in candidates.values():
            sharing: dict[str, list[Edit]] = {}  # file -> the rows sharing it, distinct asks
            members: dict[str, list[Edit]] = {}  # file -> every row that gets it
            names: dict[str, str] = {}  # file -> its name, as its first row gives it
            for edit in group if len(group) > 1 else ():
                info = info_of(edit) if self.output_format == "same" else None
                if self.output_format == "same" and info is None:
                    continue  # unreadable: invalid for its own reason
                name = self.name(edit, info)
                file = names.setdefault(key(name), name)
                owners = sharing.setdefault(file, [])
                if owners and not any(_asks(o) == _asks(edit) for o in owners):
                    if not all(_combinable(o, edit) for o in owners):
                        first = owners[0]
                        same = "" if file == name else f", {file} on a disk that does not tell upper from lower case"
                        reasons[edit.row_id] = (
                            f"its output name {name} is also the name of row {first.row_id}'s result "
                            f"({first.line}){same}, which it would replace; give each row its own name (with "
                            "{row_id} or {seed} in output), or name one file for regions of one recording "
                            "that do not overlap"
                        )
                        continue
                    owners.append(edit)
                elif not owners:
                    owners.append(edit)
                members.setdefault(file, []).append(edit)
            for file, owners in sharing.items():
                if len(owners) > 1:
                    self.combined.update({e.row_id: file for e in members[file]})
        return reasons

    def encode(self, edit: Edit, result: Audio | Patched | Stored, info: AudioInfo, name: str | None = None) -> Encoded:
        """The row's result, as the file named for it (or `name`: a combined file), written
        to the scratch folder; `Encoded.discard()` removes it once it is no longer needed."""
        ext = self.ext(info, edit)
        what = f"the file {name}" if name else "this row's result"
        name = name or self.name(edit, info)
        path = None
        try:
            self.scratch.mkdir(parents=True, exist_ok=True)
            fd, written = tempfile.mkstemp(dir=self.scratch, prefix="result.", suffix=f".{ext}")
            os.close(fd)
            path = Path(written)
            audio_ops.encode_file(result, self.container(info, edit), path)
        except BaseException as exc:
            if path is not None:
                path.unlink(missing_ok=True)
            full = full_disk(self.scratch, exc) if isinstance(exc, Exception) else None
            if full is not None:  # libsndfile says only "System error." then
                raise OutOfRoom(f"{full} and {what} did not fit; free some space and run it again") from None
            raise
        return Encoded(name, path, CONTENT_TYPES.get(ext, "application/octet-stream"), ext)

    def metadata(self, edit: Edit, details: dict[str, str]) -> dict[str, str]:
        """What travels with a result: the row's own columns, then the row, then `details`
        (provider, prediction, cost, identity...), which a column of the same name cannot
        override: the identity is how a result is recognised later."""
        return {
            **dict(edit.extra),
            "row_id": edit.row_id,
            "run_id": self.run_id,
            "input": edit.input,
            "region": f"{edit.start:g}-{edit.end:g}",
            **({"damaged": spans_text(edit.damaged)} if edit.damaged else {}),
            "prompt": edit.prompt,
            "seed": str(edit.seed),
            **details,
        }


@dataclass(frozen=True)
class Encoded:
    name: str
    path: Path  # the encoded file, in the scratch folder until discarded
    content_type: str
    ext: str

    def sha256(self) -> str:
        return file_sha256(self.path)

    def discard(self) -> None:
        self.path.unlink(missing_ok=True)


def _asks(edit: Edit) -> tuple:
    """What a row asks for, as written: rows alike in all of it make the very same result."""
    return (edit.input, edit.start, edit.end, edit.prompt, edit.seed, edit.steps, edit.guidance_scale, edit.provider)


def _combinable(a: Edit, b: Edit) -> bool:
    """Two rows whose edits one file can hold: one recording, regions apart."""
    assert a.start is not None and a.end is not None and b.start is not None and b.end is not None
    same_recording = a.input == b.input or posixpath.normpath(a.input) == posixpath.normpath(b.input)
    return same_recording and (a.end <= b.start or b.end <= a.start)


# A row's `output` name ending in one of these is written in that container, whatever
# output.format says (a name's own extension is what its user expects the file to be).
NAMED_CONTAINERS = {".wav": "WAV", ".flac": "FLAC", ".mp3": "MP3", ".ogg": "OGG", ".aiff": "AIFF", ".aif": "AIFF"}


def named_container(output: str | None) -> str | None:
    """The container a row's `output` name (or template) ends in, if one soundpatch writes."""
    if not output:
        return None
    return NAMED_CONTAINERS.get(posixpath.splitext(output.rstrip())[1].lower())


def _template_fields(edit: Edit) -> dict[str, str]:
    """What else a row's `output` template may name: the row's own columns (`{category}`),
    its prompt in a few words (`distant-thunder-rolling`), its region (`{start}`, `{end}`),
    which of the row's variations it is (`{variation}`: 1, 2, ...), its `{id}`, `{steps}` and
    `{guidance_scale}`."""
    fields = {name: str(value) for name, value in edit.extra.items() if name.isidentifier()}
    for name, value in edit.extra.items():  # a column named as a report's is manifest_<name> there
        own = written_name(name)
        if own != name and own.isidentifier():
            fields.setdefault(own, str(value))
    # In lower case: prompts that differ only in case ("Thunder", "thunder") would name one
    # file twice on macOS's and Windows' disks, which do not tell them apart.
    words = _NOT_WORDS.sub("-", edit.prompt.lower()).strip("-")
    fields["prompt"] = words[:PROMPT_IN_NAME].rstrip("-") or "prompt"
    fields["start"] = "" if edit.start is None else f"{edit.start:g}"
    fields["end"] = "" if edit.end is None else f"{edit.end:g}"
    fields["variation"] = str(edit.variation)
    # The manifest's own columns by their names: `id` (the row's id, as {row_id}) and the
    # model's settings a dataset's matrix may sweep ("" where the row leaves them to the model).
    fields["id"] = edit.row_id
    fields["steps"] = "" if edit.steps is None else str(edit.steps)
    fields["guidance_scale"] = "" if edit.guidance_scale is None else f"{edit.guidance_scale:g}"
    return fields


_NOT_WORDS = re.compile(r"[\W_]+")
PROMPT_IN_NAME = 60  # characters of a prompt in a result's name ({prompt})


@functools.lru_cache(maxsize=4096)  # a manifest's rows share a few inputs; asked twice a row
def _stem(source: str) -> str:
    """The input's file name without extension, for s3:// and https:// inputs too."""
    return PurePosixPath(source.split("?", 1)[0].rstrip("/")).stem or "input"
