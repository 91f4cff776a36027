"""What makes two edits the same edit, so a paid result is never paid for again.

An edit's identity is a SHA-256 over everything that decides the audio it produces: the
input's content (not its name or place), the region (and the damaged spans in it, which the
local engine rebuilds alone), the prompt, the model parameters and seed, the provider and
model version, and the settings that shape the clip sent and the splice made. Two rows,
two runs or two machines with the same identity want the same result; the output store
indexes results by it (storage.INDEX_PREFIX).

The output container is not part of it: a result is re-encoded when a rerun asks for
another format.

A request's identity is the part of it the row itself asks for (input content, region,
prompt, seed, steps, guidance), without the settings of how it is made (provider, model,
clip and splice settings). A rerun with the same run id compares it to what the earlier
attempt recorded: a row asking for something else is done again, while a changed setting
does not undo work already paid for (--force or a new run id does that).

What a hosted model is sent does not depend on a row's damaged spans: they only say where
its audio goes in the splice. So what an attempt paid for is matched by the request without
them (`sent_identity`), and a model's paid answer kept with the results is named by that and
by what shaped the clip it was sent (`answer_identity`, kept_answers.py): changing the spans,
or the crossfade, splices it again rather than paying for it again.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from typing import Any

from soundpatch.config import Config
from soundpatch.edits import Edit

SCHEME = 1  # bump when the fields below change meaning


def edit_identity(
    edit: Edit, source_sha256: str, provider: str, model: str, config: Config, clip: dict[str, Any] | None = None
) -> str:
    """`clip`: the clip settings ({"context_seconds", "pad"}) the model was sent the row
    with, where not the config's (an earlier attempt's, collected)."""
    clip = clip or {"context_seconds": config.provider.context_seconds, "pad": config.provider.pad}
    fields: dict[str, Any] = {
        **_asked(edit, source_sha256),
        "provider": provider,
        "model": model,
        "context_seconds": clip["context_seconds"],
        "pad": clip["pad"],
        "crossfade_ms": config.splice.crossfade_ms,
    }
    return _digest(fields)


def request_identity(edit: Edit, source_sha256: str) -> str:
    return _digest({**_asked(edit, source_sha256), "of": "request"})


def sent_identity(edit: Edit, source_sha256: str) -> str:
    """The request without the row's damaged spans (for a row without, its request identity)."""
    return request_identity(replace(edit, damaged=()), source_sha256)


def answer_identity(sent: str, provider: str, model: str, clip: dict[str, Any]) -> str:
    """What a hosted model's answer was made for: the request it was sent (`sent_identity`),
    the provider and model, and the clip settings it was cut with."""
    fields = {"scheme": SCHEME, "of": "answer", "sent": sent, "provider": provider, "model": model}
    return _digest({**fields, "context_seconds": clip["context_seconds"], "pad": clip["pad"]})


def _asked(edit: Edit, source_sha256: str) -> dict[str, Any]:
    return {
        "scheme": SCHEME,
        "source_sha256": source_sha256,
        "start": repr(float(edit.start or 0.0)),
        "end": repr(float(edit.end or 0.0)),
        "prompt": edit.prompt,
        "seed": edit.seed,
        "steps": edit.steps,
        "guidance_scale": edit.guidance_scale,
        # (only where given: the identities of rows without it stay what they were)
        **({"damaged": [[repr(a), repr(b)] for a, b in edit.damaged]} if edit.damaged else {}),
    }


def _digest(fields: dict[str, Any]) -> str:
    canonical = json.dumps(fields, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()
