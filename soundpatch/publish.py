"""Putting a finished result where users find it: encoded, named, described, stored.

The container follows `output.format` (or the input's own with `same`); the sample
format follows the input wherever the container allows it, which is what keeps the
audio outside the region identical to the input.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import PurePosixPath

from soundpatch import audio as audio_ops
from soundpatch.audio import Audio, AudioInfo
from soundpatch.manifest import Edit
from soundpatch.storage import OutputStore, output_name

CONTENT_TYPES = {
    "wav": "audio/wav",
    "flac": "audio/flac",
    "mp3": "audio/mpeg",
    "ogg": "audio/ogg",
    "aiff": "audio/aiff",
}
WRITABLE_CONTAINERS = ("WAV", "FLAC", "OGG", "MP3", "AIFF")


class Publisher:
    def __init__(self, store: OutputStore, output_format: str, run_id: str) -> None:
        self.store = store
        self.output_format = output_format
        self.run_id = run_id

    def container(self, info: AudioInfo) -> str:
        if self.output_format == "same":
            return info.format if info.format in WRITABLE_CONTAINERS else "WAV"
        return audio_ops.OUTPUT_CONTAINERS[self.output_format]

    def ext(self, info: AudioInfo) -> str:
        container = self.container(info)
        return audio_ops.EXTENSIONS.get(container, container.lower())

    def name(self, edit: Edit, info: AudioInfo) -> str:
        """The result's name under the output prefix; raises RowError for an unusable template.

        Checked while validating, before any money is spent, not first when publishing."""
        fields = {
            "run_id": self.run_id,
            "row_id": edit.row_id,
            "stem": _stem(edit.input),
            "seed": str(edit.seed),
            "ext": self.ext(info),
        }
        return output_name(edit.output, fields)

    def encode(self, edit: Edit, result: Audio, info: AudioInfo) -> Encoded:
        ext = self.ext(info)
        data = audio_ops.encode(result, self.container(info))
        return Encoded(self.name(edit, info), data, CONTENT_TYPES.get(ext, "application/octet-stream"), ext)

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
            "prompt": edit.prompt,
            "seed": str(edit.seed),
            **details,
        }


@dataclass(frozen=True)
class Encoded:
    name: str
    data: bytes
    content_type: str
    ext: str


def _stem(source: str) -> str:
    """The input's file name without extension, for s3:// and https:// inputs too."""
    return PurePosixPath(source.split("?", 1)[0].rstrip("/")).stem or "input"
