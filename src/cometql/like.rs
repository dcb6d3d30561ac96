//! SQL `LIKE` matching for `SHOW VARIABLES|STATUS LIKE '...'`, with MySQL's
//! rules: `%` matches any run of characters (none too), `_` exactly one
//! character, `\` makes the next character literal (a `\` at the very end
//! stands for itself), and letters compare case-insensitively, as under
//! MySQL's default collation.
//!
//! The pattern comes from the client, so the matcher must not be
//! exploitable: the first version backtracked into every `%` and took 41 s
//! on `'%%%%%%%%%%%%q'`. This one is the greedy wildcard algorithm that
//! remembers only the last `%`: at most (text + 1) x (pattern + 1) steps,
//! no recursion and no allocation.

/// Whether `text` matches the LIKE `pattern`.
pub fn like_match(pattern: &str, text: &str) -> bool {
    like_match_steps(pattern, text).0
}

/// One pattern element.
#[derive(Clone, Copy)]
enum Token {
    /// `%`
    Any,
    /// `_`
    One,
    /// A character, maybe written escaped.
    Lit(char),
}

/// The token at byte `i` of `pattern` and the byte where the next one starts.
fn token_at(pattern: &str, i: usize) -> (Token, usize) {
    let mut chars = pattern[i..].chars();
    match chars.next() {
        Some('%') => (Token::Any, i + 1),
        Some('_') => (Token::One, i + 1),
        Some('\\') => match chars.next() {
            Some(c) => (Token::Lit(c), i + 1 + c.len_utf8()),
            None => (Token::Lit('\\'), i + 1),
        },
        Some(c) => (Token::Lit(c), i + c.len_utf8()),
        // Callers only ask below `pattern.len()`, which is a char boundary.
        None => (Token::Lit('\0'), pattern.len()),
    }
}

/// Case-insensitive character equality: ASCII fast, otherwise by Unicode
/// lower-case mapping. (MySQL's `_ci` collations also ignore some accents;
/// the names SHOW matches are ASCII, so that is not worth a table here.)
fn same(a: char, b: char) -> bool {
    if a == b {
        return true;
    }
    if a.is_ascii() && b.is_ascii() {
        return a.eq_ignore_ascii_case(&b);
    }
    a.to_lowercase().eq(b.to_lowercase())
}

/// The match and the number of steps it took (each loop turn is one step),
/// so tests can bound the work without a clock.
///
/// Why the bound holds: the loop keeps one backtrack point, the last `%`
/// seen and the text position it currently stops at. Every backtrack moves
/// that position one character right and it never moves left (a later `%`
/// is always met at or right of it), so there are at most `text` backtracks;
/// between two, the pattern position only moves forward. Hence at most
/// (text + 1) x (pattern + 1) steps, and about `pattern + text` for a pattern
/// made of `%` and one character that never matches.
fn like_match_steps(pattern: &str, text: &str) -> (bool, u64) {
    let (mut p, mut t) = (0usize, 0usize);
    // (pattern byte after the last `%`, text byte where that `%` stops)
    let mut star: Option<(usize, usize)> = None;
    let mut steps = 0u64;
    loop {
        steps += 1;
        if p < pattern.len() {
            let (tok, next) = token_at(pattern, p);
            let c = text[t..].chars().next();
            let matched = match tok {
                Token::Any => {
                    p = next;
                    star = Some((p, t));
                    continue;
                }
                Token::One => c,
                Token::Lit(l) => c.filter(|&c| same(l, c)),
            };
            if let Some(c) = matched {
                p = next;
                t += c.len_utf8();
                continue;
            }
        } else if t == text.len() {
            return (true, steps);
        } else if star.is_some_and(|(sp, _)| sp == pattern.len()) {
            // The pattern ends with `%`: it takes the rest of the text.
            return (true, steps);
        }
        // Mismatch: let the last `%` take one more character and retry.
        match star {
            Some((sp, st)) => match text[st..].chars().next() {
                Some(c) => {
                    let st = st + c.len_utf8();
                    star = Some((sp, st));
                    p = sp;
                    t = st;
                }
                None => return (false, steps),
            },
            None => return (false, steps),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The old backtracking matcher, kept as the reference the fast one
    /// must agree with (exponential, so only for short inputs).
    fn reference(p: &str, t: &str) -> bool {
        fn go(p: &[char], t: &[char]) -> bool {
            match p.split_first() {
                None => t.is_empty(),
                Some(('%', rest)) => (0..=t.len()).any(|k| go(rest, &t[k..])),
                Some(('_', rest)) => !t.is_empty() && go(rest, &t[1..]),
                Some(('\\', rest)) if !rest.is_empty() => {
                    !t.is_empty() && same(t[0], rest[0]) && go(&rest[1..], &t[1..])
                }
                Some((c, rest)) => !t.is_empty() && same(t[0], *c) && go(rest, &t[1..]),
            }
        }
        go(&p.chars().collect::<Vec<_>>(), &t.chars().collect::<Vec<_>>())
    }

    #[test]
    fn like_table_of_cases() {
        let cases: &[(&str, &str, bool)] = &[
            ("max_allowed%", "max_allowed_packet", true),
            ("%VERSION%", "version_comment", true),
            ("version", "VERSION", true),
            ("a_c", "abc", true),
            ("a_c", "abbc", false),
            ("a_c", "ac", false),
            (r"lower\_case%", "lower_case_table_names", true),
            (r"lower\_case%", "lowerXcase_table_names", false),
            (r"100\%", "100%", true),
            (r"100\%", "1000", false),
            (r"a\\b", r"a\b", true),
            ("a\\", "a\\", true),
            ("a\\", "a", false),
            ("", "", true),
            ("", "a", false),
            ("%", "", true),
            ("%", "anything", true),
            ("%%", "x", true),
            ("_", "", false),
            ("_", "é", true),
            ("__", "é", false),
            ("%a%b%c%", "xxaxxbxxcxx", true),
            ("%a%b%c%", "xxcxxbxxaxx", false),
            ("%abc", "ababc", true),
            ("%aab", "aaab", true),
            ("a%a", "a", false),
            ("%q", "aaaa", false),
            ("МИР%", "мир и дом", true),
            ("%_", "", false),
            ("_%_", "ab", true),
        ];
        for &(p, t, want) in cases {
            assert_eq!(like_match(p, t), want, "{p:?} LIKE {t:?}");
            assert_eq!(reference(p, t), want, "reference: {p:?} LIKE {t:?}");
        }
    }

    #[test]
    fn agrees_with_the_backtracking_reference() {
        // A fixed linear congruential sequence: the same inputs every run.
        let mut seed: u64 = 0x2545_F491_4F6C_DD1D;
        let mut next = |n: u64| {
            seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
            (seed >> 33) % n
        };
        let pat_chars = ['a', 'b', 'A', '%', '_', '\\', 'é'];
        let text_chars = ['a', 'b', 'B', '%', '_', '\\', 'É'];
        for _ in 0..20_000 {
            let p: String = (0..next(8)).map(|_| pat_chars[next(7) as usize]).collect();
            let t: String = (0..next(8)).map(|_| text_chars[next(7) as usize]).collect();
            assert_eq!(like_match(&p, &t), reference(&p, &t), "{p:?} LIKE {t:?}");
        }
    }

    #[test]
    fn many_percents_cost_linear_steps() {
        // The query that froze a shard, scaled up: 64 `%`, a character that
        // never matches, against 64 KiB of text.
        let pattern = format!("{}q", "%".repeat(64));
        let text = "a".repeat(64 * 1024);
        let (m, n) = (pattern.chars().count() as u64, text.chars().count() as u64);
        let (matched, steps) = like_match_steps(&pattern, &text);
        assert!(!matched);
        assert!(steps <= m + 2 * (n + 1), "{steps} steps for m={m}, n={n}");
        // And the same text with a match at its very end.
        let mut hit = text.clone();
        hit.push('Q');
        let (matched, steps) = like_match_steps(&pattern, &hit);
        assert!(matched);
        assert!(steps <= m + 2 * (n + 2), "{steps} steps");
    }

    #[test]
    fn worst_case_is_bounded_by_pattern_times_text() {
        // A literal run after `%` that almost matches everywhere: each
        // backtrack re-reads the run, the O(n x m) case.
        let cases = [
            (format!("%{}b", "a".repeat(16)), "a".repeat(64 * 1024)),
            (format!("{}%{}b%", "%_".repeat(32), "a".repeat(31)), "a".repeat(8 * 1024)),
            ("%a%a%a%a%a%a%a%a%a%a%a%a%b".to_string(), "a".repeat(8 * 1024)),
            ("%".repeat(1 << 20), String::new()),
            (format!("{}x", "%".repeat(1 << 20)), "y".repeat(40)),
        ];
        for (pattern, text) in &cases {
            let (m, n) = (pattern.chars().count() as u64, text.chars().count() as u64);
            let (_, steps) = like_match_steps(pattern, text);
            assert!(steps <= (n + 1) * (m + 1), "{steps} steps for m={m}, n={n}");
        }
        // A 1 MiB pattern of `%` against a short name stays linear in the
        // pattern (SHOW VARIABLES tries it on every variable).
        let (m, n) = (1u64 << 20, 40u64);
        let (_, steps) = like_match_steps(&cases[4].0, &cases[4].1);
        assert!(steps <= m + 2 * (n + 2), "{steps} steps");
    }
}
