"""The OpenAI-style error object every pdserve HTTP service answers a failure
with (:func:`pdserve.common.errors.error_body`)."""

from __future__ import annotations

from typing import Any

import httpx

ERROR_FIELDS = {"message", "type", "param", "code"}


def assert_openai_error(
    response_or_json: httpx.Response | dict[str, Any],
    status: int,
    *fragments: str,
    param: str | None = None,
    code: int | str | None = None,
) -> dict[str, Any]:
    """Assert an OpenAI error object and return its ``error`` part.

    ``response_or_json`` is a response (whose HTTP status must be ``status``) or
    a body already parsed. The body is ``{"object": "error", "error": {...}}``
    with exactly ``message`` (non-empty), ``type``, ``param`` and ``code``; a
    numeric ``code`` equals ``status``, any other is a specific string code.
    Each of ``fragments`` must occur in the message; ``param`` and ``code``,
    when given, must match.
    """
    if isinstance(response_or_json, dict):
        body = response_or_json
    else:
        assert response_or_json.status_code == status, response_or_json.text
        body = response_or_json.json()
    assert body.get("object") == "error", body
    error = body.get("error")
    assert isinstance(error, dict) and set(error) == ERROR_FIELDS, body
    assert isinstance(error["message"], str) and error["message"], error
    assert isinstance(error["type"], str) and error["type"], error
    if isinstance(error["code"], int):
        assert error["code"] == status, error
    else:
        assert isinstance(error["code"], str) and error["code"], error
    for fragment in fragments:
        assert fragment in error["message"], error
    if param is not None:
        assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    return error
