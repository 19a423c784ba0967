//! The seam between the engine and the hardware. The scheduler decides *what* runs each step;
//! an [`Executor`] runs it: a forward pass over a flattened batch in which every sequence may
//! use a different adapter slot.
//!
//! Placing an adapter is split in two so that no step waits for it: its [`AdapterPreparer`]
//! turns validated weights into the executor's own form (converted, laid out, on its device) on
//! any thread, while the engine keeps stepping; the engine then swaps the [`PreparedAdapter`]
//! into a slot between two steps, which costs a table update.

use crate::adapters::AdapterWeights;
use crate::model::{HostTensor, LayerWeights, Module};
use std::any::Any;
use std::sync::Arc;

/// One sequence's part of a step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeqChunk {
    /// Rows `start .. start + len` of the batch belong to this sequence.
    pub start: usize,
    pub len: usize,
    /// Tokens of the sequence in the KV cache after this step (its earlier tokens plus `len`).
    pub context_len: usize,
    /// KV cache blocks of the sequence, in position order.
    pub blocks: Vec<u32>,
    /// Adapter slot for all of this sequence's rows.
    pub adapter: Option<u32>,
    /// How many of the chunk's last rows' logits are wanted: 1 when the chunk ends the known
    /// tokens (the next token is sampled from them), all of them for a prompt whose every
    /// token's log-probability is asked for, 0 otherwise.
    pub logit_rows: usize,
}

impl SeqChunk {
    /// The batch rows whose logits are wanted.
    pub fn wanted_rows(&self) -> std::ops::Range<usize> {
        let end = self.start + self.len;
        end - self.logit_rows.min(self.len)..end
    }
}

/// A step's work: the new tokens of every scheduled sequence, flattened.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Batch {
    pub tokens: Vec<u32>,
    /// Position of every token in its sequence.
    pub positions: Vec<u32>,
    /// KV cache slot each token's key and value are written to.
    pub kv_slots: Vec<usize>,
    pub seqs: Vec<SeqChunk>,
}

impl Batch {
    /// Rows of logits the forward pass returns: each sequence's wanted rows, in order.
    pub fn logit_rows(&self) -> usize {
        self.seqs.iter().map(|s| s.wanted_rows().len()).sum()
    }

    /// Per-row adapter slot.
    pub fn row_adapters(&self) -> Vec<Option<u32>> {
        let mut rows = vec![None; self.tokens.len()];
        for s in &self.seqs {
            rows[s.start..s.start + s.len].fill(s.adapter);
        }
        rows
    }
}

/// Why an executor could not do what it was asked.
#[derive(Debug, thiserror::Error)]
pub enum ExecutorError {
    /// The device has no memory left for this (an adapter, a step's buffers). The device is
    /// fine; the operation may succeed when memory is freed.
    #[error("out of device memory: {0}")]
    OutOfMemory(String),
    /// The device failed and cannot be trusted with more work (on a GPU, a sticky fault such as
    /// an illegal address fails every later call): the engine stops serving.
    #[error("device fault: {0}")]
    DeviceFault(String),
    /// The work does not fit this executor (an adapter slot or rank it does not have, a token
    /// outside the vocabulary): a bug upstream, since callers check these first.
    #[error("executor: {0}")]
    Invalid(String),
}

/// An adapter in one executor's own form, ready to be swapped into a slot.
pub struct PreparedAdapter {
    /// Largest rank over its modules.
    pub max_rank: usize,
    /// Projections it targets in at least one layer.
    pub targets: Vec<String>,
    /// Bytes of its weights as validated (f32).
    pub size_bytes: u64,
    form: Box<dyn Any + Send>,
}

impl std::fmt::Debug for PreparedAdapter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PreparedAdapter")
            .field("max_rank", &self.max_rank)
            .field("size_bytes", &self.size_bytes)
            .finish()
    }
}

impl PreparedAdapter {
    /// `form` is what the executor made of `weights`.
    pub fn new<T: Any + Send>(weights: &AdapterWeights, form: T) -> PreparedAdapter {
        PreparedAdapter {
            max_rank: weights.max_rank,
            targets: weights.targets.iter().map(|m| m.name().to_string()).collect(),
            size_bytes: weights.size_bytes(),
            form: Box::new(form),
        }
    }

    /// An adapter whose form `make` builds from its validated weights (moved into it).
    pub fn from_weights<T: Any + Send>(
        weights: AdapterWeights,
        make: impl FnOnce(AdapterWeights) -> T,
    ) -> PreparedAdapter {
        let mut prepared = PreparedAdapter::new(&weights, ());
        prepared.form = Box::new(make(weights));
        prepared
    }

    /// The executor's form back, if this was prepared by an executor of that kind.
    pub fn into_form<T: Any>(self) -> Result<Box<T>, ExecutorError> {
        self.form.downcast().map_err(|_| ExecutorError::Invalid("an adapter prepared for another executor".into()))
    }
}

/// An adapter's resources taken out of its slot. Freeing them can take a while (tens of
/// megabytes of host memory, or device memory), so the engine drops them off its thread.
pub struct Retired {
    _form: Box<dyn Any + Send>,
}

impl std::fmt::Debug for Retired {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Retired")
    }
}

impl Retired {
    pub fn new<T: Any + Send>(form: T) -> Retired {
        Retired { _form: Box::new(form) }
    }

    /// Drops it on a short-lived thread of its own (here, if no thread can be started).
    pub fn drop_elsewhere(self) {
        let mut held = Some(self);
        let spawned = std::thread::Builder::new().name("switchyard-adapter-drop".into()).spawn({
            let retired = held.take();
            move || drop(retired)
        });
        // A failed spawn hands the closure (and the adapter) back only by dropping it here.
        drop(spawned);
    }
}

/// Turns validated adapters into an executor's form; callable from any thread while the
/// executor runs.
pub trait AdapterPreparer: Send + Sync + std::fmt::Debug {
    fn prepare(&self, adapter: AdapterWeights) -> Result<PreparedAdapter, ExecutorError>;
}

/// Runs forward passes and holds the model weights, KV cache and adapter slots on its device.
pub trait Executor: Send {
    /// Human-readable device, e.g. `cpu (2 threads)`.
    fn device(&self) -> String;

    /// Compute dtype, e.g. `f32`.
    fn dtype(&self) -> &'static str;

    /// What prepares adapters for this executor, off the engine thread.
    fn preparer(&self) -> Arc<dyn AdapterPreparer>;

    /// Swaps a prepared adapter into `slot`, cheaply, between steps; returns what the slot held.
    fn install_adapter(&mut self, slot: u32, adapter: PreparedAdapter) -> Result<Option<Retired>, ExecutorError>;

    /// Prepares and installs an adapter on the calling thread (tests and benchmarks).
    fn load_adapter(&mut self, slot: u32, adapter: AdapterWeights) -> Result<(), ExecutorError> {
        let prepared = self.preparer().prepare(adapter)?;
        self.install_adapter(slot, prepared).map(drop)
    }

    /// Empties `slot`; returns what it held.
    fn unload_adapter(&mut self, slot: u32) -> Option<Retired>;

    /// Runs the batch; returns `[batch.logit_rows(), vocab]` logits.
    fn forward(&mut self, batch: &Batch) -> Result<Vec<f32>, ExecutorError>;
}

/// A decoder layer's weights as the executors hold them: q, k and v stacked into one projection
/// and gate and up into another (fewer, larger matrix products), in a buffer type `B` of the
/// executor's choosing.
#[derive(Debug)]
pub struct FusedLayer<B> {
    pub input_norm: B,
    pub post_norm: B,
    /// `[q_dim + 2·kv_dim, hidden]`.
    pub qkv: B,
    pub qkv_bias: Option<B>,
    pub o: B,
    pub o_bias: Option<B>,
    /// `[2·intermediate, hidden]`.
    pub gate_up: B,
    pub gate_up_bias: Option<B>,
    pub down: B,
    pub down_bias: Option<B>,
}

impl<B> FusedLayer<B> {
    /// Lays out `layer`; `put` makes a buffer of tensors stacked along their first dimension.
    pub fn build<Err>(
        layer: &LayerWeights,
        mut put: impl FnMut(&[&HostTensor]) -> Result<B, Err>,
    ) -> Result<FusedLayer<B>, Err> {
        let w = |m: Module| &layer.proj[m.index()];
        // A fused bias exists when every part has one (the architecture decides, per block).
        let bias = |ms: &[Module]| ms.iter().map(|&m| layer.bias[m.index()].as_ref()).collect::<Option<Vec<_>>>();
        let mut put_opt = |parts: Option<Vec<&HostTensor>>| parts.map(|p| put(&p)).transpose();
        let qkv_bias = put_opt(bias(&[Module::Q, Module::K, Module::V]))?;
        let o_bias = put_opt(bias(&[Module::O]))?;
        let gate_up_bias = put_opt(bias(&[Module::Gate, Module::Up]))?;
        let down_bias = put_opt(bias(&[Module::Down]))?;
        Ok(FusedLayer {
            input_norm: put(&[&layer.input_norm])?,
            post_norm: put(&[&layer.post_attention_norm])?,
            qkv: put(&[w(Module::Q), w(Module::K), w(Module::V)])?,
            qkv_bias,
            o: put(&[w(Module::O)])?,
            o_bias,
            gate_up: put(&[w(Module::Gate), w(Module::Up)])?,
            gate_up_bias,
            down: put(&[w(Module::Down)])?,
            down_bias,
        })
    }
}
