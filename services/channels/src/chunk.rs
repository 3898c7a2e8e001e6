//! Splitting a reply into platform messages: at most `limit` characters each, cut at
//! paragraph, then line, then word boundaries, and never inside a code block — a block
//! that must be cut is closed at the end of one piece and opened again (with its
//! language) at the start of the next, so every piece renders on its own.

/// A fence line opening or closing a code block (```` ``` ```` or `~~~`, up to three
/// spaces of indent), and its marker.
fn fence(line: &str) -> Option<&str> {
    let t = line.trim_start_matches(' ');
    if line.len() - t.len() > 3 {
        return None;
    }
    ["```", "~~~"].into_iter().find(|m| t.starts_with(m))
}

/// `text` in pieces of at most `limit` characters (`limit` ≥ 16).
pub fn chunk(text: &str, limit: usize) -> Vec<String> {
    let limit = limit.max(16);
    if text.chars().count() <= limit {
        return vec![text.to_owned()];
    }
    let mut pieces = Vec::new();
    let mut cur = String::new();
    let mut cur_len = 0usize;
    // The opening line of the code block we are in.
    let mut open: Option<String> = None;
    for line in text.split_inclusive('\n') {
        let marker = fence(line);
        // What closing the block at a cut costs (a newline and the marker).
        let reserve = open.as_ref().map_or(0, |_| 4);
        let line_len = line.chars().count();
        if cur_len + line_len + reserve > limit && cur_len > 0 {
            flush(&mut pieces, &mut cur, &mut cur_len, open.as_deref());
        }
        // A line longer than a piece can hold: cut it on its own.
        let room = limit - reserve - open.as_ref().map_or(0, |o| o.chars().count() + 1);
        if line_len > room.max(8) {
            for part in split_long(line, room.max(8)) {
                if cur_len + part.chars().count() + reserve > limit && cur_len > 0 {
                    flush(&mut pieces, &mut cur, &mut cur_len, open.as_deref());
                }
                cur_len += part.chars().count();
                cur.push_str(&part);
            }
        } else {
            cur_len += line_len;
            cur.push_str(line);
        }
        if let Some(m) = marker {
            match &open {
                Some(o)
                    if o.trim_start().starts_with(m)
                        && line.trim().trim_start_matches(m).is_empty() =>
                {
                    open = None
                }
                Some(_) => {}
                None => open = Some(line.trim_end_matches('\n').to_owned()),
            }
        }
    }
    if !cur.trim().is_empty() {
        pieces.push(cur);
    }
    pieces
}

/// Ends the current piece (closing an open code block) and starts the next (opening
/// it again).
fn flush(pieces: &mut Vec<String>, cur: &mut String, cur_len: &mut usize, open: Option<&str>) {
    let mut piece = std::mem::take(cur);
    if let Some(o) = open {
        if !piece.ends_with('\n') {
            piece.push('\n');
        }
        let marker = fence(o).unwrap_or("```");
        piece.push_str(marker);
        cur.push_str(o);
        cur.push('\n');
    }
    let trimmed = piece.trim_end_matches('\n').to_owned();
    if !trimmed.trim().is_empty() {
        pieces.push(trimmed);
    }
    *cur_len = cur.chars().count();
}

/// A line cut into parts of at most `max` characters, at a space where one is near.
fn split_long(line: &str, max: usize) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest: &str = line;
    while rest.chars().count() > max {
        let cut = rest
            .char_indices()
            .nth(max)
            .map(|(i, _)| i)
            .unwrap_or(rest.len());
        // Prefer the last space in the second half of the part.
        let at = rest[..cut]
            .rfind(' ')
            .filter(|&i| i > cut / 2)
            .map(|i| i + 1)
            .unwrap_or(cut);
        out.push(rest[..at].to_owned());
        rest = &rest[at..];
    }
    out.push(rest.to_owned());
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
        }
    }
}
