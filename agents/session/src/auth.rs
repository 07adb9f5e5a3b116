//! Who is calling: JWT verification (HS256 secret, or an RS256/ES256 public key), development token
//! minting, and where the key comes from.
//!
//! The key is the environment variable named by `session.jwt_key_env`; when that is unset, a
//! secret file next to the workspace root (created once, mode 0600) so that `berth dev` and
//! `berth token` on the same machine agree without any set-up.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use protocol::Profile;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Tokens may be this far past `exp` and still pass, to absorb clock drift between machines.
const CLOCK_LEEWAY_SECS: u64 = 10;
/// Shorter HS256 secrets are refused: they can be brute-forced offline from any token.
const MIN_SECRET_BYTES: usize = 16;
/// The role that sees and controls every session.
pub const ADMIN_ROLE: &str = "admin";
/// The longest lifetime `berth token` will mint.
const MAX_TTL: Duration = Duration::from_secs(30 * 24 * 3600);

/// The claims Berth reads from (and writes into) a user token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    pub aud: String,
    pub exp: u64,
    #[serde(default)]
    pub iat: u64,
    #[serde(default)]
    pub roles: Vec<String>,
}

/// The authenticated caller, taken from a verified token and nothing else.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub user: String,
    pub roles: Vec<String>,
    /// The token's `exp` (Unix seconds): a socket authenticated with it is closed then.
    pub expires_at: u64,
}

impl Identity {
    pub fn is_admin(&self) -> bool {
        self.roles.iter().any(|role| role == ADMIN_ROLE)
    }

    /// How long the token stays valid from now.
    pub fn remaining_validity(&self) -> Duration {
        Duration::from_secs(self.expires_at.saturating_sub(unix_now()))
    }
}

/// Why a request was not authenticated. Every variant ends in 401; the text goes to the log and
/// the response body, never anything about the key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthFailure {
    #[error("no token: send `Authorization: Bearer <token>`, a `bearer.<token>` WebSocket protocol or `?access_token=`")]
    MissingToken,
    #[error("token expired")]
    Expired,
    #[error("token is not valid yet (nbf)")]
    NotYetValid,
    #[error("token is for another audience")]
    WrongAudience,
    #[error("token signature is invalid")]
    BadSignature,
    #[error("token is malformed: {0}")]
    Malformed(String),
    #[error("token subject is not a valid user id")]
    BadSubject,
}

impl AuthFailure {
    /// A short stable label for metrics and logs.
    pub fn label(&self) -> &'static str {
        match self {
            AuthFailure::MissingToken => "missing",
            AuthFailure::Expired => "expired",
            AuthFailure::NotYetValid => "not_yet_valid",
            AuthFailure::WrongAudience => "audience",
            AuthFailure::BadSignature => "signature",
            AuthFailure::Malformed(_) => "malformed",
            AuthFailure::BadSubject => "subject",
        }
    }
}

/// The raw key text and where it came from (for error messages).
#[derive(Clone)]
pub struct KeyMaterial {
    pub text: String,
    pub origin: String,
}

impl std::fmt::Debug for KeyMaterial {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the key itself.
        formatter.debug_struct("KeyMaterial").field("origin", &self.origin).finish_non_exhaustive()
    }
}

impl KeyMaterial {
    /// An HS256 secret or PEM given directly (tests, benchmarks).
    pub fn inline(text: &str) -> KeyMaterial {
        KeyMaterial { text: text.to_owned(), origin: "inline".to_owned() }
    }

    /// The key named by the profile: its environment variable, else the machine's secret file.
    pub fn from_profile(profile: &Profile) -> Result<KeyMaterial> {
        let variable = &profile.session.jwt_key_env;
        if let Ok(text) = std::env::var(variable) {
            if !text.trim().is_empty() {
                return Ok(KeyMaterial { text, origin: format!("${variable}") });
            }
        }
        let path = secret_file_path(profile);
        let text = read_or_create_secret_file(&path)?;
        Ok(KeyMaterial { text, origin: path.display().to_string() })
    }
}

/// `<parent of services.workspace_root>/jwt-secret`.
pub fn secret_file_path(profile: &Profile) -> PathBuf {
    let root = &profile.services.workspace_root;
    root.parent().unwrap_or(root).join("jwt-secret")
}

/// Reads the secret file, creating it with a fresh random secret (mode 0600) if it is missing.
/// Two processes racing to create it agree: the file is linked into place only if absent.
fn read_or_create_secret_file(path: &Path) -> Result<String> {
    let key_file_error = |source| Error::KeyFile { path: path.to_owned(), source };
    match std::fs::read_to_string(path) {
        Ok(text) => return Ok(text.trim().to_owned()),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
        Err(error) => return Err(key_file_error(error)),
    }
    let directory = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(directory).map_err(key_file_error)?;
    let secret = format!("{}{}", uuid::Uuid::new_v4().simple(), uuid::Uuid::new_v4().simple());
    let staging = directory.join(format!(".jwt-secret.{}", uuid::Uuid::new_v4().simple()));
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(&staging).map_err(key_file_error)?;
    file.write_all(secret.as_bytes()).and_then(|()| file.sync_all()).map_err(key_file_error)?;
    drop(file);
    let linked = std::fs::hard_link(&staging, path);
    let _ = std::fs::remove_file(&staging);
    match linked {
        Ok(()) => {
            tracing::info!(path = %path.display(), "created a development jwt secret");
            Ok(secret)
        }
        Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => {
            Ok(std::fs::read_to_string(path).map_err(key_file_error)?.trim().to_owned())
        }
        Err(error) => Err(key_file_error(error)),
    }
}

/// Verifies user tokens and, when the key is a shared secret, mints them.
#[derive(Clone)]
pub struct TokenAuthority {
    algorithm: Algorithm,
    decoding_key: DecodingKey,
    /// Only with an HS256 secret: a public key cannot sign.
    encoding_key: Option<EncodingKey>,
    audience: String,
}

impl std::fmt::Debug for TokenAuthority {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("TokenAuthority")
            .field("algorithm", &self.algorithm)
            .field("audience", &self.audience)
            .finish_non_exhaustive()
    }
}

impl TokenAuthority {
    /// Builds the authority from key text: a PEM public key (RS256 or ES256) when it starts with
    /// `-----BEGIN`, otherwise an HS256 secret.
    pub fn new(key: &KeyMaterial, audience: &str) -> Result<TokenAuthority> {
        let bad_key = |reason: String| Error::BadKey { origin: key.origin.clone(), reason };
        let text = key.text.trim();
        if text.starts_with("-----BEGIN") {
            if let Ok(decoding_key) = DecodingKey::from_rsa_pem(text.as_bytes()) {
                return Ok(TokenAuthority { algorithm: Algorithm::RS256, decoding_key, encoding_key: None, audience: audience.to_owned() });
            }
            let decoding_key = DecodingKey::from_ec_pem(text.as_bytes())
                .map_err(|error| bad_key(format!("not an RSA or EC public key in PEM ({error})")))?;
            return Ok(TokenAuthority { algorithm: Algorithm::ES256, decoding_key, encoding_key: None, audience: audience.to_owned() });
        }
        if text.len() < MIN_SECRET_BYTES {
            return Err(bad_key(format!("an HS256 secret must be at least {MIN_SECRET_BYTES} bytes")));
        }
        Ok(TokenAuthority {
            algorithm: Algorithm::HS256,
            decoding_key: DecodingKey::from_secret(text.as_bytes()),
            encoding_key: Some(EncodingKey::from_secret(text.as_bytes())),
            audience: audience.to_owned(),
        })
    }

    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    /// Verifies signature, expiry and audience, and that the subject can be used as a user id.
    pub fn verify(&self, token: &str) -> Result<Identity, AuthFailure> {
        let mut validation = Validation::new(self.algorithm);
        validation.set_audience(&[&self.audience]);
        validation.set_required_spec_claims(&["exp", "aud", "sub"]);
        validation.leeway = CLOCK_LEEWAY_SECS;
        // A token that says it is not valid yet is not valid yet.
        validation.validate_nbf = true;
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding_key, &validation).map_err(|error| {
            use jsonwebtoken::errors::ErrorKind;
            match error.kind() {
                ErrorKind::ExpiredSignature => AuthFailure::Expired,
                ErrorKind::ImmatureSignature => AuthFailure::NotYetValid,
                ErrorKind::InvalidAudience => AuthFailure::WrongAudience,
                ErrorKind::InvalidSignature | ErrorKind::InvalidAlgorithm => AuthFailure::BadSignature,
                _ => AuthFailure::Malformed(error.to_string()),
            }
        })?;
        let claims = data.claims;
        if !is_valid_user_id(&claims.sub) {
            return Err(AuthFailure::BadSubject);
        }
        Ok(Identity { user: claims.sub, roles: claims.roles, expires_at: claims.exp })
    }

    /// Signs a token for `user` valid for `ttl` (HS256 keys only).
    pub fn mint(&self, user: &str, roles: &[String], ttl: Duration) -> Result<String> {
        let Some(encoding_key) = &self.encoding_key else {
            return Err(Error::CannotMint(
                "the configured key is a public key; only the identity provider holding the private key can sign".to_owned(),
            ));
        };
        if !is_valid_user_id(user) {
            return Err(Error::CannotMint(format!("{user:?} is not a valid user id (letters, digits, `-_.@`, at most 128)")));
        }
        let now = unix_now();
        let claims = Claims { sub: user.to_owned(), aud: self.audience.clone(), exp: now + ttl.as_secs(), iat: now, roles: roles.to_vec() };
        jsonwebtoken::encode(&Header::new(self.algorithm), &claims, encoding_key).map_err(|error| Error::CannotMint(error.to_string()))
    }
}

/// User ids end up in AMQP topic routing keys (`user.<id>`), where `*` and `#` are wildcards: a
/// subject like `#` would otherwise receive everyone's notifications ([`protocol::ids::UserId`]).
pub fn is_valid_user_id(user: &str) -> bool {
    protocol::ids::UserId::parse(user).is_ok()
}

pub(crate) fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|elapsed| elapsed.as_secs()).unwrap_or(0)
}

/// Parses a duration as `humantime` writes them (`90s`, `30m`, `1h`, `2d`, `1h 30m`) or a bare
/// number of seconds.
pub fn parse_ttl(text: &str) -> Result<Duration> {
    let bad = |reason: &str| Error::BadTtl { text: text.to_owned(), reason: reason.to_owned() };
    let trimmed = text.trim();
    let ttl = match trimmed.parse::<u64>() {
        Ok(seconds) => Duration::from_secs(seconds),
        Err(_) => humantime::parse_duration(trimmed).map_err(|error| bad(&error.to_string()))?,
    };
    if ttl.is_zero() {
        return Err(bad("must be positive"));
    }
    if ttl > MAX_TTL {
        return Err(bad("at most 30d"));
    }
    Ok(ttl)
}

/// The token a request carries: `Authorization: Bearer`, then a `bearer.<token>` entry of
/// `Sec-WebSocket-Protocol` (browsers cannot set headers on a WebSocket), then `?access_token=`.
pub fn token_from_request<'a>(
    authorization: Option<&'a str>,
    websocket_protocols: Option<&'a str>,
    access_token_query: Option<&'a str>,
) -> Option<&'a str> {
    if let Some(value) = authorization {
        let (scheme, token) = value.trim().split_once(' ')?;
        return scheme.eq_ignore_ascii_case("bearer").then_some(token.trim());
    }
    if let Some(protocols) = websocket_protocols {
        let from_protocol = protocols.split(',').map(str::trim).find_map(|entry| entry.strip_prefix("bearer."));
        if from_protocol.is_some() {
            return from_protocol;
        }
    }
    access_token_query.filter(|token| !token.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[track_caller]
    fn check_ttl(text: &str, expected: Option<u64>) {
        assert_eq!(parse_ttl(text).ok().map(|ttl| ttl.as_secs()), expected, "{text}");
    }

    #[test]
    fn ttl_table() {
        check_ttl("1h", Some(3600));
        check_ttl("30m", Some(1800));
        check_ttl("2d", Some(172_800));
        check_ttl("45s", Some(45));
        check_ttl("120", Some(120));
        check_ttl("0h", None);
        check_ttl("", None);
        check_ttl("h", None);
        check_ttl("1w", Some(604_800));
        check_ttl("1h 30m", Some(5400));
        check_ttl("1x", None);
        check_ttl("-1h", None);
        check_ttl("31d", None);
    }

    #[test]
    fn token_sources_in_order() {
        assert_eq!(token_from_request(Some("Bearer abc"), Some("bearer.def"), Some("ghi")), Some("abc"));
        assert_eq!(token_from_request(Some("Basic abc"), None, None), None);
        assert_eq!(token_from_request(None, Some("berth.v1, bearer.def"), Some("ghi")), Some("def"));
        assert_eq!(token_from_request(None, Some("berth.v1"), Some("ghi")), Some("ghi"));
        assert_eq!(token_from_request(None, None, Some("")), None);
        assert_eq!(token_from_request(None, None, None), None);
    }

    #[test]
    fn user_ids_cannot_be_routing_wildcards() {
        assert!(is_valid_user_id("alice"));
        assert!(is_valid_user_id("alice@example.org"));
        assert!(!is_valid_user_id("#"));
        assert!(!is_valid_user_id("a*"));
        assert!(!is_valid_user_id(""));
        assert!(!is_valid_user_id("a b"));
    }

    #[test]
    fn mint_and_verify_round_trip_and_refusals() {
        let authority = TokenAuthority::new(&KeyMaterial::inline("0123456789abcdef0123456789abcdef"), "berth").unwrap();
        let token = authority.mint("alice", &["admin".to_owned()], Duration::from_secs(60)).unwrap();
        let identity = authority.verify(&token).unwrap();
        assert_eq!(identity.user, "alice");
        assert!(identity.is_admin());

        let other_audience = TokenAuthority::new(&KeyMaterial::inline("0123456789abcdef0123456789abcdef"), "elsewhere").unwrap();
        assert_eq!(other_audience.verify(&token), Err(AuthFailure::WrongAudience));
        let other_key = TokenAuthority::new(&KeyMaterial::inline("fedcba9876543210fedcba9876543210"), "berth").unwrap();
        assert_eq!(other_key.verify(&token), Err(AuthFailure::BadSignature));
        assert!(matches!(authority.verify("not-a-token"), Err(AuthFailure::Malformed(_))));
        let secret = EncodingKey::from_secret(b"0123456789abcdef0123456789abcdef");
        let not_yet = serde_json::json!({"sub": "alice", "aud": "berth", "exp": unix_now() + 7200, "nbf": unix_now() + 3600});
        let not_yet = jsonwebtoken::encode(&Header::default(), &not_yet, &secret).unwrap();
        assert_eq!(authority.verify(&not_yet), Err(AuthFailure::NotYetValid));
        assert!(TokenAuthority::new(&KeyMaterial::inline("short"), "berth").is_err());
        assert!(authority.mint("#", &[], Duration::from_secs(60)).is_err());
    }

    fn sign_with_private_pem(algorithm: Algorithm, private_pem: &str, audience: &str) -> String {
        let key = match algorithm {
            Algorithm::RS256 => EncodingKey::from_rsa_pem(private_pem.as_bytes()).unwrap(),
            _ => EncodingKey::from_ec_pem(private_pem.as_bytes()).unwrap(),
        };
        let claims = Claims { sub: "carol".into(), aud: audience.into(), exp: unix_now() + 60, iat: unix_now(), roles: vec![] };
        jsonwebtoken::encode(&Header::new(algorithm), &claims, &key).unwrap()
    }

    #[test]
    fn public_keys_verify_rs256_and_es256_and_refuse_algorithm_confusion() {
        let cases = [
            (Algorithm::RS256, include_str!("../tests/keys/rsa-private.pem"), include_str!("../tests/keys/rsa-public.pem")),
            (Algorithm::ES256, include_str!("../tests/keys/ec-private.pem"), include_str!("../tests/keys/ec-public.pem")),
        ];
        for (algorithm, private_pem, public_pem) in cases {
            let authority = TokenAuthority::new(&KeyMaterial::inline(public_pem), "berth").unwrap();
            assert_eq!(authority.algorithm(), algorithm);
            let token = sign_with_private_pem(algorithm, private_pem, "berth");
            assert_eq!(authority.verify(&token).unwrap().user, "carol");
            assert_eq!(authority.verify(&sign_with_private_pem(algorithm, private_pem, "other")), Err(AuthFailure::WrongAudience));
            // An attacker who knows the public key must not pass it off as an HS256 secret.
            let confused = jsonwebtoken::encode(
                &Header::new(Algorithm::HS256),
                &Claims { sub: "mallory".into(), aud: "berth".into(), exp: unix_now() + 60, iat: 0, roles: vec!["admin".into()] },
                &EncodingKey::from_secret(public_pem.trim().as_bytes()),
            )
            .unwrap();
            assert_eq!(authority.verify(&confused), Err(AuthFailure::BadSignature));
            assert!(authority.mint("carol", &[], Duration::from_secs(60)).is_err(), "a public key cannot mint");
        }
        assert!(
            TokenAuthority::new(&KeyMaterial::inline("-----BEGIN PUBLIC KEY-----\ngarbage\n-----END PUBLIC KEY-----"), "berth").is_err()
        );
    }

    #[test]
    fn secret_file_is_created_once_with_mode_0600() {
        let directory = std::env::temp_dir().join(format!("berth-session-secret-{}", uuid::Uuid::new_v4().simple()));
        let path = directory.join("jwt-secret");
        let first = read_or_create_secret_file(&path).unwrap();
        let second = read_or_create_secret_file(&path).unwrap();
        assert_eq!(first, second);
        assert!(first.len() >= MIN_SECRET_BYTES);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        }
        std::fs::remove_dir_all(&directory).unwrap();
    }
}
