"""What the headers of recordings in a bucket say, read by byte ranges (soundpatch/ranged.py).

`soundpatch validate`, `run --dry-run` and a run's opening checks need of a recording its
length, rate, channels, format, whether it is cut short, and a broadcast WAV's time stamp.
Before, each recording in a bucket was downloaded whole and decoded for that: an archive of
hour-long tapes, 600 MB each, to say whether its rows' regions fit. The S3 server here is
moto on loopback, behind a proxy that counts what it serves.
"""

from __future__ import annotations

import hashlib
import http.server
import io
import itertools
import re
import struct
import threading
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import yaml

from soundpatch.audio import inspect
from soundpatch.config import S3Config, StorageConfig, load_config
from soundpatch.s3 import S3
from soundpatch.sources import SourceReader
from tests.jobs import clean_env, run_in_process, soundpatch
from tests.test_metadata import BEXT, chunks, comments, flac_with, with_chunks
from tests.test_mp3 import frame_starts
from tests.test_source_timecode import bext_at, ixml

RATE = 44100
MB = 1 << 20


def recording(seconds: float, channels: int = 2, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(-9000, 9000, (int(seconds * RATE), channels)).astype(np.int16)


def encoded(samples: np.ndarray, format: str, subtype: str) -> bytes:
    """`samples` as a file, written a block at a time (libsndfile's Vorbis encoder fails on
    a minute written at once)."""
    buf = io.BytesIO()
    with sf.SoundFile(buf, "w", RATE, samples.shape[1], subtype, format=format) as f:
        for at in range(0, len(samples), 1 << 14):
            f.write(samples[at : at + (1 << 14)])
    return buf.getvalue()


def put(s3, tmp_path: Path, key: str, data: bytes) -> Path:
    """`data` as s3://tapes/`key`, and as a local file beside it to compare with."""
    s3.client.put_object(Bucket=s3.bucket("tapes"), Key=key, Body=data)
    local = tmp_path / key
    local.write_bytes(data)
    return local


def test_a_bucket_s_recordings_are_known_by_their_headers_read_by_ranges_not_downloaded(tmp_path, aws_env, fault_proxy):
    proxy = fault_proxy(lambda method, path, signed: None)  # passes everything, counting it
    minute = recording(60.0)
    files = {
        "tape.wav": encoded(minute, "WAV", "PCM_16"),
        "tape24.wav": encoded(minute, "RF64", "PCM_24"),
        "tape.w64": encoded(minute, "W64", "PCM_16"),
        "tape.aiff": encoded(minute, "AIFF", "PCM_16"),
        "tape.flac": encoded(minute, "FLAC", "PCM_16"),
        "tape.ogg": encoded(minute, "OGG", "VORBIS"),
        "reel.wav": with_chunks(encoded(minute, "WAV", "PCM_16"), [(b"bext", BEXT)], [(b"LIST", b"INFO")]),
        "reel.flac": flac_with(
            encoded(minute, "FLAC", "PCM_16"), [(4, comments(b"reference libFLAC", "TIME_REFERENCE=1587600000"))]
        ),
        # A field recorder's take, with no bext: its iXML (after its samples) has the time stamp.
        "take.wav": with_chunks(
            encoded(minute, "WAV", "PCM_16"),
            [],
            [(b"iXML", ixml(("SPEED", "TIMESTAMP_SAMPLES_SINCE_MIDNIGHT_LO", 3600 * RATE)))],
        ),
    }
    whole = encoded(minute, "WAV", "PCM_16")
    files["cut.wav"] = whole[: len(whole) // 2]  # a transfer broken off: its header promises a minute
    local = {key: put(aws_env, tmp_path, key, data) for key, data in files.items()}
    reader = SourceReader(S3(S3Config(endpoint_url=proxy.endpoint)))

    for key, path in local.items():
        assert reader.info(f"s3://tapes/{key}") == inspect(str(path)), key
    assert reader.info("s3://tapes/cut.wav").promised_frames == len(minute)  # said to be cut short
    assert reader.time_stamp("s3://tapes/reel.wav") == (28_800_000 / RATE, 60.0)  # BEXT's, in samples
    assert reader.time_stamp("s3://tapes/reel.flac") == (1_587_600_000 / RATE, 60.0)  # 10:00:00
    assert reader.time_stamp("s3://tapes/take.wav") == (3600.0, 60.0)  # 01:00:00, from its iXML
    assert reader.time_stamp("s3://tapes/tape.wav") == (None, 60.0)

    gets = [(path, status) for method, path, status, _ in proxy.answers if method == "GET"]
    assert {status for _, status in gets} == {206}, gets  # ranges only: none downloaded whole
    total = sum(len(data) for data in files.values())
    assert total > 75 * MB and proxy.served() < 1.5 * MB, (total, proxy.served())
    assert len(gets) <= 3 * len(files), gets


def test_an_mp3_whose_tag_says_its_length_is_read_by_ranges_and_a_header_not_telling_is_downloaded(
    tmp_path, aws_env, fault_proxy
):
    # An MP3's tag (Xing or Info) counts its frames and bytes: a whole one is known by its
    # first and last blocks, as it would be by decoding it all. Without the tag, its header
    # gives an estimate; cut short, it holds fewer bytes than its tag says; and a FLAC's 6 MB
    # cover art is more than a header read takes (ranged.HEADER_BUDGET_BYTES): those three
    # are downloaded whole.
    proxy = fault_proxy(lambda method, path, signed: None)
    tagged = encoded(recording(60.0), "MP3", "MPEG_LAYER_III")
    assert tagged[36:40] == b"Xing"  # (libsndfile's encoder, LAME, writes one)
    cover = struct.pack(">II", 3, 9) + b"image/png" + struct.pack(">I", 0) + bytes(16) + struct.pack(">I", 6 * MB)
    files = {
        "take.mp3": tagged,
        "stream.mp3": tagged[frame_starts(tagged)[1] :],  # the tag's frame left out
        "cut.mp3": tagged[: len(tagged) // 2],
        "album.flac": flac_with(encoded(recording(20.0), "FLAC", "PCM_16"), [(6, cover + bytes(6 * MB))]),
    }
    reader = SourceReader(S3(S3Config(endpoint_url=proxy.endpoint)))
    for key, data in files.items():
        path = put(aws_env, tmp_path, key, data)
        served = proxy.served()
        assert reader.info(f"s3://tapes/{key}") == inspect(str(path)), key
        gets = [(p, status, size) for method, p, status, size in proxy.answers if method == "GET" and p.endswith(key)]
        if key == "take.mp3":
            assert {status for _, status, _ in gets} == {206} and proxy.served() - served < 200_000, gets
        else:
            assert gets[-1] == (f"/tapes/{key}", 200, len(data)), gets  # the whole of it, last
    assert reader.info("s3://tapes/cut.mp3").promised_frames == len(recording(60.0))  # said to be cut short
    assert proxy.served() < sum(map(len, files.values())) - len(tagged) + 5 * MB  # (and no more than 4 MB before it)


def test_a_recording_replaced_while_its_header_is_read_is_then_read_whole_as_it_now_is(tmp_path, aws_env, fault_proxy):
    first, second = encoded(recording(30.0), "WAV", "PCM_16"), encoded(recording(20.0, 1, seed=1), "FLAC", "PCM_16")
    put(aws_env, tmp_path, "take.wav", first)
    replaced = []

    def replace_once(method: str, path: str, signed: bool) -> None:
        if method == "GET" and path.endswith("/take.wav") and not replaced:  # between the HEAD and the first range
            replaced.append(aws_env.client.put_object(Bucket="tapes", Key="take.wav", Body=second))

    proxy = fault_proxy(replace_once)
    reader = SourceReader(S3(S3Config(endpoint_url=proxy.endpoint)))
    info = reader.info("s3://tapes/take.wav")
    assert (info.frames, info.channels, info.format) == (20 * RATE, 1, "FLAC")  # what it is now, whole
    statuses = [status for method, _, status, _ in proxy.answers if method == "GET"]
    assert statuses == [412, 200], statuses  # its first version's range refused (If-Match), then downloaded


def test_validate_on_an_archive_in_a_bucket_reads_headers_only_and_says_what_each_row_finds(
    tmp_path, aws_env, fault_proxy
):
    proxy = fault_proxy(lambda method, path, signed: None)
    tape = encoded(recording(120.0), "WAV", "PCM_16")  # two minutes, 21 MB
    bwf = with_chunks(tape, [(b"bext", bext_at(3600 * RATE))], [])  # first sample at 01:00:00
    assert [cid for cid, _ in chunks(bwf)][-1] == b"data"
    put(aws_env, tmp_path, "side_a.wav", bwf)
    put(aws_env, tmp_path, "side_b.wav", tape[: len(tape) // 3])  # cut short: 40 s of the 120 its header says
    (tmp_path / "m.csv").write_text(
        "id,input,start,end,prompt,timecode\n"
        "a1,s3://tapes/side_a.wav,61.5,61.7,tape hiss,\n"
        "a2,s3://tapes/side_a.wav,01:01:30,01:01:30.2,tape hiss,source\n"
        "a3,s3://tapes/side_a.wav,125,126,tape hiss,\n"
        "b1,s3://tapes/side_b.wav,10,10.2,tape hiss,\n"
        "b2,s3://tapes/side_b.wav,50,50.2,tape hiss,\n"
    )
    (tmp_path / "c.yaml").write_text(f"storage: {{s3: {{endpoint_url: '{proxy.endpoint}'}}}}\n")
    env = clean_env(AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test", AWS_EC2_METADATA_DISABLED="true")
    done = soundpatch("validate", "m.csv", "--config", "c.yaml", cwd=tmp_path, env=env)
    assert done.returncode == 1, done.stdout + done.stderr  # rows invalid
    said = " ".join(done.stdout.split())
    assert "invalid a3 (line 4): Region starts at 125 s but side_a.wav is only 120.000 s long." in said, said
    assert "invalid b2 (line 6): Region starts at 50 s but side_b.wav breaks off at 40.000 s of the 120.000 s" in said
    assert "Input s3://tapes/side_b.wav is cut short: it holds 40.000 s of the 120.000 s its header promises" in said
    assert "invalid 2" in said, said
    assert "predictions to send 3" in said.lower(), said  # a1, a2 (90 s into side a) and b1
    assert proxy.served() < MB, proxy.served()  # of 28 MB in the bucket


def test_validate_and_runs_after_a_run_know_its_rows_done_by_the_run_s_record_of_each_recording(
    tmp_path, aws_env, fault_proxy
):
    # A result's identity counts its recording's SHA-256. The run records it, with the
    # version it read (its ETag), in the output store's index: validate, with no journal of
    # that run, knows the rows done without downloading the tape again.
    proxy = fault_proxy(lambda method, path, signed: None)
    put(aws_env, tmp_path, "side_a.wav", encoded(recording(60.0), "WAV", "PCM_16"))  # 10 MB
    (tmp_path / "m.csv").write_text(
        "id,input,start,end,prompt\na1,s3://tapes/side_a.wav,20,20.2,tape hiss\na2,s3://tapes/side_a.wav,40,40.2,hiss\n"
    )
    settings = {"output.uri": str(tmp_path / "out"), "runs_dir": str(tmp_path / "runs")}
    settings["storage.s3.endpoint_url"] = proxy.endpoint
    outcomes = run_in_process(tmp_path / "m.csv", load_config(overrides=settings), "first")[0]
    assert [o.status for o in outcomes] == ["succeeded"] * 2, [o.error for o in outcomes]
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(nested(settings)))
    env = clean_env(AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test", AWS_EC2_METADATA_DISABLED="true")

    def validate() -> tuple[str, int]:
        served = proxy.served()
        done = soundpatch("validate", "m.csv", "--config", "c.yaml", cwd=tmp_path, env=env)
        assert done.returncode == 0, done.stdout + done.stderr
        return " ".join(done.stdout.split()).lower(), proxy.served() - served

    said, served = validate()
    assert "already done (reused, no cost) 2" in said and "predictions to send 0" in said, said
    assert served < MB, served
    # ... and so does a run under a new id: its rows are copies of the first run's results.
    served = proxy.served()
    again = run_in_process(tmp_path / "m.csv", load_config(overrides=settings), "second")[0]
    assert [o.status for o in again] == ["skipped_done"] * 2, [o.error for o in again]
    assert proxy.served() - served < MB, proxy.served() - served

    # Another version of the tape under the same name: its rows are to be made anew.
    put(aws_env, tmp_path, "side_a.wav", encoded(recording(60.0, seed=1), "WAV", "PCM_16"))
    said, served = validate()
    assert "already done" not in said and "predictions to send 2" in said, said
    assert served < MB, served


def nested(flat: dict[str, str]) -> dict:
    """{"a.b": 1} as {"a": {"b": 1}}: settings as a config file holds them."""
    tree: dict = {}
    for dotted, value in flat.items():
        *parents, last = dotted.split(".")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return tree


class WebServer:
    """A web server on loopback serving `files` (path -> bytes) as nginx or a CDN does: an
    ETag of each, and byte ranges (If-Range honoured: for another version, all of it); with
    `ranges=False`, as one that gives none and does not say so. Each answer is kept in
    `answers`: (method, path, status, body bytes)."""

    def __init__(self, before_get=lambda path: None, ranges: bool = True) -> None:
        self.files: dict[str, bytes] = {}
        self.answers: list[tuple[str, str, int, int]] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def do_HEAD(self) -> None:
                self._answer(body=False)

            def do_GET(self) -> None:
                before_get(self.path)
                self._answer(body=True)

            def _answer(self, body: bool) -> None:
                data = server.files.get(self.path.split("?")[0])
                if data is None:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    server.answers.append((self.command, self.path, 404, 0))
                    return
                etag = f'"{hashlib.sha256(data).hexdigest()[:16]}"'
                asked = re.fullmatch(r"bytes=(\d+)-(\d+)", self.headers.get("Range", ""))
                same = self.headers.get("If-Range") in (None, etag)
                if asked and same and ranges:
                    status, part = 206, data[int(asked[1]) : int(asked[2]) + 1]
                else:
                    status, part = 200, data
                self.send_response(status)
                self.send_header("ETag", etag)
                if ranges:
                    self.send_header("Accept-Ranges", "bytes")
                self.send_header("Content-Length", str(len(part)))
                if status == 206:
                    self.send_header("Content-Range", f"bytes {asked[1]}-{int(asked[1]) + len(part) - 1}/{len(data)}")
                self.end_headers()
                server.answers.append((self.command, self.path, status, len(part) if body else 0))
                if body:
                    try:
                        self.wfile.write(part)
                    except (BrokenPipeError, ConnectionResetError):
                        pass  # the client did not want all of it

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def served(self) -> int:
        return sum(size for method, _, _, size in list(self.answers) if method == "GET")

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def web_server():
    started = []

    def start(**kwargs) -> WebServer:
        started.append(WebServer(**kwargs))
        return started[-1]

    yield start
    for server in started:
        server.stop()


def test_validate_on_recordings_on_a_web_server_reads_their_headers_by_ranges(tmp_path, web_server):
    server = web_server()
    tape = encoded(recording(120.0), "WAV", "PCM_16")
    server.files["/archive/side_a.wav"] = with_chunks(tape, [(b"bext", bext_at(3600 * RATE))], [])
    server.files["/archive/side_b.flac"] = encoded(recording(120.0, seed=1), "FLAC", "PCM_16")
    server.files["/archive/copy.mp3"] = encoded(recording(90.0, seed=2), "MP3", "MPEG_LAYER_III")  # (tagged)
    (tmp_path / "m.csv").write_text(
        "id,input,start,end,prompt,timecode\n"
        f"a1,{server.base}/archive/side_a.wav?token=secret,01:01:30,01:01:30.2,tape hiss,source\n"
        f"a2,{server.base}/archive/side_a.wav?token=secret,125,126,tape hiss,\n"
        f"b1,{server.base}/archive/side_b.flac,100,100.2,tape hiss,\n"
        f"c1,{server.base}/archive/copy.mp3,80,80.2,tape hiss,\n"
        f"c2,{server.base}/archive/copy.mp3,95,96,tape hiss,\n"
    )
    (tmp_path / "c.yaml").write_text("storage: {http: {allow_private_addresses: true}}\n")
    done = soundpatch("validate", "m.csv", "--config", "c.yaml", cwd=tmp_path, env=clean_env())
    assert done.returncode == 1, done.stdout + done.stderr  # a2 is invalid
    said = " ".join(done.stdout.split())
    assert "invalid a2 (line 3): Region starts at 125 s but side_a.wav is only 120.000 s long." in said, said
    assert "invalid c2 (line 6): Region starts at 95 s but copy.mp3 is only 90.000 s long." in said, said
    assert "predictions to send 3" in said.lower() and "secret" not in said, said
    assert {status for method, _, status, _ in server.answers if method == "GET"} == {206}, server.answers
    assert server.served() < MB, server.served()  # of 42 MB


def test_a_web_recording_replaced_while_its_header_is_read_is_then_downloaded_as_it_now_is(web_server):
    first, second = encoded(recording(30.0), "WAV", "PCM_16"), encoded(recording(20.0, 1, seed=1), "FLAC", "PCM_16")

    def replace_once(path: str) -> None:
        server.files[path] = second  # between the HEAD and the first range

    server = web_server(before_get=replace_once)
    server.files["/take.wav"] = first
    reader = SourceReader(storage=StorageConfig(http={"allow_private_addresses": True}))
    info = reader.info(f"{server.base}/take.wav")
    assert (info.frames, info.channels, info.format) == (20 * RATE, 1, "FLAC")  # what it is now, whole
    assert [(method, status) for method, _, status, _ in server.answers] == [("HEAD", 200), ("GET", 200), ("GET", 200)]


def test_the_headers_of_an_archive_s_recordings_are_read_several_at_once(web_server):
    # Hundreds of tapes, each a HEAD and a range or two away: one after another, a run's
    # opening checks and validate waited for every round trip in turn.
    arrived, gets = threading.Barrier(4, timeout=10), itertools.count()

    def together(path: str) -> None:
        if next(gets) < 4:
            arrived.wait()  # the first four ranges are answered only once all four are asked for

    server = web_server(before_get=together)
    for i in range(8):
        server.files[f"/tape{i}.wav"] = encoded(recording(10.0, 1, seed=i), "WAV", "PCM_16")
    reader = SourceReader(storage=StorageConfig(http={"allow_private_addresses": True}))
    urls = [f"{server.base}/tape{i}.wav" for i in range(8)]
    reader.read_headers(urls)
    assert [(method, status) for method, _, status, _ in server.answers].count(("GET", 206)) == 8, server.answers
    asked = len(server.answers)
    assert {reader.info(url).frames for url in urls} == {10 * RATE}
    assert len(server.answers) == asked  # known since: nothing asked again


def test_a_web_server_that_does_not_say_it_gives_ranges_is_not_asked_for_one(web_server):
    # Asked anyway, it would start sending all of the recording, to be cut off unread.
    server = web_server(ranges=False)
    server.files["/take.wav"] = encoded(recording(5.0, 1), "WAV", "PCM_16")
    reader = SourceReader(storage=StorageConfig(http={"allow_private_addresses": True}))
    assert reader.info(f"{server.base}/take.wav").frames == 5 * RATE
    assert [(method, status) for method, _, status, _ in server.answers] == [("HEAD", 200), ("GET", 200)]
