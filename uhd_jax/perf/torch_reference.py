"""The PyTorch side of `uhd-benchmark --compare torch`: transformers' `LlavaForConditionalGeneration` with the
same vision tower and LLM as the benchmarked config (projector: LLaVA-1.5's MLP), SDPA attention, bf16 on a GPU
(float32 on CPU, where torch's bf16 matmuls are emulated), AdamW, no gradient checkpointing, trained on random batches
of one 336-px image and `seq_len` tokens per sample: the HF/LLaVA training loop users run today, minus DeepSpeed.
"""
from __future__ import annotations

import statistics
import time


def torch_train_step(model: dict, trains: dict, batch: int, seq_len: int, steps: int, warmup: int = 1) -> dict:
    """model: the config's model dict (`trainer.stage_model`); trains: {'vision','projector','llm'} -> bool.
    Returns step times (s) and tokens/s."""
    import torch
    from transformers import LlavaForConditionalGeneration

    from uhd_jax.convert.hf_configs import llava_config

    vocab = int(model["llm"]["vocab_size"])
    image_token = vocab - 1
    hf_cfg = llava_config(dict(model, projector_type="mlp2x_gelu"), {"image_token_index": image_token,
                                                                       "pad_token_id": 0})
    hf_cfg._attn_implementation = "sdpa"
    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    torch.manual_seed(0)
    net = LlavaForConditionalGeneration(hf_cfg).to(device=device, dtype=dtype)
    parts = {"vision": net.model.vision_tower, "projector": net.model.multi_modal_projector,
             "llm": [net.model.language_model, net.lm_head]}
    for name, modules in parts.items():
        for module in modules if isinstance(modules, list) else [modules]:
            module.requires_grad_(bool(trains[name]))
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, fused=cuda)
    size = int(model["vision"]["image_size"])
    n_image = (size // int(model["vision"]["patch_size"])) ** 2
    if seq_len <= n_image + 2:
        raise ValueError(f"seq_len {seq_len} leaves no text beside the {n_image} image tokens")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, vocab - 1, (batch, seq_len), generator=g)
    ids[:, 1:1 + n_image] = image_token
    labels = ids.clone()
    labels[:, :1 + n_image] = -100
    pixels = torch.randn(batch, 3, size, size, generator=g)
    ids, labels, pixels = ids.to(device), labels.to(device), pixels.to(device=device, dtype=dtype)

    def step():
        loss = net(input_ids=ids, pixel_values=pixels, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()

    net.train()
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    median = statistics.median(times)
    return {"step_s": {"median": median, "min": min(times), "max": max(times)},
            "tokens_per_s": batch * seq_len / median, "device": device, "dtype": str(dtype).replace("torch.", ""),
            "torch_peak_memory_bytes": torch.cuda.max_memory_allocated() if cuda else None}
