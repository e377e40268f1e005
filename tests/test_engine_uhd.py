"""The serving engine on a UHD model (packed slices, the prefill packed into the offline generator's patch-budget
bucket): for an image that lands below the full budget its greedy answer is the offline answer token for token."""

from tests.serve_helpers import eval_images, shared_checkpoint

TOKENS = 8


def test_a_uhd_request_answers_as_offline(synthetic_data, tmp_path_factory):
    import uhd_jax
    from uhd_jax.serve.engine import Engine

    final = shared_checkpoint("configs/uhd_v2.py:tiny", "uhd_v2", synthetic_data, tmp_path_factory)
    model = uhd_jax.load(final, batch_size=1)
    image, question = eval_images(synthetic_data, 1)[0], "What does the sign say?"
    offline = model.generate([image], [question], max_new_tokens=TOKENS)
    generator = model.generator(max_new_tokens=TOKENS)
    _, budget = generator.packed([model._prompt(model.conversation([], question, True), image, "p")])
    assert budget < generator.layout.patch_budget, "the image should fit a bucket below the full budget"
    engine = Engine(model, slots=2, max_tokens_limit=TOKENS)
    try:
        handle = engine.submit([{"role": "user", "content": question}], image, max_tokens=TOKENS)
        assert [handle.result(timeout=300)["text"]] == offline
    finally:
        engine.close()
