//! `hf://org/repo[@revision]`: the Hugging Face Hub (or a mirror) through the `hf-hub` crate,
//! which honours `HF_ENDPOINT`, `HF_TOKEN` (and the token stored under `HF_HOME`) and
//! `HF_HUB_CACHE`.
//!
//! - A revision (default `main`) is resolved to its commit first and every file is fetched at
//!   that commit, so one adapter never mixes files of two commits.
//! - A commit already in the standard HF cache (`huggingface-cli download` put it there) is
//!   used from there without any request; branches and tags always ask the Hub.
//! - Otherwise the files are streamed straight into the adapter cache's temp directory, so the
//!   size limit holds while downloading and `--lora-cache-bytes` bounds the disk they take. The
//!   HF cache is read, never written.
//! - The adapter cache keys on the URI as written: `hf://org/repo@main` is resolved when first
//!   fetched and served from the cache (its commit shown in `ListAdapters`) until the entry is
//!   evicted. Pin a commit or a tag to say exactly which weights to serve.

use super::{AdapterSource, AdapterUri, Fetched, plan_download, within};
use crate::adapters::{AdapterError, CONFIG_FILE, Room, WEIGHTS_FILE};
use futures::StreamExt;
use hf_hub::{HFClient, HFError};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::io::AsyncWriteExt;

/// How an [`HfSource`] talks to the Hub.
#[derive(Debug, Clone)]
pub struct HfSourceOptions {
    /// Retries after a failed request (connection errors, 5xx, 429).
    pub retries: usize,
    /// Upper bound on fetching one adapter.
    pub download_timeout: Duration,
}

impl Default for HfSourceOptions {
    fn default() -> HfSourceOptions {
        HfSourceOptions { retries: 2, download_timeout: Duration::from_secs(600) }
    }
}

/// Reads adapters from a Hugging Face Hub.
#[derive(Debug)]
pub struct HfSource {
    client: HFClient,
    options: HfSourceOptions,
}

/// A full commit sha (which names immutable content).
fn is_commit(revision: &str) -> bool {
    revision.len() == 40 && revision.chars().all(|c| c.is_ascii_hexdigit())
}

/// `org/repo[@revision]` split and checked; the revision defaults to `main`.
fn split_location(uri: &AdapterUri) -> Result<(&str, &str, &str), AdapterError> {
    let bad = |reason: &str| AdapterError::BadUri { uri: uri.uri.clone(), reason: reason.to_string() };
    let (repo, revision) = match uri.location.split_once('@') {
        Some((repo, rev)) => (repo, rev),
        None => (uri.location.as_str(), "main"),
    };
    let name_ok = |s: &str| {
        !s.is_empty()
            && s.len() <= 96
            && s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            && !s.starts_with('.')
    };
    let (org, name) = repo.split_once('/').ok_or_else(|| bad("expected hf://org/repo[@revision]"))?;
    if !name_ok(org) || !name_ok(name) {
        return Err(bad("org and repo names are letters, digits, '-', '_' or '.'"));
    }
    let rev_ok = !revision.is_empty()
        && revision.len() <= 256
        && revision.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'))
        && !revision.split('/').any(|p| p.is_empty() || p == "..");
    if !rev_ok {
        return Err(bad("the revision must be a branch, tag or commit (letters, digits, '-', '_', '.', '/')"));
    }
    Ok((org, name, revision))
}

impl HfSource {
    /// A source configured from the standard `HF_*` environment.
    pub fn from_env(options: HfSourceOptions) -> Result<HfSource, AdapterError> {
        let client = HFClient::builder()
            .retry_max_attempts(options.retries)
            .retry_base_delay(Duration::from_millis(200))
            .build()
            .map_err(|e| AdapterError::BadUri {
                uri: "hf://".into(),
                reason: format!("HF client setup failed: {e}"),
            })?;
        Ok(HfSource { client, options })
    }

    fn classify(&self, uri: &AdapterUri, what: &str, err: HFError) -> AdapterError {
        let uri = uri.uri.clone();
        let not_found = |reason: String| AdapterError::SourceNotFound { uri: uri.clone(), reason };
        match err {
            HFError::RepoNotFound { .. } => not_found(format!("{what}: repository not found")),
            HFError::RevisionNotFound { revision, .. } => not_found(format!("{what}: revision {revision:?} not found")),
            HFError::EntryNotFound { path, .. } => not_found(format!("{what}: {path} not found")),
            // The Hub answers 401 for repositories it will not show an anonymous caller, and
            // says which in the error code.
            HFError::AuthRequired { context } if context.error_code.as_deref() == Some("RepoNotFound") => {
                not_found(format!("{what}: repository or revision not found (or private: set HF_TOKEN)"))
            }
            HFError::AuthRequired { .. } => {
                AdapterError::AccessDenied { uri, reason: format!("{what}: authentication required (set HF_TOKEN)") }
            }
            HFError::Forbidden { .. } => AdapterError::AccessDenied {
                uri,
                reason: format!("{what}: forbidden (gated repository or token without access)"),
            },
            other => AdapterError::Unavailable { uri, reason: format!("{what}: {other}") },
        }
    }

    /// The adapter's files at `commit` from the local HF cache, when both are there.
    async fn cached_commit_files(&self, org: &str, name: &str, commit: &str) -> Option<Vec<(String, PathBuf)>> {
        let repo = self.client.model(org, name);
        let mut found = Vec::new();
        for file in [CONFIG_FILE, WEIGHTS_FILE] {
            let path = repo.download_file().filename(file).revision(commit).local_files_only(true).send().await.ok()?;
            found.push((file.to_string(), path));
        }
        Some(found)
    }

    async fn fetch_all(&self, uri: &AdapterUri, dest: &Path, room: &Room) -> Result<String, AdapterError> {
        let (org, name, revision) = split_location(uri)?;
        if is_commit(revision)
            && let Some(files) = self.cached_commit_files(org, name, revision).await
        {
            let mut used = 0u64;
            for (file, path) in files {
                let target = dest.join(&file);
                let io = |source| AdapterError::Io { path: target.clone(), source };
                let blob = tokio::fs::canonicalize(&path).await.map_err(io)?;
                used += tokio::fs::metadata(&blob).await.map_err(io)?.len();
                room.reserve(used)?;
                // A hard link shares the HF cache's blob; across file systems, copy.
                if tokio::fs::hard_link(&blob, &target).await.is_err() {
                    tokio::fs::copy(&blob, &target).await.map_err(io)?;
                }
            }
            tracing::info!(%uri, "adapter found in the HF cache");
            return Ok(revision.to_string());
        }
        let repo = self.client.model(org, name);
        let info = match repo.info().revision(revision).send().await {
            Ok(info) => info,
            Err(e) => {
                let err = self.classify(uri, &format!("revision {revision}"), e);
                if !matches!(err, AdapterError::SourceNotFound { .. }) {
                    return Err(err);
                }
                // Say which is missing: the repository, or the revision in it.
                return Err(match repo.list_refs().send().await {
                    Ok(refs) => {
                        let known: Vec<&str> =
                            refs.branches.iter().chain(&refs.tags).map(|r| r.name.as_str()).take(8).collect();
                        AdapterError::SourceNotFound {
                            uri: uri.uri.clone(),
                            reason: format!(
                                "revision {revision:?} not found (branches and tags: {})",
                                known.join(", ")
                            ),
                        }
                    }
                    Err(e) => match self.classify(uri, "listing revisions", e) {
                        AdapterError::SourceNotFound { .. } => AdapterError::SourceNotFound {
                            uri: uri.uri.clone(),
                            reason: format!("repository {org}/{name} not found (or private: set HF_TOKEN)"),
                        },
                        _ => err,
                    },
                });
            }
        };
        let commit = info.sha.ok_or_else(|| AdapterError::Unavailable {
            uri: uri.uri.clone(),
            reason: format!("the Hub did not say which commit {revision} is"),
        })?;
        let listing: BTreeMap<String, Option<u64>> =
            info.siblings.unwrap_or_default().into_iter().map(|s| (s.rfilename, s.size)).collect();
        let files = plan_download(uri, &listing, room)?;
        let mut used = 0u64;
        for file in files {
            let what = format!("downloading {file}");
            let (length, mut body) = repo
                .download_file_stream()
                .filename(file.clone())
                .revision(commit.clone())
                .send()
                .await
                .map_err(|e| self.classify(uri, &what, e))?;
            // Reserve what is announced before reading it, and what arrives as it arrives.
            if let Some(length) = length {
                room.reserve(used + length)?;
            }
            let target = dest.join(&file);
            let io = |source| AdapterError::Io { path: target.clone(), source };
            let mut out = tokio::fs::File::create(&target).await.map_err(io)?;
            while let Some(chunk) = body.next().await {
                let chunk = chunk.map_err(|e| self.classify(uri, &what, e))?;
                used += chunk.len() as u64;
                room.reserve(used)?;
                out.write_all(&chunk).await.map_err(io)?;
            }
            out.sync_all().await.map_err(io)?;
        }
        Ok(commit)
    }
}

#[async_trait::async_trait]
impl AdapterSource for HfSource {
    fn check(&self, uri: &AdapterUri) -> Result<(), AdapterError> {
        split_location(uri).map(|_| ())
    }

    async fn fetch(&self, uri: &AdapterUri, dest: &Path, room: &Room) -> Result<Fetched, AdapterError> {
        let commit = within(uri, self.options.download_timeout, self.fetch_all(uri, dest, room)).await?;
        Ok(Fetched { dir: dest.to_path_buf(), revision: Some(commit), files: None })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_and_revision_are_checked_before_any_request() {
        let split =
            |s: &str| split_location(&AdapterUri::parse(s).expect("uri")).map(|(o, n, r)| format!("{o}|{n}|{r}"));
        assert_eq!(split("hf://org/lora").expect("valid"), "org|lora|main");
        assert_eq!(split("hf://org/lora@v1.2").expect("valid"), "org|lora|v1.2");
        assert_eq!(split("hf://org/lora@refs/pr/1").expect("valid"), "org|lora|refs/pr/1");
        for bad in ["hf://lora", "hf://org/lo ra", "hf://org/lora@", "hf://org/lora@a/../b", "hf://a/b/c"] {
            assert!(matches!(split(bad), Err(AdapterError::BadUri { .. })), "{bad}");
        }
    }
}
