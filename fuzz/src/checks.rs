//! What each fuzz target asserts, beyond "never panics": whatever a parser accepts is in
//! canonical form and survives a round trip (`Display` then parse gives the same value), and
//! no accepted name can climb out of a directory. Shared verbatim by the cargo-fuzz targets
//! and by `tests/fuzz_corpus.rs`, which replays `fuzz/corpus/<target>/*` on stable in CI.
//!
//! The auth targets (`htpasswd`, `token`, `policy`) assert what a parser must never do:
//! accept a weak hash, accept a token no trusted key signed, turn garbage into a user, or
//! answer a policy query by panicking. They never run bcrypt on an input's hash (its cost
//! field could say 31), and reach bcrypt only for one fixed user with a cost-4 entry.

use std::str::FromStr;
use std::sync::OnceLock;

use base64::Engine;
use flotilla_auth::{Action, Actions, Auth, AuthConfig, AuthError, Credentials, Htpasswd, Policy};
use flotilla_core::{Digest, Reference, RepoName, Tag, UploadId};
use registry_client::OciRoute;

/// One target's check.
pub type Check = fn(&[u8]);

/// Every target, by name, for the corpus replay.
pub const TARGETS: &[(&str, Check)] = &[
    ("route", route),
    ("reference", reference),
    ("digest", digest),
    ("manifest", manifest),
    ("content_range", content_range),
    ("htpasswd", htpasswd),
    ("token", token),
    ("policy", policy),
];

fn round_trips<T>(v: &T)
where
    T: FromStr + std::fmt::Display + PartialEq + std::fmt::Debug,
    T::Err: std::fmt::Debug,
{
    let s = v.to_string();
    let again: T = s
        .parse()
        .unwrap_or_else(|e| panic!("{v:?} displays as {s:?}, which does not parse: {e:?}"));
    assert_eq!(&again, v, "round trip of {s:?}");
}

fn safe_name(repo: &RepoName) {
    round_trips(repo);
    for c in repo.as_str().split('/') {
        assert!(
            !c.is_empty() && c != "." && c != "..",
            "component {c:?} in {repo:?}"
        );
        assert!(
            !c.contains(['%', '\\', '\0']),
            "component {c:?} in {repo:?}"
        );
    }
}

/// The `/v2/...` route parser: an accepted route rebuilt as a path parses to itself.
pub fn route(data: &[u8]) {
    let Ok(path) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(r) = OciRoute::parse(path) else {
        return;
    };
    let rebuilt = match &r {
        OciRoute::Base => "/v2/".to_owned(),
        OciRoute::Catalog => "/v2/_catalog".to_owned(),
        OciRoute::Tags { repo } => {
            safe_name(repo);
            format!("/v2/{repo}/tags/list")
        }
        OciRoute::Manifest { repo, reference } => {
            safe_name(repo);
            round_trips(reference);
            format!("/v2/{repo}/manifests/{reference}")
        }
        OciRoute::Blob { repo, digest } => {
            safe_name(repo);
            format!("/v2/{repo}/blobs/{digest}")
        }
        OciRoute::UploadStart { repo } => {
            safe_name(repo);
            format!("/v2/{repo}/blobs/uploads/")
        }
        OciRoute::Upload { repo, id } => {
            safe_name(repo);
            round_trips(id);
            format!("/v2/{repo}/blobs/uploads/{id}")
        }
        OciRoute::Referrers { repo, digest } => {
            safe_name(repo);
            format!("/v2/{repo}/referrers/{digest}")
        }
    };
    let again = OciRoute::parse(&rebuilt)
        .unwrap_or_else(|e| panic!("{r:?} rebuilt as {rebuilt:?} does not parse: {e:?}"));
    assert_eq!(again, r, "{path:?} -> {rebuilt:?}");
}

/// Names, tags, references and upload ids: accepted means canonical.
pub fn reference(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(r) = s.parse::<Reference>() {
        round_trips(&r);
        assert_eq!(r.to_string(), s, "a reference is kept as sent");
    }
    if let Ok(n) = s.parse::<RepoName>() {
        safe_name(&n);
    }
    if let Ok(t) = s.parse::<Tag>() {
        round_trips(&t);
        assert!(!t.as_str().contains(['/', ':']), "tag {t:?}");
    }
    if let Ok(u) = s.parse::<UploadId>() {
        round_trips(&u);
        assert!(
            !u.as_str().contains(['/', '\\']) && u.as_str() != "..",
            "upload id {u:?}"
        );
    }
}

/// Digests: accepted means `algorithm:hex` of the right length, lowercase, as sent.
pub fn digest(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(d) = s.parse::<Digest>() {
        round_trips(&d);
        assert_eq!(d.to_string(), s);
        assert!(d
            .hex()
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
    }
}

/// Manifest parsing under each content type a client may send: never a panic, and what is
/// accepted references only valid digests.
pub fn manifest(data: &[u8]) {
    for ct in [
        None,
        Some("application/vnd.oci.image.manifest.v1+json"),
        Some("application/vnd.oci.image.index.v1+json"),
        Some("application/vnd.docker.distribution.manifest.v2+json"),
        Some("application/json; charset=utf-8"),
    ] {
        if let Ok(m) = registry_node::manifest::parse(data, ct) {
            for d in m.blobs.iter().chain(&m.manifests).chain(&m.subject) {
                round_trips(d);
            }
        }
    }
}

/// `Content-Range` (uploads) and `Range` (blob reads): accepted ranges are ordered and, for
/// reads, inside the blob.
pub fn content_range(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let _ = registry_node::headers::parse_content_range(s);
    for size in [0u64, 1, 2, 100, 1 << 40, u64::MAX] {
        if let Ok(Some((start, end))) = registry_node::headers::parse_range(Some(s), size) {
            assert!(start <= end && end < size, "{s:?} of {size}: {start}-{end}");
        }
    }
}

/// htpasswd files: never a panic; what is accepted is bcrypt on every entry; a refusal
/// names a line that holds an entry, every entry before it being bcrypt, and a weak hash is
/// refused with its user named.
pub fn htpasswd(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let entries: Vec<(usize, &str)> = text
        .lines()
        .enumerate()
        .map(|(i, l)| (i + 1, l.trim()))
        .filter(|(_, l)| !l.is_empty() && !l.starts_with('#'))
        .collect();
    let bcrypt = |h: &str| {
        ["$2a$", "$2b$", "$2y$", "$2x$"]
            .iter()
            .any(|p| h.starts_with(p))
    };
    let entry_ok = |l: &str| {
        l.split_once(':')
            .is_some_and(|(u, h)| !u.is_empty() && bcrypt(h))
    };
    match Htpasswd::parse(text) {
        Ok(h) => {
            assert_eq!(h.len(), entries.len(), "every entry is kept: {text:?}");
            for (n, l) in &entries {
                assert!(entry_ok(l), "line {n} {l:?} accepted");
            }
        }
        Err(e @ AuthError::Htpasswd { line, .. }) => {
            let msg = e.to_string();
            assert!(msg.starts_with(&format!("htpasswd line {line}: ")), "{msg}");
            let (_, l) = entries
                .iter()
                .find(|(n, _)| *n == line)
                .unwrap_or_else(|| panic!("{msg}: no entry on that line of {text:?}"));
            for (n, before) in entries.iter().take_while(|(n, _)| *n < line) {
                assert!(
                    entry_ok(before),
                    "{msg}, but line {n} {before:?} was let by"
                );
            }
            if let Some((user, hash)) = l.split_once(':') {
                if !user.is_empty() && !bcrypt(hash) {
                    assert!(
                        msg.contains(&format!("{user:?}")) && msg.contains("only bcrypt"),
                        "{msg}"
                    );
                }
            }
        }
        Err(e) => panic!("not an htpasswd error: {e}"),
    }
}

/// A P-256 key made for these checks only (`openssl genpkey -algorithm EC -pkeyopt
/// ec_paramgen_curve:P-256`). Seeds in `corpus/token` are signed with it but expired, so
/// the verifier gets past the signature and must still refuse.
const TEST_KEY: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgpjdQ/AeX51fV9ZsP
ss1mjTtDIy/NmXgvc4Gt1mRsewmhRANCAARcu9/b0eZ6SMMAFbVmRvuOA8KS2pRL
qymONzk4rkh3hmfh5s3czL6cD/FE40aWgiPa9CJZrqoeFkI7EqgmX3a+
-----END PRIVATE KEY-----
";
const TEST_ISSUER: &str = "flotilla-fuzz";
const TEST_SERVICE: &str = "registry";
/// The one htpasswd user (bcrypt cost 4). Its password is in no corpus file.
const TEST_USER: &str = "fuzzer";
const TEST_HTPASSWD: &str = "fuzzer:$2y$04$D9K1i7PVpriK1ACjA8OuVe.f2tadpJFSVkRImPVPmOMiGBPRhc/D.\n";

/// A Basic-only `Auth` and a verifier trusting [`TEST_KEY`], loaded once from files in a
/// temporary directory removed straight after (both keep what they read).
fn fixture() -> &'static (Auth, flotilla_auth::Verifier) {
    static F: OnceLock<(Auth, flotilla_auth::Verifier)> = OnceLock::new();
    F.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("flotilla-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let (users, key) = (dir.join("htpasswd"), dir.join("key.pem"));
        std::fs::write(&users, TEST_HTPASSWD).expect("write htpasswd");
        std::fs::write(&key, TEST_KEY).expect("write key");
        let auth = Auth::load(AuthConfig {
            htpasswd: Some(users),
            token_issuer: TEST_ISSUER.into(),
            token_service: TEST_SERVICE.into(),
            ..AuthConfig::default()
        })
        .expect("Basic-only auth");
        let issuer = flotilla_auth::Issuer::from_pem_file(
            &key,
            TEST_ISSUER,
            std::time::Duration::from_secs(300),
        )
        .expect("test key");
        let mut verifier = flotilla_auth::Verifier::new(TEST_ISSUER, TEST_SERVICE);
        verifier.trust_issuer(&issuer);
        let _ = std::fs::remove_dir_all(&dir);
        (auth, verifier)
    })
}

/// Scopes, bearer tokens and `Authorization` headers: an accepted scope has a kind and a
/// name and round-trips; no input verifies as a token; no header authenticates as a user.
pub fn token(data: &[u8]) {
    let (auth, verifier) = fixture();
    if let Ok(s) = std::str::from_utf8(data) {
        for scope in std::iter::once(s).chain(s.split(' ')) {
            let Some(a) = flotilla_auth::token::parse_scope(scope) else {
                continue;
            };
            assert!(!a.kind.is_empty() && !a.name.is_empty(), "{scope:?}: {a:?}");
            assert!(!a.kind.contains(':'), "{scope:?}: {a:?}");
            assert!(
                a.actions
                    .iter()
                    .all(|x| !x.is_empty() && !x.contains([',', ':'])),
                "{scope:?}: {a:?}"
            );
            let rebuilt = format!("{}:{}:{}", a.kind, a.name, a.actions.join(","));
            assert_eq!(
                flotilla_auth::token::parse_scope(&rebuilt).as_ref(),
                Some(&a),
                "{scope:?} rebuilt as {rebuilt:?}"
            );
        }
        if let Ok(c) = verifier.verify(s) {
            panic!("{s:?} verified: {c:?}");
        }
    }
    // Only what reaches bcrypt cheaply goes through `authenticate`: any other user name
    // would cost a cost-10 dummy hash, which would slow the target below 100 execs/s.
    let cheap = match flotilla_auth::parse_authorization(data) {
        Ok(Credentials::Basic(b64)) => match flotilla_auth::decode_basic(b64) {
            Ok((user, password)) => {
                assert!(!user.contains(':'), "{b64:?}: user {user:?}");
                let again =
                    base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
                assert_eq!(
                    again, b64,
                    "accepted Basic credentials are canonical base64"
                );
                user == TEST_USER
            }
            Err(_) => true,
        },
        Ok(Credentials::Bearer(_)) | Err(_) => true,
    };
    if cheap {
        let r = auth.authenticate(Some(data), None);
        assert!(
            r.is_err(),
            "{:?} authenticated: {r:?}",
            String::from_utf8_lossy(data)
        );
    }
}

const POLICY_REPOS: &[&str] = &[
    "a",
    "public/x/y",
    "billing/api",
    "billing/secret/x",
    "library/ubuntu",
    "host:5000/x",
    "",
];

/// Access policies (as TOML and as JSON) and globs: parsing never panics; a parsed policy
/// answers for a few repositories, gives admins everything and users at least what
/// anonymous gets; every glob matches its own text and `**` matches everything.
pub fn policy(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    for json in [false, true] {
        let Ok(p) = Policy::parse(text, json, &["fuzz-admin".to_string()]) else {
            continue;
        };
        assert!(p.is_admin("fuzz-admin"));
        let anywhere = p.anonymous_anywhere();
        for repo in POLICY_REPOS {
            let anonymous = p.allowed(None, repo);
            assert!(anywhere || anonymous.is_empty(), "{repo:?}: {anonymous:?}");
            assert_eq!(p.allowed(Some("fuzz-admin"), repo), Actions::ALL);
            for user in ["alice", "builder", ""] {
                let allowed = p.allowed(Some(user), repo);
                assert!(anonymous.is_subset(allowed), "{user:?} on {repo:?}");
                for a in Action::ALL {
                    assert_eq!(p.allows(Some(user), repo, a), allowed.contains(a));
                }
            }
            for tag in ["latest", "v1.0", ""] {
                let _ = p.immutable(repo, tag);
            }
        }
    }
    let (pattern, subject) = text.split_once('\n').unwrap_or((text, ""));
    let all = flotilla_auth::glob::Glob::new("**").expect("valid");
    assert!(all.matches(text) && all.matches(pattern) && all.matches(subject));
    if let Ok(g) = flotilla_auth::glob::Glob::new(pattern) {
        assert!(g.matches(pattern), "{pattern:?} does not match itself");
        let m = g.matches(subject);
        if !pattern.contains(['*', '?']) {
            assert_eq!(m, pattern == subject, "{pattern:?} against {subject:?}");
        }
        for repo in POLICY_REPOS {
            let _ = g.matches(repo);
        }
    }
}
