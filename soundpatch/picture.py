"""The picture on a report card: before | after, each a waveform over a spectrogram of
the region with its context, the region shaded, as one small PNG.

Drawn straight into pixels (min/max envelopes, a numpy STFT, matplotlib's colormap and
PNG writer, no figure layout): ~30 ms a card, where matplotlib figures took 0.5 s.
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from soundpatch.preview import Preview

WIDTH, WAVE_HEIGHT, SPEC_HEIGHT = 360, 56, 80
_BACKGROUND = np.array([1.0, 1.0, 1.0])
_REGION = np.array([0.99, 0.93, 0.75])
_INKS = (np.array([0.12, 0.37, 0.66]), np.array([0.09, 0.41, 0.17]))  # before blue, after green


def draw(p: Preview) -> bytes:
    """Before | after: waveform over spectrogram, the region shaded, as PNG bytes."""
    import matplotlib  # noqa: PLC0415 - only when a report has pictures to draw
    import matplotlib.image  # noqa: PLC0415

    peak = max(float(np.abs(p.before).max(initial=0)), float(np.abs(p.after).max(initial=0)), 1e-3)
    n = max(len(p.before), 1)
    lo, hi = (round(p.region[0] * p.rate * WIDTH / n), round(p.region[1] * p.rate * WIDTH / n))
    hi = max(hi, lo + 1)
    spectra = [_spectrogram(x) for x in (p.before, p.after)]
    top = max(float(s.max(initial=-200)) for s in spectra)
    panels = []
    for x, spectrum, ink in zip((p.before, p.after), spectra, _INKS, strict=True):
        wave = _waveform(x, peak, ink, lo, hi)
        spec = matplotlib.colormaps["magma"](np.clip((spectrum - (top - 90)) / 90, 0, 1))[..., :3]
        spec[:, max(0, lo - 1) : lo + 1] = _REGION
        spec[:, hi - 1 : hi + 1] = _REGION
        panels.append(np.vstack([wave, np.ones((4, WIDTH, 3)), spec]))
    image = np.hstack([panels[0], np.ones((panels[0].shape[0], 12, 3)), panels[1]])
    buf = io.BytesIO()
    matplotlib.image.imsave(buf, image, format="png")
    return buf.getvalue()


def _waveform(x: np.ndarray, peak: float, ink: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """Min/max envelope per pixel column, region shaded."""
    image = np.tile(_BACKGROUND, (WAVE_HEIGHT, WIDTH, 1))
    image[:, lo:hi] = _REGION
    if len(x) == 0:
        return image
    edges = np.linspace(0, len(x), WIDTH + 1).astype(int)
    edges[1:] = np.maximum(edges[1:], edges[:-1] + 1)
    edges = np.minimum(edges, len(x))
    starts = np.minimum(edges[:-1], len(x) - 1)
    low = np.minimum.reduceat(x, starts)
    high = np.maximum.reduceat(x, starts)
    level = peak * (1 - 2 * np.arange(WAVE_HEIGHT) / (WAVE_HEIGHT - 1))[:, None]  # top row = +peak
    half_pixel = peak / (WAVE_HEIGHT - 1)
    ink_mask = (level >= low[None, :] - half_pixel) & (level <= high[None, :] + half_pixel)
    image[ink_mask] = ink
    return image


def _spectrogram(x: np.ndarray, nfft: int = 512) -> np.ndarray:
    """dB magnitudes, SPEC_HEIGHT rows (low frequencies at the bottom) by WIDTH columns."""
    if len(x) < nfft:
        x = np.pad(x, (0, nfft - len(x)))
    centres = np.linspace(0, len(x) - nfft, WIDTH).astype(int)
    frames = x[centres[:, None] + np.arange(nfft)[None, :]] * np.hanning(nfft)[None, :]
    power = np.abs(np.fft.rfft(frames, axis=1)) ** 2  # (WIDTH, nfft/2+1)
    rows = np.linspace(0, power.shape[1], SPEC_HEIGHT + 1).astype(int)
    binned = np.add.reduceat(power, rows[:-1], axis=1) / np.maximum(np.diff(rows), 1)
    return (10 * np.log10(binned + 1e-12)).T[::-1]
