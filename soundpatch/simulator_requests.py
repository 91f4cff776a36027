"""What the simulated APIs accept: each provider's request checked as its service would,
so a client that sends what the real one refuses is refused here too."""

from __future__ import annotations

from typing import Any

from soundpatch import soundio

MODEL = "stable-audio-2-5-inpaint"
STABILITY_MODELS = ("stable-audio-2", "stable-audio-2.5")


def check_prediction(body: Any, max_seconds: int = 190) -> str | None:
    if not isinstance(body, dict) or not isinstance(body.get("input"), dict):
        return "Body must be a JSON object with 'model' and 'input'"
    if body.get("model") != MODEL:
        return f"Unknown model {body.get('model')!r}"
    spec = body["input"]
    for key in ("prompt", "audio_url", "mask_start", "mask_end", "seconds_total"):
        if key not in spec:
            return f"input.{key} is required"
    if not all(isinstance(spec[k], int) for k in ("mask_start", "mask_end", "seconds_total")):
        return "mask_start, mask_end and seconds_total must be integers"
    if not 6 <= spec["seconds_total"] <= max_seconds:
        return f"seconds_total must be between 6 and {max_seconds}"
    if not 0 <= spec["mask_start"] < spec["mask_end"] <= spec["seconds_total"]:
        return "mask must satisfy 0 <= mask_start < mask_end <= seconds_total"
    steps = spec.get("num_inference_steps")
    if steps is not None and not 4 <= steps <= 8:
        return "num_inference_steps must be between 4 and 8"
    return None


def check_stability_call(
    fields: dict[str, str], clip: bytes | None, max_seconds: int = 190
) -> tuple[str | None, dict[str, Any], bytes]:
    """(problem, the edit as the model reads it, the uploaded clip) for a Stability call."""
    if not clip:
        return "audio: required (a file part named 'audio')", {}, b""
    if not fields.get("prompt"):
        return "prompt: required", {}, b""
    if fields.get("model", "stable-audio-2.5") not in STABILITY_MODELS:
        return f"model: must be one of {', '.join(STABILITY_MODELS)}", {}, b""
    if fields.get("output_format", "mp3") not in ("mp3", "wav"):
        return "output_format: must be mp3 or wav", {}, b""
    try:
        numbers = {k: int(fields[k]) for k in ("duration", "mask_start", "mask_end", "seed", "steps") if k in fields}
    except ValueError:
        return "duration, mask_start, mask_end, seed and steps must be integers", {}, b""
    try:
        with soundio.open_bytes(clip) as f:
            seconds = f.frames / f.samplerate
    except Exception:  # noqa: BLE001 - whatever the upload is, it is not audio we read
        return "audio: not a readable audio file", {}, b""
    if not 6 <= seconds <= max_seconds:
        return f"audio: must be between 6 and {max_seconds} seconds long (got {seconds:.2f})", {}, b""
    total = numbers.get("duration", 190)
    start, end = numbers.get("mask_start", 30), numbers.get("mask_end", 190)
    if not 1 <= total <= 190:
        return "duration: must be between 1 and 190", {}, b""
    if not 0 <= start < end <= 190:
        return "mask_end: must be greater than mask_start, both within 0..190", {}, b""
    if not 4 <= numbers.get("steps", 8) <= 8:
        return "steps: must be between 4 and 8", {}, b""
    if not 0 <= numbers.get("seed", 0) <= 4294967294:
        return "seed: must be between 0 and 4294967294", {}, b""
    spec = {"prompt": fields["prompt"], "seconds_total": total, "mask_start": start, "mask_end": min(end, total)}
    if "seed" in numbers:
        spec["seed"] = numbers["seed"]
    return None, spec, clip
