"""The `openai` Python SDK through `pdx serve` (issue 14, "The first hour").

Starts two `pdx mock` engines (prefill and decode, each with `--api-key`, as vLLM would be) and `pdx serve`
in front of them with the same `--api-key`, then drives the router with the SDK: `models.list()`,
`models.retrieve()`, chat and text completions, streamed usage (`stream_options={"include_usage": True}`),
and the SDK's error classes for a wrong key (401) and a bad request (400, refused by the router before any
worker sees it).

The binary is `$PDX_BIN` (default `target/debug/pdx` under the repository root). Every process listens on
127.0.0.1 and is killed when the module's tests end, whatever their outcome. Run with `tests/python/run.sh`.
"""

import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import openai
import pytest

ROOT = Path(__file__).resolve().parents[2]
PDX_BIN = os.environ.get("PDX_BIN", str(ROOT / "target" / "debug" / "pdx"))
KEY = "sk-pdx-sdk-test"
# A generous guard against a hang, not a speed assertion.
START_TIMEOUT_S = 30.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, procs: list, deadline: float) -> None:
    """Waits until `url` answers 200 (a started process that exits fails the wait at once)."""
    while True:
        for p in procs:
            if p.poll() is not None:
                raise RuntimeError(f"{p.args} exited with {p.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, OSError):
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} never answered 200")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def router_url():
    if not os.access(PDX_BIN, os.X_OK):
        pytest.fail(f"no pdx binary at {PDX_BIN}: build it (cargo build --bin pdx) or set PDX_BIN")
    procs: list = []
    try:
        ports = {}
        for role in ("prefill", "decode"):
            ports[role] = free_port()
            procs.append(
                subprocess.Popen(
                    [PDX_BIN, "mock", "--role", role, "--host", "127.0.0.1", "--port", str(ports[role]),
                     "--instant", "--api-key", KEY],
                    stdout=subprocess.DEVNULL,
                )
            )
        port = free_port()
        procs.append(
            subprocess.Popen(
                [PDX_BIN, "serve", "--host", "127.0.0.1", "--port", str(port), "--threads", "1",
                 "--prefill", f"http://127.0.0.1:{ports['prefill']}",
                 "--decode", f"http://127.0.0.1:{ports['decode']}",
                 "--api-key", KEY],
                stdout=subprocess.DEVNULL,
            )
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        for p in ports.values():
            wait_http(f"http://127.0.0.1:{p}/health", procs, deadline)
        base = f"http://127.0.0.1:{port}"
        wait_http(f"{base}/ready", procs, deadline)
        yield base
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait(timeout=10)


@pytest.fixture
def client(router_url):
    return openai.OpenAI(base_url=f"{router_url}/v1", api_key=KEY, max_retries=0, timeout=30)


def test_models_list_and_retrieve(client):
    # The router fetches the workers' own lists in its control loop: give it a moment after start.
    deadline = time.monotonic() + START_TIMEOUT_S
    ids = []
    while time.monotonic() < deadline:
        ids = [m.id for m in client.models.list()]
        if ids:
            break
        time.sleep(0.05)
    assert ids == ["mock"]
    m = client.models.retrieve("mock")
    assert (m.id, m.object, m.owned_by) == ("mock", "model", "pdx-mock")
    assert isinstance(m.created, int)
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def test_wrong_or_missing_key_is_401(router_url):
    for key in ("sk-wrong", "x"):
        bad = openai.OpenAI(base_url=f"{router_url}/v1", api_key=key, max_retries=0, timeout=30)
        with pytest.raises(openai.AuthenticationError) as e:
            bad.chat.completions.create(model="mock", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        assert e.value.status_code == 401
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()


def test_chat_completion(client):
    r = client.chat.completions.create(
        model="mock", messages=[{"role": "user", "content": "hello there"}], max_tokens=5,
    )
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 5
    assert r.usage.prompt_tokens > 0


def test_streamed_chat_with_usage(client):
    stream = client.chat.completions.create(
        model="mock", messages=[{"role": "user", "content": "stream please"}], max_tokens=7,
        stream=True, stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    assert any(c.choices and c.choices[0].finish_reason == "length" for c in chunks)
    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None and last.usage.completion_tokens == 7
    assert all(c.usage is None for c in chunks[:-1])


def test_text_completion_streamed_usage(client):
    r = client.completions.create(model="mock", prompt="once upon a time", max_tokens=4)
    assert r.choices[0].text and r.usage.completion_tokens == 4
    chunks = list(client.completions.create(
        model="mock", prompt="once upon a time", max_tokens=3, stream=True,
        stream_options={"include_usage": True},
    ))
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 3


def test_bad_request_is_400(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="mock", messages=[{"role": "user", "content": "x"}], max_tokens=0)
    assert e.value.status_code == 400
    assert "max_tokens must be at least 1" in str(e.value)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="mock", messages=[{"role": "user", "content": "x"}], temperature=3)
