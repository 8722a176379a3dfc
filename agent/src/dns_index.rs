//! `dns_addrs`: for every address of a headless service's pod, its pod and
//! its *slot* in each service it is (or recently was) an endpoint of.
//!
//! The DNS interceptor stamps what a client learned into the client's
//! `dns_obs` page of the service (one map write per response, not one per
//! address); the slot says where in the page. connect() reads the slots of
//! the address it is given to find the stamps. So:
//! - a slot belongs to one address at a time, per service and family;
//! - an address that leaves a service keeps its slot (a client may still
//!   have it cached: the stale-cache case steering is for) until the slot is
//!   needed for a new address;
//! - a slot handed to a new address carries the time it was handed over
//!   (`since_ns`): older stamps in it were about the previous address.
//!
//! Slots are kept dense: a service and family with `n` current addresses
//! uses the first `max(64, 2n)` slots (rounded up to a page), so most
//! responses touch one page, and gone addresses are kept at least as many
//! as current ones before the oldest gone one gives its slot away.
use std::collections::{BTreeMap, BTreeSet};

use std::borrow::{Borrow, BorrowMut};

use aya::maps::{HashMap, MapData, MapError};
use headway_common::{
    ADDR_MAX_SERVICES, AddrIndex, AddrKey, AddrSlot, NO_POD, OBS_MAX_PAGES, OBS_PAGE_SLOTS,
    Observation, ObservationKey, ObservationPage, addr_slot_flags, map_names, obs_kind, obs_stamp,
    obs_time,
};
use smallvec::SmallVec;

use crate::{
    addr_table::AddrTable,
    generation::Generation,
    map_writer::{WriteError, bump_generation, delete_batch, fingerprint, write_batch},
    pinned::Maps,
};

/// The maps the index writes: `dns_addrs`, its table, and the generation
/// bumped after each change.
pub struct DnsMaps<'a> {
    pub dns_addrs: &'a HashMap<MapData, AddrKey, AddrIndex>,
    pub addr_table: &'a mut AddrTable,
    pub pod_addrs_gen: &'a Generation,
}

impl Maps {
    /// The maps [`DnsIndex`] writes.
    pub fn dns(&mut self) -> DnsMaps<'_> {
        DnsMaps {
            dns_addrs: &self.dns_addrs,
            addr_table: &mut self.addr_table,
            pod_addrs_gen: &self.pod_addrs_gen,
        }
    }
}

/// Slots a service has per family, at most.
const MAX_SLOTS: usize = OBS_PAGE_SLOTS * OBS_MAX_PAGES;
/// `since_ns` of a slot handed out in this sync, set once the addresses
/// that gave slots away are written (see [`DnsIndex::sync_service`]).
const PENDING: u64 = u64::MAX;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Owner {
    addr: AddrKey,
    since_ns: u64,
    /// An endpoint of the service now (not only in the past).
    current: bool,
    /// What the address is to the service now, as its slot says it
    /// ([`addr_slot_flags`]; 0 when taken over from an older agent that
    /// wrote none).
    flags: u16,
    /// Orders gone owners: the smallest left first and gives its slot away
    /// first.
    left: u64,
}

/// The slots of one service and family.
#[derive(Debug, Default)]
struct SlotTable {
    owners: BTreeMap<u32, Owner>,
    by_addr: BTreeMap<AddrKey, u32>,
}

impl SlotTable {
    /// Gives `addr` (with slot flags `flags`) a slot; returns the address
    /// that gave its slot away, if any. `None` inside the `Ok`: a free
    /// slot was used. `Err`: every slot is a current address's.
    fn allocate(
        &mut self,
        addr: AddrKey,
        current_count: usize,
        flags: u16,
    ) -> Result<Option<AddrKey>, ()> {
        let allowed = (current_count * 2)
            .div_ceil(OBS_PAGE_SLOTS)
            .clamp(1, OBS_MAX_PAGES)
            * OBS_PAGE_SLOTS;
        let owners = &self.owners;
        let free_below = |limit: usize| (0..limit as u32).find(|s| !owners.contains_key(s));
        // The longest-gone address below `limit`.
        let gone_below = |limit: usize| {
            owners
                .iter()
                .filter(|(s, o)| !o.current && (**s as usize) < limit)
                .min_by_key(|(_, o)| o.left)
                .map(|(s, _)| *s)
        };
        let slot = free_below(allowed)
            .or_else(|| gone_below(allowed))
            .or_else(|| free_below(MAX_SLOTS))
            .or_else(|| gone_below(MAX_SLOTS))
            .ok_or(())?;
        let evicted = self.owners.remove(&slot).map(|o| o.addr);
        if let Some(old) = evicted {
            self.by_addr.remove(&old);
        }
        self.owners.insert(
            slot,
            Owner {
                addr,
                since_ns: PENDING,
                current: true,
                flags,
                left: 0,
            },
        );
        self.by_addr.insert(addr, slot);
        Ok(evicted)
    }
}

/// What the index keeps of one address: one tree entry per address for
/// everything (three trees keyed by address cost ~15 MB at 100,000).
#[derive(Debug)]
struct AddrState {
    /// Its pod, as `pod_addrs` has it ([`NO_POD`]: none).
    pod_id: u32,
    /// The services it has a slot in, sorted: almost always one, kept
    /// inline.
    services: SmallVec<[u32; 2]>,
    /// What `dns_addrs` holds for it, as a fingerprint ([`index_print`]):
    /// only ever compared, 8 bytes instead of 72.
    written: Option<u64>,
}

impl Default for AddrState {
    fn default() -> Self {
        AddrState {
            pod_id: NO_POD,
            services: SmallVec::new(),
            written: None,
        }
    }
}

impl AddrState {
    fn add_service(&mut self, id: u32) {
        if let Err(at) = self.services.binary_search(&id) {
            self.services.insert(at, id);
        }
    }

    fn remove_service(&mut self, id: u32) {
        if let Ok(at) = self.services.binary_search(&id) {
            self.services.remove(at);
        }
    }

    /// Nothing left worth keeping.
    fn is_empty(&self) -> bool {
        self.pod_id == NO_POD && self.services.is_empty() && self.written.is_none()
    }
}

/// What the agent keeps of `dns_addrs`, and the slot tables behind it.
#[derive(Debug, Default)]
pub struct DnsIndex {
    /// By (service id, family).
    tables: BTreeMap<(u32, u16), SlotTable>,
    /// Each address's pod, services and written entry.
    addrs: BTreeMap<AddrKey, AddrState>,
    /// Counter for `Owner::left`.
    departures: u64,
}

fn family(addr: &AddrKey) -> u16 {
    let [a, b, c, _] = addr.addr;
    if a == 0 && b == 0 && c == AddrKey::V4_MAPPED_WORD {
        4
    } else {
        6
    }
}

/// The flags of a slot whose address is an endpoint of the service now
/// (`Some(eligible)`) or not (`None`).
fn slot_flags(eligible: Option<bool>) -> u16 {
    match eligible {
        Some(true) => addr_slot_flags::KNOWN | addr_slot_flags::MEMBER | addr_slot_flags::ELIGIBLE,
        Some(false) => addr_slot_flags::KNOWN | addr_slot_flags::MEMBER,
        None => addr_slot_flags::KNOWN,
    }
}

fn index_print(v: &AddrIndex) -> u64 {
    let slots = v.slots.map(|s| (s.service_id, s.slot, s.flags, s.since_ns));
    fingerprint(&(v.pod_id, v.n, slots))
}

/// CLOCK_MONOTONIC in ns: the clock of `bpf_ktime_get_ns`.
pub fn monotonic_ns() -> u64 {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `t` is a valid timespec to write to.
    if unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut t) } != 0 {
        return 0;
    }
    t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
}

/// One service's [`DnsIndex::sync_service`], for the thread that runs
/// them during the first sync.
pub struct DnsJob {
    pub service_id: u32,
    pub gone: bool,
    pub current: BTreeMap<AddrKey, bool>,
    pub pods: Vec<(AddrKey, Option<u32>)>,
}

impl DnsIndex {
    /// Runs the jobs in the order they come until the sender goes;
    /// returns what failed, with the service of each.
    pub fn serve(
        &mut self,
        maps: &mut DnsMaps<'_>,
        jobs: std::sync::mpsc::Receiver<Vec<DnsJob>>,
    ) -> Vec<(u32, WriteError)> {
        let mut errors = Vec::new();
        for job in jobs.into_iter().flatten() {
            let failed = self.sync_service(maps, job.service_id, job.gone, &job.current, job.pods);
            errors.extend(failed.into_iter().map(|e| (job.service_id, e)));
        }
        errors
    }

    /// Takes over what a previous agent left in `dns_addrs`: every slot
    /// stays with its address (so what clients learned stays readable), as
    /// if the address were gone until a sync says it is current.
    ///
    /// It also writes `addr_table` anew from what `dns_addrs` holds,
    /// which tells the agent where each address sits there.
    pub fn load(maps: &mut Maps) -> DnsIndex {
        let mut index = DnsIndex::default();
        let entries: Vec<(AddrKey, AddrIndex)> =
            maps.dns_addrs.iter().filter_map(Result::ok).collect();
        if let Err(error) = maps.addr_table.rebuild(entries.iter().copied()) {
            tracing::error!(%error, "cannot write {}", map_names::ADDR_TABLE);
        }
        for (addr, value) in entries {
            let state = index.addrs.entry(addr).or_default();
            state.written = Some(index_print(&value));
            state.pod_id = value.pod_id;
            for e in value.slots.iter().take(value.n as usize) {
                let table = index
                    .tables
                    .entry((e.service_id, family(&addr)))
                    .or_default();
                table.owners.insert(
                    u32::from(e.slot),
                    Owner {
                        addr,
                        since_ns: e.since_ns,
                        current: false,
                        flags: e.flags,
                        left: 0,
                    },
                );
                table.by_addr.insert(addr, u32::from(e.slot));
                state.add_service(e.service_id);
            }
        }
        index
    }

    /// Brings service `service_id`'s slots to its current addresses
    /// (`current`: address → eligible; `gone`: the service is deleted, its
    /// slots go with it) and the pods of `pods` (address → pod now,
    /// `None`: no pod) up to date in the map.
    pub fn sync_service(
        &mut self,
        maps: &mut DnsMaps<'_>,
        service_id: u32,
        gone: bool,
        current: &BTreeMap<AddrKey, bool>,
        pods: impl IntoIterator<Item = (AddrKey, Option<u32>)>,
    ) -> Vec<WriteError> {
        let mut touched = self.set_pods(pods);
        let mut handed_over = BTreeSet::new();
        if gone {
            for fam in [4, 6] {
                if let Some(table) = self.tables.remove(&(service_id, fam)) {
                    for addr in table.by_addr.keys() {
                        self.forget(addr, service_id);
                        touched.insert(*addr);
                    }
                }
            }
        } else {
            self.plan(service_id, current, &mut touched, &mut handed_over);
        }
        // Addresses that gave a slot away lose it in the map before the
        // new holder's `since_ns` is read from the clock: a stamp the
        // kernel puts there for the old address is then older than it.
        let mut errors = Vec::new();
        let first: BTreeSet<AddrKey> = touched.difference(&handed_over).copied().collect();
        let mut changed = self.write(maps, &first, &mut errors);
        let now = monotonic_ns();
        // Only this service's tables hand slots out here (walking every
        // table made each event cost O(all endpoints)).
        for fam in [4, 6] {
            let Some(table) = self.tables.get_mut(&(service_id, fam)) else {
                continue;
            };
            for owner in table.owners.values_mut() {
                if owner.since_ns == PENDING {
                    owner.since_ns = now;
                }
            }
        }
        changed |= self.write(maps, &handed_over, &mut errors);
        if changed {
            bump_generation(maps.pod_addrs_gen, &mut errors);
        }
        errors
    }

    /// Drops the slots of every service `keep` says no to (deleted while
    /// no agent ran), and sets the pods of `pods`.
    pub fn retain_services(
        &mut self,
        maps: &mut DnsMaps<'_>,
        keep: impl Fn(u32) -> bool,
        pods: impl IntoIterator<Item = (AddrKey, Option<u32>)>,
    ) -> Vec<WriteError> {
        let mut touched = self.set_pods(pods);
        let gone: Vec<(u32, u16)> = self
            .tables
            .keys()
            .filter(|(id, _)| !keep(*id))
            .copied()
            .collect();
        for key in gone {
            if let Some(table) = self.tables.remove(&key) {
                for addr in table.by_addr.keys() {
                    self.forget(addr, key.0);
                    touched.insert(*addr);
                }
            }
        }
        let mut errors = Vec::new();
        if self.write(maps, &touched, &mut errors) {
            bump_generation(maps.pod_addrs_gen, &mut errors);
        }
        errors
    }

    fn set_pods(
        &mut self,
        pods: impl IntoIterator<Item = (AddrKey, Option<u32>)>,
    ) -> BTreeSet<AddrKey> {
        let mut touched = BTreeSet::new();
        for (addr, pod) in pods {
            let pod_id = pod.unwrap_or(NO_POD);
            let state = self.addrs.entry(addr).or_default();
            if state.pod_id != pod_id {
                state.pod_id = pod_id;
                touched.insert(addr);
            }
            self.tidy(&addr);
        }
        touched
    }

    fn forget(&mut self, addr: &AddrKey, service_id: u32) {
        if let Some(state) = self.addrs.get_mut(addr) {
            state.remove_service(service_id);
            self.tidy(addr);
        }
    }

    /// Drops the state of an address the index no longer knows anything of.
    fn tidy(&mut self, addr: &AddrKey) {
        if self.addrs.get(addr).is_some_and(AddrState::is_empty) {
            self.addrs.remove(addr);
        }
    }

    /// Marks who is current (and eligible), hands slots to new addresses;
    /// fills `touched` with every address whose entry changes, and
    /// `handed_over` with those that got a slot.
    fn plan(
        &mut self,
        service_id: u32,
        current: &BTreeMap<AddrKey, bool>,
        touched: &mut BTreeSet<AddrKey>,
        handed_over: &mut BTreeSet<AddrKey>,
    ) {
        for fam in [4u16, 6] {
            let wanted: Vec<AddrKey> = current
                .keys()
                .filter(|a| family(a) == fam)
                .copied()
                .collect();
            if wanted.is_empty() && !self.tables.contains_key(&(service_id, fam)) {
                continue;
            }
            let table = self.tables.entry((service_id, fam)).or_default();
            for owner in table.owners.values_mut() {
                let eligible = current.get(&owner.addr).copied();
                let now_current = eligible.is_some();
                if owner.current && !now_current {
                    self.departures += 1;
                    owner.left = self.departures;
                }
                owner.current = now_current;
                let flags = slot_flags(eligible);
                if owner.flags != flags {
                    owner.flags = flags;
                    touched.insert(owner.addr);
                }
            }
            let mut evicted = Vec::new();
            let mut added = Vec::new();
            for addr in &wanted {
                if table.by_addr.contains_key(addr) {
                    continue;
                }
                let flags = slot_flags(current.get(addr).copied());
                match table.allocate(*addr, wanted.len(), flags) {
                    Ok(old) => {
                        evicted.extend(old);
                        added.push(*addr);
                    }
                    Err(()) => tracing::warn!(
                        service_id,
                        "more than {MAX_SLOTS} addresses in one family: some are never learned from DNS"
                    ),
                }
            }
            for old in evicted {
                self.forget(&old, service_id);
                touched.insert(old);
            }
            for addr in added {
                self.addrs.entry(addr).or_default().add_service(service_id);
                touched.insert(addr);
                handed_over.insert(addr);
            }
        }
    }

    /// The entry `addr` should have, if any.
    fn value(&self, addr: &AddrKey) -> Option<AddrIndex> {
        let state = self.addrs.get(addr);
        let pod_id = state.map_or(NO_POD, |s| s.pod_id);
        let mut slots: Vec<(bool, u64, AddrSlot)> = state
            .into_iter()
            .flat_map(|s| s.services.iter())
            .filter_map(|id| {
                let table = self.tables.get(&(*id, family(addr)))?;
                let slot = *table.by_addr.get(addr)?;
                let owner = table.owners.get(&slot)?;
                Some((
                    owner.current,
                    owner.since_ns,
                    AddrSlot {
                        service_id: *id,
                        // Below `MAX_SLOTS`, which fits.
                        slot: slot as u16,
                        flags: owner.flags,
                        since_ns: owner.since_ns,
                    },
                ))
            })
            .collect();
        if slots.is_empty() && pod_id == NO_POD {
            return None;
        }
        // More services than an entry holds: current ones first, then the
        // most recently handed out.
        slots.sort_by_key(|s| std::cmp::Reverse((s.0, s.1)));
        let mut value = AddrIndex {
            pod_id,
            ..AddrIndex::default()
        };
        for (i, (_, _, slot)) in slots.into_iter().take(ADDR_MAX_SERVICES).enumerate() {
            value.slots[i] = slot;
            value.n = i as u32 + 1;
        }
        Some(value)
    }

    /// Writes the entries of `addrs` that differ; true if any did.
    /// Writes the entries of `addrs` that differ, in batches; true if any
    /// did.
    fn write(
        &mut self,
        maps: &mut DnsMaps<'_>,
        addrs: &BTreeSet<AddrKey>,
        errors: &mut Vec<WriteError>,
    ) -> bool {
        let mut upserts: (Vec<AddrKey>, Vec<AddrIndex>) = (Vec::new(), Vec::new());
        let mut removals = Vec::new();
        for addr in addrs {
            let want = self.value(addr);
            let written = self.addrs.get(addr).and_then(|s| s.written);
            if written == want.as_ref().map(index_print) {
                continue;
            }
            match want {
                Some(v) => {
                    upserts.0.push(*addr);
                    upserts.1.push(v);
                }
                None => removals.push(*addr),
            }
        }
        // The table's entries go first and come back after (see
        // `addr_table`): the kernel never finds one older than `dns_addrs`.
        let (upserts, removals) = withdraw(maps, upserts, removals, errors);
        let (keys, values) = &upserts;
        let written = write_batch(maps.dns_addrs, map_names::DNS_ADDRS, keys, values, errors);
        let removed = delete_batch(maps.dns_addrs, map_names::DNS_ADDRS, &removals, errors);
        let placed: Vec<(AddrKey, AddrIndex)> =
            written.iter().map(|i| (keys[*i], values[*i])).collect();
        if let Err(source) = maps.addr_table.place(&placed) {
            errors.push(table_error("write", source));
        }
        let changed = !(written.is_empty() && removed.is_empty());
        for i in written {
            self.addrs.entry(keys[i]).or_default().written = Some(index_print(&values[i]));
        }
        for i in removed {
            if let Some(state) = self.addrs.get_mut(&removals[i]) {
                state.written = None;
                self.tidy(&removals[i]);
            }
        }
        changed
    }
}

/// Takes the addresses about to change out of `addr_table`; returns
/// the upserts and removals that may go ahead (none if that failed).
fn withdraw(
    maps: &mut DnsMaps<'_>,
    upserts: (Vec<AddrKey>, Vec<AddrIndex>),
    removals: Vec<AddrKey>,
    errors: &mut Vec<WriteError>,
) -> ((Vec<AddrKey>, Vec<AddrIndex>), Vec<AddrKey>) {
    let all: Vec<AddrKey> = upserts.0.iter().chain(&removals).copied().collect();
    match maps.addr_table.withdraw(&all) {
        Ok(()) => (upserts, removals),
        Err(source) => {
            // Some entries may still be in the table: `dns_addrs` must not
            // change under entries the kernel may trust (retried later).
            errors.push(table_error("withdraw", source));
            ((Vec::new(), Vec::new()), Vec::new())
        }
    }
}

fn table_error(op: &'static str, source: MapError) -> WriteError {
    WriteError {
        object: None,
        op,
        map: map_names::ADDR_TABLE,
        source: Box::new(source),
    }
}

/// What client netns `netns_cookie` learned about `addr`, read the way
/// connect() reads it (`dns::observation` in the kernel): the newest stamp
/// among the address's slots that is not older than the slot's holder.
pub fn read_observation<T: Borrow<MapData>, U: Borrow<MapData>>(
    dns_obs: &HashMap<T, ObservationKey, ObservationPage>,
    dns_addrs: &HashMap<U, AddrKey, AddrIndex>,
    netns_cookie: u64,
    addr: &AddrKey,
) -> Option<Observation> {
    let index = dns_addrs.get(addr, 0).ok()?;
    let mut best: Option<Observation> = None;
    for e in index.slots.iter().take(index.n as usize) {
        let Ok(page) = dns_obs.get(&page_key(netns_cookie, e, addr), 0) else {
            continue;
        };
        let stamp = page.stamps[e.slot as usize % OBS_PAGE_SLOTS];
        let learned_ns = obs_time(stamp);
        if stamp == 0
            || learned_ns < obs_time(e.since_ns)
            || best.is_some_and(|b| learned_ns <= b.learned_ns)
        {
            continue;
        }
        best = Some(Observation {
            service_id: e.service_id,
            kind: obs_kind(stamp),
            learned_ns,
        });
    }
    best
}

/// Every address client netns `netns_cookie` learned something about.
pub fn observations_of<T: Borrow<MapData>, U: Borrow<MapData>>(
    dns_obs: &HashMap<T, ObservationKey, ObservationPage>,
    dns_addrs: &HashMap<U, AddrKey, AddrIndex>,
    netns_cookie: u64,
) -> Vec<(AddrKey, Observation)> {
    dns_addrs
        .keys()
        .filter_map(Result::ok)
        .filter_map(|addr| {
            read_observation(dns_obs, dns_addrs, netns_cookie, &addr).map(|o| (addr, o))
        })
        .collect()
}

/// Records "netns `netns_cookie` got `addr` from a name of kind `kind` of
/// service `service_id`, now", as the interceptor would. For tests and
/// tools: `addr` must have a slot in the service (`dns_addrs`).
pub fn stamp_observation<T: BorrowMut<MapData>, U: Borrow<MapData>>(
    dns_obs: &mut HashMap<T, ObservationKey, ObservationPage>,
    dns_addrs: &HashMap<U, AddrKey, AddrIndex>,
    netns_cookie: u64,
    addr: &AddrKey,
    service_id: u32,
    kind: u32,
) -> Result<(), MapError> {
    let index = dns_addrs.get(addr, 0)?;
    let e = index
        .slots
        .iter()
        .take(index.n as usize)
        .find(|e| e.service_id == service_id)
        .ok_or(MapError::KeyNotFound)?;
    let key = page_key(netns_cookie, e, addr);
    let mut page = dns_obs.get(&key, 0).unwrap_or_default();
    page.stamps[e.slot as usize % OBS_PAGE_SLOTS] = obs_stamp(monotonic_ns(), kind);
    dns_obs.insert(key, page, 0)
}

fn page_key(netns_cookie: u64, e: &AddrSlot, addr: &AddrKey) -> ObservationKey {
    ObservationKey {
        netns_cookie,
        service_id: e.service_id,
        family: family(addr),
        page: (e.slot as usize / OBS_PAGE_SLOTS) as u16,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(last: u8) -> AddrKey {
        AddrKey::from_v4_be(u32::from_ne_bytes([10, 0, 0, last]))
    }

    fn plan(index: &mut DnsIndex, service: u32, addrs: &[AddrKey]) -> BTreeSet<AddrKey> {
        let mut touched = BTreeSet::new();
        let mut handed = BTreeSet::new();
        index.plan(
            service,
            &addrs.iter().map(|a| (*a, true)).collect(),
            &mut touched,
            &mut handed,
        );
        for table in index.tables.values_mut() {
            for owner in table.owners.values_mut() {
                if owner.since_ns == PENDING {
                    owner.since_ns = 7;
                }
            }
        }
        touched
    }

    fn slot_of(index: &DnsIndex, service: u32, addr: AddrKey) -> Option<u32> {
        index.value(&addr).and_then(|v| {
            v.slots[..v.n as usize]
                .iter()
                .find(|s| s.service_id == service)
                .map(|s| u32::from(s.slot))
        })
    }

    fn flags_of(index: &DnsIndex, service: u32, addr: AddrKey) -> Option<u16> {
        index.value(&addr).and_then(|v| {
            v.slots[..v.n as usize]
                .iter()
                .find(|s| s.service_id == service)
                .map(|s| s.flags)
        })
    }

    #[test]
    fn a_slot_says_whether_its_address_is_an_eligible_endpoint_now() {
        use addr_slot_flags::{ELIGIBLE, KNOWN, MEMBER};
        let mut index = DnsIndex::default();
        let sync = |index: &mut DnsIndex, current: &[(AddrKey, bool)]| {
            let mut touched = BTreeSet::new();
            let mut handed = BTreeSet::new();
            index.plan(
                1,
                &current.iter().copied().collect(),
                &mut touched,
                &mut handed,
            );
            touched
        };
        sync(&mut index, &[(v4(1), true), (v4(2), false)]);
        assert_eq!(flags_of(&index, 1, v4(1)), Some(KNOWN | MEMBER | ELIGIBLE));
        assert_eq!(flags_of(&index, 1, v4(2)), Some(KNOWN | MEMBER));
        // v4(1) drained, v4(2) ready: both entries change.
        let touched = sync(&mut index, &[(v4(1), false), (v4(2), true)]);
        assert!(touched.contains(&v4(1)) && touched.contains(&v4(2)));
        assert_eq!(flags_of(&index, 1, v4(1)), Some(KNOWN | MEMBER));
        assert_eq!(flags_of(&index, 1, v4(2)), Some(KNOWN | MEMBER | ELIGIBLE));
        // v4(1) leaves the service: it keeps its slot, no longer a member.
        let touched = sync(&mut index, &[(v4(2), true)]);
        assert_eq!(touched, BTreeSet::from([v4(1)]));
        assert_eq!(flags_of(&index, 1, v4(1)), Some(KNOWN));
        // Nothing changes: nothing is touched.
        assert!(sync(&mut index, &[(v4(2), true)]).is_empty());
    }

    #[test]
    fn addresses_get_distinct_dense_slots() {
        let mut index = DnsIndex::default();
        let addrs: Vec<_> = (1..=16).map(v4).collect();
        plan(&mut index, 1, &addrs);
        let mut slots: Vec<_> = addrs
            .iter()
            .map(|a| slot_of(&index, 1, *a).unwrap())
            .collect();
        slots.sort();
        assert_eq!(slots, (0..16).collect::<Vec<_>>());
    }

    #[test]
    fn a_gone_address_keeps_its_slot_until_it_is_needed() {
        let mut index = DnsIndex::default();
        plan(&mut index, 1, &[v4(1), v4(2)]);
        let slot = slot_of(&index, 1, v4(1)).unwrap();
        // v4(1) leaves: still readable.
        plan(&mut index, 1, &[v4(2)]);
        assert_eq!(slot_of(&index, 1, v4(1)), Some(slot));
        // 62 new addresses fill the page's free slots; v4(1) still kept.
        let mut now: Vec<_> = (100..162).map(v4).collect();
        now.push(v4(2));
        plan(&mut index, 1, &now);
        assert_eq!(slot_of(&index, 1, v4(1)), Some(slot));
        // One more: the page is full of current addresses and the gone
        // one; with 64 current the limit is two pages, so a free slot of
        // the second page is used and v4(1) still stays.
        now.push(v4(200));
        let touched = plan(&mut index, 1, &now);
        assert!(!touched.contains(&v4(1)));
        assert_eq!(slot_of(&index, 1, v4(1)), Some(slot));
    }

    #[test]
    fn the_longest_gone_address_gives_its_slot_away_first() {
        let mut index = DnsIndex::default();
        let first: Vec<_> = (1..=64).map(v4).collect();
        plan(&mut index, 1, &first);
        // 1 goes, then 2: both kept.
        plan(&mut index, 1, &first[1..]);
        plan(&mut index, 1, &first[2..]);
        let slot1 = slot_of(&index, 1, v4(1)).unwrap();
        // 62 current + 2 new = 64: the limit is two pages, free slots there.
        let mut now: Vec<_> = first[2..].to_vec();
        now.extend([v4(201), v4(202)]);
        plan(&mut index, 1, &now);
        assert_eq!(slot_of(&index, 1, v4(1)), Some(slot1));
        // Shrink to 3 current: the limit is one page, all taken; the next
        // new address takes the slot of the longest gone one (v4(1)).
        let small = vec![v4(201), v4(202), v4(3)];
        plan(&mut index, 1, &small);
        let mut next = small.clone();
        next.push(v4(250));
        let touched = plan(&mut index, 1, &next);
        assert_eq!(slot_of(&index, 1, v4(250)), Some(slot1));
        assert_eq!(slot_of(&index, 1, v4(1)), None);
        assert!(touched.contains(&v4(1)) && touched.contains(&v4(250)));
    }

    #[test]
    fn an_address_in_two_services_has_a_slot_in_each() {
        let mut index = DnsIndex::default();
        plan(&mut index, 1, &[v4(1)]);
        plan(&mut index, 2, &[v4(9), v4(1)]);
        let v = index.value(&v4(1)).unwrap();
        assert_eq!(v.n, 2);
        assert!(slot_of(&index, 1, v4(1)).is_some());
        assert!(slot_of(&index, 2, v4(1)).is_some());
    }

    #[test]
    fn families_have_their_own_slots() {
        let mut index = DnsIndex::default();
        let v6 = AddrKey::from_v6_words([0xfd, 0, 0, 1]);
        plan(&mut index, 1, &[v4(1), v6]);
        assert_eq!(slot_of(&index, 1, v4(1)), Some(0));
        assert_eq!(slot_of(&index, 1, v6), Some(0));
    }
}
