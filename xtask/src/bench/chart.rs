//! The PNG chart of the ratios to `direct`: one group of bars per figure,
//! one bar per contender (median ratio), a whisker for the range over
//! rounds, and a line at 1.0. Drawn with plotters' bitmap backend; text
//! uses a TrueType font from a Debian package through ab_glyph, so no
//! fontconfig is involved.
use std::path::Path;

use anyhow::{Context, anyhow};
use plotters::prelude::*;
use plotters::style::{FontStyle, register_font};

use super::{
    contenders::Contender,
    report::{COLUMNS, PAIRED_TARGETS, Results},
    stats::Better,
};

/// fonts-dejavu-core (installed by .ci/run).
const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

const PALETTE: [RGBColor; 5] = [
    RGBColor(0x1b, 0x9e, 0x77),
    RGBColor(0x66, 0xa6, 0x1e),
    RGBColor(0xd9, 0x5f, 0x02),
    RGBColor(0x75, 0x70, 0xb3),
    RGBColor(0xe7, 0x29, 0x8a),
];

fn register() -> anyhow::Result<()> {
    let bytes = std::fs::read(FONT)
        .with_context(|| format!("reading {FONT} (apt-get install fonts-dejavu-core)"))?;
    // plotters keeps registered fonts for the life of the process.
    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
    register_font("sans-serif", FontStyle::Normal, bytes)
        .map_err(|_| anyhow!("{FONT} is not a usable TrueType font"))
}

pub fn draw(results: &Results, path: &Path) -> anyhow::Result<()> {
    register()?;
    let contenders: Vec<Contender> = results
        .setup
        .contenders
        .iter()
        .map(|(c, _)| *c)
        .filter(|c| *c != Contender::Direct)
        .collect();
    // Groups of bars: every wrk column, then the paired targets' figures.
    // (group, contender) -> (ratio, whisker low, whisker high).
    type Value = Option<(f64, f64, f64)>;
    let mut groups: Vec<(String, Better, Vec<Value>)> = Vec::new();
    for (w, m, header) in COLUMNS {
        let values = contenders
            .iter()
            .map(|&c| {
                results
                    .summary
                    .iter()
                    .find(|r| r.workload == w && r.metric == m && r.contender == c)
                    .and_then(|r| r.ratio)
                    .map(|s| (s.median, s.min, s.max))
            })
            .collect();
        groups.push((header.replace(" per CPU-s", "/CPU-s"), m.better(), values));
    }
    for t in &PAIRED_TARGETS {
        let values: Vec<Value> = contenders
            .iter()
            .map(|&c| {
                results
                    .paired
                    .iter()
                    .find(|p| p.workload == t.workload && p.contender == c)
                    .map(|p| (t.pick)(&p.headway_vs_direct))
                    .map(|e| (e.ratio, e.ci_low, e.ci_high))
            })
            .collect();
        if values.iter().any(Option::is_some) {
            groups.push((t.short.to_owned(), t.better, values));
        }
    }
    let mut top: f64 = 1.2;
    for (_, _, values) in &groups {
        for (_, _, max) in values.iter().flatten() {
            top = top.max(max * 1.3);
        }
    }
    // Room above the bars for the legend; a wild outlier is cut off.
    let top = top.min(6.0);

    let root = BitMapBackend::new(path, (1700, 700)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
    let title = format!(
        "Ratio to direct (median over {} rounds, whisker = range; paired: pooled, whisker = 95% interval){}",
        results.setup.rounds,
        if results.quick {
            " — quick smoke run"
        } else {
            ""
        }
    );
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 24))
        .margin(16)
        .x_label_area_size(70)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..groups.len() as f64, 0f64..top)
        .map_err(|e| anyhow!("{e}"))?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(groups.len() + 1)
        .x_label_formatter(&|x| {
            // Ticks fall on group edges; name the group to their right.
            let i = x.floor() as usize;
            groups.get(i).map_or(String::new(), |(label, better, _)| {
                let hint = match better {
                    Better::Higher => "↑",
                    Better::Lower => "↓",
                };
                format!("    {label} {hint}")
            })
        })
        .x_label_style(("sans-serif", 15))
        .y_desc("× direct")
        .y_label_style(("sans-serif", 15))
        .draw()
        .map_err(|e| anyhow!("{e}"))?;

    let group = 0.8 / contenders.len().max(1) as f64;
    for (k, &c) in contenders.iter().enumerate() {
        let color = PALETTE[k % PALETTE.len()];
        let bars: Vec<_> = groups
            .iter()
            .enumerate()
            .filter_map(|(col, (_, _, values))| values[k].map(|r| (col, r)))
            .collect();
        let x0 = |col: usize| col as f64 + 0.1 + k as f64 * group;
        chart
            .draw_series(bars.iter().map(|(col, (med, _, _))| {
                Rectangle::new(
                    [(x0(*col), 0.0), (x0(*col) + group * 0.9, med.min(top))],
                    color.filled(),
                )
            }))
            .map_err(|e| anyhow!("{e}"))?
            .label(c.label())
            .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 14, y + 6)], color.filled()));
        chart
            .draw_series(bars.iter().map(|(col, (_, min, max))| {
                let x = x0(*col) + group * 0.45;
                PathElement::new(vec![(x, min.min(top)), (x, max.min(top))], BLACK)
            }))
            .map_err(|e| anyhow!("{e}"))?;
    }
    chart
        .draw_series(std::iter::once(PathElement::new(
            vec![(0.0, 1.0), (groups.len() as f64, 1.0)],
            BLACK.stroke_width(2),
        )))
        .map_err(|e| anyhow!("{e}"))?;
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .label_font(("sans-serif", 16))
        .draw()
        .map_err(|e| anyhow!("{e}"))?;
    root.present()
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}
