#!/usr/bin/env python3
"""A clawbus channel adapter in Python: the terminal as a chat platform.

It speaks only the published bus schemas (schemas/README.md, "Writing a channel
adapter") with nats-py and msgpack, nothing of clawbus's Rust code:

- every line read from standard input is a direct message from the console's user,
  published to JetStream as an `inbound_message` envelope on
  `claw.v1.in.<channel>.<account>.<chat token>` with the deterministic id
  `<channel>:<account>:<message id>` as `Nats-Msg-Id` (a retried publish is dropped as
  a duplicate);
- replies come from a durable pull consumer of `claw.v1.out.<channel>.<account>` on
  stream `CLAW_OUT`; each is written to standard output as one JSON line, and its
  envelope id recorded in the receipts file (flushed to disk) *before* it is acked, so
  a reply redelivered after a crash of this process is never shown twice.

    NATS_URL=nats://127.0.0.1:4222 python3 examples/console_adapter.py
    hello
    {"reply_to": "console:default:...", "text": "Echo: hello", "last": true, ...}

With `--wait N` it exits once every line it sent has its complete reply, or after N
seconds (then with status 1). The suite's router decides who may talk: give the channel
a policy, e.g. `[channels.console] dm_policy = "open"` or pair the sender.
"""

import argparse
import asyncio
import json
import os
import sys
import time

import msgpack
import nats
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy


def chat_token(chat_id: str) -> str:
    """A chat id as a subject token: 64-bit FNV-1a of its UTF-8 bytes, 16 hex digits."""
    h = 0xCBF29CE484222325
    for b in chat_id.encode():
        h ^= b
        h = (h * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return f"{h:016x}"


def envelope(kind: str, msg_id: str, body: dict) -> bytes:
    """The `{v, kind, id, ts, body}` envelope, as a MessagePack map."""
    return msgpack.packb(
        {"v": 1, "kind": kind, "id": msg_id, "ts": int(time.time() * 1000), "body": body},
        use_bin_type=True,
    )


class Receipts:
    """Envelope ids of the replies shown, kept in a file across restarts."""

    def __init__(self, path: str):
        self.path = path
        self.seen = set()
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                self.seen = {line.strip() for line in f if line.strip()}
        self.file = open(path, "a", encoding="utf-8")

    def __contains__(self, msg_id: str) -> bool:
        return msg_id in self.seen

    def record(self, msg_id: str) -> None:
        self.file.write(msg_id + "\n")
        self.file.flush()
        os.fsync(self.file.fileno())
        self.seen.add(msg_id)


async def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--channel", default="console")
    p.add_argument("--account", default="default")
    p.add_argument("--user", default=os.environ.get("USER", "me"), help="the sender's id")
    p.add_argument("--receipts", default=".console-adapter.receipts")
    p.add_argument("--wait", type=float, default=0, help="exit when every line is answered")
    a = p.parse_args()
    for token in (a.channel, a.account):
        if not token or len(token) > 64 or not all(c.isalnum() or c in "-_" for c in token):
            print(f"{token!r} is not a subject token ([A-Za-z0-9_-]{{1,64}})", file=sys.stderr)
            return 2

    opts = {"servers": os.environ.get("NATS_URL", "nats://127.0.0.1:4222").split(",")}
    if os.environ.get("NATS_USER"):
        opts["user"] = os.environ["NATS_USER"]
        opts["password"] = os.environ.get("NATS_PASSWORD", "")
    nc = await nats.connect(**opts)
    js = nc.jetstream()
    receipts = Receipts(a.receipts)
    chat = a.user
    pending = set()  # envelope ids of our messages still waiting for a last chunk

    durable = f"{a.channel}-{a.account}-adapter"
    sub = await js.pull_subscribe(
        f"claw.v1.out.{a.channel}.{a.account}",
        durable=durable,
        stream="CLAW_OUT",
        config=ConsumerConfig(
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.NEW,
            ack_wait=30,
            max_deliver=100,
        ),
    )

    async def replies() -> None:
        while True:
            try:
                msgs = await sub.fetch(batch=16, timeout=1)
            except nats.errors.TimeoutError:
                continue
            for m in msgs:
                try:
                    env = msgpack.unpackb(m.data, raw=False)
                    body = env["body"]
                    msg_id = env["id"]
                except Exception as e:  # a malformed reply: leave it for the operator
                    print(f"undecodable reply skipped: {e}", file=sys.stderr)
                    await m.term()
                    continue
                if msg_id not in receipts:
                    line = {
                        "reply_to": body.get("inbound_id"),
                        "chunk": body.get("chunk", 0),
                        "last": body.get("last", False),
                        "text": body.get("text", ""),
                        "error": (body.get("error") or {}).get("code"),
                    }
                    print(json.dumps(line), flush=True)
                    receipts.record(msg_id)
                await m.ack()
                if body.get("last"):
                    pending.discard(body.get("inbound_id"))

    task = asyncio.create_task(replies())
    loop = asyncio.get_running_loop()
    n = 0
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line:
            break
        text = line.rstrip("\n")
        if not text.strip():
            continue
        n += 1
        message_id = f"{int(time.time() * 1000)}-{os.getpid()}-{n}"
        msg_id = f"{a.channel}:{a.account}:{message_id}"
        body = {
            "channel": a.channel,
            "account": a.account,
            "message_id": message_id,
            "chat": {"id": chat, "kind": "direct"},
            "sender": {"id": a.user, "display_name": a.user},
            "text": text,
        }
        pending.add(msg_id)
        await js.publish(
            f"claw.v1.in.{a.channel}.{a.account}.{chat_token(chat)}",
            envelope("inbound_message", msg_id, body),
            headers={"Nats-Msg-Id": msg_id, "Clawbus-Schema": "inbound_message/v1"},
        )

    status = 0
    if a.wait > 0:
        deadline = time.monotonic() + a.wait
        while pending and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if pending:
            print(f"no complete reply to {sorted(pending)}", file=sys.stderr)
            status = 1
    else:
        await task
    task.cancel()
    await nc.drain()
    return status


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
