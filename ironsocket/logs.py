"""Log lines: one formatter for every line, in one of three formats (``--log-format``).

Theory of operation
-------------------
Every line the server writes about what it does goes through `logging` and the one handler
`setup` installs on the root logger (stderr). A line is a *fact*: a message (``msg``) and,
optionally, structured *fields* passed as ``log.info("close", extra=fields(conn=3, sni=...))``.
The formatter renders the same record in the chosen `LogFormat`:

- ``text`` (default, for people): ``2026-12-02T04:53:39.123Z INFO ironsocket: conn=3 close
  client=127.0.0.1:4242 sni=a.example ...``: the ``conn`` field (if any) leads the message, the
  other fields follow as ``key=value`` with values unquoted (a line break in a message or value
  is written ``\\n``: one fact, one line);
- ``logfmt``: ``ts=... level=info logger=ironsocket pid=77 msg=close conn=3 sni="a b" ...``:
  a value is bare when it is non-empty and has no space, ``"``, ``=`` or control character,
  else double-quoted with ``\\"``, ``\\\\`` and ``\\n`` escapes;
- ``json``: one JSON object per line with ``ts``, ``level``, ``logger``, ``pid``, ``msg`` and
  the fields.

Levels: debug, info, warning, error (``--log-level``: that level and above are shown) and one
more, **notice** (`NOTICE`, between info and warning), which is shown at every ``--log-level``:
the few lines an operator needs whatever the level — that the server is up (``serving TLS 1.3
on ...``) and that it has stopped (``stopped``). Written with `notice`.

Timestamps are ISO 8601 in UTC with milliseconds and a ``Z``. A field whose value is None is
left out (never ``sni=None``). An exception's traceback (only logged for bugs) stays on the
line: in text it follows the line (Python's usual form), in logfmt/json it is one escaped
``exc`` field, so every line still parses. `setup` also routes Python's warnings and threads'
uncaught exceptions through the same handler.
"""

from __future__ import annotations

import datetime
import enum
import json
import logging
import re
import sys
import threading
from collections.abc import Mapping
from typing import IO

LEVELS = ("debug", "info", "warning", "error")
NOTICE = 25  # between INFO and WARNING (syslog's notice), and shown at every --log-level
logging.addLevelName(NOTICE, "NOTICE")
FIELDS_ATTR = "fields"  # the LogRecord attribute `fields()` sets (through ``extra=``)

_BARE = re.compile(r'[^\s"=\\\x00-\x1f\x7f]+')
# Escaped inside quotes: C0 controls, DEL, and what some readers take for a line break (NEL, LS, PS).
_CONTROL = re.compile("[\x00-\x1f\x7f\x85\u2028\u2029]")


class LogFormat(enum.Enum):
    TEXT = "text"
    LOGFMT = "logfmt"
    JSON = "json"


def fields(**values: object) -> dict[str, dict[str, object]]:
    """``extra=`` for a log call: the structured fields of the line (None values are dropped)."""
    return {FIELDS_ATTR: {k: v for k, v in values.items() if v is not None}}


def timestamp(created: float) -> str:
    """ISO 8601, UTC, milliseconds, ``Z``: ``2026-12-02T04:53:39.123Z``."""
    moment = datetime.datetime.fromtimestamp(created, datetime.timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def _scalar(value: object) -> object:
    """A field value as JSON knows it (bool, int, float, str)."""
    if isinstance(value, enum.Enum):
        value = value.value
    if isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return round(value, 6)
    if isinstance(value, tuple | list) and len(value) == 2 and isinstance(value[1], int):
        host = str(value[0])
        return f"[{host}]:{value[1]}" if ":" in host else f"{host}:{value[1]}"  # an address
    return str(value)


def _text(value: object) -> str:
    value = _scalar(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def logfmt_value(value: object) -> str:
    """One logfmt value: bare if it can be, else quoted (``sni="a b"``, ``msg=""``)."""
    text = _text(value)
    if _BARE.fullmatch(text):
        return text
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r")
    escaped = _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}" if ord(m.group()) < 0x100 else
                           f"\\u{ord(m.group()):04x}", escaped)
    return f'"{escaped}"'


def _record_fields(record: logging.LogRecord) -> Mapping[str, object]:
    found = getattr(record, FIELDS_ATTR, None)
    return found if isinstance(found, Mapping) else {}


class _Formatter(logging.Formatter):
    def base(self, record: logging.LogRecord) -> dict[str, object]:
        out: dict[str, object] = {"ts": timestamp(record.created), "level": record.levelname.lower(),
                                  "logger": record.name, "pid": record.process, "msg": record.getMessage()}
        for key, value in _record_fields(record).items():
            if key not in out:
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return out


def _one_line(text: str) -> str:
    """A message or value that came with line breaks (a child's stderr in an upgrade error),
    kept on its line: ``\\n`` for a newline."""
    return text.replace("\r", "\\r").replace("\n", "\\n") if "\n" in text or "\r" in text else text


class TextFormatter(_Formatter):
    """``TS LEVEL logger: [conn=N ]message key=value ...`` (the traceback, if any, after it)."""

    def format(self, record: logging.LogRecord) -> str:
        extra = dict(_record_fields(record))
        lead = f"conn={_one_line(_text(extra.pop('conn')))} " if "conn" in extra else ""
        tail = "".join(f" {k}={_one_line(_text(v))}" for k, v in extra.items())
        message = _one_line(record.getMessage())
        line = f"{timestamp(record.created)} {record.levelname} {record.name}: {lead}{message}{tail}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class LogfmtFormatter(_Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return " ".join(f"{k}={logfmt_value(v)}" for k, v in self.base(record).items())


class JsonFormatter(_Formatter):
    def format(self, record: logging.LogRecord) -> str:
        # ASCII only: U+2028/U+2029 raw in a line would split it for some readers.
        return json.dumps({k: _scalar(v) for k, v in self.base(record).items()})


FORMATTERS: dict[LogFormat, type[logging.Formatter]] = {
    LogFormat.TEXT: TextFormatter, LogFormat.LOGFMT: LogfmtFormatter, LogFormat.JSON: JsonFormatter,
}


def setup(level: str = "info", fmt: LogFormat = LogFormat.TEXT, stream: IO[str] | None = None) -> None:
    """The one place logging is configured: the root logger gets one stderr handler with the
    formatter of ``fmt`` (replacing any earlier one: calling it again only changes the format
    and level). ``level``: one of `LEVELS`."""
    root = logging.getLogger()
    for old in list(root.handlers):
        if getattr(old, "_ironsocket", False):
            root.removeHandler(old)
    handler: logging.Handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(FORMATTERS[fmt]())
    handler._ironsocket = True  # type: ignore[attr-defined]
    wanted = getattr(logging, level.upper(), logging.INFO)
    handler.addFilter(lambda record: record.levelno >= wanted or record.levelno == NOTICE)
    root.addHandler(handler)
    root.setLevel(min(wanted, NOTICE))  # NOTICE reaches the handler, whose filter applies --log-level
    logging.captureWarnings(True)  # Python's warnings become log lines too (logger py.warnings)
    threading.excepthook = _thread_exception  # so does a thread's uncaught exception (a bug)


def notice(logger: logging.Logger, message: str, *args: object) -> None:
    """A line shown at every ``--log-level`` (start-up and stop: see the module doc)."""
    logger.log(NOTICE, message, *args)


def _thread_exception(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit:
        return
    name = args.thread.name if args.thread is not None else "?"
    exc_info = (args.exc_type, args.exc_value or args.exc_type(), args.exc_traceback)
    logging.getLogger("ironsocket").error("uncaught exception in thread %s", name, exc_info=exc_info)


def parse_format(text: str) -> LogFormat:
    """``--log-format`` / ``log_format`` value; ValueError with the choices."""
    try:
        return LogFormat(text.lower())
    except ValueError:
        raise ValueError(f"{text!r}: not a log format; choose from "
                         f"{', '.join(f.value for f in LogFormat)}") from None

