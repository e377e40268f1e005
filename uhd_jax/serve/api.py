"""The Python API: a checkpoint loaded once, answering batches of (image, prompt) pairs and multi-turn chats.

Everything comes from the checkpoint as `uhd-generate --checkpoint` takes it (`eval.checkpoint_config.experiment`:
config, family, tokenizer), and answers go through the same path as `uhd-generate --image --prompt` (the 'open'
rule's prompt and slicing, `eval.generate.Generator`), so the two give the same tokens. A `Model` keeps one
Generator per decoding setting; compiled programs are jax.jit's, keyed by (batch, bucket length, setting), so a
second call that lands in a bucket already seen runs without compiling. `load(..., mesh='data,fsdp,tensor')` shards
the parameters, batches and KV cache over this process's devices (`eval.generate`), the tokens unchanged.
"""
from __future__ import annotations

import dataclasses
import os
import tempfile
from typing import Any

from uhd_jax.cli_errors import UserError


@dataclasses.dataclass
class Chat:
    """One conversation about at most one image: `turns` are (question, answer) pairs, answered in order."""

    model: "Model"
    image: Any = None                      # a PIL image or a path; None: text only
    turns: list = dataclasses.field(default_factory=list)

    def ask(self, text: str, **sampling) -> str:
        return self.model.chat(self, text, **sampling)

    def reset(self, image: Any = None) -> None:
        self.image, self.turns = image, []


class Model:
    """A loaded checkpoint (see `load`). `generate(images, prompts)` answers a batch; `chat` continues a `Chat`."""

    def __init__(self, loaded, answering, batch_size: int):
        from uhd_jax.data.templates import get_template

        self.loaded, self.rule, self.preparer = loaded, answering.rule, answering.preparer
        self.config, self.tokenizer = loaded.config, loaded.tokenizer
        self.template = get_template(self.preparer.template)
        self.batch_size = batch_size
        self._generators = {}

    # ---- decoding settings -> cached Generators --------------------------------------------------------------
    def generator(self, *, max_new_tokens: int | None = None, temperature: float = 0.0, top_p: float = 1.0,
                  num_beams: int = 1, stop=None):
        """The Generator of one decoding setting, made once per Model (its compiled programs then stay warm)."""
        from uhd_jax.eval.decoding import GenerationConfig
        from uhd_jax.eval.generate import Generator
        from uhd_jax.eval.model_vqa import eval_config
        from uhd_jax.train.trainer import packed_layout

        stop = (stop,) if isinstance(stop, str) else tuple(stop or ())
        key = (max_new_tokens or self.rule.max_new_tokens, float(temperature), float(top_p), int(num_beams), stop)
        if key not in self._generators:
            try:
                gen = GenerationConfig(max_new_tokens=key[0], temperature=key[1], top_p=key[2], num_beams=key[3])
            except ValueError as e:
                raise UserError(f"decoding: {e}") from None
            config = eval_config(self.config, self.rule)
            stage = config.stages[list(config.stage_order)[-1]]
            self._generators[key] = Generator(
                self.loaded.cfg, self.loaded.params, self.tokenizer, gen, batch_size=self.batch_size,
                packed_layout=packed_layout(config, self.loaded.cfg, stage),
                max_images=int(config.data.max_images), stop_strings=stop, mesh=self.loaded.mesh,
                rules=self.loaded.rules)
        return self._generators[key]

    @property
    def compilations(self) -> int:
        """Distinct (batch, length) programs run so far, over all decoding settings."""
        return sum(g.compilations for g in self._generators.values())

    # ---- prompts ---------------------------------------------------------------------------------------------
    def conversation(self, turns: list[tuple[str, str]], question: str, has_image: bool) -> list[dict]:
        """LLaVA-format turns ending with `question` and an empty answer slot; the image placeholder goes into the
        first question where the family puts it (as `uhd-generate --prompt` does)."""
        from uhd_jax.eval.benchmarks import prompt_text

        questions = [q for q, _ in turns] + [question]
        if has_image:
            questions[0] = prompt_text(questions[0], self.rule)
        conv = []
        for q, a in zip(questions, [a for _, a in turns] + [""]):
            conv += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
        return conv

    def prompt_text(self, turns: list[tuple[str, str]], question: str, has_image: bool = True) -> str:
        """The prompt string the model reads for `question` after `turns` (the family's template)."""
        return self.template.prompt(self.conversation(turns, question, has_image)[:-1], add_generation_prompt=True)

    def _prompt(self, conv: list[dict], image_path: str | None, name: str) -> dict:
        from uhd_jax.data.images import SampleError

        sample = {"id": name, "conversations": conv}
        if image_path is not None:
            sample["image"] = image_path
        try:
            return self.preparer.prompt(sample, turn=len(conv) // 2 - 1)
        except (SampleError, ValueError) as e:
            raise UserError(f"{name}: {e}") from None

    def _answer(self, convs: list[list[dict]], images: list, seed: int, sampling: dict) -> list[str]:
        generator = self.generator(**sampling)
        with tempfile.TemporaryDirectory() as tmp:
            prompts = []
            for i, (conv, image) in enumerate(zip(convs, images)):
                prompt = self._prompt(conv, _image_path(image, tmp, i), f"prompt {i}")
                try:
                    generator.bucket(prompt, f"prompt {i}")
                except ValueError as e:
                    raise UserError(f"{e}: shorten it or ask for fewer new tokens") from None
                prompts.append(prompt)
        return generator(prompts, seeds=[(seed + i) % 2 ** 32 for i in range(len(prompts))])

    # ---- the API ---------------------------------------------------------------------------------------------
    def generate(self, images, prompts, *, max_new_tokens: int | None = None, temperature: float = 0.0,
                 top_p: float = 1.0, num_beams: int = 1, seed: int = 0, stop=None) -> list[str]:
        """One answer per prompt. `images`: one per prompt (a PIL image, a path, or None for a text-only prompt),
        or a single image/None for one prompt given as a string. Prompt i samples with key seed + i."""
        if isinstance(prompts, str):
            prompts, images = [prompts], [images]
        images = list(images) if images is not None else [None] * len(prompts)
        if len(images) != len(prompts):
            raise UserError(f"{len(images)} images for {len(prompts)} prompts: give one image (or None) per prompt")
        convs = [self.conversation([], p, image is not None) for p, image in zip(prompts, images)]
        return self._answer(convs, images, seed, dict(max_new_tokens=max_new_tokens, temperature=temperature,
                                                      top_p=top_p, num_beams=num_beams, stop=stop))

    def slice_plan(self, image) -> dict:
        """How the model cuts `image` (a PIL image or a path): `uhd-show-slices`'s plan ('grid', 'cells',
        'tokens': the image's positions in the prompt...)."""
        from uhd_jax.cli.show_slices import open_image, slice_plan

        return slice_plan(open_image(os.fspath(image)) if isinstance(image, (str, os.PathLike)) else image,
                          self.config)

    def new_chat(self, image=None) -> Chat:
        return Chat(self, image)

    def chat(self, chat, question: str | None = None, *, image=None, seed: int = 0, **sampling) -> str:
        """The answer to the next question of a conversation, in the family's template with every earlier turn.
        `chat`: a `Chat` (the question and answer are appended to it) or a list of messages
        ({'role': 'user'|'assistant', 'content': str}, ending with the user's question; `image` for the first)."""
        if isinstance(chat, Chat):
            if question is None:
                raise UserError("chat(Chat, question): give the question to ask")
            conv = self.conversation(chat.turns, question, chat.image is not None)
            answer = self._answer([conv], [chat.image], seed, sampling)[0]
            chat.turns.append((question, answer))
            return answer
        roles = [m.get("role") for m in chat]
        if not roles or roles[-1] != "user" or any(r != ("user", "assistant")[i % 2] for i, r in enumerate(roles)):
            raise UserError(f"chat messages must alternate user/assistant, starting and ending with 'user'; got "
                            f"roles {roles}")
        texts = [m.get("content") for m in chat]
        turns = list(zip(texts[:-1:2], texts[1:-1:2]))
        conv = self.conversation(turns, texts[-1], image is not None)
        return self._answer([conv], [image], seed, sampling)[0]


def _image_path(image, folder: str, index: int) -> str | None:
    """A path the preparer can open: a path as given; a PIL image written losslessly first, so that it goes through
    the same checks and conversion as an image file."""
    if image is None or isinstance(image, (str, os.PathLike)):
        return None if image is None else os.path.abspath(image)
    if not hasattr(image, "save"):
        raise UserError(f"image {index} is a {type(image).__name__}; give a PIL image, a path or None")
    path = os.path.join(folder, f"image{index}.png")
    image.save(path)
    return path


def load(checkpoint: str, *, dtype: str | None = None, config: str | None = None, overrides=(),
         tokenizer: str | None = None, batch_size: int = 8, mesh=None) -> Model:
    """A checkpoint directory (a stage's final/ or a converted one) ready to answer: model, family and tokenizer
    from its config.json, as `uhd-generate --checkpoint`. `dtype`: the compute dtype ('bfloat16'...); `config`:
    configs/NAME.py[:variant] instead of the family's; `overrides`: 'KEY=VALUE' run settings. `mesh`: shard the
    parameters, batches and KV cache over this process's devices: 'data,fsdp,tensor' sizes ('1,1,8': tensor
    parallel over 8), a {axis: size} dict or a jax Mesh; the training rules place them."""
    from uhd_jax.eval.checkpoint_config import check_runs_here, choose_tokenizer, experiment
    from uhd_jax.eval.generate import generation_mesh
    from uhd_jax.eval.model_vqa import load_model, rule_for, setup, tokenizer_for

    if batch_size < 1:
        raise UserError(f"batch size must be at least 1, got {batch_size}")
    overrides = tuple(overrides) + ((f"model.dtype={dtype}",) if dtype else ())
    src = experiment(checkpoint, config, overrides)
    check_runs_here(src.model)
    choose_tokenizer(src, tokenizer)
    tokenizer_for(src.config, src.meta)
    mesh = generation_mesh(mesh)   # a bad mesh is refused before minutes of loading
    loaded = load_model(src.config, src.checkpoint, model=src.model, model_id=src.model_id, mesh=mesh)
    answering = setup(loaded, rule_for(loaded.config, "open"), "", batch_size=batch_size)
    return Model(loaded, answering, batch_size)
