"""Name tables: torch key template <-> our parameter path template, plus the layout transform.

Templates use `{i}` for a layer number and `{name:a|b}` for one of a few literal alternatives; the same rule is
compiled into a regex for each direction, so import and export can never disagree. A checkpoint *layout* says which
key prefixes hold which component (vision / projector / llm) and which table reads them. Adding a projector means
adding a table to `PROJECTOR_TABLES`, not new code.
"""
from __future__ import annotations

import dataclasses
import functools
import re
from typing import Callable

from uhd_jax.convert import transforms as T

_PLACEHOLDER = re.compile(r"\{(\w+)(?::([^}]*))?\}")


def _choices(*templates: str) -> tuple[tuple[str, str], ...]:
    """Placeholder alternatives declared in any of the templates (`{p:q|k|v}` once is enough)."""
    found = {}
    for t in templates:
        for m in _PLACEHOLDER.finditer(t):
            if m.group(2):
                found[m.group(1)] = m.group(2)
    return tuple(sorted(found.items()))


@functools.lru_cache(maxsize=None)
def _compile(template: str, choices: tuple[tuple[str, str], ...]) -> re.Pattern:
    alternatives = dict(choices)
    out, pos = [], 0
    for m in _PLACEHOLDER.finditer(template):
        out.append(re.escape(template[pos:m.start()]))
        out.append(f"(?P<{m.group(1)}>{alternatives.get(m.group(1), r'[0-9]+')})")
        pos = m.end()
    out.append(re.escape(template[pos:]))
    return re.compile("^" + "".join(out) + "$")


def _fill(template: str, values: dict) -> str:
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


@dataclasses.dataclass(frozen=True)
class Rule:
    torch: str   # relative to the component's torch prefix, dot-separated
    ours: str    # relative to the component's root in our tree, '/'-separated
    transform: object = T.IDENTITY

    def match_torch(self, key: str):
        m = _compile(self.torch, _choices(self.torch, self.ours)).match(key)
        return None if m is None else _fill(self.ours, m.groupdict())

    def match_ours(self, path: str):
        m = _compile(self.ours, _choices(self.torch, self.ours)).match(path)
        return None if m is None else _fill(self.torch, m.groupdict())


CLIP_VISION = (
    Rule("embeddings.class_embedding", "class_embedding"),
    Rule("embeddings.patch_embedding.weight", "patch_embedding", T.PATCH_CONV),
    Rule("embeddings.position_embedding.weight", "position_embedding"),
    Rule("{ln:pre_layrnorm|post_layernorm}.weight", "{ln}/scale"),
    Rule("{ln:pre_layrnorm|post_layernorm}.bias", "{ln}/bias"),
    Rule("encoder.layers.{i}.self_attn.{p:q|k|v}_proj.weight", "layers_{i}/attn/{p}/kernel", T.LINEAR),
    Rule("encoder.layers.{i}.self_attn.{p:q|k|v}_proj.bias", "layers_{i}/attn/{p}/bias", T.FLATTEN),
    Rule("encoder.layers.{i}.self_attn.out_proj.weight", "layers_{i}/attn/o/kernel", T.LINEAR_FROM_HEADS),
    Rule("encoder.layers.{i}.self_attn.out_proj.bias", "layers_{i}/attn/o/bias"),
    Rule("encoder.layers.{i}.layer_norm{n:1|2}.weight", "layers_{i}/ln{n}/scale"),
    Rule("encoder.layers.{i}.layer_norm{n:1|2}.bias", "layers_{i}/ln{n}/bias"),
    Rule("encoder.layers.{i}.mlp.fc{n:1|2}.weight", "layers_{i}/fc{n}/kernel", T.LINEAR),
    Rule("encoder.layers.{i}.mlp.fc{n:1|2}.bias", "layers_{i}/fc{n}/bias"),
)

LLAMA_DECODER = (
    Rule("embed_tokens.weight", "embed_tokens/embedding"),
    Rule("norm.weight", "norm/scale"),
    Rule("layers.{i}.self_attn.{p:q|k|v}_proj.weight", "layers_{i}/attn/{p}/kernel", T.LINEAR),
    Rule("layers.{i}.self_attn.{p:q|k|v}_proj.bias", "layers_{i}/attn/{p}/bias", T.FLATTEN),  # Qwen2
    Rule("layers.{i}.self_attn.o_proj.weight", "layers_{i}/attn/o/kernel", T.LINEAR_FROM_HEADS),
    Rule("layers.{i}.mlp.{p:gate|up|down}_proj.weight", "layers_{i}/{p}/kernel", T.LINEAR),
    Rule("layers.{i}.input_layernorm.weight", "layers_{i}/input_norm/scale"),
    Rule("layers.{i}.post_attention_layernorm.weight", "layers_{i}/post_attn_norm/scale"),
)

LM_HEAD = (Rule("weight", "lm_head", T.LINEAR),)

_MAX_MLP_DEPTH = 8
# Original repos: nn.Sequential(Linear, GELU, Linear, ...) -> Linear layers at even indices.
MLP_ORIGINAL = tuple(r for i in range(_MAX_MLP_DEPTH) for r in (
    Rule(f"{2 * i}.weight", f"dense_{i}/kernel", T.LINEAR), Rule(f"{2 * i}.bias", f"dense_{i}/bias")))
# llava-hf: multi_modal_projector.linear_1 / linear_2.
MLP_HF = tuple(r for i in range(_MAX_MLP_DEPTH) for r in (
    Rule(f"linear_{i + 1}.weight", f"dense_{i}/kernel", T.LINEAR), Rule(f"linear_{i + 1}.bias", f"dense_{i}/bias")))
LINEAR_ORIGINAL = (Rule("weight", "dense_0/kernel", T.LINEAR), Rule("bias", "dense_0/bias"))

# UHD v1 resamplers (spec uhd.md §7): torch MultiheadAttention's packed in_proj rows [q; k; v] are our
# (D, 3, heads, head_dim) kernel; `proj` is applied as x @ proj, so it is stored (in, out) already.
RESAMPLER_ORIGINAL = (
    Rule("{p:query|pos_embed|proj}", "{p}"),
    Rule("kv_proj.weight", "kv_proj/kernel", T.LINEAR),
    Rule("attn.in_proj_weight", "in_proj/kernel", T.LINEAR),
    Rule("attn.in_proj_bias", "in_proj/bias", T.FLATTEN),
    Rule("attn.out_proj.weight", "out_proj/kernel", T.LINEAR_FROM_HEADS),
    Rule("attn.out_proj.bias", "out_proj/bias"),
    Rule("ln_{n:q|kv|post}.weight", "ln_{n}/scale"),
    Rule("ln_{n:q|kv|post}.bias", "ln_{n}/bias"),
)

# LLaVA-UHD v2's JBU stack (FeatUp `JBU4xStack`), relative to `upsampler.upsampler.` in a v2 projector or to the
# root of a VDIM checkpoint's upsampler.
JBU_STACK = (
    Rule("up{n:1|2}.{p:range_temp|sigma_spatial}", "up{n}/{p}"),
    Rule("up{n:1|2}.{m:range_proj|fixup_proj}.{k:0|3}.weight", "up{n}/{m}_{k}/kernel", T.CONV1X1),
    Rule("up{n:1|2}.{m:range_proj|fixup_proj}.{k:0|3}.bias", "up{n}/{m}_{k}/bias"),
    Rule("fixup_proj.1.weight", "fixup_proj_1/kernel", T.CONV1X1),
    Rule("fixup_proj.1.bias", "fixup_proj_1/bias"),
)

# The JBU stage's own modules (`vdim_objective/*` of a `jbu` stage checkpoint): FeatUp's AttentionDownsampler and
# ScaleNet, one per level (FeatUp itself trains one level and names them `downsampler.` / `scale_net.`).
VDIM_OBJECTIVE = (
    Rule("downsampler_{lv:2|4}x.attention_net.1.weight", "downsampler_{lv}x/attention_net_1/kernel", T.LINEAR),
    Rule("downsampler_{lv:2|4}x.attention_net.1.bias", "downsampler_{lv}x/attention_net_1/bias"),
    Rule("downsampler_{lv:2|4}x.{p:w|b}", "downsampler_{lv}x/{p}"),
    Rule("scale_net_{lv:2|4}x.net.weight", "scale_net_{lv}x/kernel", T.CONV1X1),
    Rule("scale_net_{lv:2|4}x.net.bias", "scale_net_{lv}x/bias"),
)

# v2 HiWin projector (§7): the shared attention/LN/proj names of v1 (its `query` and `kv_proj` are unused in v2),
# per-level projectors and embeddings, four query sets, `ln_proj`, `cat_proj`, and the JBU stack under
# `upsampler.upsampler.` (its frozen CLIP copy and ChannelNorm under `upsampler.model.` are skipped on import).
HIWIN_ORIGINAL = (Rule("{p:pos_embed|proj}", "{p}"),) + tuple(
    r for r in RESAMPLER_ORIGINAL if r.torch.startswith(("attn.", "ln_"))) + (
    Rule("query_{n:1|2|3|4}", "query_{n}"),
    Rule("features_{lv:1|2|4}x_projector.weight", "features_{lv}x_projector/kernel", T.LINEAR),
    Rule("features_{lv:1|2|4}x_projector.bias", "features_{lv}x_projector/bias"),
    Rule("feature_{lv:1|2|4}x_embedding", "feature_{lv}x_embedding"),
    Rule("ln_proj.weight", "ln_proj/scale"),
    Rule("ln_proj.bias", "ln_proj/bias"),
    Rule("cat_proj.weight", "cat_proj/kernel", T.LINEAR),
    Rule("cat_proj.bias", "cat_proj/bias"),
) + tuple(Rule("upsampler.upsampler." + r.torch, "upsampler/" + r.ours, r.transform) for r in JBU_STACK)
# Keys of an original v2 projector that this model deliberately does not hold (reported as skipped).
HIWIN_SKIPPED = r"mm_projector\.(upsampler\.model\.|query$|kv_proj\.weight$|features?_\dx_(projector\.|embedding$))"

# SliME (spec llava15_slime_llavar.md §C.9): `model.mm_projector.*` is the gated block (MLP `projection`, the 576-query
# resampler `attn` without kv/output projection, `w_gate`, the dead `w_noise`; its `mean`/`std` buffers are skipped);
# `model.sampler.*` (saved alone as sampler.bin) is the 144-query local compressor, under our `sampler/`.
_QUERY_RESAMPLER = tuple(r for r in RESAMPLER_ORIGINAL if r.torch.startswith(("attn.", "ln_"))) + (
    Rule("{p:query|pos_embed}", "{p}"),)
SLIME_ADAPTERS = (
    Rule("projection.0.weight", "projection/dense_0/kernel", T.LINEAR),
    Rule("projection.0.bias", "projection/dense_0/bias"),
    Rule("projection.2.weight", "projection/dense_1/kernel", T.LINEAR),
    Rule("projection.2.bias", "projection/dense_1/bias"),
    Rule("{p:w_gate|w_noise}", "{p}"),
) + tuple(Rule("attn." + r.torch, "attn/" + r.ours, r.transform) for r in _QUERY_RESAMPLER)
SLIME_SAMPLER = tuple(Rule("post_qformer." + r.torch, "sampler/post_qformer/" + r.ours, r.transform)
                      for r in _QUERY_RESAMPLER)
SLIME_SKIPPED = r"mm_projector\.(mean|std)$"

# Projector tables of the original repos' `model.mm_projector.*` naming, by projector kind.
PROJECTOR_TABLES: dict[str, tuple[Rule, ...]] = {"mlp": MLP_ORIGINAL, "linear": LINEAR_ORIGINAL,
                                                 "resampler": RESAMPLER_ORIGINAL, "hiwin": HIWIN_ORIGINAL,
                                                 "gated": SLIME_ADAPTERS}
_RESAMPLERS = ("adapt_spatial_resampler", "uhd_v1_query64", "arxiv_resampler")


def projector_kind(projector_type: str) -> str:
    if projector_type in ("adapt_spatial_resampler_v2", "uhd_v2_query64"):
        return "hiwin"
    if projector_type in _RESAMPLERS:
        return "resampler"
    return "linear" if projector_type == "linear" else "mlp" if projector_type.startswith("mlp") else projector_type


def sampler_table(projector_type: str) -> tuple[Rule, ...]:
    """`model.sampler.*`: only SliME has one (any other model reports those keys as unexpected)."""
    return SLIME_SAMPLER if projector_type == "gated" else ()


def original_projector_table(projector_type: str) -> tuple[Rule, ...]:
    kind = projector_kind(projector_type)
    if kind not in PROJECTOR_TABLES:
        raise ValueError(f"no conversion table for projector type {projector_type!r}; known: {sorted(PROJECTOR_TABLES)}")
    return PROJECTOR_TABLES[kind]


@dataclasses.dataclass(frozen=True)
class Component:
    ours: str                      # 'vision' | 'projector' | 'llm'
    prefixes: tuple[str, ...]      # accepted torch key prefixes; the first is written on export
    table: Callable[[str], tuple[Rule, ...]] | tuple[Rule, ...]

    def rules(self, projector_type: str) -> tuple[Rule, ...]:
        return self.table(projector_type) if callable(self.table) else self.table


@dataclasses.dataclass(frozen=True)
class Layout:
    name: str
    components: tuple[Component, ...]
    skip: tuple[str, ...] = ()     # regexes of keys that are known and deliberately not imported
    description: str = ""
    scope: tuple[str, ...] = ()    # our path prefixes it provides when it holds only part of a component


# transformers 5 saves CLIPVisionModel keys bare; hub CLIP checkpoints (CLIPModel) nest them under vision_model.
VISION_HF = Component("vision", ("", "vision_model."), CLIP_VISION)

LAYOUTS: dict[str, Layout] = {
    "hf_clip": Layout("hf_clip", (VISION_HF,),
                      skip=(r"^text_model\.", r"^(visual|text)_projection\.", r"^logit_scale$",
                            r"\.position_ids$"),
                      description="HF CLIPVisionModel / CLIPModel (text tower skipped)"),
    "hf_llama": Layout("hf_llama", (Component("llm", ("model.",), LLAMA_DECODER),
                                    Component("llm", ("lm_head.",), LM_HEAD)),
                       skip=(r"rotary_emb\.inv_freq$",),
                       description="HF LlamaForCausalLM (Vicuna, Llama-3)"),
    "llava_hf": Layout("llava_hf", (
        Component("vision", ("vision_tower.", "vision_tower.vision_model.", "model.vision_tower.",
                             "model.vision_tower.vision_model."), CLIP_VISION),
        Component("projector", ("multi_modal_projector.", "model.multi_modal_projector."), MLP_HF),
        Component("llm", ("language_model.model.", "model.language_model."), LLAMA_DECODER),
        Component("llm", ("language_model.lm_head.", "lm_head."), LM_HEAD),
    ), skip=(r"rotary_emb\.inv_freq$", r"\.position_ids$"),
        description="llava-hf LlavaForConditionalGeneration (on-disk and in-memory names)"),
    "llava_original": Layout("llava_original", (
        Component("vision", ("model.vision_tower.vision_tower.vision_model.",), CLIP_VISION),
        Component("projector", ("model.mm_projector.",), original_projector_table),
        Component("projector", ("model.sampler.",), sampler_table),
        Component("llm", ("model.",), LLAMA_DECODER),
        Component("llm", ("lm_head.",), LM_HEAD),
    ), skip=(r"rotary_emb\.inv_freq$", r"\.position_ids$", HIWIN_SKIPPED, SLIME_SKIPPED),
        description="original LLaVA / LLaVA-UHD / LLaVAR / SliME checkpoints (model.mm_projector.*, model.layers.*)"),
    "vdim": Layout("vdim", (
        Component("projector", ("upsampler.",), tuple(Rule(r.torch, "upsampler/" + r.ours, r.transform)
                                                      for r in JBU_STACK)),
    ), skip=(r"(^|\.)(downsampler|scale_net)(_\dx)?\.", r"^model\."), scope=("projector/upsampler/",),
        description="FeatUp/LLaVA-UHD v2 VDIM (JBU) checkpoint: the upsampler alone; downsamplers, scale nets and "
                    "the featurizer are skipped"),
    "mm_projector": Layout("mm_projector", (
        Component("projector", ("model.mm_projector.", "mm_projector."), original_projector_table),
        Component("projector", ("model.sampler.", "sampler."), sampler_table),
    ), skip=(HIWIN_SKIPPED, SLIME_SKIPPED),
        description="stage-1 mm_projector.bin alone (SliME: and/or sampler.bin, model.sampler.*)"),
}


def detect_layout(keys) -> str:
    keys = list(keys)
    has = lambda prefix: any(k.startswith(prefix) for k in keys)  # noqa: E731
    if has("language_model.") or has("model.language_model.") or has("multi_modal_projector."):
        return "llava_hf"
    if has("model.layers.") and (has("model.mm_projector.") or has("model.vision_tower.")):
        return "llava_original"
    if has("model.layers.") or has("model.embed_tokens."):
        return "hf_llama"
    if has("vision_model.") or (has("embeddings.patch_embedding") and has("encoder.layers.")):
        return "hf_clip"
    if has("upsampler.up1."):
        return "vdim"
    if keys and all(k.startswith(("model.mm_projector.", "mm_projector.", "model.sampler.")) for k in keys):
        return "mm_projector"
    sample = ", ".join(keys[:5])
    raise ValueError(f"cannot tell the checkpoint layout from its keys (first keys: {sample}); pass --layout one of "
                     f"{sorted(LAYOUTS)}")
