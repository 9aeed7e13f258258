//! Content digests (`algorithm:encoded`) and the hasher that produces them.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use sha2::Digest as _;

use crate::names::ParseError;

/// The digest algorithms Flotilla accepts. sha256 is required by the spec, sha512 is
/// optional and supported; anything else is refused before it reaches a path.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Algorithm {
    Sha256,
    Sha512,
}

impl Algorithm {
    pub fn as_str(self) -> &'static str {
        match self {
            Algorithm::Sha256 => "sha256",
            Algorithm::Sha512 => "sha512",
        }
    }

    fn hex_len(self) -> usize {
        match self {
            Algorithm::Sha256 => 64,
            Algorithm::Sha512 => 128,
        }
    }
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A content digest, `algorithm ":" encoded`.
///
/// Grammar (OCI image-spec, restricted to the registered algorithms we support):
/// `sha256:[a-f0-9]{64}` or `sha512:[a-f0-9]{128}`. Upper-case hex is refused, as the
/// image-spec requires, so a digest has exactly one spelling and one storage path.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Digest {
    algorithm: Algorithm,
    hex: String,
}

impl Digest {
    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    /// The encoded part: lowercase hex of the exact length of the algorithm.
    pub fn hex(&self) -> &str {
        &self.hex
    }

    /// Digest of a byte slice; used for manifests, which are small and already in memory.
    pub fn of(algorithm: Algorithm, bytes: &[u8]) -> Digest {
        let mut h = DigestHasher::new(algorithm);
        h.update(bytes);
        h.finish()
    }

    pub fn sha256_of(bytes: &[u8]) -> Digest {
        Digest::of(Algorithm::Sha256, bytes)
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.algorithm, self.hex)
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for Digest {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (alg, hex) = s
            .split_once(':')
            .ok_or_else(|| ParseError::new("digest", s, "missing ':' separator"))?;
        let algorithm = match alg {
            "sha256" => Algorithm::Sha256,
            "sha512" => Algorithm::Sha512,
            _ => {
                return Err(ParseError::unsupported(
                    "digest",
                    s,
                    "unsupported algorithm",
                ))
            }
        };
        if hex.len() != algorithm.hex_len() {
            return Err(ParseError::new("digest", s, "wrong encoded length"));
        }
        if !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(ParseError::new(
                "digest",
                s,
                "encoded part must be lowercase hex",
            ));
        }
        Ok(Digest {
            algorithm,
            hex: hex.to_owned(),
        })
    }
}

impl TryFrom<String> for Digest {
    type Error = ParseError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<Digest> for String {
    fn from(d: Digest) -> String {
        d.to_string()
    }
}

/// Incremental hasher; the upload path feeds it chunk by chunk as bytes arrive, so a
/// digest never needs a second read of the data.
#[derive(Clone)]
pub enum DigestHasher {
    Sha256(sha2::Sha256),
    Sha512(sha2::Sha512),
}

impl fmt::Debug for DigestHasher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DigestHasher({})", self.algorithm())
    }
}

impl DigestHasher {
    pub fn new(algorithm: Algorithm) -> Self {
        match algorithm {
            Algorithm::Sha256 => DigestHasher::Sha256(sha2::Sha256::new()),
            Algorithm::Sha512 => DigestHasher::Sha512(sha2::Sha512::new()),
        }
    }

    pub fn algorithm(&self) -> Algorithm {
        match self {
            DigestHasher::Sha256(_) => Algorithm::Sha256,
            DigestHasher::Sha512(_) => Algorithm::Sha512,
        }
    }

    pub fn update(&mut self, bytes: &[u8]) {
        match self {
            DigestHasher::Sha256(h) => h.update(bytes),
            DigestHasher::Sha512(h) => h.update(bytes),
        }
    }

    pub fn finish(self) -> Digest {
        let (algorithm, hex) = match self {
            DigestHasher::Sha256(h) => (Algorithm::Sha256, hex::encode(h.finalize())),
            DigestHasher::Sha512(h) => (Algorithm::Sha512, hex::encode(h.finalize())),
        };
        Digest { algorithm, hex }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(input: &str, ok: bool) {
        assert_eq!(input.parse::<Digest>().is_ok(), ok, "{input}");
    }

    #[test]
    fn grammar() {
        let h64 = "a".repeat(64);
        let h128 = "0".repeat(128);
        check(&format!("sha256:{h64}"), true);
        check(&format!("sha512:{h128}"), true);
        check(&format!("sha512:{h64}"), false);
        check(&format!("sha256:{}", "A".repeat(64)), false);
        check(&format!("sha256:{}", "g".repeat(64)), false);
        check(&format!("md5:{h64}"), false);
        check(&format!("sha256{h64}"), false);
        check("sha256:../../etc/passwd", false);
        check("", false);
    }

    #[test]
    fn unsupported_algorithm_is_distinguished() {
        let e = format!("sha384:{}", "a".repeat(96))
            .parse::<Digest>()
            .unwrap_err();
        assert!(e.is_unsupported());
        let e = "sha256:zz".parse::<Digest>().unwrap_err();
        assert!(!e.is_unsupported());
    }

    #[test]
    fn known_vectors() {
        assert_eq!(
            Digest::sha256_of(b"").to_string(),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        let mut h = DigestHasher::new(Algorithm::Sha256);
        h.update(b"ab");
        h.update(b"c");
        assert_eq!(h.finish(), Digest::sha256_of(b"abc"));
        assert!(Digest::of(Algorithm::Sha512, b"abc")
            .to_string()
            .starts_with("sha512:ddaf35a1"));
    }

    #[test]
    fn serde_validates() {
        let bad: Result<Digest, _> = serde_json::from_str("\"sha256:nothex\"");
        assert!(bad.is_err());
        let d = Digest::sha256_of(b"x");
        let s = serde_json::to_string(&d).unwrap();
        assert_eq!(serde_json::from_str::<Digest>(&s).unwrap(), d);
    }
}
