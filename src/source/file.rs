//! `--config FILE`: read at start, re-read when its contents change.
//!
//! Polling the contents (not inotify on the path) also sees the symlink swap
//! kubelet does when a mounted ConfigMap changes: the path stays the same,
//! `..data` is re-pointed, and no write event happens on the file itself.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::ConfigStore;
use crate::config::Config;

pub const POLL_INTERVAL: Duration = Duration::from_secs(1);

/// Loads the file once, synchronously, so `serve` starts with it.
pub fn load_once(path: &Path, store: &ConfigStore) -> Option<Vec<u8>> {
    match std::fs::read(path) {
        Ok(bytes) => {
            apply(path, &bytes, store);
            Some(bytes)
        }
        Err(e) => {
            store.reject(format!("{}: cannot read: {e}", path.display()));
            None
        }
    }
}

fn apply(path: &Path, bytes: &[u8], store: &ConfigStore) {
    let parsed = std::str::from_utf8(bytes)
        .map_err(|e| format!("not UTF-8: {e}"))
        .and_then(|text| Config::from_document(text).map_err(|e| e.to_string()));
    match parsed {
        Ok(config) => store.set(config),
        Err(e) => store.reject(format!("{}: {e}", path.display())),
    }
}

/// Re-reads the file every [`POLL_INTERVAL`] until shutdown.
pub async fn watch(
    path: PathBuf,
    store: Arc<ConfigStore>,
    mut last: Option<Vec<u8>>,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(POLL_INTERVAL) => {}
        }
        let read = tokio::fs::read(&path).await;
        match read {
            Ok(bytes) if last.as_deref() != Some(&bytes[..]) => {
                apply(&path, &bytes, &store);
                last = Some(bytes);
            }
            Ok(_) => {}
            Err(e) => {
                // Report a vanished file once, not every second.
                if last.take().is_some() {
                    store.reject(format!("{}: cannot read: {e}", path.display()));
                }
            }
        }
    }
}
