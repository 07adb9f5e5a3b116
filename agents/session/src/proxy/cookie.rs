//! The proxy's browser cookie: a short-lived token for one session, signed with a key of its own
//! (derived from the user-token secret, so a cookie is never accepted as a user token and the other
//! way round), carried as `berth_proxy=<jwt>; HttpOnly; SameSite=Lax`, scoped to `/s/{session}` or
//! to the session's own host.

use std::time::Duration;

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::auth::{unix_now, Identity, KeyMaterial};

/// The cookie's name.
pub const COOKIE_NAME: &str = "berth_proxy";
/// The `aud` of every cookie token: no user token carries it.
const COOKIE_AUDIENCE: &str = "berth-proxy-cookie";
/// Where an operator can put the cookie key when user tokens are verified with a public key.
pub const COOKIE_SECRET_ENV: &str = "BERTH_PROXY_COOKIE_SECRET";

/// The key cookies are signed with. Every instance of a deployment derives the same one.
#[derive(Clone)]
pub struct CookieKey {
    encoding: EncodingKey,
    decoding: DecodingKey,
}

impl std::fmt::Debug for CookieKey {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.debug_struct("CookieKey").finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct CookieClaims {
    sub: String,
    aud: String,
    /// The one session this cookie opens.
    sid: String,
    exp: u64,
    /// The expiry of the user token it was exchanged for: renewals never go past it.
    cap: u64,
    #[serde(default)]
    roles: Vec<String>,
}

/// A verified cookie.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CookieGrant {
    pub identity: Identity,
    pub session: String,
    pub expires_at: u64,
    /// Expiry of the token the cookie came from.
    pub cap: u64,
}

impl CookieKey {
    /// From the user-token key: an HS256 secret gives a derived key (a different key, so cookies
    /// and tokens cannot stand in for each other); with a public key, `BERTH_PROXY_COOKIE_SECRET`
    /// (shared by every instance), else a random key for this instance only.
    pub fn from_key_material(key: &KeyMaterial) -> CookieKey {
        let text = key.text.trim();
        let secret = if !text.starts_with("-----BEGIN") {
            text.to_owned()
        } else if let Some(configured) = std::env::var(COOKIE_SECRET_ENV).ok().filter(|value| value.trim().len() >= 16) {
            configured
        } else {
            tracing::warn!("user tokens use a public key and {COOKIE_SECRET_ENV} is unset: proxy cookies are valid on this instance only");
            format!("{}{}", uuid::Uuid::new_v4().simple(), uuid::Uuid::new_v4().simple())
        };
        let mut hasher = Sha256::new();
        hasher.update(b"berth proxy cookie v1\0");
        hasher.update(secret.as_bytes());
        let derived = hasher.finalize();
        CookieKey { encoding: EncodingKey::from_secret(&derived), decoding: DecodingKey::from_secret(&derived) }
    }

    /// A cookie value for `session`, valid for `ttl` but never beyond `cap` (Unix seconds).
    pub fn issue(&self, identity: &Identity, session: &str, ttl: Duration, cap: u64) -> Option<(String, u64)> {
        let expires_at = (unix_now() + ttl.as_secs()).min(cap);
        let claims = CookieClaims {
            sub: identity.user.clone(),
            aud: COOKIE_AUDIENCE.to_owned(),
            sid: session.to_owned(),
            exp: expires_at,
            cap,
            roles: identity.roles.clone(),
        };
        let value = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding).ok()?;
        Some((value, expires_at))
    }

    /// The grant of a cookie value if it is valid now and for `session`.
    pub fn verify(&self, value: &str, session: &str) -> Option<CookieGrant> {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_audience(&[COOKIE_AUDIENCE]);
        validation.set_required_spec_claims(&["exp", "aud", "sub"]);
        // The cookie's own Max-Age ends it in the browser at the same time.
        validation.leeway = 0;
        let claims = jsonwebtoken::decode::<CookieClaims>(value, &self.decoding, &validation).ok()?.claims;
        if claims.sid != session || !crate::auth::is_valid_user_id(&claims.sub) {
            return None;
        }
        Some(CookieGrant {
            identity: Identity { user: claims.sub, roles: claims.roles, expires_at: claims.exp },
            session: claims.sid,
            expires_at: claims.exp,
            cap: claims.cap,
        })
    }
}

/// Where a cookie applies: the session's path on the agent's origin, or the session's own host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CookieScope<'a> {
    Path(&'a str),
    Host,
}

/// The `Set-Cookie` value. No `Domain`: a host cookie stays on exactly that host.
pub fn set_cookie_header(value: &str, scope: CookieScope<'_>, max_age_secs: u64, secure: bool) -> String {
    let path = match scope {
        CookieScope::Path(session) => format!("/s/{session}"),
        CookieScope::Host => "/".to_owned(),
    };
    let secure = if secure { "; Secure" } else { "" };
    format!("{COOKIE_NAME}={value}; Path={path}; Max-Age={max_age_secs}; HttpOnly; SameSite=Lax{secure}")
}

/// Every `berth_proxy` value in the request's `Cookie` headers (a page on a sibling host may have
/// planted one of its own; each is tried).
pub fn cookie_values(headers: &axum::http::HeaderMap) -> Vec<&str> {
    headers
        .get_all(axum::http::header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .filter(|(name, _)| *name == COOKIE_NAME)
        .map(|(_, value)| value)
        .collect()
}

/// The `Cookie` header without Berth's own cookie, for the app; `None` when nothing is left.
pub fn without_berth_cookie(header: &str) -> Option<String> {
    let kept: Vec<&str> = header
        .split(';')
        .map(str::trim)
        .filter(|pair| !pair.is_empty() && pair.split_once('=').map_or(*pair, |(name, _)| name) != COOKIE_NAME)
        .collect();
    (!kept.is_empty()).then(|| kept.join("; "))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> CookieKey {
        CookieKey::from_key_material(&KeyMaterial::inline("0123456789abcdef0123456789abcdef"))
    }

    fn alice() -> Identity {
        Identity { user: "alice".into(), roles: vec![], expires_at: unix_now() + 3600 }
    }

    #[test]
    fn a_cookie_opens_its_session_only_and_never_outlives_its_token() {
        let key = key();
        let cap = unix_now() + 60;
        let (value, expires_at) = key.issue(&alice(), "s1", Duration::from_secs(900), cap).unwrap();
        assert_eq!(expires_at, cap);
        let grant = key.verify(&value, "s1").unwrap();
        assert_eq!((grant.identity.user.as_str(), grant.cap), ("alice", cap));
        assert_eq!(key.verify(&value, "s2"), None);
        let other = CookieKey::from_key_material(&KeyMaterial::inline("another-secret-of-enough-length"));
        assert_eq!(other.verify(&value, "s1"), None);
        let (expired, _) = key.issue(&alice(), "s1", Duration::from_secs(900), unix_now() - 1).unwrap();
        assert_eq!(key.verify(&expired, "s1"), None);
    }

    #[test]
    fn a_user_token_is_not_a_cookie() {
        let authority = crate::auth::TokenAuthority::new(&KeyMaterial::inline("0123456789abcdef0123456789abcdef"), "berth").unwrap();
        let token = authority.mint("alice", &[], Duration::from_secs(60)).unwrap();
        assert_eq!(key().verify(&token, "s1"), None);
    }

    #[test]
    fn cookie_headers() {
        assert_eq!(
            set_cookie_header("v", CookieScope::Path("s1"), 900, false),
            "berth_proxy=v; Path=/s/s1; Max-Age=900; HttpOnly; SameSite=Lax"
        );
        assert!(set_cookie_header("v", CookieScope::Host, 5, true).ends_with("Path=/; Max-Age=5; HttpOnly; SameSite=Lax; Secure"));
        assert_eq!(without_berth_cookie("a=1; berth_proxy=x; b=2").as_deref(), Some("a=1; b=2"));
        assert_eq!(without_berth_cookie("berth_proxy=x"), None);
        let mut headers = axum::http::HeaderMap::new();
        headers.append("cookie", "a=1; berth_proxy=x".parse().unwrap());
        headers.append("cookie", "berth_proxy=y".parse().unwrap());
        assert_eq!(cookie_values(&headers), ["x", "y"]);
    }
}
