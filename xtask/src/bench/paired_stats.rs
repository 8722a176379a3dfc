//! The arithmetic of the paired measurement (see `paired.rs`): latency
//! histograms per side and per time block, merged, compared side to side,
//! with a block bootstrap for the spread. Pure, so it is unit-tested.
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Latencies are recorded in nanoseconds, 3 significant digits (a bucket
/// is at most 0.1% wide), up to 1 s; anything slower is clamped to 1 s
/// (it would be a failure anyway: the client's read timeout is 2 s).
pub const LOWEST_NS: u64 = 1;
pub const HIGHEST_NS: u64 = 1_000_000_000;
pub const SIGFIG: u8 = 3;

pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(LOWEST_NS, HIGHEST_NS, SIGFIG)
        .expect("constant histogram bounds are valid")
}

/// The connections one client thread alternates its requests over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Side {
    /// A socket made in the plain cgroup (no programs): the baseline.
    Direct,
    /// A second socket made in the plain cgroup to the same pod: the A/A
    /// control, whose ratio to `Direct` is the method's own noise.
    Control,
    /// A socket made in the cgroup headway's programs are attached to.
    Headway,
}

impl Side {
    pub const ALL: [Side; 3] = [Side::Direct, Side::Control, Side::Headway];

    pub fn index(self) -> usize {
        match self {
            Side::Direct => 0,
            Side::Control => 1,
            Side::Headway => 2,
        }
    }

    pub fn id(self) -> &'static str {
        match self {
            Side::Direct => "direct",
            Side::Control => "control",
            Side::Headway => "headway",
        }
    }
}

/// One side's requests within one block: how many, their summed
/// latency, and their latency histogram.
#[derive(Debug, Clone)]
pub struct SideBlock {
    pub requests: u64,
    pub busy_ns: u64,
    pub hist: Histogram<u64>,
}

impl Default for SideBlock {
    fn default() -> SideBlock {
        SideBlock {
            requests: 0,
            busy_ns: 0,
            hist: new_histogram(),
        }
    }
}

impl SideBlock {
    pub fn record(&mut self, ns: u64) {
        self.requests += 1;
        self.busy_ns += ns;
        self.hist.saturating_record(ns.clamp(LOWEST_NS, HIGHEST_NS));
    }

    pub fn add(&mut self, other: &SideBlock) {
        self.requests += other.requests;
        self.busy_ns += other.busy_ns;
        self.hist
            .add(&other.hist)
            .expect("histograms of the same bounds add up");
    }

    /// The histogram as (value, count) pairs of its non-empty buckets,
    /// for the client's report; [`SideBlock::from_wire`] reads it back
    /// into the same buckets.
    pub fn to_wire(&self) -> WireSide {
        WireSide {
            requests: self.requests,
            busy_ns: self.busy_ns,
            buckets: self
                .hist
                .iter_recorded()
                .map(|v| (v.value_iterated_to(), v.count_since_last_iteration()))
                .collect(),
        }
    }

    pub fn from_wire(wire: &WireSide) -> SideBlock {
        let mut out = SideBlock {
            requests: wire.requests,
            busy_ns: wire.busy_ns,
            hist: new_histogram(),
        };
        for &(value, count) in &wire.buckets {
            out.hist
                .saturating_record_n(value.clamp(LOWEST_NS, HIGHEST_NS), count);
        }
        out
    }

    /// The side's figures: requests per second of the time spent waiting
    /// for its own requests, and latency quantiles (ns).
    pub fn figures(&self) -> SideFigures {
        let q = |q: f64| self.hist.value_at_quantile(q) as f64;
        SideFigures {
            requests: self.requests,
            rate: if self.busy_ns == 0 {
                0.0
            } else {
                self.requests as f64 / (self.busy_ns as f64 / 1e9)
            },
            p50_ns: q(0.50),
            p99_ns: q(0.99),
            p999_ns: q(0.999),
        }
    }
}

/// [`SideBlock`] as the client prints it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct WireSide {
    pub requests: u64,
    pub busy_ns: u64,
    pub buckets: Vec<(u64, u64)>,
}

/// One time block (all threads of one run, the same wall-clock window):
/// every side's requests in it.
#[derive(Debug, Clone, Default)]
pub struct Block {
    pub sides: [SideBlock; 3],
}

impl Block {
    pub fn side(&self, s: Side) -> &SideBlock {
        &self.sides[s.index()]
    }

    pub fn add(&mut self, other: &Block) {
        for (mine, theirs) in self.sides.iter_mut().zip(&other.sides) {
            mine.add(theirs);
        }
    }
}

/// What one side did: requests, rate over its own busy time, quantiles.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct SideFigures {
    pub requests: u64,
    /// Requests per second of the wall time spent on this side's requests.
    pub rate: f64,
    pub p50_ns: f64,
    pub p99_ns: f64,
    pub p999_ns: f64,
}

/// The four compared figures, as ratios `side / baseline`. For the rate a
/// ratio above 1 is better, for the latencies one below 1.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Ratios {
    pub rate: f64,
    pub p50: f64,
    pub p99: f64,
    pub p999: f64,
}

impl Ratios {
    pub fn of(side: &SideFigures, baseline: &SideFigures) -> Option<Ratios> {
        let r = |a: f64, b: f64| (b > 0.0).then(|| a / b);
        Some(Ratios {
            rate: r(side.rate, baseline.rate)?,
            p50: r(side.p50_ns, baseline.p50_ns)?,
            p99: r(side.p99_ns, baseline.p99_ns)?,
            p999: r(side.p999_ns, baseline.p999_ns)?,
        })
    }

    fn get(&self, i: usize) -> f64 {
        [self.rate, self.p50, self.p99, self.p999][i]
    }
}

/// One ratio with its spread: the pooled ratio (all blocks merged), a
/// 95% block-bootstrap interval of it, and the range of the per-block
/// ratios.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Estimate {
    pub ratio: f64,
    pub ci_low: f64,
    pub ci_high: f64,
    pub block_min: f64,
    pub block_median: f64,
    pub block_max: f64,
}

/// [`Estimate`]s of the rate, p50, p99 and p99.9 ratios.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Comparison {
    pub rate: Estimate,
    pub p50: Estimate,
    pub p99: Estimate,
    pub p999: Estimate,
    /// Blocks the figures come from.
    pub blocks: usize,
}

/// All `blocks` merged into one.
pub fn merge<'a>(blocks: impl IntoIterator<Item = &'a Block>) -> Block {
    let mut out = Block::default();
    for b in blocks {
        out.add(b);
    }
    out
}

/// A small deterministic generator (xorshift64*), so a bootstrap gives
/// the same interval for the same data.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in 0..n (n > 0); the modulo bias is negligible for small n.
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    /// A uniformly random order of `items` (Fisher–Yates).
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.below(i + 1);
            items.swap(i, j);
        }
    }
}

/// The value at quantile `q` of sorted values (nearest rank).
fn quantile_sorted(sorted: &[f64], q: f64) -> f64 {
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// `side` against `baseline` over `blocks`: pooled ratios, a block
/// bootstrap (`iterations` resamples of the blocks with replacement) for
/// their 95% interval, and the per-block ratios' range. Blocks where
/// either side made no request are left out; `None` if none is left.
pub fn compare(
    blocks: &[Block],
    side: Side,
    baseline: Side,
    iterations: usize,
    seed: u64,
) -> Option<Comparison> {
    let usable: Vec<(&SideBlock, &SideBlock)> = blocks
        .iter()
        .map(|b| (b.side(side), b.side(baseline)))
        .filter(|(s, b)| s.requests > 0 && b.requests > 0)
        .collect();
    if usable.is_empty() {
        return None;
    }
    let ratios_of = |s: &SideBlock, b: &SideBlock| Ratios::of(&s.figures(), &b.figures());
    // Only the two sides compared are merged: the bootstrap merges
    // histograms `iterations` × blocks times.
    let merge_pairs = |pairs: &mut dyn Iterator<Item = (&SideBlock, &SideBlock)>| {
        let (mut s, mut b) = (SideBlock::default(), SideBlock::default());
        for (one, other) in pairs {
            s.add(one);
            b.add(other);
        }
        (s, b)
    };
    let (s, b) = merge_pairs(&mut usable.iter().copied());
    let pooled = ratios_of(&s, &b)?;
    let per_block: Vec<Ratios> = usable.iter().filter_map(|(s, b)| ratios_of(s, b)).collect();
    let mut rng = Rng::new(seed);
    let mut resampled: Vec<Ratios> = Vec::with_capacity(iterations);
    for _ in 0..iterations {
        let mut picks = (0..usable.len()).map(|_| usable[rng.below(usable.len())]);
        let (s, b) = merge_pairs(&mut picks);
        resampled.extend(ratios_of(&s, &b));
    }
    let estimate = |i: usize| {
        let mut boot: Vec<f64> = resampled.iter().map(|r| r.get(i)).collect();
        boot.sort_by(f64::total_cmp);
        let mut each: Vec<f64> = per_block.iter().map(|r| r.get(i)).collect();
        each.sort_by(f64::total_cmp);
        let ratio = pooled.get(i);
        let (ci_low, ci_high) = if boot.is_empty() {
            (ratio, ratio)
        } else {
            (quantile_sorted(&boot, 0.025), quantile_sorted(&boot, 0.975))
        };
        Estimate {
            ratio,
            ci_low,
            ci_high,
            block_min: each.first().copied().unwrap_or(ratio),
            block_median: if each.is_empty() {
                ratio
            } else {
                quantile_sorted(&each, 0.5)
            },
            block_max: each.last().copied().unwrap_or(ratio),
        }
    };
    Some(Comparison {
        rate: estimate(0),
        p50: estimate(1),
        p99: estimate(2),
        p999: estimate(3),
        blocks: usable.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(direct: &[u64], control: &[u64], headway: &[u64]) -> Block {
        let mut b = Block::default();
        for (side, values) in [direct, control, headway].into_iter().enumerate() {
            for &v in values {
                b.sides[side].record(v);
            }
        }
        b
    }

    #[test]
    fn a_side_s_rate_is_requests_per_second_of_its_own_time() {
        let b = block(&[10_000, 30_000], &[], &[]);
        let f = b.side(Side::Direct).figures();
        assert_eq!(f.requests, 2);
        // 2 requests in 40 µs of waiting: 50,000 per second.
        assert!((f.rate - 50_000.0).abs() < 1e-6, "{f:?}");
        assert_eq!(b.side(Side::Headway).figures().rate, 0.0);
    }

    #[test]
    fn histograms_survive_the_wire_and_merge() {
        let values: Vec<u64> = (1..=1000).map(|i| i * 100).collect();
        let b = block(&values, &values[..10], &[]);
        let wire = b.side(Side::Direct).to_wire();
        let json = serde_json::to_string(&wire).unwrap();
        let back = SideBlock::from_wire(&serde_json::from_str(&json).unwrap());
        assert_eq!(back.requests, 1000);
        assert_eq!(back.busy_ns, b.side(Side::Direct).busy_ns);
        for q in [0.5, 0.99, 0.999] {
            assert_eq!(
                back.hist.value_at_quantile(q),
                b.side(Side::Direct).hist.value_at_quantile(q)
            );
        }
        // Two halves merged give the whole.
        let low = block(&values[..500], &[], &[]);
        let high = block(&values[500..], &[], &[]);
        let whole = merge([&low, &high]);
        let f = whole.side(Side::Direct).figures();
        assert_eq!(f.requests, 1000);
        // p50 is the 500th value, 50 µs, within the bucket's 0.1%.
        assert!((f.p50_ns - 50_000.0).abs() <= 50.0, "{f:?}");
        assert!((f.p99_ns - 99_000.0).abs() <= 100.0, "{f:?}");
        // Beyond the range: clamped, still counted.
        let mut s = SideBlock::default();
        s.record(5_000_000_000);
        assert_eq!(s.requests, 1);
        assert!(s.figures().p50_ns >= HIGHEST_NS as f64 * 0.999);
    }

    #[test]
    fn ratios_compare_side_to_baseline_and_need_a_baseline() {
        let d = SideFigures {
            requests: 10,
            rate: 1000.0,
            p50_ns: 100.0,
            p99_ns: 200.0,
            p999_ns: 400.0,
        };
        let h = SideFigures {
            rate: 990.0,
            p50_ns: 101.0,
            p99_ns: 210.0,
            p999_ns: 400.0,
            ..d
        };
        let r = Ratios::of(&h, &d).unwrap();
        assert!((r.rate - 0.99).abs() < 1e-12 && (r.p99 - 1.05).abs() < 1e-12);
        assert_eq!(r.p999, 1.0);
        assert_eq!(Ratios::of(&h, &SideFigures::default()), None);
    }

    /// Blocks of different speeds (load drifting) with the headway side 2%
    /// slower than direct in each: the pooled ratio and every block say
    /// so, and the interval is tight around it. The control equals direct.
    #[test]
    fn paired_blocks_cancel_drift() {
        let mut blocks = Vec::new();
        for (i, scale) in [1.0, 3.0, 1.5, 2.0, 1.0, 4.0].iter().enumerate() {
            let base: Vec<u64> = (0..400)
                .map(|k| ((20_000 + (k * 37 + i * 11) % 5_000) as f64 * scale) as u64)
                .collect();
            let slower: Vec<u64> = base.iter().map(|v| v + v / 50).collect();
            blocks.push(block(&base, &base, &slower));
        }
        let hw = compare(&blocks, Side::Headway, Side::Direct, 200, 7).unwrap();
        assert_eq!(hw.blocks, 6);
        for e in [hw.rate, hw.p50, hw.p99, hw.p999] {
            assert!(e.ci_low <= e.ratio && e.ratio <= e.ci_high, "{e:?}");
            assert!(e.block_min <= e.block_median && e.block_median <= e.block_max);
        }
        assert!((hw.rate.ratio - 1.0 / 1.02).abs() < 1e-3, "{:?}", hw.rate);
        assert!((hw.p50.ratio - 1.02).abs() < 0.003, "{:?}", hw.p50);
        assert!(
            (hw.rate.block_max - hw.rate.block_min) < 1e-3,
            "{:?}",
            hw.rate
        );
        let aa = compare(&blocks, Side::Control, Side::Direct, 200, 7).unwrap();
        for e in [aa.rate, aa.p50, aa.p99, aa.p999] {
            assert!((e.ratio - 1.0).abs() < 1e-12 && (e.ci_high - e.ci_low) < 1e-12);
        }
        // The same seed gives the same interval.
        assert_eq!(
            compare(&blocks, Side::Headway, Side::Direct, 200, 7),
            Some(hw)
        );
    }

    #[test]
    fn blocks_without_both_sides_are_left_out() {
        let blocks = vec![
            block(&[10_000; 10], &[], &[10_000; 10]),
            block(&[10_000; 10], &[], &[]),
        ];
        let c = compare(&blocks, Side::Headway, Side::Direct, 50, 1).unwrap();
        assert_eq!(c.blocks, 1);
        assert_eq!(compare(&blocks, Side::Control, Side::Direct, 50, 1), None);
    }

    #[test]
    fn shuffles_are_permutations() {
        let mut rng = Rng::new(3);
        let mut seen_first = [0; 3];
        for _ in 0..300 {
            let mut s = Side::ALL;
            rng.shuffle(&mut s);
            let mut sorted = s;
            sorted.sort();
            assert_eq!(sorted, Side::ALL);
            seen_first[s[0].index()] += 1;
        }
        assert!(seen_first.iter().all(|&n| n > 50), "{seen_first:?}");
    }
}
