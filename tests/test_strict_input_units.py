"""Units of the input and overload guards, without servers: strict JSON bodies and
the router's admission queue."""

from __future__ import annotations

import asyncio
import json

import pytest
from pdserve.common.errors import APIError
from pdserve.router.admission import Admission
from pdserve.web.errors import parse_json_object
from pdserve.web.strict_json import MAX_JSON_DEPTH


def _nested(depth: int) -> bytes:
    """An object whose containers nest ``depth`` deep (the object itself is one)."""
    return b'{"a": ' + b"[" * (depth - 1) + b"]" * (depth - 1) + b"}"


@pytest.mark.parametrize("raw", [
    b"", b" \n", b"[]", b"1", b'"x"', b"null", b"{", b'{"a": NaN}', b'{"a": Infinity}', b'{"a": -Infinity}',
    b'{"a": 1e400}', b'{"a": -1e400}', b'{"a": 1' + b"0" * 5000 + b"}", b'{"a": "\\ud800"}', b'{"a": "\\udfff x"}',
    b'{"\\ud800": 1}', b'{"a": ["\\ud83d"]}', b'{"a": "\xff"}', b'\xfe\xff{}', _nested(MAX_JSON_DEPTH + 1), _nested(100_000),
])
def test_refused_bodies_are_400s(raw: bytes) -> None:
    with pytest.raises(APIError) as info:
        parse_json_object(raw)
    assert info.value.status == 400 and info.value.message


@pytest.mark.parametrize(("raw", "expected"), [
    (b'{"a": "\\ud83d\\ude00"}', {"a": "\U0001F600"}),  # a surrogate pair is one character
    (b'{"a": "\\\\ud800"}', {"a": "\\ud800"}),  # an escaped backslash, then plain text
    (b'{"a": 1e308, "b": -0.0, "c": 123456789012345678901234567890}', {"a": 1e308, "b": -0.0, "c": 123456789012345678901234567890}),
    (b'{"a": [[1], [2], {"b": [3]}]}', {"a": [[1], [2], {"b": [3]}]}),
])
def test_accepted_bodies(raw: bytes, expected: dict) -> None:
    assert parse_json_object(raw) == expected


def test_depth_limit_is_exact() -> None:
    assert parse_json_object(_nested(MAX_JSON_DEPTH))
    with pytest.raises(APIError):
        parse_json_object(_nested(MAX_JSON_DEPTH + 1))
    wide = json.dumps({"a": [[i] for i in range(1000)]}).encode()  # many brackets, shallow
    assert len(parse_json_object(wide)["a"]) == 1000


def test_admission_queues_in_order_and_refuses_beyond_the_queue() -> None:
    async def scenario() -> list[str]:
        gate, order = Admission(1, 2, 10.0), []
        await gate.acquire()

        async def waiter(name: str) -> None:
            await gate.acquire()
            order.append(name)

        first, second = asyncio.create_task(waiter("first")), asyncio.create_task(waiter("second"))
        await asyncio.sleep(0)
        with pytest.raises(APIError) as info:
            await gate.acquire()
        assert info.value.status == 429
        gate.release()
        await first
        gate.release()
        await second
        gate.release()
        await gate.acquire()  # the slot is free again, with nobody queued
        return order

    assert asyncio.run(scenario()) == ["first", "second"]


def test_admission_timeout_and_cancel_leave_no_slot_behind() -> None:
    async def scenario() -> None:
        gate = Admission(1, 4, 0.05)
        await gate.acquire()
        with pytest.raises(APIError) as info:
            await gate.acquire()
        assert info.value.status == 408
        leaving = asyncio.create_task(gate.acquire())
        await asyncio.sleep(0)
        leaving.cancel()
        await asyncio.gather(leaving, return_exceptions=True)
        assert gate.num_queued == 0
        gate.release()
        await asyncio.wait_for(gate.acquire(), 1.0)  # the one slot came back
        # Cancelled just as the slot was handed over: the slot goes on, not lost.
        handed = asyncio.create_task(gate.acquire())
        await asyncio.sleep(0)
        gate.release()
        handed.cancel()
        await asyncio.gather(handed, return_exceptions=True)
        await asyncio.wait_for(gate.acquire(), 1.0)

    asyncio.run(scenario())
