"""Answer one question about one image, or a whole question file, with a trained checkpoint.

  python launch/generate.py --config configs/uhd_v2.py:7b --checkpoint runs/uhd_v2-7b/sft/final \
      --image photo.jpg --prompt "What is written on the sign?"
  python launch/generate.py --config configs/uhd_v2.py:7b --checkpoint runs/uhd_v2-7b/sft/final \
      --benchmark textvqa --questions llava_textvqa_val_v051_ocr.jsonl --image-folder textvqa/train_images \
      --answers answers/textvqa.jsonl [--num-chunks 8 --chunk-idx 0]

The answer file is the originals' `model_vqa` format; a rerun skips answered questions. With several processes
(`jax.process_count() > 1`) each answers its own contiguous chunk unless --num-chunks/--chunk-idx say otherwise.
The benchmark's rule (prompt suffix, beams, pre-resize, slices: `uhd_jax/eval/benchmarks.py`) applies unless a flag
overrides it.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags, logging  # noqa: E402

flags.FLAGS.mark_as_parsed()
logging.set_verbosity(logging.WARNING)


def add_model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="experiment config, configs/NAME.py[:variant]")
    p.add_argument("--checkpoint", required=True, help="a parameter checkpoint directory (a stage's final/)")
    p.add_argument("--data-root", default=None, help="resolve the config's relative paths (tokenizer) here")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the config's)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: the family's rule")
    p.add_argument("--num-beams", type=int, default=None, help="default: the benchmark's rule")
    p.add_argument("--temperature", type=float, default=None, help="default: the family's rule (0 = greedy)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--max-prompt-length", type=int, default=None, help="longest prompt (text + image tokens)")


def load(a):
    from uhd_jax.config_loading import load_config
    from uhd_jax.eval.model_vqa import load_model

    config = load_config(a.config)
    if a.data_root:
        config.data_root = a.data_root
    if a.tokenizer:
        config.tokenizer = os.path.abspath(a.tokenizer)
    return load_model(config, a.checkpoint)


def answering_for(model, a, benchmark: str, image_folder: str):
    from uhd_jax.eval.model_vqa import rule_for, setup

    return setup(model, rule_for(model.config, benchmark), image_folder, batch_size=a.batch_size,
                 max_new_tokens=a.max_new_tokens, num_beams=a.num_beams, temperature=a.temperature, top_p=a.top_p,
                 max_prompt_length=a.max_prompt_length)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_flags(p)
    p.add_argument("--image", help="one image (with --prompt)")
    p.add_argument("--prompt", help="the question about --image")
    p.add_argument("--questions", help="question file (JSON lines: question_id, image, text)")
    p.add_argument("--image-folder", default="", help="folder the questions' image paths are relative to")
    p.add_argument("--answers", help="answer file to write (JSON lines, appended, resumable)")
    p.add_argument("--benchmark", default="open", help="rule to apply (uhd_jax/eval/benchmarks.py)")
    p.add_argument("--num-chunks", type=int, default=None)
    p.add_argument("--chunk-idx", type=int, default=None)
    p.add_argument("--seed", type=int, default=0, help="sampling seed (with --temperature > 0)")
    a = p.parse_args(argv)
    if bool(a.image) == bool(a.questions) or (a.image and not a.prompt) or (a.questions and not a.answers):
        p.error("give either --image with --prompt, or --questions with --answers")
    import jax

    from uhd_jax.eval.answers import read_questions
    from uhd_jax.eval.model_vqa import answer_questions

    model = load(a)
    if a.image:
        if not os.path.exists(a.image):
            p.error(f"--image {a.image}: file not found")
        answering = answering_for(model, a, a.benchmark, "")
        question = {"question_id": 0, "image": os.path.abspath(a.image), "text": a.prompt}
        print(answering.generator([answering.prompt(question)], seeds=[a.seed])[0])
        return 0
    num_chunks = a.num_chunks or jax.process_count()
    chunk_idx = jax.process_index() if a.chunk_idx is None else a.chunk_idx
    answering = answering_for(model, a, a.benchmark, a.image_folder)
    summary = answer_questions(answering, read_questions(a.questions), a.answers, num_chunks=num_chunks,
                               chunk_index=chunk_idx, seed=a.seed)
    if summary["skipped"]:
        with open(a.answers + ".skipped.jsonl", "w") as f:
            f.writelines(json.dumps(s) + "\n" for s in summary["skipped"])
    print(f"{summary['answered_now']} answered now, {summary['answered_before']} before, {len(summary['skipped'])} "
          f"skipped (see {a.answers}.skipped.jsonl) of {summary['questions']} in chunk {chunk_idx}/{num_chunks}; "
          f"{summary['compilations']} compilation(s), {summary['seconds']:.0f}s")
    return 1 if summary["skipped"] else 0


if __name__ == "__main__":
    sys.exit(main())
