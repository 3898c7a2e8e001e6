"""Drives a running clawbus gateway with the official OpenAI Python client.

Reads CLAWBUS_BASE_URL and CLAWBUS_TOKEN; prints one JSON object with what it saw.
"""
import json
import os

import openai
from openai import OpenAI

client = OpenAI(base_url=os.environ["CLAWBUS_BASE_URL"], api_key=os.environ["CLAWBUS_TOKEN"], max_retries=0)
out = {"version": openai.__version__}

r = client.chat.completions.create(model="clawbus", messages=[{"role": "user", "content": "first"}], user="py")
out["plain"] = r.choices[0].message.content
out["usage_total"] = r.usage.total_tokens
out["finish"] = r.choices[0].finish_reason

stream = client.chat.completions.create(
    model="clawbus",
    messages=[{"role": "user", "content": "second streamed"}],
    user="py",
    stream=True,
    stream_options={"include_usage": True},
)
pieces, usage = [], None
for chunk in stream:
    if chunk.choices and chunk.choices[0].delta.content:
        pieces.append(chunk.choices[0].delta.content)
    if chunk.usage:
        usage = chunk.usage.total_tokens
out["streamed"] = "".join(pieces)
out["streamed_usage_total"] = usage
out["models"] = [m.id for m in client.models.list()]

try:
    client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
except openai.NotFoundError as e:
    out["unknown_model"] = e.status_code
try:
    OpenAI(base_url=os.environ["CLAWBUS_BASE_URL"], api_key="wrong", max_retries=0).models.list()
except openai.AuthenticationError as e:
    out["bad_key"] = e.status_code

print(json.dumps(out))
