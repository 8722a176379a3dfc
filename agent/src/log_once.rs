//! Logging problems once per object and change, not once per sync.
//!
//! Every sync recomputes everything from the source, so a bad annotation or
//! a map that keeps refusing an entry would be reported again on every
//! change anywhere. [`SyncLogs`] remembers what the previous sync reported
//! and logs only what is new: a problem is logged when it first appears,
//! again when its message changes, and again if it goes away and comes
//! back.
use std::collections::BTreeSet;

use tracing::{error, warn};

use crate::{map_writer::WriteError, model::Warning, source::dir::ManifestError};

/// The (subject, message) pairs reported by the last round.
#[derive(Debug, Default)]
pub struct Once {
    last: BTreeSet<(String, String)>,
}

impl Once {
    /// The pairs of this round that the previous round did not have, in
    /// the order given; this round becomes the previous one.
    pub fn fresh(
        &mut self,
        round: impl IntoIterator<Item = (String, String)>,
    ) -> Vec<(String, String)> {
        let mut now = BTreeSet::new();
        let mut new = Vec::new();
        for pair in round {
            if !self.last.contains(&pair) && !now.contains(&pair) {
                new.push(pair.clone());
            }
            now.insert(pair);
        }
        self.last = now;
        new
    }
}

/// What the sync loop reports, each kind deduplicated on its own.
#[derive(Debug, Default)]
pub struct SyncLogs {
    manifests: Once,
    objects: Once,
    writes: Once,
}

impl SyncLogs {
    /// Manifests that could not be read or parsed, by file and document.
    pub fn manifest_errors(&mut self, errors: &[ManifestError]) {
        let round = errors.iter().map(|e| {
            let at = format!("{}#{}", e.path.display(), e.document);
            (at, e.message.clone())
        });
        for (at, message) in self.manifests.fresh(round) {
            warn!(file = %at, error = %message, "bad manifest; keeping what it held before");
        }
    }

    /// Input the model ignored or defaulted (unknown annotation values,
    /// bad ports, addresses that are not IPs), by object.
    pub fn model_warnings(&mut self, warnings: &[Warning]) {
        let round = warnings
            .iter()
            .map(|w| (w.object.clone(), w.message.clone()));
        for (object, message) in self.objects.fresh(round) {
            warn!(object = %object, "{message}");
        }
    }

    /// Map entries the kernel refused (full map, bad value), by object
    /// (`Service ns/name`), map, operation and error, with how many
    /// entries each hit. A full map is a warning: the entries already in
    /// it keep working.
    pub fn write_errors(&mut self, errors: &[WriteError]) {
        let mut counts: std::collections::BTreeMap<(String, String, bool), usize> =
            Default::default();
        for e in errors {
            let object = e.object.clone().unwrap_or_else(|| "-".to_owned());
            *counts
                .entry((object, e.to_string(), e.is_full()))
                .or_default() += 1;
        }
        let full: BTreeSet<(String, String)> = counts
            .keys()
            .filter(|(_, _, full)| *full)
            .map(|(o, m, _)| (o.clone(), m.clone()))
            .collect();
        let round = counts
            .into_iter()
            .map(|((object, message, _), n)| (object, format!("{message} ({n} entries)")));
        for (object, message) in self.writes.fresh(round) {
            let is_full = full
                .iter()
                .any(|(o, m)| *o == object && message.starts_with(m.as_str()));
            if is_full {
                warn!(object = %object, error = %message, "map full: new entries refused, existing entries keep working");
            } else {
                error!(object = %object, error = %message, "map write failed; the rest of the sync was applied");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    #[test]
    fn a_problem_is_reported_once_until_it_changes() {
        let mut once = Once::default();
        let bad = ("Service demo/web", "annotation headway.dev/policy: unknown");
        assert_eq!(once.fresh(pairs(&[bad])), pairs(&[bad]));
        assert_eq!(once.fresh(pairs(&[bad])), pairs(&[]));
        assert_eq!(once.fresh(pairs(&[bad, bad])), pairs(&[]));
        // Another object's problem does not repeat the first.
        let other = ("Pod demo/web-0", "label headway.dev/weight: not a number");
        assert_eq!(once.fresh(pairs(&[bad, other])), pairs(&[other]));
        // A new message for the same object is news.
        let changed = ("Service demo/web", "annotation headway.dev/policy: other");
        assert_eq!(once.fresh(pairs(&[changed, other])), pairs(&[changed]));
        // Fixed, then broken again: reported again.
        assert_eq!(once.fresh(pairs(&[other])), pairs(&[]));
        assert_eq!(once.fresh(pairs(&[changed, other])), pairs(&[changed]));
    }

    #[test]
    fn duplicates_within_a_round_are_reported_once() {
        let mut once = Once::default();
        let a = ("x", "m");
        assert_eq!(once.fresh(pairs(&[a, a])), pairs(&[a]));
    }
}
