//! Creates the bus identities on the broker through RabbitMQ's management HTTP API: one user per
//! [`Identity::CREATED`], its password (generated once, kept in [`identity::secrets_dir`]), and its
//! permissions and topic permissions ([`identity::permissions`]) in the vhost of the admin URL.
//!
//! The management API, not `rabbitmqctl`: it works from any host or container that reaches the
//! broker (compose's bootstrap runs in a container of its own), and a call is milliseconds where
//! `rabbitmqctl` starts an Erlang VM (about a second), so test set-up can afford it.
//! Idempotent: every call is a PUT of the whole desired state; a process does it once per vhost.

use std::collections::HashSet;
use std::io::Write;
use std::path::Path;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use crate::identity::{self, AmqpUrl, Identity, IdentityError};

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error(
        "the broker's management API at {url} is unreachable ({source}); enable `rabbitmq_management` or set BERTH_AMQP_MANAGEMENT_URL"
    )]
    Unreachable { url: String, source: reqwest::Error },
    #[error("the broker's management API refused {what}: HTTP {status}: {body}")]
    Refused { what: String, status: u16, body: String },
    #[error("cannot keep the password of the {identity} identity under {dir}: {source}")]
    Secrets { identity: Identity, dir: String, source: std::io::Error },
}

/// The management API of the broker of `amqp_url`: `BERTH_AMQP_MANAGEMENT_URL`, else
/// `http://<amqp host>:15672`.
pub fn management_url(amqp_url: &AmqpUrl) -> String {
    match std::env::var("BERTH_AMQP_MANAGEMENT_URL") {
        Ok(url) if !url.is_empty() => url.trim_end_matches('/').to_owned(),
        _ => format!("http://{}:15672", amqp_url.host()),
    }
}

/// Creates or updates every created identity's user, password and permissions in the vhost of
/// `admin_amqp_url` (whose user must be a broker administrator). Returns the vhost. Cheap after
/// the first call for a vhost in this process.
pub async fn ensure_identities(admin_amqp_url: &str) -> Result<String, AdminError> {
    static DONE: OnceLock<Mutex<HashSet<String>>> = OnceLock::new();
    let admin = AmqpUrl::parse(&identity::url_for(admin_amqp_url, Identity::Admin)?)?;
    let vhost = admin.vhost();
    let base = management_url(&admin);
    let done_key = format!("{base} {vhost} {}", identity::secrets_dir().display());
    let done = DONE.get_or_init(Mutex::default);
    if done.lock().unwrap_or_else(std::sync::PoisonError::into_inner).contains(&done_key) {
        return Ok(vhost);
    }
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .map_err(|source| AdminError::Unreachable { url: base.clone(), source })?;
    let api = Api { client, base, user: admin.user.clone(), password: admin.password() };
    let dir = identity::secrets_dir();
    for identity in Identity::CREATED {
        let Some(username) = identity.username() else { continue };
        let password = password_kept(&dir, identity)?;
        let user_path = format!("/api/users/{}", encode(username));
        api.put(&user_path, serde_json::json!({ "password": password, "tags": "" }), &format!("creating user {username}")).await?;
        let permissions = identity::permissions(identity);
        let vhost_user = format!("{}/{}", encode(&vhost), encode(username));
        api.put(
            &format!("/api/permissions/{vhost_user}"),
            serde_json::json!({ "configure": permissions.configure, "write": permissions.write, "read": permissions.read }),
            &format!("permissions of {username} in vhost {vhost}"),
        )
        .await?;
        for topic in &permissions.topics {
            api.put(
                &format!("/api/topic-permissions/{vhost_user}"),
                serde_json::json!({ "exchange": topic.exchange, "write": topic.write, "read": topic.read }),
                &format!("topic permissions of {username} on {} in vhost {vhost}", topic.exchange),
            )
            .await?;
        }
    }
    done.lock().unwrap_or_else(std::sync::PoisonError::into_inner).insert(done_key);
    Ok(vhost)
}

struct Api {
    client: reqwest::Client,
    base: String,
    user: String,
    password: String,
}

impl Api {
    async fn put(&self, path: &str, body: serde_json::Value, what: &str) -> Result<(), AdminError> {
        let url = format!("{}{path}", self.base);
        let response = self
            .client
            .put(&url)
            .basic_auth(&self.user, Some(&self.password))
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body.to_string())
            .send()
            .await
            .map_err(|source| AdminError::Unreachable { url: self.base.clone(), source })?;
        let status = response.status();
        if status.is_success() {
            return Ok(());
        }
        let body = response.text().await.unwrap_or_default();
        Err(AdminError::Refused { what: what.to_owned(), status: status.as_u16(), body })
    }
}

/// The identity's password from `dir`, generated (244 random bits, hex) and written once when
/// missing. Written to a temporary file and hard-linked into place, so processes racing here all
/// end up with the one password that won.
fn password_kept(dir: &Path, identity: Identity) -> Result<String, AdminError> {
    let failed = |source: std::io::Error| AdminError::Secrets { identity, dir: dir.display().to_string(), source };
    if let Ok(password) = identity::read_password(dir, identity) {
        return Ok(password);
    }
    create_private_dir(dir).map_err(failed)?;
    let generated = format!("{}{}", uuid::Uuid::new_v4().simple(), uuid::Uuid::new_v4().simple());
    let final_path = identity::password_path(dir, identity);
    let temporary = dir.join(format!(".{}.{}", identity.as_str(), uuid::Uuid::now_v7().simple()));
    {
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        set_private_mode(&mut options);
        let mut file = options.open(&temporary).map_err(failed)?;
        file.write_all(generated.as_bytes()).and_then(|()| file.sync_all()).map_err(failed)?;
    }
    let linked = std::fs::hard_link(&temporary, &final_path);
    let _ = std::fs::remove_file(&temporary);
    match linked {
        Ok(()) => Ok(generated),
        Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => Ok(identity::read_password(dir, identity)?),
        Err(error) => Err(failed(error)),
    }
}

#[cfg(unix)]
fn set_private_mode(options: &mut std::fs::OpenOptions) {
    use std::os::unix::fs::OpenOptionsExt;
    options.mode(0o600);
}

#[cfg(not(unix))]
fn set_private_mode(_options: &mut std::fs::OpenOptions) {}

fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder.create(dir)
}

/// One path segment of the management API (`/` is `%2F`).
fn encode(segment: &str) -> String {
    segment
        .bytes()
        .map(
            |byte| {
                if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
                    (byte as char).to_string()
                } else {
                    format!("%{byte:02X}")
                }
            },
        )
        .collect()
}
