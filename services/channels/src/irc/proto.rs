//! The IRC client protocol as the adapter needs it (RFC 1459/2812 message format):
//! parsing server lines, and cutting outgoing text into lines that fit.

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

/// Parses one line (without its CR LF); `None` for an empty or command-less one.
pub fn parse(line: &str) -> Option<Line<'_>> {
    let mut rest = line.trim_end_matches(['\r', '\n']);
    if let Some(r) = rest.strip_prefix('@') {
        rest = r.split_once(' ').map_or("", |(_, r)| r);
    }
    rest = rest.trim_start_matches(' ');
    let prefix = match rest.strip_prefix(':') {
        Some(r) => {
            let (p, r) = r.split_once(' ')?;
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
    let command = words.next()?;
    let mut params: Vec<&str> = words.collect();
    if let Some(t) = trailing {
        params.push(t);
    }
    Some(Line {
        prefix,
        command,
        params,
    })
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
        let l = parse("@time=x :ada!a@host PRIVMSG #family :hello there :)\r\n").unwrap();
        assert_eq!(l.nick(), Some("ada"));
        assert_eq!(l.command, "PRIVMSG");
        assert_eq!(l.params, ["#family", "hello there :)"]);
        let l = parse("PING :irc.test").unwrap();
        assert_eq!(
            (l.prefix, l.command, l.params),
            (None, "PING", vec!["irc.test"])
        );
        let l = parse(":irc.test 001 claw :Welcome").unwrap();
        assert_eq!(l.params, ["claw", "Welcome"]);
        for junk in ["", "\r\n", ":only-prefix", "@tags-only", "   "] {
            assert!(parse(junk).is_none(), "{junk:?}");
        }
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
