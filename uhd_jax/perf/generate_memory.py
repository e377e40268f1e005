"""Device memory of a model's whole generation program (`eval.generate.generate_tokens`: images encoded, prefill,
then the decode loop over the KV cache) sharded over a mesh as `uhd_jax.load(..., mesh=)` shards it, from XLA's
buffer assignment with abstract parameters and inputs: whether a 70B-class model answers on 8 devices of 80 GB is
answered on a CPU (see `uhd_jax.perf.memory` for what the numbers mean and how the CPU's differ from a GPU's).

  python -m uhd_jax.perf.generate_memory --config configs/slime.py:70b_lora --mesh 1,1,8 --batch 8 \
      --length 2048 --new-tokens 64 [--config.model.param_dtype=bfloat16]
"""
from __future__ import annotations

import argparse
import json
import os
import sys


def generation_memory(config, mesh_shape: dict, *, batch: int = 8, length: int = 2048, new_tokens: int = 64) -> dict:
    """argument / output / temp / peak bytes per device of `generate_tokens` for `batch` prompts of `length` tokens
    (one image each) and `new_tokens` greedy tokens, on the first data x fsdp x tensor devices."""
    import dataclasses

    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P

    from uhd_jax.eval.decoding import GenerationConfig
    from uhd_jax.eval.generate import batch_axes, generate_tokens, generation_rules
    from uhd_jax.models.config import vlm_config
    from uhd_jax.models.vlm import example_inputs, init_fn
    from uhd_jax.parallel.mesh import make_mesh
    from uhd_jax.parallel.sharding import logical_shardings, rules_from_config
    from uhd_jax.perf.memory import analysis_bytes

    model = config.model.to_dict()
    if model.get("slime"):
        model["slime"] = dict(model["slime"], separator_id=0)   # shapes do not depend on it; no tokenizer needed
    model.get("llm", {}).pop("lora", None)   # a served LoRA model is merged first
    cfg = vlm_config(model)
    cfg = dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, attention_impl="xla"))
    size = 1
    for n in mesh_shape.values():
        size *= n
    mesh = make_mesh(mesh_shape, jax.devices()[:size])
    rules = generation_rules(rules_from_config(config.get("axis_rules")), mesh, batch)
    boxed = jax.eval_shape(init_fn(cfg), jax.random.PRNGKey(0))["params"]
    shardings = logical_shardings(boxed, mesh, rules)
    params = jax.tree_util.tree_map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
                                    nn.meta.unbox(boxed), shardings)
    rows = batch_axes(mesh, batch) or None
    on_rows = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(  # noqa: E731
        mesh, P(rows, *([None] * (x.ndim - 1)))))
    ids, valid, _, pixels, image_map = jax.eval_shape(lambda: example_inputs(cfg, batch=batch, seq_len=length))
    keys = jax.ShapeDtypeStruct((batch, 2), jnp.uint32)
    gen = GenerationConfig(max_new_tokens=new_tokens, eos_id=2, pad_id=2)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        compiled = generate_tokens.lower(params, cfg, on_rows(ids), on_rows(valid),
                                         jax.tree_util.tree_map(on_rows, pixels), on_rows(image_map), on_rows(keys),
                                         gen).compile()
    count = sum(x.size for x in jax.tree_util.tree_leaves(params))
    kv = cfg.llm.num_layers * batch * (length + new_tokens) * cfg.llm.num_kv_heads * cfg.llm.dim_per_head * 2
    return dict(analysis_bytes(compiled), devices=size, mesh=dict(mesh.shape), batch=batch, length=length,
                new_tokens=new_tokens, parameters=count, param_dtype=jnp.dtype(cfg.llm.param_dtype).name,
                kv_cache_bytes=kv * jnp.dtype(cfg.llm.dtype).itemsize)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m uhd_jax.perf.generate_memory", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--mesh", default="1,1,8", help="data,fsdp,tensor sizes (CPU stand-in devices)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--length", type=int, default=2048)
    p.add_argument("--new-tokens", type=int, default=64)
    a, extra = p.parse_known_args(argv)
    from uhd_jax.cli_errors import split_overrides

    overrides = split_overrides(extra, p)
    from uhd_jax.eval.generate import parse_mesh

    shape = parse_mesh(a.mesh)
    if -1 in shape.values():
        p.error("--mesh: give every size (the CPU stand-in devices are made to match)")
    devices = shape["data"] * shape["fsdp"] * shape["tensor"]
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={devices}"
    from uhd_jax.cli_errors import load_config

    out = generation_memory(load_config(a.config, overrides), shape, batch=a.batch, length=a.length,
                            new_tokens=a.new_tokens)
    out.update(config=a.config, overrides=overrides, peak_gb=round(out["peak_bytes"] / 1e9, 2))
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
