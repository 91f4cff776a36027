"""The simulator's HTTP face: each provider's routes, mapped onto the Simulator.

Each Labs   POST /v1/prediction, GET /v1/prediction/{id}, POST .../cancel, GET /files/...
Stability   POST /v2beta/audio/stable-audio-2/inpaint (multipart; answered with audio)
fal         POST /fal-ai/stable-audio-25/inpaint, GET .../requests/{id}/status,
            GET .../requests/{id}, PUT .../requests/{id}/cancel (Each Labs-style
            predictions underneath, told in fal's words)
all         GET /_sim/stats (what happened, for tests and benches)
"""

from __future__ import annotations

import json
import re
import sys
from email.parser import BytesParser
from email.policy import HTTP
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

from soundpatch.simulator_requests import MODEL  # what fal's predictions underneath are made with

if TYPE_CHECKING:
    from soundpatch.simulator import Simulator


STABILITY_INPAINT = "/v2beta/audio/stable-audio-2/inpaint"
FAL_APP = "/fal-ai/stable-audio-25"
FAL_STATUS = {"starting": "IN_QUEUE", "processing": "IN_PROGRESS"}  # the rest: COMPLETED
# What fal answers a create once the account's balance ran out (a 403; SimulatorSettings.balance).
FAL_OUT_OF_CREDIT = "User is locked. Reason: Exhausted balance. Top up your balance at fal.ai/dashboard/billing."
# What a garbled poll or create gets (SimulatorSettings.garbled_*_rate): a gateway's page.
GARBLED_PAGE = b"<html><body><h1>502 Bad Gateway</h1><p>upstream sent an invalid response</p></body></html>"


def serve(sim: Simulator, host: str, port: int) -> ThreadingHTTPServer:
    """A server for `sim` bound to host:port (not yet serving)."""
    return _Server((host, port), _handler(sim))


class _Server(ThreadingHTTPServer):
    # A batch opens dozens of connections at once; the default backlog of 5 resets some.
    request_queue_size = 256
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients that go away mid-answer (killed runs, timeouts) are part of the job.
        if isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            return
        super().handle_error(request, client_address)


def fal_submit(sim: Simulator, key: str | None, body: Any) -> tuple[int, dict[str, Any], dict[str, str]]:
    status, data, headers = sim.create(key, {"model": MODEL, "input": body})
    if status != 200:
        detail: Any = data.get("message", "")
        if status == 400:  # fal validates with FastAPI: 422 and a list of details
            status, detail = 422, [{"loc": ["body"], "msg": detail, "type": "value_error"}]
        elif status == 402:  # fal locks an account whose balance ran out
            status, detail = 403, FAL_OUT_OF_CREDIT
        return status, {"detail": detail}, headers
    request_id = data["predictionID"]
    base = f"{sim.base_url}{FAL_APP}/requests/{request_id}"
    return (
        200,
        {
            "request_id": request_id,
            "response_url": base,
            "status_url": f"{base}/status",
            "cancel_url": f"{base}/cancel",
            "queue_position": 0,
        },
        {},
    )


def fal_status(sim: Simulator, key: str | None, request_id: str) -> tuple[int, dict[str, Any]]:
    status, data = sim.get(key, request_id)
    if status != 200:
        return status, {"detail": data.get("message", "")}
    state = FAL_STATUS.get(data["status"], "COMPLETED")
    return (200 if state == "COMPLETED" else 202), {"status": state, "request_id": request_id}


def fal_result(sim: Simulator, key: str | None, request_id: str) -> tuple[int, dict[str, Any]]:
    status, data = sim.get(key, request_id)
    if status != 200:
        return status, {"detail": data.get("message", "")}
    if data["status"] in FAL_STATUS:
        return 400, {"detail": "Request is still in progress"}
    if data["status"] == "failed":
        return 500, {"detail": data.get("error") or "the model failed"}
    if data["status"] != "success":
        return 400, {"detail": f"Request was {data['status']}"}
    url = data["output"]
    kind = "audio/mpeg" if url.endswith(".mp3") else "audio/wav"
    return 200, {
        "audio": {"url": url, "content_type": kind, "file_name": url.rsplit("/", 1)[-1]},
        "seed": data["input"].get("seed"),
    }


def multipart(content_type: str, body: bytes) -> tuple[dict[str, str], dict[str, bytes]]:
    """(fields, files) of a multipart/form-data body."""
    message = BytesParser(policy=HTTP).parsebytes(b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + body)
    fields: dict[str, str] = {}
    files: dict[str, bytes] = {}
    if not message.is_multipart():
        return fields, files
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if not name:
            continue
        payload = part.get_payload(decode=True) or b""
        if part.get_filename() is not None:
            files[str(name)] = payload
        else:
            fields[str(name)] = payload.decode("utf-8", "replace")
    return fields, files


def _handler(sim: Simulator) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        # Headers and body go out in two writes; with Nagle's algorithm on, the body waits
        # for the client's delayed ACK of the headers: 40 ms on every answer of a kept-alive
        # connection, which a real provider's server does not add.
        disable_nagle_algorithm = True

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib's name
            pass  # quiet: the stats endpoint tells what happened

        def _send(
            self,
            status: int,
            body: bytes,
            content_type: str,
            headers: dict[str, str] | None = None,
            announce: int | None = None,
        ) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body) if announce is None else announce))
            if announce is not None and announce > len(body):
                self.close_connection = True
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)

        def _json(self, status: int, data: dict[str, Any], headers: dict[str, str] | None = None) -> None:
            self._send(status, json.dumps(data).encode(), "application/json", headers)

        def do_POST(self) -> None:  # noqa: N802 - stdlib's name
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            key = self.headers.get("X-API-Key")
            if self.path.rstrip("/") == STABILITY_INPAINT:
                auth = self.headers.get("Authorization", "")
                bearer = auth[7:] if auth.lower().startswith("bearer ") else None
                fields, files = multipart(self.headers.get("Content-Type", ""), raw)
                status, data, content_type, headers = sim.inpaint_now(bearer, fields, files.get("audio"))
                return self._send(status, data, content_type, headers)
            if self.path.rstrip("/") == f"{FAL_APP}/inpaint":
                try:
                    body = json.loads(raw or b"null")
                except json.JSONDecodeError:
                    return self._json(422, {"detail": "Body is not JSON"})
                status, data, headers = fal_submit(sim, _fal_key(self.headers), body)
                if status < 400 and sim.garbled("create"):
                    return self._send(200, GARBLED_PAGE, "text/html")
                return self._json(status, data, headers)
            if self.path.rstrip("/") == "/v1/prediction":
                try:
                    body = json.loads(raw or b"null")
                except json.JSONDecodeError:
                    return self._json(400, {"status": "error", "message": "Body is not JSON"})
                status, data, headers = sim.create(key, body)
                if status < 400 and sim.garbled("create"):
                    return self._send(200, GARBLED_PAGE, "text/html")
                return self._json(status, data, headers)
            m = re.fullmatch(r"/v1/prediction/([0-9a-f]+)/cancel", self.path)
            if m:
                return self._json(*sim.cancel(m.group(1)))
            self._json(404, {"status": "error", "message": "Not found"})

        def do_PUT(self) -> None:  # noqa: N802 - stdlib's name
            m = re.fullmatch(FAL_APP + r"/requests/([0-9a-f]+)/cancel", self.path)
            if m:
                status, _ = sim.cancel(m.group(1))
                return self._json(202 if status == 200 else status, {"status": "CANCELLATION_REQUESTED"})
            self._json(404, {"detail": "Not found"})

        def do_GET(self) -> None:  # noqa: N802 - stdlib's name
            m = re.fullmatch(FAL_APP + r"/requests/([0-9a-f]+)(/status)?", self.path)
            if m:
                key = _fal_key(self.headers)
                if sim.garbled("poll"):
                    return self._send(200, GARBLED_PAGE, "text/html")
                if m.group(2):
                    return self._json(*fal_status(sim, key, m.group(1)))
                return self._json(*fal_result(sim, key, m.group(1)))
            m = re.fullmatch(r"/v1/prediction/([0-9a-f]+)", self.path)
            if m:
                if sim.garbled("poll"):
                    return self._send(200, GARBLED_PAGE, "text/html")
                return self._json(*sim.get(self.headers.get("X-API-Key"), m.group(1)))
            m = re.fullmatch(r"/files/([0-9a-f]+\.(?:wav|mp3))", self.path)
            if m:
                status, data, announce = sim.file(m.group(1))
                content_type = "audio/mpeg" if m.group(1).endswith(".mp3") else "audio/wav"
                return self._send(status, data, content_type, announce=announce)
            if self.path in ("/_sim/stats", "/_sim/stats?times=1"):
                s = sim.stats
                stats = {
                    "creates": s.creates,
                    "accepted": s.accepted,
                    "rate_limited": s.rate_limited,
                    "server_errors": s.server_errors,
                    "polls": s.polls,
                    "downloads": s.downloads,
                    "corrupted": s.corrupted,
                    "out_of_credit": s.out_of_credit,
                    "max_in_flight": s.max_in_flight,
                }
                if self.path.endswith("?times=1"):  # when each create was accepted (Unix seconds)
                    stats["accepted_times"] = list(s.accepted_times)
                return self._json(200, stats)
            self._json(404, {"status": "error", "message": "Not found"})

    return Handler


def _fal_key(headers: Any) -> str | None:
    auth = headers.get("Authorization", "")
    return auth[4:] if auth.lower().startswith("key ") else None
