//! The model writes Markdown; each platform gets it in its own form. Telegram takes the
//! HTML subset of its Bot API (`b i s u code pre a blockquote`, `&lt; &gt; &amp;`
//! escapes); platforms without markup get plain text. Anything the platform cannot
//! show (images, tables, raw HTML) is given as text, never dropped.

use pulldown_cmark::{CodeBlockKind, Event, HeadingLevel, Options, Parser, Tag, TagEnd};

fn parser(md: &str) -> Parser<'_> {
    Parser::new_ext(md, Options::ENABLE_STRIKETHROUGH | Options::ENABLE_TABLES)
}

/// Escapes text for Telegram's HTML parse mode.
pub fn escape_html(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '"' => out.push_str("&quot;"),
            c => out.push(c),
        }
    }
    out
}

/// How many characters HTML shows: tags count none, an entity (`&lt;`) one.
pub fn html_visible_len(html: &str) -> usize {
    let mut n = 0;
    let mut rest = html;
    while let Some(c) = rest.chars().next() {
        let skip = match c {
            '<' => rest.find('>').map_or(rest.len(), |i| i + 1),
            '&' => {
                n += 1;
                rest.find(';').filter(|&i| i <= 8).map_or(1, |i| i + 1)
            }
            c => {
                n += 1;
                c.len_utf8()
            }
        };
        rest = &rest[skip..];
    }
    n
}

/// How long a piece is on Telegram: its HTML's visible characters, or its plain text's
/// when Telegram refuses the HTML and it is sent plain.
pub fn telegram_len(md: &str) -> usize {
    html_visible_len(&telegram_html(md)).max(plain(md).chars().count())
}

/// Telegram HTML: <https://core.telegram.org/bots/api#html-style>.
pub fn telegram_html(md: &str) -> String {
    let mut out = String::with_capacity(md.len() + md.len() / 4);
    // Nesting of lists: `Some(n)` numbered from n, `None` bullets.
    let mut lists: Vec<Option<u64>> = Vec::new();
    for ev in parser(md) {
        match ev {
            Event::Start(tag) => match tag {
                Tag::Paragraph => {}
                Tag::Heading { .. } => out.push_str("<b>"),
                Tag::BlockQuote(_) => out.push_str("<blockquote>"),
                Tag::CodeBlock(kind) => match kind {
                    CodeBlockKind::Fenced(lang) if is_language(&lang) => {
                        out.push_str(&format!("<pre><code class=\"language-{lang}\">"))
                    }
                    _ => out.push_str("<pre><code>"),
                },
                Tag::List(start) => {
                    lists.push(start);
                    if !out.is_empty() && !out.ends_with('\n') {
                        out.push('\n');
                    }
                }
                Tag::Item => item_marker(&mut out, &mut lists, "• "),
                Tag::Emphasis => out.push_str("<i>"),
                Tag::Strong => out.push_str("<b>"),
                Tag::Strikethrough => out.push_str("<s>"),
                Tag::Link { dest_url, .. } => {
                    out.push_str(&format!("<a href=\"{}\">", escape_html(&dest_url)))
                }
                Tag::Image { dest_url, .. } => {
                    out.push_str(&format!("<a href=\"{}\">", escape_html(&dest_url)))
                }
                Tag::TableCell => out.push_str(" | "),
                _ => {}
            },
            Event::End(tag) => match tag {
                TagEnd::Paragraph => out.push_str("\n\n"),
                TagEnd::Heading(level) => {
                    out.push_str("</b>");
                    out.push_str(if level <= HeadingLevel::H2 {
                        "\n\n"
                    } else {
                        "\n"
                    });
                }
                TagEnd::BlockQuote(_) => {
                    trim_newlines(&mut out);
                    out.push_str("</blockquote>\n\n");
                }
                TagEnd::CodeBlock => {
                    if out.ends_with('\n') {
                        out.pop();
                    }
                    out.push_str("</code></pre>\n\n");
                }
                TagEnd::List(_) => {
                    lists.pop();
                    if lists.is_empty() {
                        trim_newlines(&mut out);
                        out.push_str("\n\n");
                    }
                }
                TagEnd::Item => {
                    trim_newlines(&mut out);
                    out.push('\n');
                }
                TagEnd::Emphasis => out.push_str("</i>"),
                TagEnd::Strong => out.push_str("</b>"),
                TagEnd::Strikethrough => out.push_str("</s>"),
                TagEnd::Link | TagEnd::Image => out.push_str("</a>"),
                TagEnd::TableRow | TagEnd::TableHead => out.push('\n'),
                _ => {}
            },
            Event::Text(t) => out.push_str(&escape_html(&t)),
            Event::Code(t) => {
                out.push_str("<code>");
                out.push_str(&escape_html(&t));
                out.push_str("</code>");
            }
            // Raw HTML from the model is shown, not interpreted.
            Event::Html(t) | Event::InlineHtml(t) => out.push_str(&escape_html(&t)),
            Event::SoftBreak | Event::HardBreak => out.push('\n'),
            Event::Rule => out.push_str("——————\n\n"),
            Event::TaskListMarker(done) => out.push_str(if done { "☑ " } else { "☐ " }),
            _ => {}
        }
    }
    trim_newlines(&mut out);
    out
}

/// Slack's mrkdwn: `*bold*`, `_italic_`, `~strike~`, `` `code` ``, code blocks,
/// `<url|text>` links, `&amp; &lt; &gt;` escapes
/// (<https://api.slack.com/reference/surfaces/formatting>).
pub fn slack_mrkdwn(md: &str) -> String {
    let esc = |s: &str| {
        s.replace('&', "&amp;")
            .replace('<', "&lt;")
            .replace('>', "&gt;")
    };
    let mut out = String::with_capacity(md.len() + 16);
    let mut lists: Vec<Option<u64>> = Vec::new();
    let mut links: Vec<String> = Vec::new();
    let mut in_link = false;
    for ev in parser(md) {
        match ev {
            Event::Start(Tag::Strong | Tag::Heading { .. }) => out.push('*'),
            Event::End(TagEnd::Strong) => out.push('*'),
            Event::End(TagEnd::Heading(_)) => out.push_str("*\n\n"),
            Event::Start(Tag::Emphasis) | Event::End(TagEnd::Emphasis) => out.push('_'),
            Event::Start(Tag::Strikethrough) | Event::End(TagEnd::Strikethrough) => out.push('~'),
            Event::Start(Tag::CodeBlock(_)) => out.push_str("```\n"),
            Event::End(TagEnd::CodeBlock) => {
                if !out.ends_with('\n') {
                    out.push('\n');
                }
                out.push_str("```\n\n");
            }
            Event::Start(Tag::BlockQuote(_)) => out.push_str("> "),
            Event::End(TagEnd::BlockQuote(_)) => out.push_str("\n\n"),
            Event::Start(Tag::Link { dest_url, .. }) => {
                links.push(dest_url.to_string());
                out.push('<');
                out.push_str(&esc(&dest_url).replace('|', "%7C"));
                out.push('|');
                in_link = true;
            }
            Event::End(TagEnd::Link) => {
                links.pop();
                out.push('>');
                in_link = false;
            }
            Event::Start(Tag::List(start)) => {
                lists.push(start);
                if !out.is_empty() && !out.ends_with('\n') {
                    out.push('\n');
                }
            }
            Event::End(TagEnd::List(_)) => {
                lists.pop();
                if lists.is_empty() {
                    out.push('\n');
                }
            }
            Event::Start(Tag::Item) => item_marker(&mut out, &mut lists, "• "),
            Event::End(TagEnd::Item) => {
                trim_newlines(&mut out);
                out.push('\n');
            }
            Event::End(TagEnd::Paragraph) => out.push_str("\n\n"),
            Event::Text(t) => {
                let t = esc(&t);
                out.push_str(&if in_link {
                    t.replace('>', "&gt;").replace('|', "¦")
                } else {
                    t
                })
            }
            Event::Code(t) => {
                out.push('`');
                out.push_str(&esc(&t));
                out.push('`');
            }
            Event::Html(t) | Event::InlineHtml(t) => out.push_str(&esc(&t)),
            Event::SoftBreak | Event::HardBreak => out.push('\n'),
            Event::Rule => out.push_str("———\n\n"),
            _ => {}
        }
    }
    trim_newlines(&mut out);
    out
}

/// Plain text: the words and code as they are, markup gone (IRC, Signal, and
/// Telegram's fallback when it refuses the HTML).
pub fn plain(md: &str) -> String {
    let mut out = String::with_capacity(md.len());
    let mut lists: Vec<Option<u64>> = Vec::new();
    let mut links: Vec<String> = Vec::new();
    for ev in parser(md) {
        match ev {
            Event::Start(Tag::List(start)) => {
                lists.push(start);
                if !out.is_empty() && !out.ends_with('\n') {
                    out.push('\n');
                }
            }
            Event::Start(Tag::Item) => item_marker(&mut out, &mut lists, "- "),
            Event::End(TagEnd::Item) => {
                trim_newlines(&mut out);
                out.push('\n');
            }
            Event::End(TagEnd::List(_)) => {
                lists.pop();
                if lists.is_empty() {
                    out.push('\n');
                }
            }
            Event::End(TagEnd::Paragraph | TagEnd::Heading(_) | TagEnd::CodeBlock) => {
                trim_newlines(&mut out);
                out.push_str("\n\n");
            }
            // Links read as "text (address)".
            Event::Start(Tag::Link { dest_url, .. }) => links.push(dest_url.to_string()),
            Event::End(TagEnd::Link) => {
                if let Some(url) = links
                    .pop()
                    .filter(|u| !u.is_empty() && !out.ends_with(u.as_str()))
                {
                    out.push_str(&format!(" ({url})"));
                }
            }
            Event::Text(t) | Event::Code(t) | Event::Html(t) | Event::InlineHtml(t) => {
                out.push_str(&t)
            }
            Event::SoftBreak | Event::HardBreak => out.push('\n'),
            Event::Rule => out.push_str("----\n\n"),
            _ => {}
        }
    }
    trim_newlines(&mut out);
    out
}

/// A list item's indent and marker: the next number of a numbered list, else `bullet`.
fn item_marker(out: &mut String, lists: &mut [Option<u64>], bullet: &str) {
    out.push_str(&"  ".repeat(lists.len().saturating_sub(1)));
    match lists.last_mut() {
        Some(Some(n)) => {
            out.push_str(&format!("{n}. "));
            *n += 1;
        }
        _ => out.push_str(bullet),
    }
}

fn trim_newlines(s: &mut String) {
    while s.ends_with('\n') {
        s.pop();
    }
}

/// A code block's info string usable as a class name.
fn is_language(lang: &str) -> bool {
    !lang.is_empty()
        && lang.len() <= 32
        && lang
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '_' | '#' | '.'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn telegram_gets_its_html_subset() {
        let html = telegram_html(
            "# Title\n\nSome **bold**, *italic*, ~~gone~~ and `a<b`.\n\n```rust\nfn main() { 1 < 2 && true }\n```\n\n- one\n- two\n\n[site](https://example.org/?a=1&b=2)",
        );
        assert!(html.starts_with("<b>Title</b>\n\n"), "{html}");
        assert!(
            html.contains("<b>bold</b>, <i>italic</i>, <s>gone</s> and <code>a&lt;b</code>"),
            "{html}"
        );
        assert!(
            html.contains("<pre><code class=\"language-rust\">fn main() { 1 &lt; 2 &amp;&amp; true }</code></pre>"),
            "{html}"
        );
        assert!(html.contains("• one\n• two"), "{html}");
        assert!(
            html.contains("<a href=\"https://example.org/?a=1&amp;b=2\">site</a>"),
            "{html}"
        );
    }

    #[test]
    fn hostile_markup_is_escaped_not_interpreted() {
        let html = telegram_html(
            "<script>alert(1)</script> & <b onclick=x>hi</b>\n\n```\"><img>\n<a>\n```",
        );
        assert!(
            !html.contains("<script") && !html.contains("<img") && !html.contains("<b onclick"),
            "{html}"
        );
        assert!(html.contains("&lt;script&gt;"), "{html}");
        // A language string that could break out of the attribute is left out.
        let html = telegram_html("```x\"onmouseover=alert(1)\ncode\n```");
        assert!(html.starts_with("<pre><code>code"), "{html}");
    }

    #[test]
    fn slack_gets_mrkdwn_with_escapes() {
        let m = slack_mrkdwn(
            "**Hi** _there_ ~~old~~ `a<b` [docs](https://x.org/?a=1&b=2)\n\n```\n1 < 2\n```",
        );
        assert!(
            m.starts_with("*Hi* _there_ ~old~ `a&lt;b` <https://x.org/?a=1&amp;b=2|docs>"),
            "{m}"
        );
        assert!(m.ends_with("```\n1 &lt; 2\n```"), "{m}");
        // Nothing a person writes can become a mention or a link: <!channel> is escaped.
        assert_eq!(
            slack_mrkdwn("<!channel> <@U123>"),
            "&lt;!channel&gt; &lt;@U123&gt;"
        );
    }

    #[test]
    fn plain_text_keeps_words_and_code() {
        let p = plain("**Hello** _world_\n\n```\nlet a = 1;\n```\n\n1. first\n2. second\n\n[docs](https://x.org)");
        assert_eq!(
            p,
            "Hello world\n\nlet a = 1;\n\n1. first\n2. second\n\ndocs (https://x.org)"
        );
    }
}
