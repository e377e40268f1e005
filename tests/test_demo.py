"""launch/demo.py refuses what it cannot run before it renders or trains anything (the demo itself is `make demo`)."""

import os

from tests.cli_mistakes import assert_mistake


def test_demo_cli_user_mistakes(tmp_path, capsys):
    from launch.demo import main

    work = ["--workdir", str(tmp_path / "demo")]
    assert_mistake(capsys, main, work + ["--models", "llava15,uhd_v3"], "unknown ['uhd_v3']; choose from ['llava15'")
    assert_mistake(capsys, main, work + ["--train", "0"], "give at least one image each")
    (tmp_path / "file").write_text("")
    assert_mistake(capsys, main, ["--workdir", str(tmp_path / "file")], "is a file; give a directory")
    # a cached dataset that lost files since it was rendered
    tokenizer = tmp_path / "demo" / "data" / "synthetic" / "tokenizer"
    os.makedirs(tokenizer)
    (tokenizer / "tokenizer.json").write_text("{}")
    assert_mistake(capsys, main, work, "lacks ['train_pretrain.json', 'train_sft.json', 'eval_sft.json', 'images']; "
                                       "delete")
