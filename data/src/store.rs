//! Object-store locations from URIs (`file://`, `s3://`, `gs://`, `az://`), configured from the
//! environment the way the trainer pods receive credentials (AWS_*, GOOGLE_*, AZURE_*).

use std::collections::HashSet;
use std::sync::{Arc, Mutex, OnceLock};

use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};

use crate::{Error, Result};

/// Variable that lets radfm use a store without create-only writes (`true`), when one writer
/// alone ever uses the location.
pub const SINGLE_WRITER: &str = "RADFM_SINGLE_WRITER";

/// Variable that gives stores under some URIs their own settings, for a process that reads
/// stores of different owners (a hospital's data and the hub's registry): comma-separated
/// `URI-PREFIX=VARIABLE-PREFIX` pairs; a location under `URI-PREFIX` takes its settings from the
/// variables named `VARIABLE-PREFIX` + `AWS_...` (or `GOOGLE_...`, `AZURE_...`), prefix removed.
pub const STORE_SETTINGS: &str = "RADFM_STORE_SETTINGS";

/// The [`STORE_SETTINGS`] value that gives the stores under `uri_prefixes` the variables
/// prefixed `var_prefix`.
pub fn settings_entry(uri_prefixes: &[&str], var_prefix: &str) -> String {
    uri_prefixes
        .iter()
        .map(|p| format!("{p}={var_prefix}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// The store settings for `uri`: per [`STORE_SETTINGS`], else `vars` as they are.
pub fn settings_for(
    uri: &str,
    vars: impl IntoIterator<Item = (String, String)>,
) -> Vec<(String, String)> {
    let vars: Vec<(String, String)> = vars.into_iter().collect();
    let Some((_, table)) = vars.iter().find(|(k, _)| k == STORE_SETTINGS) else {
        return vars;
    };
    let uri = uri.trim_end_matches('/');
    let chosen = table
        .split(',')
        .filter_map(|pair| pair.split_once('='))
        .find(|(prefix, _)| {
            let prefix = prefix.trim().trim_end_matches('/');
            !prefix.is_empty()
                && (uri == prefix
                    || uri
                        .strip_prefix(prefix)
                        .is_some_and(|rest| rest.starts_with('/')))
        });
    match chosen {
        Some((_, var_prefix)) => vars
            .iter()
            .filter_map(|(k, v)| Some((k.strip_prefix(var_prefix.trim())?.to_string(), v.clone())))
            .collect(),
        None => vars,
    }
}

/// A local object's bytes in `range`, read 1 MiB at a time off the async workers (the local
/// store's own stream reads 8 KiB per blocking task, which cost a loader a fifth of its CPU).
fn file_chunks(
    mut file: std::fs::File,
    range: std::ops::Range<u64>,
    uri: String,
) -> Result<impl futures::Stream<Item = Result<bytes::Bytes>>> {
    use std::io::{Read, Seek, SeekFrom};
    const CHUNK: u64 = 1 << 20;
    // Moving the offset reads nothing; each chunk then reads on from where the last ended.
    file.seek(SeekFrom::Start(range.start))
        .map_err(|source| Error::Io {
            path: uri.clone(),
            source,
        })?;
    let start = (file, range.end - range.start, uri);
    Ok(futures::stream::try_unfold(
        start,
        |(mut file, left, uri)| async move {
            if left == 0 {
                return Ok(None);
            }
            tokio::task::spawn_blocking(move || {
                let io = |source| Error::Io {
                    path: uri.clone(),
                    source,
                };
                let mut buf = Vec::with_capacity(left.min(CHUNK) as usize);
                (&mut file)
                    .take(left.min(CHUNK))
                    .read_to_end(&mut buf)
                    .map_err(io)?;
                if buf.is_empty() {
                    return Err(io(std::io::ErrorKind::UnexpectedEof.into()));
                }
                let n = buf.len() as u64;
                Ok(Some((bytes::Bytes::from(buf), (file, left - n, uri))))
            })
            .await
            .map_err(|e| Error::Io {
                path: "(reading a local object)".into(),
                source: std::io::Error::other(e),
            })?
        },
    ))
}

/// Locations whose store this process already found to honour create-only writes.
fn checked() -> &'static Mutex<HashSet<String>> {
    static CHECKED: OnceLock<Mutex<HashSet<String>>> = OnceLock::new();
    CHECKED.get_or_init(Mutex::default)
}

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
    /// `AZURE_*`), as trainer pods receive them, or for URIs [`STORE_SETTINGS`] names, from
    /// the variables it says.
    pub fn open(uri: &str) -> Result<Location> {
        Self::open_with(uri, settings_for(uri, std::env::vars()))
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

    /// Reads a whole object of at most `limit` bytes; Ok(None) when it does not exist, and
    /// [`Error::TooLarge`] (before reading the body) when it is larger.
    pub async fn get_bounded(&self, name: &str, limit: usize) -> Result<Option<bytes::Bytes>> {
        let Some(r) = self.get_within(name, limit as u64).await? else {
            return Ok(None);
        };
        let body = r.bytes().await.map_err(|e| self.err(name, e))?;
        if body.len() > limit {
            return Err(Error::TooLarge {
                uri: self.child_uri(name),
                bytes: body.len() as u64,
                limit: limit as u64,
            });
        }
        Ok(Some(body))
    }

    /// Starts reading an object the store says has at most `limit` bytes; Ok(None) when it
    /// does not exist, [`Error::TooLarge`] when it is larger. The body is the caller's to read
    /// (and to bound again: a store may send more than it announced).
    async fn get_within(&self, name: &str, limit: u64) -> Result<Option<object_store::GetResult>> {
        let r = match self.store.get(&self.child(name)).await {
            Ok(r) => r,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(self.err(name, e)),
        };
        if r.meta.size > limit {
            return Err(Error::TooLarge {
                uri: self.child_uri(name),
                bytes: r.meta.size,
                limit,
            });
        }
        Ok(Some(r))
    }

    /// Streams an object of at most `limit` bytes chunk by chunk, as the store sends it, so a
    /// reader holds one chunk at a time; Ok(None) when it does not exist, and
    /// [`Error::TooLarge`] (before the body) when it is larger. A body that runs past the size
    /// announced ends the stream with [`Error::TooLarge`] too.
    pub async fn get_stream(
        &self,
        name: &str,
        limit: u64,
    ) -> Result<Option<futures::stream::BoxStream<'static, Result<bytes::Bytes>>>> {
        use futures::StreamExt;
        let Some(r) = self.get_within(name, limit).await? else {
            return Ok(None);
        };
        let uri = self.child_uri(name);
        let mut seen = 0u64;
        let this = self.clone();
        let name = name.to_string();
        let chunks = match r.payload {
            object_store::GetResultPayload::File(file, _) => {
                file_chunks(file, r.range, uri.clone())?.boxed()
            }
            object_store::GetResultPayload::Stream(s) => s
                .map(move |chunk| chunk.map_err(|e| this.err(&name, e)))
                .boxed(),
        };
        let chunks = chunks.map(move |chunk| {
            let chunk = chunk?;
            seen += chunk.len() as u64;
            if seen > limit {
                return Err(Error::TooLarge {
                    uri: uri.clone(),
                    bytes: seen,
                    limit,
                });
            }
            Ok(chunk)
        });
        Ok(Some(chunks.boxed()))
    }

    /// Writes a whole object atomically (readers see the old or the new object, never a part).
    pub async fn put(&self, name: &str, data: Vec<u8>) -> Result<()> {
        self.store
            .put(&self.child(name), PutPayload::from(data))
            .await
            .map_err(|e| self.err(name, e))?;
        Ok(())
    }

    /// An object's size and last modification; Ok(None) when it does not exist.
    pub async fn head_opt(&self, name: &str) -> Result<Option<object_store::ObjectMeta>> {
        match self.store.head(&self.child(name)).await {
            Ok(m) => Ok(Some(m)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.err(name, e)),
        }
    }

    /// Deletes an object; deleting one that does not exist is not an error.
    pub async fn delete(&self, name: &str) -> Result<()> {
        match self.store.delete(&self.child(name)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.err(name, e)),
        }
    }

    /// Writes a whole object only if none exists yet; Ok(false) if one does.
    pub async fn put_new(&self, name: &str, data: impl Into<bytes::Bytes>) -> Result<bool> {
        let opts = PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        match self
            .store
            .put_opts(&self.child(name), PutPayload::from(data.into()), opts)
            .await
        {
            Ok(_) => Ok(true),
            Err(object_store::Error::AlreadyExists { .. }) => Ok(false),
            Err(e) => Err(self.err(name, e)),
        }
    }

    /// Fails with [`Error::Unconditional`] unless the store refuses a second create-only write of
    /// one object, or [`SINGLE_WRITER`] is `true`. Everything that numbers objects by claiming
    /// the next free name (registry events and versions, index shards, checkpoint epochs) calls
    /// this first: on a store that ignores `If-None-Match`, two writers would both "win".
    /// Checked once per location and process.
    pub async fn require_conditional_writes(&self) -> Result<()> {
        let single = std::env::var(SINGLE_WRITER).is_ok_and(|v| v.trim() == "true");
        if single || checked().lock().expect("not poisoned").contains(&self.uri) {
            return Ok(());
        }
        self.check_conditional_writes().await?;
        checked()
            .lock()
            .expect("not poisoned")
            .insert(self.uri.clone());
        Ok(())
    }

    /// Writes a probe object twice, create-only, and deletes it: the second write must be
    /// refused.
    pub async fn check_conditional_writes(&self) -> Result<()> {
        let name = format!(
            ".radfm-probe-{}-{:016x}",
            std::process::id(),
            rand::random::<u64>()
        );
        let first = self.put_new(&name, b"first".to_vec()).await;
        let second = match first {
            Ok(true) => Some(self.put_new(&name, b"second".to_vec()).await),
            _ => None,
        };
        self.delete(&name).await?;
        let created = first?;
        let refused = match second {
            Some(r) => !r?,
            None => false,
        };
        if created && refused {
            Ok(())
        } else {
            Err(Error::Unconditional {
                uri: self.uri.clone(),
            })
        }
    }

    fn err(&self, name: &str, source: object_store::Error) -> Error {
        Error::Store {
            uri: self.child_uri(name),
            source,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::stream::BoxStream;
    use object_store::memory::InMemory;
    use object_store::{
        CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta,
        PutMultipartOptions, PutResult,
    };

    #[test]
    fn stores_named_in_radfm_store_settings_take_their_own_variables() {
        let vars = || {
            [
                ("AWS_ACCESS_KEY_ID", "site"),
                ("RADFM_REGISTRY_AWS_ACCESS_KEY_ID", "hub"),
                (
                    STORE_SETTINGS,
                    "s3://hub/registry=RADFM_REGISTRY_, s3://hub/models=RADFM_REGISTRY_",
                ),
            ]
            .map(|(k, v)| (k.to_string(), v.to_string()))
        };
        let key = |uri: &str| {
            settings_for(uri, vars())
                .into_iter()
                .find(|(k, _)| k == "AWS_ACCESS_KEY_ID")
                .map(|(_, v)| v)
        };
        assert_eq!(key("s3://hub/registry").as_deref(), Some("hub"));
        assert_eq!(key("s3://hub/models/v2/").as_deref(), Some("hub"));
        assert_eq!(key("s3://hub/registry-other").as_deref(), Some("site"));
        assert_eq!(key("s3://site/cxr").as_deref(), Some("site"));
        let plain = [("AWS_ACCESS_KEY_ID".to_string(), "x".to_string())];
        assert_eq!(settings_for("s3://hub/registry", plain.clone()), plain);
    }

    /// A store that takes every write as an overwrite, as s3s-fs 0.14 does with
    /// `If-None-Match: *`.
    #[derive(Debug, Default)]
    struct IgnoresConditions(InMemory);

    impl std::fmt::Display for IgnoresConditions {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "IgnoresConditions")
        }
    }

    #[async_trait::async_trait]
    impl ObjectStore for IgnoresConditions {
        async fn put_opts(
            &self,
            location: &Path,
            payload: PutPayload,
            _: PutOptions,
        ) -> object_store::Result<PutResult> {
            self.0
                .put_opts(location, payload, PutOptions::default())
                .await
        }

        async fn put_multipart_opts(
            &self,
            location: &Path,
            opts: PutMultipartOptions,
        ) -> object_store::Result<Box<dyn MultipartUpload>> {
            self.0.put_multipart_opts(location, opts).await
        }

        async fn get_opts(
            &self,
            location: &Path,
            options: GetOptions,
        ) -> object_store::Result<GetResult> {
            self.0.get_opts(location, options).await
        }

        fn delete_stream(
            &self,
            locations: BoxStream<'static, object_store::Result<Path>>,
        ) -> BoxStream<'static, object_store::Result<Path>> {
            self.0.delete_stream(locations)
        }

        fn list(
            &self,
            prefix: Option<&Path>,
        ) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
            self.0.list(prefix)
        }

        async fn list_with_delimiter(
            &self,
            prefix: Option<&Path>,
        ) -> object_store::Result<ListResult> {
            self.0.list_with_delimiter(prefix).await
        }

        async fn copy_opts(
            &self,
            from: &Path,
            to: &Path,
            options: CopyOptions,
        ) -> object_store::Result<()> {
            self.0.copy_opts(from, to, options).await
        }
    }

    fn at(store: Arc<dyn ObjectStore>, uri: &str) -> Location {
        Location {
            store,
            prefix: Path::from("folder"),
            uri: uri.into(),
        }
    }

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    #[test]
    fn a_store_that_ignores_create_only_writes_is_refused_naming_the_override() {
        rt().block_on(async {
            let sloppy = at(Arc::new(IgnoresConditions::default()), "s3://sloppy/folder");
            let e = sloppy.check_conditional_writes().await.unwrap_err();
            assert!(matches!(e, Error::Unconditional { .. }), "{e}");
            let text = e.to_string();
            assert!(
                text.contains("s3://sloppy/folder") && text.contains("RADFM_SINGLE_WRITER"),
                "{text}"
            );
            let mut left = sloppy.store.list(None);
            assert!(
                futures::StreamExt::next(&mut left).await.is_none(),
                "the probe is deleted"
            );
            let honest = at(Arc::new(InMemory::new()), "mem://honest/folder");
            honest.require_conditional_writes().await.unwrap();
            let dir = tempfile::tempdir().unwrap();
            let local = Location::open(dir.path().to_str().unwrap()).unwrap();
            local.check_conditional_writes().await.unwrap();
        });
    }

    #[test]
    fn large_objects_are_refused_before_their_body_is_read() {
        rt().block_on(async {
            let loc = at(Arc::new(InMemory::new()), "mem://m/folder");
            loc.put("big.json", vec![b'x'; 2048]).await.unwrap();
            assert_eq!(
                loc.get_bounded("big.json", 4096)
                    .await
                    .unwrap()
                    .unwrap()
                    .len(),
                2048
            );
            let e = loc.get_bounded("big.json", 1024).await.unwrap_err();
            assert!(
                matches!(
                    e,
                    Error::TooLarge {
                        bytes: 2048,
                        limit: 1024,
                        ..
                    }
                ),
                "{e}"
            );
            assert!(loc.get_bounded("absent.json", 1).await.unwrap().is_none());
        });
    }
}
