//! The one path from desired state to the maps, shared by every source:
//! a service's spec is planned on its own ([`map_plan::plan_service`]) and
//! written as a diff against what the maps hold ([`MapWriter`]). A source
//! that knows what changed (kube) updates only those services; a source
//! that only has snapshots (dir) runs a full sync through the same path.
use std::collections::BTreeSet;

use headway_common::Config;

use crate::{
    map_plan::{self, Ids, PlanSettings},
    map_writer::{MapWriter, WriteError, Written},
    model::{DesiredState, PodKey, ServiceKey, ServiceSpec},
    pinned::{Maps, PinnedError},
};

pub struct Reconciler {
    writer: MapWriter,
    ids: Ids,
    settings: PlanSettings,
    /// Only services in these namespaces (all when empty).
    namespaces: Vec<String>,
    /// Services that have entries in the maps, as this agent wrote them.
    applied: BTreeSet<ServiceKey>,
    /// Whether entries left by a previous agent have been swept yet.
    swept: bool,
}

impl Reconciler {
    /// Takes over the maps; ids already in them are kept, so counters stay
    /// with their pods and services across restarts. Nothing is written
    /// until the first update.
    pub fn new(
        maps: Maps,
        settings: PlanSettings,
        namespaces: Vec<String>,
    ) -> Result<Reconciler, PinnedError> {
        let contents = maps.read_contents()?;
        let ids = Ids::from_contents(&contents);
        let writer = MapWriter::new(maps, contents);
        Ok(Reconciler {
            writer,
            ids,
            settings,
            namespaces,
            applied: BTreeSet::new(),
            swept: false,
        })
    }

    pub fn write_config(&mut self, config: Config) -> Result<(), WriteError> {
        self.writer.write_config(config)
    }

    pub fn settings(&self) -> &PlanSettings {
        &self.settings
    }

    /// For a source that learns the zone later; the next update of a
    /// service plans with the new settings.
    pub fn settings_mut(&mut self) -> &mut PlanSettings {
        &mut self.settings
    }

    /// How many services this agent has in the maps.
    pub fn services(&self) -> usize {
        self.applied.len()
    }

    fn wanted(&self, key: &ServiceKey) -> bool {
        self.namespaces.is_empty() || self.namespaces.contains(&key.namespace)
    }

    /// Makes the maps say what `spec` says about service `key` (`None`: the
    /// service is gone), touching no other service's entries.
    pub fn update_service(&mut self, key: &ServiceKey, spec: Option<&ServiceSpec>) -> Written {
        let spec = spec.filter(|_| self.wanted(key));
        let written = match spec {
            Some(spec) => {
                self.release_departing_pods(key, spec);
                let fragment = map_plan::plan_service(spec, &self.settings, &mut self.ids);
                let id = self.ids.service(key);
                self.applied.insert(key.clone());
                self.writer.apply_service(id, Some(fragment))
            }
            None => {
                self.applied.remove(key);
                match self.ids.service_id(key) {
                    // Ids recovered from a previous agent's maps are only
                    // freed by the sweep, which removes their entries too.
                    Some(id) if self.writer.has_service(id) => {
                        let written = self.writer.apply_service(id, None);
                        self.ids.release_service(id);
                        written
                    }
                    _ => Written::default(),
                }
            }
        };
        for pod in &written.unclaimed_pods {
            self.ids.release_pod(*pod);
        }
        // Whatever failed was this service's entry: say so in the logs.
        let mut written = written;
        for e in &mut written.errors {
            e.object.get_or_insert_with(|| format!("Service {key}"));
        }
        written
    }

    /// Frees the ids of pods that leave the service and that no other
    /// service lists, before the new spec is planned: a pod arriving in the
    /// same change takes the lowest free id, as a full plan would give it
    /// (its counters start over under a new generation).
    fn release_departing_pods(&mut self, key: &ServiceKey, spec: &ServiceSpec) {
        let Some(id) = self.ids.service_id(key) else {
            return;
        };
        let staying: BTreeSet<PodKey> = spec
            .endpoints
            .values()
            .map(|ep| map_plan::pod_key(key, ep))
            .collect();
        for pod_id in self.writer.pods_only_of(id) {
            if self
                .ids
                .pod_key(pod_id)
                .is_some_and(|pod| !staying.contains(pod))
            {
                self.ids.release_pod(pod_id);
            }
        }
    }

    /// Makes the maps say exactly what `desired` says: every service in it
    /// is updated, every other one removed, and (the first time) whatever a
    /// previous agent left that no service claims is swept. Unchanged
    /// entries are not written, so a restarted agent's first sync leaves a
    /// steady datapath untouched.
    pub fn full_sync(&mut self, desired: &DesiredState) -> Written {
        let keys = desired.services.keys().cloned().collect();
        self.full_sync_with(&keys, |k| desired.services.get(k).cloned())
    }

    /// [`Self::full_sync`] to the services `keys`, whose specs `spec_of`
    /// computes one at a time (a whole desired state of 10,000 services
    /// is never held at once).
    ///
    /// The first sync of an agent plans on a second thread while this one
    /// writes (see [`Self::first_sync`]).
    pub fn full_sync_with(
        &mut self,
        keys: &BTreeSet<ServiceKey>,
        mut spec_of: impl FnMut(&ServiceKey) -> Option<ServiceSpec> + Send,
    ) -> Written {
        let mut total = if self.applied.is_empty() && self.writer.service_ids().next().is_none() {
            self.first_sync(keys, spec_of)
        } else {
            let mut total = Written::default();
            let gone: Vec<ServiceKey> = self
                .applied
                .iter()
                .filter(|k| !keys.contains(k))
                .cloned()
                .collect();
            for key in &gone {
                add(&mut total, self.update_service(key, None));
            }
            for key in keys {
                let spec = spec_of(key);
                add(&mut total, self.update_service(key, spec.as_ref()));
            }
            total
        };
        let mut add = |w: Written| add(&mut total, w);
        if !self.swept {
            add(self.writer.sweep());
            let writer = &self.writer;
            self.ids
                .retain_ids(|s| writer.has_service(s), |p| writer.pod_claimed(p));
            self.swept = true;
        }
        total.summary.failed = total.errors.len();
        total
    }

    /// The first sync, when no service has entries from this agent yet:
    /// a second thread computes each spec and plans it (ids included)
    /// while this one writes the plans in the same order, a batch of them
    /// at a time ([`MapWriter::apply_new_services`]), and a third writes
    /// `dns_addrs` behind it ([`MapWriter::with_dns_thread`]).
    ///
    /// Writing cannot change an id here: with no entries of this agent in
    /// the maps, no service has pods to let go ([`Self::release_departing_pods`]
    /// finds none), and a service written for the first time claims every
    /// pod it touches (the writer reports none unclaimed). A service
    /// without a spec has nothing to remove either.
    fn first_sync(
        &mut self,
        keys: &BTreeSet<ServiceKey>,
        mut spec_of: impl FnMut(&ServiceKey) -> Option<ServiceSpec> + Send,
    ) -> Written {
        let Reconciler {
            writer,
            ids,
            settings,
            namespaces,
            applied,
            ..
        } = self;
        let mut total = Written::default();
        let mut unclaimed = Vec::new();
        let mut dns_failed = Vec::new();
        let plan_spec_of = &mut spec_of;
        let threaded = std::thread::scope(|scope| {
            let (planned, plans) = std::sync::mpsc::sync_channel(PLANS_AHEAD);
            let planner = std::thread::Builder::new()
                .name("headway-plan".into())
                .spawn_scoped(scope, move || {
                    // Handed over a few at a time: one wake-up per plan
                    // cost the writer ~5% of its time.
                    let mut batch = Vec::with_capacity(PLAN_BATCH);
                    for key in keys {
                        let wanted = namespaces.is_empty() || namespaces.contains(&key.namespace);
                        let Some(spec) = plan_spec_of(key).filter(|_| wanted) else {
                            continue;
                        };
                        let fragment = map_plan::plan_service(&spec, settings, ids);
                        let id = ids.service(key);
                        batch.push((key, id, fragment));
                        if batch.len() == PLAN_BATCH {
                            let full =
                                std::mem::replace(&mut batch, Vec::with_capacity(PLAN_BATCH));
                            if planned.send(full).is_err() {
                                return;
                            }
                        }
                    }
                    if !batch.is_empty() {
                        let _ = planned.send(batch);
                    }
                });
            let planner = match planner {
                Ok(planner) => planner,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot start a planning thread; planning on this one");
                    return false;
                }
            };
            let ((), failed) = writer.with_dns_thread(|writer| {
                // A batch of plans is written together (one syscall per
                // map, not a dozen per service).
                for batch in plans {
                    let object = batch_object(batch.iter().map(|(key, _, _)| *key));
                    applied.extend(batch.iter().map(|(key, _, _)| (*key).clone()));
                    let mut written = writer.apply_new_services(
                        batch
                            .into_iter()
                            .map(|(_, id, fragment)| (id, fragment))
                            .collect(),
                    );
                    unclaimed.append(&mut written.unclaimed_pods);
                    for e in &mut written.errors {
                        e.object.get_or_insert_with(|| object.clone());
                    }
                    add(&mut total, written);
                }
            });
            dns_failed = failed;
            if let Err(panic) = planner.join() {
                std::panic::resume_unwind(panic);
            }
            true
        });
        for (id, mut e) in dns_failed {
            if let Some(key) = self.ids.service_key(id) {
                e.object.get_or_insert_with(|| format!("Service {key}"));
            }
            total.errors.push(e);
        }
        if !threaded {
            for key in keys {
                let spec = spec_of(key);
                add(&mut total, self.update_service(key, spec.as_ref()));
            }
            return total;
        }
        debug_assert!(unclaimed.is_empty(), "a first write left pods unclaimed");
        for pod in unclaimed {
            self.ids.release_pod(pod);
        }
        total
    }
}

/// What a refusal in a batch of services written together is about.
fn batch_object<'a>(mut keys: impl ExactSizeIterator<Item = &'a ServiceKey>) -> String {
    let n = keys.len();
    match (keys.next(), keys.last()) {
        (Some(key), None) => format!("Service {key}"),
        (Some(first), Some(last)) => format!("Services {first} .. {last} ({n}, written together)"),
        _ => String::new(),
    }
}

fn add(total: &mut Written, w: Written) {
    total.summary += w.summary;
    total.errors.extend(w.errors);
}

/// Batches of plans the planning thread may be ahead of the writer by
/// (each plan holds a service's entries until written).
const PLANS_AHEAD: usize = 4;
/// Plans handed over at once.
const PLAN_BATCH: usize = 16;
