//! The incremental writer on real pinned maps: per-service updates touch
//! only that service, shared pods stay while any service lists them,
//! 10,000 create/delete cycles leave nothing behind (entries or ids), and
//! a new agent on the same maps writes only what differs.
//!
//! Privileged: loads the programs (attached to a cgroup the test creates;
//! no traffic).
use headway::{
    datapath::Datapath,
    map_plan::{self, Ids, MapContents, PlanSettings},
    model::{
        DesiredState, Endpoint, PodKey, Policy, ServiceKey, ServicePort, ServiceSpec, Topology,
    },
    pinned::{MapSizes, Maps, pinned_max_entries},
    reconcile::Reconciler,
};
use headway_testbed::{Cgroup, agent::Bpffs, require_root};

fn settings() -> PlanSettings {
    PlanSettings {
        default_policy: Policy::Failover,
        cluster_domain: "cluster.local".into(),
        node_name: None,
        zone: None,
    }
}

fn spec(name: &str, endpoints: &[(&str, &str)]) -> ServiceSpec {
    ServiceSpec {
        key: ServiceKey::new("ns", name),
        policy: None,
        topology: Topology::None,
        ports: vec![],
        publish_not_ready: false,
        endpoints: endpoints
            .iter()
            .map(|(addr, pod)| {
                let ep = Endpoint {
                    addr: addr.parse().unwrap(),
                    pod: Some(PodKey::new("ns", *pod)),
                    hostname: None,
                    node_name: None,
                    zone: None,
                    ready: true,
                    serving: true,
                    terminating: false,
                    drained: false,
                    weight: 100,
                };
                (ep.addr, ep)
            })
            .collect(),
    }
}

/// Declared ports (port, protocol), unnamed.
fn ports(list: &[(u16, &str)]) -> Vec<ServicePort> {
    list.iter()
        .map(|(port, protocol)| ServicePort {
            name: None,
            port: *port,
            protocol: (*protocol).into(),
        })
        .collect()
}

fn state(specs: &[&ServiceSpec]) -> DesiredState {
    DesiredState {
        services: specs
            .iter()
            .map(|s| (s.key.clone(), (*s).clone()))
            .collect(),
    }
}

fn contents(bpffs: &Bpffs) -> MapContents {
    Maps::open_pinned(bpffs.path())
        .unwrap()
        .read_contents()
        .unwrap()
}

/// What a from-scratch full plan of `desired` would write, with the ids
/// the maps hold now.
fn planned(bpffs: &Bpffs, desired: &DesiredState) -> MapContents {
    let mut ids = Ids::from_contents(&contents(bpffs));
    map_plan::plan(desired, &settings(), &mut ids)
}

#[test]
fn incremental_writes_match_a_full_plan_and_leave_nothing_behind() {
    if !require_root("incremental_writes_match_a_full_plan_and_leave_nothing_behind") {
        return;
    }
    let bpffs = Bpffs::new().unwrap();
    let cg = Cgroup::new("reconcile").unwrap();
    let mut datapath = Datapath::start(bpffs.path(), cg.path()).unwrap();
    let mut rec = Reconciler::new(datapath.take_maps().unwrap(), settings(), vec![]).unwrap();

    // Two services share pod `both` (one address in each).
    let db = spec("db", &[("10.0.0.1", "db-0"), ("10.0.0.9", "both")]);
    let web = spec("web", &[("10.0.1.1", "web-0"), ("10.0.0.9", "both")]);
    let w = rec.full_sync(&state(&[&db, &web]));
    assert!(w.errors.is_empty(), "{:?}", w.errors);
    let now = contents(&bpffs);
    assert_eq!(now, planned(&bpffs, &state(&[&db, &web])));
    assert_eq!(now.pods.len(), 3);

    // db goes: its own entries go, the shared pod and address stay.
    let w = rec.update_service(&db.key, None);
    assert!(w.errors.is_empty());
    let now = contents(&bpffs);
    assert_eq!(now, planned(&bpffs, &state(&[&web])));
    assert_eq!(now.pods.len(), 2, "both and web-0 remain: {:?}", now.pods);
    assert_eq!(now.services.len(), 1);

    // An unchanged update writes nothing.
    let w = rec.update_service(&web.key, Some(&web));
    assert_eq!((w.summary.upserted, w.summary.removed), (0, 0));

    // 10,000 create/delete cycles of a three-pod service: no entry and no
    // id leaks (the service comes back with the same ids every time).
    let churn = spec(
        "churn",
        &[
            ("10.0.2.1", "c-0"),
            ("10.0.2.2", "c-1"),
            ("10.0.2.3", "c-2"),
        ],
    );
    let baseline = contents(&bpffs);
    let mut first_ids = None;
    for i in 0..10_000 {
        let w = rec.update_service(&churn.key, Some(&churn));
        assert!(w.errors.is_empty(), "cycle {i}: {:?}", w.errors);
        if i == 0 || i == 9_999 {
            let now = contents(&bpffs);
            let ids: (Vec<u32>, Vec<u32>) = (
                now.services.keys().copied().collect(),
                now.pods.keys().copied().collect(),
            );
            match &first_ids {
                None => first_ids = Some(ids),
                Some(first) => assert_eq!(&ids, first, "ids drift after {i} cycles"),
            }
        }
        let w = rec.update_service(&churn.key, None);
        assert!(w.errors.is_empty(), "cycle {i}: {:?}", w.errors);
    }
    assert_eq!(
        contents(&bpffs),
        baseline,
        "nothing left of the churned service"
    );
    drop(rec);

    // A new agent on the same maps: the same state writes nothing; a
    // changed one writes only the difference, and entries of services it
    // no longer has are swept.
    let extra = spec("extra", &[("10.0.3.1", "x-0")]);
    let mut rec =
        Reconciler::new(Maps::open_pinned(bpffs.path()).unwrap(), settings(), vec![]).unwrap();
    rec.update_service(&extra.key, Some(&extra));
    drop(rec);
    let before = contents(&bpffs);
    let mut rec =
        Reconciler::new(Maps::open_pinned(bpffs.path()).unwrap(), settings(), vec![]).unwrap();
    let w = rec.full_sync(&state(&[&web, &extra]));
    assert_eq!(
        (w.summary.upserted, w.summary.removed),
        (0, 0),
        "restart with nothing changed"
    );
    assert_eq!(contents(&bpffs), before);
    drop(rec);
    let mut rec =
        Reconciler::new(Maps::open_pinned(bpffs.path()).unwrap(), settings(), vec![]).unwrap();
    let w = rec.full_sync(&state(&[&web]));
    assert!(w.errors.is_empty());
    // Everything of `extra` goes (service, endpoint, backend slot, pod,
    // address, names); nothing of `web` is rewritten.
    let after = contents(&bpffs);
    assert_eq!(after, planned(&bpffs, &state(&[&web])));
    let removed: usize = before.len() - after.len();
    assert_eq!(w.summary.removed, removed);
    assert_eq!(w.summary.upserted, 0);
    drop(datapath);
}

#[test]
fn a_full_map_refuses_new_entries_and_existing_ones_keep_working() {
    if !require_root("a_full_map_refuses_new_entries_and_existing_ones_keep_working") {
        return;
    }
    let bpffs = Bpffs::new().unwrap();
    let cg = Cgroup::new("reconcile-full").unwrap();
    // Small maps (--max-endpoints 1024 --max-services 64), so the test
    // fills them quickly; the defaults hold 65,536 endpoints.
    assert!(MapSizes::default().max_endpoints >= 65_536);
    let sizes = MapSizes {
        max_endpoints: 1024,
        max_services: 64,
        ..MapSizes::default()
    };
    let mut datapath = Datapath::start_with_sizes(bpffs.path(), cg.path(), &sizes).unwrap();
    for (map, n) in [
        ("pod_addrs", 1024),
        ("svc_endpoints", 2048),
        ("dns_names", 4096),
        ("services", 64),
        ("pod_stats", 1024),
        ("pod_dns_answers", 1024),
    ] {
        assert_eq!(pinned_max_entries(bpffs.path(), map), Some(n), "{map}");
    }
    let mut rec = Reconciler::new(datapath.take_maps().unwrap(), settings(), vec![]).unwrap();
    let mut small = spec("small", &[("10.9.0.1", "small-0")]);
    assert!(rec.full_sync(&state(&[&small])).errors.is_empty());

    // More pods and addresses than the maps hold.
    let capacity = sizes.max_endpoints as usize;
    let addrs: Vec<(String, String)> = (0..capacity + 100)
        .map(|i| {
            (
                format!("10.{}.{}.{}", 20 + i / 65_536, (i / 256) % 256, i % 256),
                format!("big-{i}"),
            )
        })
        .collect();
    let refs: Vec<(&str, &str)> = addrs
        .iter()
        .map(|(a, p)| (a.as_str(), p.as_str()))
        .collect();
    let big = spec("big", &refs);
    let w = rec.update_service(&big.key, Some(&big));
    assert!(!w.errors.is_empty(), "some entries must be refused");
    assert!(
        w.errors.iter().all(|e| e.is_full()),
        "only 'full' errors: {:?}",
        w.errors.iter().find(|e| !e.is_full())
    );
    // Each refusal names the object it was for, so the log can say which.
    let object = format!("Service {}", big.key);
    assert!(
        w.errors
            .iter()
            .all(|e| e.object.as_deref() == Some(object.as_str())),
        "{:?}",
        w.errors.first()
    );
    let now = contents(&bpffs);
    assert_eq!(
        now.pod_addrs.len(),
        capacity,
        "pod_addrs filled to capacity"
    );

    // An existing entry still updates: small-0 becomes not ready.
    small.endpoints.values_mut().next().unwrap().ready = false;
    let w = rec.update_service(&small.key, Some(&small));
    assert!(w.errors.is_empty(), "{:?}", w.errors);
    let small_id = now
        .services
        .iter()
        .find(|(_, m)| headway::map_plan::decode_name(&m.name) == "small")
        .map(|(id, _)| *id)
        .unwrap();
    let flags = contents(&bpffs)
        .svc_endpoints
        .iter()
        .find(|(k, _)| k.service_id == small_id)
        .map(|(_, v)| v.flags)
        .unwrap();
    assert_eq!(flags & headway_common::endpoint_flags::READY, 0);

    // Once `big` goes, there is room again and nothing of it is left.
    let w = rec.update_service(&big.key, None);
    assert!(w.errors.is_empty(), "{:?}", w.errors.first());
    let after = contents(&bpffs);
    assert_eq!(after, planned(&bpffs, &state(&[&small])));
    drop(datapath);

    // Loading with other sizes over these pins is refused, clearly.
    let err = Datapath::start(bpffs.path(), cg.path())
        .err()
        .expect("other sizes must be refused")
        .to_string();
    assert!(err.contains("headway reset"), "{err}");
    // ... and leaves every pin as it was, the derived ones too (they are
    // replaced only by a start that goes ahead).
    assert_eq!(
        pinned_max_entries(bpffs.path(), "svc_steering"),
        Some(64),
        "svc_steering kept"
    );
}

/// The connect hooks' fast path skips every address the filter does not
/// hold (`addr_bits`), so it must hold every synced address at all times:
/// after a sync, after a restart over the same pins (rewritten from them,
/// dropping addresses gone meanwhile), and after an upgrade from a build
/// that pinned no such filter, before the new programs are attached.
#[test]
fn address_filter_holds_every_synced_address_across_restarts() {
    if !require_root("address_filter_holds_every_synced_address_across_restarts") {
        return;
    }
    let bpffs = Bpffs::new().unwrap();
    let cg = Cgroup::new("reconcile-filter").unwrap();
    let key = |a: &str| headway::map_plan::addr_key(a.parse().unwrap());
    let held = |addr: &str| {
        let maps = Maps::open_pinned(bpffs.path()).unwrap();
        maps.addr_filter.may_hold(&key(addr)).unwrap()
    };
    let db = spec("db", &[("10.3.0.1", "db-0"), ("fd00:3::1", "db-1")]);
    {
        let mut datapath = Datapath::start(bpffs.path(), cg.path()).unwrap();
        let mut rec = Reconciler::new(datapath.take_maps().unwrap(), settings(), vec![]).unwrap();
        assert!(!held("10.3.0.1"), "nothing is held before the first sync");
        assert!(rec.full_sync(&state(&[&db])).errors.is_empty());
        assert!(held("10.3.0.1") && held("fd00:3::1"));
    }

    // An upgrade from a build without the filter: its pin is gone, the
    // address maps are there. The new datapath fills it from them before
    // attaching, with no writer running yet.
    let pin = bpffs.path().join("headway").join("addr_bits");
    std::fs::remove_file(&pin).unwrap();
    let datapath = Datapath::start(bpffs.path(), cg.path()).unwrap();
    assert!(held("10.3.0.1") && held("fd00:3::1"));
    drop(datapath);

    // A pod gone while no agent ran: the next agent's filter drops it
    // (unless another address shares both its bits: check a few words'
    // worth of strangers stay out, as a sanity check of the rewrite).
    let gone = "10.3.0.1";
    {
        let mut maps = Maps::open_pinned(bpffs.path()).unwrap();
        maps.pod_addrs.remove(&key(gone)).unwrap();
        maps.dns_addrs.remove(&key(gone)).unwrap();
    }
    let _datapath = Datapath::start(bpffs.path(), cg.path()).unwrap();
    assert!(held("fd00:3::1"));
    let (word, mask) = headway_common::addr_filter::bits(&key(gone));
    let (other_word, other_mask) = headway_common::addr_filter::bits(&key("fd00:3::1"));
    if word != other_word || mask & other_mask != mask {
        assert!(!held(gone), "{gone} left the filter");
    }
}

fn pinned_table(
    bpffs: &Bpffs,
) -> aya::maps::Array<aya::maps::MapData, headway_common::AddrTableEntry> {
    let pin = headway::pinned::map_pin(bpffs.path(), headway_common::map_names::ADDR_TABLE);
    let data = aya::maps::MapData::from_pin(pin).unwrap();
    aya::maps::Array::try_from(aya::maps::Map::Array(data)).unwrap()
}

/// Checks `addr_table` against `dns_addrs` the way the kernel reads
/// it: every entry it holds is whole, at one of its address's positions,
/// and says exactly what `dns_addrs` says; returns how many addresses of
/// `dns_addrs` it holds.
fn table_matches_dns_addrs(bpffs: &Bpffs) -> usize {
    use headway_common::{AddrIndex, AddrKey, addr_table};
    let maps = Maps::open_pinned(bpffs.path()).unwrap();
    let dns_addrs: std::collections::BTreeMap<AddrKey, AddrIndex> =
        maps.dns_addrs.iter().map(Result::unwrap).collect();
    let table = pinned_table(bpffs);
    let mut held = 0;
    for (position, entry) in table.iter().enumerate() {
        let entry = entry.unwrap();
        if entry.check == 0 {
            continue;
        }
        assert_eq!(addr_table::check(&entry.line()), entry.check);
        assert_eq!(
            addr_table::since_check(entry.check, &entry.since_ns),
            entry.since_check
        );
        let home = addr_table::home(&entry.addr);
        assert!(
            (0..addr_table::PROBES).any(|p| addr_table::position(home, p) == position as u32),
            "{:?} at {position}, not one of its positions",
            entry.addr
        );
        let index = dns_addrs
            .get(&entry.addr)
            .unwrap_or_else(|| panic!("{:?} is in the table, not in dns_addrs", entry.addr));
        assert_eq!(
            entry,
            headway::addr_table::entry(&entry.addr, index),
            "the table says other than dns_addrs"
        );
        held += 1;
    }
    held
}

/// Checks that every slot of `dns_addrs` says what `svc_endpoints` says
/// of its address in its service (connect() reads the flags instead), and
/// that `svc_steering` says what `services` and `svc_ports` say, id by id
/// (empty where there is no service).
fn slot_flags_and_steering_match(bpffs: &Bpffs) {
    use headway_common::{ServiceEndpointKey, ServiceSteering, addr_slot_flags, endpoint_flags};
    let maps = Maps::open_pinned(bpffs.path()).unwrap();
    for item in maps.dns_addrs.iter() {
        let (addr, index) = item.unwrap();
        for slot in &index.slots[..index.n as usize] {
            let key = ServiceEndpointKey {
                service_id: slot.service_id,
                _pad: 0,
                addr,
            };
            let want = match maps.svc_endpoints.get(&key, 0) {
                Ok(ep) if ep.flags & endpoint_flags::ELIGIBLE != 0 => {
                    addr_slot_flags::KNOWN | addr_slot_flags::MEMBER | addr_slot_flags::ELIGIBLE
                }
                Ok(_) => addr_slot_flags::KNOWN | addr_slot_flags::MEMBER,
                Err(_) => addr_slot_flags::KNOWN,
            };
            assert_eq!(slot.flags, want, "{addr:?} in service {}", slot.service_id);
        }
    }
    let mut ports: Vec<headway_common::ServicePortKey> =
        maps.svc_ports.keys().map(Result::unwrap).collect();
    ports.sort();
    let backends: std::collections::BTreeMap<_, _> =
        maps.svc_backends.iter().map(Result::unwrap).collect();
    let mut inline = 0;
    for id in 0..maps.svc_steering.len() {
        let declared = ports.iter().filter(|k| k.service_id == id).copied();
        let slots = (0..headway_common::STEERING_BACKENDS as u32).map_while(|slot| {
            let key = headway_common::BackendKey {
                service_id: id,
                family: 4,
                slot,
            };
            backends.get(&key).copied()
        });
        let want = maps
            .services
            .get(&id, 0)
            .map(|meta| {
                ServiceSteering::of(&meta)
                    .with_ports(declared)
                    .with_backends(slots)
            })
            .unwrap_or_default();
        inline += want.backends.iter().filter(|w| **w != 0).count();
        assert_eq!(
            maps.svc_steering.get(&id, 0).unwrap(),
            want,
            "service id {id}"
        );
    }
    if maps.services.keys().next().is_some() {
        assert!(inline > 0, "some IPv4 slots are inline");
    }
}

/// `addr_table` (the interceptor's inline copy of `dns_addrs`) says
/// what `dns_addrs` says after a full sync, after incremental changes of
/// endpoints, pods and services, and after a restart, including over a
/// table a previous agent left stale.
#[test]
fn addr_table_matches_dns_addrs_through_syncs_and_restarts() {
    if !require_root("addr_table_matches_dns_addrs_through_syncs_and_restarts") {
        return;
    }
    let bpffs = Bpffs::new().unwrap();
    let cg = Cgroup::new("reconcile-table").unwrap();
    // db's two ports fit in its steering entry; web's nine do not.
    let mut db = spec("db", &[("10.4.0.1", "db-0"), ("fd00:4::1", "db-1")]);
    db.ports = ports(&[(5432, "TCP"), (53, "UDP")]);
    let mut web = spec("web", &[("10.4.1.1", "web-0"), ("10.4.0.1", "db-0")]);
    web.ports = ports(&[(8080, "TCP"); 9]);
    for (i, port) in web.ports.iter_mut().enumerate() {
        port.port += i as u16;
    }
    let dns_addrs_len = || {
        Maps::open_pinned(bpffs.path())
            .unwrap()
            .dns_addrs
            .keys()
            .count()
    };
    {
        let mut datapath = Datapath::start(bpffs.path(), cg.path()).unwrap();
        let mut rec = Reconciler::new(datapath.take_maps().unwrap(), settings(), vec![]).unwrap();
        assert!(rec.full_sync(&state(&[&db, &web])).errors.is_empty());
        assert_eq!(table_matches_dns_addrs(&bpffs), 3);
        assert_eq!(dns_addrs_len(), 3);
        slot_flags_and_steering_match(&bpffs);
        // Both kinds are there: ports inline (db), and too many (web).
        let inline: Vec<[u32; 2]> = {
            let maps = Maps::open_pinned(bpffs.path()).unwrap();
            let mut seen: Vec<[u32; 2]> = maps
                .services
                .keys()
                .map(|id| {
                    let steering = maps.svc_steering.get(&id.unwrap(), 0).unwrap();
                    assert_ne!(steering.flags & service_flags::PORTS_DECLARED, 0);
                    [steering.ports[0], steering.ports[1]]
                })
                .collect();
            seen.sort();
            seen
        };
        use headway_common::{port_word, service_flags};
        assert_eq!(inline, [[0, 0], [port_word(53, 17), port_word(5432, 6)]]);

        // An endpoint leaves web (its slot stays: the entry changes), a
        // new one comes, an address moves to another pod.
        // web's ports go down to two (now inline), db's change.
        let mut web2 = spec("web", &[("10.4.1.2", "web-1"), ("10.4.0.1", "db-0")]);
        web2.ports = ports(&[(8080, "TCP"), (8443, "TCP")]);
        assert!(rec.update_service(&web.key, Some(&web2)).errors.is_empty());
        let mut db2 = spec("db", &[("10.4.0.1", "db-0"), ("fd00:4::1", "db-2")]);
        db2.ports = ports(&[(5433, "TCP")]);
        assert!(rec.update_service(&db.key, Some(&db2)).errors.is_empty());
        assert_eq!(table_matches_dns_addrs(&bpffs), dns_addrs_len());
        slot_flags_and_steering_match(&bpffs);

        // An endpoint is drained, another stops being ready, and the
        // service changes policy: slots and steering follow.
        let mut db3 = db2.clone();
        db3.policy = Some(Policy::Random);
        for ep in db3.endpoints.values_mut() {
            if ep.addr.is_ipv4() {
                ep.drained = true;
            } else {
                ep.ready = false;
            }
        }
        assert!(rec.update_service(&db.key, Some(&db3)).errors.is_empty());
        assert_eq!(table_matches_dns_addrs(&bpffs), dns_addrs_len());
        slot_flags_and_steering_match(&bpffs);
        let db_addr = headway::map_plan::addr_key("10.4.0.1".parse().unwrap());
        let flags = |service_id: u32| {
            let maps = Maps::open_pinned(bpffs.path()).unwrap();
            let index = maps.dns_addrs.get(&db_addr, 0).unwrap();
            index.slots[..index.n as usize]
                .iter()
                .find(|s| s.service_id == service_id)
                .map(|s| s.flags)
        };
        let ids: Vec<u32> = {
            let maps = Maps::open_pinned(bpffs.path()).unwrap();
            maps.services.keys().map(Result::unwrap).collect()
        };
        // Drained in db, still eligible in web.
        let mut seen: Vec<Option<u16>> = ids.iter().map(|id| flags(*id)).collect();
        seen.sort();
        use headway_common::addr_slot_flags::{ELIGIBLE, KNOWN, MEMBER};
        assert_eq!(
            seen,
            vec![Some(KNOWN | MEMBER), Some(KNOWN | MEMBER | ELIGIBLE)]
        );

        // A service goes: its steering entry is emptied.
        assert!(rec.update_service(&db.key, None).errors.is_empty());
        assert_eq!(table_matches_dns_addrs(&bpffs), dns_addrs_len());
        slot_flags_and_steering_match(&bpffs);
    }

    // An older agent changed dns_addrs without knowing the table: the
    // entry it left for 10.4.1.2 is whole but says another pod.
    let key = headway::map_plan::addr_key("10.4.1.2".parse().unwrap());
    {
        let mut maps = Maps::open_pinned(bpffs.path()).unwrap();
        let mut index = maps.dns_addrs.get(&key, 0).unwrap();
        index.pod_id = 4242;
        maps.dns_addrs.insert(key, index, 0).unwrap();
        index.pod_id = 1;
        maps.dns_addrs.insert(key, index, 0).unwrap();
        let mut table = pinned_table(&bpffs);
        let mut stale = index;
        stale.pod_id = 4242;
        assert!(headway::addr_table::put(&mut table, &key, &stale).unwrap());
    }
    // The next datapath rewrites the table before attaching, the next
    // writer again when it takes the maps over.
    // Likewise a steering entry an older agent left stale, or none.
    {
        let mut maps = Maps::open_pinned(bpffs.path()).unwrap();
        let id = maps.services.keys().next().unwrap().unwrap();
        // Its inline slot names a pod that is none of the service's, with
        // a check that holds: only the rewrite before attaching undoes it.
        let nobody = headway_common::Backend {
            addr: headway::map_plan::addr_key("10.99.0.1".parse().unwrap()),
            pod_id: 4242,
            _pad: 0,
        };
        let stale = headway_common::ServiceSteering {
            policy: 99,
            live: 1,
            backends_v4: 1,
            ports: [headway_common::port_word(1, 6); headway_common::STEERING_PORTS],
            ..Default::default()
        }
        .with_backends([nobody]);
        maps.svc_steering.set(id, stale, 0).unwrap();
        maps.svc_steering.set(id + 100, stale, 0).unwrap();
    }
    let mut datapath = Datapath::start(bpffs.path(), cg.path()).unwrap();
    assert_eq!(table_matches_dns_addrs(&bpffs), dns_addrs_len());
    slot_flags_and_steering_match(&bpffs);
    let mut rec = Reconciler::new(datapath.take_maps().unwrap(), settings(), vec![]).unwrap();
    assert_eq!(table_matches_dns_addrs(&bpffs), dns_addrs_len());
    let web3 = spec("web", &[("10.4.1.3", "web-2")]);
    assert!(rec.full_sync(&state(&[&web3])).errors.is_empty());
    assert_eq!(table_matches_dns_addrs(&bpffs), dns_addrs_len());
    slot_flags_and_steering_match(&bpffs);
}
