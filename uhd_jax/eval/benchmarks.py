"""How each model family answers each benchmark: prompt suffix, decoding and image pre-resizing, in one table.

Sources: LLaVA-1.5 (spec llava15_slime_llavar.md §B.1: greedy, 1 beam, 128 new tokens, image before the question),
SliME (§C.8: greedy, 64 new tokens), LLaVAR (§D: the bare question then the image, sampling at T=0.9, 256 tokens),
LLaVA-UHD v1 (uhd.md §1.2, §8: every image resized to a long side of 1024, then M=7 slices) and v2 (TextVQA 1536,
MME and AI2D as given, others 1024, upscale-only as the dec2024 loader, M=9). Beams (uhd.md §8, v1 and v2 scripts):
TextVQA, GQA, VQAv2, SQA, VizWiz 3; MME, MM-Vet 5; POPE, MMBench, DocVQA, ChartQA, AI2D 1. The added benchmarks'
suffixes are the originals' fixed instructions (LLaVA's scripts; lmms-eval's for HR-Bench); LLaVA-Bench and MM-Vet
are answered open-ended with up to 1024 new tokens, as LLaVA's model_vqa.py does.

The question files of the originals (LLaVA's eval.zip, the UHD eval jsonl) already carry the suffix; `prompt_text`
appends it only when missing. The UHD pre-resize and slice count are for the published 336-px geometry: a config with
another slice resolution (the tiny and demo variants) keeps its training slicing and is not pre-resized.
"""
from __future__ import annotations

import dataclasses

from uhd_jax.cli_errors import UserError

SHORT = "\nAnswer the question using a single word or phrase."
LETTER = "\nAnswer with the option's letter from the given choices directly."
LETTER_CN = "\n请直接回答选项字母。"                       # LLaVA's model_vqa_mmbench, --lang cn
VIZWIZ = "\nWhen the provided information is insufficient, respond with 'Unanswerable'." + SHORT
HR_LETTER = "\nAnswer the option letter directly."        # lmms-eval's HR-Bench prompt


@dataclasses.dataclass(frozen=True)
class Benchmark:
    name: str
    scorer: str              # key of `uhd_jax.eval.scoring.SCORERS`
    suffix: str = SHORT
    uhd_beams: int = 1       # LLaVA-UHD's eval scripts; the other families decode with 1 beam
    v2_long_side: int = 1024  # LLaVA-UHD v2's pre-resize (0: the image as given)
    max_new_tokens: int = 0   # the originals' open-ended runs (model_vqa.py) allow 1024; 0: the family's default


BENCHMARKS = {b.name: b for b in (
    Benchmark("textvqa", "vqa_soft", uhd_beams=3, v2_long_side=1536),
    Benchmark("vqav2", "vqa_soft", uhd_beams=3),
    Benchmark("gqa", "gqa", uhd_beams=3),
    Benchmark("pope", "pope"),
    Benchmark("mme", "mme", uhd_beams=5, v2_long_side=0),
    Benchmark("docvqa", "anls"),
    Benchmark("chartqa", "chartqa"),
    Benchmark("ai2d", "ai2d", suffix=LETTER, v2_long_side=0),
    Benchmark("scienceqa", "scienceqa", suffix=LETTER, uhd_beams=3),
    Benchmark("mmbench", "mmbench", suffix=LETTER),
    Benchmark("mmbench_cn", "mmbench", suffix=LETTER_CN),
    Benchmark("seed", "seed", suffix=LETTER),
    Benchmark("mmmu", "mmmu", suffix=""),           # the converted question carries its own instruction
    Benchmark("ocrbench", "ocrbench", suffix=""),
    Benchmark("realworldqa", "realworldqa", suffix=""),   # the released question ends with its instruction
    Benchmark("hrbench4k", "hrbench", suffix=HR_LETTER),
    Benchmark("hrbench8k", "hrbench", suffix=HR_LETTER),
    Benchmark("vizwiz", "vizwiz", suffix=VIZWIZ, uhd_beams=3),
    Benchmark("llava_bench", "judge", suffix="", max_new_tokens=1024),
    Benchmark("mmvet", "judge", suffix="", uhd_beams=5, max_new_tokens=1024),
    Benchmark("synthetic_reading", "synthetic", v2_long_side=0),
    Benchmark("open", "none", suffix="", v2_long_side=1024),   # free-form questions (uhd-generate --prompt)
)}


@dataclasses.dataclass(frozen=True)
class EvalRule:
    """Everything one (family, benchmark) pair needs beyond the model config."""

    benchmark: Benchmark
    num_beams: int = 1
    temperature: float = 0.0
    max_new_tokens: int = 128
    image_after_question: bool = False
    add_suffix: bool = True         # LLaVAR's MultimodalOCR prompt is the bare question
    max_slices: int = 0             # UHD: slices per image at evaluation (0: the config's)
    pre_resize: int = 0             # UHD: long side before slicing (0: none)
    pre_resize_upscale_only: bool = False


def eval_rule(family: str, benchmark: str, published_geometry: bool = True) -> EvalRule:
    """The rule for `family` ('llava15', 'llavar', 'slime', 'uhd_v1', 'uhd_v2') on `benchmark`.

    `published_geometry=False` (a config whose slices are not 336 px) drops the UHD pre-resize and slice count."""
    if benchmark not in BENCHMARKS:
        raise UserError(f"unknown benchmark {benchmark!r}; choose from {sorted(BENCHMARKS)}")
    b = BENCHMARKS[benchmark]
    if family == "llava15":
        return EvalRule(b, max_new_tokens=b.max_new_tokens or 128)
    if family == "slime":
        return EvalRule(b, max_new_tokens=b.max_new_tokens or 64)
    if family == "llavar":
        return EvalRule(b, temperature=0.9, max_new_tokens=max(256, b.max_new_tokens), image_after_question=True,
                        add_suffix=False)
    if family not in ("uhd_v1", "uhd_v2"):
        raise UserError(f"no evaluation rule for model family {family!r} (config.family); the rules cover llava15, "
                        f"llavar, slime, uhd_v1 and uhd_v2")
    tokens = b.max_new_tokens or 128
    if benchmark == "synthetic_reading" or not published_geometry:
        return EvalRule(b, num_beams=b.uhd_beams, max_new_tokens=tokens)
    if family == "uhd_v1":
        return EvalRule(b, num_beams=b.uhd_beams, max_new_tokens=tokens, max_slices=7, pre_resize=1024)
    return EvalRule(b, num_beams=b.uhd_beams, max_new_tokens=tokens, max_slices=9, pre_resize=b.v2_long_side,
                    pre_resize_upscale_only=True)


def prompt_text(question: str, rule: EvalRule) -> str:
    """The human turn for a question: the suffix added where the question file lacks it, and the image placeholder
    where the family puts it."""
    suffix = rule.benchmark.suffix if rule.add_suffix else ""
    text = question if question.rstrip().endswith(suffix.strip()) else question + suffix
    return f"{text}\n<image>" if rule.image_after_question else f"<image>\n{text}"
