"""Batched answers from a VLM: prompts (from `SamplePreparer.prompt`) sorted into length buckets, left-padded into
fixed batches, images encoded and spliced, then decoded (`uhd_jax.eval.decoding`), all in one jitted program.

Static shapes: a batch is `batch_size` rows (short batches repeat their last prompt) of a bucketed length, and the
images always fill the model's fixed slots (LLaVA-1.5 / LLaVAR / SliME) or, for UHD, the smallest patch-budget bucket
(`uhd_images.budget_buckets`: eighths of the packed budget) that holds the batch's slices. So a whole benchmark
compiles once per (length, patch budget) bucket it touches, at most 8 budgets per length; `Generator.compilations`
counts them. Padding slots are read by nothing, so the answers equal those at the full budget.

On a mesh (`generation_mesh`, this process's devices only: several processes still answer their own chunks) the
parameters carry the training rules' shardings (tensor parallel and FSDP, `uhd_jax.parallel.sharding`), a batch's rows
go over the data and fsdp axes that divide the batch, and the KV cache follows its keys and values (kv heads over
`tensor`, rows over the batch axes). The decode program is the same one: only where its arrays live changes.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from uhd_jax.cli_errors import UserError
from uhd_jax.data.uhd_images import bucketed, fill_row, patches_needed
from uhd_jax.eval.decoding import GenerationConfig, decode
from uhd_jax.models.vlm import VLM, VLMConfig
from uhd_jax.parallel.mesh import MESH_AXES, make_mesh
from uhd_jax.parallel.sharding import BATCH_AXES


def parse_mesh(text: str) -> dict[str, int]:
    """'data,fsdp,tensor' sizes as uhd-benchmark's --mesh (one may be -1: the remaining devices) -> a mesh shape."""
    parts = [x.strip() for x in str(text).split(",")]
    if len(parts) != 3 or not all(x.lstrip("-").isdigit() and (int(x) >= 1 or int(x) == -1) for x in parts):
        raise UserError(f"--mesh {text}: give three sizes data,fsdp,tensor, e.g. 1,1,8 (one may be -1)")
    return dict(zip(MESH_AXES, map(int, parts)))


def generation_mesh(mesh) -> jax.sharding.Mesh | None:
    """A mesh over this process's devices from 'data,fsdp,tensor', a {axis: size} dict or a Mesh (kept); None: none.
    Local devices only: generation shards inside a process, and several processes each answer their own chunk."""
    if mesh is None or isinstance(mesh, jax.sharding.Mesh):
        return mesh
    shape = parse_mesh(mesh) if isinstance(mesh, str) else dict(mesh)
    try:
        return make_mesh(shape, jax.local_devices())
    except ValueError as e:
        raise UserError(f"mesh: {e}; give data,fsdp,tensor sizes whose product is this process's "
                        f"{jax.local_device_count()} device(s)") from None


def batch_axes(mesh: jax.sharding.Mesh, batch: int) -> tuple[str, ...]:
    """The batch axes (data, fsdp) a batch of `batch` rows is split over: those that divide it, in order (a chat's
    single row stays whole on every device and the model's axes still split the work)."""
    kept, size = [], 1
    for name in BATCH_AXES:
        if batch % (size * mesh.shape[name]) == 0:
            kept.append(name)
            size *= mesh.shape[name]
    return tuple(kept)


def generation_rules(rules, mesh: jax.sharding.Mesh, batch: int):
    """The training rules with the activations' batch axis narrowed to `batch_axes`: the constraints inside the
    model then hold for batches that the data x fsdp product does not divide."""
    axes = batch_axes(mesh, batch)
    return tuple((name, (axes or None) if name == "activation_batch" else target) for name, target in rules)


def with_xla_attention(cfg: VLMConfig) -> VLMConfig:
    """`cfg` with XLA attention, for abstract shapes: they do not depend on the kernel, and tracing cuDNN's needs a
    GPU even abstractly."""
    return dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, attention_impl="xla"),
                               llm=dataclasses.replace(cfg.llm, attention_impl="xla"))


def place_params(cfg: VLMConfig, params, mesh: jax.sharding.Mesh, rules):
    """Parameters (host, one device, or already on the mesh: then nothing moves) -> the same tree laid out on `mesh`
    by the logical rules, leaf by leaf."""
    from uhd_jax.models.vlm import init_fn
    from uhd_jax.parallel.sharding import logical_shardings

    boxed = jax.eval_shape(init_fn(with_xla_attention(cfg)), jax.random.PRNGKey(0))["params"]
    shardings = logical_shardings(boxed, mesh, rules)
    return jax.tree_util.tree_map(jax.device_put, params, shardings)


def bucket_length(n: int, smallest: int = 64) -> int:
    """The smallest of smallest * {1, 1.5} * 2^k that holds n tokens: at most a third of a batch is padding."""
    size = smallest
    while True:
        for candidate in (size, size * 3 // 2):
            if candidate >= n:
                return candidate
        size *= 2


def left_pad(prompts: list[dict], length: int, image_slots: int, image_size: int, fixed_images: bool = True):
    """Prompt ids, validity and image-row maps right-aligned in (B, length); fixed-size images in
    (B, slots, S, S, 3)."""
    b = len(prompts)
    ids = np.zeros((b, length), np.int32)
    valid = np.zeros((b, length), bool)
    image_map = np.full((b, length), -1, np.int32)
    pixels = np.zeros((b, image_slots if fixed_images else 0, image_size, image_size, 3), np.float32)
    for i, p in enumerate(prompts):
        n = len(p["ids"])
        ids[i, length - n:] = p["ids"]
        valid[i, length - n:] = True
        image_map[i, length - n:] = p["image_map"]
        if fixed_images:
            pixels[i, :len(p["pixels"])] = p["pixels"]
    return ids, valid, image_map, pixels


def packed_pixels(prompts: list[dict], layout) -> dict:
    """UHD prompts: each prompt's slices and overviews packed into its row (see `uhd_jax.data.uhd_images`)."""
    out = layout.zeros(len(prompts))
    for row, p in enumerate(prompts):
        fill_row(out, row, list(p["pixels"]), layout)
    return {k: jnp.asarray(v) for k, v in out.items()}


@functools.partial(jax.jit, static_argnames=("cfg", "gen"))
def generate_tokens(params, cfg: VLMConfig, input_ids, token_valid, pixel_values, image_token_map, row_keys,
                    gen: GenerationConfig):
    """Encode the images, splice them into the prompts and decode: (B, max_new_tokens) int32."""
    embeds, token_valid, _ = VLM(cfg).apply({"params": params}, input_ids, token_valid, jnp.zeros_like(input_ids),
                                            pixel_values, image_token_map, method=VLM.embed_image_and_text)
    # SliME's router may drop image tokens: the decoder gets the routed mask (positions follow from it)
    return decode({"params": params["llm"]}, cfg.llm, embeds, token_valid, row_keys, gen)


class Generator:
    """Answers for lists of prompts with one model and one `GenerationConfig`.

    `stop_strings` end a row as soon as their tokens appear and are cut from the text (with what follows);
    `packed_layout` is required for UHD models (`trainer.packed_layout(config, cfg)`), its budget the largest a batch
    uses; `patch_buckets` (1: always that budget) how many budgets a batch may pick from; `max_prompt_length` bounds the
    buckets (a longer prompt is an error naming it). It defaults to what the model can take: its positions
    (`llm.max_position_embeddings`) less the new tokens, since RoPE past the trained positions answers with garbage;
    a larger one is an error."""

    def __init__(self, cfg: VLMConfig, params, tokenizer, gen: GenerationConfig, *, batch_size: int = 8,
                 packed_layout=None, max_images: int = 1, stop_strings: tuple[str, ...] = (),
                 max_prompt_length: int | None = None, smallest_bucket: int = 64, mesh=None, rules=None,
                 patch_buckets: int = 8):
        if cfg.packed_images and packed_layout is None:
            raise ValueError("this model reads packed UHD slices: pass "
                             "packed_layout=trainer.packed_layout(config, cfg)")
        stops = tuple(tuple(tokenizer(s, add_special_tokens=False)["input_ids"]) for s in stop_strings)
        eos = tokenizer.eos_token_id if gen.eos_id is None else gen.eos_id
        self.gen = dataclasses.replace(gen, eos_id=eos, pad_id=eos if eos is not None else 0,
                                       stop_sequences=gen.stop_sequences + tuple(s for s in stops if s))
        self.cfg, self.params, self.tokenizer = cfg, params, tokenizer
        self.batch_size, self.layout, self.max_images = batch_size, packed_layout, max_images
        self.patch_buckets = patch_buckets
        context = cfg.llm.max_position_embeddings
        room = context - self.gen.max_new_tokens
        if room < 1:
            raise UserError(f"{self.gen.max_new_tokens} new tokens fill the model's whole context of {context} "
                            f"positions (llm.max_position_embeddings): ask for fewer new tokens")
        if max_prompt_length is not None and not 0 < max_prompt_length <= room:
            raise UserError(f"max prompt length {max_prompt_length} is outside 1..{room}: the model has "
                            f"{context} positions (llm.max_position_embeddings) and {self.gen.max_new_tokens} go to "
                            f"new tokens")
        self.limit_hint = (f"the model's {context} positions less {self.gen.max_new_tokens} new tokens"
                           if max_prompt_length is None else "the --max-prompt-length given")
        self.stop_strings, self.max_prompt_length, self.smallest_bucket = stop_strings, max_prompt_length or room, \
            smallest_bucket
        self.programs: set[tuple[int, int, int]] = set()       # (batch, length, patch budget; 0: fixed-size images)
        # `params` are already laid out on `mesh` (`place_params`); a batch is placed there per call
        self.mesh = mesh
        if mesh is not None:
            from uhd_jax.parallel.sharding import DEFAULT_RULES

            self.rules = generation_rules(DEFAULT_RULES if rules is None else rules, mesh, batch_size)
            rows = batch_axes(mesh, batch_size)
            self._row_sharding = lambda ndim: jax.sharding.NamedSharding(
                mesh, jax.sharding.PartitionSpec(rows or None, *([None] * (ndim - 1))))

    def _placed(self, x):
        """A batch array where the program reads it: on the default device, or its rows over the mesh."""
        if self.mesh is None:
            return jnp.asarray(x)
        return jax.device_put(x, self._row_sharding(np.ndim(x)))

    def _on_mesh(self):
        if self.mesh is None:
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        stack.enter_context(jax.set_mesh(self.mesh))
        stack.enter_context(nn.logical_axis_rules(self.rules))
        return stack

    @property
    def signatures(self) -> set[tuple[int, int]]:
        """(batch, length) of the batches run so far."""
        return {(batch, length) for batch, length, _ in self.programs}

    @property
    def compilations(self) -> int:
        """Distinct (batch, length, patch budget) programs run so far (each compiled once)."""
        return len(self.programs)

    def bucket(self, prompt: dict, name: str = "prompt") -> int:
        n = len(prompt["ids"])
        length = bucket_length(n, self.smallest_bucket)
        if length > self.max_prompt_length:
            length = self.max_prompt_length
            if n > length:
                raise ValueError(f"{name} is {n} tokens (text and image tokens), over the prompt limit of {length} "
                                 f"({self.limit_hint})")
        return length

    def batches(self, prompts: list[dict]):
        """(bucket length, indices) groups of at most batch_size prompts, shortest bucket first."""
        lengths = [self.bucket(p, f"prompt {i}") for i, p in enumerate(prompts)]
        order = sorted(range(len(prompts)), key=lambda i: (lengths[i], i))
        groups: list[tuple[int, list[int]]] = []
        for i in order:
            if not groups or groups[-1][0] != lengths[i] or len(groups[-1][1]) == self.batch_size:
                groups.append((lengths[i], []))
            groups[-1][1].append(i)
        return groups

    def token_ids(self, prompts: list[dict], seeds: list[int] | None = None) -> list[np.ndarray]:
        """New token ids per prompt (up to and excluding EOS). `seeds` (one per prompt) key the sampling."""
        seeds = list(range(len(prompts))) if seeds is None else seeds
        out: list[np.ndarray | None] = [None] * len(prompts)
        for length, idx in self.batches(prompts):
            rows = idx + [idx[-1]] * (self.batch_size - len(idx))   # static batch shape
            chunk = [prompts[i] for i in rows]
            slots = self.max_images * self.cfg.views_per_image
            ids, valid, image_map, pixels = left_pad(chunk, length, slots, self.cfg.vision.image_size,
                                                     fixed_images=not self.cfg.packed_images)
            images, budget = self.packed(chunk) if self.cfg.packed_images else (pixels, 0)
            images = jax.tree_util.tree_map(self._placed, images)
            keys = jax.vmap(jax.random.PRNGKey)(jnp.asarray([seeds[i] for i in rows], jnp.uint32))
            self.programs.add((self.batch_size, length, budget))
            with self._on_mesh():
                tokens = np.asarray(generate_tokens(self.params, self.cfg, self._placed(ids), self._placed(valid),
                                                    images, self._placed(image_map), self._placed(keys),
                                                    self.gen))
            for i, row in zip(idx, tokens):
                out[i] = self._trim(row)
        return out

    def packed(self, chunk: list[dict]) -> tuple[dict, int]:
        """UHD prompts packed into the smallest budget bucket that holds the largest, and that budget."""
        need = max(patches_needed(list(p["pixels"]), self.layout.patch_size) for p in chunk)
        layout = bucketed(self.layout, need, self.patch_buckets)
        return packed_pixels(chunk, layout), layout.patch_budget

    def _trim(self, row: np.ndarray) -> np.ndarray:
        if self.gen.eos_id is not None and (row == self.gen.eos_id).any():
            row = row[:int(np.argmax(row == self.gen.eos_id))]
        return row

    def text(self, token_ids) -> str:
        text = self.tokenizer.decode([int(t) for t in token_ids], skip_special_tokens=True)
        for s in self.stop_strings:
            if s in text:
                text = text[:text.index(s)]
        return text.strip()

    def __call__(self, prompts: list[dict], seeds: list[int] | None = None) -> list[str]:
        return [self.text(t) for t in self.token_ids(prompts, seeds)]
