"""Putting a finished result where users find it: encoded, named, described, stored.

The container follows `output.format` (or the input's own with `same`); the sample
format follows the input wherever the container allows it, which is what keeps the
audio outside the region identical to the input.
"""

from __future__ import annotations

from pathlib import Path

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

    def name(self, edit: Edit, info: AudioInfo) -> str:
        """The result's name under the output prefix; raises RowError for an unusable template.

        Checked while validating, before any money is spent, not first when publishing."""
        container = self.container(info)
        fields = {
            "run_id": self.run_id,
            "row_id": edit.row_id,
            "stem": Path(edit.input).stem,
            "seed": str(edit.seed),
            "ext": audio_ops.EXTENSIONS.get(container, container.lower()),
        }
        return output_name(edit.output, fields)

    def publish(self, edit: Edit, result: Audio, info: AudioInfo, details: dict[str, str]) -> str:
        """Store `result` for `edit`; `details` (provider, prediction, cost...) go in its metadata."""
        container = self.container(info)
        ext = audio_ops.EXTENSIONS.get(container, container.lower())
        data = audio_ops.encode(result, container)
        name = self.name(edit, info)
        metadata = {
            "row_id": edit.row_id,
            "run_id": self.run_id,
            "input": edit.input,
            "region": f"{edit.start:g}-{edit.end:g}",
            "prompt": edit.prompt,
            "seed": str(edit.seed),
            **details,
            **dict(edit.extra),
        }
        return self.store.put(name, data, CONTENT_TYPES.get(ext, "application/octet-stream"), metadata)
