//! A reply cut into platform messages and rendered: every piece within the platform's
//! limit, every code block closed in the piece that opened it, Telegram's HTML with
//! balanced tags and at most the limit of visible characters.
#![no_main]

use clawbus_channels::{chunk, markdown};
use libfuzzer_sys::fuzz_target;

/// Platform limits in characters: Discord and Signal, Telegram, Slack, Matrix, IRC, and
/// a small one that reaches the cuts quickly.
const LIMITS: [usize; 6] = [2000, 4096, 4000, 16_000, 350, 64];

/// Whether `piece` ends outside any code block: a fence line (```` ``` ```` or `~~~`,
/// up to three spaces of indent) opens one, and only a bare line of the same marker
/// closes it.
fn blocks_closed(piece: &str) -> bool {
    let mut open: Option<&str> = None;
    for line in piece.lines() {
        let t = line.trim_start_matches(' ');
        if line.len() - t.len() > 3 {
            continue;
        }
        let Some(m) = ["```", "~~~"].into_iter().find(|m| t.starts_with(m)) else {
            continue;
        };
        match open {
            None => open = Some(m),
            Some(o) if o == m && t.trim_end().trim_start_matches(m).is_empty() => open = None,
            Some(_) => {}
        }
    }
    open.is_none()
}

/// Checks that the tags of Telegram HTML nest, and returns its visible length
/// (entities count one character).
fn telegram_visible(html: &str) -> usize {
    let mut open: Vec<String> = Vec::new();
    let mut visible = 0;
    let mut rest = html;
    while let Some(c) = rest.chars().next() {
        match c {
            '<' => {
                let end = rest.find('>').expect("a tag is closed with `>`");
                let tag = &rest[1..end];
                let name: String = tag
                    .trim_start_matches('/')
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
                    .collect();
                if tag.starts_with('/') {
                    assert_eq!(open.pop().as_deref(), Some(name.as_str()), "{html}");
                } else {
                    open.push(name);
                }
                rest = &rest[end + 1..];
            }
            '&' => {
                let end = rest.find(';').expect("an entity ends with `;`");
                assert!(end <= 8, "entity {:?}", &rest[..end]);
                visible += 1;
                rest = &rest[end + 1..];
            }
            _ => {
                visible += 1;
                rest = &rest[c.len_utf8()..];
            }
        }
    }
    assert!(open.is_empty(), "tags left open {open:?} in {html}");
    visible
}

fuzz_target!(|input: (u8, &str)| {
    let (which, text) = input;
    let limit = LIMITS[which as usize % LIMITS.len()];
    // As the Telegram adapter cuts: to fit the rendered length.
    for piece in chunk::chunk_to_fit(text, limit, &markdown::telegram_len) {
        assert!(piece.chars().count() <= limit, "a piece over {limit}");
        assert!(blocks_closed(&piece), "a code block cut open: {piece:?}");
        let visible = telegram_visible(&markdown::telegram_html(&piece));
        assert!(visible <= limit, "{visible} visible characters over {limit}: {piece:?}");
        let _ = markdown::slack_mrkdwn(&piece);
        assert!(markdown::plain(&piece).chars().count() <= limit, "plain over {limit}: {piece:?}");
    }
});
