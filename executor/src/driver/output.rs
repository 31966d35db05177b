//! The output commit protocol. Readers never see a half-written output and no attempt but
//! one per partition ever reaches it:
//!
//! 1. Before any work, the location is checked: `ErrorIfExists` refuses another job's files;
//!    an output this same job already committed (its `_SUCCESS` names the job's uid) is
//!    kept as it is, so a restarted driver never rewrites or refuses its own output. The
//!    driver then claims the output for its epoch (`_temporary/_epoch-<job uid>-<epoch>`):
//!    a driver of the job that was replaced can no longer commit into it.
//! 2. Every task attempt writes under its own staging directory,
//!    `_temporary/<driver run>/s<stage>-p<partition>-a<attempt>/`. Paths starting with `_`
//!    are not part of a dataset (DataFusion, Spark and Hive skip them).
//! 3. The core lets exactly one attempt per partition commit: the first that succeeded.
//!    Duplicates, retries that lost the race and zombies of a lost executor stay in staging.
//! 4. Job commit, once the output stage is complete: `_SUCCESS` goes first (readers wait
//!    for it); each committed attempt's file (this run's, or an earlier driver's the journal
//!    names) moves over `part-NNNNN.<ext>`; part files of a previous output not replaced go
//!    (`Overwrite`); the staging area is removed; `_SUCCESS` is written last, naming the job.
//!    A commit cut short by a lost driver is finished by its replacement: files already
//!    moved are found in place.
use std::sync::Arc;

use datafusion::datasource::listing::ListingTableUrl;
use datafusion::prelude::SessionContext;
use futures::TryStreamExt;
use kiln_api::{OutputSpec, WriteMode};
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use serde::{Deserialize, Serialize};

use super::journal::CommitRecord;
use crate::plan::{STAGING_DIR, StagedAttempt, part_file_name};
use crate::summary::OutputSummary;
use crate::{Error, Result};

/// The marker a committed output ends with.
pub const SUCCESS_FILE: &str = "_SUCCESS";
/// Under the staging area: the epochs of the drivers that prepared the output.
const EPOCH_MARKER: &str = "_epoch-";

/// What `_SUCCESS` says: whose output this is and what it holds.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct SuccessMarker {
    /// The job that committed it (a ComputeJob's uid, or a local run's id).
    job_uid: String,
    /// Rows written.
    rows: u64,
    /// Part files.
    files: Vec<String>,
}

/// The job's output location and how to commit into it.
pub(crate) struct OutputCommit {
    store: Arc<dyn ObjectStore>,
    prefix: Path,
    dir_uri: String,
    spec: OutputSpec,
    /// The job across driver runs: `_SUCCESS` names it.
    job_uid: String,
    /// This driver's epoch: a commit is refused once a later epoch prepared the output.
    epoch: u64,
}

/// What the location holds before the job writes.
pub(crate) enum Prepared {
    /// Write and commit.
    Ready(OutputCommit),
    /// This job committed its output already (a restarted driver): nothing to do.
    Committed(OutputSummary),
}

fn write_err(uri: &str) -> impl FnOnce(object_store::Error) -> Error + '_ {
    move |source| Error::WriteOutput {
        uri: uri.to_string(),
        source,
    }
}

fn dir_uri(uri: &str) -> String {
    if uri.ends_with('/') {
        uri.to_string()
    } else {
        format!("{uri}/")
    }
}

impl OutputCommit {
    /// Opens the output location and applies the write mode before any work runs.
    pub async fn prepare(
        ctx: &SessionContext,
        spec: &OutputSpec,
        job_uid: &str,
        epoch: u64,
    ) -> Result<Prepared> {
        let dir_uri = dir_uri(&spec.uri);
        let url = ListingTableUrl::parse(&dir_uri).map_err(|e| Error::InvalidUri {
            uri: dir_uri.clone(),
            reason: e.to_string(),
        })?;
        let store = ctx.runtime_env().object_store(url.object_store())?;
        let commit = OutputCommit {
            store,
            prefix: url.prefix().clone(),
            dir_uri,
            spec: spec.clone(),
            job_uid: job_uid.to_string(),
            epoch,
        };
        if let Some(marker) = commit.marker().await?
            && marker.job_uid == job_uid
        {
            tracing::info!(uri = %spec.uri, "the output was committed by this job already; kept as it is");
            return Ok(Prepared::Committed(OutputSummary {
                uri: spec.uri.clone(),
                rows: marker.rows,
                files: marker.files.len() as u64,
            }));
        }
        // Part files with this job's claim beside them are its own: a driver of the job lost
        // in the middle of its commit moved them.
        if spec.mode == WriteMode::ErrorIfExists
            && !commit.output_files().await?.is_empty()
            && commit.newest_epoch().await?.is_none()
        {
            return Err(Error::OutputExists {
                uri: spec.uri.clone(),
            });
        }
        // Claims the output for this epoch: a driver of an earlier one (taken over, but
        // still running somewhere) can no longer commit into it.
        commit
            .store
            .put(&commit.epoch_marker(epoch), PutPayload::default())
            .await
            .map_err(write_err(&spec.uri))?;
        Ok(Prepared::Ready(commit))
    }

    /// The output directory's URI, ending in `/`.
    pub fn dir_uri(&self) -> &str {
        &self.dir_uri
    }

    /// Commits the output: moves the one committed attempt of each partition into place and
    /// writes `_SUCCESS` last. `committed` comes from the core: this run's attempts and
    /// those an earlier driver of the job committed before it was lost.
    pub async fn commit(&self, committed: &[CommitRecord], rows: u64) -> Result<OutputSummary> {
        let uri = self.spec.uri.as_str();
        if let Some(newer) = self.newest_epoch().await?.filter(|e| *e > self.epoch) {
            return Err(Error::Fenced {
                uri: uri.to_string(),
                epoch: self.epoch,
                newer,
            });
        }
        let success = self.prefix.clone().join(SUCCESS_FILE);
        match self.store.delete(&success).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => return Err(write_err(uri)(e)),
        }
        // Each committed attempt's file moves over the name it commits (an old file of that
        // name goes with it). A file already moved by an earlier driver of the job, lost in
        // the middle of its own commit, is found in place: the attempt wrote a file, and its
        // staging holds it no more.
        let mut files = Vec::new();
        for c in committed {
            let name = part_file_name(c.partition as usize, self.spec.format);
            let from = StagedAttempt {
                run_id: c.run_id.clone(),
                stage: c.stage,
                attempt: c.attempt,
            }
            .dir(&self.prefix, c.partition)
            .join(name.as_str());
            let to = self.prefix.clone().join(name.as_str());
            match self.store.rename(&from, &to).await {
                Ok(()) => files.push(name),
                Err(object_store::Error::NotFound { .. }) => {
                    if c.files > 0 && self.store.head(&to).await.is_ok() {
                        files.push(name);
                    }
                }
                Err(e) => return Err(write_err(uri)(e)),
            }
        }
        // What else is there is an older output's (Overwrite: prepare refused it otherwise).
        for old in self.output_files().await? {
            let name = old.filename().unwrap_or_default();
            if name != SUCCESS_FILE && !files.iter().any(|f| f == name) {
                self.store.delete(&old).await.map_err(write_err(uri))?;
            }
        }
        self.remove_staging().await?;
        let marker = SuccessMarker {
            job_uid: self.job_uid.clone(),
            rows,
            files: files.clone(),
        };
        let body = serde_json::to_vec(&marker).map_err(|e| Error::Driver(e.to_string()))?;
        self.store
            .put(&success, PutPayload::from(body))
            .await
            .map_err(write_err(uri))?;
        Ok(OutputSummary {
            uri: self.spec.uri.clone(),
            rows,
            files: files.len() as u64,
        })
    }

    /// `_temporary/_epoch-<job uid>-<N>`: this job's driver of epoch N prepared the output.
    fn epoch_marker(&self, epoch: u64) -> Path {
        self.prefix
            .clone()
            .join(STAGING_DIR)
            .join(format!("{EPOCH_MARKER}{}-{epoch}", self.job_uid).as_str())
    }

    /// The newest epoch of this job's drivers that prepared the output, if any did (those
    /// of other jobs do not count: a failed job must not fence off the next).
    async fn newest_epoch(&self) -> Result<Option<u64>> {
        let ours = format!("{EPOCH_MARKER}{}-", self.job_uid);
        let staging = self.prefix.clone().join(STAGING_DIR);
        let listed = match self.store.list_with_delimiter(Some(&staging)).await {
            Ok(l) => l.objects,
            Err(object_store::Error::NotFound { .. }) => Vec::new(),
            Err(e) => return Err(write_err(&self.spec.uri)(e)),
        };
        Ok(listed
            .iter()
            .filter_map(|m| m.location.filename()?.strip_prefix(&ours)?.parse().ok())
            .max())
    }

    /// The `_SUCCESS` marker, if there is one that Kiln wrote.
    async fn marker(&self) -> Result<Option<SuccessMarker>> {
        let path = self.prefix.clone().join(SUCCESS_FILE);
        match self.store.get(&path).await {
            Ok(got) => {
                let bytes = got.bytes().await.map_err(write_err(&self.spec.uri))?;
                Ok(serde_json::from_slice(&bytes).ok())
            }
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(write_err(&self.spec.uri)(e)),
        }
    }

    /// The output's own files directly under the location: part files and `_SUCCESS`.
    async fn output_files(&self) -> Result<Vec<Path>> {
        let listed: Vec<object_store::ObjectMeta> =
            match self.store.list(Some(&self.prefix)).try_collect().await {
                Ok(v) => v,
                Err(object_store::Error::NotFound { .. }) => Vec::new(),
                Err(e) => return Err(write_err(&self.spec.uri)(e)),
            };
        Ok(listed
            .into_iter()
            .filter(|meta| {
                let direct = meta
                    .location
                    .prefix_match(&self.prefix)
                    .is_some_and(|mut rest| rest.next().is_some() && rest.next().is_none());
                let name = meta.location.filename().unwrap_or_default();
                direct && (name.starts_with("part-") || name == SUCCESS_FILE)
            })
            .map(|meta| meta.location)
            .collect())
    }

    /// Removes the staging area, every run's: attempts that did not commit go with it, and
    /// so do those of earlier drivers of the job (fenced off by now).
    async fn remove_staging(&self) -> Result<()> {
        let staging = self.prefix.clone().join(STAGING_DIR);
        let leftovers: Vec<object_store::ObjectMeta> =
            match self.store.list(Some(&staging)).try_collect().await {
                Ok(v) => v,
                Err(object_store::Error::NotFound { .. }) => Vec::new(),
                Err(e) => return Err(write_err(&self.spec.uri)(e)),
            };
        for meta in leftovers {
            match self.store.delete(&meta.location).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(write_err(&self.spec.uri)(e)),
            }
        }
        // A local filesystem keeps empty directories behind; object stores have none.
        if let Ok(url) = ListingTableUrl::parse(&self.dir_uri)
            && url.scheme() == "file"
            && let Ok(dir) = url::Url::parse(url.as_str())
                .map_err(drop)
                .and_then(|u| u.to_file_path())
        {
            let _ = std::fs::remove_dir_all(dir.join(STAGING_DIR));
        }
        Ok(())
    }
}

#[cfg(test)]
#[path = "output_tests.rs"]
mod tests;
