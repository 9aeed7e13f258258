//! Names: repositories, tags, references, shard keys and the ids of nodes, racks and uploads.

use std::fmt;
use std::num::NonZeroUsize;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::digest::Digest;

/// Why a string was refused as an identifier. `unsupported` separates "well-formed but not
/// something we implement" (an unknown digest algorithm) from plain malformed input, because
/// the OCI API answers the two with different error codes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {kind} {input:?}: {reason}")]
pub struct ParseError {
    kind: &'static str,
    input: String,
    reason: &'static str,
    unsupported: bool,
}

impl ParseError {
    pub(crate) fn new(kind: &'static str, input: &str, reason: &'static str) -> Self {
        // Echo at most a short prefix: error messages end up in logs and responses.
        let input: String = input.chars().take(80).collect();
        ParseError {
            kind,
            input,
            reason,
            unsupported: false,
        }
    }

    pub(crate) fn unsupported(kind: &'static str, input: &str, reason: &'static str) -> Self {
        ParseError {
            unsupported: true,
            ..ParseError::new(kind, input, reason)
        }
    }

    pub fn kind(&self) -> &'static str {
        self.kind
    }

    pub fn is_unsupported(&self) -> bool {
        self.unsupported
    }
}

macro_rules! string_newtype {
    ($ty:ident) => {
        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
        impl fmt::Debug for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({:?})", stringify!($ty), self.0)
            }
        }
        impl $ty {
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }
        impl AsRef<str> for $ty {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
        impl TryFrom<String> for $ty {
            type Error = ParseError;
            fn try_from(s: String) -> Result<Self, ParseError> {
                s.parse()
            }
        }
        impl From<$ty> for String {
            fn from(v: $ty) -> String {
                v.0
            }
        }
    };
}

/// One path component of a repository name: `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`.
fn is_path_component(c: &str) -> bool {
    let b = c.as_bytes();
    let alnum = |x: u8| x.is_ascii_lowercase() || x.is_ascii_digit();
    if b.is_empty() || !alnum(b[0]) || !alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if alnum(b[i]) {
            i += 1;
            continue;
        }
        // A separator run: ".", "_", "__" or "-+", always followed by an alnum.
        let start = i;
        match b[i] {
            b'.' => i += 1,
            b'_' => {
                i += 1;
                if i < b.len() && b[i] == b'_' {
                    i += 1;
                }
            }
            b'-' => {
                while i < b.len() && b[i] == b'-' {
                    i += 1;
                }
            }
            _ => return false,
        }
        if i == start || i >= b.len() || !alnum(b[i]) {
            return false;
        }
    }
    true
}

/// A repository name.
///
/// Grammar (OCI distribution-spec): `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*(\/[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*)*`,
/// at most 255 bytes. Every component starts with `[a-z0-9]`, so `.`, `..`, empty components
/// and anything beginning with `_` (our reserved directory prefix) cannot occur, which is
/// what makes a `RepoName` safe to use as a relative path.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct RepoName(String);
string_newtype!(RepoName);

impl RepoName {
    pub const MAX_LEN: usize = 255;

    pub fn components(&self) -> impl Iterator<Item = &str> {
        self.0.split('/')
    }

    /// The service/mode this repository belongs to: its first `depth` components.
    /// `billing/api/worker` at depth 2 is `billing/api`; a shorter name is its own key.
    pub fn shard_key(&self, depth: NonZeroUsize) -> ShardKey {
        let end = self
            .0
            .match_indices('/')
            .nth(depth.get() - 1)
            .map(|(i, _)| i)
            .unwrap_or(self.0.len());
        ShardKey(self.0[..end].to_owned())
    }
}

impl FromStr for RepoName {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, ParseError> {
        if s.len() > Self::MAX_LEN {
            return Err(ParseError::new(
                "repository name",
                s,
                "longer than 255 bytes",
            ));
        }
        if !s.split('/').all(is_path_component) {
            return Err(ParseError::new(
                "repository name",
                s,
                "does not match the OCI name grammar",
            ));
        }
        Ok(RepoName(s.to_owned()))
    }
}

/// A tag: `[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Tag(String);
string_newtype!(Tag);

impl FromStr for Tag {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, ParseError> {
        let b = s.as_bytes();
        let first_ok = b
            .first()
            .is_some_and(|c| c.is_ascii_alphanumeric() || *c == b'_');
        let rest_ok = b[1.min(b.len())..]
            .iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'));
        if !first_ok || !rest_ok || b.len() > 128 {
            return Err(ParseError::new(
                "tag",
                s,
                "does not match the OCI tag grammar",
            ));
        }
        Ok(Tag(s.to_owned()))
    }
}

/// The `<reference>` of a manifest URL: a tag or a digest. A string containing `:` can
/// only be a digest, because tags cannot contain `:`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Reference {
    Tag(Tag),
    Digest(Digest),
}

impl FromStr for Reference {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, ParseError> {
        if s.contains(':') {
            s.parse().map(Reference::Digest)
        } else {
            s.parse().map(Reference::Tag)
        }
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reference::Tag(t) => t.fmt(f),
            Reference::Digest(d) => d.fmt(f),
        }
    }
}

/// A service/mode: the first `shard_key_depth` components of a repository name. Built from
/// a [`RepoName`] (or parsed with the same grammar), so it is always a valid name prefix.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ShardKey(String);
string_newtype!(ShardKey);

impl ShardKey {
    /// Whether `repo` belongs to this key at the given depth.
    pub fn contains(&self, repo: &RepoName, depth: NonZeroUsize) -> bool {
        repo.shard_key(depth) == *self
    }
}

impl FromStr for ShardKey {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, ParseError> {
        let name: RepoName = s
            .parse()
            .map_err(|_| ParseError::new("shard key", s, "not a valid repository name prefix"))?;
        Ok(ShardKey(name.0))
    }
}

/// Identifier of a short operator-chosen label: `[a-z0-9][a-z0-9_-]{0,62}`.
fn is_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'-' | b'_'))
}

/// A registry node's id (`n1`, `reg-a`): a label `[a-z0-9][a-z0-9_-]{0,62}`, stable across
/// restarts and disk replacements.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct NodeId(String);
string_newtype!(NodeId);

impl FromStr for NodeId {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, ParseError> {
        if !is_label(s) {
            return Err(ParseError::new(
                "node id",
                s,
                "must match [a-z0-9][a-z0-9_-]{0,62}",
            ));
        }
        Ok(NodeId(s.to_owned()))
    }
}

/// A rack (failure domain) label, same grammar as [`NodeId`].
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct RackId(String);
string_newtype!(RackId);

impl FromStr for RackId {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, ParseError> {
        if !is_label(s) {
            return Err(ParseError::new(
                "rack id",
                s,
                "must match [a-z0-9][a-z0-9_-]{0,62}",
            ));
        }
        Ok(RackId(s.to_owned()))
    }
}

/// An upload session id as it appears in a `Location` URL: `[A-Za-z0-9_.-]{1,128}`, not
/// starting with `.`. Nodes generate UUIDs; the router prefixes the owning node as
/// `<node-id>.<uuid>` (node ids contain no `.`), so a session stays on its node.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct UploadId(String);
string_newtype!(UploadId);

impl FromStr for UploadId {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, ParseError> {
        let ok = !s.is_empty()
            && s.len() <= 128
            && !s.starts_with('.')
            && !s.contains("..")
            && s.bytes()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'));
        if !ok {
            return Err(ParseError::new(
                "upload id",
                s,
                "must match [A-Za-z0-9_.-]{1,128} without a leading dot or '..'",
            ));
        }
        Ok(UploadId(s.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn check_name(input: &str, ok: bool) {
        assert_eq!(input.parse::<RepoName>().is_ok(), ok, "{input:?}");
    }

    #[test]
    fn name_grammar() {
        for good in [
            "a",
            "billing/api",
            "billing/api/worker",
            "a.b_c__d---e/f0",
            "library/ubuntu",
            "0/1/2",
        ] {
            check_name(good, true);
        }
        for bad in [
            "",
            "A",
            "a/",
            "/a",
            "a//b",
            "../etc",
            "a/../b",
            "a/./b",
            ".a",
            "a.",
            "a..b",
            "a___b",
            "a_-b",
            "_a",
            "a/_manifests",
            "a%2fb",
            "a b",
            "a\\b",
        ] {
            check_name(bad, false);
        }
        check_name(&"a".repeat(255), true);
        check_name(&"a".repeat(256), false);
    }

    #[test]
    fn tag_grammar() {
        for good in ["latest", "v1.0", "_x", "A-b_c.d", &"a".repeat(128)] {
            assert!(good.parse::<Tag>().is_ok(), "{good}");
        }
        for bad in ["", ".x", "-x", "a:b", "a/b", &"a".repeat(129)] {
            assert!(bad.parse::<Tag>().is_err(), "{bad}");
        }
    }

    #[test]
    fn reference_dispatch() {
        assert!(matches!("v1".parse::<Reference>(), Ok(Reference::Tag(_))));
        let d = format!("sha256:{}", "b".repeat(64));
        assert!(matches!(d.parse::<Reference>(), Ok(Reference::Digest(_))));
        assert!("sha256:xyz".parse::<Reference>().is_err());
    }

    #[test]
    fn shard_keys() {
        let two = NonZeroUsize::new(2).unwrap();
        let one = NonZeroUsize::new(1).unwrap();
        let key = |n: &str, d| n.parse::<RepoName>().unwrap().shard_key(d).to_string();
        assert_eq!(key("billing/api/worker", two), "billing/api");
        assert_eq!(key("billing/api", two), "billing/api");
        assert_eq!(key("billing", two), "billing");
        assert_eq!(key("billing/api/worker", one), "billing");
    }

    #[test]
    fn ids() {
        assert!("n1".parse::<NodeId>().is_ok());
        assert!("N1".parse::<NodeId>().is_err());
        assert!("../x".parse::<NodeId>().is_err());
        assert!("r-1".parse::<RackId>().is_ok());
        assert!("3f0e-ab_Z".parse::<UploadId>().is_ok());
        assert!("a/b".parse::<UploadId>().is_err());
        assert!("n1.3f0e".parse::<UploadId>().is_ok());
        assert!("..".parse::<UploadId>().is_err());
        assert!(".x".parse::<UploadId>().is_err());
        assert!("".parse::<UploadId>().is_err());
    }

    proptest! {
        #[test]
        fn name_roundtrip_and_path_safety(s in "[a-z0-9._/-]{1,40}") {
            if let Ok(n) = s.parse::<RepoName>() {
                prop_assert_eq!(n.to_string(), s.clone());
                for c in n.components() {
                    prop_assert!(!c.is_empty() && c != "." && c != ".." && !c.starts_with('_'));
                }
            }
        }

        #[test]
        fn valid_names_parse(parts in proptest::collection::vec("[a-z0-9]{1,5}([._-][a-z0-9]{1,5})?", 1..5)) {
            let s = parts.join("/");
            prop_assert!(s.parse::<RepoName>().is_ok(), "{}", s);
        }
    }
}
