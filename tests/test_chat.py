"""`uhd-chat` in a pseudo-terminal: turns in the family's template, an image switch, commands and mistakes on one line
each, and answers that arrive piece by piece and equal `Model.chat`'s."""
import os
import subprocess
import sys
import threading
import time

import pytest

from tests.serve_helpers import eval_images, shared_checkpoint
from uhd_jax.config_loading import load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NEW_TOKENS = 24


class Terminal:
    """A program on the slave side of a pty; every read of the master is kept with its time."""

    def __init__(self, argv):
        import pty

        self.master, slave = pty.openpty()
        self.proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, cwd=REPO, start_new_session=True)
        os.close(slave)
        self.chunks: list[bytes] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        while True:
            try:
                data = os.read(self.master, 4096)
            except OSError:   # the program closed the terminal
                return
            if not data:
                return
            self.chunks.append(data)

    def text(self, start: int = 0) -> str:
        return b"".join(self.chunks[start:]).decode("utf-8", "replace").replace("\r\n", "\n")

    def wait_for(self, needle: str, start: int, timeout: float = 300.0) -> str:
        deadline = time.monotonic() + timeout
        while needle not in self.text(start):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                time.sleep(0.2)
                raise AssertionError(f"no {needle!r} (exit {self.proc.poll()}); output:\n{self.text()}")
            time.sleep(0.01)
        return self.text(start)

    def send(self, line: str) -> int:
        """Type `line`; -> the index of the first chunk that can hold its reply."""
        mark = len(self.chunks)
        os.write(self.master, (line + "\n").encode())
        return mark

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(30)
        os.close(self.master)


@pytest.fixture(scope="module")
def checkpoint(synthetic_data, tmp_path_factory):
    return shared_checkpoint("configs/llava15.py:tiny", "llava15", synthetic_data, tmp_path_factory), \
        eval_images(synthetic_data, 2)


def answer(term: Terminal, question: str) -> tuple[str, int]:
    """Ask; -> (the answer as printed, how many reads it arrived in)."""
    mark = term.send(question)
    out = term.wait_for("\nUSER: ", mark)
    start = out.index("ASSISTANT: ") + len("ASSISTANT: ")
    text = out[start:out.index("\nUSER: ", start)]
    # the reads that carried answer text: from the one holding 'ASSISTANT: ' to the one before the next prompt
    lengths = [len(c.decode("utf-8", "replace").replace("\r\n", "\n")) for c in term.chunks[mark:]]
    ends = [sum(lengths[:i + 1]) for i in range(len(lengths))]
    first = next(i for i, e in enumerate(ends) if e > start)
    last = next(i for i, e in enumerate(ends) if e >= start + len(text))
    return text, last - first + 1


def test_two_turns_an_image_switch_and_mistakes_in_a_terminal(checkpoint):
    import uhd_jax

    final, images = checkpoint
    term = Terminal([sys.executable, "launch/chat.py", "--checkpoint", final, "--image", images[0],
                     "--max-new-tokens", str(NEW_TOKENS)])
    try:
        out = term.wait_for("USER: ", 0)
        # LLaVA-1.5 reads one padded square view: (image size / patch size)^2 tokens of the tiny tower
        vision = load_config("configs/llava15.py:tiny").model.vision
        tokens = (vision.image_size // vision.patch_size) ** 2
        assert f"image {images[0]}: " in out and f"no slices (one view), {tokens} image tokens\n" in out
        first, reads_1 = answer(term, "What is written?")
        second, reads_2 = answer(term, "And the colour?")
        mark = term.send(f"/image {images[1]}")
        assert f"image {images[1]}: " in term.wait_for("\nUSER: ", mark)
        third, reads_3 = answer(term, "What is written?")
        mark = term.send("/image " + os.path.join(REPO, "no-such.png"))
        assert "error: image " in term.wait_for("not found; give an image file\n", mark)
        mark = term.send("/colour")
        assert "error: unknown command /colour; commands: /image PATH, /reset, /exit\n" in term.wait_for(
            "\nUSER: ", mark)
        mark = term.send("/reset")
        assert "(conversation reset, image kept)" in term.wait_for("\nUSER: ", mark)
        term.send("/exit")
        assert term.proc.wait(60) == 0
    finally:
        term.close()
    model = uhd_jax.load(final, batch_size=1)
    chat = model.new_chat(images[0])
    expected = [chat.ask("What is written?", max_new_tokens=NEW_TOKENS),
                chat.ask("And the colour?", max_new_tokens=NEW_TOKENS),
                model.new_chat(images[1]).ask("What is written?", max_new_tokens=NEW_TOKENS)]
    assert [first, second, third] == expected
    assert all(len(t) > 8 for t in expected), expected   # answers long enough for streaming to show
    # streamed: an answer arrives over several reads of the terminal, not as one write at the end
    assert max(reads_1, reads_2, reads_3) > 1, (reads_1, reads_2, reads_3)


def test_startup_mistakes_exit_2_with_one_line(checkpoint, tmp_path):
    final, _ = checkpoint
    r = subprocess.run([sys.executable, "launch/chat.py", "--checkpoint", final, "--image", str(tmp_path / "x.png")],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--image" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
