"""Running a CLI's `main(argv)` in-process on a user mistake: exit status 2, one message, no traceback."""


def exit_status(main, argv):
    try:
        return main(argv)
    except SystemExit as e:   # argparse's own usage errors
        return e.code


def assert_mistake(capsys, main, argv, message):
    """`main(argv)` exits with status 2 and a stderr of one error line that contains `message`."""
    capsys.readouterr()
    status = exit_status(main, [str(x) for x in argv])
    err = capsys.readouterr().err
    assert status == 2, f"{argv}: exit status {status}, stderr {err!r}"
    assert message in err, f"{argv}: {message!r} not in {err!r}"
    assert "Traceback" not in err and err.count("error:") == 1, err
    return err
