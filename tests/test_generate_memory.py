"""The 70B-class SliME LLM's generation program (`uhd_jax.perf.generate_memory`) compiles sharded over the 8-device
CPU mesh within 80 GB a device, by XLA's memory analysis of abstract parameters and inputs (issue #21)."""


def test_70b_slime_generation_compiles_on_8_devices_within_80_gb():
    """configs/slime.py:70b_lora's model (Llama-3-70B; its adapters merged, as served) answering 8 prompts of 2048
    tokens with 64 new tokens, tensor parallel over 8, from abstract parameters and inputs."""
    from uhd_jax.config_loading import load_config
    from uhd_jax.perf.generate_memory import generation_memory

    out = generation_memory(load_config("configs/slime.py:70b_lora"), {"data": 1, "fsdp": 1, "tensor": 8},
                            batch=8, length=2048, new_tokens=64)
    assert out["parameters"] > 70e9 and out["devices"] == 8
    # fp32 parameters split 8 ways are the arguments; the KV cache (5.5 GB) is split too, or temp would hold it whole
    assert out["argument_bytes"] < 4 * out["parameters"] / 8 * 1.01
    assert out["temp_bytes"] < out["kv_cache_bytes"]
    assert out["peak_bytes"] < 80e9, out
