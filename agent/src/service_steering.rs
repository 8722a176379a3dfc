//! The agent's side of `svc_steering`: for each service id, the fields of
//! its `services` entry that connect() needs and, when they fit, the ports
//! it declares and the first slots of its IPv4 choice tables
//! ([`ServiceSteering`]), in an array the verifier reads inline (a hash
//! lookup in `services` cost 30-100 ns per steered connect here, one in
//! `svc_ports` ~60 ns, one in `svc_backends` up to ~100 ns).
//!
//! `services` stays the record of a service (names for `status`); this
//! array follows it: an entry is written right after the service's, and
//! emptied (`live` 0) right before it is deleted. When the agent starts,
//! the array is written anew from `services` before any program is
//! attached, so it never disagrees with what an older agent left there.
//!
//! An array entry is updated in place, so connect() may read one half
//! written (a hash map swaps whole values). That is harmless: each field
//! is a whole u32, and any mix of a service's old and new fields points at
//! slots of that service's choice tables, which are written before the
//! entry and removed after it, or past them (the hook then fails open). A
//! mix of old and new ports decides one connection's port check either
//! way during a change of the service's ports: it goes to the address
//! asked for or to a pod of the service, both live. The inline slots are
//! the exception, as an address mixed from two slots could be nobody's:
//! they carry a check over themselves and the IPv4 table sizes, and a
//! reader that finds it wrong reads `svc_backends` instead. They are
//! written with the tables they copy (after the slots, before the slots
//! past the new sizes go), so they are never newer than `svc_backends`.
//!
//! The array is derived whole from other maps, so a new agent whose
//! layout of it differs replaces the pinned one (`pinned::DERIVED`).
use std::{
    borrow::Borrow,
    collections::{BTreeMap, BTreeSet},
    os::fd::AsFd,
};

use aya::{
    Ebpf,
    maps::{Array, HashMap, IterableMap, MapData, MapError},
};
use headway_common::{
    Backend, BackendKey, STEERING_BACKENDS, ServiceMeta, ServicePortKey, ServiceSteering, map_names,
};

use crate::bpf_sys::{self, BatchError};

/// Writes `entries` (service id, steering) with one batched update (on an
/// error, the entries before the refused one went through).
pub fn write<T: Borrow<MapData>>(
    map: &Array<T, ServiceSteering>,
    entries: &[(u32, ServiceSteering)],
) -> Result<(), BatchError> {
    let ids: Vec<u32> = entries.iter().map(|(id, _)| *id).collect();
    let values: Vec<ServiceSteering> = entries.iter().map(|(_, s)| *s).collect();
    bpf_sys::map_update_batch(map.map().fd().as_fd(), &ids, &values)
}

/// The ports of service `service_id` among the `svc_ports` keys `ports`.
pub fn ports_of(
    ports: &BTreeSet<ServicePortKey>,
    service_id: u32,
) -> impl Iterator<Item = ServicePortKey> + '_ {
    let from = ServicePortKey {
        service_id,
        ..ServicePortKey::default()
    };
    ports
        .range(from..)
        .copied()
        .take_while(move |k| k.service_id == service_id)
}

/// Slots 0, 1, ... of service `id`'s IPv4 choice tables as `backend` has
/// them, as many as `svc_steering` carries (up to the first missing one).
pub fn first_v4_slots(
    id: u32,
    backend: impl Fn(&BackendKey) -> Option<Backend>,
) -> impl Iterator<Item = Backend> {
    (0..STEERING_BACKENDS as u32).map_while(move |slot| {
        backend(&BackendKey {
            service_id: id,
            family: 4,
            slot,
        })
    })
}

/// Writes every entry of a freshly loaded object's `svc_steering` from
/// the `services`, `svc_ports` and `svc_backends` it took over from pins
/// (an id without a service gets an empty entry), before any program is
/// attached.
pub fn fill_before_attach(ebpf: &mut Ebpf) -> Result<(), FillError> {
    let services: Vec<(u32, ServiceMeta)> = match ebpf.map(map_names::SERVICES) {
        Some(map) => HashMap::<_, u32, ServiceMeta>::try_from(map)?
            .iter()
            .filter_map(Result::ok)
            .collect(),
        None => Vec::new(),
    };
    let ports: BTreeSet<ServicePortKey> = match ebpf.map(map_names::SVC_PORTS) {
        Some(map) => HashMap::<_, ServicePortKey, u32>::try_from(map)?
            .keys()
            .filter_map(Result::ok)
            .collect(),
        None => BTreeSet::new(),
    };
    let slots: BTreeMap<BackendKey, Backend> = match ebpf.map(map_names::SVC_BACKENDS) {
        Some(map) => HashMap::<_, BackendKey, Backend>::try_from(map)?
            .iter()
            .filter_map(Result::ok)
            .filter(|(k, _)| k.family == 4 && (k.slot as usize) < STEERING_BACKENDS)
            .collect(),
        None => BTreeMap::new(),
    };
    let map = ebpf
        .map_mut(map_names::SVC_STEERING)
        .ok_or(FillError::NoMap)?;
    let array = Array::<_, ServiceSteering>::try_from(map)?;
    let mut entries: Vec<(u32, ServiceSteering)> = (0..array.len())
        .map(|id| (id, ServiceSteering::default()))
        .collect();
    for (id, meta) in services {
        if let Some(entry) = entries.get_mut(id as usize) {
            entry.1 = ServiceSteering::of(&meta)
                .with_ports(ports_of(&ports, id))
                .with_backends(first_v4_slots(id, |k| slots.get(k).copied()));
        }
    }
    write(&array, &entries).map_err(|e| FillError::Write { source: e.error })
}

#[derive(Debug, thiserror::Error)]
pub enum FillError {
    #[error("the kernel object has no map {}", map_names::SVC_STEERING)]
    NoMap,
    #[error(transparent)]
    Map(#[from] MapError),
    #[error("cannot write {map}: {source}", map = map_names::SVC_STEERING)]
    Write {
        #[source]
        source: std::io::Error,
    },
}
