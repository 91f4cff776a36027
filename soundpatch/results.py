"""Results of edits, by identity (identity.py): an earlier one found and published again
under a row's name (skipped_done, at no cost), or a new one published with its index
record. A result the output store refuses is kept on this machine, in
runs/<run_id>/unpublished/, for the next run to publish: it was paid for."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from soundpatch import audio as audio_ops
from soundpatch.audio import Audio, AudioInfo
from soundpatch.combine import excerpt_span, overlay, region_of
from soundpatch.cpu import crunching
from soundpatch.edits import Edit
from soundpatch.errors import RowError, as_sentence
from soundpatch.outcome import SKIPPED_DONE, Outcome
from soundpatch.publish import Encoded, Publisher
from soundpatch.quality import LOSSLESS, context_span, judge, published
from soundpatch.runs_folder import kept_results
from soundpatch.storage import LocalFolder, OutputStore, local_result_holds

# What a result's metadata says of how it was made (also kept in its index record).
RESULT_DETAILS = ("provider", "model", "prediction_id", "cost_usd", "method", "source_sha256")


class KeptUnpublished(RowError):
    """The output store refused the result; it is kept on this machine, and the next run
    publishes it without paying again."""


class Results:
    def __init__(self, store: OutputStore, publisher: Publisher, runs_dir: Path, run_dir: Path) -> None:
        self.store = store
        self.publisher = publisher
        self.unpublished = LocalFolder(run_dir / "unpublished")
        # From any run here: a later run publishes them.
        self._kept = kept_results(runs_dir)

    def earlier(self, identity: str) -> tuple[dict, OutputStore] | None:
        """An earlier result with this identity that still exists, and the store holding it:
        the output store, or this machine's results kept after a failed upload."""
        record = self.store.get_record(identity)
        if record is not None and self.store.holds(record.get("output", ""), identity):
            return record, self.store
        kept = self._kept.get(identity)
        if kept is not None and local_result_holds(Path(kept.get("output", "")), identity):
            return kept, self.unpublished
        return None

    def reuse(
        self, edit: Edit, info: AudioInfo, identity: str, outcome: Outcome, original: Callable[[], Audio]
    ) -> bool:
        """Publish an earlier result with this identity under the row's name, onto `outcome`
        (skipped_done, cost 0); False when there is none. `original()`: the row's recording,
        decoded, to make the result again in another format or whole from a combined row's
        excerpt (a copy in the store takes none of it: a rerun downloads nothing for it)."""
        earlier = self.earlier(identity)
        if earlier is None:
            return False
        record, store = earlier
        excerpt = excerpt_span(record.get("excerpt_frames"))
        whole_asked = excerpt is not None and self.publisher.part_span(edit, info) is None
        if whole_asked:  # the record is of what it now publishes: the whole recording
            record = {k: v for k, v in record.items() if k != "excerpt_frames"}
        metadata = self.publisher.metadata(
            edit, {**_details(record), "identity": identity, "reused_from": str(record["output"])}
        )
        name = self.publisher.name(edit, info)
        if store is self.store and record.get("ext") == self.publisher.ext(info, edit) and not whole_asked:
            outcome.output = self.store.copy(record["output"], name, metadata)
        else:  # another format asked for, the whole of an excerpt, or kept locally after a failed upload
            recording = original()
            with store.opened(record["output"]) as earlier_file:
                with crunching():  # read as it is written: a recording hours long is never held whole
                    if whole_asked and excerpt is not None:  # its region, into the recording it came from
                        part = region_of(earlier_file, record["output"], recording, *excerpt, excerpt)
                        earlier_result = overlay(recording, [(edit.row_id, part, *excerpt)])
                    else:
                        earlier_result = audio_ops.stored(earlier_file, record["output"])
                    encoded = self.publisher.encode(edit, earlier_result, info)
                    try:
                        checks = self._checks(edit, info, recording, encoded, record.get("quality") or {})
                    except BaseException:
                        encoded.discard()
                        raise
            try:
                outcome.output = self.store.put(encoded.name, encoded.path, encoded.content_type, metadata)
            finally:
                encoded.discard()
            if store is not self.store and not whole_asked:
                republished = {**record, "output": outcome.output, "ext": encoded.ext, "quality": checks}
                self.store.put_record(identity, republished)
            record = {**record, "quality": checks}
        outcome.status = SKIPPED_DONE
        outcome.take_checks(record.get("quality") or {})
        outcome.reused_from = record["output"]
        outcome.prediction_id = str(record.get("prediction_id", ""))
        outcome.method = str(record.get("method", ""))
        return True

    def _checks(self, edit: Edit, info: AudioInfo, original: Audio, encoded: Encoded, earlier: dict) -> dict:
        """The quality checks of an earlier result written again (in another format, or made
        whole again from its excerpt), as users will read it: another format may not hold
        the recording as its input did (a float WAV's peaks over full scale, clipped in a
        FLAC), and the earlier checks were of the earlier file."""
        a, b = audio_ops.region_frames(edit.start or 0.0, edit.end or 0.0, info.rate, original.frames)
        lo, hi = context_span(a, b, original.rate, original.frames)
        part = self.publisher.part_span(edit, info)
        back = published(encoded.path, encoded.name, original, a, b, lo, hi, 0 if part is None else part[0])
        offset_ms = float(earlier.get("offset_ms") or 0.0)  # the provider's misalignment undone when it was made
        return judge(original, back, a, b, encoded.ext in LOSSLESS, offset_ms).to_dict()

    def publish(self, edit: Edit, record: dict[str, Any], encoded: Encoded) -> str:
        """Put the result and its index record (`record`: how it was made, under its identity)
        into the output store; its URI. Raises KeptUnpublished when the store refused it and
        it is kept here, RowError when keeping it failed too."""
        identity = record["identity"]
        metadata = self.publisher.metadata(edit, {**_details(record), "identity": identity})
        try:
            output = self.store.put(encoded.name, encoded.path, encoded.content_type, metadata)
            self.store.put_record(identity, {**record, "output": output})
            return output
        except RowError as exc:
            try:
                kept = self.unpublished.put(encoded.name, encoded.path, encoded.content_type, metadata)
                self.unpublished.put_record(identity, {**record, "output": kept})
            except RowError as lost:
                raise RowError(
                    f"{as_sentence(str(exc)).rstrip('.')}; keeping the result here failed too "
                    f"({as_sentence(str(lost)).rstrip('.')})"
                ) from None
            raise KeptUnpublished(
                f"{as_sentence(str(exc)).rstrip('.')}; the paid result is kept at {kept} and the next run "
                "publishes it without paying again"
            ) from None


def _details(record: dict[str, Any]) -> dict[str, str]:
    """What a result's metadata says of how it was made (RESULT_DETAILS), and of what it
    holds of its recording when only a part (a row of a combined file's: combine.py)."""
    details = {k: str(record.get(k, "")) for k in RESULT_DETAILS}
    if record.get("excerpt_frames"):
        details["excerpt_frames"] = str(record["excerpt_frames"])
    return details
