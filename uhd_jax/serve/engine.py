"""In-flight batching: many conversations decoded together over one fixed-size KV cache, each joining the running
batch at a decode-step boundary instead of waiting for the others to finish.

The cache holds `slots` rows of `max_prompt_tokens + max_tokens_limit` positions. A background thread loops: admit
waiting requests into free rows (prefilled in groups that share a bucketed prompt length, then copied into their
rows), run one decode step over all rows (rows without a request stay put: their token is not valid, so their cache
does not advance), hand each request its new token. Sampling settings are per-row arrays (temperature 0 = greedy, top-p 1 = off) and each
row draws from its own key folded with its own step count, as `eval.decoding` does: so one compiled step serves every
mix, and a seeded answer does not depend on which other requests share the batch. Programs: one step, and per prompt
bucket two prefills (a lone request's, a group's of `prefill_batch` rows) with their two row copies; UHD prefills
pack their slices into the offline generator's patch-budget bucket, so also one per budget they touch.

Prompts are built exactly as `api.Model.generate`/`chat` build them (the family's template, the preparer's slicing),
so a greedy answer here is the offline answer token for token. Stop strings are matched in the decoded text (that is
where the offline generator cuts too); the streamed text holds back what could still become a stop string, a
half-decoded character and trailing whitespace, so the deltas always add up to the final text.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import os
import queue
import tempfile
import threading

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from uhd_jax.cli_errors import UserError
from uhd_jax.eval.decoding import _prefill, top_p_filter
from uhd_jax.eval.generate import bucket_length, left_pad
from uhd_jax.models.llama import KVCache, Llama, LlamaConfig, init_cache
from uhd_jax.models.vlm import VLM, VLMConfig

MAX_STOPS = 4   # the OpenAI API's limit


def pick(logits, temperature, top_p, keys, steps):
    """(B, V) logits -> (B,) tokens: argmax where temperature is 0, else a draw after temperature and top-p from the
    row's key folded with the row's step (the draw `decoding.next_tokens` makes for the same row)."""
    hot = temperature > 0
    scaled = logits / jnp.where(hot, temperature, 1.0)[:, None]
    scaled = jnp.where((top_p < 1.0)[:, None], top_p_filter(scaled, top_p[:, None]), scaled)
    drawn = jax.vmap(jax.random.categorical)(jax.vmap(jax.random.fold_in)(keys, steps), scaled)
    return jnp.where(hot, drawn, jnp.argmax(logits, axis=-1)).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("cfg", "cache_len"))
def prefill(params, cfg: VLMConfig, input_ids, token_valid, pixel_values, image_token_map, sampling, cache_len: int):
    """Prompts (P, T) -> (their first tokens (P,), their cache rows of `cache_len` positions, last positions (P,))."""
    embeds, token_valid, _ = VLM(cfg).apply({"params": params}, input_ids, token_valid, jnp.zeros_like(input_ids),
                                            pixel_values, image_token_map, method=VLM.embed_image_and_text)
    extra = cache_len - token_valid.shape[1]
    logits, cache, last_pos = _prefill(Llama(cfg.llm), {"params": params["llm"]}, embeds, token_valid, extra)
    return pick(logits, *sampling, jnp.zeros(token_valid.shape[:1], jnp.int32)), cache, last_pos


@functools.partial(jax.jit, donate_argnums=(0,))
def insert(cache: KVCache, rows: KVCache, slots):
    """Row i of `rows` copied into row slots[i] of `cache`; a slot out of range (a padding row) is dropped."""
    return KVCache(cache.k.at[:, slots].set(rows.k, mode="drop"), cache.v.at[:, slots].set(rows.v, mode="drop"),
                   cache.lengths.at[slots].set(rows.lengths, mode="drop"))


@functools.partial(jax.jit, static_argnames=("cfg",), donate_argnums=(2,))
def step(params, cfg: LlamaConfig, cache: KVCache, tokens, positions, active, temperature, top_p, keys, steps):
    """One token for every active row (each at its own position and cache length) -> (next tokens, cache)."""
    model = Llama(cfg)
    embeds = model.apply(params, tokens[:, None], method=Llama.embed)
    logits, cache = model.apply(params, embeds, positions[:, None], active[:, None], cache=cache)
    return pick(logits[:, -1], temperature, top_p, keys, steps), cache


def compiled_programs() -> dict:
    """Programs compiled so far by this process's engines: {'step', 'insert', 'prefill'}."""
    return {"step": step._cache_size(), "insert": insert._cache_size(), "prefill": prefill._cache_size()}


class Text:
    """The answer's text as tokens arrive: `push(token)` -> (new text safe to show, whether a stop string ended it)."""

    def __init__(self, tokenizer, stops: tuple[str, ...]):
        self.tokenizer, self.stops, self.tokens, self.sent = tokenizer, stops, [], ""

    def _cut(self) -> tuple[str, bool]:
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        ends = [text.index(s) for s in self.stops if s in text]
        return (text[:min(ends)], True) if ends else (text, False)

    def push(self, token: int) -> tuple[str, bool]:
        self.tokens.append(int(token))
        text, stopped = self._cut()
        if stopped:
            return self._emit(text.strip()), True
        text = text.rstrip("\ufffd")   # a character whose bytes have not all arrived
        for k in range(min(len(text), max((len(s) for s in self.stops), default=1) - 1), 0, -1):
            if any(s.startswith(text[-k:]) for s in self.stops):   # may still grow into a stop string
                text = text[:-k]
                break
        return self._emit(text.strip()), False

    def _emit(self, text: str) -> str:
        if not text.startswith(self.sent):   # the tokenizer respelled earlier text: wait until it settles
            return ""
        delta, self.sent = text[len(self.sent):], text
        return delta

    def final(self) -> tuple[str, str]:
        """-> (the whole answer, what of it was not yet emitted)."""
        text = self._cut()[0].strip()
        return text, self._emit(text) if text.startswith(self.sent) else ""


class Handle:
    """A submitted request: iterate it for text deltas as they are decoded; `result()` waits for the answer."""

    def __init__(self, engine: "Engine", request: "_Request"):
        self._engine, self._request, self._events = engine, request, queue.Queue()
        self._result = None
        self._error = None
        self._finished = threading.Event()
        self.cancelled = False

    def __iter__(self):
        while True:
            kind, value = self._events.get()
            if kind == "delta":
                yield value
            elif kind == "error":
                raise value
            else:
                return

    def result(self, timeout: float | None = None) -> dict:
        """{'text', 'finish_reason' ('stop', 'length' or 'cancelled'), 'prompt_tokens', 'completion_tokens'}."""
        if not self._finished.wait(timeout):
            raise TimeoutError("the request is still being answered")
        if self._error is not None:
            raise self._error
        return self._result

    def cancel(self) -> None:
        """Stop decoding this request; its slot is freed at the next step boundary."""
        self.cancelled = True
        self._engine._wake()

    # ---- called by the engine's thread ---------------------------------------------------------------------
    def _delta(self, text: str) -> None:
        if text:
            self._events.put(("delta", text))

    def _finish(self, result: dict | None, error: BaseException | None = None) -> None:
        self._result, self._error = result, error
        self._events.put(("error", error) if error is not None else ("done", None))
        self._finished.set()


@dataclasses.dataclass
class _Request:
    prompt: dict | None        # the preparer's prompt (ids, image_map, pixels) until it is prefilled
    length: int                # its bucket
    prompt_tokens: int
    max_tokens: int
    temperature: float
    top_p: float
    key: np.ndarray            # (2,) uint32, jax.random.PRNGKey(seed)
    text: Text
    handle: Handle | None = None
    position: int = 0          # the position of the next token fed to the model
    produced: int = 0


class Engine:
    """Concurrent requests to one `api.Model`, decoded together in `slots` rows. See the module doc.

    `max_tokens_limit`: the most new tokens a request may ask for (default: the family's rule);
    `max_prompt_tokens`: the longest prompt, text and image tokens (default: the model's positions less the limit).
    """

    def __init__(self, model, slots: int = 8, *, max_tokens_limit: int | None = None,
                 max_prompt_tokens: int | None = None, prefill_batch: int = 4, smallest_bucket: int = 64):
        if slots < 1:
            raise UserError(f"slots must be at least 1, got {slots}")
        self.model = model
        self.generator = model.generator()   # the offline generator's eos, image slots and packed layout
        cfg = model.loaded.cfg
        context = cfg.llm.max_position_embeddings
        self.max_tokens_limit = int(max_tokens_limit or model.rule.max_new_tokens)
        if not 0 < self.max_tokens_limit < context:
            raise UserError(f"max tokens limit {self.max_tokens_limit} is outside 1..{context - 1} (the model has "
                            f"{context} positions)")
        room = context - self.max_tokens_limit
        self.max_prompt_tokens = int(max_prompt_tokens or room)
        if not 0 < self.max_prompt_tokens <= room:
            raise UserError(f"max prompt tokens {self.max_prompt_tokens} is outside 1..{room}: the model has "
                            f"{context} positions and {self.max_tokens_limit} go to new tokens")
        if prefill_batch < 1:
            raise UserError(f"prefill batch must be at least 1, got {prefill_batch}")
        self.slots, self.smallest_bucket, self.prefill_batch = slots, smallest_bucket, min(prefill_batch, slots)
        self.cache_len = self.max_prompt_tokens + self.max_tokens_limit
        self.eos = self.generator.gen.eos_id
        self._llm_params = {"params": model.loaded.params["llm"]}
        self.mesh = getattr(model.loaded, "mesh", None)
        self._cache = self._new_cache(cfg.llm)
        self._rows: list[_Request | None] = [None] * slots
        self._pending: list[_Request] = []
        self._lock = threading.Condition()
        self._closed = False
        self.buckets: set[int] = set()
        self.steps = 0
        self.finished = collections.Counter()   # requests ended, by finish reason
        self._thread = threading.Thread(target=self._loop, name="uhd-engine", daemon=True)
        self._thread.start()

    def _new_cache(self, cfg: LlamaConfig) -> KVCache:
        """The empty cache, made where the programs read it (so they see one signature from the first call): on the
        default device, or over the mesh (`load(mesh=...)`) with its rows on the batch axes that divide them and its
        KV heads on the tensor axis, as the generation rules lay out activations (XLA may still pick another layout
        for the step's output: then the step and the row copy compile once more, and the cache stays in that one)."""
        make = functools.partial(init_cache, cfg, self.slots, self.cache_len)
        if self.mesh is None:   # committed, as the programs' outputs are
            return jax.device_put(make(), jax.local_devices()[0])
        from uhd_jax.eval.generate import batch_axes

        spec = jax.sharding.PartitionSpec
        heads = "tensor" if cfg.num_kv_heads % self.mesh.shape["tensor"] == 0 else None
        kv = jax.sharding.NamedSharding(self.mesh, spec(None, batch_axes(self.mesh, self.slots) or None, None, heads))
        rows = jax.sharding.NamedSharding(self.mesh, spec())
        return jax.jit(make, out_shardings=KVCache(kv, kv, rows))()

    def _on_mesh(self, batch: int):
        """Where a program over `batch` rows runs: nowhere special, or on the mesh under the generation rules (the
        model's sharding constraints then split its activations as `eval.generate` does)."""
        if self.mesh is None:
            return contextlib.nullcontext()
        from uhd_jax.eval.generate import generation_rules
        from uhd_jax.parallel.sharding import DEFAULT_RULES

        stack = contextlib.ExitStack()
        stack.enter_context(jax.set_mesh(self.mesh))
        stack.enter_context(nn.logical_axis_rules(generation_rules(self.model.loaded.rules or DEFAULT_RULES,
                                                                   self.mesh, batch)))
        return stack

    # ---- the public interface ------------------------------------------------------------------------------
    def submit(self, messages: list[dict], image=None, *, max_tokens: int | None = None, temperature: float = 0.0,
               top_p: float = 1.0, stop=None, seed: int = 0) -> Handle:
        """Queue the answer to the last user message of `messages` ({'role': 'user'|'assistant', 'content': str},
        alternating, first and last 'user'), about `image` (a PIL image, a path or None). Mistakes raise UserError
        here, before anything is queued."""
        request = self.prepare(messages, image, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                               stop=stop, seed=seed)
        request.handle = Handle(self, request)
        with self._lock:
            if self._closed:
                raise RuntimeError("the engine is closed")
            self._pending.append(request)
            self._lock.notify()
        return request.handle

    def stream_chat(self, chat, question: str, **sampling):
        """Deltas of the answer to `question` in `chat` (an `api.Chat`); the turn is appended when it is done."""
        messages = []
        for q, a in chat.turns:
            messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        handle = self.submit(messages + [{"role": "user", "content": question}], chat.image, **sampling)
        try:
            yield from handle
        finally:
            handle.cancel()   # a no-op once answered; frees the slot if the caller stopped reading
        chat.turns.append((question, handle.result()["text"]))

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._lock.notify()
        self._thread.join()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---- preparing a request (the caller's thread) ---------------------------------------------------------
    def prepare(self, messages, image, *, max_tokens, temperature, top_p, stop, seed) -> _Request:
        from uhd_jax.serve.api import _image_path

        turns, question = _turns(messages)
        max_tokens = min(self.model.rule.max_new_tokens, self.max_tokens_limit) if max_tokens is None else max_tokens
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise UserError(f"max_tokens must be a positive integer, got {max_tokens!r}")
        if max_tokens > self.max_tokens_limit:
            raise UserError(f"max_tokens {max_tokens} is over this server's limit of {self.max_tokens_limit}")
        temperature, top_p = _number("temperature", temperature), _number("top_p", top_p)
        if temperature < 0:
            raise UserError(f"temperature must be >= 0, got {temperature}")
        if not 0.0 < top_p <= 1.0:
            raise UserError(f"top_p must be in (0, 1], got {top_p}")
        if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2 ** 32:
            raise UserError(f"seed must be an integer in [0, 2**32), got {seed!r}")
        stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
        if len(stops) > MAX_STOPS or not all(isinstance(s, str) and s for s in stops):
            raise UserError(f"stop must be a string or a list of at most {MAX_STOPS} non-empty strings")
        conv = self.model.conversation(turns, question, image is not None)
        if image is None or isinstance(image, (str, os.PathLike)):
            prompt = self.model._prompt(conv, _image_path(image, "", 0), "prompt")
        else:   # a PIL image goes through a lossless file, as `api.Model` sends it
            with tempfile.TemporaryDirectory() as tmp:
                prompt = self.model._prompt(conv, _image_path(image, tmp, 0), "prompt")
        n = len(prompt["ids"])
        if n > self.max_prompt_tokens:
            raise UserError(f"the prompt is {n} tokens (text and image tokens), over this server's limit of "
                            f"{self.max_prompt_tokens}")
        length = min(bucket_length(n, self.smallest_bucket), self.max_prompt_tokens)
        key = np.asarray(jax.random.PRNGKey(np.uint32(seed)))
        return _Request(prompt, length, n, max_tokens, temperature, top_p, key, Text(self.model.tokenizer, stops))

    # ---- the decoding thread -------------------------------------------------------------------------------
    def _wake(self) -> None:
        with self._lock:
            self._lock.notify()

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._closed and not self._pending and not any(self._rows):
                    self._lock.wait()
                if self._closed:
                    break
                waiting = [r for r in self._pending if not r.handle.cancelled]
                gone, self._pending = [r for r in self._pending if r.handle.cancelled], waiting
                admitted = []
                for slot in range(self.slots):
                    if self._rows[slot] is None and self._pending:
                        admitted.append((slot, self._pending.pop(0)))
            for request in gone:   # cancelled while waiting for a slot
                self._end(None, request, "cancelled")
            try:
                for group in self._groups(admitted):
                    try:
                        self._start(group)
                    except Exception as e:   # these requests' failure only (a bug or the device's)
                        for slot, request in group:
                            self._rows[slot] = None
                            request.handle._finish(None, RuntimeError(f"prefill failed: {type(e).__name__}: {e}"))
                self._drop_cancelled()
                if any(self._rows):
                    self._step()
            except Exception as e:   # a bug or a device failure: fail the requests in flight, keep serving
                for slot, request in enumerate(self._rows):
                    if request is not None:
                        request.handle._finish(None, RuntimeError(f"decoding failed: {type(e).__name__}: {e}"))
                        self._rows[slot] = None
        for request in self._pending + [r for r in self._rows if r is not None]:
            request.handle._finish(None, RuntimeError("the engine was closed"))

    def _groups(self, admitted):
        """Admitted (slot, request) pairs in groups of at most `prefill_batch` that share a bucket."""
        by_length = {}
        for slot, request in admitted:
            if request.handle.cancelled:
                self._end(None, request, "cancelled")
            else:
                by_length.setdefault(request.length, []).append((slot, request))
        for group in by_length.values():
            for i in range(0, len(group), self.prefill_batch):
                yield group[i:i + self.prefill_batch]

    def _start(self, group) -> None:
        """Prefill a group of requests together and copy their cache rows into their slots. A lone request is
        prefilled alone; a group is padded to `prefill_batch` rows by repeating its last (two programs per bucket at
        most, and a request arriving at a quiet server does not pay for rows it does not need)."""
        cfg, requests = self.model.loaded.cfg, [r for _, r in group]
        rows = 1 if len(requests) == 1 else self.prefill_batch
        padded = requests + [requests[-1]] * (rows - len(requests))
        prompts, length = [r.prompt for r in padded], requests[0].length
        ids, valid, image_map, pixels = left_pad(prompts, length, self.generator.max_images * cfg.views_per_image,
                                                 cfg.vision.image_size, fixed_images=not cfg.packed_images)
        pixels = self.generator.packed(prompts)[0] if cfg.packed_images else jnp.asarray(pixels)
        sampling = (jnp.asarray([r.temperature for r in padded], jnp.float32),
                    jnp.asarray([r.top_p for r in padded], jnp.float32), jnp.asarray(np.stack([r.key for r in padded])))
        self.buckets.add(length)
        slots = [slot for slot, _ in group] + [self.slots] * (rows - len(group))
        with self._on_mesh(rows):
            first, cache_rows, last_pos = prefill(self.model.loaded.params, cfg, jnp.asarray(ids), jnp.asarray(valid),
                                                  pixels, jnp.asarray(image_map), sampling, self.cache_len)
            self._cache = insert(self._cache, cache_rows, jnp.asarray(slots, jnp.int32))
        first, last_pos = np.asarray(first), np.asarray(last_pos)
        for i, (slot, request) in enumerate(group):
            request.position, request.prompt = int(last_pos[i]) + 1, None
            self._rows[slot] = request
            self._receive(slot, int(first[i]))

    def _drop_cancelled(self) -> None:
        for slot, request in enumerate(self._rows):
            if request is not None and request.handle.cancelled:
                self._end(slot, request, "cancelled")

    def _step(self) -> None:
        rows = self._rows
        tokens = np.array([r.text.tokens[-1] if r else 0 for r in rows], np.int32)
        positions = np.array([r.position if r else 0 for r in rows], np.int32)
        active = np.array([r is not None for r in rows])
        temperature = np.array([r.temperature if r else 0.0 for r in rows], np.float32)
        top_p = np.array([r.top_p if r else 1.0 for r in rows], np.float32)
        keys = np.stack([r.key if r else np.zeros(2, np.uint32) for r in rows])
        steps = np.array([r.produced if r else 0 for r in rows], np.int32)
        with self._on_mesh(self.slots):
            new, self._cache = step(self._llm_params, self.model.loaded.cfg.llm, self._cache, tokens, positions,
                                    active, temperature, top_p, keys, steps)
        self.steps += 1
        for slot, token in enumerate(np.asarray(new)):
            if rows[slot] is not None:
                rows[slot].position += 1
                self._receive(slot, int(token))

    def _receive(self, slot: int, token: int) -> None:
        request = self._rows[slot]
        request.produced += 1
        if token == self.eos:
            return self._end(slot, request, "stop")
        delta, stopped = request.text.push(token)
        request.handle._delta(delta)
        if stopped:
            self._end(slot, request, "stop")
        elif request.produced >= request.max_tokens:
            self._end(slot, request, "length")

    def _end(self, slot: int | None, request: _Request, reason: str) -> None:
        if slot is not None:
            self._rows[slot] = None
        text, rest = request.text.final()
        request.handle._delta(rest)
        completion = len(request.text.tokens)
        self.finished[reason] += 1
        request.handle._finish({"text": text, "finish_reason": reason, "prompt_tokens": request.prompt_tokens,
                                "completion_tokens": completion})


def _number(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UserError(f"{name} must be a number, got {value!r}")
    return float(value)


def _turns(messages) -> tuple[list[tuple[str, str]], str]:
    """Alternating user/assistant messages ending with the user's -> (earlier (question, answer) turns, question)."""
    if not isinstance(messages, (list, tuple)) or not all(isinstance(m, dict) for m in messages):
        raise UserError("messages must be a list of {'role', 'content'} objects")
    roles = [m.get("role") for m in messages]
    if not roles or roles[-1] != "user" or any(r != ("user", "assistant")[i % 2] for i, r in enumerate(roles)):
        raise UserError(f"messages must alternate user/assistant, starting and ending with 'user'; got roles {roles}")
    texts = [m.get("content") for m in messages]
    if not all(isinstance(t, str) for t in texts):
        raise UserError("every message's content must be a string")
    return list(zip(texts[:-1:2], texts[1:-1:2])), texts[-1]
