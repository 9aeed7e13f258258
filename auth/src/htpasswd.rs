//! Users from an `htpasswd -B` file. Only bcrypt entries are accepted: the other formats
//! htpasswd writes (MD5-apr1, SHA-1, crypt, plain) are fast to brute-force, so a file that
//! holds one is refused at start with the line and user named, rather than half-loaded.

use std::collections::HashMap;

use crate::AuthError;

/// A parsed htpasswd file: user → bcrypt hash.
#[derive(Clone, Default)]
pub struct Htpasswd {
    users: HashMap<String, String>,
}

impl std::fmt::Debug for Htpasswd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the hashes.
        f.debug_struct("Htpasswd")
            .field("users", &self.users.len())
            .finish()
    }
}

impl Htpasswd {
    pub fn parse(text: &str) -> Result<Htpasswd, AuthError> {
        let mut users = HashMap::new();
        for (i, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let bad = |why: String| AuthError::Htpasswd {
                line: i + 1,
                message: why,
            };
            let (user, hash) = line
                .split_once(':')
                .ok_or_else(|| bad("expected USER:HASH".into()))?;
            if user.is_empty() {
                return Err(bad("empty user name".into()));
            }
            let kind = if hash.starts_with("$2a$")
                || hash.starts_with("$2b$")
                || hash.starts_with("$2y$")
                || hash.starts_with("$2x$")
            {
                None
            } else if hash.starts_with("$apr1$") {
                Some("MD5 (apr1)")
            } else if hash.starts_with("{SHA}") {
                Some("SHA-1")
            } else if hash.starts_with("$5$") || hash.starts_with("$6$") {
                Some("SHA-crypt")
            } else {
                Some("crypt or plain text")
            };
            if let Some(kind) = kind {
                return Err(bad(format!(
                    "user {user:?} has a {kind} hash; only bcrypt is accepted (make entries with `htpasswd -B`)"
                )));
            }
            // Reject malformed bcrypt now, not on the first login.
            if hash.parse::<bcrypt::HashParts>().is_err() {
                return Err(bad(format!("user {user:?}: malformed bcrypt hash")));
            }
            if users.insert(user.to_string(), hash.to_string()).is_some() {
                return Err(bad(format!("user {user:?} appears twice")));
            }
        }
        Ok(Htpasswd { users })
    }

    /// Checks a password (deliberately slow: bcrypt). Unknown users cost a bcrypt too, so
    /// timing does not tell which user names exist.
    pub fn verify(&self, user: &str, password: &str) -> bool {
        const DUMMY: &str = "$2y$10$C6UzMDM.H6dfI/f/IKxGhu5Sm0YF6Yaz9xfFZl/0fDW8uK3G4q5nK";
        match self.users.get(user) {
            Some(hash) => bcrypt::verify(password, hash).unwrap_or(false),
            None => {
                let _ = bcrypt::verify(password, DUMMY);
                false
            }
        }
    }

    pub fn len(&self) -> usize {
        self.users.len()
    }

    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bcrypt_entries_verify_and_others_are_refused_with_their_line() {
        let hash = bcrypt::hash("s3cret", 4).unwrap();
        let file = format!("# users\nalice:{hash}\n\n");
        let h = Htpasswd::parse(&file).unwrap();
        assert!(h.verify("alice", "s3cret"));
        assert!(!h.verify("alice", "wrong"));
        assert!(!h.verify("bob", "s3cret"));

        let err = Htpasswd::parse(&format!("alice:{hash}\nbob:$apr1$abc$def\n")).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("line 2") && msg.contains("bob") && msg.contains("apr1"),
            "{msg}"
        );
        assert!(Htpasswd::parse("carol:{SHA}abc=")
            .unwrap_err()
            .to_string()
            .contains("SHA-1"));
        assert!(Htpasswd::parse("dave:plain").is_err());
        assert!(Htpasswd::parse("nocolon").is_err());
        assert!(Htpasswd::parse("eve:$2y$10$short").is_err());
        assert!(Htpasswd::parse(&format!("a:{hash}\na:{hash}")).is_err());
    }
}
