"""Answer one question about one image, or a whole question file, with a trained checkpoint.

  uhd-generate --checkpoint runs/uhd_v2-7b/sft/final --image photo.jpg \
      --prompt "What is written on the sign?" [--config.model.attention_impl=cudnn]
  uhd-generate --checkpoint runs/uhd_v2-7b/sft/final \
      --benchmark textvqa --questions llava_textvqa_val_v051_ocr.jsonl --image-folder textvqa/train_images \
      --answers answers/textvqa.jsonl [--num-chunks 8 --chunk-idx 0]

The checkpoint names its model, family and tokenizer (its config.json); the prompt format and image slicing come from
its family's config in the variant of its sizes (`uhd_jax/eval/checkpoint_config.py`). `--config configs/NAME.py[:v]`
gives the experiment config instead and must describe the checkpoint's model; `--config.KEY=VALUE` overrides a config
entry, and of the model only its run settings (dtype, param_dtype, attention_impl, remat_policy, scan_layers).
Answer files record `--model-id` (default: the checkpoint's name, RUN-STAGE for RUN/STAGE/final).

The answer file is the originals' `model_vqa` format; a rerun skips answered questions. With several processes
(`jax.process_count() > 1`) each answers its own contiguous chunk unless --num-chunks/--chunk-idx say otherwise.
`--mesh data,fsdp,tensor` shards one process's generation over its devices (parameters, batches and KV cache by the
training rules; e.g. `--mesh 1,1,8` for a model that fits no single device); several processes each do so.
The benchmark's rule (prompt suffix, beams, pre-resize, slices: `uhd_jax/eval/benchmarks.py`) applies unless a flag
overrides it. A prompt longer than the model's positions less the new tokens (or than --max-prompt-length) is not
answered: it is listed with the reason in `<answers>.skipped.jsonl` and the exit status is 1.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from absl import flags, logging  # noqa: E402

flags.FLAGS.mark_as_parsed()
logging.set_verbosity(logging.WARNING)

from uhd_jax.cli_errors import UserError, reports_user_errors, require_dir, require_file, split_overrides  # noqa: E402
from uhd_jax.eval.benchmarks import BENCHMARKS  # noqa: E402


def add_model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="a parameter checkpoint directory (a stage's final/, or a "
                                                       "converted one): it names its model and tokenizer")
    p.add_argument("--config", default=None, help="experiment config, configs/NAME.py[:variant] (default: the "
                                                  "checkpoint's family and variant); --config.KEY=VALUE overrides")
    p.add_argument("--data-root", default=None, help="resolve the config's relative paths (tokenizer) here")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the checkpoint's)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--mesh", default=None, help="data,fsdp,tensor sizes over this process's devices (e.g. 1,1,8: "
                                                "tensor parallel); parameters, batches and KV cache sharded by the "
                                                "training rules (default: one device)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: the family's rule")
    p.add_argument("--num-beams", type=int, default=None, help="default: the benchmark's rule")
    p.add_argument("--temperature", type=float, default=None, help="default: the family's rule (0 = greedy)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--max-prompt-length", type=int, default=None,
                   help="longest prompt (text + image tokens); default and maximum: the model's positions less the "
                        "new tokens")


def model_source(a):
    """The checkpoint's experiment config and model, checked against --config and the overrides, and the tokenizer
    it uses: what `load` would object to, found without reading the parameters."""
    from uhd_jax.eval.checkpoint_config import check_runs_here, choose_tokenizer, experiment
    from uhd_jax.eval.model_vqa import tokenizer_for

    if a.data_root:
        require_dir(a.data_root, "--data-root", "give the folder the config's relative paths (its tokenizer) are under")
    src = experiment(a.checkpoint, a.config, a.overrides, model_id=getattr(a, "model_id", None))
    check_runs_here(src.model)
    choose_tokenizer(src, a.tokenizer, a.data_root)
    tokenizer_for(src.config, src.meta)
    return src


def check_model(a) -> None:
    model_source(a)


def load(a):
    from uhd_jax.eval.generate import generation_mesh
    from uhd_jax.eval.model_vqa import load_model

    mesh = generation_mesh(getattr(a, "mesh", None))
    src = model_source(a)
    return load_model(src.config, src.checkpoint, model=src.model, model_id=src.model_id, mesh=mesh)


def answering_for(model, a, benchmark: str, image_folder: str):
    from uhd_jax.eval.model_vqa import rule_for, setup

    return setup(model, rule_for(model.config, benchmark), image_folder, batch_size=a.batch_size,
                 max_new_tokens=a.max_new_tokens, num_beams=a.num_beams, temperature=a.temperature, top_p=a.top_p,
                 max_prompt_length=a.max_prompt_length)


def answer_one(answering, a) -> str:
    from uhd_jax.data.images import SampleError

    question = {"question_id": 0, "image": os.path.abspath(a.image), "text": a.prompt}
    try:
        prompt = answering.prompt(question)
    except SampleError as e:
        raise UserError(f"--image {a.image}: {e}; give a readable image file") from None
    try:
        answering.generator.bucket(prompt, "the prompt")
    except ValueError as e:
        raise UserError(f"{e}: shorten --prompt") from None
    return answering.generator([prompt], seeds=[a.seed])[0]


@reports_user_errors
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_flags(p)
    p.add_argument("--image", help="one image (with --prompt)")
    p.add_argument("--prompt", help="the question about --image")
    p.add_argument("--questions", help="question file (JSON lines: question_id, image, text)")
    p.add_argument("--image-folder", default="", help="folder the questions' image paths are relative to")
    p.add_argument("--answers", help="answer file to write (JSON lines, appended, resumable)")
    p.add_argument("--benchmark", default="open", choices=sorted(BENCHMARKS), metavar="NAME",
                   help=f"rule to apply (uhd_jax/eval/benchmarks.py), one of: {', '.join(sorted(BENCHMARKS))}")
    p.add_argument("--num-chunks", type=int, default=None)
    p.add_argument("--chunk-idx", type=int, default=None)
    p.add_argument("--seed", type=int, default=0, help="sampling seed (with --temperature > 0)")
    p.add_argument("--model-id", default=None, help="model_id in the answer file (default: the checkpoint's name)")
    a, extra = p.parse_known_args(argv)
    a.overrides = split_overrides(extra, p)
    if bool(a.image) == bool(a.questions) or (a.image and not a.prompt) or (a.questions and not a.answers):
        p.error("give either --image with --prompt, or --questions with --answers")
    if a.num_chunks is not None and a.num_chunks < 1:
        p.error(f"--num-chunks {a.num_chunks}: give at least 1")
    import jax

    from uhd_jax.eval.answers import read_answers, read_questions
    from uhd_jax.eval.model_vqa import answer_questions

    # the user's files are checked before the model loads (minutes for a 7B checkpoint)
    if a.image:
        require_file(a.image, "--image", "give an image file")
        print(answer_one(answering_for(load(a), a, a.benchmark, ""), a))
        return 0
    num_chunks = a.num_chunks or jax.process_count()
    chunk_idx = jax.process_index() if a.chunk_idx is None else a.chunk_idx
    if not 0 <= chunk_idx < num_chunks:
        p.error(f"--chunk-idx {chunk_idx} is outside 0..{num_chunks - 1} (--num-chunks {num_chunks})")
    questions = read_questions(a.questions)
    if a.image_folder and any(q.get("image") for q in questions):
        require_dir(a.image_folder, "--image-folder", "give the folder the questions' image paths are relative to")
    read_answers(a.answers)   # a damaged answer file stops the run here, not after the model loads
    answering = answering_for(load(a), a, a.benchmark, a.image_folder)
    summary = answer_questions(answering, questions, a.answers, num_chunks=num_chunks, chunk_index=chunk_idx,
                               seed=a.seed)
    skipped_path = a.answers + ".skipped.jsonl"
    if summary["skipped"]:
        with open(skipped_path, "w") as f:
            f.writelines(json.dumps(s) + "\n" for s in summary["skipped"])
    elif os.path.exists(skipped_path):   # an earlier run's list: those questions are answered now
        os.remove(skipped_path)
    see = f" (see {skipped_path})" if summary["skipped"] else ""
    print(f"{summary['answered_now']} answered now, {summary['answered_before']} before, {len(summary['skipped'])} "
          f"skipped{see} of {summary['questions']} in chunk {chunk_idx}/{num_chunks}; "
          f"{summary['compilations']} compilation(s), {summary['seconds']:.0f}s")
    return 1 if summary["skipped"] else 0


if __name__ == "__main__":
    sys.exit(main())
