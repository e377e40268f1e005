"""launch/demo.py refuses what it cannot run before it renders or trains anything (the demo itself is `make demo`)."""

import os

from tests.cli_mistakes import assert_mistake


def test_demo_cli_user_mistakes(tmp_path, capsys):
    from uhd_jax.cli.demo import main

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


def test_demo_stopped_by_a_signal_exits_128_plus_the_signal(tmp_path, capsys, monkeypatch):
    """trainer.run raises Preempted after SIGTERM/SIGINT has checkpointed the step: the demo says so and exits
    128 + signum like launch/train.py, instead of a traceback."""
    import signal

    from uhd_jax.cli import demo
    from uhd_jax.train.trainer import Preempted

    def preempted(*args, **kwargs):
        raise Preempted("stage pretrain: stopped by SIGTERM after step 3 (checkpoint of step 3 in x); rerun the same "
                        "command to resume", signal.SIGTERM)

    monkeypatch.setattr(demo, "train_and_score", preempted)
    assert demo.main(["--workdir", str(tmp_path / "demo"), "--train", "4", "--eval", "2"]) == 128 + signal.SIGTERM
    err = capsys.readouterr().err
    assert "demo.py: stage pretrain: stopped by SIGTERM after step 3" in err and "Traceback" not in err
