"""The process log's formats (no I/O beyond a StringIO) and its config keys."""
import datetime
import json
import logging
import re

import pytest

from fastlb import config, logs
from fastlb.errors import ConfigError


def _record(msg="web/10.0.0.2:80 DOWN: 3 checks\nfailed", exc=False):
    exc_info = None
    if exc:
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            import sys
            exc_info = sys.exc_info()
    return logging.LogRecord("fastlb.health", logging.WARNING, __file__, 1, msg, None, exc_info)


def test_text_lines_carry_a_full_date_with_milliseconds_and_offset():
    line = logs.TextFormatter(worker=2).format(_record("hello"))
    m = re.match(r"(\S+) WARNING \[worker 2\] hello$", line)
    assert m, line
    when = datetime.datetime.fromisoformat(m.group(1))
    assert when.tzinfo is not None and abs((datetime.datetime.now().astimezone() - when).total_seconds()) < 5
    assert re.search(r"T\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d$", m.group(1))


def test_json_lines_are_one_object_each_with_the_exception():
    fmt = logs.JSONFormatter(worker=None)
    line = fmt.format(_record())
    assert "\n" not in line
    obj = json.loads(line)
    assert obj["level"] == "WARNING" and obj["logger"] == "fastlb.health"
    assert obj["message"] == "web/10.0.0.2:80 DOWN: 3 checks\nfailed" and "worker" not in obj
    datetime.datetime.fromisoformat(obj["time"])
    obj = json.loads(logs.JSONFormatter(worker=1).format(_record(exc=True)))
    assert obj["worker"] == 1 and "RuntimeError: boom" in obj["exc"]


def test_setup_writes_to_stderr_and_passes_the_format_on(monkeypatch, capsys):
    monkeypatch.delenv(logs.ENV, raising=False)
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        logs.setup("warning", "json")
        assert logs.os.environ[logs.ENV] == "json"
        logging.getLogger("fastlb").info("not shown")
        logging.getLogger("fastlb").warning("shown")
        err = capsys.readouterr().err.strip().splitlines()
        assert [json.loads(x)["message"] for x in err] == ["shown"]
        logs.setup("info")                     # a worker: the parent's format from the environment
        assert isinstance(root.handlers[0].formatter, logs.JSONFormatter)
        with pytest.raises(ValueError):
            logs.setup("info", "xml")
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])


BODY = '[[service]]\nname = "a"\nlisten = "127.0.0.1:1"\nbackends = [{ address = "127.0.0.1:2" }]\n'


def test_config_keys_with_defaults_and_errors():
    g = config.loads(BODY).global_
    assert (g.log_format, g.log_level) == ("text", "info")
    g = config.loads('[global]\nlog_format = "json"\nlog_level = "debug"\n' + BODY).global_
    assert (g.log_format, g.log_level) == ("json", "debug")
    with pytest.raises(ConfigError, match=r"global.log_format: 'xml' is not one of: text, json"):
        config.loads('[global]\nlog_format = "xml"\n' + BODY)
    with pytest.raises(ConfigError, match=r"global.log_level"):
        config.loads('[global]\nlog_level = "loud"\n' + BODY)
