//! The KV cache's blocks: who holds each one, and which finished blocks are kept for reuse.
//!
//! **Prefix caching.** A block full of computed tokens is named by a hash chain: the hash of its
//! parent block's name and its own token ids, starting from a root that mixes in the adapter's
//! content digest and the request's cache salt. Two sequences whose prompts start with the same
//! tokens, under the same adapter weights and salt, name their leading blocks alike, so the
//! later one reuses the earlier one's keys and values instead of computing them. The names are
//! BLAKE3 hashes (256 bits): a collision, which would hand one request another's keys and
//! values, cannot be found by trying.
//!
//! A named block whose last holder has finished stays in the cache, unheld; unheld blocks are
//! given out again least recently released first, and a block given out loses its name. A
//! sequence's blocks are released last block first, so the tail of a prefix goes before its
//! head (a chain is only ever reused from its head).

use std::collections::{BTreeMap, HashMap};

pub use switchyard_proto::prefix::BlockHash;

/// A change to the set of cached blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheChange {
    /// A block was named: later sequences can reuse it.
    Stored(BlockHash),
    /// A named block was given out for other tokens.
    Removed(BlockHash),
}

/// Every block of the KV cache: free, held by sequences, or cached for reuse.
#[derive(Debug)]
pub struct BlockPool {
    /// Sequences holding each block.
    holders: Vec<u32>,
    /// Each block's name while it is in the cache.
    names: Vec<Option<BlockHash>>,
    /// Named blocks, held or not.
    cached: HashMap<BlockHash, u32>,
    /// Unheld blocks with no name, popped from the end (low numbers first).
    free: Vec<u32>,
    /// Unheld named blocks by release time, oldest first, and each one's time.
    unheld: BTreeMap<u64, u32>,
    released_at: Vec<u64>,
    clock: u64,
    caching: bool,
    /// Changes since [`BlockPool::take_changes`] last took them.
    changes: Vec<CacheChange>,
}

impl BlockPool {
    /// `blocks` blocks, all free. Without `caching` nothing is named or reused.
    pub fn new(blocks: usize, caching: bool) -> BlockPool {
        BlockPool {
            holders: vec![0; blocks],
            names: vec![None; blocks],
            cached: HashMap::new(),
            free: (0..blocks as u32).rev().collect(),
            unheld: BTreeMap::new(),
            released_at: vec![0; blocks],
            clock: 0,
            caching,
            changes: Vec::new(),
        }
    }

    /// Blocks that can be given out: free ones and unheld cached ones.
    pub fn available(&self) -> usize {
        self.free.len() + self.unheld.len()
    }

    /// Unheld blocks kept for reuse.
    pub fn cached_unheld(&self) -> usize {
        self.unheld.len()
    }

    /// How many leading blocks of a chain are cached, and how many of those no sequence holds
    /// (taking those makes them unavailable to others).
    pub fn peek(&self, chain: &[BlockHash]) -> (usize, usize) {
        let mut unheld = 0;
        let mut found = 0;
        for name in chain {
            let Some(&block) = self.cached.get(name) else { break };
            found += 1;
            unheld += usize::from(self.holders[block as usize] == 0);
        }
        (found, unheld)
    }

    /// Takes the cached leading blocks of a chain for a sequence.
    pub fn take_cached(&mut self, chain: &[BlockHash]) -> Vec<u32> {
        let mut taken = Vec::new();
        for name in chain {
            let Some(&block) = self.cached.get(name) else { break };
            if self.holders[block as usize] == 0 {
                self.unheld.remove(&self.released_at[block as usize]);
            }
            self.holders[block as usize] += 1;
            taken.push(block);
        }
        taken
    }

    /// A block for a sequence to write: a free one, or else the least recently released cached
    /// one, which loses its name.
    pub fn allocate(&mut self) -> Option<u32> {
        let block = match self.free.pop() {
            Some(b) => b,
            None => {
                let (_, b) = self.unheld.pop_first()?;
                if let Some(name) = self.names[b as usize].take() {
                    self.cached.remove(&name);
                    self.changes.push(CacheChange::Removed(name));
                }
                b
            }
        };
        self.holders[block as usize] = 1;
        Some(block)
    }

    /// Names a block its holder has filled, so later sequences can reuse it. A name already
    /// given to another block keeps that block (this one is freed plainly when released).
    pub fn name(&mut self, block: u32, name: BlockHash) {
        if !self.caching || self.names[block as usize].is_some() {
            return;
        }
        if let std::collections::hash_map::Entry::Vacant(e) = self.cached.entry(name) {
            e.insert(block);
            self.names[block as usize] = Some(name);
            self.changes.push(CacheChange::Stored(name));
        }
    }

    /// The names of every cached block, held or not.
    pub fn names(&self) -> impl Iterator<Item = &BlockHash> {
        self.cached.keys()
    }

    /// The changes to the cached set since the last call, in order.
    pub fn take_changes(&mut self) -> Vec<CacheChange> {
        std::mem::take(&mut self.changes)
    }

    /// A sequence lets go of its blocks (in position order). Named blocks nobody holds stay
    /// cached, the last position released first so it is also given out first.
    pub fn release(&mut self, blocks: &[u32]) {
        for &b in blocks.iter().rev() {
            let holders = &mut self.holders[b as usize];
            *holders = holders.saturating_sub(1);
            if *holders > 0 {
                continue;
            }
            if self.names[b as usize].is_some() {
                self.clock += 1;
                self.released_at[b as usize] = self.clock;
                self.unheld.insert(self.clock, b);
            } else {
                self.free.push(b);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(root: BlockHash, tokens: &[u32], block: usize) -> Vec<BlockHash> {
        let mut names = Vec::new();
        let mut parent = root;
        for b in tokens.chunks_exact(block) {
            parent = parent.child(b);
            names.push(parent);
        }
        names
    }

    #[test]
    fn names_differ_by_adapter_salt_and_every_earlier_token() {
        let base = BlockHash::root(None, "");
        assert_ne!(base, BlockHash::root(Some(&[0; 32]), ""), "the base model is not an adapter of zeros");
        assert_ne!(BlockHash::root(Some(&[1; 32]), ""), BlockHash::root(Some(&[2; 32]), ""));
        assert_ne!(base, BlockHash::root(None, "tenant-a"));
        let a = chain(base, &[1, 2, 3, 4, 5, 6], 2);
        let b = chain(base, &[9, 2, 3, 4, 5, 6], 2);
        assert!(a.iter().zip(&b).all(|(x, y)| x != y), "a different first token renames every later block");
        assert_eq!(a[..2], chain(base, &[1, 2, 3, 4], 2)[..], "a shared prefix names its blocks alike");
    }

    #[test]
    fn released_named_blocks_are_reused_until_given_out_oldest_first() {
        let mut pool = BlockPool::new(3, true);
        let names = chain(BlockHash::root(None, ""), &[1, 2, 3, 4], 2);
        let held: Vec<u32> = (0..2).filter_map(|_| pool.allocate()).collect();
        for (&b, &n) in held.iter().zip(&names) {
            pool.name(b, n);
        }
        pool.release(&held);
        assert_eq!(pool.available(), 3);
        assert_eq!(pool.peek(&names), (2, 2));
        assert_eq!(pool.take_cached(&names), held, "a later sequence reuses both blocks");
        assert_eq!(pool.available(), 1);
        pool.release(&held);

        // The free block first, then the cached tail, then the head.
        let fresh = pool.allocate();
        assert!(fresh.is_some_and(|b| !held.contains(&b)));
        assert_eq!(pool.allocate(), Some(held[1]));
        assert_eq!(pool.peek(&names), (1, 1), "the head is still cached");
        assert_eq!(pool.allocate(), Some(held[0]));
        assert_eq!(pool.peek(&names), (0, 0));
        assert_eq!(pool.allocate(), None);
        let changes = pool.take_changes();
        let want: Vec<CacheChange> = names
            .iter()
            .map(|&n| CacheChange::Stored(n))
            .chain([CacheChange::Removed(names[1]), CacheChange::Removed(names[0])])
            .collect();
        assert_eq!(changes, want, "named, then given out tail first");
        assert_eq!(pool.names().count(), 0);
        assert!(pool.take_changes().is_empty());
    }

    #[test]
    fn a_held_block_is_never_given_out_and_without_caching_nothing_is_named() {
        let mut pool = BlockPool::new(2, true);
        let names = chain(BlockHash::root(None, ""), &[1, 2], 2);
        let Some(b) = pool.allocate() else { panic!("a free block") };
        pool.name(b, names[0]);
        assert_eq!(pool.take_cached(&names), vec![b], "a second holder");
        pool.release(&[b]);
        assert_eq!(pool.available(), 1, "still held by one sequence");
        assert_ne!(pool.allocate(), Some(b));

        let mut off = BlockPool::new(2, false);
        let Some(b) = off.allocate() else { panic!("a free block") };
        off.name(b, names[0]);
        off.release(&[b]);
        assert_eq!(off.peek(&names), (0, 0));
        assert_eq!(off.available(), 2);
    }
}
