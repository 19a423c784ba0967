//! How cached KV blocks are named, for the backend's prefix cache and for routers that look for
//! the backend holding most of a request's prompt (`WatchPrefixCache` in the contract).

/// The name of a full block of tokens (or of a chain's root).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockHash(pub [u8; 32]);

impl BlockHash {
    /// Where the chain of a request starts: its adapter's weights (`None`: the base model) and
    /// its cache salt. Different weights or salts never name a block alike.
    pub fn root(adapter: Option<&[u8; 32]>, salt: &str) -> BlockHash {
        let mut h = blake3::Hasher::new_derive_key("switchyard kv prefix root v1");
        match adapter {
            Some(digest) => h.update(&[1]).update(digest),
            None => h.update(&[0]),
        };
        h.update(&(salt.len() as u64).to_le_bytes()).update(salt.as_bytes());
        BlockHash(*h.finalize().as_bytes())
    }

    /// A root for a sequence whose adapter is known only by its slot: each slot's blocks (and
    /// the base model's) are kept apart, but a slot's next adapter would inherit them. The
    /// engine always uses [`BlockHash::root`].
    pub fn of_slot(slot: Option<u32>) -> BlockHash {
        let mut h = blake3::Hasher::new_derive_key("switchyard kv prefix slot root v1");
        h.update(&slot.map_or(u64::MAX, u64::from).to_le_bytes());
        BlockHash(*h.finalize().as_bytes())
    }

    /// The name of the block holding `tokens` after the block named `self`.
    pub fn child(&self, tokens: &[u32]) -> BlockHash {
        let mut h = blake3::Hasher::new();
        h.update(&self.0);
        for t in tokens {
            h.update(&t.to_le_bytes());
        }
        BlockHash(*h.finalize().as_bytes())
    }

    /// The short form routers are told (its first 8 bytes, little-endian): a collision there
    /// only misleads a routing hint, never what a request computes with.
    pub fn id(&self) -> u64 {
        let mut first = [0; 8];
        first.copy_from_slice(&self.0[..8]);
        u64::from_le_bytes(first)
    }
}

/// The ids ([`BlockHash::id`]) of the full blocks of `tokens`, `block_size` tokens each,
/// chained from `root`.
pub fn block_ids(root: BlockHash, tokens: &[u32], block_size: usize) -> Vec<u64> {
    let mut parent = root;
    tokens
        .chunks_exact(block_size.max(1))
        .map(|block| {
            parent = parent.child(block);
            parent.id()
        })
        .collect()
}

/// An adapter's `weights_digest` as `ListAdapters` reports it (64 hex digits).
pub fn parse_digest(hex: &str) -> Option<[u8; 32]> {
    if hex.len() != 64 || !hex.is_ascii() {
        return None;
    }
    let mut digest = [0u8; 32];
    for (i, byte) in digest.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(digest)
}
