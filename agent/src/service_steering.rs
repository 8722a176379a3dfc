//! The agent's side of `svc_steering`: for each service id, the fields of
//! its `services` entry that connect() needs and, when they fit, the ports
//! it declares ([`ServiceSteering`]), in an array the verifier reads inline
//! (a hash lookup in `services` cost 30-100 ns per steered connect here,
//! one in `svc_ports` ~60 ns).
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
//! asked for or to a pod of the service, both live.
//!
//! The array is derived whole from other maps, so a new agent whose
//! layout of it differs replaces the pinned one (`pinned::DERIVED`).
use std::{borrow::Borrow, collections::BTreeMap, os::fd::AsFd};

use aya::{
    Ebpf,
    maps::{Array, HashMap, IterableMap, MapData, MapError},
};
use headway_common::{ServiceMeta, ServicePortKey, ServiceSteering, map_names};

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

/// Writes every entry of a freshly loaded object's `svc_steering` from
/// the `services` and `svc_ports` it took over from pins (an id without a
/// service gets an empty entry), before any program is attached.
pub fn fill_before_attach(ebpf: &mut Ebpf) -> Result<(), FillError> {
    let services: Vec<(u32, ServiceMeta)> = match ebpf.map(map_names::SERVICES) {
        Some(map) => HashMap::<_, u32, ServiceMeta>::try_from(map)?
            .iter()
            .filter_map(Result::ok)
            .collect(),
        None => Vec::new(),
    };
    let mut ports: BTreeMap<u32, Vec<ServicePortKey>> = BTreeMap::new();
    if let Some(map) = ebpf.map(map_names::SVC_PORTS) {
        for (key, _) in HashMap::<_, ServicePortKey, u32>::try_from(map)?
            .iter()
            .filter_map(Result::ok)
        {
            ports.entry(key.service_id).or_default().push(key);
        }
    }
    let map = ebpf
        .map_mut(map_names::SVC_STEERING)
        .ok_or(FillError::NoMap)?;
    let array = Array::<_, ServiceSteering>::try_from(map)?;
    let mut entries: Vec<(u32, ServiceSteering)> = (0..array.len())
        .map(|id| (id, ServiceSteering::default()))
        .collect();
    for (id, meta) in services {
        if let Some(entry) = entries.get_mut(id as usize) {
            let mut declared = ports.remove(&id).unwrap_or_default();
            declared.sort();
            entry.1 = ServiceSteering::of(&meta).with_ports(declared);
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
