"""Conversation templates and what each one supervises: the single source of truth for training, evaluation and
generation (spec: llava15_slime_llavar.md A.6, A.7, C.7, D; uhd.md §5).

A template renders a conversation into *segments*, `(text, learned)` pairs whose concatenation is the prompt string.
Labels are derived later from the token spans of the learned segments (`uhd_jax.data.tokenize`), never from string
lengths, so masking cannot drift from tokenization.

What is learned (spec A.7): for the chat templates, each assistant answer with its end token (`" {answer}</s>"`,
`"{answer}<|eot_id|>"`, `"{answer}<|im_end|>"`); for `plain` (pretraining), the caption and its trailing newline
(the human turn is replaced by the image alone, as preprocess_plain does; at inference a question is kept).
"""
from __future__ import annotations

import dataclasses
import re

IMAGE_TOKEN = "<image>"
USER, ASSISTANT = "human", "gpt"

VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
                 "detailed, and polite answers to the user's questions.")
LLAVA_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives "
                "helpful, detailed, and polite answers to the human's questions.")
# LLaVAR's own system prompt; the missing spaces after the full stops are in the original.
LLAVAR_SYSTEM = ("You are LLaVA, a large language and vision assistant trained by UW Madison WAIV Lab.You are able to "
                 "understand the visual content that the user provides, and assist the user with a variety of tasks "
                 "using natural language.Follow the instructions carefully and explain your answers in detail.")
QWEN_SYSTEM = "You are a helpful assistant."


class TemplateError(ValueError):
    """A conversation that the template cannot render (wrong turn order, wrong plain-sample shape...)."""


@dataclasses.dataclass(frozen=True)
class Template:
    name: str
    style: str                    # 'two' | 'plain' | 'llama3' | 'chatml'
    system: str = ""
    roles: tuple[str, str] = ("USER", "ASSISTANT")
    sep: str = " "
    sep2: str = "</s>"
    image_first: bool = True      # move <image> to the front of its turn, followed by '\n' (preprocess_multimodal)
    stop: str = "</s>"            # the end-of-answer string generation stops at

    # ---- conversation -> segments ---------------------------------------------------------------------------
    def segments(self, messages: list[dict], add_generation_prompt: bool = False) -> list[tuple[str, bool]]:
        """`messages`: [{'from': 'human'|'gpt', 'value': str}, ...] in LLaVA JSON form."""
        turns = [(m["from"], m["value"]) for m in messages]
        if self.style == "plain":
            return self._plain(turns, add_generation_prompt)
        _check_alternation(turns)
        if self.image_first:
            turns = [(who, move_image_first(text)) for who, text in turns]
        render = {"two": self._two, "llama3": self._llama3, "chatml": self._chatml}[self.style]
        segs = render(turns)
        if add_generation_prompt:
            segs.append((self.generation_prompt(), False))
        return _merge(segs)

    def prompt(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        return "".join(t for t, _ in self.segments(messages, add_generation_prompt))

    def generation_prompt(self) -> str:
        if self.style == "two":
            return self.roles[1] + ":"
        if self.style == "llama3":
            return "<|start_header_id|>assistant<|end_header_id|>\n\n"
        if self.style == "chatml":
            return "<|im_start|>assistant\n"
        return ""

    def _two(self, turns):
        segs = [(self.system + self.sep, False)]
        for who, text in turns:
            if who == USER:
                segs.append((f"{self.roles[0]}: {text}{self.sep}", False))
            else:  # 'ASSISTANT:' is context; ' {answer}</s>' is learned
                segs += [(f"{self.roles[1]}:", False), (f" {text}{self.sep2}", True)]
        return segs

    def _llama3(self, turns):
        segs = []
        for who, text in turns:
            role = "user" if who == USER else "assistant"
            segs.append((f"<|start_header_id|>{role}<|end_header_id|>\n\n", False))
            segs.append((f"{text}<|eot_id|>", who == ASSISTANT))
        return segs

    def _chatml(self, turns):
        segs = [(f"<|im_start|>system\n{self.system}<|im_end|>\n", False)]
        for who, text in turns:
            role = "user" if who == USER else "assistant"
            segs.append((f"<|im_start|>{role}\n", False))
            segs += [(f"{text}<|im_end|>", who == ASSISTANT), ("\n", False)]
        return segs

    def _plain(self, turns, add_generation_prompt=False):
        if add_generation_prompt and len(turns) == 1 and turns[0][0] == USER and IMAGE_TOKEN in turns[0][1]:
            text = turns[0][1]
            if not text.replace(IMAGE_TOKEN, "").strip():
                return [(IMAGE_TOKEN, False)]  # captioning prompt of a stage-1 model: the image alone
            # With a question, the original's inference prompt (conv_llava_plain, SeparatorStyle.PLAIN) is the turn
            # verbatim + sep '\n', e.g. '<image>\n' + question + '\n'; the assistant's None adds nothing.
            return [(text + self.sep, False)]
        if len(turns) != 2 or IMAGE_TOKEN not in turns[0][1] or turns[0][0] != USER or turns[1][0] != ASSISTANT:
            raise TemplateError("plain (pretraining) samples need exactly [human with <image>, gpt caption]")
        # The human text is discarded: the sample is <image> + caption + '\n'.
        return [(IMAGE_TOKEN, False), (turns[1][1] + "\n", True)]


def move_image_first(text: str) -> str:
    """LLaVA's preprocess_multimodal: remove <image> from the turn, strip, and put it in front followed by '\\n'.

    With n placeholders in one turn, n are put in front (the original handles one; it would silently drop the rest).
    """
    n = text.count(IMAGE_TOKEN)
    if n == 0:
        return text
    return (IMAGE_TOKEN + "\n") * n + text.replace(IMAGE_TOKEN, "").strip()


def _check_alternation(turns):
    if not turns:
        raise TemplateError("conversation is empty")
    for i, (who, text) in enumerate(turns):
        if who not in (USER, ASSISTANT):
            raise TemplateError(f"turn {i}: 'from' is {who!r}, expected 'human' or 'gpt'")
        if who != (USER if i % 2 == 0 else ASSISTANT):
            raise TemplateError(f"turn {i}: turns must alternate human/gpt starting with human")
        if not isinstance(text, str):
            raise TemplateError(f"turn {i}: 'value' must be a string")


def _merge(segs):
    out = []
    for text, learned in segs:
        if not text:
            continue
        if out and out[-1][1] == learned:
            out[-1] = (out[-1][0] + text, learned)
        else:
            out.append((text, learned))
    return out


TEMPLATES: dict[str, Template] = {
    "plain": Template("plain", "plain", sep="\n", sep2="", stop="\n"),
    "vicuna_v1": Template("vicuna_v1", "two", VICUNA_SYSTEM),
    "llava_v1": Template("llava_v1", "two", LLAVA_SYSTEM),
    "llavar_v1": Template("llavar_v1", "two", LLAVAR_SYSTEM, image_first=False),
    "llama3": Template("llama3", "llama3", stop="<|eot_id|>"),
    "qwen_1_5": Template("qwen_1_5", "chatml", QWEN_SYSTEM, stop="<|im_end|>"),
}
TEMPLATES["v1"] = TEMPLATES["vicuna_v1"]  # LLaVA-1.5 trains with --version v1


def get_template(name: str) -> Template:
    if name not in TEMPLATES:
        raise ValueError(f"unknown conversation template {name!r}; choose one of {sorted(TEMPLATES)}")
    return TEMPLATES[name]


def count_images(messages: list[dict]) -> int:
    return sum(len(re.findall(re.escape(IMAGE_TOKEN), m.get("value", "") or "")) for m in messages)
