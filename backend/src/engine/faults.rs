//! Faults injected through the executor seam, so tests can show what operators and the
//! gateway see when an engine fails. Test builds only (the crate's `fault-injection` feature);
//! a release binary has none of this.
//!
//! `SWITCHYARD_FAULTS_FILE` names a file the wrapped executor reads before every forward pass:
//! - absent, empty or anything else: nothing happens;
//! - `panic`: the pass panics, killing the engine thread (a bug in the engine);
//! - `device-fault`: the pass fails as a sticky device error does (a GPU fault);
//! - `stall`: the pass waits until the file says something else (a wedged device);
//! - `slow MS`: the pass takes MS milliseconds longer (a slow device: the steps of requests
//!   run one after another are then far enough apart to tell their order from outside).

use super::executor::{AdapterPreparer, Batch, Executor, ExecutorError, PreparedAdapter, Retired};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// The environment variable naming the faults file.
pub const FAULTS_FILE_ENV: &str = "SWITCHYARD_FAULTS_FILE";

/// An executor that fails as its faults file says.
pub struct Faulty {
    inner: Box<dyn Executor>,
    file: PathBuf,
}

impl std::fmt::Debug for Faulty {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Faulty").field("device", &self.inner.device()).field("file", &self.file).finish()
    }
}

impl Faulty {
    /// Wraps `inner` when `SWITCHYARD_FAULTS_FILE` is set; returns it unchanged otherwise.
    pub fn wrap_from_env(inner: Box<dyn Executor>) -> Box<dyn Executor> {
        match std::env::var_os(FAULTS_FILE_ENV) {
            Some(file) => {
                tracing::warn!(file = %PathBuf::from(&file).display(), "fault injection is on");
                Box::new(Faulty { inner, file: file.into() })
            }
            None => inner,
        }
    }

    fn fault(&self) -> String {
        std::fs::read_to_string(&self.file).map(|s| s.trim().to_string()).unwrap_or_default()
    }
}

impl Executor for Faulty {
    fn device(&self) -> String {
        self.inner.device()
    }

    fn dtype(&self) -> &'static str {
        self.inner.dtype()
    }

    fn preparer(&self) -> Arc<dyn AdapterPreparer> {
        self.inner.preparer()
    }

    fn install_adapter(&mut self, slot: u32, adapter: PreparedAdapter) -> Result<Option<Retired>, ExecutorError> {
        self.inner.install_adapter(slot, adapter)
    }

    fn unload_adapter(&mut self, slot: u32) -> Option<Retired> {
        self.inner.unload_adapter(slot)
    }

    fn forward(&mut self, batch: &Batch) -> Result<Vec<f32>, ExecutorError> {
        match self.fault().as_str() {
            "panic" => panic!("injected fault: the forward pass panics"),
            "device-fault" => return Err(ExecutorError::DeviceFault("injected fault: illegal address".into())),
            "stall" => {
                while self.fault() == "stall" {
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
            other => {
                if let Some(ms) = other.strip_prefix("slow ").and_then(|ms| ms.trim().parse().ok()) {
                    std::thread::sleep(Duration::from_millis(ms));
                }
            }
        }
        self.inner.forward(batch)
    }
}
