//! Object-store locations from URIs (`file://`, `s3://`, `gs://`, `az://`), configured from the
//! environment the way the trainer pods receive credentials (AWS_*, GOOGLE_*, AZURE_*).

use std::sync::Arc;

use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};

use crate::{Error, Result};

/// A folder in an object store.
#[derive(Clone, Debug)]
pub struct Location {
    /// The store.
    pub store: Arc<dyn ObjectStore>,
    /// The folder's path inside the store.
    pub prefix: Path,
    /// The URI it was opened from, for messages.
    pub uri: String,
}

impl Location {
    /// Opens a folder URI. `file://` paths must be absolute; a plain absolute path is taken as
    /// `file://`. Store settings come from the process environment (`AWS_*`, `GOOGLE_*`,
    /// `AZURE_*`), as trainer pods receive them.
    pub fn open(uri: &str) -> Result<Location> {
        Self::open_with(uri, std::env::vars())
    }

    /// [`Location::open`] with the settings taken from `vars` instead of the environment. An
    /// `http://` S3 endpoint enables plain HTTP; S3 requests are retried briefly by the store
    /// (callers such as the loader add their own retries with backoff and logging on top).
    pub fn open_with(
        uri: &str,
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Location> {
        let uri = uri.trim_end_matches('/').to_string();
        let text = if uri.starts_with('/') {
            format!("file://{uri}")
        } else {
            uri.clone()
        };
        let url = url::Url::parse(&text).map_err(|e| Error::Uri {
            uri: uri.clone(),
            reason: e.to_string(),
        })?;
        let bad = |reason: String| Error::Uri {
            uri: uri.clone(),
            reason,
        };
        let opts: Vec<(String, String)> = vars
            .into_iter()
            .filter(|(k, _)| {
                k.starts_with("AWS_") || k.starts_with("GOOGLE_") || k.starts_with("AZURE_")
            })
            .map(|(k, v)| (k.to_ascii_lowercase(), v))
            .collect();
        let (store, prefix): (Arc<dyn ObjectStore>, Path) = match url.scheme() {
            "file" => {
                std::fs::create_dir_all(url.path()).map_err(|e| Error::Io {
                    path: url.path().into(),
                    source: e,
                })?;
                let (store, prefix) =
                    object_store::parse_url(&url).map_err(|e| bad(e.to_string()))?;
                (Arc::from(store), prefix)
            }
            "s3" => {
                use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
                let mut b = AmazonS3Builder::new().with_url(text.clone());
                for (k, v) in &opts {
                    if let Ok(key) = k.parse::<AmazonS3ConfigKey>() {
                        b = b.with_config(key, v.clone());
                    }
                }
                if opts.iter().any(|(k, v)| {
                    (k == "aws_endpoint_url" || k == "aws_endpoint") && v.starts_with("http://")
                }) {
                    b = b.with_allow_http(true);
                }
                let retry = object_store::RetryConfig {
                    max_retries: 2,
                    retry_timeout: std::time::Duration::from_secs(5),
                    ..Default::default()
                };
                let store = b
                    .with_virtual_hosted_style_request(false)
                    .with_retry(retry)
                    .build()
                    .map_err(|e| bad(e.to_string()))?;
                (
                    Arc::new(store),
                    Path::parse(url.path()).map_err(|e| bad(e.to_string()))?,
                )
            }
            "gs" | "az" | "abfs" | "abfss" | "azure" => {
                let (store, prefix) =
                    object_store::parse_url_opts(&url, opts).map_err(|e| bad(e.to_string()))?;
                (Arc::from(store), prefix)
            }
            other => {
                return Err(bad(format!(
                    "unsupported scheme {other:?}: use file://, s3://, gs:// or az://"
                )));
            }
        };
        Ok(Location { store, prefix, uri })
    }

    /// The path of `name` inside this folder; `/` in `name` separates sub-folders.
    pub fn child(&self, name: &str) -> Path {
        name.split('/')
            .filter(|part| !part.is_empty())
            .fold(self.prefix.clone(), |path, part| path.join(part))
    }

    /// `uri/name`, for messages and index entries.
    pub fn child_uri(&self, name: &str) -> String {
        format!("{}/{name}", self.uri)
    }

    /// Reads a whole object; Ok(None) when it does not exist.
    pub async fn get_opt(&self, name: &str) -> Result<Option<bytes::Bytes>> {
        match self.store.get(&self.child(name)).await {
            Ok(r) => Ok(Some(r.bytes().await.map_err(|e| self.err(name, e))?)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.err(name, e)),
        }
    }

    /// Writes a whole object atomically (readers see the old or the new object, never a part).
    pub async fn put(&self, name: &str, data: Vec<u8>) -> Result<()> {
        self.store
            .put(&self.child(name), PutPayload::from(data))
            .await
            .map_err(|e| self.err(name, e))?;
        Ok(())
    }

    /// Deletes an object; deleting one that does not exist is not an error.
    pub async fn delete(&self, name: &str) -> Result<()> {
        match self.store.delete(&self.child(name)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.err(name, e)),
        }
    }

    /// Writes a whole object only if none exists yet; Ok(false) if one does.
    pub async fn put_new(&self, name: &str, data: Vec<u8>) -> Result<bool> {
        let opts = PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        match self
            .store
            .put_opts(&self.child(name), PutPayload::from(data), opts)
            .await
        {
            Ok(_) => Ok(true),
            Err(object_store::Error::AlreadyExists { .. }) => Ok(false),
            Err(e) => Err(self.err(name, e)),
        }
    }

    fn err(&self, name: &str, source: object_store::Error) -> Error {
        Error::Store {
            uri: self.child_uri(name),
            source,
        }
    }
}
