"""A randomly initialised tiny model saved as training leaves it, for the serving tests (API, chat, sharding)."""
import json
import os

import flax.linen as nn
import jax

from tests.config_helpers import on_synthetic_data


def tiny_checkpoint(spec: str, family: str, synthetic_data, work, seed: int = 4) -> str:
    """`spec`'s sft model with random weights at WORK/runs/tiny/sft/final, its config.json recording the family and
    the tokenizer relative to WORK (WORK/data/tokenizer links the synthetic one), as `uhd-train` writes it."""
    from uhd_jax.models.config import vlm_config
    from uhd_jax.models.vlm import init_fn
    from uhd_jax.train.checkpoints import save_params
    from uhd_jax.train.trainer import stage_model

    config = on_synthetic_data(spec, synthetic_data)
    model = stage_model(config, config.stages.sft)   # what the sft stage records (SliME: its ',' separator id)
    cfg = vlm_config(model)
    params = nn.meta.unbox(jax.jit(init_fn(cfg))(jax.random.PRNGKey(seed))["params"])
    final = str(work / "runs" / "tiny" / "sft" / "final")
    save_params(final, params, {"model": model})
    os.makedirs(work / "data", exist_ok=True)
    if not os.path.exists(work / "data" / "tokenizer"):
        os.symlink(synthetic_data["tokenizer"], work / "data" / "tokenizer")
    with open(os.path.join(final, "config.json"), "w") as f:
        json.dump({"model": model, "family": family, "stage": "sft", "steps": 1, "tokenizer": "data/tokenizer"}, f)
    return final


def eval_images(synthetic_data, n: int = 2) -> list[str]:
    folder = synthetic_data["images"] + "/eval"
    return [os.path.join(folder, name) for name in sorted(os.listdir(folder))[:n]]
