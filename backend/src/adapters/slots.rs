//! The table of adapter slots: which adapter is resident where, who is using it, and which
//! idle adapter to evict when a new one needs room. Plain data, owned by the engine thread.

/// An adapter occupying a slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resident {
    pub name: String,
    pub uri: String,
    pub max_rank: usize,
    pub targets: Vec<String>,
    pub size_bytes: u64,
    /// A digest of its weights (`AdapterWeights::digest`): the root of its KV blocks' names.
    pub weights_digest: [u8; 32],
    /// Requests admitted with this adapter and not yet finished.
    pub active: u32,
    /// Being unloaded or replaced: takes no new requests, freed when `active` reaches 0.
    pub draining: bool,
    /// Logical time of the last acquire or release; the smallest idle one is evicted first.
    last_used: u64,
}

/// What the table records of the weights placed in a slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotWeights {
    pub max_rank: usize,
    pub targets: Vec<String>,
    pub size_bytes: u64,
    /// `AdapterWeights::digest`.
    pub digest: [u8; 32],
}

/// Why a slot operation was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SlotError {
    #[error("adapter {0:?} is not loaded")]
    UnknownAdapter(String),
    #[error("adapter {name:?} is in use by {active} request(s)")]
    InUse { name: String, active: u32 },
    #[error("all {max} adapter slots hold adapters that requests are using")]
    Full { max: usize },
}

/// A draining adapter whose last request finished: its slot is free again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Released {
    pub slot: u32,
    pub name: String,
}

/// Adapter slots with LRU eviction of idle adapters. An adapter with active requests is never
/// evicted or removed; one being unloaded or replaced *drains*: new requests no longer find
/// it, the ones it has finish, then its slot is freed.
#[derive(Debug)]
pub struct SlotTable {
    slots: Vec<Option<Resident>>,
    clock: u64,
}

impl SlotTable {
    pub fn new(max: usize) -> SlotTable {
        SlotTable { slots: vec![None; max], clock: 0 }
    }

    pub fn capacity(&self) -> usize {
        self.slots.len()
    }

    pub fn occupied(&self) -> usize {
        self.slots.iter().flatten().count()
    }

    /// The slot holding `name` for new requests (draining slots are not found).
    pub fn find(&self, name: &str) -> Option<u32> {
        self.slots.iter().position(|s| s.as_ref().is_some_and(|r| r.name == name && !r.draining)).map(|i| i as u32)
    }

    pub fn get(&self, slot: u32) -> Option<&Resident> {
        self.slots.get(slot as usize).and_then(Option::as_ref)
    }

    /// Resident adapters with their slots, in slot order.
    pub fn iter(&self) -> impl Iterator<Item = (u32, &Resident)> {
        self.slots.iter().enumerate().filter_map(|(i, s)| s.as_ref().map(|r| (i as u32, r)))
    }

    fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    /// Marks one more request as using `name` and returns its slot.
    pub fn acquire(&mut self, name: &str) -> Result<u32, SlotError> {
        let slot = self.find(name).ok_or_else(|| SlotError::UnknownAdapter(name.to_string()))?;
        let now = self.tick();
        if let Some(r) = self.slots[slot as usize].as_mut() {
            r.active += 1;
            r.last_used = now;
        }
        Ok(slot)
    }

    /// Marks a request using `slot` as finished. When that was the last request of a
    /// draining adapter, its slot is freed and returned.
    pub fn release(&mut self, slot: u32) -> Option<Released> {
        let now = self.tick();
        let entry = self.slots.get_mut(slot as usize)?;
        let r = entry.as_mut()?;
        r.active = r.active.saturating_sub(1);
        r.last_used = now;
        if r.draining && r.active == 0 {
            let name = r.name.clone();
            *entry = None;
            return Some(Released { slot, name });
        }
        None
    }

    /// Chooses a slot for a new adapter: a free one, else the least recently used idle one,
    /// never `avoid` while another choice exists. Returns the slot and the name of the adapter
    /// that must be evicted from it, if any. Nothing changes until [`SlotTable::insert`].
    pub fn choose(&self, avoid: Option<u32>) -> Result<(u32, Option<String>), SlotError> {
        if let Some(free) = self.slots.iter().position(Option::is_none) {
            return Ok((free as u32, None));
        }
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.as_ref().filter(|r| r.active == 0).map(|r| (i, r)))
            .min_by_key(|(i, r)| (Some(*i as u32) == avoid, r.last_used))
            .map(|(i, r)| (i as u32, Some(r.name.clone())))
            .ok_or(SlotError::Full { max: self.slots.len() })
    }

    /// Starts draining `name`: new requests no longer find it. Returns its slot and whether
    /// the slot is already free (no request was using it).
    pub fn drain(&mut self, name: &str) -> Result<(u32, bool), SlotError> {
        let slot = self.find(name).ok_or_else(|| SlotError::UnknownAdapter(name.to_string()))?;
        let entry = &mut self.slots[slot as usize];
        let idle = entry.as_ref().is_some_and(|r| r.active == 0);
        if idle {
            *entry = None;
        } else if let Some(r) = entry.as_mut() {
            r.draining = true;
        }
        Ok((slot, idle))
    }

    /// Stops draining `slot` if it still holds `name` and no other slot has taken the name
    /// meanwhile. Returns whether the adapter is back in service.
    pub fn undrain(&mut self, slot: u32, name: &str) -> bool {
        if self.find(name).is_some() {
            return false;
        }
        match self.slots.get_mut(slot as usize).and_then(Option::as_mut) {
            Some(r) if r.name == name && r.draining => {
                r.draining = false;
                true
            }
            _ => false,
        }
    }

    /// Puts an adapter in `slot`, replacing whatever was there.
    pub fn insert(&mut self, slot: u32, name: String, uri: String, w: SlotWeights) {
        let last_used = self.tick();
        let SlotWeights { max_rank, targets, size_bytes, digest: weights_digest } = w;
        let resident = Resident {
            name,
            uri,
            max_rank,
            targets,
            size_bytes,
            weights_digest,
            active: 0,
            draining: false,
            last_used,
        };
        self.slots[slot as usize] = Some(resident);
    }

    /// Removes an idle adapter and returns its slot.
    pub fn remove(&mut self, name: &str) -> Result<u32, SlotError> {
        let slot = self.find(name).ok_or_else(|| SlotError::UnknownAdapter(name.to_string()))?;
        if let Some(r) = &self.slots[slot as usize]
            && r.active > 0
        {
            return Err(SlotError::InUse { name: name.to_string(), active: r.active });
        }
        self.slots[slot as usize] = None;
        Ok(slot)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weights() -> SlotWeights {
        SlotWeights { max_rank: 8, targets: Vec::new(), size_bytes: 0, digest: [0; 32] }
    }

    fn put(t: &mut SlotTable, name: &str) -> u32 {
        let (slot, _) = t.choose(None).expect("room");
        t.insert(slot, name.into(), format!("file:///{name}"), weights());
        slot
    }

    #[test]
    fn evicts_the_least_recently_used_idle_adapter() {
        let mut t = SlotTable::new(2);
        let a = put(&mut t, "a");
        let b = put(&mut t, "b");
        assert_ne!(a, b);
        // Touch "a" so "b" is the least recently used.
        t.acquire("a").expect("resident");
        t.release(a);
        assert_eq!(t.choose(None), Ok((b, Some("b".into()))));
        // Unless "b" must be kept (it is being replaced) and another idle slot exists.
        assert_eq!(t.choose(Some(b)), Ok((a, Some("a".into()))));
    }

    #[test]
    fn never_evicts_or_removes_an_adapter_in_use() {
        let mut t = SlotTable::new(2);
        put(&mut t, "a");
        put(&mut t, "b");
        let a = t.acquire("a").expect("resident");
        let b = t.acquire("b").expect("resident");
        assert_eq!(t.choose(None), Err(SlotError::Full { max: 2 }));
        assert_eq!(t.remove("a"), Err(SlotError::InUse { name: "a".into(), active: 1 }));
        assert_eq!(t.release(b), None);
        assert_eq!(t.choose(None), Ok((b, Some("b".into()))));
        t.release(a);
        assert_eq!(t.remove("a"), Ok(a));
        assert_eq!(t.find("a"), None);
        assert_eq!(t.acquire("a"), Err(SlotError::UnknownAdapter("a".into())));
    }

    #[test]
    fn a_draining_adapter_takes_no_new_requests_and_frees_its_slot_after_the_last() {
        let mut t = SlotTable::new(2);
        put(&mut t, "a");
        let a = t.acquire("a").expect("resident");
        t.acquire("a").expect("resident");
        assert_eq!(t.drain("a"), Ok((a, false)));
        assert_eq!(t.acquire("a"), Err(SlotError::UnknownAdapter("a".into())));
        // The name can be taken by a replacement while the old slot drains.
        let (b, _) = t.choose(None).expect("room");
        assert_ne!(a, b);
        t.insert(b, "a".into(), "file:///a2".into(), weights());
        assert!(!t.undrain(a, "a"), "a replacement holds the name");
        assert_eq!(t.release(a), None);
        assert_eq!(t.release(a), Some(Released { slot: a, name: "a".into() }));
        assert_eq!(t.get(a), None);
        assert_eq!(t.find("a"), Some(b));
    }

    #[test]
    fn an_idle_adapter_drains_at_once_and_a_cancelled_drain_restores_it() {
        let mut t = SlotTable::new(1);
        put(&mut t, "a");
        let a = t.acquire("a").expect("resident");
        assert_eq!(t.drain("a"), Ok((a, false)));
        assert!(t.undrain(a, "a"));
        assert_eq!(t.find("a"), Some(a));
        t.release(a);
        assert_eq!(t.drain("a"), Ok((a, true)));
        assert_eq!(t.get(a), None);
    }
}
