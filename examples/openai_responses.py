"""The Responses API through clawbus with the official OpenAI Python client: text,
a conversation continued with previous_response_id, streaming events, and function
calling. Only the base URL and key differ from OpenAI.

    CLAWBUS_BASE_URL=http://127.0.0.1:8080/v1 CLAWBUS_TOKEN=... python3 openai_responses.py

Prints one JSON object with what happened.
"""
import json
import os

from openai import OpenAI

client = OpenAI(
    base_url=os.environ.get("CLAWBUS_BASE_URL", "http://127.0.0.1:8080/v1"),
    api_key=os.environ["CLAWBUS_TOKEN"],
)
out = {}

# Text, then the same conversation continued by the server.
first = client.responses.create(model="clawbus", input="Tell me a story about a lighthouse.")
out["text"] = first.output_text
out["status"] = first.status
out["usage_total"] = first.usage.total_tokens
second = client.responses.create(
    model="clawbus", previous_response_id=first.id, input="And what happened next?"
)
out["continued"] = second.output_text
out["same_session"] = second.id.rsplit("_", 1)[0] == first.id.rsplit("_", 1)[0]

# Streaming: typed events.
kinds, pieces, final = [], [], None
with client.responses.stream(model="clawbus", input="Stream a short poem.") as stream:
    for event in stream:
        kinds.append(event.type)
        if event.type == "response.output_text.delta":
            pieces.append(event.delta)
    final = stream.get_final_response()
out["streamed"] = "".join(pieces)
out["streamed_final"] = final.output_text
out["event_kinds"] = sorted(set(kinds))

# Function calling: the model's calls come back as output items; their outputs go
# back as function_call_output items.
tools = [
    {
        "type": "function",
        "name": "get_weather",
        "description": "The current weather of a city",
        "parameters": {
            "type": "object",
            "properties": {"location": {"type": "string"}},
            "required": ["location"],
            "additionalProperties": False,
        },
    }
]
inputs = [{"role": "user", "content": "What is the weather like in Rome?"}]
r = client.responses.create(model="clawbus", input=inputs, tools=tools)
inputs += r.output
calls = [item for item in r.output if item.type == "function_call"]
out["calls"] = [{"name": c.name, "arguments": c.arguments} for c in calls]
for c in calls:
    location = json.loads(c.arguments)["location"]
    inputs.append(
        {"type": "function_call_output", "call_id": c.call_id, "output": f"cloudy in {location}"}
    )
r = client.responses.create(model="clawbus", input=inputs, tools=tools)
out["tool_answer"] = r.output_text

print(json.dumps(out))
