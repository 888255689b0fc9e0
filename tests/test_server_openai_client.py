"""The official ``openai`` client talks to the server: chat and completions, streamed or not."""

from __future__ import annotations

import openai
import pytest
from pdserve.tests.support.hf_oracle import HFOracle
from pdserve.tests.support.server_process import ServerProcess

MAX_TOKENS = 10
MESSAGES = [{"role": "user", "content": "Where is the nearest train station?"}]
PROMPT = "Once upon a time, in a village between two rivers,"


@pytest.fixture(scope="module")
def client(main_server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=main_server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture
def chat_text(oracle: HFOracle) -> str:
    return oracle.decode(oracle.greedy(oracle.chat_ids(MESSAGES), MAX_TOKENS))


@pytest.fixture
def completion_text(oracle: HFOracle) -> str:
    return oracle.decode(oracle.greedy(oracle.text_ids(PROMPT), MAX_TOKENS))


def test_chat(client: openai.OpenAI, main_server: ServerProcess, chat_text: str) -> None:
    resp = client.chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=MAX_TOKENS, temperature=0, extra_body={"ignore_eos": True}
    )
    assert resp.choices[0].message.content == chat_text
    assert resp.choices[0].finish_reason == "length"
    assert resp.usage.completion_tokens == MAX_TOKENS


def test_chat_stream(client: openai.OpenAI, main_server: ServerProcess, chat_text: str) -> None:
    stream = client.chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=MAX_TOKENS, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == chat_text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == MAX_TOKENS


def test_completion(client: openai.OpenAI, main_server: ServerProcess, completion_text: str) -> None:
    resp = client.completions.create(
        model="tiny", prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0, extra_body={"ignore_eos": True}
    )
    assert resp.choices[0].text == completion_text
    assert resp.choices[0].finish_reason == "length"


def test_completion_stream(client: openai.OpenAI, main_server: ServerProcess, completion_text: str) -> None:
    stream = client.completions.create(
        model="tiny", prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0, stream=True, extra_body={"ignore_eos": True}
    )
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks) == completion_text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_errors_surface_as_openai_exceptions(client: openai.OpenAI, main_server: ServerProcess) -> None:
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt=PROMPT, max_tokens=2)
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2, top_p=1.5)
    assert info.value.body["param"] == "top_p"


def test_models_list(client: openai.OpenAI, main_server: ServerProcess) -> None:
    assert [m.id for m in client.models.list()] == ["tiny"]
