"""The official OpenAI Python SDK through arkor-edge to a real llama-server (tests/llama_server.rs).

Environment: EDGE_BASE_URL (e.g. http://127.0.0.1:PORT/v1); A_HOST, B_HOST and BASE_HOST, the
deployments pinned to adapter A (says "alpha"), adapter B ("bravo") and the base model ("plain");
A_MODEL, A's target id. Every call also tries to reach the other adapter through `model` and
`lora` (extra_body). Exits non-zero on the first failed check.
"""

import os
import sys

import openai

BASE = os.environ["EDGE_BASE_URL"]
MESSAGES = [{"role": "user", "content": "say something"}]
TOKENS = 4
checks = 0


def check(cond, what):
    global checks
    if not cond:
        print(f"FAILED: {what}", file=sys.stderr)
        sys.exit(1)
    checks += 1


def client(host):
    return openai.OpenAI(base_url=BASE, api_key="not-needed", default_headers={"Host": host}, max_retries=0)


def only(text, word):
    words = (text or "").split()
    return len(words) == TOKENS and all(w == word for w in words)


def create(host, other_id, **kw):
    """A chat completion that asks, every way the SDK allows, for adapter `other_id` at full scale."""
    return client(host).chat.completions.create(
        model="job-b:step-3" if other_id == 1 else "job-a",
        messages=MESSAGES,
        max_tokens=TOKENS,
        temperature=0,
        extra_body={"lora": [{"id": other_id, "scale": 1.0}]},
        **kw,
    )


for host, word, other in [
    (os.environ["A_HOST"], "alpha", 1),
    (os.environ["B_HOST"], "bravo", 0),
    (os.environ["BASE_HOST"], "plain", 0),
]:
    # Non-streamed.
    r = create(host, other)
    text = r.choices[0].message.content
    check(only(text, word), f"{host}: content {text!r}")
    check(r.usage.completion_tokens == TOKENS, f"{host}: usage {r.usage}")

    # Streamed: one token per chunk, no usage chunk unless asked for.
    chunks = list(create(host, other, stream=True))
    parts = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    check(only("".join(parts), word), f"{host}: stream {parts!r}")
    check(len(parts) == TOKENS, f"{host}: stream chunks {parts!r}")
    check(all(c.usage is None for c in chunks), f"{host}: unasked usage chunk")

    # Streamed with usage.
    chunks = list(create(host, other, stream=True, stream_options={"include_usage": True}))
    usage = [c.usage for c in chunks if c.usage is not None]
    check(len(usage) == 1 and usage[0].completion_tokens == TOKENS, f"{host}: stream usage {usage!r}")

# The model list holds the deployment's target, whatever the server calls its model.
models = [m.id for m in client(os.environ["A_HOST"]).models.list()]
check(models == [os.environ["A_MODEL"]], f"models {models!r}")

print(f"llama sdk: {checks} checks passed")
