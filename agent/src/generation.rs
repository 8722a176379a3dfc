//! `pod_addrs_gen`: the counter the agent bumps after every change of
//! `pod_addrs` or `dns_addrs`, telling the DNS interceptor that the pods and
//! slots it cached per answer may be stale. The agent is its only writer, so
//! it keeps the value: a bump is one map write, not a read and a write (two
//! per service at 10,000 services were ~2% of a full sync).
use aya::maps::{Array, MapData, MapError};

pub struct Generation {
    map: Array<MapData, u64>,
    /// The value last written, read from the map on the first bump.
    value: Option<u64>,
}

impl Generation {
    pub fn new(map: Array<MapData, u64>) -> Generation {
        Generation { map, value: None }
    }

    /// Moves the counter on by one.
    pub fn bump(&mut self) -> Result<(), MapError> {
        let now = match self.value {
            Some(value) => value,
            None => self.map.get(&0, 0).unwrap_or(0),
        };
        let next = now.wrapping_add(1);
        self.map.set(0, next, 0)?;
        self.value = Some(next);
        Ok(())
    }
}
