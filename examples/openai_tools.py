"""Function calling through clawbus with the official OpenAI Python client.

The client brings its own function (`get_weather`); the agent's model decides to
call it, the client runs it and sends the result back, and the model answers.
Plain and streamed, exactly as with OpenAI: only the base URL and key differ.

    CLAWBUS_BASE_URL=http://127.0.0.1:8080/v1 CLAWBUS_TOKEN=... python3 openai_tools.py

Prints one JSON object with what happened.
"""
import json
import os

from openai import OpenAI

client = OpenAI(
    base_url=os.environ.get("CLAWBUS_BASE_URL", "http://127.0.0.1:8080/v1"),
    api_key=os.environ["CLAWBUS_TOKEN"],
)

tools = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The current weather of a city",
            "parameters": {
                "type": "object",
                "properties": {"location": {"type": "string", "description": "City name"}},
                "required": ["location"],
                "additionalProperties": False,
            },
        },
    }
]


def get_weather(location):
    return f"sunny, 21 C in {location}"


def run_calls(messages, calls):
    for call in calls:
        args = json.loads(call["arguments"])
        messages.append(
            {"role": "tool", "tool_call_id": call["id"], "content": get_weather(**args)}
        )


out = {}

# Plain: the model's message (with its tool_calls) goes back as it came.
messages = [{"role": "user", "content": "What is the weather like in Paris today?"}]
first = client.chat.completions.create(model="clawbus", messages=messages, tools=tools)
choice = first.choices[0]
out["finish"] = choice.finish_reason
out["calls"] = [
    {"id": c.id, "name": c.function.name, "arguments": c.function.arguments}
    for c in choice.message.tool_calls or []
]
messages.append(choice.message)
run_calls(messages, out["calls"])
final = client.chat.completions.create(model="clawbus", messages=messages, tools=tools)
out["answer"] = final.choices[0].message.content
out["final_finish"] = final.choices[0].finish_reason

# Streamed: the calls arrive as delta.tool_calls fragments, put together by index.
messages = [{"role": "user", "content": "And the weather in Lisbon?"}]
calls, finish = {}, None
stream = client.chat.completions.create(
    model="clawbus", messages=messages, tools=tools, stream=True
)
for chunk in stream:
    if not chunk.choices:
        continue
    delta = chunk.choices[0].delta
    for tc in delta.tool_calls or []:
        c = calls.setdefault(tc.index, {"id": "", "name": "", "arguments": ""})
        c["id"] = tc.id or c["id"]
        if tc.function:
            c["name"] += tc.function.name or ""
            c["arguments"] += tc.function.arguments or ""
    finish = chunk.choices[0].finish_reason or finish
streamed = [calls[i] for i in sorted(calls)]
out["streamed_finish"] = finish
out["streamed_calls"] = streamed
messages.append(
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": c["id"], "type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
            for c in streamed
        ],
    }
)
run_calls(messages, streamed)
final = client.chat.completions.create(model="clawbus", messages=messages, tools=tools)
out["streamed_answer"] = final.choices[0].message.content

print(json.dumps(out))
