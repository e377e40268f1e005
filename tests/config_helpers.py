"""A tiny experiment config on the session's synthetic dataset (see conftest's `synthetic_data`)."""
from uhd_jax.config_loading import load_config


def on_synthetic_data(spec: str, data, **stage_updates):
    """`spec` (a tiny variant) reading the synthetic dataset with its tokenizer (a 640-token vocabulary) on the 2x2x2
    test mesh: the `sft` stage trains on the questions, every other LLaVA-style stage on the captions; `stage_updates`
    go to each of those stages (a JBU stage reads image folders and is left to the caller)."""
    c = load_config(spec)
    c.model.llm.vocab_size = 640
    c.data_root = data["root"]
    c.tokenizer = "tokenizer"
    c.mesh.update(data=2, fsdp=2, tensor=2)
    for name in c.stage_order:
        stage = c.stages[name]
        if stage.get("kind", "llava") == "jbu":
            continue
        js = "train_sft.json" if name == "sft" else "train_pretrain.json"
        stage.update(dict(sources=[dict(json=js, image_folder="images")], **stage_updates))
    return c
