//! `pod_addrs_gen`: the counter the agent bumps after every change of
//! `pod_addrs` or `dns_addrs`, telling the DNS interceptor that the pods and
//! slots it cached per answer may be stale. The agent is its only writer, so
//! it keeps the value: a bump is one map write, not a read and a write (two
//! per service at 10,000 services were ~2% of a full sync).
//!
//! Clones share the map and the value (the first sync writes `dns_addrs`
//! on a thread of its own): bumps from any of them are serialized, so the
//! counter only ever moves on.
use std::sync::{Arc, Mutex, PoisonError};

use aya::maps::{Array, MapData, MapError};

#[derive(Clone)]
pub struct Generation {
    inner: Arc<Mutex<Counter>>,
}

struct Counter {
    map: Array<MapData, u64>,
    /// The value last written, read from the map on the first bump.
    value: Option<u64>,
}

impl Generation {
    pub fn new(map: Array<MapData, u64>) -> Generation {
        Generation {
            inner: Arc::new(Mutex::new(Counter { map, value: None })),
        }
    }

    /// Moves the counter on by one.
    pub fn bump(&self) -> Result<(), MapError> {
        // A panic elsewhere while holding the lock left the value as it was.
        let mut counter = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let now = match counter.value {
            Some(value) => value,
            None => counter.map.get(&0, 0).unwrap_or(0),
        };
        let next = now.wrapping_add(1);
        counter.map.set(0, next, 0)?;
        counter.value = Some(next);
        Ok(())
    }
}
