"""Log lines as operators read them: JSON or text, one line per record whatever clients send."""

from __future__ import annotations

import io
import json
import logging

import pytest

from fpgaserve.server.logs import configure

# Model names as a hostile client might send them: they reach the access log.
FORGED = 'tiny\n2026-01-01 00:00:00,000 ERROR fpgaserve.server: "forged"'
FIELDS = "tiny code=OK request_id=forged"


@pytest.fixture
def captured():
    """The fpgaserve loggers writing to a buffer, put back as they were afterwards."""
    logger = logging.getLogger("fpgaserve")
    saved = logger.handlers[:], logger.level, logger.propagate
    buffer = io.StringIO()
    yield buffer
    logger.handlers[:], logger.level, logger.propagate = saved


def access_line(model: str) -> None:
    logging.getLogger("fpgaserve.access").info(
        "%s %s %s", "Predict", model, "NOT_FOUND",
        extra={"request_id": "r1", "model": model, "version": None, "ms": 1.25},
    )  # fmt: skip


def test_text_lines_carry_the_fields_and_cannot_be_forged(captured):
    configure("text", stream=captured)
    access_line(FORGED)
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logging.getLogger("fpgaserve.server").exception("request %s failed", "r2")
    access_line(FIELDS)
    first, *traceback, forged = captured.getvalue().splitlines()
    assert first.startswith("20")
    assert 'INFO fpgaserve.access: Predict "tiny\\n2026-01-01 00:00:00,000 ERROR' in first
    assert 'request_id=r1 model="tiny\\n2026-01-01 00:00:00,000 ERROR ' in first
    assert first.endswith("version=None ms=1.25")
    # Found in review: a model name could plant earlier code= and request_id= pairs.
    assert 'Predict "tiny code=OK request_id=forged" NOT_FOUND request_id=r1 ' in forged
    assert "ERROR fpgaserve.server: request r2 failed" in traceback[0]
    assert traceback[-1] == "RuntimeError: boom"  # the server's own traceback keeps its lines


def test_json_lines_carry_the_fields_and_cannot_be_forged(captured):
    configure("json", stream=captured)
    access_line(FORGED)
    (line,) = captured.getvalue().splitlines()
    entry = json.loads(line)
    assert entry["model"] == FORGED and entry["request_id"] == "r1" and entry["ms"] == 1.25
    assert entry["level"] == "info" and entry["logger"] == "fpgaserve.access"
