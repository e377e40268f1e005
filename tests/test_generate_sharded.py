"""Generation sharded over the 8-device CPU mesh (`uhd_jax.load(..., mesh=...)`, `uhd-generate --mesh`): the same
greedy tokens as one device for LLaVA-1.5, UHD v2 and SliME, parameters and KV cache laid out by the training rules.
(The 70B-class program's memory is tests/test_generate_memory.py: a file of its own, so that xdist's loadfile can run
it beside these.)"""
import jax
import numpy as np
import pytest

from tests.serve_helpers import eval_images, shared_checkpoint

QUESTIONS = ["What does the sign say?", "What is the total?"]
FAMILIES = [("configs/llava15.py:tiny", "llava15", "2,2,2"), ("configs/uhd_v2.py:tiny", "uhd_v2", "1,2,4"),
            ("configs/slime.py:tiny", "slime", "2,1,4")]


@pytest.fixture(scope="module", params=FAMILIES, ids=[f for _, f, _ in FAMILIES])
def family(request, synthetic_data, tmp_path_factory):
    spec, name, mesh = request.param
    return shared_checkpoint(spec, name, synthetic_data, tmp_path_factory), mesh, \
        eval_images(synthetic_data, 16)


def test_sharded_greedy_tokens_equal_one_device(family):
    import uhd_jax

    final, mesh, images = family
    single = uhd_jax.load(final, batch_size=2)
    sharded = uhd_jax.load(final, batch_size=2, mesh=mesh)
    assert sharded.loaded.mesh.devices.size == 8
    gen = single.generator(max_new_tokens=4)
    first = single._prompt(single.conversation([], QUESTIONS[0], True), images[0], "p")
    # another picture in the same length bucket: the test compiles one program each way
    others = (single._prompt(single.conversation([], QUESTIONS[1], True), image, "p") for image in images[1:])
    prompts = [first, next(p for p in others if len(p["ids"]) <= gen.max_prompt_length
                           and gen.bucket(p) == gen.bucket(first))]
    want = single.generator(max_new_tokens=4).token_ids(prompts)
    got = sharded.generator(max_new_tokens=4).token_ids(prompts)
    assert single.generator(max_new_tokens=4).compilations == 1   # one bucket: the test compiles one program each
    assert all(len(t) for t in want)
    for w, g in zip(want, got):
        np.testing.assert_array_equal(g, w)
    # the weights really are split: the LLM's first MLP by the rules, not replicated
    params = sharded.loaded.params["llm"]
    gate = (params["layers"]["gate"]["kernel"] if "layers" in params else params["layers_0"]["gate"]["kernel"])
    assert "tensor" in jax.tree_util.tree_leaves(tuple(gate.sharding.spec)) or sharded.loaded.mesh.shape["tensor"] == 1
    assert gate.addressable_shards[0].data.size < gate.size


@pytest.mark.parametrize("family", [FAMILIES[0]], indirect=True, ids=["llava15"])
def test_a_single_row_shards_over_the_model_axes_only(family, capsys):
    """A chat's batch of one cannot split over data x fsdp: it stays whole while tensor and fsdp split the weights."""
    import uhd_jax
    from uhd_jax.eval.generate import batch_axes, generation_mesh, generation_rules
    from uhd_jax.parallel.sharding import DEFAULT_RULES

    final, _, images = family
    mesh = generation_mesh("2,2,2")
    assert batch_axes(mesh, 1) == () and batch_axes(mesh, 2) == ("data",) and batch_axes(mesh, 4) == ("data", "fsdp")
    assert dict(generation_rules(DEFAULT_RULES, mesh, 2))["activation_batch"] == ("data",)
    # the checkpoint is read straight into the rules' shardings: no device ever holds a whole weight
    from uhd_jax.eval.model_vqa import read_meta, restore_sharded
    from uhd_jax.train.param_tree import flatten

    read = flatten(restore_sharded(final, read_meta(final)["model"], mesh, DEFAULT_RULES))
    embed = read["llm/embed_tokens/embedding"]
    assert embed.sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
    assert embed.addressable_shards[0].data.shape == (embed.shape[0] // 2, embed.shape[1] // 2)
    single = uhd_jax.load(final, batch_size=1)
    sharded = uhd_jax.load(final, batch_size=1, mesh=mesh)
    q = "What does the sign say?"
    (expected,) = single.generate([images[0]], [q], max_new_tokens=4)
    assert sharded.generate([images[0]], [q], max_new_tokens=4) == [expected]
    # uhd-generate --mesh prints the same answer
    from uhd_jax.cli import generate

    assert generate.main(["--checkpoint", final, "--image", images[0], "--prompt", q, "--max-new-tokens", "4",
                          "--batch-size", "1", "--mesh", "2,2,2"]) == 0
    assert capsys.readouterr().out.rstrip("\n").split("\n")[-1].strip() == expected
    assert generate.main(["--checkpoint", final, "--image", images[0], "--prompt", q, "--mesh", "3,1,1"]) == 2
    assert "mesh" in capsys.readouterr().err
    # the chat's path (uhd-chat --mesh): the serving engine over the sharded model streams the same answer
    from uhd_jax.serve.engine import Engine

    with Engine(sharded, slots=1, max_tokens_limit=4) as engine:
        assert "".join(engine.stream_chat(sharded.new_chat(images[0]), q, max_tokens=4)) == expected
    # text only, on the mesh too
    assert sharded.generate([None], ["Say something."], max_new_tokens=4) == single.generate(
        [None], ["Say something."], max_new_tokens=4)


def test_mesh_mistakes_are_one_line():
    from uhd_jax.cli_errors import UserError
    from uhd_jax.eval.generate import generation_mesh

    with pytest.raises(UserError, match="give three sizes"):
        generation_mesh("2,2")
    with pytest.raises(UserError, match="needs 16 devices"):
        generation_mesh("4,2,2")
    with pytest.raises(UserError, match="give three sizes"):
        generation_mesh("0,1,8")
    assert dict(generation_mesh("-1,1,2").shape) == {"data": 4, "fsdp": 1, "tensor": 2}
