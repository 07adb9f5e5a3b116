//! Opens the object store named by a URL: `s3://bucket/prefix` (AWS and S3-compatible servers),
//! `az://container/prefix` (Azure Blob), `gs://bucket/prefix` (GCS) and `file:///dir` (the embedded
//! default). Settings come from the usual environment variables (`AWS_*`, `AZURE_*`, `GOOGLE_*`)
//! or from an explicit list, so tests never touch the process environment.

use std::sync::Arc;
use std::time::Duration;

use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey, S3ConditionalPut};
use object_store::azure::{AzureConfigKey, MicrosoftAzureBuilder};
use object_store::gcp::{GoogleCloudStorageBuilder, GoogleConfigKey};
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjectPath;
use object_store::{BackoffConfig, ObjectStore, RetryConfig};

use crate::error::{Error, Result};

/// An opened object store and the key prefix the URL pointed at (empty for a bare bucket).
#[derive(Clone)]
pub struct OpenedStore {
    pub store: Arc<dyn ObjectStore>,
    pub root: ObjectPath,
    /// The URL, for logs.
    pub url: String,
}

impl std::fmt::Debug for OpenedStore {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.debug_struct("OpenedStore").field("url", &self.url).field("root", &self.root).finish()
    }
}

/// Store settings as `(key, value)` pairs, keys in `object_store`'s spelling (`aws_endpoint`,
/// `aws_allow_http`, `azure_storage_account_name`, `google_service_account`, …).
#[derive(Debug, Clone, Default)]
pub struct StoreSettings {
    pub options: Vec<(String, String)>,
}

impl StoreSettings {
    /// Every `AWS_*`, `AZURE_*` and `GOOGLE_*` variable of the process environment, lowercased.
    pub fn from_env() -> StoreSettings {
        let options = std::env::vars()
            .filter(|(name, _)| name.starts_with("AWS_") || name.starts_with("AZURE_") || name.starts_with("GOOGLE_"))
            .map(|(name, value)| (name.to_ascii_lowercase(), value))
            .collect();
        StoreSettings { options }
    }

    pub fn with(mut self, key: &str, value: &str) -> StoreSettings {
        self.options.push((key.to_owned(), value.to_owned()));
        self
    }

    /// Settings for an S3-compatible server on plain HTTP with path-style requests.
    pub fn s3_compatible(endpoint: &str) -> StoreSettings {
        StoreSettings::default()
            .with("aws_endpoint", endpoint)
            .with("aws_allow_http", "true")
            .with("aws_region", "us-east-1")
            .with("aws_access_key_id", "berth")
            .with("aws_secret_access_key", "berth")
            .with("aws_virtual_hosted_style_request", "false")
    }
}

/// Retries inside one store call are short: the agent's own retries (with backoff, across whole
/// sync attempts) are what carry a final sync through an outage.
fn retry_config() -> RetryConfig {
    RetryConfig {
        backoff: BackoffConfig { init_backoff: Duration::from_millis(100), max_backoff: Duration::from_secs(1), base: 2.0 },
        max_retries: 2,
        retry_timeout: Duration::from_secs(10),
    }
}

/// Opens the store a URL names.
pub fn open(url: &str, settings: &StoreSettings) -> Result<OpenedStore> {
    let (scheme, rest) = url.split_once("://").ok_or_else(|| Error::StoreConfig(format!("{url:?} is not a URL")))?;
    let (bucket, path) = rest.split_once('/').unwrap_or((rest, ""));
    let root = ObjectPath::parse(path.trim_matches('/')).map_err(|error| Error::StoreConfig(format!("prefix of {url:?}: {error}")))?;
    let store: Arc<dyn ObjectStore> = match scheme {
        "file" => {
            if !bucket.is_empty() && bucket != "localhost" {
                return Err(Error::StoreConfig(format!("{url:?}: file URLs name a local directory (file:///dir)")));
            }
            let directory = std::path::PathBuf::from(format!("/{path}"));
            std::fs::create_dir_all(&directory).map_err(|source| Error::io("creating object directory", &directory, source))?;
            let local = LocalFileSystem::new_with_prefix(&directory)?;
            // The directory itself is the root: keys are relative to it.
            return Ok(OpenedStore { store: Arc::new(local), root: ObjectPath::default(), url: url.to_owned() });
        }
        "s3" | "s3a" => {
            // Conditional puts with `If-Match`/`If-None-Match` (AWS S3 since 2024, MinIO, R2,
            // moto); `aws_conditional_put=disabled` turns them off for a store that can't, and the
            // agent then checks the version itself right before each write.
            let mut builder =
                AmazonS3Builder::new().with_url(url).with_retry(retry_config()).with_conditional_put(S3ConditionalPut::ETagMatch);
            for (key, value) in &settings.options {
                if let Ok(config_key) = key.parse::<AmazonS3ConfigKey>() {
                    builder = builder.with_config(config_key, value);
                }
            }
            Arc::new(builder.with_bucket_name(bucket).build()?)
        }
        "az" | "azure" | "abfs" | "abfss" => {
            let mut builder = MicrosoftAzureBuilder::new().with_url(url).with_retry(retry_config());
            for (key, value) in &settings.options {
                if let Ok(config_key) = key.parse::<AzureConfigKey>() {
                    builder = builder.with_config(config_key, value);
                }
            }
            Arc::new(builder.with_container_name(bucket).build()?)
        }
        "gs" => {
            let mut builder = GoogleCloudStorageBuilder::new().with_url(url).with_retry(retry_config());
            for (key, value) in &settings.options {
                if let Ok(config_key) = key.parse::<GoogleConfigKey>() {
                    builder = builder.with_config(config_key, value);
                }
            }
            Arc::new(builder.with_bucket_name(bucket).build()?)
        }
        other => return Err(Error::StoreConfig(format!("unsupported object store scheme {other:?} (s3, az, gs or file)"))),
    };
    Ok(OpenedStore { store, root, url: url.to_owned() })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn urls_open_or_are_refused_by_name() {
        let s3 = open("s3://bucket/some/prefix", &StoreSettings::s3_compatible("http://127.0.0.1:9000")).unwrap();
        assert_eq!(s3.root.as_ref(), "some/prefix");
        let error = open("ftp://host/x", &StoreSettings::default()).unwrap_err().to_string();
        assert!(error.contains("unsupported object store scheme \"ftp\""), "{error}");
        assert!(open("not a url", &StoreSettings::default()).is_err());
        let directory = std::env::temp_dir().join(format!("berth-store-{}", uuid::Uuid::new_v4()));
        let local = open(&format!("file://{}", directory.display()), &StoreSettings::default()).unwrap();
        assert_eq!(local.root.as_ref(), "");
        std::fs::remove_dir_all(&directory).unwrap();
    }
}
