"""Talk to a checkpoint in the terminal: multi-turn in the family's template, the answer printed as it is decoded.

  uhd-chat --checkpoint runs/uhd_v2-7b/sft/final --image photo.jpg [--mesh 1,1,8] [--temperature 0.2 --top-p 0.9]

Commands at the prompt:
  /image PATH   attach an image, or switch to another one (a new conversation: the image belongs to the first turn
                in every family's template); prints how the model slices it (grid, tokens)
  /reset        forget the turns, keep the image
  /exit         leave (as does end of input, Ctrl-D)
Anything else is a question. A mistake (a missing image, an unknown command, a prompt over the model's length) is one
line, and the chat goes on; Ctrl-C stops the answer being decoded (that turn is not kept).

The model loads as `uhd_jax.load` loads it (config, family and tokenizer from the checkpoint; `--mesh
data,fsdp,tensor` shards it over this process's devices) and answers through the serving engine
(`uhd_jax.serve.engine`, one slot), which streams each piece of text as soon as it can no longer change; greedy
answers equal `Model.chat`'s.
"""
from __future__ import annotations

import argparse
import os
import sys

from absl import flags, logging  # noqa: E402

flags.FLAGS.mark_as_parsed()
logging.set_verbosity(logging.WARNING)

from uhd_jax.cli_errors import UserError, reports_user_errors, require_file, split_overrides  # noqa: E402

PROMPT, ANSWER = "USER: ", "ASSISTANT: "
COMMANDS = "/image PATH, /reset, /exit"


def describe_image(model, path: str) -> str:
    """One line on how the model takes the image at `path`: its size, the slice grid and the LLM tokens it becomes
    (`Model.slice_plan`)."""
    plan = model.slice_plan(path)
    w, h = plan["input_size"]
    grid = plan["grid"]
    if grid is None:
        cut = "no slices (one view)" if not plan["cells"] else "one slice"
    else:
        cut = f"grid {grid[0]}x{grid[1]} ({len(plan['cells'])} slices + overview)"
    return f"image {path}: {w}x{h}, {cut}, {plan['tokens']} image tokens"


def open_image(model, path: str):
    """A readable image file's path (and its description), or a UserError naming what is wrong with it."""
    if not os.path.isfile(path):
        raise UserError(f"image {path} not found; give an image file")
    try:
        return describe_image(model, path)
    except UserError:
        raise
    except (OSError, ValueError) as e:
        raise UserError(f"image {path} could not be read ({str(e).splitlines()[0]}); give a JPEG or PNG file") \
            from None


class Session:
    """The conversation and the commands, over an engine; `write` receives every piece of output."""

    def __init__(self, model, engine, sampling: dict, write):
        self.model, self.engine, self.sampling, self.write = model, engine, sampling, write
        self.chat = model.new_chat()

    def attach(self, path: str) -> None:
        line = open_image(self.model, path)
        self.chat.reset(os.path.abspath(path))
        self.write(line + "\n")

    def handle(self, line: str) -> bool:
        """Act on one input line; False when the chat should end."""
        text = line.strip()
        if not text:
            return True
        if text.startswith("/"):
            command, _, arg = text.partition(" ")
            arg = arg.strip()
            if command == "/exit":
                return False
            if command == "/reset":
                self.chat.reset(self.chat.image)
                self.write("(conversation reset" + (", image kept)\n" if self.chat.image else ")\n"))
            elif command == "/image":
                if not arg:
                    raise UserError("/image needs a path: /image PATH")
                self.attach(os.path.expanduser(arg))
            else:
                raise UserError(f"unknown command {command}; commands: {COMMANDS}")
            return True
        self.ask(text)
        return True

    def ask(self, question: str) -> None:
        self.write(ANSWER)
        stream = self.engine.stream_chat(self.chat, question, **self.sampling)
        try:
            for delta in stream:
                self.write(delta)
        except KeyboardInterrupt:
            stream.close()   # cancels the request; the unfinished turn is not kept
            self.write(" [stopped]")
        finally:
            self.write("\n")


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


@reports_user_errors
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a parameter checkpoint directory (a stage's final/, or a "
                                                       "converted one): it names its model and tokenizer")
    p.add_argument("--image", default=None, help="the image to talk about (or attach one later with /image PATH)")
    p.add_argument("--config", default=None, help="experiment config, configs/NAME.py[:variant] (default: the "
                                                  "checkpoint's); --config.KEY=VALUE overrides run settings")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the checkpoint's)")
    p.add_argument("--mesh", default=None, help="data,fsdp,tensor sizes over this process's devices (e.g. 1,1,8)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="per answer (default: the family's rule)")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0, help="sampling seed (with --temperature > 0)")
    p.add_argument("--stop", action="append", default=None, help="a string that ends an answer (repeatable)")
    a, extra = p.parse_known_args(argv)
    overrides = split_overrides(extra, p)
    if a.max_new_tokens is not None and a.max_new_tokens < 1:
        p.error(f"--max-new-tokens {a.max_new_tokens}: give at least 1")
    if a.image:
        require_file(a.image, "--image", "give an image file")
    import uhd_jax
    from uhd_jax.serve.engine import Engine

    model = uhd_jax.load(a.checkpoint, config=a.config, overrides=overrides, tokenizer=a.tokenizer, batch_size=1,
                         mesh=a.mesh)
    sampling = dict(max_tokens=a.max_new_tokens, temperature=a.temperature, top_p=a.top_p, seed=a.seed, stop=a.stop)
    engine = Engine(model, slots=1, max_tokens_limit=max(a.max_new_tokens or 0, model.rule.max_new_tokens))
    try:
        session = Session(model, engine, sampling, _write)
        engine.prepare([{"role": "user", "content": "hi"}], None, **sampling)   # flags checked before any question
        if a.image:
            session.attach(a.image)
        _write(f"{model.loaded.model_id} ({model.config.family}); commands: {COMMANDS}\n")
        while True:
            _write(PROMPT)
            try:
                line = sys.stdin.readline()
            except KeyboardInterrupt:
                _write("\n")
                break
            if not line:   # end of input
                _write("\n")
                break
            try:
                if not session.handle(line):
                    break
            except (UserError, RuntimeError) as e:   # RuntimeError: the engine could not decode this turn
                _write(f"error: {e}\n")
    finally:
        engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
