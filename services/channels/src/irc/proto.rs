//! The IRC client protocol as the adapter needs it (RFC 1459/2812 message format):
//! reading server lines, and cutting outgoing text into lines that fit.
//!
//! A line is read as bytes and decoded on its own: UTF-8 when it is, else Windows-1252
//! (the Latin-1 that many networks and older clients still send, as IRC clients
//! fall back to), so no text is refused for its encoding. A line that is no IRC message
//! at all (a NUL byte, a CR inside it, longer than IRCv3 allows, no or no valid
//! command) is refused with why, for the adapter to park it with its bytes.

use std::borrow::Cow;

/// The longest line: 8191 bytes of IRCv3 tags and 512 of message, CR LF included.
pub const MAX_LINE: usize = 8191 + 512;

/// A message from the server: `[@tags] [:prefix] COMMAND params… [:trailing]`.
#[derive(Debug, PartialEq)]
pub struct Line<'a> {
    pub prefix: Option<&'a str>,
    pub command: &'a str,
    pub params: Vec<&'a str>,
}

impl Line<'_> {
    /// The nickname of the prefix (`nick!user@host`).
    pub fn nick(&self) -> Option<&str> {
        self.prefix.map(|p| p.split('!').next().unwrap_or(p))
    }
}

/// The text of one line from the server (with or without its CR LF): UTF-8 when it
/// is, else Windows-1252; `Err` (why) for bytes that make no IRC line.
pub fn decode(raw: &[u8]) -> Result<Cow<'_, str>, String> {
    if raw.len() > MAX_LINE {
        return Err(format!("a line of {} bytes, over {MAX_LINE}", raw.len()));
    }
    if let Some(at) = raw.iter().position(|b| *b == 0) {
        return Err(format!("a NUL byte at {at}"));
    }
    let body = raw
        .strip_suffix(b"\n")
        .map(|r| r.strip_suffix(b"\r").unwrap_or(r))
        .unwrap_or(raw);
    if let Some(at) = body.iter().position(|b| matches!(b, b'\r' | b'\n')) {
        return Err(format!("a line break at {at} inside the line"));
    }
    Ok(match std::str::from_utf8(raw) {
        Ok(s) => Cow::Borrowed(s),
        Err(_) => Cow::Owned(raw.iter().map(|b| windows_1252(*b)).collect()),
    })
}

/// The character of a Windows-1252 byte (Latin-1 but for 0x80–0x9F, where it has
/// typographic marks instead of control characters; the five bytes it leaves
/// undefined map as Latin-1 does).
fn windows_1252(b: u8) -> char {
    const HIGH: [char; 32] = [
        '\u{20ac}', '\u{81}', '\u{201a}', '\u{192}', '\u{201e}', '\u{2026}', '\u{2020}',
        '\u{2021}', '\u{2c6}', '\u{2030}', '\u{160}', '\u{2039}', '\u{152}', '\u{8d}', '\u{17d}',
        '\u{8f}', '\u{90}', '\u{2018}', '\u{2019}', '\u{201c}', '\u{201d}', '\u{2022}', '\u{2013}',
        '\u{2014}', '\u{2dc}', '\u{2122}', '\u{161}', '\u{203a}', '\u{153}', '\u{9d}', '\u{17e}',
        '\u{178}',
    ];
    match b {
        0x80..=0x9f => HIGH[usize::from(b - 0x80)],
        _ => char::from(b),
    }
}

/// Parses one decoded line (with or without its CR LF): `Ok(None)` for a blank one,
/// `Err` (why) for one that is no IRC message (tags or a prefix and nothing after,
/// no command, a command that is neither a word nor three digits).
pub fn parse(line: &str) -> Result<Option<Line<'_>>, &'static str> {
    let mut rest = line.trim_end_matches(['\r', '\n']);
    if rest.trim_matches(' ').is_empty() {
        return Ok(None);
    }
    if let Some(r) = rest.strip_prefix('@') {
        rest = r.split_once(' ').ok_or("tags and no message")?.1;
    }
    rest = rest.trim_start_matches(' ');
    let prefix = match rest.strip_prefix(':') {
        Some(r) => {
            let (p, r) = r.split_once(' ').ok_or("a prefix and no command")?;
            rest = r;
            Some(p)
        }
        None => None,
    };
    let (head, trailing) = match rest.split_once(" :") {
        Some((h, t)) => (h, Some(t)),
        None => (rest, None),
    };
    let mut words = head.split(' ').filter(|w| !w.is_empty());
    let command = words.next().ok_or("no command")?;
    let word = command.bytes().all(|b| b.is_ascii_alphabetic());
    let numeric = command.len() == 3 && command.bytes().all(|b| b.is_ascii_digit());
    if !word && !numeric {
        return Err("not an IRC command");
    }
    let mut params: Vec<&str> = words.collect();
    if let Some(t) = trailing {
        params.push(t);
    }
    Ok(Some(Line {
        prefix,
        command,
        params,
    }))
}

/// Text made safe for one IRC parameter: no CR, LF or NUL (they would end the line or
/// inject a command).
pub fn clean(s: &str) -> String {
    s.chars()
        .map(|c| {
            if matches!(c, '\r' | '\n' | '\0') {
                ' '
            } else {
                c
            }
        })
        .collect()
}

/// `text` as lines of at most `max` bytes each: one per line of the text (empty ones
/// dropped), longer ones cut at a space where one is near, else at a character
/// boundary.
pub fn lines(text: &str, max: usize) -> Vec<String> {
    let max = max.max(16);
    let mut out = Vec::new();
    for line in text.lines() {
        let line = clean(line);
        let mut rest = line.trim_end();
        if rest.is_empty() {
            continue;
        }
        while rest.len() > max {
            let mut cut = max;
            while !rest.is_char_boundary(cut) {
                cut -= 1;
            }
            let at = rest[..cut]
                .rfind(' ')
                .filter(|&i| i > cut / 2)
                .unwrap_or(cut);
            out.push(rest[..at].to_owned());
            rest = rest[at..].trim_start();
        }
        if !rest.is_empty() {
            out.push(rest.to_owned());
        }
    }
    out
}

/// The text of a message addressed to `nick` (`nick: hi`, `nick, hi`), without the
/// address; `None` when it is not addressed so.
pub fn addressed<'a>(text: &'a str, nick: &str) -> Option<&'a str> {
    let head = text.get(..nick.len())?;
    if !head.eq_ignore_ascii_case(nick) {
        return None;
    }
    let rest = &text[nick.len()..];
    let rest = rest.strip_prefix([':', ','])?;
    Some(rest.trim_start())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_with_prefix_tags_and_trailing_parse() {
        let l = parse("@time=x :ada!a@host PRIVMSG #family :hello there :)\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(l.nick(), Some("ada"));
        assert_eq!(l.command, "PRIVMSG");
        assert_eq!(l.params, ["#family", "hello there :)"]);
        let l = parse("PING :irc.test").unwrap().unwrap();
        assert_eq!(
            (l.prefix, l.command, l.params),
            (None, "PING", vec!["irc.test"])
        );
        let l = parse(":irc.test 001 claw :Welcome").unwrap().unwrap();
        assert_eq!(l.params, ["claw", "Welcome"]);
        for blank in ["", "\r\n", "   ", "  \r\n"] {
            assert_eq!(parse(blank), Ok(None), "{blank:?}");
        }
        for junk in [
            ":only-prefix",
            "@tags-only",
            "@tags :prefix",
            ":prefix  ",
            ":p :trailing only",
            ":p PRIV\u{1}MSG #a :x",
            ":p 0001 x",
            "12 x",
            "ÉCHO x",
        ] {
            assert!(parse(junk).is_err(), "{junk:?}");
        }
    }

    #[test]
    fn lines_in_latin_1_are_read_and_broken_ones_refused() {
        assert_eq!(
            decode(b"PRIVMSG #a :caf\xc3\xa9\r\n").unwrap(),
            "PRIVMSG #a :café\r\n"
        );
        // Not UTF-8: Windows-1252 (Latin-1 with its marks), every byte a character.
        assert_eq!(
            decode(b"PRIVMSG #a :caf\xe9 \x80 \x93\r\n").unwrap(),
            "PRIVMSG #a :café € “\r\n"
        );
        assert!(matches!(decode(b"PRIVMSG #a :ok"), Ok(Cow::Borrowed(_))));
        let all: Vec<u8> = (1..=255u8)
            .filter(|b| !matches!(b, b'\r' | b'\n'))
            .collect();
        assert_eq!(decode(&all).unwrap().chars().count(), all.len());
        for (bad, why) in [
            (&b"PRIVMSG #a :hi\0there\r\n"[..], "NUL"),
            (b"PRIVMSG #a :hi\rQUIT\r\n", "line break"),
            (b"PRIVMSG #a :a\nb\r\n", "line break"),
        ] {
            assert!(decode(bad).unwrap_err().contains(why), "{bad:?}");
        }
        let long = [b'x'; MAX_LINE + 1];
        assert!(decode(&long).unwrap_err().contains("over"));
        assert!(decode(&long[..MAX_LINE]).is_ok());
    }

    #[test]
    fn outgoing_text_cannot_inject_commands_and_fits_the_line() {
        let ls = lines("hi\r\nQUIT :bye\n\nok\0done", 400);
        assert_eq!(ls, ["hi", "QUIT :bye", "ok done"]);
        let long = "wörd ".repeat(200);
        let ls = lines(&long, 100);
        assert!(ls.len() > 5);
        assert!(ls.iter().all(|l| l.len() <= 100 && !l.contains('\n')));
        assert_eq!(ls.join(" ").split_whitespace().count(), 200);
        let nospace = "é".repeat(300);
        assert!(lines(&nospace, 51).iter().all(|l| l.len() <= 51));
    }

    #[test]
    fn addressing_the_bot() {
        assert_eq!(addressed("claw: what time?", "claw"), Some("what time?"));
        assert_eq!(addressed("CLAW, hi", "claw"), Some("hi"));
        assert_eq!(addressed("clawbus: hi", "claw"), None);
        assert_eq!(addressed("hi claw", "claw"), None);
        assert_eq!(addressed("cl", "claw"), None);
        assert_eq!(addressed("é", "claw"), None);
    }
}
