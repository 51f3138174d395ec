"""`dsv3 serve` as users run it: a separate process, --api-key, and SIGTERM while a stream is in
flight (the stream completes, then the process exits with status 0)."""
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

from dsv3.cli import main
from test_serve_api import build_model_dir


def test_bad_arguments_are_user_errors(tmp_path, capsys):
    assert main(["serve", "--model", str(tmp_path / "missing")]) == 2
    assert "is not a folder" in capsys.readouterr().err
    folder = tmp_path / "no_tok"
    folder.mkdir()
    assert main(["serve", "--model", str(folder)]) == 2
    assert "tokenizer.json" in capsys.readouterr().err


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def proc(tmp_path):
    folder = build_model_dir(tmp_path / "tiny")
    port = _free_port()
    p = subprocess.Popen([sys.executable, "-m", "dsv3", "serve", "--model", str(folder), "--port", str(port),
                          "--api-key", "sekrit", "--served-model-name", "tiny", "--max-model-len", "1024",
                          "--cache-memory-mb", "16", "--threads", "1", "--log-level", "warning"],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        assert p.poll() is None, p.stdout.read()
        assert time.monotonic() < deadline, "the server did not come up"
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    yield p, url
    if p.poll() is None:
        p.kill()
        p.wait()


def test_the_built_server_freezes_what_lives_as_long_as_the_process(tmp_path):
    """build_server ends with gc.freeze(): full collections while serving skip the model's objects."""
    import argparse
    import gc

    from dsv3.serve.app import build_server, configure

    p = argparse.ArgumentParser()
    configure(p)
    args = p.parse_args(["--model", str(build_model_dir(tmp_path / "tiny")), "--threads", "1",
                         "--cache-memory-mb", "16"])
    gc.unfreeze()
    try:
        server = build_server(args)
        frozen = gc.get_freeze_count()
        assert frozen > 1000
        # the engine and the model are among the frozen objects: a full collection does not visit them
        seen = set(map(id, gc.get_objects()))
        assert id(server.engine) not in seen and id(server.engine.model) not in seen
    finally:
        gc.unfreeze()


def test_api_key_and_graceful_sigterm(proc):
    p, url = proc
    kw = dict(model="tiny", messages=[{"role": "user", "content": "Speak."}], max_tokens=3)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).chat.completions.create(**kw)
    r = httpx.post(url + "/v1/chat/completions", json=kw)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    client = openai.OpenAI(base_url=url + "/v1", api_key="sekrit", max_retries=0, timeout=300)
    assert client.chat.completions.create(**kw).choices[0].message.role == "assistant"

    # a long stream is in flight when SIGTERM arrives: it must run to its end
    n = 600
    got = {"chunks": 0, "usage": None, "finish": None}
    first = threading.Event()

    def consume():
        s = client.completions.create(model="tiny", prompt="Now is the winter", max_tokens=n, temperature=0,
                                      stream=True, stream_options={"include_usage": True},
                                      extra_body={"ignore_eos": True})
        for ch in s:
            first.set()
            got["chunks"] += 1
            if ch.choices and ch.choices[0].finish_reason:
                got["finish"] = ch.choices[0].finish_reason
            if ch.usage is not None:
                got["usage"] = ch.usage

    t = threading.Thread(target=consume)
    t.start()
    assert first.wait(60)
    p.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    # while it drains, nothing new is served (503, or the listening socket is already closed)
    try:
        r = httpx.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 1},
                       headers={"Authorization": "Bearer sekrit"}, timeout=5)
        assert r.status_code == 503
    except httpx.TransportError:
        pass
    t.join(300)
    assert not t.is_alive()
    assert got["finish"] == "length" and got["usage"].completion_tokens == n
    assert p.wait(60) == 0
    out = p.stdout.read()
    assert "Traceback" not in out, out
