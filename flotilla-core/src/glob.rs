//! Repository and tag globs: `*` and `?` stay inside one path segment, `**` crosses `/`.
//! Hand-written (a small DP) rather than `globset`, whose regex engine would be a heavy
//! dependency for patterns this small, and whose `*` semantics differ per option.

/// A compiled pattern; the literal length decides "longest match wins".
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Glob {
    pattern: String,
    /// Compiled once: matching runs on every request, against the request's repository.
    form: Form,
}

/// The shapes policies are made of get a test without the general matcher: `**`, a literal
/// prefix then `**` (`billing/**`), a plain name.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Form {
    Everything,
    Prefix(String),
    Exact(String),
    General(Vec<Token>),
}

impl Glob {
    pub fn new(pattern: &str) -> Result<Glob, String> {
        if pattern.is_empty() {
            return Err("an empty pattern matches nothing; use \"**\" for everything".into());
        }
        if pattern.contains("***") {
            return Err(format!(
                "{pattern:?}: \"***\" is not a pattern (use \"**\")"
            ));
        }
        let t = tokens(pattern.as_bytes());
        let literal = |t: &[Token]| {
            t.iter()
                .map(|t| match t {
                    Token::Lit(c) => Some(*c),
                    _ => None,
                })
                .collect::<Option<Vec<u8>>>()
                .and_then(|b| String::from_utf8(b).ok())
        };
        let form = match t.split_last() {
            Some((Token::Any, [])) => Form::Everything,
            // `a/**`: `**` matches any bytes, none included, so exactly the names starting `a/`.
            Some((Token::Any, rest)) => match literal(rest) {
                Some(prefix) => Form::Prefix(prefix),
                None => Form::General(t),
            },
            _ => match literal(&t) {
                Some(exact) => Form::Exact(exact),
                None => Form::General(t),
            },
        };
        Ok(Glob {
            pattern: pattern.to_string(),
            form,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.pattern
    }

    /// How specific the pattern is: its length without wildcards, so `billing/api/**`
    /// outranks `billing/**`, which outranks `**`.
    pub fn specificity(&self) -> usize {
        self.pattern
            .chars()
            .filter(|c| !matches!(c, '*' | '?'))
            .count()
    }

    pub fn matches(&self, s: &str) -> bool {
        match &self.form {
            Form::Everything => true,
            Form::Prefix(p) => s.starts_with(p.as_str()),
            Form::Exact(e) => s == e,
            Form::General(t) => matches(t, s.as_bytes()),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Token {
    /// `**`: any bytes, `/` included.
    Any,
    /// `*`: any bytes within one segment.
    Segment,
    /// `?`: one byte other than `/`.
    One,
    Lit(u8),
}

/// The pattern as tokens (`***` is refused by [`Glob::new`], so a `**` is never split).
fn tokens(p: &[u8]) -> Vec<Token> {
    let mut out = Vec::with_capacity(p.len());
    let mut i = 0;
    while i < p.len() {
        out.push(match p[i] {
            b'*' if p.get(i + 1) == Some(&b'*') => {
                i += 1;
                Token::Any
            }
            b'*' => Token::Segment,
            b'?' => Token::One,
            c => Token::Lit(c),
        });
        i += 1;
    }
    out
}

/// Dynamic programming over (token, byte), from the ends backwards, keeping two rows:
/// O(pattern × name) time whatever the pattern. The backtracking matcher this replaces was
/// exponential in the number of stars (`*a*a*a*a*a*a*a*a*a*a*b` against thirty `a`s took
/// seconds), and it runs on every request against the request's repository name.
fn matches(t: &[Token], s: &[u8]) -> bool {
    let m = s.len();
    // next[j]: tokens i+1.. match s[j..]; after[j]: tokens i+2.. match s[j..].
    let mut next: Vec<bool> = (0..=m).map(|j| j == m).collect();
    let mut after = vec![false; m + 1];
    let mut cur = vec![false; m + 1];
    for i in (0..t.len()).rev() {
        // For `**`: whether it can consume s[j..k] and the rest match s[k..]; the
        // zero-segment skip of `**/` applies only where nothing was consumed.
        let mut any = false;
        for j in (0..=m).rev() {
            let c = s.get(j).copied();
            cur[j] = match t[i] {
                Token::Lit(l) => c == Some(l) && next[j + 1],
                Token::One => c.is_some_and(|c| c != b'/') && next[j + 1],
                Token::Segment => next[j] || (c.is_some_and(|c| c != b'/') && cur[j + 1]),
                // `**/` also matches zero segments: `a/**/b` matches `a/b`.
                Token::Any => {
                    any = next[j] || (c.is_some() && any);
                    any || (t.get(i + 1) == Some(&Token::Lit(b'/')) && after[j])
                }
            };
        }
        std::mem::swap(&mut after, &mut next);
        std::mem::swap(&mut next, &mut cur);
    }
    next[0]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(p: &str, s: &str) -> bool {
        Glob::new(p).unwrap().matches(s)
    }

    #[test]
    fn star_stays_in_a_segment_and_double_star_crosses() {
        assert!(m("**", "a/b/c"));
        assert!(m("public/**", "public/x/y"));
        assert!(!m("public/**", "publicity/x"));
        assert!(m("billing/*", "billing/api"));
        assert!(!m("billing/*", "billing/api/x"));
        assert!(m("billing/*/x", "billing/api/x"));
        assert!(m("a/**/b", "a/b"));
        assert!(m("a/**/b", "a/x/y/b"));
        assert!(!m("a/**/b", "a/x/y/c"));
        assert!(m("v*", "v1.2.3"));
        assert!(!m("v*", "latest"));
        assert!(m("v?", "v1"));
        assert!(!m("v?", "v12"));
        assert!(!m("exact", "exactly"));
    }

    /// The backtracking matcher the DP replaced: the reference for its semantics.
    fn reference(p: &[u8], s: &[u8]) -> bool {
        match p {
            [] => s.is_empty(),
            [b'*', b'*', rest @ ..] => {
                let rest_noslash = rest.strip_prefix(b"/").unwrap_or(rest);
                (0..=s.len()).any(|i| reference(rest, &s[i..]))
                    || (rest.first() == Some(&b'/') && reference(rest_noslash, s))
            }
            [b'*', rest @ ..] => {
                let seg = s.iter().position(|&c| c == b'/').unwrap_or(s.len());
                (0..=seg).any(|i| reference(rest, &s[i..]))
            }
            [b'?', rest @ ..] => {
                matches!(s.first(), Some(c) if *c != b'/') && reference(rest, &s[1..])
            }
            [c, rest @ ..] => s.first() == Some(c) && reference(rest, &s[1..]),
        }
    }

    #[test]
    fn agrees_with_the_backtracking_matcher_on_every_short_input() {
        // Every pattern and name over a small alphabet up to a few bytes long.
        fn all(alphabet: &[u8], max: usize) -> Vec<Vec<u8>> {
            let mut out = vec![vec![]];
            let mut frontier = vec![vec![]];
            for _ in 0..max {
                let mut grown = vec![];
                for w in &frontier {
                    for &c in alphabet {
                        let mut w = w.clone();
                        w.push(c);
                        grown.push(w);
                    }
                }
                out.extend(grown.iter().cloned());
                frontier = grown;
            }
            out
        }
        let names = all(b"a/b", 5);
        let mut checked = 0;
        for p in all(b"*?a/", 5) {
            let Ok(g) = Glob::new(std::str::from_utf8(&p).unwrap()) else {
                continue;
            };
            for s in &names {
                let s = std::str::from_utf8(s).unwrap();
                assert_eq!(
                    g.matches(s),
                    reference(&p, s.as_bytes()),
                    "{:?} against {s:?}",
                    g.as_str()
                );
                checked += 1;
            }
        }
        assert!(checked > 100_000, "{checked}");
    }

    #[test]
    fn many_stars_cost_polynomial_time() {
        // The backtracking matcher needed seconds for ten stars and thirty bytes, and
        // doubled with each further star; this one answers at once. Run in a thread so a
        // regression fails after the bound instead of hanging the suite.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let stars = Glob::new(&"*a".repeat(40)).unwrap();
            let doubles = Glob::new(&format!("{}b", "**a".repeat(40))).unwrap();
            let name = "a".repeat(200);
            let _ = tx.send((stars.matches(&name), doubles.matches(&name)));
        });
        let got = rx
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("matching took over 10 s");
        assert_eq!(got, (true, false));
    }

    #[test]
    fn specificity_orders_longest_first() {
        let s = |p: &str| Glob::new(p).unwrap().specificity();
        assert!(s("billing/api/**") > s("billing/**"));
        assert!(s("billing/**") > s("**"));
        assert!(Glob::new("").is_err());
        assert!(Glob::new("a/***").is_err());
    }
}
