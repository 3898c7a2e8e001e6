//! `message {channel, to, text, account?}`: the agent sends a message to a chat of a
//! channel account, as its reply would go (`claw.v1.out.<channel>.<account>`, one
//! outbound message whose id is the call's, so a retried call sends nothing twice).

use clawbus_bus::{subjects, Bus, TraceContext};
use clawbus_wire::{Envelope, OutboundMessage, ToolCall};
use serde::Deserialize;

use crate::ToolError;

/// Longest message (a chat platform splits it further).
pub const MAX_MESSAGE_BYTES: usize = 16 * 1024;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MessageArgs {
    channel: String,
    to: String,
    text: String,
    #[serde(default)]
    account: Option<String>,
}

pub async fn send(bus: &Bus, call: &ToolCall, a: MessageArgs) -> Result<String, ToolError> {
    let account = a.account.unwrap_or_else(|| "default".into());
    if a.channel == "http" {
        return Err(ToolError::bad(
            "the http channel answers requests; it cannot be sent to",
        ));
    }
    let Some(subject) = subjects::outbound(&a.channel, &account) else {
        return Err(ToolError::bad(
            "channel and account are letters, digits, `_` and `-`",
        ));
    };
    if a.to.trim().is_empty() || a.to.len() > 256 {
        return Err(ToolError::bad("`to` names a chat (1-256 characters)"));
    }
    if a.text.trim().is_empty() || a.text.len() > MAX_MESSAGE_BYTES {
        return Err(ToolError::bad(format!(
            "`text` is 1 to {MAX_MESSAGE_BYTES} bytes"
        )));
    }
    let out = OutboundMessage {
        run_id: call.run_id.clone(),
        session_key: call.session_key.clone(),
        channel: a.channel.clone(),
        account: account.clone(),
        chat_id: a.to.clone(),
        inbound_id: call.call_id.clone(),
        last: true,
        text: a.text,
        ..Default::default()
    };
    let env = Envelope::new(
        format!("{}:message:out:0", call.call_id),
        clawbus_wire::now_ms(),
        out,
    );
    bus.publish_durable(subject, &env, &TraceContext::root())
        .await
        .map_err(|e| ToolError::unavailable(format!("the message was not sent: {e}")))?;
    Ok(format!("sent to {} on {}/{account}", a.to, a.channel))
}
