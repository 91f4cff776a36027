"""A prediction made into the row's result: spliced into its recording, encoded as it will
be published, checked as users will read it, and published with its index record.

Listening copies of a few results are kept for the report (preview.py); results of the
local engine that came out identical for the same region are counted, for a note.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from soundpatch import audio as audio_ops
from soundpatch import preview
from soundpatch.audio import Audio, ReadBack
from soundpatch.combine import excerpt_frames
from soundpatch.cpu import crunching
from soundpatch.edits import Edit
from soundpatch.providers import Prediction, Provider
from soundpatch.publish import Encoded, Publisher
from soundpatch.quality import LOSSLESS, Quality, context_span, judge, published
from soundpatch.results import Results
from soundpatch.row import RowWork


class Splicer:
    def __init__(
        self,
        crossfade_ms: float,
        publisher: Publisher,
        results: Results,
        run_id: str,
        run_dir: Path,
        edits: list[Edit],
        log_traceback: Callable[[Edit], None],
    ) -> None:
        """`edits`: the manifest's; `log_traceback(edit)` keeps an error's traceback for errors.log."""
        self.crossfade_ms = crossfade_ms
        self.publisher = publisher
        self.results = results
        self.run_id = run_id
        self.run_dir = run_dir
        self._log_traceback = log_traceback
        self._previews = preview.Quota()  # listening copies kept for the report
        # Results of the local engine for regions the manifest asks for more than once:
        # (source, region, result digest) -> (how many, the first few rows).
        regions = Counter((e.input, e.start, e.end) for e in edits)
        self._repeated_regions = {region for region, n in regions.items() if n > 1}
        self._same_fills: dict[tuple, _Alike] = {}
        self._lock = threading.Lock()

    def splice(self, work: RowWork, prediction: Prediction, provider: Provider) -> tuple[Encoded, Quality]:
        """The prediction spliced into the recording and encoded as it will be published, with
        the quality checks of it as users will read it (on the row, and its report card)."""
        edit, original, a, b = work.edit, work.original, work.a, work.b
        fade = prediction.crossfade
        if fade is None:
            fade = round(self.crossfade_ms / 1000 * original.rate)
        lo, hi = context_span(a, b, original.rate, original.frames)
        part = self.publisher.part_span(edit, work.checked.info)  # a row of a combined file: (lo, hi)
        with crunching():  # the recording is not copied: written to a file a block at a time (audio.py)
            if work.damaged:  # its spans alone (the local engine's rebuilt, or a model's audio faded in)
                result = audio_ops.patch_spans(original, prediction.fill, a, b, work.damaged, fade)
            else:
                result = audio_ops.patch(original, prediction.fill, a, b, fade)
            encoded = self.publisher.encode(edit, result if part is None else result.cut(*part), work.checked.info)
            try:
                # Checked as users will read it: decoded back, compared with the original outside the region.
                at = 0 if part is None else part[0]
                back = published(encoded.path, encoded.name, original, a, b, lo, hi, at)
                quality = judge(original, back, a, b, encoded.ext in LOSSLESS, prediction.offset_ms)
            except BaseException:
                encoded.discard()
                raise
        if not provider.uses_prompt and (edit.input, edit.start, edit.end) in self._repeated_regions:
            # Variations of a region from an engine that cannot vary much: which came out alike.
            fill = (work.made_for["source_sha256"], a, b, encoded.sha256())
            with self._lock:
                alike = self._same_fills.setdefault(fill, _Alike())
                alike.results += 1
                if len(alike.rows) < 3:
                    alike.rows.append(edit.row_id)
        work.outcome.take_checks(quality.to_dict())
        if self._previews.take(flagged=bool(quality.flags)):
            self._save_preview(edit, original, back, a, b)
        return encoded, quality

    def publish(
        self, work: RowWork, prediction: Prediction, provider: Provider, encoded: Encoded, quality: Quality
    ) -> None:
        """The result and its index record into the output store (the row's `output`); should
        the store refuse, kept on this machine for the next run to publish (KeptUnpublished)."""
        edit, made_for, outcome = work.edit, work.made_for, work.outcome
        record = {
            "identity": made_for["identity"],
            "provider": provider.name,
            "model": provider.model,
            "prediction_id": outcome.prediction_id,
            "cost_usd": f"{prediction.cost_usd:.6f}",
            "method": prediction.method,
            "source_sha256": made_for["source_sha256"],
            "ext": encoded.ext,
            "run_id": self.run_id,
            "row_id": edit.row_id,
            "input": edit.input,
            "start": edit.start,
            "end": edit.end,
            "prompt": edit.prompt,
            "seed": edit.seed,
            "quality": quality.to_dict(),
        }
        part = self.publisher.part_span(edit, work.checked.info)
        if part is not None:  # what it holds of the recording (combine.py, results.py)
            record["excerpt_frames"] = excerpt_frames(*part, work.original.frames)
        outcome.output = self.results.publish(edit, record, encoded)

    def alike_note(self) -> str | None:
        """Results that came out identical to another of the same region, if any."""
        alike = sorted((sorted(a.rows), a.results) for a in self._same_fills.values() if a.results > 1)
        if not alike:
            return None
        shown = "; ".join(" = ".join(rows) + (" = ..." if n > len(rows) else "") for rows, n in alike[:3])
        return (
            f"{sum(n for _, n in alike)} results came out identical to another of the same region "
            f"({shown}{'; ...' if len(alike) > 3 else ''}): the local engine finds one best fill there whatever "
            "the seed; a hosted model makes real variations."
        )

    def _save_preview(self, edit: Edit, original: Audio, published: ReadBack, a: int, b: int) -> None:
        """Listening copies for the report; a failure here costs the report a card's media, not the row."""
        try:
            preview.save(self.run_dir / "previews", edit.row_id, original, published.excerpt, a, b, published.lo)
        except Exception:  # noqa: BLE001 - the result is published; the preview is a nicety
            self._log_traceback(edit)


@dataclass
class _Alike:
    """Results that came out identical: how many, and the first few rows."""

    results: int = 0
    rows: list[str] = field(default_factory=list)
