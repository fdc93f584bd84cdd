//! SQL splits into its top-level statements where psql would split it: at a
//! `;` outside quotes, comments, parentheses and the `BEGIN … END` body of a
//! SQL-standard function, so a statement's byte range can be found again in
//! the file it came from.

/// A statement's byte range, from its first token to the end of its last one
/// (comments and the `;` excluded).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Span {
    pub(super) start: usize,
    pub(super) end: usize,
}

fn is_ident_start(c: u8) -> bool {
    c.is_ascii_alphabetic() || c == b'_' || c >= 0x80
}

fn is_ident_cont(c: u8) -> bool {
    is_ident_start(c) || c.is_ascii_digit() || c == b'$'
}

/// Splits SQL into its non-empty top-level statements the way psql does:
/// `;` ends a statement outside quotes (`'…'`, `E'…'`, `"…"`, `$tag$…$tag$`),
/// comments (`--`, nested `/* */`), parentheses and `BEGIN … END` blocks of
/// `CREATE [OR REPLACE] FUNCTION|PROCEDURE` (SQL-standard bodies).
pub(super) fn split_statements(sql: &str) -> Vec<Span> {
    let b = sql.as_bytes();
    let n = b.len();
    let mut out = Vec::new();
    let mut i = 0;
    let mut start: Option<usize> = None;
    let mut last_end = 0;
    let mut parens = 0u32;
    let mut begin_depth = 0u32;
    // First letters of leading CREATE / OR / REPLACE / FUNCTION / PROCEDURE.
    let mut leading = [0u8; 4];
    let mut words = 0usize;
    while i < n {
        let c = b[i];
        if c.is_ascii_whitespace() {
            i += 1;
            continue;
        }
        if c == b'-' && b.get(i + 1) == Some(&b'-') {
            while i < n && b[i] != b'\n' {
                i += 1;
            }
            continue;
        }
        if c == b'/' && b.get(i + 1) == Some(&b'*') {
            let mut depth = 1;
            i += 2;
            while i < n && depth > 0 {
                if b[i] == b'/' && b.get(i + 1) == Some(&b'*') {
                    depth += 1;
                    i += 2;
                } else if b[i] == b'*' && b.get(i + 1) == Some(&b'/') {
                    depth -= 1;
                    i += 2;
                } else {
                    i += 1;
                }
            }
            continue;
        }
        if c == b';' && parens == 0 && begin_depth == 0 {
            if let Some(s) = start.take() {
                out.push(Span {
                    start: s,
                    end: last_end,
                });
            }
            leading = [0; 4];
            words = 0;
            i += 1;
            continue;
        }
        if start.is_none() {
            start = Some(i);
        }
        match c {
            b'\'' => {
                let escapes = i >= 1
                    && matches!(b[i - 1], b'e' | b'E')
                    && (i < 2 || !is_ident_cont(b[i - 2]));
                i = skip_quoted(b, i, b'\'', escapes);
            }
            b'"' => i = skip_quoted(b, i, b'"', false),
            b'$' => i = dollar_quote_end(b, i).unwrap_or(i + 1),
            b'(' => {
                parens += 1;
                i += 1;
            }
            b')' => {
                parens = parens.saturating_sub(1);
                i += 1;
            }
            c if is_ident_start(c) => {
                let w = i;
                while i < n && is_ident_cont(b[i]) {
                    i += 1;
                }
                let word = &b[w..i];
                if words < leading.len() {
                    for key in [&b"create"[..], b"or", b"replace", b"function", b"procedure"] {
                        if word.eq_ignore_ascii_case(key) {
                            leading[words] = key[0];
                        }
                    }
                }
                words += 1;
                let in_routine = leading[0] == b'c'
                    && (leading[1] == b'f'
                        || leading[1] == b'p'
                        || (leading[1] == b'o'
                            && leading[2] == b'r'
                            && (leading[3] == b'f' || leading[3] == b'p')));
                if in_routine && parens == 0 {
                    if word.eq_ignore_ascii_case(b"begin") {
                        begin_depth += 1;
                    } else if word.eq_ignore_ascii_case(b"case") {
                        if begin_depth >= 1 {
                            begin_depth += 1;
                        }
                    } else if word.eq_ignore_ascii_case(b"end") {
                        begin_depth = begin_depth.saturating_sub(1);
                    }
                }
            }
            b'0'..=b'9' => {
                while i < n && (is_ident_cont(b[i]) || b[i] == b'.') && b[i] != b'$' {
                    i += 1;
                }
            }
            _ => i += 1,
        }
        last_end = i.min(n);
    }
    if let Some(s) = start {
        out.push(Span {
            start: s,
            end: last_end,
        });
    }
    out
}

/// End (exclusive) of the quoted token opened at `open`; `''` (or `""`) is an
/// escaped quote, and with `backslashes` (E-strings) so is `\'`.
fn skip_quoted(b: &[u8], open: usize, quote: u8, backslashes: bool) -> usize {
    let mut j = open + 1;
    while j < b.len() {
        if backslashes && b[j] == b'\\' {
            j += 2;
        } else if b[j] == quote {
            if b.get(j + 1) == Some(&quote) {
                j += 2;
            } else {
                return j + 1;
            }
        } else {
            j += 1;
        }
    }
    b.len()
}

/// If a dollar quote `$tag$` opens at `open`, the end (exclusive) of its
/// closing tag (or of the text, if unterminated).
fn dollar_quote_end(b: &[u8], open: usize) -> Option<usize> {
    if open > 0 && is_ident_cont(b[open - 1]) {
        return None;
    }
    let mut j = open + 1;
    if j < b.len() && (b[j].is_ascii_alphabetic() || b[j] == b'_' || b[j] >= 0x80) {
        while j < b.len() && (b[j].is_ascii_alphanumeric() || b[j] == b'_' || b[j] >= 0x80) {
            j += 1;
        }
    }
    if b.get(j) != Some(&b'$') {
        return None;
    }
    let tag = &b[open..=j];
    let body = j + 1;
    Some(
        b.get(body..)
            .and_then(|rest| rest.windows(tag.len()).position(|w| w == tag))
            .map_or(b.len(), |p| body + p + tag.len()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn texts(sql: &str) -> Vec<&str> {
        split_statements(sql)
            .iter()
            .map(|s| &sql[s.start..s.end])
            .collect()
    }

    #[test]
    fn splits_top_level_semicolons_only() {
        let sql = "-- leading; comment\nCREATE TABLE a (x text DEFAULT ';');\n\n\
                   /* block ; /* nested ; */ still */ INSERT INTO \"we;ird\" VALUES (E'it\\'s;');\n\
                   CREATE FUNCTION f() RETURNS int LANGUAGE plpgsql AS $body$\nBEGIN\n  RETURN 1; -- x\nEND;\n$body$;\n\
                   ;;  SELECT $$a;b$$, $1  \n";
        assert_eq!(
            texts(sql),
            vec![
                "CREATE TABLE a (x text DEFAULT ';')",
                "INSERT INTO \"we;ird\" VALUES (E'it\\'s;')",
                "CREATE FUNCTION f() RETURNS int LANGUAGE plpgsql AS $body$\nBEGIN\n  RETURN 1; -- x\nEND;\n$body$",
                "SELECT $$a;b$$, $1",
            ]
        );
    }

    #[test]
    fn keeps_begin_atomic_bodies_together() {
        let sql = "CREATE OR REPLACE FUNCTION g(x int) RETURNS int LANGUAGE sql\nBEGIN ATOMIC\n  SELECT CASE WHEN x > 0 THEN 1 ELSE 2 END;\n  SELECT 3;\nEND;\nBEGIN; SELECT 1; END;";
        assert_eq!(
            texts(sql),
            vec![
                "CREATE OR REPLACE FUNCTION g(x int) RETURNS int LANGUAGE sql\nBEGIN ATOMIC\n  SELECT CASE WHEN x > 0 THEN 1 ELSE 2 END;\n  SELECT 3;\nEND",
                "BEGIN",
                "SELECT 1",
                "END",
            ]
        );
    }

    #[test]
    fn empty_and_comment_only_text_has_no_statements() {
        assert!(split_statements("").is_empty());
        assert!(split_statements("  -- nothing\n/* here */ ;\n").is_empty());
    }
}
