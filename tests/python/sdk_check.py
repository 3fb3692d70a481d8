"""The official OpenAI Python SDK against a running arkor-edge.

Environment: EDGE_BASE_URL (e.g. http://127.0.0.1:PORT/v1), KEYED_HOST and KEYED_KEY (a
fixed_api_key deployment), KEYED_MODEL (its pinned model), OPEN_HOST (an authMode "none"
deployment) and UNKNOWN_HOST (no deployment). Exits non-zero on the first failed check.
"""

import os
import sys

import openai

BASE = os.environ["EDGE_BASE_URL"]
KEYED_HOST = os.environ["KEYED_HOST"]
KEY = os.environ["KEYED_KEY"]
MODEL = os.environ["KEYED_MODEL"]
OPEN_HOST = os.environ["OPEN_HOST"]
UNKNOWN_HOST = os.environ["UNKNOWN_HOST"]

MESSAGES = [{"role": "user", "content": "hello from the python sdk"}]
checks = 0


def check(cond, what):
    global checks
    if not cond:
        print(f"FAILED: {what}", file=sys.stderr)
        sys.exit(1)
    checks += 1


def client(host, key):
    # max_retries=0: a refused request must surface as its error at once.
    return openai.OpenAI(base_url=BASE, api_key=key, default_headers={"Host": host}, max_retries=0)


keyed = client(KEYED_HOST, KEY)

# Non-streamed: the model the client names is ignored; the deployment's pinned model answers.
r = keyed.chat.completions.create(model="gpt-4o", messages=MESSAGES)
check(r.choices[0].message.content == "hello from the python sdk", f"content {r.choices[0].message.content!r}")
check(r.model == MODEL, f"model {r.model!r}")
check(r.usage.completion_tokens == 5, f"usage {r.usage}")

# Streamed, word by word.
stream = keyed.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True)
parts = [c.choices[0].delta.content or "" for c in stream if c.choices]
check("".join(parts) == "hello from the python sdk", f"stream text {parts!r}")
check(len([p for p in parts if p]) == 5, f"stream chunks {parts!r}")

# Streamed with usage.
stream = keyed.chat.completions.create(
    model="x", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
)
usage = [c.usage for c in stream if c.usage is not None]
check(len(usage) == 1 and usage[0].completion_tokens == 5, f"stream usage {usage!r}")

# The model list holds the deployment's target.
models = [m.id for m in keyed.models.list()]
check(models == [MODEL], f"models {models!r}")

# A wrong key is an AuthenticationError with the SPEC's code.
try:
    client(KEYED_HOST, "ark_live_wrongwrongwrongwrongwrong00").chat.completions.create(
        model="x", messages=MESSAGES
    )
    check(False, "wrong key accepted")
except openai.AuthenticationError as e:
    check(e.status_code == 401, f"status {e.status_code}")
    check(e.code == "invalid_api_key", f"code {e.code!r}")

# An unknown slug is a NotFoundError.
try:
    client(UNKNOWN_HOST, KEY).chat.completions.create(model="x", messages=MESSAGES)
    check(False, "unknown slug served")
except openai.NotFoundError as e:
    check(e.status_code == 404, f"status {e.status_code}")
    check(e.code == "deployment_not_found", f"code {e.code!r}")

# A public deployment needs no key (the SDK still wants a non-empty one).
r = client(OPEN_HOST, "not-needed").chat.completions.create(model="x", messages=MESSAGES)
check(r.choices[0].message.content == "hello from the python sdk", "open deployment answer")

print(f"sdk: {checks} checks passed")
