"""Fuzzing the server with schemathesis against its own OpenAPI schema (loopback only).

Every operation gets schema-conforming requests (positive mode) and schema-violating ones
(negative mode). Whatever comes in, the server must answer without a 5xx, every 4xx must be an
OpenAI-shaped error, and the server keeps serving afterwards. A short context (64 tokens) bounds
the work each generated request can ask for; the number of examples is bounded and derandomized
so the run is reproducible."""
import httpx
import pytest
import schemathesis
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

from test_serve_api import ServerThread, build_model_dir, make_server, wait_until

EXAMPLES = {"POST": 30, "GET": 8}


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    folder = build_model_dir(tmp_path_factory.mktemp("fuzz") / "tiny")
    with ServerThread(make_server(folder, max_model_len=64, max_num_seqs=16)) as s:
        yield s
    torch.set_num_threads(n)


def _operations(url):
    schema = schemathesis.openapi.from_url(url + "/openapi.json")
    ops = [r.ok() for r in schema.get_all_operations()]
    assert {f"{o.method.upper()} {o.path}" for o in ops} >= {
        "POST /v1/chat/completions", "POST /v1/completions", "GET /v1/models", "POST /tokenize", "POST /detokenize"}
    return ops


def _check(case, url, seen):
    r = case.call(base_url=url, timeout=120)
    seen.append(r.status_code)
    assert r.status_code < 500, f"{case.method} {case.path} -> {r.status_code}: {r.text[:500]}\nbody: {case.body!r}"
    if r.status_code >= 400:
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and isinstance(err["message"], str)


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=["positive", "negative"])
def test_fuzz_no_server_errors(srv, mode):
    seen = []
    for op in _operations(srv.url):
        if mode == GenerationMode.NEGATIVE and op.method.upper() != "POST":
            continue  # nothing to violate in a GET without a body (hypothesis would find no example)
        @settings(max_examples=EXAMPLES.get(op.method.upper(), 8), deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(case=op.as_strategy(generation_mode=mode), served=st.booleans())
        def run(case, served):
            if served and isinstance(case.body, dict) and "model" in case.body:
                case.body["model"] = "tiny"  # reach the engine, not only the unknown-model 404
            _check(case, srv.url, seen)

        run()
    assert seen, "no request was generated"
    if mode == GenerationMode.NEGATIVE:
        assert any(400 <= s < 500 for s in seen)  # invalid requests were generated, and refused
    # still serving, and no engine request left behind
    r = httpx.post(srv.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2})
    assert r.status_code == 200
    e = srv.server.engine
    wait_until(lambda: e.stats().num_running == 0, what="the engine to go idle")
    assert e.stats().num_running == 0 and e.alloc.num_used() == 0
    assert srv.server.aengine.failures == 0
