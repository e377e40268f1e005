"""Answer a question file with a trained model, as the originals' `model_vqa_loader.py` does, but batched.

The model comes from a checkpoint (its `config.json` holds the model config the stage trained, overrides included),
the prompt format and image processing from the experiment config's last stage, and the benchmark's rule
(`uhd_jax.eval.benchmarks`) sets the suffix, decoding and UHD pre-resizing. Questions whose image is missing or
unreadable, or whose prompt does not fit, are reported (and retried by the next run), never answered with a guess.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import flax.linen as nn

from uhd_jax.cli_errors import UserError
from uhd_jax.data.images import SampleError
from uhd_jax.data.pipeline import Source
from uhd_jax.eval.answers import AnswerFile, answer_record, chunk
from uhd_jax.eval.benchmarks import EvalRule, eval_rule, prompt_text
from uhd_jax.eval.checkpoint_config import field_at
from uhd_jax.eval.decoding import GenerationConfig
from uhd_jax.eval.generate import Generator, generation_mesh, place_params, with_xla_attention
from uhd_jax.models.config import vlm_config
from uhd_jax.models.vlm import init_fn
from uhd_jax.parallel.sharding import rules_from_config
from uhd_jax.train.checkpoints import CONFIG_FILE, load_meta, load_params
from uhd_jax.train.param_tree import flatten, match_layer_layout, unflatten
from uhd_jax.train.trainer import _resolve, packed_layout, preparer_factory, stage_tokenizer


@dataclasses.dataclass
class LoadedModel:
    config: Any          # the experiment ConfigDict
    cfg: Any             # VLMConfig
    params: Any
    tokenizer: Any
    model_id: str
    mesh: Any = None     # a jax Mesh the parameters are laid out on (`generate.place_params`), or None
    rules: Any = None    # the logical axis rules they were laid out by


# What makes a model what it is: a checkpoint that differs from the config in one of these is another family or size
# (vocab_size may differ: a tokenizer can grow, and the preparer checks it fits; dtypes and remat are run settings).
IDENTITY = ("projector_type", "resampler_heads", "llm.hidden_size", "llm.intermediate_size", "llm.num_layers",
            "llm.num_heads", "llm.num_kv_heads", "llm.head_dim", "vision.hidden_size", "vision.intermediate_size",
            "vision.num_layers", "vision.num_heads", "vision.patch_size", "vision.image_size")


def config_difference(config, meta: dict) -> str | None:
    """The first field where the checkpoint's model (`meta`, its config.json) is not the experiment config's, as
    "model.X is A there, B in the config"; None when family and sizes agree."""
    trained = meta.get("family")
    if trained and config.get("family") and trained != config.family:
        return f"family is {trained!r} there, {config.family!r} in the config"
    ours = config.model.to_dict()
    for name in IDENTITY:
        theirs, mine = field_at(meta["model"], name), field_at(ours, name)
        if theirs is not None and mine is not None and theirs != mine:
            return f"model.{name} is {theirs!r} there, {mine!r} in the config"
    return None


def check_config_fits(config, meta: dict, checkpoint: str) -> None:
    """A UserError naming the first field where the checkpoint's model is not the experiment config's."""
    miss = config_difference(config, meta)
    if miss:
        trained = meta.get("family")
        raise UserError(f"checkpoint {checkpoint} does not match the config: {miss}"
                        + (f" (the checkpoint is a {trained} model)" if trained else "")
                        + "; pass the config and variant the checkpoint was trained with, or no --config (the "
                          "checkpoint names its model)")


def read_meta(checkpoint: str) -> dict:
    hint = "pass a stage's final/ directory (runs/NAME/STAGE/final) or a converted one (uhd-convert)"
    if not os.path.isdir(checkpoint):
        raise UserError(f"checkpoint {checkpoint} not found; {hint}")
    try:
        meta = load_meta(checkpoint)
    except FileNotFoundError as e:
        raise UserError(f"{e}; {hint}") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{os.path.join(checkpoint, CONFIG_FILE)}:{e.lineno}: not valid JSON ({e.msg}); the checkpoint "
                        f"is damaged: copy it again or re-export it") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("model"), dict):
        raise UserError(f"{os.path.join(checkpoint, CONFIG_FILE)} has no 'model' section; {hint}")
    return meta


def tokenizer_for(config, meta: dict):
    """The config's tokenizer, or a UserError saying where it was looked for and how to point at it."""
    path = _resolve(config.tokenizer, config)
    trained = f" (the checkpoint was trained with {meta['tokenizer']})" if meta.get("tokenizer") else ""
    if not path or not os.path.isdir(path):
        raise UserError(f"tokenizer {path or '(none)'} not found (config.tokenizer {config.tokenizer!r}, data root "
                        f"{config.get('data_root')!r}){trained}; pass --tokenizer DIR or --data-root")
    try:
        return stage_tokenizer(config)
    except (OSError, ValueError) as e:
        raise UserError(f"tokenizer {path} could not be loaded ({str(e).splitlines()[0]}){trained}; pass --tokenizer "
                        f"with a Hugging Face tokenizer directory") from None


def load_model(config, checkpoint: str, model: dict | None = None, model_id: str | None = None,
               mesh=None) -> LoadedModel:
    """Parameters of `checkpoint`, checked tensor by tensor against the model its config.json describes, whose
    family and size must be the experiment config's. `model`: that model with other run settings
    (`checkpoint_config.experiment`); a different layer layout (scan_layers) or param_dtype converts the parameters.
    `mesh` ('data,fsdp,tensor', a dict or a Mesh; see `generate.generation_mesh`): the parameters are read straight
    into their shardings over this process's devices by the config's axis rules (the training ones), so a model that
    fits no single device loads (a layer layout change stacks them on the host first)."""
    from uhd_jax.eval.checkpoint_config import checkpoint_name

    meta = read_meta(checkpoint)
    check_config_fits(config, meta, checkpoint)
    tokenizer = tokenizer_for(config, meta)
    model = meta["model"] if model is None else model
    cfg = vlm_config(model)
    mesh = generation_mesh(mesh)
    rules = rules_from_config(config.get("axis_rules"))
    params = load_params(checkpoint) if mesh is None else restore_sharded(checkpoint, meta["model"], mesh, rules)
    expected = flatten(nn.meta.unbox(jax.eval_shape(init_fn(with_xla_attention(cfg)), jax.random.PRNGKey(0))[
        "params"]))
    got = match_layer_layout(flatten(params), scanned=bool(meta["model"].get("scan_layers")),
                             want_scanned=cfg.llm.scan_layers)
    if model.get("param_dtype") != meta["model"].get("param_dtype"):   # asked for: e.g. bfloat16 weights on a GPU
        got = {k: v.astype(expected[k].dtype) if k in expected and jnp.issubdtype(v.dtype, jnp.floating) else v
               for k, v in got.items()}
    missing = sorted(set(expected) - set(got))
    unknown = sorted(set(got) - set(expected))
    misshaped = [f"{k}: {tuple(got[k].shape)} vs {tuple(expected[k].shape)}" for k in expected
                 if k in got and tuple(got[k].shape) != tuple(expected[k].shape)]
    if missing or unknown or misshaped:
        raise UserError(f"checkpoint {checkpoint} does not fit the model in its config.json: missing {missing[:8]}, "
                        f"unexpected {unknown[:8]}, mis-shaped {misshaped[:8]}; re-export it or pass the matching "
                        f"checkpoint directory (a stage's final/ folder)")
    params = unflatten(got)
    if mesh is not None:   # a layer layout or dtype converted above: back onto the rules' shardings
        params = place_params(cfg, params, mesh, rules)
    return LoadedModel(config, cfg, params, tokenizer, model_id or checkpoint_name(checkpoint), mesh, rules)


def restore_sharded(checkpoint: str, stored_model: dict, mesh, rules):
    """The checkpoint's tensors read straight into the shardings the rules give its own model (`stored_model`, its
    config.json's): no device, and not the host, holds the whole model. A tensor the model does not have, or has in
    another shape, is read replicated, for `load_model`'s checks to name."""
    import orbax.checkpoint as ocp
    from jax.sharding import NamedSharding, PartitionSpec

    from uhd_jax.parallel.sharding import logical_shardings
    from uhd_jax.train.checkpoints import PARAMS_DIR

    stored = ocp.StandardCheckpointer().metadata(os.path.join(os.path.abspath(checkpoint), PARAMS_DIR))
    stored = getattr(stored, "item_metadata", stored)
    stored = flatten(getattr(stored, "tree", stored))
    boxed = jax.eval_shape(init_fn(with_xla_attention(vlm_config(stored_model))), jax.random.PRNGKey(0))["params"]
    shapes = flatten(nn.meta.unbox(boxed))
    shardings = flatten(logical_shardings(boxed, mesh, rules))
    replicated = NamedSharding(mesh, PartitionSpec())
    target = {k: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=shardings[k] if k in shapes and tuple(
        shapes[k].shape) == tuple(m.shape) else replicated) for k, m in stored.items()}
    return load_params(checkpoint, unflatten(target))


def rule_for(config, benchmark: str) -> EvalRule:
    """The benchmark rule of the config's family; toy variants (slices not at 336 px) keep their own slicing."""
    slicing = dict(config.data.get("slicing") or {})
    return eval_rule(config.family, benchmark, published_geometry=int(slicing.get("scale_resolution", 336)) == 336)


def eval_config(config, rule: EvalRule):
    """The experiment config with the benchmark's slicing: no training augmentation, the rule's pre-resize and slice
    count (an explicit patch budget grows with the slice count)."""
    config = config.copy_and_resolve_references()
    slicing = config.data.get("slicing")
    if slicing is not None:
        trained = int(slicing.get("max_slices", 7))
        slicing.update(augment_prob=0.0, textvqa_long_side=0, pre_resize=rule.pre_resize,
                       pre_resize_upscale_only=rule.pre_resize_upscale_only)
        if rule.max_slices:
            slicing.max_slices = rule.max_slices
            if config.data.get("patch_budget"):
                config.data.patch_budget = int(config.data.patch_budget) * (rule.max_slices + 1) // (trained + 1)
    return config


def question_sample(question: dict, rule: EvalRule) -> dict:
    """A LLaVA-format sample whose first human turn is the benchmark prompt (the answer slot stays empty)."""
    image = question.get("image")
    human = prompt_text(question["text"], rule) if image else question["text"]
    sample = {"id": str(question["question_id"]), "conversations": [{"from": "human", "value": human},
                                                                     {"from": "gpt", "value": ""}]}
    if image:
        sample["image"] = image
    return sample


@dataclasses.dataclass
class Answering:
    """A model set up for one benchmark: `prompt(question)` -> prompt dict, `generator(prompts)` -> texts."""

    model: LoadedModel
    rule: EvalRule
    generator: Generator
    preparer: Any

    def prompt(self, question: dict) -> dict:
        return self.preparer.prompt(question_sample(question, self.rule))


def setup(model: LoadedModel, rule: EvalRule, image_folder: str, *, batch_size: int = 8,
          max_new_tokens: int | None = None, num_beams: int | None = None, temperature: float | None = None,
          top_p: float = 1.0, max_prompt_length: int | None = None) -> Answering:
    config = eval_config(model.config, rule)
    stage = config.stages[list(config.stage_order)[-1]]
    try:
        prep = preparer_factory(config, stage, model.cfg)(Source("", image_folder))
    except ValueError as e:   # the tokenizer or separators of the config do not fit the checkpoint's vocabulary
        raise UserError(f"the config does not fit the checkpoint's model: {e}") from None
    try:
        gen = GenerationConfig(max_new_tokens=rule.max_new_tokens if max_new_tokens is None else max_new_tokens,
                               num_beams=rule.num_beams if num_beams is None else num_beams,
                               temperature=rule.temperature if temperature is None else temperature, top_p=top_p)
    except ValueError as e:
        raise UserError(f"decoding: {e}") from None
    if batch_size < 1:
        raise UserError(f"batch size must be at least 1, got {batch_size}")
    generator = Generator(model.cfg, model.params, model.tokenizer, gen, batch_size=batch_size,
                          packed_layout=packed_layout(config, model.cfg, stage), max_images=int(config.data.max_images),
                          max_prompt_length=max_prompt_length, mesh=model.mesh, rules=model.rules)
    return Answering(model, rule, generator, prep)


def answer_questions(answering: Answering, questions: list[dict], answers_path: str, *, num_chunks: int = 1,
                     chunk_index: int = 0, seed: int = 0, group: int = 0, log=print) -> dict:
    """Answer this chunk's questions not yet in `answers_path`, appending `group` answers at a time (default 4
    batches). Returns counts, skipped questions with reasons, compilations and seconds."""
    t0 = time.perf_counter()
    mine = chunk(list(enumerate(questions)), num_chunks, chunk_index)
    out = AnswerFile(answers_path)
    todo = [(i, q) for i, q in mine if q["question_id"] not in out.done]
    skipped = []
    group = group or 4 * answering.generator.batch_size
    answered = 0
    for start in range(0, len(todo), group):
        prompts, kept = [], []
        for i, q in todo[start:start + group]:
            try:
                p = answering.prompt(q)
                answering.generator.bucket(p, f"question {q['question_id']!r}")
            except (SampleError, ValueError) as e:
                skipped.append({"question_id": q["question_id"], "reason": str(e)})
                continue
            prompts.append(p)
            kept.append((i, q))
        if not prompts:
            continue
        # a question's sampling key is its place in the file: the same answer however the run is split or resumed
        texts = answering.generator(prompts, seeds=[(seed * 1_000_003 + i) % 2 ** 32 for i, _ in kept])
        out.write([answer_record(q, t, answering.model.model_id) for (_, q), t in zip(kept, texts)])
        answered += len(texts)
        log(f"  {len(mine) - len(todo) + answered}/{len(mine)} answered ({len(skipped)} skipped)")
    if skipped:
        log(f"  {len(skipped)} question(s) skipped, first: {skipped[0]['question_id']}: {skipped[0]['reason']}")
    return {"questions": len(mine), "answered_now": answered, "answered_before": len(mine) - len(todo),
            "skipped": skipped, "compilations": answering.generator.compilations,
            "seconds": time.perf_counter() - t0}
