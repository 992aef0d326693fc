//! Medians and spreads of one run's samples, per cell (workload, subject):
//! what the report's tables and the targets' verdicts are computed from.

use super::cells::{Results, Sample, Subject, Workload};

/// Median, min and max of one metric over a cell's repeats.
#[derive(Debug, Clone, Copy)]
pub(super) struct Spread {
    pub(super) median: f64,
    pub(super) min: f64,
    pub(super) max: f64,
}

pub(super) fn spread(samples: &[Sample], value: impl Fn(&Sample) -> f64) -> Spread {
    let mut v: Vec<f64> = samples.iter().map(value).filter(|x| !x.is_nan()).collect();
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return Spread {
            median: f64::NAN,
            min: f64::NAN,
            max: f64::NAN,
        };
    }
    let mid = v.len() / 2;
    let median = if v.len() % 2 == 1 {
        v[mid]
    } else {
        f64::midpoint(v[mid - 1], v[mid])
    };
    Spread {
        median,
        min: v[0],
        max: v[v.len() - 1],
    }
}

pub(super) fn metric(name: &str) -> impl Fn(&Sample) -> f64 + '_ {
    move |s| s.metrics.get(name).copied().unwrap_or(f64::NAN)
}

pub(super) fn median_of(results: &Results, w: Workload, s: Subject, name: &str) -> Option<f64> {
    let m = spread(results.get(&(w, s))?, metric(name)).median;
    (!m.is_nan()).then_some(m)
}

pub(super) fn cpu_median(results: &Results, w: Workload, s: Subject) -> Option<f64> {
    let m = spread(results.get(&(w, s))?, Sample::cpu_per_gb).median;
    (!m.is_nan()).then_some(m)
}

/// Median machine CPU per round trip of a (UDP) cell, µs.
pub(super) fn cpu_round_trip_median(results: &Results, w: Workload, s: Subject) -> Option<f64> {
    let m = spread(results.get(&(w, s))?, Sample::cpu_us_per_round_trip).median;
    (!m.is_nan()).then_some(m)
}

pub(super) fn peak_rss_mib(sample: &Sample) -> f64 {
    sample.peak_rss_kib.map_or(f64::NAN, |k| {
        #[allow(clippy::cast_precision_loss)] // KiB counts are small
        let mib = k as f64 / 1024.0;
        mib
    })
}

/// Median peak RSS of a cell, MiB.
pub(super) fn rss_median(results: &Results, w: Workload, s: Subject) -> Option<f64> {
    let m = spread(results.get(&(w, s))?, peak_rss_mib).median;
    (!m.is_nan()).then_some(m)
}

/// The peer with the highest median of this workload's headline metric
/// (every headline is higher-is-better).
pub(super) fn best_peer(results: &Results, w: Workload) -> Option<(Subject, f64)> {
    let key = w.headline().0;
    results
        .keys()
        .filter(|(cell_w, s)| *cell_w == w && s.is_peer())
        .filter_map(|&(_, s)| Some((s, median_of(results, w, s, key)?)))
        .max_by(|a, b| a.1.total_cmp(&b.1))
}

pub(super) fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    }
}
