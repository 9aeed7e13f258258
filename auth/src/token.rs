//! Docker registry tokens (the distribution token spec): JWTs whose `access` claim lists
//! `{type, name, actions}`. [`Issuer`] signs them (ES256 or RS256, from a PKCS#8 or PKCS#1
//! PEM key); [`Verifier`] checks issuer, audience, expiry and signature against the
//! issuer's own key, a certificate or public key PEM, or a JWKS file. `jsonwebtoken` does the
//! JOSE work with `ring`, which the TLS stack already builds; the public key of a private
//! key and of a certificate are taken out with `ring` and `rustls-webpki` for the same reason.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use sha2::Digest as _;

use crate::AuthError;

/// One entry of the `access` claim.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Access {
    #[serde(rename = "type")]
    pub kind: String,
    pub name: String,
    #[serde(default)]
    pub actions: Vec<String>,
}

impl Access {
    pub fn grants(&self, kind: &str, name: &str, action: &str) -> bool {
        self.kind == kind
            && self.name == name
            && self.actions.iter().any(|a| a == action || a == "*")
    }
}

/// A requested scope, `type:name:action,action` (the name may itself hold `:`, as in a
/// registry host with a port, so type ends at the first colon and actions begin after the
/// last).
pub fn parse_scope(scope: &str) -> Option<Access> {
    let (kind, rest) = scope.split_once(':')?;
    let (name, actions) = rest.rsplit_once(':')?;
    if kind.is_empty() || name.is_empty() {
        return None;
    }
    Some(Access {
        kind: kind.to_string(),
        name: name.to_string(),
        actions: actions
            .split(',')
            .filter(|a| !a.is_empty())
            .map(str::to_string)
            .collect(),
    })
}

/// `aud` may be one string or a list.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Audience {
    One(String),
    Many(Vec<String>),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    pub iss: String,
    #[serde(default)]
    pub sub: String,
    pub aud: Audience,
    pub exp: u64,
    #[serde(default)]
    pub nbf: u64,
    #[serde(default)]
    pub iat: u64,
    #[serde(default)]
    pub jti: String,
    #[serde(default)]
    pub access: Vec<Access>,
}

impl Claims {
    pub fn grants(&self, kind: &str, name: &str, action: &str) -> bool {
        self.access.iter().any(|a| a.grants(kind, name, action))
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn read(path: &Path) -> Result<Vec<u8>, AuthError> {
    std::fs::read(path).map_err(|e| AuthError::Io(path.to_path_buf(), e))
}

/// A key id the verifier can look up: the first 16 bytes of the SHA-256 of the public key,
/// base64url (what the token's `kid` header carries).
fn kid_of(public: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&sha2::Sha256::digest(public)[..16])
}

/// A verification key and its algorithm.
#[derive(Clone)]
struct Key {
    kid: Option<String>,
    alg: Algorithm,
    key: DecodingKey,
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Key({:?}, {:?})", self.alg, self.kid)
    }
}

/// Signs tokens for the users this registry authenticated.
#[derive(Clone)]
pub struct Issuer {
    pub issuer: String,
    alg: Algorithm,
    kid: String,
    key: EncodingKey,
    public: Key,
    pub ttl: Duration,
}

impl std::fmt::Debug for Issuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issuer")
            .field("issuer", &self.issuer)
            .field("alg", &self.alg)
            .field("kid", &self.kid)
            .finish()
    }
}

impl Issuer {
    /// From a private key PEM: `PRIVATE KEY` (PKCS#8, EC P-256 or RSA) or `RSA PRIVATE KEY`.
    pub fn from_pem_file(path: &Path, issuer: &str, ttl: Duration) -> Result<Issuer, AuthError> {
        let bad = |m: String| AuthError::Key(path.to_path_buf(), m);
        let pem_bytes = read(path)?;
        let block = pem::parse(&pem_bytes).map_err(|e| bad(e.to_string()))?;
        let der = block.contents();
        let (alg, key, public) = match block.tag() {
            "PRIVATE KEY" => {
                let rng = ring::rand::SystemRandom::new();
                if let Ok(kp) = ring::signature::EcdsaKeyPair::from_pkcs8(
                    &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
                    der,
                    &rng,
                ) {
                    use ring::signature::KeyPair;
                    (
                        Algorithm::ES256,
                        EncodingKey::from_ec_der(der),
                        kp.public_key().as_ref().to_vec(),
                    )
                } else {
                    let kp = ring::signature::RsaKeyPair::from_pkcs8(der).map_err(|_| {
                        bad("not an EC P-256 or RSA PKCS#8 private key".into())
                    })?;
                    use ring::signature::KeyPair;
                    (
                        Algorithm::RS256,
                        EncodingKey::from_rsa_der(der),
                        kp.public_key().as_ref().to_vec(),
                    )
                }
            }
            "RSA PRIVATE KEY" => {
                let kp = ring::signature::RsaKeyPair::from_der(der)
                    .map_err(|e| bad(format!("RSA key: {e}")))?;
                use ring::signature::KeyPair;
                (
                    Algorithm::RS256,
                    EncodingKey::from_rsa_der(der),
                    kp.public_key().as_ref().to_vec(),
                )
            }
            "EC PRIVATE KEY" => {
                return Err(bad(
                    "SEC1 EC keys are not read; convert it: openssl pkcs8 -topk8 -nocrypt -in KEY -out KEY.pk8 (or make one with openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256)".into(),
                ))
            }
            other => return Err(bad(format!("a {other:?} PEM block is not a private key"))),
        };
        let decoding = match alg {
            Algorithm::ES256 => DecodingKey::from_ec_der(&public),
            _ => DecodingKey::from_rsa_der(&public),
        };
        let kid = kid_of(&public);
        Ok(Issuer {
            issuer: issuer.to_string(),
            alg,
            kid: kid.clone(),
            key,
            public: Key {
                kid: Some(kid),
                alg,
                key: decoding,
            },
            ttl,
        })
    }

    /// A token for `sub` (empty: anonymous) with `access`, valid for the issuer's ttl.
    pub fn issue(
        &self,
        sub: &str,
        service: &str,
        access: Vec<Access>,
    ) -> Result<String, AuthError> {
        let now = now_secs();
        let claims = Claims {
            iss: self.issuer.clone(),
            sub: sub.to_string(),
            aud: Audience::One(service.to_string()),
            exp: now + self.ttl.as_secs(),
            nbf: now.saturating_sub(1),
            iat: now,
            jti: uuid_like(),
            access,
        };
        let mut header = Header::new(self.alg);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, &claims, &self.key)
            .map_err(|e| AuthError::Token(e.to_string()))
    }
}

fn uuid_like() -> String {
    let mut b = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b).expect("system rng");
    hex(&b)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Why a token was refused (the `error_description` of the challenge).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid(pub String);

/// Checks tokens: signature by a trusted key, `iss`, `aud`, `exp`/`nbf`.
#[derive(Clone, Debug)]
pub struct Verifier {
    issuer: String,
    service: String,
    keys: Vec<Key>,
}

impl Verifier {
    pub fn new(issuer: &str, service: &str) -> Verifier {
        Verifier {
            issuer: issuer.to_string(),
            service: service.to_string(),
            keys: vec![],
        }
    }

    pub fn trust_issuer(&mut self, issuer: &Issuer) {
        self.keys.push(issuer.public.clone());
    }

    /// Certificates (`CERTIFICATE`) or public keys (`PUBLIC KEY`, `RSA PUBLIC KEY`) in PEM.
    pub fn trust_pem_file(&mut self, path: &Path) -> Result<(), AuthError> {
        let bad = |m: String| AuthError::Key(path.to_path_buf(), m);
        let blocks = pem::parse_many(read(path)?).map_err(|e| bad(e.to_string()))?;
        if blocks.is_empty() {
            return Err(bad("no PEM block".into()));
        }
        for block in blocks {
            let spki = match block.tag() {
                "CERTIFICATE" => {
                    let der = rustls_pki_types::CertificateDer::from(block.contents());
                    let cert = webpki::EndEntityCert::try_from(&der)
                        .map_err(|e| bad(format!("certificate: {e:?}")))?;
                    cert.subject_public_key_info().as_ref().to_vec()
                }
                "PUBLIC KEY" => block.contents().to_vec(),
                "RSA PUBLIC KEY" => {
                    self.keys.push(Key {
                        kid: Some(kid_of(block.contents())),
                        alg: Algorithm::RS256,
                        key: DecodingKey::from_rsa_der(block.contents()),
                    });
                    continue;
                }
                other => {
                    return Err(bad(format!(
                        "a {other:?} PEM block is not a certificate or public key"
                    )))
                }
            };
            self.keys.push(key_from_spki(&spki).map_err(bad)?);
        }
        Ok(())
    }

    /// A JWKS document (`{"keys":[...]}`), as identity providers publish.
    pub fn trust_jwks_file(&mut self, path: &Path) -> Result<(), AuthError> {
        let bad = |m: String| AuthError::Key(path.to_path_buf(), m);
        let set: jsonwebtoken::jwk::JwkSet =
            serde_json::from_slice(&read(path)?).map_err(|e| bad(e.to_string()))?;
        if set.keys.is_empty() {
            return Err(bad("the JWKS has no keys".into()));
        }
        for jwk in &set.keys {
            use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve};
            let alg = match &jwk.algorithm {
                AlgorithmParameters::EllipticCurve(p) if p.curve == EllipticCurve::P256 => {
                    Algorithm::ES256
                }
                AlgorithmParameters::EllipticCurve(p) if p.curve == EllipticCurve::P384 => {
                    Algorithm::ES384
                }
                AlgorithmParameters::RSA(_) => Algorithm::RS256,
                _ => return Err(bad("only EC P-256/P-384 and RSA keys are supported".into())),
            };
            let key = DecodingKey::from_jwk(jwk).map_err(|e| bad(e.to_string()))?;
            self.keys.push(Key {
                kid: jwk.common.key_id.clone(),
                alg,
                key,
            });
        }
        Ok(())
    }

    pub fn has_keys(&self) -> bool {
        !self.keys.is_empty()
    }

    pub fn verify(&self, token: &str) -> Result<Claims, Invalid> {
        let header = jsonwebtoken::decode_header(token)
            .map_err(|e| Invalid(format!("malformed token: {e}")))?;
        // The token's kid picks the key when it names one we hold; otherwise every key of
        // the token's algorithm is tried (a certificate bundle names no kids).
        let named: Vec<&Key> = self
            .keys
            .iter()
            .filter(|k| k.alg == header.alg && header.kid.is_some() && k.kid == header.kid)
            .collect();
        let candidates: Vec<&Key> = if named.is_empty() {
            self.keys.iter().filter(|k| k.alg == header.alg).collect()
        } else {
            named
        };
        if candidates.is_empty() {
            return Err(Invalid(format!(
                "no trusted key for algorithm {:?}",
                header.alg
            )));
        }
        let mut validation = Validation::new(header.alg);
        validation.set_issuer(&[&self.issuer]);
        validation.set_audience(&[&self.service]);
        validation.validate_nbf = true;
        validation.leeway = 30;
        validation.set_required_spec_claims(&["exp", "iss", "aud"]);
        let mut last = Invalid("signature does not verify".into());
        for k in candidates {
            match jsonwebtoken::decode::<Claims>(token, &k.key, &validation) {
                Ok(data) => return Ok(data.claims),
                Err(e) => {
                    use jsonwebtoken::errors::ErrorKind::*;
                    last = Invalid(match e.kind() {
                        ExpiredSignature => "token expired".into(),
                        ImmatureSignature => "token not yet valid".into(),
                        InvalidAudience => format!("token is not for service {:?}", self.service),
                        InvalidIssuer => format!("token is not from issuer {:?}", self.issuer),
                        InvalidSignature => "signature does not verify".into(),
                        other => format!("invalid token: {other:?}"),
                    });
                    if !matches!(e.kind(), InvalidSignature) {
                        // The key matched; the claims are what is wrong.
                        return Err(last);
                    }
                }
            }
        }
        Err(last)
    }
}

/// A verification key from a SubjectPublicKeyInfo: the algorithm from its OID, the key as
/// `jsonwebtoken` wants it (a `PUBLIC KEY` PEM, which it parses for both EC and RSA).
fn key_from_spki(spki: &[u8]) -> Result<Key, String> {
    const P256: &[u8] = &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
    const P384: &[u8] = &[0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22];
    const RSA: &[u8] = &[
        0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01,
    ];
    let has = |oid: &[u8]| spki.windows(oid.len()).take(32).any(|w| w == oid);
    let pem = pem::encode(&pem::Pem::new("PUBLIC KEY", spki.to_vec()));
    let (alg, key) = if has(P256) {
        (Algorithm::ES256, DecodingKey::from_ec_pem(pem.as_bytes()))
    } else if has(P384) {
        (Algorithm::ES384, DecodingKey::from_ec_pem(pem.as_bytes()))
    } else if has(RSA) {
        (Algorithm::RS256, DecodingKey::from_rsa_pem(pem.as_bytes()))
    } else {
        return Err("only EC P-256/P-384 and RSA public keys are supported".into());
    };
    Ok(Key {
        kid: None,
        alg,
        key: key.map_err(|e| e.to_string())?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_parse_with_colons_in_names() {
        let a = parse_scope("repository:billing/api:pull,push").unwrap();
        assert_eq!(
            (a.kind.as_str(), a.name.as_str()),
            ("repository", "billing/api")
        );
        assert_eq!(a.actions, vec!["pull", "push"]);
        let a = parse_scope("repository:host:5000/x:pull").unwrap();
        assert_eq!(a.name, "host:5000/x");
        assert_eq!(
            parse_scope("registry:catalog:*").unwrap().actions,
            vec!["*"]
        );
        assert!(parse_scope("nonsense").is_none());
        assert!(parse_scope("repository::pull").is_none());
    }
}

#[cfg(test)]
mod signing_tests {
    use super::*;
    use ring::signature::KeyPair;

    fn es256_key(dir: &Path) -> (PathBuf, Vec<u8>) {
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = ring::signature::EcdsaKeyPair::generate_pkcs8(
            &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            &rng,
        )
        .unwrap();
        let path = dir.join("key.pem");
        std::fs::write(
            &path,
            pem::encode(&pem::Pem::new("PRIVATE KEY", pkcs8.as_ref().to_vec())),
        )
        .unwrap();
        (path, pkcs8.as_ref().to_vec())
    }

    use std::path::PathBuf;

    #[test]
    fn issued_tokens_verify_and_wrong_audience_issuer_expiry_and_key_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (path, pkcs8) = es256_key(dir.path());
        let issuer = Issuer::from_pem_file(&path, "flotilla", Duration::from_secs(300)).unwrap();
        let access = vec![parse_scope("repository:a/b:pull").unwrap()];
        let t = issuer.issue("alice", "registry", access.clone()).unwrap();

        let mut v = Verifier::new("flotilla", "registry");
        v.trust_issuer(&issuer);
        let c = v.verify(&t).unwrap();
        assert_eq!(c.sub, "alice");
        assert!(c.grants("repository", "a/b", "pull"));
        assert!(!c.grants("repository", "a/b", "push"));
        assert!(!c.grants("repository", "a/c", "pull"));

        let mut wrong_aud = Verifier::new("flotilla", "other");
        wrong_aud.trust_issuer(&issuer);
        assert!(wrong_aud.verify(&t).unwrap_err().0.contains("service"));
        let mut wrong_iss = Verifier::new("someone", "registry");
        wrong_iss.trust_issuer(&issuer);
        assert!(wrong_iss.verify(&t).unwrap_err().0.contains("issuer"));

        // Another key of the same algorithm: the signature does not verify.
        let other_dir = tempfile::tempdir().unwrap();
        let (other, _) = es256_key(other_dir.path());
        let other = Issuer::from_pem_file(&other, "flotilla", Duration::from_secs(300)).unwrap();
        let mut wrong_key = Verifier::new("flotilla", "registry");
        wrong_key.trust_issuer(&other);
        assert!(wrong_key.verify(&t).is_err());

        // Expired well past the leeway.
        let now = now_secs();
        let claims = Claims {
            iss: "flotilla".into(),
            sub: "alice".into(),
            aud: Audience::One("registry".into()),
            exp: now - 120,
            nbf: now - 600,
            iat: now - 600,
            jti: "x".into(),
            access,
        };
        let expired = jsonwebtoken::encode(
            &Header::new(Algorithm::ES256),
            &claims,
            &EncodingKey::from_ec_der(&pkcs8),
        )
        .unwrap();
        assert_eq!(v.verify(&expired).unwrap_err().0, "token expired");
        assert!(v.verify("not.a.token").is_err());

        // The same public key as a PUBLIC KEY PEM (what --token-cert also takes).
        let kp = ring::signature::EcdsaKeyPair::from_pkcs8(
            &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            &pkcs8,
            &ring::rand::SystemRandom::new(),
        )
        .unwrap();
        // SPKI for P-256: a fixed prefix and the uncompressed point.
        let mut spki = vec![
            0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06,
            0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
        ];
        spki.extend_from_slice(kp.public_key().as_ref());
        let pub_path = dir.path().join("pub.pem");
        std::fs::write(&pub_path, pem::encode(&pem::Pem::new("PUBLIC KEY", spki))).unwrap();
        let mut by_pem = Verifier::new("flotilla", "registry");
        by_pem.trust_pem_file(&pub_path).unwrap();
        assert_eq!(by_pem.verify(&t).unwrap().sub, "alice");
    }
}
