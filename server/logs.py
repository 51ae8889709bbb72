"""Structured logs: one JSON object per line, with the request id when there is one; or text
for people, with the same fields as key=value. Either way one record is one line, whatever a
client sent (a newline in a model name cannot forge a line)."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import TextIO

# Attributes every LogRecord has; anything else passed through ``extra=`` is a field of ours.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


def _fields(record: logging.LogRecord) -> dict[str, object]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update(_fields(record))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def _text_value(value: object) -> str:
    text = str(value)
    plain = text and not any(c.isspace() or c in '"=' for c in text)
    return text if plain else json.dumps(text)


def _one_line(text: str) -> str:
    """Control characters (newlines included) written as escapes."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


def _quoted_message(record: logging.LogRecord) -> str:
    """The message with its string arguments quoted where they hold spaces, quotes or '=': a
    model name such as 'x code=OK' cannot pass for a field of the line."""
    if not isinstance(record.args, tuple) or not record.args:
        return record.getMessage()
    args = tuple(_text_value(a) if isinstance(a, str) else a for a in record.args)
    return str(record.msg) % args


class TextFormatter(logging.Formatter):
    """The record's line, then our fields as key=value (values with spaces or quotes quoted);
    a traceback, which only the server writes, follows on its own lines."""

    def format(self, record: logging.LogRecord) -> str:
        fields = "".join(f" {k}={_text_value(v)}" for k, v in _fields(record).items())
        line = f"{self.formatTime(record)} {record.levelname} {record.name}: "
        line = _one_line(line + _quoted_message(record) + fields)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def configure(fmt: str = "json", level: int = logging.INFO, stream: TextIO | None = None) -> None:
    """Route the ``fpgaserve`` loggers to ``stream`` (default stderr) as JSON (``fmt="json"``)
    or plain text."""
    handler = logging.StreamHandler(sys.stderr if stream is None else stream)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    logger = logging.getLogger("fpgaserve")
    logger.handlers[:] = [handler]
    logger.setLevel(level)
    logger.propagate = False
