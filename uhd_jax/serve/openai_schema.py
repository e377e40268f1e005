"""The OpenAI chat-completions request as this server takes it: checked field by field, each mistake an `ApiError`
(a 4xx status and the OpenAI error object), never an exception from deeper down.

Images come as `image_url` parts: data URLs (`data:image/png;base64,...`), or local paths (`file:///x.png`, `/x.png`)
only when the server allows them. Remote URLs are refused: fetching them would let any client make the server open
connections anywhere. An image's byte size is checked before decoding the base64, and its pixel count from the
header before decoding a pixel (a small PNG may claim 100000 x 100000).
"""
from __future__ import annotations

import base64
import binascii
import dataclasses
import io
import os
import warnings

from PIL import Image

FIELDS = {"model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "stop", "seed",
          "stream", "stream_options", "n", "user"}


class ApiError(Exception):
    """A client mistake: `status` (4xx) and the OpenAI error object's message, type, param and code."""

    def __init__(self, message: str, param: str | None = None, *, status: int = 400,
                 type: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclasses.dataclass(frozen=True)
class Limits:
    max_image_bytes: int = 20 * 2 ** 20
    max_image_pixels: int = 40_000_000     # 40 MP: a 5000 x 8000 scan; more is a decompression bomb or a mistake
    allow_local_images: bool = False

    @property
    def max_body_bytes(self) -> int:
        """The largest request worth reading: one image as base64 and 1 MiB of text."""
        return self.max_image_bytes * 4 // 3 + 2 ** 20


@dataclasses.dataclass
class ChatRequest:
    messages: list[dict]       # [{'role', 'content': str}], alternating, ending with 'user'
    image: Image.Image | str | None
    sampling: dict             # max_tokens, temperature, top_p, stop, seed (those given)
    stream: bool
    include_usage: bool


def chat_request(body, limits: Limits) -> ChatRequest:
    if not isinstance(body, dict):
        raise ApiError("the request body must be a JSON object")
    unknown = sorted(set(body) - FIELDS)
    if unknown:
        raise ApiError(f"unknown field {unknown[0]!r}; this server takes {', '.join(sorted(FIELDS))}", unknown[0],
                       code="unknown_field")
    if body.get("n") not in (None, 1):
        raise ApiError("n must be 1: one answer per request", "n")
    messages, image = _messages(body.get("messages"), limits)
    sampling = {}
    for name, kind in (("max_tokens", int), ("temperature", float), ("top_p", float), ("seed", int)):
        value = body.get(name)
        if name == "max_tokens" and value is None:
            name, value = "max_completion_tokens", body.get("max_completion_tokens")
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
            raise ApiError(f"{name} must be {'a number' if kind is float else 'an integer'}, got {value!r}", name)
        sampling["max_tokens" if name == "max_completion_tokens" else name] = value
    stop = body.get("stop")
    if stop is not None:
        if not (isinstance(stop, str) or isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
            raise ApiError("stop must be a string or a list of strings", "stop")
        sampling["stop"] = stop
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError("stream must be true or false", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict) or set(options) - {"include_usage"}:
        raise ApiError("stream_options takes only include_usage", "stream_options")
    if not isinstance(body.get("model", ""), str):
        raise ApiError("model must be a string", "model")
    return ChatRequest(messages, image, sampling, stream, bool(options.get("include_usage", False)))


def _messages(messages, limits: Limits):
    if not isinstance(messages, list) or not messages:
        raise ApiError("messages must be a non-empty list of {role, content} objects", "messages")
    out, image = [], None
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ApiError(f"{where} must be an object with 'role' and 'content'", where)
        if m["role"] == "system":
            raise ApiError("system messages are not taken: the model's family template sets its own system prompt",
                           f"{where}.role")
        if m["role"] not in ("user", "assistant"):
            raise ApiError(f"{where}.role must be 'user' or 'assistant', got {m['role']!r}", f"{where}.role")
        content = m["content"]
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text" and isinstance(part.get("text"), str):
                    texts.append(part["text"])
                elif kind == "image_url" and isinstance(part.get("image_url"), dict) \
                        and isinstance(part["image_url"].get("url"), str):
                    if image is not None:
                        raise ApiError("only one image per conversation", f"{where}.content[{j}]")
                    if m["role"] != "user":
                        raise ApiError("images go in user messages", f"{where}.content[{j}]")
                    image = load_image(part["image_url"]["url"], limits, f"{where}.content[{j}].image_url.url")
                else:
                    raise ApiError("a content part must be {type: 'text', text} or {type: 'image_url', image_url: "
                                   "{url}}", f"{where}.content[{j}]")
            content = "\n".join(texts)
        elif not isinstance(content, str):
            raise ApiError(f"{where}.content must be a string or a list of parts", f"{where}.content")
        out.append({"role": m["role"], "content": content})
    roles = [m["role"] for m in out]
    if roles[-1] != "user" or any(r != ("user", "assistant")[i % 2] for i, r in enumerate(roles)):
        raise ApiError(f"messages must alternate user/assistant, starting and ending with 'user'; got roles {roles}",
                       "messages")
    return out, image


def load_image(url: str, limits: Limits, param: str = "image_url") -> Image.Image:
    """A data URL or (when allowed) a local path -> a decoded PIL image within the limits."""
    if url.startswith(("http://", "https://")):
        raise ApiError("remote image URLs are not fetched: send the image as a data URL "
                       "(data:image/png;base64,...)", param, code="remote_image")
    if url.startswith("data:"):
        head, sep, data = url.partition(",")
        if not sep or not head.endswith(";base64"):
            raise ApiError("an image data URL must be data:<type>;base64,<data>", param)
        if len(data) * 3 // 4 > limits.max_image_bytes:
            raise ApiError(f"the image is about {len(data) * 3 // 4} bytes, over the limit of {limits.max_image_bytes}",
                           param, status=413, code="image_too_large")
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise ApiError("the image data URL is not valid base64", param, code="bad_base64") from None
    else:
        if not limits.allow_local_images:
            raise ApiError("local image paths are refused: send a data URL, or start the server with "
                           "--allow-local-images", param, status=403, code="local_image")
        path = url[len("file://"):] if url.startswith("file://") else url
        if not os.path.isfile(path):
            raise ApiError(f"image file not found: {path}", param)
        if os.path.getsize(path) > limits.max_image_bytes:
            raise ApiError(f"the image is {os.path.getsize(path)} bytes, over the limit of {limits.max_image_bytes}",
                           param, status=413, code="image_too_large")
        with open(path, "rb") as f:
            raw = f.read()
    return decode_image(raw, limits, param)


def decode_image(raw: bytes, limits: Limits, param: str) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(raw))   # reads the header only
            w, h = image.size
            if w * h > limits.max_image_pixels:
                raise ApiError(f"the image is {w} x {h} pixels, over the limit of {limits.max_image_pixels}", param,
                               status=413, code="image_too_large")
            image.load()
    except ApiError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ApiError(f"the image claims more pixels than the limit of {limits.max_image_pixels}", param,
                       status=413, code="image_too_large") from None
    except Exception as e:   # PIL raises many kinds for a file that is not an image or is cut short
        raise ApiError(f"the image could not be read: {type(e).__name__}: {e}", param, code="bad_image") from None
    return image
