"""A checkpoint answering an evaluation harness's requests: prompts with images in, answers or continuation
log-likelihoods out, batched with the shapes `uhd-generate` uses.

Answers go through `eval.model_vqa.setup` with the rule of `benchmark` (its prompt suffix, slicing and pre-resize), so a
harness prompt equal to a question file's text gets `uhd-generate --benchmark`'s tokens. Log-likelihoods run one
jitted forward per (batch, length bucket): the prompt (template, image tokens) followed by the continuation's tokens,
left-padded into the generator's buckets, summing log-softmax over the continuation. A request reads its first image
only, as LLaVA's scripts do for multi-image questions (the models take one image per question).
"""
from __future__ import annotations

import dataclasses
import functools
import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from uhd_jax.cli_errors import UserError


@dataclasses.dataclass(frozen=True)
class Settings:
    """One decoding setting: requests that share it are answered together."""

    max_new_tokens: int | None = None
    temperature: float = 0.0
    top_p: float = 1.0
    num_beams: int = 1
    until: tuple[str, ...] = ()


def settings_from(kwargs: dict | None) -> Settings:
    """lmms-eval's / HF's generation kwargs (`max_new_tokens`, `temperature`, `do_sample`, `top_p`, `num_beams`,
    `until`) as a Settings; sampling only when `do_sample` is true and the temperature positive, as HF generate()."""
    kwargs = dict(kwargs or {})
    until = kwargs.get("until") or ()
    until = (until,) if isinstance(until, str) else tuple(until)
    sample = bool(kwargs.get("do_sample", False)) and float(kwargs.get("temperature") or 0.0) > 0
    return Settings(max_new_tokens=int(kwargs["max_new_tokens"]) if kwargs.get("max_new_tokens") else None,
                    temperature=float(kwargs["temperature"]) if sample else 0.0,
                    top_p=float(kwargs.get("top_p") or 1.0) if sample else 1.0,
                    num_beams=int(kwargs.get("num_beams") or 1), until=tuple(u for u in until if u))


def cut_at_stops(text: str, until) -> str:
    """The text up to the first stop string. Rows decode independently, so cutting after the fact gives the text an
    early stop would have."""
    cut = min((text.index(s) for s in until if s in text), default=len(text))
    return text[:cut].strip() if cut < len(text) else text


@functools.partial(jax.jit, static_argnames=("cfg",))
def continuation_scores(params, cfg, input_ids, token_valid, pixel_values, image_token_map, scored):
    """(B,) summed log-probabilities of the tokens where `scored` is set, each given everything before it, and (B,)
    whether every one of them is the argmax there."""
    from uhd_jax.models.llama import positions_from_mask
    from uhd_jax.models.vlm import VLM

    logits, _ = VLM(cfg).apply({"params": params}, input_ids, token_valid, positions_from_mask(token_valid),
                               pixel_values, image_token_map)
    logits = logits[:, :-1].astype(jnp.float32)
    targets, mask = input_ids[:, 1:], scored[:, 1:]
    logp = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), targets[..., None], axis=-1)[..., 0]
    greedy = jnp.argmax(logits, axis=-1) == targets
    return jnp.sum(jnp.where(mask, logp, 0.0), axis=-1), jnp.all(greedy | ~mask, axis=-1)


class HarnessModel:
    """`generate(requests)` and `loglikelihood(requests)` for one checkpoint (model, family and tokenizer from its
    config.json, as `uhd-generate --checkpoint`)."""

    def __init__(self, checkpoint: str, *, config: str | None = None, benchmark: str = "open", batch_size: int = 8,
                 dtype: str | None = None, tokenizer: str | None = None, data_root: str | None = None,
                 overrides=()):
        from uhd_jax.eval.checkpoint_config import check_runs_here, choose_tokenizer, experiment
        from uhd_jax.eval.model_vqa import load_model, rule_for, tokenizer_for

        if int(batch_size) < 1:
            raise UserError(f"batch_size must be at least 1, got {batch_size}")
        overrides = tuple(overrides) + ((f"model.dtype={dtype}",) if dtype else ())
        src = experiment(checkpoint, config, overrides)
        check_runs_here(src.model)
        choose_tokenizer(src, tokenizer, data_root)
        tokenizer_for(src.config, src.meta)
        self.loaded = load_model(src.config, src.checkpoint, model=src.model, model_id=src.model_id)
        self.rule = rule_for(self.loaded.config, benchmark)
        self.batch_size = int(batch_size)
        self._answering = {}
        self.compiled_scoring: set[tuple[int, int]] = set()

    def answering(self, settings: Settings):
        """The `model_vqa.Answering` of one decoding setting, made once (its compiled programs stay warm)."""
        from uhd_jax.eval.model_vqa import setup

        key = dataclasses.replace(settings, until=())
        if key not in self._answering:
            self._answering[key] = setup(self.loaded, self.rule, "", batch_size=self.batch_size,
                                         max_new_tokens=settings.max_new_tokens, num_beams=settings.num_beams,
                                         temperature=settings.temperature, top_p=settings.top_p)
        return self._answering[key]

    @property
    def compilations(self) -> int:
        return sum(a.generator.compilations for a in self._answering.values()) + len(self.compiled_scoring)

    def _question(self, index: int, text: str, images, folder: str) -> dict:
        question = {"question_id": index, "text": text}
        image = next(iter(images or ()), None)
        if image is not None:
            if isinstance(image, (str, os.PathLike)):
                question["image"] = os.path.abspath(image)
            elif hasattr(image, "save"):   # written losslessly: it then goes through the image file checks
                question["image"] = os.path.join(folder, f"{index}.png")
                image.save(question["image"])
            else:
                raise UserError(f"request {index}: image is a {type(image).__name__}; give PIL images or paths")
        return question

    def _prompts(self, answering, requests, folder: str) -> list[dict]:
        from uhd_jax.data.images import SampleError

        prompts = []
        for i, (text, images, *_) in enumerate(requests):
            try:
                prompts.append(answering.prompt(self._question(i, text, images, folder)))
            except (SampleError, ValueError) as e:
                raise UserError(f"request {i}: {e}") from None
        return prompts

    def generate(self, requests: list[tuple[str, list, Settings]], seed: int = 0) -> list[str]:
        """One answer per (prompt text, images, Settings); request i samples with key seed + i."""
        out: list[str | None] = [None] * len(requests)
        groups: dict[Settings, list[int]] = {}
        for i, (_, _, settings) in enumerate(requests):
            groups.setdefault(dataclasses.replace(settings, until=()), []).append(i)
        with tempfile.TemporaryDirectory() as folder:
            for settings, idx in groups.items():
                answering = self.answering(settings)
                prompts = self._prompts(answering, [requests[i] for i in idx], folder)
                for p, i in zip(prompts, idx):
                    try:
                        answering.generator.bucket(p, f"request {i}")
                    except ValueError as e:
                        raise UserError(str(e)) from None
                texts = answering.generator(prompts, seeds=[(seed + i) % 2 ** 32 for i in idx])
                for i, text in zip(idx, texts):
                    out[i] = cut_at_stops(text, requests[i][2].until)
        return out

    def loglikelihood(self, requests: list[tuple[str, str, list]]) -> list[tuple[float, int, bool]]:
        """(log p(continuation | prompt), its token count, whether greedy decoding would write it) per (prompt text,
        continuation, images). The continuation is tokenized on its own (no BOS) after the prompt's generation slot,
        where the answer goes."""
        from uhd_jax.eval.generate import left_pad, packed_pixels

        answering = self.answering(Settings(max_new_tokens=1))
        gen, cfg = answering.generator, self.loaded.cfg
        with tempfile.TemporaryDirectory() as folder:
            prompts = self._prompts(answering, [(t, im) for t, _, im in requests], folder)
        rows = []
        for i, (p, (_, continuation, _)) in enumerate(zip(prompts, requests)):
            cont = self.loaded.tokenizer(continuation, add_special_tokens=False)["input_ids"]
            if not cont:
                raise UserError(f"request {i}: the continuation {continuation!r} has no tokens")
            n = len(p["ids"])
            row = {**p, "ids": np.concatenate([np.asarray(p["ids"]), cont]).astype(np.int32),
                   "image_map": np.concatenate([np.asarray(p["image_map"]), np.full(len(cont), -1)]).astype(np.int32)}
            try:
                gen.bucket(row, f"request {i}")
            except ValueError as e:
                raise UserError(str(e)) from None
            rows.append((row, n))
        out: list[tuple[float, int, bool] | None] = [None] * len(rows)
        for length, idx in gen.batches([r for r, _ in rows]):
            batch = idx + [idx[-1]] * (self.batch_size - len(idx))   # static batch shape, as the generator's
            chunk = [rows[i][0] for i in batch]
            slots = gen.max_images * cfg.views_per_image
            ids, valid, image_map, pixels = left_pad(chunk, length, slots, cfg.vision.image_size,
                                                     fixed_images=not cfg.packed_images)
            images = packed_pixels(chunk, gen.layout) if cfg.packed_images else jnp.asarray(pixels)
            scored = np.zeros_like(valid)
            for r, i in enumerate(batch):
                scored[r, length - (len(rows[i][0]["ids"]) - rows[i][1]):] = True
            self.compiled_scoring.add((self.batch_size, length))
            logp, greedy = continuation_scores(self.loaded.params, cfg, jnp.asarray(ids), jnp.asarray(valid), images,
                                               jnp.asarray(image_map), jnp.asarray(scored))
            for r, i in enumerate(idx):
                out[i] = (float(logp[r]), len(rows[i][0]["ids"]) - rows[i][1], bool(greedy[r]))
        return out
