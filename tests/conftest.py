from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from soundpatch import demo_audio


@pytest.fixture
def write_audio(tmp_path: Path):
    """Write float samples to tmp_path/name in the given subtype; returns the path."""

    def write(name: str, samples: np.ndarray, rate: int, subtype: str = "PCM_16") -> Path:
        path = tmp_path / name
        sf.write(path, samples, rate, subtype=subtype)
        return path

    return write


@pytest.fixture(scope="session")
def music_44k() -> np.ndarray:
    return demo_audio.music(20.0, 44100, channels=2, seed=1)


@pytest.fixture(scope="session")
def voice_16k() -> np.ndarray:
    return demo_audio.voice(20.0, 16000, seed=2)
