//! Authentication and authorization for the router: who a request is ([`Auth::authenticate`]:
//! Basic against an htpasswd file, or a Bearer token), what it may do ([`Auth::allows`],
//! from the access policy), the challenge a refusal carries, and the token service
//! ([`Auth::issue`]). HTTP-framework free: it sees header values and repository names; the
//! router maps routes to [`Need`]s and refusals to responses.
//!
//! bcrypt is slow on purpose, and signature checks are not free, so both successful results
//! are cached (Basic by a SHA-256 of the header, for at most a minute and only until the
//! htpasswd file changes; tokens until they expire). Failed Basic attempts are counted per
//! client address and user name (10 a minute) and per address (100 a minute) and answered
//! with 429 past the budget, so the slow hash cannot be used to burn the router's CPU or to
//! guess passwords quickly, and one user's guesser does not lock out others behind its NAT.

/// Repository and tag patterns (`*`, `?`, `**`), shared with the events sinks' filters.
pub use flotilla_core::glob;
pub mod htpasswd;
pub mod policy;
pub mod token;

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use base64::Engine;
use sha2::Digest as _;

pub use htpasswd::Htpasswd;
pub use policy::{Action, Actions, Policy};
pub use token::{Access, Claims, Issuer, Verifier};

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("{0}: {1}")]
    Io(PathBuf, std::io::Error),
    #[error("htpasswd line {line}: {message}")]
    Htpasswd { line: usize, message: String },
    #[error("access policy: {0}")]
    Policy(String),
    #[error("key {0}: {1}")]
    Key(PathBuf, String),
    #[error("token: {0}")]
    Token(String),
    #[error("{0}")]
    Config(String),
}

/// How the router authenticates; built by the CLI layer from its flags.
#[derive(Clone, Debug, Default)]
pub struct AuthConfig {
    /// `--htpasswd`: Basic users (bcrypt).
    pub htpasswd: Option<PathBuf>,
    /// `--access`: the policy (TOML, or JSON when the name ends in `.json`).
    pub access: Option<PathBuf>,
    /// `--admin`: users who are admins besides the policy's.
    pub admins: Vec<String>,
    /// `--token-key`: sign tokens and serve the token endpoint.
    pub token_key: Option<PathBuf>,
    /// `--token-realm`: where clients get tokens (default with --token-key: this router's
    /// `/auth/token`).
    pub token_realm: Option<String>,
    pub token_issuer: String,
    pub token_service: String,
    /// `--token-jwks` / `--token-cert`: keys of an external issuer.
    pub token_jwks: Option<PathBuf>,
    pub token_cert: Option<PathBuf>,
    pub token_ttl: Duration,
}

impl AuthConfig {
    /// Whether any authentication was asked for (without it the registry is open).
    pub fn enabled(&self) -> bool {
        self.htpasswd.is_some()
            || self.token_key.is_some()
            || self.token_jwks.is_some()
            || self.token_cert.is_some()
            || self.token_realm.is_some()
    }
}

/// What a request needs. It borrows the repository name from the parsed route: deciding
/// costs no allocation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Need<'a> {
    /// `GET /v2/`: any authenticated principal (it is how clients test their login).
    Base,
    Repo {
        repo: &'a str,
        action: Action,
    },
    /// `/v2/_catalog`: lists every repository, so admins only.
    Catalog,
    /// `/admin/v1/...`.
    Admin,
}

impl Need<'_> {
    /// The scope a token needs for this (the challenge's `scope`).
    pub fn scope(&self) -> Option<String> {
        match self {
            Need::Base => None,
            Need::Repo { repo, action } => Some(match action {
                Action::Pull => format!("repository:{repo}:pull"),
                Action::Push => format!("repository:{repo}:pull,push"),
                Action::Delete => format!("repository:{repo}:delete"),
            }),
            Need::Catalog => Some("registry:catalog:*".into()),
            Need::Admin => Some("registry:admin:*".into()),
        }
    }
}

/// Who made a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Principal {
    Anonymous,
    /// Shared with the Basic cache, so a cached login clones no string.
    User(Arc<str>),
    Token(Arc<Verified>),
}

/// A token that verified, as the token cache keeps it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verified {
    pub claims: Claims,
    /// `sub`, shared (`None` for an anonymous token).
    pub user: Option<Arc<str>>,
}

impl Principal {
    /// The user to count limits against and to name in logs.
    pub fn user(&self) -> Option<&str> {
        match self {
            Principal::Anonymous => None,
            Principal::User(u) => Some(u),
            Principal::Token(v) => v.user.as_deref(),
        }
    }

    /// The same, shared: what the router hands to the limits.
    pub fn user_shared(&self) -> Option<Arc<str>> {
        match self {
            Principal::Anonymous => None,
            Principal::User(u) => Some(Arc::clone(u)),
            Principal::Token(v) => v.user.clone(),
        }
    }
}

/// Why a request was not authenticated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Wrong user or password, or a scheme this router does not accept.
    BadCredentials(String),
    /// A Bearer token that does not verify (expired, wrong audience, bad signature...).
    InvalidToken(String),
    /// Too many failed Basic attempts from this address: wait this long.
    TooManyFailures(Duration),
}

/// A file re-read when it changes (checked at most once a second, on use). A file that
/// no longer parses keeps the last good contents and logs why: a typo must not open or close
/// the registry.
#[derive(Debug)]
struct Watched<T> {
    path: PathBuf,
    parse: fn(&str, &Path) -> Result<T, AuthError>,
    state: RwLock<WatchState<T>>,
    /// Lock-free copies for the hot path: a cached login needs only the generation, and
    /// whether a second has passed since the file was last looked at.
    born: Instant,
    checked_ms: AtomicU64,
    generation: AtomicU64,
}

#[derive(Debug)]
struct WatchState<T> {
    value: Arc<T>,
    stamp: Option<(SystemTime, u64)>,
    checked: Instant,
    generation: u64,
}

fn stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}

impl<T> Watched<T> {
    fn open(
        path: &Path,
        parse: fn(&str, &Path) -> Result<T, AuthError>,
    ) -> Result<Self, AuthError> {
        let text = std::fs::read_to_string(path).map_err(|e| AuthError::Io(path.into(), e))?;
        let value = parse(&text, path)?;
        Ok(Watched {
            path: path.to_path_buf(),
            parse,
            state: RwLock::new(WatchState {
                value: Arc::new(value),
                stamp: stamp(path),
                checked: Instant::now(),
                generation: 0,
            }),
            born: Instant::now(),
            checked_ms: AtomicU64::new(0),
            generation: AtomicU64::new(0),
        })
    }

    fn now_ms(&self) -> u64 {
        self.born.elapsed().as_millis() as u64
    }

    /// The current generation, without a lock while the file was looked at within the
    /// last second (else this looks, as [`Watched::get`] does).
    fn generation(&self) -> u64 {
        if self.now_ms() < self.checked_ms.load(Ordering::Acquire) + 1000 {
            return self.generation.load(Ordering::Acquire);
        }
        self.get().1
    }

    /// `f` on the current contents, under the read lock (no reference count touched).
    fn with<R>(&self, f: impl FnOnce(&T) -> R) -> R {
        if self.now_ms() >= self.checked_ms.load(Ordering::Acquire) + 1000 {
            self.get();
        }
        f(&self.state.read().expect("watch lock").value)
    }

    /// The current contents and their generation (bumped on every reload).
    fn get(&self) -> (Arc<T>, u64) {
        {
            let s = self.state.read().expect("watch lock");
            if s.checked.elapsed() < Duration::from_secs(1) {
                return (s.value.clone(), s.generation);
            }
        }
        let mut s = self.state.write().expect("watch lock");
        if s.checked.elapsed() >= Duration::from_secs(1) {
            s.checked = Instant::now();
            let now = stamp(&self.path);
            if now != s.stamp {
                s.stamp = now;
                match std::fs::read_to_string(&self.path)
                    .map_err(|e| AuthError::Io(self.path.clone(), e))
                    .and_then(|t| (self.parse)(&t, &self.path))
                {
                    Ok(v) => {
                        s.value = Arc::new(v);
                        s.generation += 1;
                        self.generation.store(s.generation, Ordering::Release);
                        tracing::info!(path = %self.path.display(), "reloaded");
                        metrics::counter!("flotilla_auth_reloads_total", "result" => "ok")
                            .increment(1);
                    }
                    Err(e) => {
                        tracing::error!(path = %self.path.display(), error = %e, "not reloaded: keeping the previous contents");
                        metrics::counter!("flotilla_auth_reloads_total", "result" => "error")
                            .increment(1);
                    }
                }
            }
            // After the new generation: the lock-free path never pairs a fresh check with
            // the old contents' generation.
            self.checked_ms.store(self.now_ms(), Ordering::Release);
        }
        (s.value.clone(), s.generation)
    }
}

/// A Basic login checked: the user, the htpasswd generation it was checked against, when.
type BasicHit = (Arc<str>, u64, Instant);
/// A token verified: the whole token (the key is only its tail) and what it says.
type TokenHit = (Box<str>, Arc<Verified>);

const BASIC_TTL: Duration = Duration::from_secs(60);
const CACHE_MAX: usize = 10_000;
/// Failed Basic attempts per address per window before 429.
const FAILURE_BUDGET: u32 = 10;
const FAILURE_WINDOW: Duration = Duration::from_secs(60);

/// The router's authentication and authorization state.
#[derive(Debug)]
pub struct Auth {
    cfg: AuthConfig,
    users: Option<Watched<Htpasswd>>,
    policy: Option<Watched<Policy>>,
    default_policy: Arc<Policy>,
    issuer: Option<Issuer>,
    verifier: Option<Verifier>,
    basic_cache: RwLock<HashMap<[u8; 32], BasicHit>>,
    /// Keyed by the token's last 32 bytes (its signature's tail: hashing a whole token of
    /// half a kilobyte on every request costs more than the rest of the check); the entry
    /// keeps the whole token, compared on every hit.
    token_cache: RwLock<HashMap<[u8; 32], TokenHit>>,
    /// Failed Basic checks per (address, user name): guessing one user's password from one
    /// address locks only that pair, so users behind the same NAT are not locked out too.
    failures: Mutex<HashMap<(IpAddr, String), (Instant, u32)>>,
}

fn parse_htpasswd(text: &str, _: &Path) -> Result<Htpasswd, AuthError> {
    Htpasswd::parse(text)
}

fn parse_policy(text: &str, path: &Path) -> Result<Policy, AuthError> {
    let json = path.extension().is_some_and(|e| e == "json");
    Policy::parse(text, json, &[])
}

impl Auth {
    /// Loads every file now, so a bad one stops the start with its name and line.
    pub fn load(cfg: AuthConfig) -> Result<Auth, AuthError> {
        let users = cfg
            .htpasswd
            .as_deref()
            .map(|p| Watched::open(p, parse_htpasswd))
            .transpose()?;
        let policy = cfg
            .access
            .as_deref()
            .map(|p| Watched::open(p, parse_policy))
            .transpose()?;
        let issuer = cfg
            .token_key
            .as_deref()
            .map(|p| Issuer::from_pem_file(p, &cfg.token_issuer, cfg.token_ttl))
            .transpose()?;
        let mut verifier = Verifier::new(&cfg.token_issuer, &cfg.token_service);
        if let Some(i) = &issuer {
            verifier.trust_issuer(i);
        }
        if let Some(p) = &cfg.token_cert {
            verifier.trust_pem_file(p)?;
        }
        if let Some(p) = &cfg.token_jwks {
            verifier.trust_jwks_file(p)?;
        }
        if cfg.token_realm.is_some() && !verifier.has_keys() {
            return Err(AuthError::Config(
                "--token-realm needs the issuer's keys to verify its tokens: --token-cert or --token-jwks (or --token-key to issue them here)".into(),
            ));
        }
        if (cfg.token_cert.is_some() || cfg.token_jwks.is_some())
            && cfg.token_realm.is_none()
            && issuer.is_none()
        {
            return Err(AuthError::Config(
                "--token-cert/--token-jwks verify an external issuer's tokens: give its --token-realm too".into(),
            ));
        }
        if issuer.is_some() && users.is_none() && policy.is_none() {
            tracing::warn!("--token-key without --htpasswd: only anonymous tokens can be issued");
        }
        let verifier = verifier.has_keys().then_some(verifier);
        Ok(Auth {
            default_policy: Arc::new(Policy::default_for(&cfg.admins)),
            cfg,
            users,
            policy,
            issuer,
            verifier,
            basic_cache: RwLock::default(),
            token_cache: RwLock::default(),
            failures: Mutex::default(),
        })
    }

    pub fn config(&self) -> &AuthConfig {
        &self.cfg
    }

    /// Whether this router serves the token endpoint.
    pub fn issues_tokens(&self) -> bool {
        self.issuer.is_some()
    }

    /// `f` on the current policy (the file's, or the default without `--access`).
    fn with_policy<R>(&self, f: impl FnOnce(&Policy) -> R) -> R {
        match &self.policy {
            Some(w) => w.with(f),
            None => f(&self.default_policy),
        }
    }

    /// `--admin` users and the policy's admins.
    pub fn is_admin(&self, user: &str) -> bool {
        self.with_policy(|p| self.is_admin_in(p, user))
    }

    fn is_admin_in(&self, policy: &Policy, user: &str) -> bool {
        self.cfg.admins.iter().any(|a| a == user) || policy.is_admin(user)
    }

    /// What `user` may do to `repo` under the policy (admins: everything).
    pub fn allowed(&self, user: Option<&str>, repo: &str) -> Actions {
        self.with_policy(|p| self.allowed_in(p, user, repo))
    }

    /// One snapshot of the policy per decision: a reload in between cannot mix two files.
    fn allowed_in(&self, policy: &Policy, user: Option<&str>, repo: &str) -> Actions {
        if user.is_some_and(|u| self.is_admin_in(policy, u)) {
            return Actions::ALL;
        }
        policy.allowed(user, repo)
    }

    /// Whether moving `tag` of `repo` is refused.
    pub fn immutable(&self, repo: &str, tag: &str) -> bool {
        self.with_policy(|p| p.immutable(repo, tag))
    }

    /// Who sent `authorization` (`None`: anonymous). `peer` meters failed Basic attempts.
    pub fn authenticate(
        &self,
        authorization: Option<&[u8]>,
        peer: Option<IpAddr>,
    ) -> Result<Principal, Refusal> {
        let Some(value) = authorization else {
            return Ok(Principal::Anonymous);
        };
        match parse_authorization(value)? {
            Credentials::Basic(b64) => self.basic(b64, peer),
            Credentials::Bearer(token) => self.bearer(token),
        }
    }

    fn basic(&self, b64: &str, peer: Option<IpAddr>) -> Result<Principal, Refusal> {
        let Some(users) = &self.users else {
            return Err(Refusal::BadCredentials(
                "Basic credentials are not accepted here: get a token from the realm".into(),
            ));
        };
        let generation = users.generation();
        let key: [u8; 32] = sha2::Sha256::digest(b64.as_bytes()).into();
        if let Some((user, g, at)) = self.basic_cache.read().expect("cache lock").get(&key) {
            if *g == generation && at.elapsed() < BASIC_TTL {
                return Ok(Principal::User(Arc::clone(user)));
            }
        }
        let (file, generation) = users.get();
        let (user, password) = decode_basic(b64)?;
        let (user, password) = (user.as_str(), password.as_str());
        if let Some(ip) = peer {
            let f = self.failures.lock().expect("failure lock");
            // The pair's budget, and a larger one for the address over every user name (the
            // slow hash must not be sprayed with a new name per guess).
            for (who, budget) in [(user, FAILURE_BUDGET), ("", FAILURE_BUDGET * 10)] {
                if let Some((start, n)) = f.get(&(ip, who.to_string())) {
                    if start.elapsed() < FAILURE_WINDOW && *n >= budget {
                        metrics::counter!("flotilla_auth_refused_total", "reason" => "rate_limited")
                            .increment(1);
                        return Err(Refusal::TooManyFailures(
                            FAILURE_WINDOW.saturating_sub(start.elapsed()),
                        ));
                    }
                }
            }
        }
        if file.verify(user, password) {
            let user: Arc<str> = user.into();
            let mut cache = self.basic_cache.write().expect("cache lock");
            if cache.len() >= CACHE_MAX {
                cache.clear();
            }
            cache.insert(key, (Arc::clone(&user), generation, Instant::now()));
            Ok(Principal::User(user))
        } else {
            if let Some(ip) = peer {
                let mut f = self.failures.lock().expect("failure lock");
                if f.len() >= CACHE_MAX {
                    f.retain(|_, (s, _)| s.elapsed() < FAILURE_WINDOW);
                    if f.len() >= CACHE_MAX {
                        f.clear();
                    }
                }
                for who in [user, ""] {
                    let e = f
                        .entry((ip, who.to_string()))
                        .or_insert((Instant::now(), 0));
                    if e.0.elapsed() >= FAILURE_WINDOW {
                        *e = (Instant::now(), 0);
                    }
                    e.1 += 1;
                }
            }
            metrics::counter!("flotilla_auth_refused_total", "reason" => "bad_password")
                .increment(1);
            tracing::info!(user, peer = ?peer, "refused: wrong user or password");
            Err(Refusal::BadCredentials(
                "wrong user name or password".into(),
            ))
        }
    }

    fn bearer(&self, token: &str) -> Result<Principal, Refusal> {
        let Some(verifier) = &self.verifier else {
            return Err(Refusal::BadCredentials(
                "Bearer tokens are not accepted here".into(),
            ));
        };
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let key = token_key(token);
        if let Some((t, v)) = self.token_cache.read().expect("cache lock").get(&key) {
            if **t == *token && v.claims.exp > now {
                return Ok(Principal::Token(Arc::clone(v)));
            }
        }
        match verifier.verify(token) {
            Ok(claims) => {
                let user = (!claims.sub.is_empty()).then(|| Arc::from(claims.sub.as_str()));
                let verified = Arc::new(Verified { claims, user });
                let mut cache = self.token_cache.write().expect("cache lock");
                if cache.len() >= CACHE_MAX {
                    cache.retain(|_, (_, v)| v.claims.exp > now);
                    if cache.len() >= CACHE_MAX {
                        cache.clear();
                    }
                }
                cache.insert(key, (token.into(), Arc::clone(&verified)));
                Ok(Principal::Token(verified))
            }
            Err(token::Invalid(why)) => {
                metrics::counter!("flotilla_auth_refused_total", "reason" => "invalid_token")
                    .increment(1);
                Err(Refusal::InvalidToken(why))
            }
        }
    }

    /// Whether `who` may do `need`.
    pub fn allows(&self, who: &Principal, need: &Need) -> bool {
        match who {
            Principal::Token(v) => match need {
                Need::Base => true,
                Need::Repo { repo, action } => v.claims.grants("repository", repo, action.as_str()),
                Need::Catalog => v.claims.grants("registry", "catalog", "*"),
                Need::Admin => v.claims.grants("registry", "admin", "*"),
            },
            Principal::User(u) => match need {
                Need::Base => true,
                Need::Repo { repo, action } => self.allowed(Some(u), repo).contains(*action),
                Need::Catalog | Need::Admin => self.is_admin(u),
            },
            Principal::Anonymous => match need {
                Need::Repo { repo, action } => self.with_policy(|p| p.allows(None, repo, *action)),
                _ => false,
            },
        }
    }

    /// Whether tokens are the scheme clients should use (then challenges say Bearer).
    pub fn bearer_scheme(&self) -> bool {
        self.verifier.is_some()
    }

    /// The `WWW-Authenticate` value for a refusal of `need`; `host` (the request's Host)
    /// and `https` build the default realm. `error` is the Bearer `error` parameter.
    pub fn challenge(&self, need: &Need, host: &str, https: bool, error: Option<&str>) -> String {
        if !self.bearer_scheme() {
            return "Basic realm=\"flotilla\"".into();
        }
        let realm = match &self.cfg.token_realm {
            Some(r) => r.clone(),
            None => format!(
                "{}://{host}/auth/token",
                if https { "https" } else { "http" }
            ),
        };
        let mut v = format!(
            "Bearer realm=\"{realm}\",service=\"{}\"",
            self.cfg.token_service
        );
        if let Some(scope) = need.scope() {
            v.push_str(&format!(",scope=\"{scope}\""));
        }
        if let Some(e) = error {
            v.push_str(&format!(",error=\"{e}\""));
        }
        v
    }

    /// The token endpoint: a token for `who` with the requested scopes cut down to what the
    /// policy allows (a scope it allows nothing of is left out, as the spec says).
    pub fn issue(
        &self,
        who: &Principal,
        service: &str,
        scopes: &[String],
    ) -> Result<IssuedToken, AuthError> {
        let issuer = self
            .issuer
            .as_ref()
            .ok_or_else(|| AuthError::Config("this router issues no tokens".into()))?;
        if service != self.cfg.token_service {
            return Err(AuthError::Token(format!(
                "service {service:?} is not {:?}",
                self.cfg.token_service
            )));
        }
        let user = who.user();
        let mut access = Vec::new();
        for s in scopes.iter().flat_map(|s| s.split(' ')) {
            let Some(req) = token::parse_scope(s) else {
                return Err(AuthError::Token(format!("malformed scope {s:?}")));
            };
            let granted: Vec<String> = match req.kind.as_str() {
                "repository" => {
                    let allowed = self.allowed(user, &req.name);
                    let mut g: Vec<String> = req
                        .actions
                        .iter()
                        .flat_map(|a| Action::parse_list(a).unwrap_or_default())
                        .filter(|a| allowed.contains(*a))
                        .map(|a| a.as_str().to_string())
                        .collect();
                    g.sort();
                    g.dedup();
                    g
                }
                "registry"
                    if (req.name == "catalog" || req.name == "admin")
                        && user.is_some_and(|u| self.is_admin(u)) =>
                {
                    vec!["*".into()]
                }
                _ => vec![],
            };
            if !granted.is_empty() {
                access.push(Access {
                    kind: req.kind,
                    name: req.name,
                    actions: granted,
                });
            }
        }
        let token = issuer.issue(user.unwrap_or(""), service, access)?;
        Ok(IssuedToken {
            token,
            expires_in: issuer.ttl.as_secs(),
        })
    }
}

/// The token cache's key: the token's last 32 bytes (zero-padded when shorter).
fn token_key(token: &str) -> [u8; 32] {
    let b = token.as_bytes();
    let tail = &b[b.len().saturating_sub(32)..];
    let mut k = [0u8; 32];
    k[..tail.len()].copy_from_slice(tail);
    k
}

/// What an `Authorization` header carries, split but not checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Credentials<'a> {
    /// The base64 `user:password`, still encoded (the Basic cache is keyed on it).
    Basic(&'a str),
    Bearer(&'a str),
}

/// The scheme and credentials of an `Authorization` value. Public, and free of any
/// secret check, so the fuzz targets can hammer it without paying a bcrypt per input.
pub fn parse_authorization(value: &[u8]) -> Result<Credentials<'_>, Refusal> {
    let value = std::str::from_utf8(value)
        .map_err(|_| Refusal::BadCredentials("malformed Authorization header".into()))?;
    let (scheme, rest) = value.split_once(' ').unwrap_or((value, ""));
    let rest = rest.trim();
    if scheme.eq_ignore_ascii_case("basic") {
        Ok(Credentials::Basic(rest))
    } else if scheme.eq_ignore_ascii_case("bearer") {
        Ok(Credentials::Bearer(rest))
    } else {
        Err(Refusal::BadCredentials(format!(
            "the {scheme} scheme is not accepted"
        )))
    }
}

/// A Basic credential's user and password (the user ends at the first `:`, as RFC 7617
/// says: a password may hold colons, a user name may not).
pub fn decode_basic(b64: &str) -> Result<(String, String), Refusal> {
    let bad = || Refusal::BadCredentials("malformed Basic credentials".into());
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
        .ok_or_else(bad)?;
    let (user, password) = decoded.split_once(':').ok_or_else(bad)?;
    Ok((user.to_string(), password.to_string()))
}

/// What the token endpoint returns.
#[derive(Clone, Debug)]
pub struct IssuedToken {
    pub token: String,
    pub expires_in: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(user: &str, password: &str) -> Vec<u8> {
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
        )
        .into_bytes()
    }

    #[test]
    fn the_token_cache_matches_whole_tokens_not_their_tails() {
        let dir = tempfile::tempdir().unwrap();
        let pkcs8 = ring::signature::EcdsaKeyPair::generate_pkcs8(
            &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            &ring::rand::SystemRandom::new(),
        )
        .unwrap();
        let key = dir.path().join("key.pem");
        std::fs::write(
            &key,
            pem::encode(&pem::Pem::new("PRIVATE KEY", pkcs8.as_ref().to_vec())),
        )
        .unwrap();
        let auth = Auth::load(AuthConfig {
            token_key: Some(key),
            token_issuer: "flotilla".into(),
            token_service: "flotilla".into(),
            token_ttl: Duration::from_secs(60),
            ..AuthConfig::default()
        })
        .unwrap();
        let scope = ["repository:a/b:pull".to_string()];
        let alice = auth
            .issue(&Principal::User("alice".into()), "flotilla", &scope)
            .unwrap()
            .token;
        let bearer = |t: &str| format!("Bearer {t}").into_bytes();
        let Ok(Principal::Token(v)) = auth.authenticate(Some(&bearer(&alice)), None) else {
            panic!("alice's token refused");
        };
        assert_eq!(v.user.as_deref(), Some("alice"));
        // Cached now. Another payload under alice's signature has the same last 32 bytes:
        // it must be checked, and refused, not served from the cache.
        let mallory = auth
            .issue(&Principal::User("mallory".into()), "flotilla", &scope)
            .unwrap()
            .token;
        let mut parts: Vec<&str> = alice.split('.').collect();
        parts[1] = mallory.split('.').nth(1).unwrap();
        let forged = parts.join(".");
        assert_eq!(token_key(&forged), token_key(&alice));
        assert!(matches!(
            auth.authenticate(Some(&bearer(&forged)), None),
            Err(Refusal::InvalidToken(_))
        ));
        // And the cached token still works.
        assert!(auth.authenticate(Some(&bearer(&alice)), None).is_ok());
    }

    #[test]
    fn a_cached_login_ends_when_the_file_drops_the_user() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("htpasswd");
        let line = |u: &str| format!("{u}:{}\n", bcrypt::hash(format!("{u}-pw"), 4).unwrap());
        std::fs::write(&file, line("alice") + &line("bob")).unwrap();
        let auth = Auth::load(AuthConfig {
            htpasswd: Some(file.clone()),
            token_ttl: Duration::from_secs(60),
            ..AuthConfig::default()
        })
        .unwrap();
        let alice = header("alice", "alice-pw");
        assert_eq!(
            auth.authenticate(Some(&alice), None),
            Ok(Principal::User("alice".into()))
        );
        std::fs::write(&file, line("bob")).unwrap();
        // The file is looked at once a second; the cached login must not outlive that.
        let deadline = Instant::now() + Duration::from_secs(5);
        while auth.authenticate(Some(&alice), None).is_ok() {
            assert!(
                Instant::now() < deadline,
                "alice still accepted 5 s after removal"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(matches!(
            auth.authenticate(Some(&alice), None),
            Err(Refusal::BadCredentials(_))
        ));
        assert_eq!(
            auth.authenticate(Some(&header("bob", "bob-pw")), None),
            Ok(Principal::User("bob".into()))
        );
    }

    #[test]
    fn failed_passwords_lock_the_pair_then_the_address_but_not_other_users() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("htpasswd");
        let mut lines = String::new();
        for u in ["alice", "bob"] {
            lines.push_str(&format!(
                "{u}:{}\n",
                bcrypt::hash(format!("{u}-pw"), 4).unwrap()
            ));
        }
        std::fs::write(&file, lines).unwrap();
        let auth = Auth::load(AuthConfig {
            htpasswd: Some(file),
            token_ttl: Duration::from_secs(60),
            ..AuthConfig::default()
        })
        .unwrap();
        let ip: IpAddr = "192.0.2.7".parse().unwrap();
        let other: IpAddr = "192.0.2.8".parse().unwrap();
        for _ in 0..FAILURE_BUDGET {
            assert!(matches!(
                auth.authenticate(Some(&header("alice", "guess")), Some(ip)),
                Err(Refusal::BadCredentials(_))
            ));
        }
        // alice from this address is locked, even with the right password...
        assert!(matches!(
            auth.authenticate(Some(&header("alice", "alice-pw")), Some(ip)),
            Err(Refusal::TooManyFailures(_))
        ));
        // ...but not from another address, and bob from the same address is not.
        assert_eq!(
            auth.authenticate(Some(&header("alice", "alice-pw")), Some(other)),
            Ok(Principal::User("alice".into()))
        );
        assert_eq!(
            auth.authenticate(Some(&header("bob", "bob-pw")), Some(ip)),
            Ok(Principal::User("bob".into()))
        );
        // A new user name per guess runs into the address's budget.
        let mut refused = 0;
        for i in 0..(FAILURE_BUDGET * 10) {
            if let Err(Refusal::TooManyFailures(_)) =
                auth.authenticate(Some(&header(&format!("u{i}"), "x")), Some(ip))
            {
                refused += 1;
            }
        }
        assert!(
            refused >= FAILURE_BUDGET,
            "spraying names is throttled: {refused}"
        );
        // Cached logins still pass (no hash is computed for them).
        assert_eq!(
            auth.authenticate(Some(&header("bob", "bob-pw")), Some(ip)),
            Ok(Principal::User("bob".into()))
        );
    }
}
