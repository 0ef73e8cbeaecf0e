"""The log the twistd plugins hand to twistd: JSON or text, filtered by a level a reload sets."""

from __future__ import annotations

import io

from twisted.logger import Logger, eventsFromJSONLogFile, formatEvent

from cellvpn.config.schema import LogFormat, LogLevelName
from cellvpn.logsetup import ServiceLog, twistd_log


def test_json_lines_are_read_back_by_twisted() -> None:
    out = io.StringIO()
    logs = ServiceLog(out, LogFormat.JSON, LogLevelName.INFO)
    log = Logger(observer=logs.observer, namespace="cellvpn.test")
    log.info("lease {ip} -> {client}", ip="198.18.5.2", client="a {brace}")
    log.debug("not written at info")
    [event] = list(eventsFromJSONLogFile(io.StringIO(out.getvalue())))
    assert formatEvent(event) == "lease 198.18.5.2 -> a {brace}"
    assert event["ip"] == "198.18.5.2" and event["log_namespace"] == "cellvpn.test"


def test_the_level_changes_while_running() -> None:
    out = io.StringIO()
    logs = ServiceLog(out, LogFormat.TEXT, LogLevelName.WARN)
    log = Logger(observer=logs.observer)
    log.info("quiet")
    logs.set_level(LogLevelName.DEBUG)
    log.debug("loud")
    text = out.getvalue()
    assert "quiet" not in text and "loud" in text


def test_only_twistd_without_syslog_gets_our_log() -> None:
    from twisted.scripts._twistd_unix import ServerOptions

    options = ServerOptions()
    options.parseOptions(["-n", "--pidfile=", "cellvpn"])
    assert twistd_log(options, LogFormat.JSON, LogLevelName.INFO) is not None
    options = ServerOptions()
    options.parseOptions(["-n", "--syslog", "cellvpn"])
    assert twistd_log(options, LogFormat.JSON, LogLevelName.INFO) is None
    assert twistd_log(None, LogFormat.JSON, LogLevelName.INFO) is None
