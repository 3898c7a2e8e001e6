//! What the emulated model answers: a pure function of the conversation (see the
//! module's documentation for the magic words).

use serde_json::Value;

use super::last_user;

/// The reply the emulator gives to a list of messages.
pub fn reply_for(messages: &[Value]) -> String {
    let last_user = last_user(messages);
    // `repeat <n> <text>`: a long answer (a model writing at length), `<text>` repeated
    // to `n` bytes (at most 4 MiB).
    if let Some((n, text)) = last_user
        .strip_prefix("repeat ")
        .and_then(|r| r.split_once(' '))
        .and_then(|(n, t)| Some((n.parse::<usize>().ok()?.min(4 << 20), t)))
        .filter(|(_, t)| !t.is_empty())
    {
        let mut long: String = text.chars().cycle().take(n).collect();
        long.truncate(n);
        return format!("Echo: {long}");
    }
    // `count <n>`: `w0 w1 … w<n-1>` (at most 100,000 words).
    if let Some(n) = last_user
        .strip_prefix("count ")
        .and_then(|n| n.trim().parse::<usize>().ok())
    {
        let words: Vec<String> = (0..n.min(100_000)).map(|i| format!("w{i}")).collect();
        return format!("Echo: {}", words.join(" "));
    }
    // `code <n>`: a fenced code block of `n` lines (at most 10,000).
    if let Some(n) = last_user
        .strip_prefix("code ")
        .and_then(|n| n.trim().parse::<usize>().ok())
    {
        let code: String = (0..n.min(10_000))
            .map(|i| format!("let v{i} = *p{i}*;\n"))
            .collect();
        return format!("Echo: the code.\n\n```rust\n{code}```\n\nThe end.");
    }
    format!("Echo: {last_user}")
}
