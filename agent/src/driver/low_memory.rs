//! The low-memory swap, for a device too small for two versions of a model
//! ([`crate::memory::plan`]): the serving version is unloaded before the new one is loaded and
//! checked in its place, the model answering 503 meanwhile; if the new one fails, the old one
//! is loaded again from its slot. The same steps bring a last good version back when a trial
//! that went in this way is rolled back.

use std::sync::Arc;
use std::time::{Duration, Instant};

use modelcast_proto::manifest::Manifest;
use modelcast_proto::report::{ErrorKind, Slot};
use tracing::{info, warn};

use super::Agent;
use crate::engine::LoadedModel;
use crate::slots::ModelRecord;
use crate::update::Failure;

/// A version to load in a low-memory swap.
pub(super) struct OnDisk {
    pub(super) manifest: Manifest,
    pub(super) slot: Slot,
}

/// Longest wait for the requests still running on a model the low-memory swap unloads.
const UNLOAD_WAIT: Duration = Duration::from_secs(30);

impl Agent {
    /// [`Agent::activate`] for a version staged on disk only: swapped in the serving one's
    /// place, persisted once it is loaded and checked; the old one back if anything fails.
    pub(super) async fn activate_low_memory(
        &mut self,
        name: String,
        record: ModelRecord,
        on_trial: bool,
        on_disk: OnDisk,
    ) {
        let started = Instant::now();
        let model = match self.swap_low_memory(&name, &on_disk).await {
            Ok(model) => model,
            Err(failure) => {
                self.restore_low_memory(&name, started).await;
                self.updater.activation_rejected(&name, failure);
                return;
            }
        };
        if let Err(e) = self.persist_installed(&name, &record).await {
            // Both do not fit: the new one goes before the old one comes back.
            drop(model);
            crate::sys::release_free_memory();
            self.restore_low_memory(&name, started).await;
            self.updater.activation_failed(&name, e.to_string());
            return;
        }
        if let Err(e) = self.store.keep_manifest(model.manifest()) {
            warn!(model = %name, error = %e, "keeping the manifest beside its artifact failed");
        }
        let (slot, version) = (model.slot(), model.manifest().version);
        let unavailable = self.swapped_in(&name, model, started);
        info!(model = %name, version, %slot, unavailable_ms = unavailable.as_millis() as u64, on_trial, "swapped in low memory: new version serves");
        self.updater.activated(&name, Instant::now());
    }

    /// A trial that went in by a low-memory swap, rolled back: the last good version `back`
    /// is loaded in the failed one's place (unless it already serves). If it does not load,
    /// nothing serves the model (the version rolled back never comes back) and it is reported.
    pub(super) async fn roll_back_low_memory(&mut self, name: &str, back: OnDisk) {
        let serving = self.models.get(name).map(|m| m.manifest().version);
        if serving == Some(back.manifest.version) {
            return;
        }
        let started = Instant::now();
        match self.swap_low_memory(name, &back).await {
            Ok(model) => {
                self.swapped_in(name, model, started);
            }
            Err(e) => {
                self.unloaded.remove(name);
                let reason = format!(
                    "rolling back in low memory: version {} does not load: {}",
                    back.manifest.version, e.reason
                );
                warn!(model = %name, %reason);
                self.restore_low_memory(name, started).await;
                self.updater
                    .note_error(e.kind, Some(name), Some(back.manifest.version), reason);
            }
        }
    }

    /// The end of a low-memory swap that succeeded: `model` serves, `name` answers again, the
    /// window it did not is recorded and returned.
    fn swapped_in(&mut self, name: &str, model: Arc<LoadedModel>, started: Instant) -> Duration {
        let (slot, version) = (model.slot(), model.manifest().version);
        self.models.swap_in(model);
        self.models.set_swapping(name, false);
        self.unloaded.remove(name);
        let unavailable = started.elapsed();
        self.metrics.low_memory_swap(name, unavailable);
        self.metrics.serving(name, slot, version);
        crate::sys::release_free_memory();
        unavailable
    }

    /// A low-memory swap's first half: `name` answers 503 from now on, its serving model is
    /// unloaded once its last request is done (at most [`UNLOAD_WAIT`]) and its memory given
    /// back; then the new version is loaded and checked as staging would, at full priority
    /// (nothing of that name serves meanwhile). On success `name` stays unavailable until the
    /// caller swaps the new version in.
    pub(super) async fn swap_low_memory(
        &mut self,
        name: &str,
        on_disk: &OnDisk,
    ) -> Result<Arc<LoadedModel>, Failure> {
        let started = Instant::now();
        self.models.set_swapping(name, true);
        if let Some(old) = self.models.take(name) {
            let version = old.manifest().version;
            self.unloaded
                .insert(name.to_string(), (old.manifest().clone(), old.slot()));
            let deadline = Instant::now() + UNLOAD_WAIT;
            while Arc::strong_count(&old) > 1 && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            if Arc::strong_count(&old) > 1 {
                // Requests still hold it: loading now would hold both. It serves again.
                self.models.swap_in(old);
                self.models.set_swapping(name, false);
                self.unloaded.remove(name);
                return Err(Failure::new(
                    ErrorKind::Staging,
                    format!(
                        "requests still ran on version {version} {} s after it stopped taking new ones; it serves again",
                        UNLOAD_WAIT.as_secs()
                    ),
                ));
            }
            drop(old);
            crate::sys::release_free_memory();
            info!(model = %name, version, unload_ms = started.elapsed().as_millis() as u64, "unloaded for a low-memory swap");
        }
        let loading = Instant::now();
        let loaded = self
            .load_checked(on_disk.manifest.clone(), on_disk.slot)
            .await;
        info!(model = %name, version = on_disk.manifest.version, ok = loaded.is_ok(), load_ms = loading.elapsed().as_millis() as u64, "loaded and checked in low memory");
        loaded
    }

    /// Loads `manifest` from `slot` and checks it as staging does (golden vectors, latency
    /// budget), on a blocking thread.
    pub(super) async fn load_checked(
        &self,
        manifest: Manifest,
        slot: Slot,
    ) -> Result<Arc<LoadedModel>, Failure> {
        let store = self.store.clone();
        let engine = (self.cfg.engine).pinned(self.pins.get(&manifest.name).copied());
        let loaded = tokio::task::spawn_blocking(move || {
            let golden = store.golden_file(&manifest)?;
            let open = || store.artifact_reader(&manifest);
            let (model, _) = crate::engine::stage(&manifest, slot, open, &golden, &engine)?;
            Ok::<_, Failure>(Arc::new(model))
        })
        .await
        .map_err(|e| Failure::new(ErrorKind::Staging, format!("loading: {e}")))?;
        crate::sys::release_free_memory();
        loaded
    }

    /// A low-memory swap that failed: the version it unloaded is loaded again from its slot
    /// and serves; `name` answers again. The time it answered nothing is recorded.
    pub(super) async fn restore_low_memory(&mut self, name: &str, started: Instant) {
        if let Some((manifest, slot)) = self.unloaded.remove(name) {
            let version = manifest.version;
            match self.load_checked(manifest, slot).await {
                Ok(model) => {
                    self.models.swap_in(model);
                    info!(model = %name, version, %slot, "the low-memory swap failed: the previous version serves again");
                }
                Err(e) => {
                    let reason = format!("the low-memory swap failed and version {version} does not load again: nothing serves this model ({})", e.reason);
                    warn!(model = %name, %reason);
                    self.updater
                        .note_error(e.kind, Some(name), Some(version), reason);
                }
            }
        }
        self.models.set_swapping(name, false);
        self.metrics.low_memory_swap(name, started.elapsed());
    }
}
