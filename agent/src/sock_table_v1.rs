//! The socket table as agents before `sock_table` kept it
//! (`headway_common::sock_table_v1`): three maps, `sock_cookies`,
//! `sock_records` and `sock_spills`. When this agent finds them pinned, it
//! hands them to its programs, which move each record into `sock_table`
//! the next time its socket is seen (the kernel side's `sock_table_v1`), so
//! an upgrade loses no live socket's steering or counts. Once no record is
//! left in them, the agent removes their pins; until then each agent that
//! starts hands them on.
use std::path::Path;

use aya::maps::{Array, Map, MapData, MapType};
use headway_common::{map_names::legacy, sock_table_v1};

use crate::pinned::{self, PinnedError};

/// The older table's size, as pinned (the other two maps' sizes follow
/// from it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OlderTable {
    /// Entries of `sock_cookies` (its mask goes to the programs).
    pub buckets: u32,
}

impl OlderTable {
    /// Each map's name and entries (the loader reuses the pins).
    pub fn maps(&self) -> [(&'static str, u32); 3] {
        [
            (legacy::SOCK_COOKIES, self.buckets),
            (
                legacy::SOCK_RECORDS,
                self.buckets * sock_table_v1::BUCKET_SLOTS,
            ),
            (
                legacy::SOCK_SPILLS,
                self.buckets / sock_table_v1::HOMES_PER_SPILL_COUNT,
            ),
        ]
    }
}

/// The older table pinned under `bpffs`, if there is one. All three maps
/// or none, each with the layout older agents gave it; anything else is
/// refused as an incompatible layout (`headway reset` starts over).
pub fn find_pinned(bpffs: &Path) -> Result<Option<OlderTable>, PinnedError> {
    let pinned: Vec<bool> = legacy::ALL
        .iter()
        .map(|name| pinned::map_pin(bpffs, name).exists())
        .collect();
    if pinned.iter().all(|p| !p) {
        return Ok(None);
    }
    let value_sizes = [
        size_of::<sock_table_v1::SockBucket>() as u32,
        size_of::<sock_table_v1::SocketState>() as u32,
        size_of::<u32>() as u32,
    ];
    let mut entries = [0u32; 3];
    for (i, name) in legacy::ALL.iter().enumerate() {
        let path = pinned::map_pin(bpffs, name);
        let incompatible = |found: String| PinnedError::Incompatible {
            path: path.clone(),
            found,
            expected: format!("Array, key 4 B, value {} B", value_sizes[i]),
        };
        if !pinned[i] {
            return Err(incompatible(
                "missing (the older socket table is incomplete)".into(),
            ));
        }
        let info = pinned::pinned_info(&path)?;
        let map_type = info.map_type().map_err(|source| PinnedError::Open {
            path: path.clone(),
            source,
        })?;
        if map_type != MapType::Array || info.key_size() != 4 || info.value_size() != value_sizes[i]
        {
            return Err(incompatible(format!(
                "{map_type:?}, key {} B, value {} B",
                info.key_size(),
                info.value_size()
            )));
        }
        entries[i] = info.max_entries();
    }
    let table = OlderTable {
        buckets: entries[0],
    };
    let consistent =
        table.buckets.is_power_of_two() && table.maps().iter().map(|(_, n)| *n).eq(entries);
    if !consistent {
        let [buckets, records, spill_counts] = entries;
        return Err(PinnedError::Incompatible {
            path: pinned::map_pin(bpffs, legacy::SOCK_COOKIES),
            found: format!("{buckets} buckets, {records} records, {spill_counts} spill counts"),
            expected: "a power of two of buckets, 8 records each, a spill count per 4".into(),
        });
    }
    Ok(Some(table))
}

/// Sockets that still have a record in the older table pinned under
/// `bpffs` (0 when it is not pinned). A slot being written counts.
pub fn records_left(bpffs: &Path) -> Result<u64, PinnedError> {
    let path = pinned::map_pin(bpffs, legacy::SOCK_COOKIES);
    if !path.exists() {
        return Ok(0);
    }
    let data = pinned::open_map(&path)?;
    let read_err = |source| PinnedError::Read {
        name: legacy::SOCK_COOKIES,
        source,
    };
    let cookies: Array<MapData, sock_table_v1::SockBucket> =
        Array::try_from(Map::Array(data)).map_err(read_err)?;
    let mut left = 0;
    for bucket in cookies.iter() {
        let bucket = bucket.map_err(read_err)?;
        left += bucket.cookies.iter().filter(|c| **c != 0).count() as u64;
    }
    Ok(left)
}
