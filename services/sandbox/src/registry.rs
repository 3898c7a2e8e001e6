//! The tools the sandbox runs, with the names and argument names OpenClaw users and
//! skills already use, and the JSON Schema of their arguments.

use clawbus_config::SandboxConfig;
use clawbus_wire::ToolSpec;
use serde_json::{json, Value};

/// Every tool this sandbox implements, with its description and arguments.
pub fn all() -> Vec<ToolSpec> {
    let string = |d: &str| json!({"type": "string", "description": d});
    let integer = |d: &str| json!({"type": "integer", "minimum": 0, "description": d});
    let spec = |name: &str, description: &str, properties: Value, required: &[&str]| ToolSpec {
        name: name.into(),
        description: description.into(),
        parameters: json!({"type": "object", "properties": properties, "required": required,
                           "additionalProperties": false})
        .to_string(),
    };
    vec![
        spec(
            "read",
            "Read a text file of the workspace. Lines are numbered from 1; `offset` is the \
             first line to read and `limit` how many.",
            json!({"path": string("Path relative to the workspace"),
                   "offset": integer("First line, from 1"),
                   "limit": integer("Lines to read")}),
            &["path"],
        ),
        spec(
            "write",
            "Create or replace a file of the workspace with `content` (parent directories \
             are created).",
            json!({"path": string("Path relative to the workspace"),
                   "content": string("The whole new content")}),
            &["path", "content"],
        ),
        spec(
            "edit",
            "Replace the exact text `oldText`, which must occur exactly once, with `newText` \
             in a file of the workspace.",
            json!({"path": string("Path relative to the workspace"),
                   "oldText": string("Text to replace: exact, and unique in the file"),
                   "newText": string("Replacement text")}),
            &["path", "oldText", "newText"],
        ),
        spec(
            "apply_patch",
            "Apply a unified diff (as git diff writes it; one or several files; --- /dev/null \
             creates a file, +++ /dev/null deletes one) to the workspace. Every hunk must \
             apply, or nothing changes.",
            json!({"patch": string("The unified diff")}),
            &["patch"],
        ),
        spec(
            "memory_search",
            "Search the agent's memory (MEMORY.md and memory/*.md) for lines with the \
             query's words.",
            json!({"query": string("Words to look for"),
                   "maxResults": integer("Lines to return at most")}),
            &["query"],
        ),
        spec(
            "memory_get",
            "Read lines of a memory file (MEMORY.md or memory/<name>.md).",
            json!({"path": string("MEMORY.md or memory/<name>.md"),
                   "from": integer("First line, from 1"),
                   "lines": integer("Lines to read")}),
            &["path"],
        ),
        spec(
            "ls",
            "List a directory of the workspace (the workspace itself by default).",
            json!({"path": string("Directory relative to the workspace")}),
            &[],
        ),
        spec(
            "exec",
            "Run a shell command in the workspace, isolated: no network unless allowed, the \
             workspace as the only writable place, a time limit. Returns its output and exit \
             code; a command still running after `yieldMs` (or with `background`) goes on in \
             the background and is managed with the process tool.",
            json!({"command": string("Shell command (sh -c)"),
                   "workdir": string("Directory relative to the workspace to run in"),
                   "timeout": {"type": "number", "minimum": 0, "description": "Seconds before the command is killed"},
                   "env": {"type": "object", "additionalProperties": {"type": "string"},
                           "description": "Extra environment variables"},
                   "background": {"type": "boolean", "description": "Run in the background at once"},
                   "yieldMs": integer("Milliseconds to wait before leaving it running in the background")}),
            &["command"],
        ),
        spec(
            "process",
            "Manage background commands started by exec: list them, poll new output, read \
             the log (line offset and limit), write to the input (data, eof), kill, clear a \
             finished one, or remove (kill and clear).",
            json!({"action": {"type": "string",
                              "enum": ["list", "poll", "log", "write", "kill", "clear", "remove"]},
                   "sessionId": string("The session id exec returned"),
                   "data": string("write: text for the command's input"),
                   "eof": {"type": "boolean", "description": "write: close the input afterwards"},
                   "offset": integer("log: first line, from 0 (default: the last lines)"),
                   "limit": integer("log: lines to return")}),
            &["action"],
        ),
        spec(
            "sessions_list",
            "List this agent's sessions, the most recently active first, with their \
             message counts.",
            json!({"limit": integer("Sessions to list at most (200)"),
                   "activeMinutes": integer("Only those active in the last this many minutes")}),
            &[],
        ),
        spec(
            "sessions_history",
            "Read the transcript of one of this agent's sessions (its key starts with \
             agent:<this agent>:).",
            json!({"sessionKey": string("The session key, e.g. agent:main:main"),
                   "limit": integer("Entries to return, newest last (at most 200)")}),
            &["sessionKey"],
        ),
        spec(
            "message",
            "Send a message to a chat of a channel (telegram, slack, discord, ...): `to` is \
             the chat's id there, `account` the bot account (default `default`).",
            json!({"channel": string("The channel, e.g. telegram"),
                   "to": string("The chat id on that channel"),
                   "text": string("The message"),
                   "account": string("The channel account (default: default)")}),
            &["channel", "to", "text"],
        ),
        spec(
            "web_fetch",
            "Fetch a web page (http or https, public addresses only) and return its readable \
             text.",
            json!({"url": string("The URL"),
                   "maxChars": integer("Characters to return at most")}),
            &["url"],
        ),
    ]
}

/// The tools an agent may call under `cfg`'s profile and lists.
pub fn offered(cfg: &SandboxConfig) -> Vec<ToolSpec> {
    all().into_iter().filter(|t| cfg.permits(&t.name)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_schema_is_an_object_schema_and_names_are_tokens() {
        for t in all() {
            let v: Value = serde_json::from_str(&t.parameters).unwrap();
            assert_eq!(v["type"], "object", "{}", t.name);
            assert!(clawbus_bus::subjects::tool(&t.name).is_some());
        }
    }

    #[test]
    fn the_profile_filters_the_registry() {
        let mut cfg = SandboxConfig::default();
        assert_eq!(
            offered(&cfg).len(),
            all().len() - 1,
            "coding has all but messaging"
        );
        cfg.deny = vec!["exec".into()];
        assert!(offered(&cfg).iter().all(|t| t.name != "exec"));
        cfg.profile = "messaging".into();
        let names: Vec<String> = offered(&cfg).into_iter().map(|t| t.name).collect();
        assert_eq!(names, ["sessions_list", "sessions_history", "message"]);
        cfg.profile = "minimal".into();
        assert!(offered(&cfg).is_empty());
    }
}
