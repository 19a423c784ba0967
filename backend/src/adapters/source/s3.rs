//! `s3://bucket/prefix`: the AWS SDK with its standard credential chain and endpoint settings
//! (`AWS_ENDPOINT_URL_S3` > `AWS_ENDPOINT_URL` > the profile's `endpoint_url`; `AWS_REGION`,
//! default `us-east-1`), path-style addressing for S3-compatible stores, request retries with
//! backoff, and objects streamed to disk under an overall download timeout.

use super::{AdapterSource, AdapterUri, Fetched, plan_download, within};
use crate::adapters::{AdapterError, Room};
use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;
use tokio::io::AsyncWriteExt;

/// How an [`S3Source`] talks to the store.
#[derive(Debug, Clone)]
pub struct S3SourceOptions {
    /// Attempts per request (the first included), with exponential backoff between them.
    pub max_attempts: u32,
    /// First backoff; later ones double (with jitter).
    pub initial_backoff: Duration,
    /// Upper bound on fetching one adapter, listing and bodies included.
    pub download_timeout: Duration,
    /// Virtual-hosted–style addressing (`bucket.host`) instead of path style.
    pub virtual_hosted: bool,
}

impl Default for S3SourceOptions {
    fn default() -> S3SourceOptions {
        S3SourceOptions {
            max_attempts: 3,
            initial_backoff: Duration::from_millis(200),
            download_timeout: Duration::from_secs(600),
            virtual_hosted: false,
        }
    }
}

/// Reads adapters from S3 or an S3-compatible store. The client is configured on first use,
/// so a backend that never loads from S3 never probes for AWS settings.
#[derive(Debug)]
pub struct S3Source {
    options: S3SourceOptions,
    client: tokio::sync::OnceCell<aws_sdk_s3::Client>,
}

/// `bucket/prefix` split and checked.
fn split_location(uri: &AdapterUri) -> Result<(&str, &str), AdapterError> {
    let bad = |reason: String| AdapterError::BadUri { uri: uri.uri.clone(), reason };
    let (bucket, prefix) = uri.location.split_once('/').unwrap_or((&uri.location, ""));
    let valid = (3..=63).contains(&bucket.len())
        && bucket.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
        && bucket.starts_with(|c: char| c.is_ascii_alphanumeric())
        && bucket.ends_with(|c: char| c.is_ascii_alphanumeric());
    if !valid {
        return Err(bad(format!(
            "{bucket:?} is not a valid bucket name (3-63 lower-case letters, digits, '-' or '.')"
        )));
    }
    if prefix.split('/').any(|part| part == ".." || part == ".") || prefix.contains("//") {
        return Err(bad("the prefix must not contain '.', '..' or empty segments".into()));
    }
    Ok((bucket, prefix))
}

/// How one download attempt failed: worth another attempt (the body broke off) or not.
enum Attempt {
    Retry(AdapterError),
    Fail(AdapterError),
}

/// One failed S3 call, in adapter terms.
fn classify<E: ProvideErrorMetadata + std::error::Error + 'static>(
    uri: &AdapterUri,
    what: &str,
    err: SdkError<E, aws_sdk_s3::config::http::HttpResponse>,
) -> AdapterError {
    let detail = causes(&err);
    let code = err.code().map(str::to_string);
    let uri = uri.uri.clone();
    match (&err, code.as_deref()) {
        (_, Some("NoSuchBucket")) => {
            AdapterError::SourceNotFound { uri, reason: format!("{what}: the bucket does not exist") }
        }
        (_, Some("NoSuchKey")) => AdapterError::SourceNotFound { uri, reason: format!("{what}: no such object") },
        (
            _,
            Some(
                c @ ("AccessDenied"
                | "InvalidAccessKeyId"
                | "SignatureDoesNotMatch"
                | "AllAccessDisabled"
                | "ExpiredToken"
                | "InvalidToken"
                | "TokenRefreshRequired"),
            ),
        ) => AdapterError::AccessDenied {
            uri,
            reason: format!("{what}: {c} (check the AWS credentials and permissions)"),
        },
        (SdkError::ServiceError(e), _) if e.raw().status().as_u16() == 403 => {
            AdapterError::AccessDenied { uri, reason: format!("{what}: HTTP 403") }
        }
        (SdkError::ServiceError(e), _) if e.raw().status().as_u16() == 404 => {
            AdapterError::SourceNotFound { uri, reason: format!("{what}: HTTP 404") }
        }
        // The SDK found no credentials at all: a configuration problem, not an outage to retry.
        (SdkError::DispatchFailure(_), _) if detail.contains("loading credentials") => AdapterError::AccessDenied {
            uri,
            reason: format!(
                "{what}: no AWS credentials found ({detail}); set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, \
                 or AWS_PROFILE, where the backend runs"
            ),
        },
        _ => AdapterError::Unavailable { uri, reason: format!("{what}: {detail}") },
    }
}

/// The error and its causes, each as its own `Display` says it, once: the SDK's
/// `DisplayErrorContext` also appends the whole `Debug` tree, too much for a message.
fn causes(err: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut next = Some(err);
    while let Some(e) = next {
        let text = e.to_string();
        if !text.is_empty() && !parts.last().is_some_and(|p| p.contains(&text)) {
            parts.push(text);
        }
        next = e.source();
    }
    parts.join(": ")
}

impl S3Source {
    pub fn new(options: S3SourceOptions) -> S3Source {
        S3Source { options, client: tokio::sync::OnceCell::new() }
    }

    async fn client(&self) -> &aws_sdk_s3::Client {
        self.client
            .get_or_init(|| async {
                let region = aws_config::meta::region::RegionProviderChain::default_provider().or_else("us-east-1");
                let sdk = aws_config::defaults(aws_config::BehaviorVersion::latest()).region(region).load().await;
                let o = &self.options;
                let conf = aws_sdk_s3::config::Builder::from(&sdk)
                    .force_path_style(!o.virtual_hosted)
                    .retry_config(
                        RetryConfig::standard()
                            .with_max_attempts(o.max_attempts)
                            .with_initial_backoff(o.initial_backoff),
                    )
                    .timeout_config(
                        TimeoutConfig::builder()
                            .connect_timeout(Duration::from_secs(5))
                            .read_timeout(Duration::from_secs(30))
                            .build(),
                    )
                    .build();
                aws_sdk_s3::Client::from_conf(conf)
            })
            .await
    }

    /// The files directly under the prefix, with their sizes.
    async fn list(
        &self,
        uri: &AdapterUri,
        bucket: &str,
        dir: &str,
    ) -> Result<BTreeMap<String, Option<u64>>, AdapterError> {
        let client = self.client().await;
        let mut pages = client.list_objects_v2().bucket(bucket).prefix(dir).delimiter("/").into_paginator().send();
        let mut files = BTreeMap::new();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| classify(uri, "listing the prefix", e))?;
            for object in page.contents() {
                if let Some(name) = object.key().and_then(|k| k.strip_prefix(dir)).filter(|n| !n.is_empty()) {
                    files.insert(name.to_string(), object.size().map(|s| s.max(0) as u64));
                }
            }
        }
        Ok(files)
    }

    /// Streams one object to `path`, after `before` bytes of other files, reserving the
    /// running total in `room` as it writes. Returns the bytes written.
    async fn download(
        &self,
        uri: &AdapterUri,
        bucket: &str,
        key: &str,
        path: &Path,
        before: u64,
        room: &Room,
    ) -> Result<u64, Attempt> {
        let client = self.client().await;
        let what = format!("reading {key}");
        let out = client
            .get_object()
            .bucket(bucket)
            .key(key)
            .send()
            .await
            .map_err(|e| Attempt::Fail(classify(uri, &what, e)))?;
        let mut body = out.body;
        let io = |e: std::io::Error| Attempt::Fail(AdapterError::Io { path: path.to_path_buf(), source: e });
        let mut file = tokio::fs::File::create(path).await.map_err(io)?;
        let mut written = 0u64;
        while let Some(chunk) = body.try_next().await.map_err(|e| {
            Attempt::Retry(AdapterError::Unavailable {
                uri: uri.uri.clone(),
                reason: format!("{what}: the download broke off after {written} bytes: {}", causes(&e)),
            })
        })? {
            written += chunk.len() as u64;
            room.reserve(before + written).map_err(Attempt::Fail)?;
            file.write_all(&chunk).await.map_err(io)?;
        }
        file.sync_all().await.map_err(io)?;
        Ok(written)
    }

    async fn fetch_all(&self, uri: &AdapterUri, dest: &Path, room: &Room) -> Result<(), AdapterError> {
        let (bucket, prefix) = split_location(uri)?;
        let dir = if prefix.is_empty() { String::new() } else { format!("{prefix}/") };
        let listing = self.list(uri, bucket, &dir).await?;
        let files = plan_download(uri, &listing, room)?;
        let mut used = 0;
        for name in files {
            let key = format!("{dir}{name}");
            used += self.download_with_retries(uri, bucket, &key, &dest.join(&name), used, room).await?;
        }
        Ok(())
    }

    /// The SDK retries requests but not a body that breaks mid-stream: retry those here, with
    /// the same attempts and backoff.
    async fn download_with_retries(
        &self,
        uri: &AdapterUri,
        bucket: &str,
        key: &str,
        path: &Path,
        before: u64,
        room: &Room,
    ) -> Result<u64, AdapterError> {
        let mut backoff = self.options.initial_backoff;
        let mut attempt = 1;
        loop {
            match self.download(uri, bucket, key, path, before, room).await {
                Ok(bytes) => return Ok(bytes),
                Err(Attempt::Retry(e)) if attempt < self.options.max_attempts => {
                    tracing::warn!(%uri, key, attempt, error = %e, "S3 download broke off; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff *= 2;
                    attempt += 1;
                }
                Err(Attempt::Retry(e) | Attempt::Fail(e)) => return Err(e),
            }
        }
    }
}

#[async_trait::async_trait]
impl AdapterSource for S3Source {
    fn check(&self, uri: &AdapterUri) -> Result<(), AdapterError> {
        split_location(uri).map(|_| ())
    }

    async fn fetch(&self, uri: &AdapterUri, dest: &Path, room: &Room) -> Result<Fetched, AdapterError> {
        within(uri, self.options.download_timeout, self.fetch_all(uri, dest, room)).await?;
        Ok(Fetched { dir: dest.to_path_buf(), revision: None, files: None })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_and_prefix_are_checked_before_any_request() {
        let ok =
            |s: &str| split_location(&AdapterUri::parse(s).expect("uri")).map(|(b, p)| (b.to_string(), p.to_string()));
        assert_eq!(ok("s3://my-loras/team/support-v1").expect("valid"), ("my-loras".into(), "team/support-v1".into()));
        assert_eq!(ok("s3://my-loras").expect("valid"), ("my-loras".into(), String::new()));
        for bad in ["s3://UPPER/x", "s3://ab/x", "s3://b_b/x", "s3://bucket/a/../b", "s3://bucket/a//b"] {
            assert!(matches!(ok(bad), Err(AdapterError::BadUri { .. })), "{bad}");
        }
    }
}
