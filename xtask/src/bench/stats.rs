//! The arithmetic of the report: medians, spreads and ratios to `direct`,
//! kept apart from the measuring so it can be unit-tested.
use serde::{Deserialize, Serialize};

/// Median and range of a set of samples.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    /// How many samples the figures come from.
    pub n: usize,
}

impl Spread {
    /// `None` for no samples (or any NaN among them: a bug upstream).
    pub fn of(values: &[f64]) -> Option<Spread> {
        if values.is_empty() || values.iter().any(|v| v.is_nan()) {
            return None;
        }
        let mut sorted = values.to_vec();
        sorted.sort_by(f64::total_cmp);
        Some(Spread {
            median: median_sorted(&sorted),
            min: sorted[0],
            max: sorted[sorted.len() - 1],
            n: sorted.len(),
        })
    }
}

/// Median of sorted values; the mean of the middle two for an even count.
fn median_sorted(sorted: &[f64]) -> f64 {
    let n = sorted.len();
    if !n.is_multiple_of(2) {
        sorted[n / 2]
    } else {
        (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
    }
}

/// Per-round paired ratios `contender / baseline`: rounds are matched by
/// their index, so a round that ran slower for everyone (the machine is
/// shared) does not move the ratio. Rounds missing on either side, or with
/// a zero baseline, are left out.
pub fn paired_ratios(contender: &[(usize, f64)], baseline: &[(usize, f64)]) -> Vec<f64> {
    contender
        .iter()
        .filter_map(|(round, value)| {
            let base = baseline.iter().find(|(r, _)| r == round)?.1;
            (base != 0.0).then(|| value / base)
        })
        .collect()
}

/// Whether a bigger or a smaller value is better for a metric, which sets
/// how a target on its ratio reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Better {
    Higher,
    Lower,
}

/// A target on a ratio to `direct`: met when the median ratio is at least
/// (Higher) or at most (Lower) the threshold. `margin` is how far from the
/// threshold the median is, in percentage points of `direct` (positive
/// means met with room to spare, negative means missed by that much).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TargetCheck {
    pub name: String,
    pub ratio: f64,
    pub threshold: f64,
    pub better: Better,
    pub met: bool,
    pub margin_points: f64,
    /// A 95% interval of the ratio, where the method gives one (the
    /// paired workloads): the target is *resolved* when the interval lies
    /// wholly on one side of the threshold.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<(f64, f64)>,
}

impl TargetCheck {
    pub fn new(name: &str, ratio: f64, threshold: f64, better: Better) -> TargetCheck {
        let margin = match better {
            Better::Higher => ratio - threshold,
            Better::Lower => threshold - ratio,
        };
        TargetCheck {
            name: name.to_owned(),
            ratio,
            threshold,
            better,
            met: margin >= 0.0,
            margin_points: margin * 100.0,
            interval: None,
        }
    }

    /// Whether the interval (if any) lies wholly on the side of the
    /// threshold the median is on: `None` without an interval.
    pub fn resolved(&self) -> Option<bool> {
        let (low, high) = self.interval?;
        Some(low > self.threshold || high < self.threshold)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_counts() {
        let s = Spread::of(&[5.0, 1.0, 3.0]).unwrap();
        assert_eq!((s.median, s.min, s.max, s.n), (3.0, 1.0, 5.0, 3));
        let s = Spread::of(&[4.0, 1.0, 3.0, 2.0]).unwrap();
        assert_eq!((s.median, s.min, s.max), (2.5, 1.0, 4.0));
        assert_eq!(Spread::of(&[7.0]).unwrap().median, 7.0);
    }

    #[test]
    fn no_samples_or_nan_give_no_spread() {
        assert_eq!(Spread::of(&[]), None);
        assert_eq!(Spread::of(&[1.0, f64::NAN]), None);
    }

    #[test]
    fn ratios_pair_rounds_by_index() {
        let direct = [(0, 100.0), (1, 200.0), (2, 0.0)];
        // Round 3 has no baseline, round 2's baseline is zero.
        let lb = [(1, 100.0), (0, 50.0), (2, 10.0), (3, 1.0)];
        assert_eq!(paired_ratios(&lb, &direct), vec![0.5, 0.5]);
        // A drift that slows every contender alike leaves the ratio alone.
        let direct = [(0, 100.0), (1, 50.0)];
        let hw = [(0, 98.0), (1, 49.0)];
        let r = Spread::of(&paired_ratios(&hw, &direct)).unwrap();
        assert!((r.median - 0.98).abs() < 1e-12 && (r.max - r.min).abs() < 1e-12);
    }

    #[test]
    fn targets_read_in_the_metric_s_direction() {
        let rate = TargetCheck::new("rate", 0.95, 0.97, Better::Higher);
        assert!(!rate.met);
        assert!((rate.margin_points + 2.0).abs() < 1e-9);
        let p99 = TargetCheck::new("p99", 1.03, 1.05, Better::Lower);
        assert!(p99.met);
        assert!((p99.margin_points - 2.0).abs() < 1e-9);
        assert!(TargetCheck::new("edge", 0.99, 0.99, Better::Higher).met);
    }
}
