"""The OpenAI-compatible HTTP server: chat completions (plain and streamed), models, health, a slicing preview and
the web page, in front of one `Engine`.

The standard library's ThreadingHTTPServer: one thread per connection does the parsing, image checks and prompt
building while the engine's single thread decodes for everyone, which is all the concurrency a one-model server
needs, and it keeps the install free of a web framework. Responses are HTTP/1.1 (keep-alive for plain answers, so a
client's connection pool is reused); a stream is server-sent events on a connection closed at its end. A client that
goes away is noticed at its request's next token (or within 0.2 s while it waits for a plain answer) and its
request cancelled, freeing its slot.

  POST /v1/chat/completions   GET /v1/models   GET /health   POST /v1/slice_plan {"image_url": "data:..."}
  GET /  and  /static/<file>  (files of uhd_jax/serve/web/)
"""
from __future__ import annotations

import json
import mimetypes
import os
import select
import socket
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from uhd_jax.cli_errors import UserError
from uhd_jax.serve.openai_schema import ApiError, Limits, chat_request, load_image

WEB = os.path.join(os.path.dirname(os.path.abspath(__file__)), "web")


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 256   # the listen backlog: a burst of clients waits to be accepted instead of being reset

    def __init__(self, address, engine, *, model_id: str, limits: Limits = Limits(), log: bool = False):
        self.engine, self.model_id, self.limits, self.log = engine, model_id, limits, log
        super().__init__(address, Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> threading.Thread:
        """Serve in a background thread (tests, notebooks); `shutdown()` stops it."""
        thread = threading.Thread(target=self.serve_forever, name="uhd-serve", daemon=True)
        thread.start()
        return thread


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 60   # seconds a client may stall while sending: a silent connection does not hold a thread forever
    server: Server

    def setup(self):
        super().setup()
        # each streamed token is a small write: without this, Nagle's algorithm holds it for the client's delayed ACK
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    # ---- routing -------------------------------------------------------------------------------------------
    def do_GET(self):
        self._guard(self._get)

    def do_POST(self):
        self._guard(self._post)

    def _get(self):
        path = self.path.split("?", 1)[0]
        if path == "/health":
            engine = self.server.engine
            return self._json(200, {"status": "ok", "model": self.server.model_id, "slots": engine.slots,
                                    "active": sum(r is not None for r in engine._rows),
                                    "waiting": len(engine._pending), "finished": dict(engine.finished)})
        if path == "/v1/models":
            return self._json(200, {"object": "list", "data": [{"id": self.server.model_id, "object": "model",
                                                                 "created": 0, "owned_by": "uhd-jax"}]})
        if path == "/" or path.startswith("/static/"):
            return self._static("index.html" if path == "/" else path[len("/static/"):])
        raise ApiError(f"no such endpoint: GET {path}", status=404, code="not_found")

    def _post(self):
        path = self.path.split("?", 1)[0]
        if path not in ("/v1/chat/completions", "/v1/slice_plan"):
            self._drain()
            raise ApiError(f"no such endpoint: POST {path}", status=404, code="not_found")
        body = self._body()
        if path == "/v1/slice_plan":
            return self._slice_plan(body)
        request = chat_request(body, self.server.limits)
        try:
            handle = self.server.engine.submit(request.messages, request.image, **request.sampling)
        except UserError as e:
            raise ApiError(str(e), code="context_length_exceeded" if "prompt is" in str(e) else None) from None
        if request.stream:
            return self._stream(handle, request.include_usage)
        while True:
            try:
                result = handle.result(timeout=0.2)
                break
            except TimeoutError:
                if self._client_gone():
                    handle.cancel()
                    self.close_connection = True
                    return
        self._json(200, self._completion(result))

    # ---- chat completions ----------------------------------------------------------------------------------
    def _completion(self, result: dict) -> dict:
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": self.server.model_id,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": result["text"]},
                             "finish_reason": result["finish_reason"]}],
                "usage": _usage(result)}

    def _stream(self, handle, include_usage: bool):
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        base = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk", "created": int(time.time()),
                "model": self.server.model_id}

        def chunk(delta: dict, finish=None, **extra):
            return {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}

        try:
            self._event(chunk({"role": "assistant", "content": ""}))
            for text in handle:
                if self._client_gone():
                    raise ConnectionResetError("the client closed the connection")
                self._event(chunk({"content": text}))
            result = handle.result()
            self._event(chunk({}, result["finish_reason"]))
            if include_usage:
                self._event({**base, "choices": [], "usage": _usage(result)})
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
        except OSError:   # the client went away: stop decoding for it
            handle.cancel()
        except Exception as e:   # the engine failed this request after the headers went out: say so in the stream
            handle.cancel()
            print(f"uhd-serve: internal error in a stream: {type(e).__name__}: {e}", file=sys.stderr)
            try:
                self._event({"error": {"message": f"internal error: {type(e).__name__}", "type": "server_error",
                                       "param": None, "code": None}})
            except OSError:
                pass

    def _client_gone(self) -> bool:
        """The client closed its end (a write would only fail one token later, once the peer's reset is back)."""
        try:
            if not select.select([self.connection], [], [], 0)[0]:
                return False
            return self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    def _event(self, payload: dict) -> None:
        self.wfile.write(b"data: " + json.dumps(payload).encode() + b"\n\n")
        self.wfile.flush()

    # ---- the slicing preview and the page ------------------------------------------------------------------
    def _slice_plan(self, body):
        if not isinstance(body, dict) or set(body) != {"image_url"} or not isinstance(body["image_url"], str):
            raise ApiError('the body must be {"image_url": "data:image/...;base64,..."}', "image_url")
        image = load_image(body["image_url"], self.server.limits, "image_url")
        plan = self.server.engine.model.slice_plan(image)
        self._json(200, {"scheme": plan["scheme"], "input_size": list(plan["input_size"]),
                         "grid": list(plan["grid"]) if plan["grid"] is not None else None,
                         "cells": [{"box": list(box), "size": list(size), "tokens": int(tokens)}
                                   for box, size, tokens in plan["cells"]],
                         "overview_tokens": int(plan["overview_tokens"]), "tokens": int(plan["tokens"])})

    def _static(self, name: str):
        path = os.path.realpath(os.path.join(WEB, name))
        if not path.startswith(os.path.realpath(WEB) + os.sep) or not os.path.isfile(path):
            raise ApiError(f"not found: {self.path}", status=404, code="not_found")
        with open(path, "rb") as f:
            data = f.read()
        self.send_response(200)
        self.send_header("Content-Type", mimetypes.guess_type(path)[0] or "application/octet-stream")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    # ---- plumbing ------------------------------------------------------------------------------------------
    def _guard(self, route):
        """Every failure becomes an OpenAI error object: 4xx for the client's mistakes, 500 (without a traceback)
        for ours; a client that has gone away gets nothing."""
        try:
            route()
        except ApiError as e:
            self._json(e.status, e.body())
        except OSError:
            self.close_connection = True
        except Exception as e:
            print(f"uhd-serve: internal error on {self.command} {self.path}: {type(e).__name__}: {e}",
                  file=sys.stderr)
            self._json(500, {"error": {"message": f"internal error: {type(e).__name__}", "type": "server_error",
                                       "param": None, "code": None}})

    def _body(self):
        if self.headers.get("Transfer-Encoding"):
            self.close_connection = True
            raise ApiError("send the body with a Content-Length (chunked requests are not taken)", status=411)
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            self.close_connection = True
            raise ApiError("a Content-Length header is required", status=411) from None
        if length > self.server.limits.max_body_bytes:
            self.close_connection = True   # the body is not read: the connection cannot be reused
            raise ApiError(f"the request is {length} bytes, over the limit of {self.server.limits.max_body_bytes}",
                           status=413, code="request_too_large")
        raw = self.rfile.read(length)
        if len(raw) < length:
            raise OSError("the client closed the connection mid-request")
        try:
            return json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise ApiError(f"the body is not valid JSON: {e}", code="bad_json") from None

    def _drain(self):
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            length = 0
        if 0 < length <= self.server.limits.max_body_bytes:
            self.rfile.read(length)
        else:
            self.close_connection = True

    def _json(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(data)
        except OSError:
            self.close_connection = True

    def send_error(self, code, message=None, explain=None):
        """http.server's own rejections (a malformed request line, an unsupported method) as JSON too."""
        self.close_connection = True
        self._json(code, {"error": {"message": message or "bad request", "type": "invalid_request_error",
                                    "param": None, "code": None}})

    def log_message(self, format, *args):
        if self.server.log:
            super().log_message(format, *args)


def _usage(result: dict) -> dict:
    return {"prompt_tokens": result["prompt_tokens"], "completion_tokens": result["completion_tokens"],
            "total_tokens": result["prompt_tokens"] + result["completion_tokens"]}
