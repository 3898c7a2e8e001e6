//! Splitting a reply into platform messages: at most `limit` characters each, cut at
//! paragraph, then line, then word boundaries, and never inside a code block — a block
//! that must be cut is closed at the end of one piece and opened again (with its
//! language) at the start of the next, so every piece renders on its own.

use std::borrow::Cow;

/// A fence line opening or closing a code block (```` ``` ```` or `~~~`, up to three
/// spaces of indent), and its marker.
fn fence(line: &str) -> Option<&str> {
    let t = line.trim_start_matches(' ');
    if line.len() - t.len() > 3 {
        return None;
    }
    ["```", "~~~"].into_iter().find(|m| t.starts_with(m))
}

/// `text` in pieces that each render within `limit` characters as the platform counts
/// them (`measure`): rendering can add characters (Telegram's HTML puts a blank line
/// between blocks the Markdown separated by one newline), so a piece that renders
/// longer is cut again, smaller in proportion, until it fits or is 16 characters.
pub fn chunk_to_fit(text: &str, limit: usize, measure: &dyn Fn(&str) -> usize) -> Vec<String> {
    fn fit(
        piece: String,
        cut: usize,
        limit: usize,
        measure: &dyn Fn(&str) -> usize,
        out: &mut Vec<String>,
    ) {
        let len = measure(&piece);
        if len <= limit || cut <= 16 {
            out.push(piece);
            return;
        }
        let smaller = (cut * limit / len).min(cut - 1).max(16);
        for p in chunk(&piece, smaller) {
            fit(p, smaller, limit, measure, out);
        }
    }
    let mut out = Vec::new();
    for piece in chunk(text, limit) {
        fit(piece, limit.max(16), limit, measure, &mut out);
    }
    out
}

/// `text` in pieces of at most `limit` characters (`limit` ≥ 16).
pub fn chunk(text: &str, limit: usize) -> Vec<String> {
    let limit = limit.max(16);
    let len = text.chars().count();
    if len <= limit {
        // One piece, closing a block the text leaves open when there is room.
        let mut open = None;
        for line in text.split_inclusive('\n') {
            track(&mut open, line, limit);
        }
        match open {
            None => return vec![text.to_owned()],
            Some(o) if len + 4 <= limit => {
                let mut piece = text.to_owned();
                close(&mut piece, &o);
                return vec![piece];
            }
            Some(_) => {}
        }
    }
    let mut s = Pieces {
        limit,
        ..Pieces::default()
    };
    for raw in text.split_inclusive('\n') {
        let (line, info) = fence_on_its_own(raw, s.open.as_deref(), limit);
        s.add(&line);
        if let Some(info) = info {
            s.add(&info);
        }
    }
    // A block the text leaves open is closed, so the last piece renders on its own too.
    if let Some(o) = &s.open {
        close(&mut s.cur, o);
    }
    if !s.cur.trim().is_empty() {
        s.pieces.push(s.cur);
    }
    s.pieces
}

/// The pieces cut so far and the one being filled.
#[derive(Default)]
struct Pieces {
    limit: usize,
    pieces: Vec<String>,
    cur: String,
    cur_len: usize,
    /// The line that reopens the code block we are in.
    open: Option<String>,
}

impl Pieces {
    fn add(&mut self, line: &str) {
        let limit = self.limit;
        let marker = fence(line);
        // What closing the block at a cut or at the end costs (a newline and the
        // marker), kept free from the line that opens a block on.
        let reserve = if self.open.is_some() || marker.is_some() {
            4
        } else {
            0
        };
        let line_len = line.chars().count();
        if self.cur_len + line_len + reserve > limit && self.cur_len > 0 {
            self.flush();
        }
        // A line longer than a piece can hold: cut it on its own.
        let room = limit
            .saturating_sub(reserve)
            .saturating_sub(self.open.as_ref().map_or(0, |o| o.chars().count() + 1));
        if line_len > room.max(8) {
            for part in split_long(line, room.max(8)) {
                let part_len = part.chars().count();
                if self.cur_len + part_len + reserve > limit && self.cur_len > 0 {
                    self.flush();
                }
                self.cur_len += part_len;
                self.cur.push_str(&part);
            }
        } else {
            self.cur_len += line_len;
            self.cur.push_str(line);
        }
        track(&mut self.open, line, limit);
    }

    /// Ends the current piece (closing an open code block) and starts the next
    /// (opening it again).
    fn flush(&mut self) {
        let mut piece = std::mem::take(&mut self.cur);
        if let Some(o) = &self.open {
            close(&mut piece, o);
            self.cur.push_str(o);
            self.cur.push('\n');
        }
        let trimmed = piece.trim_end_matches('\n').to_owned();
        if !trimmed.trim().is_empty() {
            self.pieces.push(trimmed);
        }
        self.cur_len = self.cur.chars().count();
    }
}

/// `line`, unless it is a fence line too long to stay whole in a piece (an opening
/// one when `open` is `None`, a closing one of `open`'s block otherwise): then its
/// marker on a line of its own and the rest (an opening line's info string) as the
/// block's first line, so a cut never falls inside a fence line. (A closing fence
/// has nothing after its marker but spaces, which go.)
fn fence_on_its_own<'a>(
    line: &'a str,
    open: Option<&str>,
    limit: usize,
) -> (Cow<'a, str>, Option<String>) {
    let Some(m) = fence(line) else {
        return (line.into(), None);
    };
    // Room for a fence line: the piece less a closing fence and a reopened block's.
    let room = (limit / 2).saturating_sub(4).max(8);
    if line.chars().count() <= room {
        return (line.into(), None);
    }
    match open {
        Some(o) if closes(o, line, m) => (format!("{m}\n").into(), None),
        // A line of code: cut as any other.
        Some(_) => (line.into(), None),
        None => {
            let at = line.find(m).unwrap_or(0) + m.len();
            let info = line[at..].trim_start_matches(m.as_bytes()[0] as char);
            let mut head = &line[..line.len() - info.len()];
            if head.chars().count() >= room {
                // More than a piece's worth of backticks: three do the same here.
                head = m;
            }
            if info.trim().is_empty() {
                return (format!("{}\n", head.trim_end()).into(), None);
            }
            // The info string, now code, must not read as the block's end.
            let info = match fence(info) {
                Some(_) => format!("\u{200B}{info}"),
                None => info.to_owned(),
            };
            (format!("{head}\n").into(), Some(info))
        }
    }
}

/// Whether `line` (a fence line with marker `m`) closes the block `open` opened.
fn closes(open: &str, line: &str, m: &str) -> bool {
    open.trim_start().starts_with(m) && line.trim().trim_start_matches(m).is_empty()
}

/// Follows the code blocks across `line`: `open` is the line that reopens the block
/// the text is in after it, if any.
fn track(open: &mut Option<String>, line: &str, limit: usize) {
    let Some(m) = fence(line) else { return };
    match open {
        Some(o) if closes(o, line, m) => *open = None,
        Some(_) => {}
        None => *open = Some(reopening(line, m, limit)),
    }
}

/// Closes the block `open` opened at the end of `piece`.
fn close(piece: &mut String, open: &str) {
    if !piece.ends_with('\n') {
        piece.push('\n');
    }
    piece.push_str(fence(open).unwrap_or("```"));
}

/// The line that opens a block again after a cut: the opening line itself (with its
/// language), or only its marker when that line would leave too little room for code.
fn reopening(line: &str, marker: &str, limit: usize) -> String {
    let line = line.trim_end_matches(['\n', '\r']);
    // The line, its newline, the closing marker and its newline, and 8 of code.
    if line.chars().count() + 1 + 4 + 8 <= limit {
        line.to_owned()
    } else {
        marker.to_owned()
    }
}

/// A line cut into parts of at most `max` characters, at a space where one is near.
/// A part may begin a piece, so none begins like a code fence (it would open a block
/// the text never had): the cut moves back before the marker, and a run of nothing
/// but fence characters, or a line of code that begins like a fence, is marked with a
/// zero-width space.
fn split_long(line: &str, max: usize) -> Vec<String> {
    let back = |s: &str, i: usize| s[..i].char_indices().last().map_or(0, |(j, _)| j);
    let mut out = Vec::new();
    // A line cut here that begins like a fence is code (fence lines are kept whole):
    // a cut could leave its first part a bare marker, which would close the block.
    let mut rest = match fence(line) {
        Some(_) => format!("\u{200B}{line}"),
        None => line.to_owned(),
    };
    while rest.chars().count() > max {
        let cut = rest
            .char_indices()
            .nth(max)
            .map(|(i, _)| i)
            .unwrap_or(rest.len());
        // Prefer the last space in the second half of the part.
        let mut at = rest[..cut]
            .rfind(' ')
            .filter(|&i| i > cut / 2)
            .map(|i| i + 1)
            .unwrap_or(cut);
        while at > 0 && fence(&rest[at..]).is_some() {
            at = back(&rest, at);
        }
        if at == 0 {
            let at = back(&rest, cut);
            out.push(rest[..at].to_owned());
            rest = format!("\u{200B}{}", &rest[at..]);
            continue;
        }
        out.push(rest[..at].to_owned());
        rest.replace_range(..at, "");
    }
    out.push(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fences_balanced(p: &str) -> bool {
        p.lines().filter(|l| fence(l).is_some()).count() % 2 == 0
    }

    #[test]
    fn short_text_is_one_piece() {
        assert_eq!(chunk("hello", 100), vec!["hello"]);
    }

    #[test]
    fn pieces_respect_the_limit_and_keep_every_word() {
        let text = (0..400)
            .map(|i| format!("word{i}"))
            .collect::<Vec<_>>()
            .join(" ");
        let pieces = chunk(&text, 100);
        assert!(pieces.len() > 5);
        for p in &pieces {
            assert!(p.chars().count() <= 100, "{}", p.len());
        }
        let joined: String = pieces.concat();
        assert_eq!(joined.split_whitespace().count(), 400);
    }

    #[test]
    fn a_code_block_cut_in_two_is_closed_and_reopened_with_its_language() {
        let code: String = (0..60).map(|i| format!("let x{i} = {i};\n")).collect();
        let text = format!("Here is the code:\n\n```rust\n{code}```\n\nThat is all.");
        let pieces = chunk(&text, 200);
        assert!(pieces.len() > 3);
        for p in &pieces {
            assert!(p.chars().count() <= 200, "{p}");
            assert!(fences_balanced(p), "unbalanced fence in {p:?}");
        }
        assert!(pieces[1].starts_with("```rust\n"), "{:?}", pieces[1]);
        // Every line of code arrives once.
        let all = pieces.join("\n");
        for i in 0..60 {
            assert_eq!(all.matches(&format!("let x{i} = {i};")).count(), 1, "{i}");
        }
        assert!(pieces.last().unwrap().ends_with("That is all."));
    }

    #[test]
    fn multibyte_text_and_one_giant_line_are_cut_on_char_boundaries() {
        let text = "ü".repeat(1000) + &"😀".repeat(500);
        let pieces = chunk(&text, 64);
        for p in &pieces {
            assert!(p.chars().count() <= 64);
        }
        assert_eq!(pieces.concat(), text);
    }

    #[test]
    fn tilde_fences_and_unclosed_blocks_stay_balanced() {
        let text = format!("~~~\n{}", "line\n".repeat(100));
        for p in chunk(&text, 50) {
            assert!(p.chars().count() <= 50);
            assert!(p.starts_with("~~~"), "{p}");
            assert!(fences_balanced(&p), "unbalanced fence in {p:?}");
        }
    }

    #[test]
    fn a_block_left_open_at_the_end_is_closed_in_the_last_piece() {
        // Found by fuzzing: the last piece of a text ending inside a block was open.
        let text = format!("{}\n```\n{}", "é".repeat(100), "x".repeat(50));
        for p in chunk(&text, 16) {
            assert!(p.chars().count() <= 16, "{p:?}");
            assert!(fences_balanced(p.as_str()), "unbalanced fence in {p:?}");
        }
    }

    #[test]
    fn a_short_text_left_inside_a_block_is_closed() {
        assert_eq!(
            chunk("see:\n```\nls -l", 100),
            vec!["see:\n```\nls -l\n```"]
        );
        assert_eq!(chunk("~~~sh\nls\n", 100), vec!["~~~sh\nls\n~~~"]);
        // No room to close it in one piece: it is cut like a long one.
        let text = format!("```\n{}", "x".repeat(14));
        for p in chunk(&text, 16) {
            assert!(p.chars().count() <= 16 && fences_balanced(&p), "{p:?}");
        }
    }

    #[test]
    fn a_long_line_is_never_cut_where_a_piece_would_begin_with_a_fence() {
        // Found by fuzzing: "code ``` inside" cut into "code " and "``` inside".
        let text = "~~~\ncode ``` inside\n~~~\n".repeat(20);
        for p in chunk(&text, 16) {
            assert!(p.chars().count() <= 16 && fences_balanced(&p), "{p:?}");
        }
        let run = format!("x{}", "`".repeat(100));
        let pieces = chunk(&run, 16);
        assert!(pieces.len() > 5);
        for p in &pieces {
            assert!(fence(p).is_none(), "{pieces:?}");
        }
        assert_eq!(pieces.concat().replace('\u{200B}', ""), run);
    }

    #[test]
    fn a_long_fence_line_is_never_cut() {
        // Found by fuzzing: "~~~After the code..." cut after "~~~After ", between
        // pieces, left the first piece inside a block it never closed.
        let text = format!(
            "intro\n~~~After the code {}\ncode\n~~~\n",
            "word ".repeat(30)
        );
        let pieces = chunk(&text, 16);
        for p in &pieces {
            assert!(p.chars().count() <= 16 && fences_balanced(p), "{pieces:?}");
        }
        let closer = format!("```\ncode\n```{}\nafter\n", " ".repeat(40));
        for p in chunk(&closer, 16) {
            assert!(p.chars().count() <= 16 && fences_balanced(&p), "{p:?}");
        }
    }

    #[test]
    fn a_piece_that_renders_longer_is_cut_smaller() {
        // Found by fuzzing: 16 characters that Telegram's HTML shows as 18.
        let text = "n\n#\no-e\n- t\n\n~Ti ".repeat(40);
        let measure =
            |p: &str| crate::markdown::html_visible_len(&crate::markdown::telegram_html(p));
        assert!(chunk(&text, 64).iter().any(|p| measure(p) > 64));
        let pieces = chunk_to_fit(&text, 64, &measure);
        for p in &pieces {
            assert!(measure(p) <= 64, "{p:?}");
        }
        let words = |s: &str| s.split_whitespace().collect::<Vec<_>>().concat();
        assert_eq!(words(&pieces.concat()), words(&text));
    }

    #[test]
    fn an_opening_line_longer_than_a_piece_reopens_with_its_marker_alone() {
        let text = format!("```{}\n{}```\n", "a".repeat(40), "code line\n".repeat(20));
        let pieces = chunk(&text, 16);
        for p in &pieces {
            assert!(p.chars().count() <= 16, "{p:?}");
        }
        assert!(
            pieces.iter().skip(3).any(|p| p.starts_with("```\n")),
            "{pieces:?}"
        );
    }
}
