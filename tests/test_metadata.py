"""What a recording's file holds besides its audio comes back in its result (metadata.py).

An archive's broadcast WAVs say when and where they were recorded (bext), a field
recorder's say scene and take (iXML), cue points mark what an editor found; a FLAC's tags
and cover art name the release. Before, every result was written with none of it.

The files here are built chunk by chunk (and block by block) by this test's own helpers,
and the results are read back by the same helpers and by Python's own `wave` module.
"""

from __future__ import annotations

import errno
import io
import struct
import wave
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from soundpatch import metadata
from soundpatch.audio import Audio, Patched, decode, encode_file, stored
from soundpatch.config import load_config
from tests.jobs import clean_env, hosted_config, run_in_process, seeded_prefect_home, soundpatch

RATE = 8000
BEXT = b"Reel 12, side A".ljust(256, b"\0") + b"Radio archive".ljust(32, b"\0") + b"R12A".ljust(32, b"\0")
BEXT += b"1987-05-04" + b"10:30:00" + struct.pack("<Q", 28_800_000) + struct.pack("<H", 1) + bytes(254)
BEXT += b"A=ANALOGUE,M=stereo,T=Studer A80\r\nA=PCM,F=8000,W=16,M=stereo,T=digitized\r\n"
IXML = b'<?xml version="1.0"?><BWFXML><SCENE>12</SCENE><TAKE>3</TAKE></BWFXML>'
CUE = struct.pack("<I", 1) + struct.pack("<II4sIII", 1, 6000, b"data", 0, 0, 6000)
ADTL = b"adtl" + b"labl" + struct.pack("<I", 10) + struct.pack("<I", 1) + b"crack\0"
INFO = b"INFO" + b"INAM" + struct.pack("<I", 10) + b"Interview" + b"\0"


def noted(mode: str, *spans: str) -> bytes:
    """BEXT with the line a result's coding history gains: what soundpatch did to it."""
    return BEXT + f"A=PCM,F=8000,W=16,M={mode},T=soundpatch inpaint {'; '.join(spans)}\r\n".encode()


def pcm(seconds: float, channels: int = 2, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(-9000, 9000, (int(seconds * RATE), channels)).astype(np.int16)


def chunk(cid: bytes, body: bytes, endian: str = "<") -> bytes:
    return struct.pack(f"{endian}4sI", cid, len(body)) + body + (b"\0" if len(body) & 1 else b"")


def chunks(data: bytes, endian: str = "<") -> list[tuple[bytes, bytes]]:
    """(id, body) of every chunk of a RIFF or AIFF file, checking its sizes add up."""
    assert struct.unpack(f"{endian}I", data[4:8])[0] == len(data) - 8
    found, at = [], 12
    while at < len(data):
        cid, size = struct.unpack(f"{endian}4sI", data[at : at + 8])
        found.append((cid, data[at + 8 : at + 8 + size]))
        at += 8 + size + (size & 1)
    assert at == len(data)
    return found


def with_chunks(plain: bytes, before: list[tuple[bytes, bytes]], after: list[tuple[bytes, bytes]], endian="<") -> bytes:
    """The file libsndfile wrote (`plain`), with chunks before its audio and after it."""
    audio_id = b"data" if endian == "<" else b"SSND"
    own = chunks(plain, endian)
    body = b"".join(chunk(c, b, endian) for c, b in own if c != audio_id)
    body += b"".join(chunk(c, b, endian) for c, b in before)
    body += b"".join(chunk(c, b, endian) for c, b in own if c == audio_id)
    body += b"".join(chunk(c, b, endian) for c, b in after)
    return plain[:4] + struct.pack(f"{endian}I", 4 + len(body)) + plain[8:12] + body


def flac_blocks(data: bytes) -> tuple[list[tuple[int, bytes]], bytes]:
    """The metadata blocks (type, body) of a FLAC, checking only the last says so, and its frames."""
    assert data[:4] == b"fLaC"
    found, at, last = [], 4, False
    while not last:
        last, kind, size = bool(data[at] & 0x80), data[at] & 0x7F, int.from_bytes(data[at + 1 : at + 4], "big")
        found.append((kind, data[at + 4 : at + 4 + size]))
        at += 4 + size
    return found, data[at:]


def flac_with(plain: bytes, blocks: list[tuple[int, bytes]]) -> bytes:
    """libsndfile's FLAC (`plain`) with `blocks` in place of all but its STREAMINFO."""
    own, frames = flac_blocks(plain)
    every = own[:1] + blocks
    head = b"".join(
        bytes([(0x80 if i == len(every) - 1 else 0) | k]) + len(b).to_bytes(3, "big") + b
        for i, (k, b) in enumerate(every)
    )
    return b"fLaC" + head + frames


def comments(vendor: bytes, *fields: str) -> bytes:
    body = struct.pack("<I", len(vendor)) + vendor + struct.pack("<I", len(fields))
    return body + b"".join(struct.pack("<I", len(f.encode())) + f.encode() for f in fields)


PICTURE = struct.pack(">II", 3, 9) + b"image/png" + struct.pack(">I", 5) + b"cover" + bytes(16) + struct.pack(">I", 8)
PICTURE += b"\x89PNG\r\n\x1a\n"


def wav_bytes(samples: np.ndarray, subtype: str = "PCM_16", format: str = "WAV") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, samples, RATE, subtype=subtype, format=format)
    return buf.getvalue()


def run_rows(tmp_path: Path, rows: list[str], **overrides: str) -> list:
    (tmp_path / "m.csv").write_text("id,input,start,end,prompt,output\n" + "\n".join(rows) + "\n")
    cfg = load_config(overrides={"output.uri": str(tmp_path / "out"), "runs_dir": str(tmp_path / "runs"), **overrides})
    outcomes = run_in_process(tmp_path / "m.csv", cfg, "meta")[0]
    assert [o.status for o in outcomes] == ["succeeded"] * len(rows), [o.error for o in outcomes]
    return outcomes


def outside_is_the_same(result: Path, source: np.ndarray, a: float, b: float) -> None:
    out = sf.read(result, dtype="int16", always_2d=True)[0]
    assert out.shape == source.shape
    assert np.array_equal(out[: int(a * RATE)], source[: int(a * RATE)])
    assert np.array_equal(out[int(b * RATE) :], source[int(b * RATE) :])


def test_a_broadcast_wav_run_as_users_run_it_keeps_its_chunks_and_not_those_of_its_old_samples(tmp_path):
    source = pcm(3.0)
    before = [
        (b"bext", BEXT),
        (b"iXML", IXML),
        (b"cue ", CUE),
        (b"LIST", ADTL),
        (b"md5 ", bytes(16)),
        (b"JUNK", bytes(30)),
    ]
    (tmp_path / "reel.wav").write_bytes(with_chunks(wav_bytes(source), before, [(b"LIST", INFO)]))
    (tmp_path / "m.csv").write_text("id,input,start,end,prompt\nclick,reel.wav,1.0,1.2,room tone\n")
    env = clean_env(PREFECT_HOME=str(seeded_prefect_home(tmp_path / "prefect")))
    done = soundpatch("run", "m.csv", "--run-id", "bwf", cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr
    [result] = (tmp_path / "outputs" / "bwf").glob("reel*.wav")

    found = chunks(result.read_bytes())
    kept = [(c, b) for c, b in found if c not in (b"fmt ", b"data")]
    # Every chunk about the recording, byte for byte and in its order (the coding history
    # gains a line saying what was done, as EBU R 98 asks); not the checksum of the old
    # samples (md5), nor padding.
    bext = noted("stereo", "1.000-1.200 s")
    assert kept == [(b"bext", bext), (b"iXML", IXML), (b"cue ", CUE), (b"LIST", ADTL), (b"LIST", INFO)]
    outside_is_the_same(result, source, 1.0, 1.2)
    with sf.SoundFile(result) as f:
        assert f.title == "Interview"
    with wave.open(str(result)) as w:  # another reader of its own
        assert (w.getnframes(), w.getnchannels(), w.getsampwidth()) == (len(source), 2, 2)


def test_an_rf64_recording_s_chunks_go_into_its_wav_result(tmp_path):
    source = pcm(2.0, 1)
    plain = wav_bytes(source, format="RF64")
    at = plain.index(b"data")  # libsndfile's RF64 says its data's size in its ds64 chunk
    (tmp_path / "long.wav").write_bytes(plain[:at] + chunk(b"bext", BEXT) + plain[at:] + chunk(b"iXML", IXML))
    [o] = run_rows(tmp_path, ["x,long.wav,0.5,0.6,silence,"])
    found = chunks(Path(o.output).read_bytes())
    assert [(c, b) for c, b in found if c in (b"bext", b"iXML")] == [
        (b"bext", noted("mono", "0.500-0.600 s")),
        (b"iXML", IXML),
    ]
    outside_is_the_same(Path(o.output), source, 0.5, 0.6)


def test_a_broadcast_wav_from_a_bucket_through_a_hosted_model_into_a_bucket_keeps_its_chunks(
    tmp_path, aws_env, simulator, monkeypatch
):
    monkeypatch.setenv("EACHLABS_API_KEY", "k")
    source = pcm(3.0)
    aws_env.client.put_object(
        Bucket=aws_env.bucket("tapes"), Key="reel.wav", Body=with_chunks(wav_bytes(source), [(b"bext", BEXT)], [])
    )
    aws_env.bucket("stage")
    out = aws_env.bucket("restored")
    (tmp_path / "m.csv").write_text("id,input,start,end,prompt\nx,s3://tapes/reel.wav,1.0,1.5,room tone\n")
    sim = simulator(latency=0.05, fill="tone")
    cfg = hosted_config(sim, aws_env.endpoint, f"s3://{out}/lib/", tmp_path / "runs")
    [o] = run_in_process(tmp_path / "m.csv", cfg, "hosted")[0]
    assert o.status == "succeeded" and o.output.startswith(f"s3://{out}/lib/"), o.error
    result = tmp_path / "result.wav"
    aws_env.client.download_file(out, o.output.split("/", 3)[3], str(result))
    found = chunks(result.read_bytes())
    assert [(c, b) for c, b in found if c == b"bext"] == [(b"bext", noted("stereo", "1.000-1.500 s"))]
    outside_is_the_same(result, source, 1.0, 1.5)


def test_an_aiff_and_a_flac_keep_their_own_with_output_format_same(tmp_path):
    source = pcm(2.0)
    aiff_chunks = [
        (b"NAME", b"Take 3"),
        (b"ANNO", b"hum from 0:01"),
        (b"MARK", struct.pack(">HHI", 1, 1, 8000) + b"\x01m"),
    ]
    (tmp_path / "take.aiff").write_bytes(with_chunks(wav_bytes(source, format="AIFF"), aiff_chunks, [], ">"))
    tags = comments(b"archiver 1.0", "TITLE=Night train", "ARTIST=Field unit", "ISRC=GBAYE8700001", "NOTE=ü")
    flac_source = [(3, bytes(18)), (4, tags), (6, PICTURE), (2, b"riff" + b"payload"), (1, bytes(100))]
    (tmp_path / "night.flac").write_bytes(flac_with(wav_bytes(source, format="FLAC"), flac_source))
    a, b = run_rows(tmp_path, ["a,take.aiff,1.0,1.1,fill,", "b,night.flac,0.2,0.4,fill,"], **{"output.format": "same"})

    assert Path(a.output).suffix == ".aiff"
    kept = [(c, b) for c, b in chunks(Path(a.output).read_bytes(), ">") if c not in (b"COMM", b"SSND")]
    assert kept == aiff_chunks
    outside_is_the_same(Path(a.output), source, 1.0, 1.1)

    blocks, _ = flac_blocks(Path(b.output).read_bytes())
    assert blocks[0][0] == 0  # STREAMINFO first, libsndfile's own: the result's MD5 and length
    # Its comments and picture and application block as they were, one comment block (not
    # also libsndfile's), and not the source's seek table or padding.
    assert [k for k, _ in blocks[1:]] == [4, 6, 2]
    assert blocks[1:] == [(4, tags), (6, PICTURE), (2, b"riffpayload")]
    outside_is_the_same(Path(b.output), source, 0.2, 0.4)
    with sf.SoundFile(b.output) as f:
        assert (f.title, f.artist) == ("Night train", "Field unit")


def test_into_another_format_the_tags_go_along(tmp_path):
    source = pcm(2.0)
    tags = comments(b"archiver 1.0", "TITLE=Night train", "ARTIST=Field unit", "DATE=1987")
    (tmp_path / "night.flac").write_bytes(flac_with(wav_bytes(source, format="FLAC"), [(4, tags), (6, PICTURE)]))
    [wav] = run_rows(tmp_path, ["w,night.flac,0.2,0.4,fill,"])  # output.format: wav, the default
    with sf.SoundFile(wav.output) as f:
        assert f.copy_metadata() == {"title": "Night train", "artist": "Field unit", "date": "1987"}
    outside_is_the_same(Path(wav.output), source, 0.2, 0.4)
    # An MP3's ID3 frames, as libsndfile writes them, say Latin-1 and would hold UTF-8:
    # 'CafÃ© del Mar' in players. Accents are taken off instead, and what has no ASCII
    # form is left out rather than written garbled.
    tags = comments(b"archiver 1.0", "TITLE=Café del Mar", "ARTIST=東京", "ALBUM=Ölgemälde")
    (tmp_path / "cafe.flac").write_bytes(flac_with(wav_bytes(source, format="FLAC"), [(4, tags)]))
    [mp3] = run_rows(tmp_path, ["m,cafe.flac,0.2,0.4,fill,"], **{"output.format": "mp3"})
    data = Path(mp3.output).read_bytes()
    assert b"Cafe del Mar" in data and b"Olgemalde" in data
    assert "Café".encode() not in data and "東京".encode() not in data and "Café".encode("latin-1") not in data
    # A WAV's LIST INFO goes into an Ogg's comments.
    (tmp_path / "talk.wav").write_bytes(with_chunks(wav_bytes(source), [], [(b"LIST", INFO)]))
    [ogg] = run_rows(tmp_path, ["o,talk.wav,0.2,0.4,fill,"], **{"output.format": "ogg"})
    with sf.SoundFile(ogg.output) as f:
        assert f.title == "Interview"


def test_a_file_of_several_rows_edits_keeps_them_and_the_rows_own_excerpts_do_not(tmp_path):
    source = pcm(4.0)
    (tmp_path / "reel.wav").write_bytes(with_chunks(wav_bytes(source), [(b"bext", BEXT), (b"cue ", CUE)], []))
    a, b = run_rows(tmp_path, ["a,reel.wav,0.5,0.6,fill,fixed/{stem}", "b,reel.wav,2.5,2.6,fill,fixed/{stem}"])
    assert a.combined == b.combined
    found = chunks(Path(a.combined).read_bytes())
    bext = noted("stereo", "0.500-0.600 s", "2.500-2.600 s")
    assert [(c, x) for c, x in found if c not in (b"fmt ", b"data")] == [(b"bext", bext), (b"cue ", CUE)]
    # A row's own result is its region and a second each side: the cue's position (and the
    # bext's time reference) would say the wrong place in it.
    assert [c for c, _ in chunks(Path(a.output).read_bytes())] == [b"fmt ", b"data"]


def test_chunks_after_an_odd_sized_audio_chunk_begin_where_readers_look_for_them(tmp_path):
    source = pcm(1.0, 1)[:7999]  # as 7,999 bytes of 8-bit mono: an odd-sized data chunk
    plain = wav_bytes(source, subtype="PCM_U8")
    odd = with_chunks(plain, [(b"bext", BEXT)], [])
    audio = decode(odd)
    assert audio.carried is not None and audio.carried.parts == ((b"bext", BEXT),)
    out = tmp_path / "out.wav"
    encode_file(Patched(audio, []), "WAV", out)
    found = chunks(out.read_bytes())
    assert [c for c, _ in found] == [b"fmt ", b"data", b"bext"] and len(found[1][1]) == 7999
    assert np.array_equal(sf.read(out, dtype="int16")[0], sf.read(io.BytesIO(plain), dtype="int16")[0])
    with wave.open(str(out)) as w:
        assert w.getnframes() == 7999


def test_a_wav_result_past_4_gb_is_an_rf64_read_back_whole_with_its_chunks(tmp_path):
    # 3.4 hours of a 96 kHz 24-bit stereo transfer pass 4 GB; here 2**31 + 3 s of 8 kHz 16-bit
    # mono. A WAV's sizes say at most 4 GB: libsndfile wrote one all the same, and read it
    # back 10,000,000 frames short (its header said 0xFFFFFFFF bytes).
    frames = 2**31 + 3 * RATE
    silence = np.zeros((frames, 1), np.int16)  # pages never written to are not in memory
    filled = pcm(1.0, 1)
    carried = metadata.Carried("RIFF", ((b"bext", BEXT), (b"iXML", IXML)))
    out = tmp_path / "tape.wav"
    try:
        encode_file(
            Patched(Audio(silence, RATE, "WAV", "PCM_16", carried=carried), [(frames - 2 * RATE, filled)]), "WAV", out
        )
        with sf.SoundFile(out) as f:
            assert (f.format, f.frames) == ("RF64", frames)
            f.seek(frames - 2 * RATE - 10)
            around = f.read(RATE + 20, dtype="int16", always_2d=True)
        assert np.array_equal(around[10:-10], filled) and not around[:10].any() and not around[-10:].any()
        with out.open("rb") as raw:
            head = raw.read(28)
        assert head[:4] == b"RF64" and struct.unpack("<Q", head[20:28])[0] == out.stat().st_size - 8
        back = stored(out).carried
        assert back is not None and [c for c, _ in back.parts] == [b"bext", b"iXML"] and back.parts[1][1] == IXML
        assert back.parts[0][1].startswith(BEXT) and back.parts[0][1].endswith(
            b"T=soundpatch inpaint 268436.456-268437.456 s\r\n"
        )
    finally:
        out.unlink(missing_ok=True)  # (pytest keeps the last runs' folders)


def test_a_flac_result_its_disk_has_no_room_to_write_again_with_its_blocks_is_kept_without_them(tmp_path, monkeypatch):
    # A FLAC's blocks come before its audio: it is written a second time with them. The
    # result is paid for by then; a full disk at that moment must not cost it.
    source = pcm(1.0)
    audio = decode(flac_with(wav_bytes(source, format="FLAC"), [(6, PICTURE)]))
    assert audio.carried is not None and audio.carried.family == "FLAC"

    def no_room(src, dst, length=0):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(metadata.shutil, "copyfileobj", no_room)
    out = tmp_path / "out.flac"
    encode_file(Patched(audio, []), "FLAC", out)
    assert np.array_equal(sf.read(out, dtype="int16")[0], source)
    assert 6 not in [kind for kind, _ in flac_blocks(out.read_bytes())[0]]
    assert [f.name for f in tmp_path.iterdir()] == ["out.flac"]  # no half-written copy beside it
    monkeypatch.undo()
    encode_file(Patched(audio, []), "FLAC", out)  # with room, as before
    assert (6, PICTURE) in flac_blocks(out.read_bytes())[0]


def test_a_chunk_over_the_cap_is_left_out_and_the_rest_carried(tmp_path, monkeypatch):
    monkeypatch.setattr(metadata, "MAX_CARRIED_BYTES", 1000)
    big = bytes(2000)
    audio = decode(with_chunks(wav_bytes(pcm(0.5)), [(b"bext", BEXT), (b"iXML", big), (b"cue ", CUE)], []))
    assert audio.carried is not None and [c for c, _ in audio.carried.parts] == [b"bext", b"cue "]
    many = [(b"note", b"")] * 5000  # a file of thousands of empty chunks: the first 1,024
    audio = decode(with_chunks(wav_bytes(pcm(0.5)), many, []))
    assert audio.carried is not None and len(audio.carried.parts) == metadata.MAX_CARRIED_PARTS


@pytest.mark.parametrize("cut", [0.6, 0.95])
def test_a_file_cut_short_gives_the_chunks_before_its_audio(tmp_path, cut):
    whole = with_chunks(wav_bytes(pcm(2.0)), [(b"bext", BEXT)], [(b"LIST", INFO)])
    audio = decode(whole[: int(len(whole) * cut)])
    assert audio.carried is not None and audio.carried.parts == ((b"bext", BEXT),)


def test_a_coding_history_gains_one_line_however_it_ended(tmp_path):
    fixed = BEXT[:602]
    for history, kept in ((b"", b""), (b"A=ANALOGUE\r\n\0\0\0", b"A=ANALOGUE\r\n"), (b"A=ANALOGUE", b"A=ANALOGUE\r\n")):
        carried = metadata.Carried("RIFF", ((b"bext", fixed + history),))
        spans = [(i + 0.5, i + 0.75) for i in range(7)]
        [(_, body)] = metadata.noting_edits(carried, spans, 48000, 6, 24).parts
        line = b"A=PCM,F=48000,W=24,T=soundpatch inpaint 0.500-0.750 s; 1.500-1.750 s; 2.500-2.750 s; "
        assert body == fixed + kept + line + b"3.500-3.750 s; 4.500-4.750 s (and 2 more)\r\n"
    assert metadata.noting_edits(metadata.Carried("RIFF", ((b"iXML", IXML),)), [(1, 2)], 8000, 1, 16).parts == (
        (b"iXML", IXML),
    )
