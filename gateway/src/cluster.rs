//! The routing table: what the gateway last learned about each backend, and the choice of
//! backends for a request. Plain data, updated by the health probes and read by every request.
//!
//! For a request that uses an adapter, backends are ranked by how ready they are for it
//! (resident > free slot > loading > must evict another adapter), then:
//! - among backends that have it resident, by queue depth (spread the load);
//! - for a cold adapter, by rendezvous (highest-random-weight) hashing of adapter and backend
//!   first, so every gateway replica pins it to the same backend instead of loading it
//!   everywhere; queue depth only breaks ties.
//!
//! Base-model requests are ranked by queue depth alone.

use crate::upstream::{AdapterState, AdapterStatus, BackendInfo};
use sha2::{Digest, Sha256};
use std::collections::HashMap;

/// How ready a backend is to serve an adapter. Higher is better.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Fit {
    /// Every adapter slot holds an adapter; this one must evict another (or wait for one).
    MustEvict,
    /// The adapter is being fetched or placed there.
    Loading,
    /// A slot is free: the adapter loads without evicting anything.
    FreeSlot,
    /// The adapter is resident (or the request is for the base model).
    Resident,
}

/// What the gateway knows about one backend.
#[derive(Debug, Clone, Default)]
pub struct BackendView {
    pub address: String,
    /// The last probe succeeded and the backend said SERVING.
    pub healthy: bool,
    /// Why the last probe failed, if it did.
    pub last_error: Option<String>,
    /// From the last successful probe.
    pub info: Option<BackendInfo>,
    /// Adapters the backend listed, by name; for a name listed twice (a hot swap in flight) the
    /// most useful state.
    pub adapters: HashMap<String, AdapterStatus>,
    /// Requests this gateway has in flight there now (fresher than the probe's queue figures).
    pub in_flight: u32,
    /// What this gateway itself changed in `adapters` ([`BackendView::loaded`],
    /// [`BackendView::unloaded`]).
    pub changed: Changes,
}

/// The changes a gateway made to its view of a backend's adapters, counted, so that a probe
/// that began before one does not undo it.
#[derive(Debug, Clone, Default)]
pub struct Changes {
    count: u64,
    /// Per adapter, the change (of `count`) that last set it.
    last: HashMap<String, u64>,
}

impl BackendView {
    /// Where a probe begins: pass it to [`BackendView::observe`] with the probe's answer.
    pub fn probe_start(&self) -> u64 {
        self.changed.count
    }

    /// Records a probe's answer. The probe began at `since` ([`BackendView::probe_start`]):
    /// what this gateway itself did to an adapter there after that (a load or an unload whose
    /// answer came while the probe was under way) stands over what the probe listed.
    pub fn observe(&mut self, since: u64, serving: bool, info: BackendInfo, adapters: Vec<AdapterStatus>) {
        self.healthy = serving;
        self.last_error = (!serving).then(|| match info.not_serving_reason.as_str() {
            "" => "backend reports NOT_SERVING".to_string(),
            why => format!("backend reports NOT_SERVING: {why}"),
        });
        self.info = Some(info);
        let mut before = std::mem::take(&mut self.adapters);
        for a in adapters {
            let better = self.adapters.get(&a.name).is_none_or(|old| state_rank(a.state) > state_rank(old.state));
            if better {
                self.adapters.insert(a.name.clone(), a);
            }
        }
        self.changed.last.retain(|name, &mut at| {
            let newer = at > since;
            if newer {
                match before.remove(name) {
                    Some(a) => self.adapters.insert(name.clone(), a),
                    None => self.adapters.remove(name),
                };
            }
            newer
        });
    }

    /// Records that this gateway loaded an adapter there, with the status the backend answered.
    /// A probe already under way does not undo it.
    pub fn loaded(&mut self, adapter: AdapterStatus) {
        self.note(&adapter.name);
        self.adapters.insert(adapter.name.clone(), adapter);
    }

    /// Records that this gateway unloaded adapter `name` there (or found it gone). A probe
    /// already under way does not undo it.
    pub fn unloaded(&mut self, name: &str) {
        self.note(name);
        self.adapters.remove(name);
    }

    fn note(&mut self, name: &str) {
        self.changed.count += 1;
        self.changed.last.insert(name.to_string(), self.changed.count);
    }

    /// Records a failed probe. What it said about its adapters no longer holds (a backend
    /// that comes back may have restarted with none).
    pub fn fail(&mut self, error: String) {
        self.healthy = false;
        self.last_error = Some(error);
        self.adapters.clear();
    }

    /// Why this backend is not healthy (meaningful when it is not).
    pub fn reason(&self) -> String {
        self.last_error.clone().unwrap_or_else(|| "not probed yet".to_string())
    }

    /// Requests waiting or running there.
    pub fn queue_depth(&self) -> u32 {
        let reported = self.info.as_ref().map_or(0, |i| i.queued_requests + i.running_requests);
        reported.max(self.in_flight)
    }

    /// How ready this backend is for `adapter` (`None`: the base model).
    pub fn fit(&self, adapter: Option<&str>) -> Fit {
        let Some(name) = adapter else { return Fit::Resident };
        match self.adapters.get(name).map(|a| a.state) {
            Some(AdapterState::Resident | AdapterState::Draining) => return Fit::Resident,
            Some(AdapterState::Fetching | AdapterState::Validated) => return Fit::Loading,
            _ => {}
        }
        match &self.info {
            Some(info) if info.loaded_loras < info.max_loras => Fit::FreeSlot,
            _ => Fit::MustEvict,
        }
    }
}

fn state_rank(s: AdapterState) -> u8 {
    match s {
        AdapterState::Resident => 5,
        AdapterState::Draining => 4,
        AdapterState::Validated => 3,
        AdapterState::Fetching => 2,
        AdapterState::Evicted => 1,
        AdapterState::Failed | AdapterState::Unknown => 0,
    }
}

/// The rendezvous weight of `backend` for `key`: stable across processes and versions.
pub fn rendezvous_weight(key: &str, backend: &str) -> u64 {
    let mut h = Sha256::new();
    h.update(key.as_bytes());
    h.update([0]);
    h.update(backend.as_bytes());
    let d = h.finalize();
    u64::from_be_bytes([d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]])
}

/// The backends that should keep adapter `name` loaded: with `replicas` unset, every healthy
/// one; else that many healthy ones, by rendezvous weight of the adapter and the backend (so
/// every gateway computes the same set, and a backend joining or leaving moves only the
/// adapters it gains or held), skipping backends with no free slot for it while others have
/// one (a full backend would have to evict another adapter). Addresses, best first.
pub fn placement(name: &str, replicas: Option<u32>, backends: &[BackendView]) -> Vec<String> {
    let mut healthy: Vec<&BackendView> = backends.iter().filter(|b| b.healthy).collect();
    let Some(n) = replicas else { return healthy.iter().map(|b| b.address.clone()).collect() };
    healthy.sort_by_key(|b| std::cmp::Reverse(rendezvous_weight(name, &b.address)));
    let (roomy, full): (Vec<&BackendView>, Vec<&BackendView>) =
        healthy.into_iter().partition(|b| b.fit(Some(name)) != Fit::MustEvict);
    roomy.into_iter().chain(full).take(n as usize).map(|b| b.address.clone()).collect()
}

/// Healthy backends for a request, best first (indices into `backends`). `pinned` restricts
/// the choice to the backend with that address (a policy's explicit choice).
pub fn rank(backends: &[BackendView], adapter: Option<&str>, pinned: Option<&str>) -> Vec<usize> {
    let key = adapter.unwrap_or("");
    let mut ranked: Vec<(usize, Fit, u32, u64)> = backends
        .iter()
        .enumerate()
        .filter(|(_, b)| b.healthy && pinned.is_none_or(|p| p == b.address))
        .map(|(i, b)| (i, b.fit(adapter), b.queue_depth(), rendezvous_weight(key, &b.address)))
        .collect();
    ranked.sort_by(|a, b| {
        b.1.cmp(&a.1).then_with(|| {
            if a.1 == Fit::Resident { a.2.cmp(&b.2).then(b.3.cmp(&a.3)) } else { b.3.cmp(&a.3).then(a.2.cmp(&b.2)) }
        })
    });
    ranked.into_iter().map(|(i, ..)| i).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backend(address: &str, slots: (u32, u32), queue: u32, adapters: &[(&str, AdapterState)]) -> BackendView {
        let mut b = BackendView { address: address.into(), ..Default::default() };
        let info =
            BackendInfo { loaded_loras: slots.0, max_loras: slots.1, queued_requests: queue, ..Default::default() };
        let list = adapters.iter().map(|(n, s)| AdapterStatus::new(n, "", *s)).collect();
        b.observe(0, true, info, list);
        b
    }

    #[test]
    fn resident_beats_free_slot_beats_loading_beats_must_evict() {
        use AdapterState::*;
        let bs = vec![
            backend("full", (4, 4), 0, &[]),
            backend("loading", (4, 4), 0, &[("a", Fetching)]),
            backend("free", (1, 4), 0, &[]),
            backend("resident-busy", (4, 4), 9, &[("a", Resident)]),
        ];
        assert_eq!(rank(&bs, Some("a"), None), vec![3, 2, 1, 0]);
        // Evicted is not resident: it is ranked by the slots the backend has.
        let bs = vec![backend("evicted", (4, 4), 0, &[("a", Evicted)]), backend("free", (0, 4), 0, &[])];
        assert_eq!(rank(&bs, Some("a"), None), vec![1, 0]);
    }

    #[test]
    fn resident_backends_are_chosen_by_queue_depth() {
        use AdapterState::*;
        let bs = vec![backend("x", (1, 4), 7, &[("a", Resident)]), backend("y", (1, 4), 2, &[("a", Resident)])];
        assert_eq!(rank(&bs, Some("a"), None), vec![1, 0]);
        assert_eq!(rank(&bs, None, None), vec![1, 0], "base-model requests go to the shorter queue");
        let mut busy = bs.clone();
        busy[1].in_flight = 20;
        assert_eq!(rank(&busy, Some("a"), None), vec![0, 1], "this gateway's own in-flight requests count");
    }

    #[test]
    fn a_cold_adapter_is_pinned_by_rendezvous_hashing_whatever_the_queues() {
        let addrs: Vec<String> = (0..5).map(|i| format!("http://10.0.0.{i}:50051")).collect();
        for adapter in ["support-v1", "acme/legal", "b/x"] {
            let quiet: Vec<BackendView> = addrs.iter().map(|a| backend(a, (0, 4), 0, &[])).collect();
            let busy: Vec<BackendView> =
                addrs.iter().enumerate().map(|(i, a)| backend(a, (0, 4), 10 * i as u32, &[])).collect();
            let first = rank(&quiet, Some(adapter), None)[0];
            assert_eq!(rank(&busy, Some(adapter), None)[0], first, "{adapter}: same backend under load");
            let best = (0..5).max_by_key(|&i| rendezvous_weight(adapter, &addrs[i])).unwrap_or(0);
            assert_eq!(first, best);
            // Removing another backend never moves the adapter (the point of rendezvous hashing).
            let mut fewer = quiet.clone();
            let other = (first + 1) % 5;
            fewer[other].healthy = false;
            assert_eq!(rank(&fewer, Some(adapter), None)[0], first);
        }
        // Different adapters spread over the backends.
        let quiet: Vec<BackendView> = addrs.iter().map(|a| backend(a, (0, 4), 0, &[])).collect();
        let chosen: std::collections::HashSet<usize> =
            (0..40).map(|i| rank(&quiet, Some(&format!("adapter-{i}")), None)[0]).collect();
        assert!(chosen.len() >= 4, "40 adapters landed on only {} of 5 backends", chosen.len());
    }

    #[test]
    fn placement_is_rendezvous_among_healthy_backends_with_room_and_moves_little() {
        let addrs: Vec<String> = (0..6).map(|i| format!("http://10.0.1.{i}:50051")).collect();
        let bs: Vec<BackendView> = addrs.iter().map(|a| backend(a, (0, 4), 0, &[])).collect();
        assert_eq!(placement("x", None, &bs).len(), 6, "no replicas: everywhere");
        for name in ["acme/support", "b", "c/d"] {
            let two = placement(name, Some(2), &bs);
            assert_eq!(two.len(), 2);
            let mut by_weight = addrs.clone();
            by_weight.sort_by_key(|a| std::cmp::Reverse(rendezvous_weight(name, a)));
            assert_eq!(two, by_weight[..2].to_vec(), "{name}: the two heaviest");
            // A backend that is neither of the two dies: the placement does not move.
            let mut fewer = bs.clone();
            let other = addrs.iter().position(|a| !two.contains(a)).unwrap_or(0);
            fewer[other].fail("gone".into());
            assert_eq!(placement(name, Some(2), &fewer), two, "{name}");
            // One of the two dies: only its copy moves, to the next heaviest.
            let mut lost = bs.clone();
            let first = addrs.iter().position(|a| *a == two[0]).unwrap_or(0);
            lost[first].fail("gone".into());
            assert_eq!(placement(name, Some(2), &lost), vec![two[1].clone(), by_weight[2].clone()], "{name}");
            // A full backend gives way to one with room.
            let mut full = bs.clone();
            full[first] = backend(&two[0], (4, 4), 0, &[]);
            assert!(!placement(name, Some(2), &full).contains(&two[0]), "{name}");
        }
        assert_eq!(placement("x", Some(10), &bs).len(), 6, "no more copies than backends");
    }

    #[test]
    fn unhealthy_backends_are_never_chosen_and_a_pin_restricts_the_choice() {
        let mut bs = vec![backend("x", (0, 4), 0, &[]), backend("y", (0, 4), 0, &[])];
        bs[0].fail("connection refused".into());
        assert_eq!(rank(&bs, Some("a"), None), vec![1]);
        assert_eq!(rank(&bs, None, Some("y")), vec![1]);
        assert!(rank(&bs, None, Some("x")).is_empty(), "a pinned backend that is down is not replaced");
        bs[1].observe(0, false, BackendInfo::default(), vec![]);
        assert!(rank(&bs, None, None).is_empty());
    }

    #[test]
    fn a_probe_under_way_does_not_undo_what_the_gateway_did_meanwhile() {
        use AdapterState::*;
        let listing = |names: &[(&str, AdapterState)]| -> Vec<AdapterStatus> {
            names.iter().map(|(n, s)| AdapterStatus::new(n, "", *s)).collect()
        };
        let state = |b: &BackendView, name: &str| b.adapters.get(name).map(|a| a.state);
        let mut b = backend("x", (1, 4), 0, &[("old", Resident)]);

        // A probe begins; meanwhile the gateway loads `new` and unloads `old`; the probe's
        // listing, taken before, has `new` still fetching and `old` resident.
        let since = b.probe_start();
        b.loaded(AdapterStatus::new("new", "", Resident));
        b.unloaded("old");
        let stale = listing(&[("new", Fetching), ("old", Resident), ("z", Validated)]);
        b.observe(since, true, BackendInfo::default(), stale);
        assert_eq!((state(&b, "new"), state(&b, "old")), (Some(Resident), None), "the gateway's changes stand");
        assert_eq!(state(&b, "z"), Some(Validated), "the rest of the listing is taken");

        // The next probe began after those changes: its listing is the truth again.
        let since = b.probe_start();
        b.observe(since, true, BackendInfo::default(), listing(&[("new", Evicted), ("old", Resident)]));
        assert_eq!((state(&b, "new"), state(&b, "old")), (Some(Evicted), Some(Resident)));
    }
}
