//! Repository and tag globs: `*` and `?` stay inside one path segment, `**` crosses `/`.
//! Hand-written (30 lines) rather than `globset`, whose regex engine would be a heavy
//! dependency for patterns this small, and whose `*` semantics differ per option.

/// A compiled pattern; the literal length decides "longest match wins".
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Glob {
    pattern: String,
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
        Ok(Glob {
            pattern: pattern.to_string(),
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
        matches(self.pattern.as_bytes(), s.as_bytes())
    }
}

fn matches(p: &[u8], s: &[u8]) -> bool {
    match p {
        [] => s.is_empty(),
        [b'*', b'*', rest @ ..] => {
            // `**/` also matches zero segments: `a/**/b` matches `a/b`.
            let rest_noslash = rest.strip_prefix(b"/").unwrap_or(rest);
            (0..=s.len()).any(|i| matches(rest, &s[i..]))
                || (rest.first() == Some(&b'/') && matches(rest_noslash, s))
        }
        [b'*', rest @ ..] => {
            let seg = s.iter().position(|&c| c == b'/').unwrap_or(s.len());
            (0..=seg).any(|i| matches(rest, &s[i..]))
        }
        [b'?', rest @ ..] => matches!(s.first(), Some(c) if *c != b'/') && matches(rest, &s[1..]),
        [c, rest @ ..] => s.first() == Some(c) && matches(rest, &s[1..]),
    }
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

    #[test]
    fn specificity_orders_longest_first() {
        let s = |p: &str| Glob::new(p).unwrap().specificity();
        assert!(s("billing/api/**") > s("billing/**"));
        assert!(s("billing/**") > s("**"));
        assert!(Glob::new("").is_err());
        assert!(Glob::new("a/***").is_err());
    }
}
