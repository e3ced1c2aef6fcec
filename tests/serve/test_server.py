"""The real server (`moekit serve`, a subprocess on 127.0.0.1) on the bundled tiny model, driven
with the official `openai` client: completions and chat, streamed and not, n, stop strings,
usage; concurrent requests equal sequential greedy ones; every bad request gets its 4xx in
OpenAI's shape and the server keeps answering; a client gone mid-stream frees its KV blocks."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest
import torch

import moekit

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

# a small template in the usual shape, so the bundled model (which has none) can chat
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A `moekit serve` subprocess; stopped by `close`."""

    def __init__(self, model_dir, *flags: str):
        self.port = _free_port()
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the CPU path, not the interpreter
        self.log = open(model_dir / f"server-{self.port}.log", "w")  # noqa: SIM115 - open while the server runs
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moekit.cli", "serve", str(model_dir), "--port", str(self.port),
             "--threads", "1", *flags], env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited: {(model_dir / f'server-{self.port}.log').read_text()}")
            try:
                if self.get("/health")[0] == 200:
                    return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError("the server did not answer /health within 120 s")

    def request(self, method: str, path: str, body: bytes | None = None) -> tuple[int, str]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        conn.request(method, path, body=body, headers={"content-type": "application/json"})
        response = conn.getresponse()
        out = response.status, response.read().decode()
        conn.close()
        return out

    def get(self, path: str) -> tuple[int, str]:
        return self.request("GET", path)

    def metrics(self) -> dict[str, float]:
        text = self.get("/metrics")[1]
        return {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
                if line and not line.startswith("#")}

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """The bundled model with a chat template added."""
    path = tmp_path_factory.mktemp("served") / "tiny-moe"
    shutil.copytree(moekit.default_model_path(), path)
    config = json.loads((path / "tokenizer_config.json").read_text())
    config["chat_template"] = CHAT_TEMPLATE
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def server(model_dir):
    s = Server(model_dir, "--max-seqs", "8", "--max-step-tokens", "64")
    yield s
    s.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def local(model_dir):
    """The same model in this process, and its tokenizer: the reference."""
    return moekit.load_model(model_dir), moekit.load_tokenizer(model_dir)


def _alone_text(local, ids: list[int], max_tokens: int) -> tuple[str, str]:
    """Returns (text, finish reason) of greedy generation of ids alone, stopping at eos."""
    model, tok = local
    eos = model.generation_defaults.get("eos_token_ids", ())
    out = model.generate([ids], max_new_tokens=max_tokens, temperature=0)[0].tolist()
    reason = "stop" if out[-1] in eos else "length"
    return tok.decode([t for t in out if t not in eos]), reason


PROMPTS = ["Once upon a time", "def fibonacci(n):", "The", "import torch\nimport numpy as np\n\nclass Model:",
           "x = 1\ny = 2\nprint(x + y)\n# the sum is", "Hello"]


# ---- endpoints -----------------------------------------------------------------------------

def test_models_and_health(server, client):
    models = client.models.list().data
    assert [m.id for m in models] == ["tiny-moe"] and models[0].owned_by == "moekit"
    status, body = server.get("/health")
    assert status == 200 and json.loads(body)["status"] == "ok"


def test_completion_equals_generate(client, local):
    for prompt in PROMPTS[:3]:
        r = client.completions.create(model="tiny-moe", prompt=prompt, max_tokens=12, temperature=0)
        text, reason = _alone_text(local, local[1].encode(prompt), 12)
        assert r.choices[0].text == text and r.choices[0].finish_reason == reason
        assert r.usage.prompt_tokens == len(local[1].encode(prompt))
        assert r.usage.completion_tokens == 12 if reason == "length" else r.usage.completion_tokens <= 12
        assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_streamed_completion_equals_unstreamed(client):
    kwargs = {"model": "tiny-moe", "prompt": PROMPTS[1], "max_tokens": 20, "temperature": 0}
    whole = client.completions.create(**kwargs)
    chunks = list(client.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == whole.usage.total_tokens


def test_chat_uses_the_template(client, local):
    tok = local[1]
    messages = [{"role": "user", "content": "Write a function"}]
    r = client.chat.completions.create(model="tiny-moe", messages=messages, max_tokens=10, temperature=0)
    ids = tok.encode(tok.apply_chat_template(messages), add_special_tokens=False)
    text, reason = _alone_text(local, ids, 10)
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == text
    assert r.choices[0].finish_reason == reason and r.usage.prompt_tokens == len(ids)
    stream = client.chat.completions.create(model="tiny-moe", messages=messages, max_tokens=10, temperature=0,
                                            stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text


def test_n_and_seed(client, local):
    kwargs = {"model": "tiny-moe", "prompt": "The", "max_tokens": 8, "temperature": 1.0, "seed": 7, "n": 3}
    a = client.completions.create(**kwargs)
    b = client.completions.create(**kwargs)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]  # seeded: reproducible
    assert len({c.text for c in a.choices}) > 1  # the n samples differ
    assert a.usage.prompt_tokens == len(local[1].encode("The"))  # the prompt counts once, not per choice
    assert 3 <= a.usage.completion_tokens <= 3 * 8


def test_prompt_list_gives_a_choice_each(client, local):
    r = client.completions.create(model="tiny-moe", prompt=PROMPTS[:3], max_tokens=6, temperature=0)
    assert [c.text for c in r.choices] == [_alone_text(local, local[1].encode(p), 6)[0] for p in PROMPTS[:3]]
    assert r.usage.prompt_tokens == sum(len(local[1].encode(p)) for p in PROMPTS[:3])


def test_stop_string_cuts_the_text(client):
    free = client.completions.create(model="tiny-moe", prompt=PROMPTS[3], max_tokens=30, temperature=0)
    text = free.choices[0].text
    stop = text[len(text) // 2: len(text) // 2 + 3]
    assert stop and stop in text
    cut = text[:text.index(stop)]
    for stream in (False, True):
        r = client.completions.create(model="tiny-moe", prompt=PROMPTS[3], max_tokens=30, temperature=0,
                                      stop=[stop, "never appears"], stream=stream)
        if stream:
            chunks = list(r)
            assert "".join(c.choices[0].text for c in chunks) == cut
            assert chunks[-1].choices[0].finish_reason == "stop"
        else:
            assert r.choices[0].text == cut and r.choices[0].finish_reason == "stop"
    r = client.completions.create(model="tiny-moe", prompt=PROMPTS[3], max_tokens=30, temperature=0, stop=[""])
    assert r.choices[0].text == text  # an empty stop string stops nothing


def test_logprobs(client, local):
    model, tok = local
    ids = tok.encode(PROMPTS[1])
    with torch.no_grad():
        first = torch.log_softmax(model(torch.tensor([ids]))[0, -1].float(), dim=-1)
    r = client.completions.create(model="tiny-moe", prompt=PROMPTS[1], max_tokens=6, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == r.usage.completion_tokens
    assert lp.token_logprobs[0] == pytest.approx(float(first.max()), abs=1e-4)
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert len(top) == 3 and chosen == pytest.approx(max(top.values()))  # greedy takes the top one
    assert "".join(lp.tokens) == r.choices[0].text or r.choices[0].finish_reason == "stop"
    streamed = list(client.completions.create(model="tiny-moe", prompt=PROMPTS[1], max_tokens=6, temperature=0,
                                              logprobs=3, stream=True))
    assert [x for c in streamed for x in c.choices[0].logprobs.token_logprobs] == pytest.approx(lp.token_logprobs)
    chat = client.chat.completions.create(model="tiny-moe", messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=4, temperature=0, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens and all(len(c.top_logprobs) == 2 for c in content)
    assert all(c.logprob == pytest.approx(c.top_logprobs[0].logprob) for c in content)


# ---- concurrency ---------------------------------------------------------------------------

def test_sixteen_concurrent_requests_equal_sequential(server, client):
    prompts = [(PROMPTS[i % len(PROMPTS)] + " " + "word " * i) for i in range(16)]  # lengths differ
    sequential = [client.completions.create(model="tiny-moe", prompt=p, max_tokens=12, temperature=0)
                  .choices[0].text for p in prompts]

    async def together():
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0) as c:
            rs = await asyncio.gather(*(c.completions.create(model="tiny-moe", prompt=p, max_tokens=12, temperature=0)
                                        for p in prompts))
            return [r.choices[0].text for r in rs]

    assert asyncio.run(together()) == sequential
    assert server.metrics()["moekit_kv_blocks_used"] == 0


def test_bounded_load(server):
    """48 requests, 12 in flight, within 120 s: reports requests/s and latency percentiles; none lost."""

    async def load():
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0) as c:
            limit = asyncio.Semaphore(12)

            async def one(i):
                async with limit:
                    t0 = time.perf_counter()
                    r = await c.completions.create(model="tiny-moe", prompt=PROMPTS[i % len(PROMPTS)],
                                                   max_tokens=8 + i % 5, temperature=0.7, seed=i)
                    return time.perf_counter() - t0, r

            t0 = time.perf_counter()
            done = await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(48))), timeout=120)
            return time.perf_counter() - t0, done

    wall, done = asyncio.run(load())
    latencies = sorted(t for t, _ in done)
    p50, p99 = latencies[len(latencies) // 2], latencies[int(0.99 * (len(latencies) - 1))]
    print(f"\nload: {len(done) / wall:.1f} req/s, latency p50 {p50 * 1e3:.0f} ms, p99 {p99 * 1e3:.0f} ms")
    assert len(done) == 48
    for _, r in done:
        assert r.choices[0].finish_reason in ("stop", "length") and r.usage.completion_tokens >= 1


# ---- bad requests --------------------------------------------------------------------------

BAD_BODIES = [
    (b"{not json", 400, "malformed JSON"),
    (b'{"prompt": "x", "max_tokens": "5"}', 400, "max_tokens"),
    (b'{"prompt": 5}', 400, "prompt"),
    (b'{"max_tokens": 5}', 400, "prompt"),
    (b'{"prompt": "x", "max_tokens": -1}', 400, "max_tokens must be >= 1"),
    (b'{"prompt": "x", "model": "gpt-4"}', 404, "does not exist"),
    (b'{"prompt": "x", "n": 0}', 400, "n must be in"),
    (b'{"prompt": "x", "temperature": -2}', 400, "temperature must be >= 0"),
    (b'{"prompt": "x", "top_p": 2.0}', 400, "top_p must be in"),
    (b'{"prompt": "x", "max_tokens": 100000}', 400, "exceeds the model's context"),
    (b'{"prompt": [[5, 999999]]}', 400, "token ids must be in"),
    (b'{"prompt": ""}', 400, "no tokens"),
    (b'{"prompt": "x", "logprobs": 50}', 400, "logprobs must be in 0..20"),
    (b'{"prompt": "x", "seed": 36893488147419103232}', 400, "seed must fit in 64 bits"),
    (b'{"prompt": "x", "n": 2.5}', 400, "n"),
    (b'{"messages": []}', 400, "prompt"),
]


@pytest.mark.parametrize("body, status, match", BAD_BODIES)
def test_bad_request_gets_openai_error(server, body, status, match):
    code, text = server.request("POST", "/v1/completions", body)
    error = json.loads(text)["error"]
    assert code == status and match in error["message"]
    assert set(error) == {"message", "type", "param", "code"}


def test_bad_requests_through_the_client_and_the_server_lives_on(client):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="context"):
        client.completions.create(model="tiny-moe", prompt="x " * 600, max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="messages"):
        client.chat.completions.create(model="tiny-moe", messages=[], max_tokens=2)
    r = client.completions.create(model="tiny-moe", prompt="Hello", max_tokens=3, temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length")


def test_disconnect_mid_stream_frees_blocks(server):
    before = server.metrics()["moekit_requests_aborted_total"]
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    body = json.dumps({"prompt": PROMPTS[0], "max_tokens": 400, "temperature": 0.8, "seed": 1, "stream": True})
    conn.request("POST", "/v1/completions", body=body, headers={"content-type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200
    assert response.readline().startswith(b"data: ")  # it is generating
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        m = server.metrics()
        if m["moekit_requests_aborted_total"] > before and m["moekit_kv_blocks_used"] == 0:
            break
        time.sleep(0.1)
    assert m["moekit_requests_aborted_total"] == before + 1
    assert m["moekit_kv_blocks_used"] == 0 and m["moekit_running_sequences"] == 0


def test_metrics_count_requests_and_tokens(server, client):
    before = server.metrics()
    client.completions.create(model="tiny-moe", prompt="Hello", max_tokens=5, temperature=0)
    after = server.metrics()
    assert after["moekit_requests_finished_total"] == before["moekit_requests_finished_total"] + 1
    assert 1 <= after["moekit_generation_tokens_total"] - before["moekit_generation_tokens_total"] <= 5
    assert after["moekit_queue_depth"] == 0 and after["moekit_kv_blocks_total"] > 0
    assert after["moekit_time_to_first_token_seconds_sum"] > before["moekit_time_to_first_token_seconds_sum"]
    assert after["moekit_inter_token_count_total"] - before["moekit_inter_token_count_total"] == \
        after["moekit_generation_tokens_total"] - before["moekit_generation_tokens_total"] - 1


def test_full_queue_gets_429(model_dir):
    """One running sequence and one queued at most: a burst gets 429s, the admitted ones finish."""
    s = Server(model_dir, "--max-seqs", "1", "--max-waiting", "1")
    try:
        async def burst():
            async with openai.AsyncOpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0) as c:
                return await asyncio.gather(*(c.completions.create(model="tiny-moe", prompt="Hello", max_tokens=40,
                                                                   temperature=0) for _ in range(8)),
                                            return_exceptions=True)

        results = asyncio.run(burst())
        limited = [r for r in results if isinstance(r, openai.RateLimitError)]
        ok = [r for r in results if not isinstance(r, Exception)]
        assert limited and ok and len(limited) + len(ok) == 8
        assert s.get("/health")[0] == 200
    finally:
        s.close()


def test_disconnect_before_a_full_response_frees_blocks(server):
    """A non-streamed request whose client goes away is aborted too (checked while tokens flow)."""
    before = server.metrics()["moekit_requests_aborted_total"]
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    body = json.dumps({"prompt": PROMPTS[0], "max_tokens": 480, "temperature": 0.8, "seed": 2})
    conn.request("POST", "/v1/completions", body=body, headers={"content-type": "application/json"})
    deadline = time.monotonic() + 10
    while server.metrics()["moekit_running_sequences"] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        m = server.metrics()
        if m["moekit_requests_aborted_total"] > before and m["moekit_kv_blocks_used"] == 0:
            break
        time.sleep(0.1)
    assert m["moekit_requests_aborted_total"] == before + 1 and m["moekit_kv_blocks_used"] == 0
