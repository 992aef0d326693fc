//! docs/benchmarks.md and its chart, from one run's samples.

use std::{fmt::Write as _, path::Path};

use anyhow::{Context as _, Result};
use plotters::prelude::*;

use super::{Results, Sample, Subject, Workload};

/// Median, min and max of one metric over a cell's repeats.
#[derive(Debug, Clone, Copy)]
struct Spread {
    median: f64,
    min: f64,
    max: f64,
}

fn spread(samples: &[Sample], value: impl Fn(&Sample) -> f64) -> Spread {
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

fn metric(name: &str) -> impl Fn(&Sample) -> f64 + '_ {
    move |s| s.metrics.get(name).copied().unwrap_or(f64::NAN)
}

fn median_of(results: &Results, w: Workload, s: Subject, name: &str) -> Option<f64> {
    let m = spread(results.get(&(w, s))?, metric(name)).median;
    (!m.is_nan()).then_some(m)
}

fn cpu_median(results: &Results, w: Workload, s: Subject) -> Option<f64> {
    let m = spread(results.get(&(w, s))?, Sample::cpu_per_gb).median;
    (!m.is_nan()).then_some(m)
}

/// The peer with the highest median of this workload's headline metric
/// (every headline is higher-is-better).
fn best_peer(results: &Results, w: Workload) -> Option<(Subject, f64)> {
    let key = w.headline().0;
    results
        .keys()
        .filter(|(cell_w, s)| *cell_w == w && s.is_peer())
        .filter_map(|&(_, s)| Some((s, median_of(results, w, s, key)?)))
        .max_by(|a, b| a.1.total_cmp(&b.1))
}

fn fmt_num(x: f64) -> String {
    if x.is_nan() {
        "-".to_owned()
    } else if x.abs() >= 100.0 {
        format!("{x:.0}")
    } else if x.abs() >= 10.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.2}")
    }
}

fn fmt_spread(s: Spread) -> String {
    format!(
        "{} ({}-{})",
        fmt_num(s.median),
        fmt_num(s.min),
        fmt_num(s.max)
    )
}

fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    }
}

fn fmt_ratio(r: Option<f64>) -> String {
    r.map_or_else(|| "-".to_owned(), |r| format!("{r:.2}x"))
}

/// Writes the markdown report and `<out>.svg` beside it.
pub(crate) fn write(
    out: &Path,
    results: &Results,
    subjects: &[Subject],
    command: &str,
) -> Result<()> {
    let chart = out.with_extension("svg");
    let mut md = String::new();
    header(&mut md, command, &chart)?;
    for w in Workload::all() {
        table(&mut md, results, subjects, w)?;
    }
    targets(&mut md, results)?;
    std::fs::write(out, md).with_context(|| format!("cannot write {}", out.display()))?;
    draw_chart(&chart, results, subjects)
}

fn header(md: &mut String, command: &str, chart: &Path) -> Result<()> {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|m| m.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".to_owned());
    let cores = std::thread::available_parallelism().map_or(0, std::num::NonZero::get);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_owned();
    writeln!(md, "# Benchmarks\n")?;
    writeln!(
        md,
        "Written by `{command}` (in `xtask/src/bench/`). Machine: {cores} cores, {cpu}, \
         Linux {kernel}.\n"
    )?;
    writeln!(
        md,
        "Each repeat runs in a fresh network namespace on loopback (so no repeat inherits \
         another's TIME_WAIT sockets): the load generator and its backend (`bench/`, one \
         process), and the subject between them. `direct` is the \
         generator talking to the backend with no proxy: the limit of this machine. Each \
         cell is repeated; the table gives the median and (min-max). Ratios are between \
         medians of this one run. CPU s/GB is the whole machine's busy time (user, system, \
         softirq; from /proc/stat) per GB moved through the subject, generator and backend \
         included, so in-kernel forwarding is counted. Peak RSS is the subject's VmHWM during \
         the load (reset just before it, so start-up is not counted). On \
         2 cores the generator, the backend and the proxy share the CPUs: a proxy that \
         costs more CPU leaves less to the generator, which is part of what is measured.\n"
    )?;
    let file = chart
        .file_name()
        .and_then(|f| f.to_str())
        .unwrap_or("benchmarks.svg");
    writeln!(md, "![headline metric relative to direct]({file})\n")?;
    Ok(())
}

fn table(md: &mut String, results: &Results, subjects: &[Subject], w: Workload) -> Result<()> {
    let (key, unit) = w.headline();
    writeln!(md, "## {}\n", w.name())?;
    writeln!(
        md,
        "| subject | {unit} | vs direct | vs plain | vs best peer | other medians | CPU s/GB | peak RSS |"
    )?;
    writeln!(md, "|---|---|---|---|---|---|---|---|")?;
    let best = best_peer(results, w);
    for &s in subjects {
        let Some(samples) = results.get(&(w, s)) else {
            continue;
        };
        let head = median_of(results, w, s, key);
        let others: Vec<String> = samples[0]
            .metrics
            .keys()
            .filter(|k| !matches!(k.as_str(), "bytes" | "seconds") && *k != key)
            .map(|k| format!("{k} {}", fmt_num(spread(samples, metric(k)).median)))
            .collect();
        let rss = spread(samples, |x| {
            x.peak_rss_kib.map_or(f64::NAN, |k| {
                #[allow(clippy::cast_precision_loss)] // KiB counts are small
                let mib = k as f64 / 1024.0;
                mib
            })
        });
        writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            s.name(),
            fmt_spread(spread(samples, metric(key))),
            fmt_ratio(ratio(head, median_of(results, w, Subject::Direct, key))),
            fmt_ratio(ratio(head, median_of(results, w, Subject::Plain, key))),
            best.map_or_else(
                || "-".to_owned(),
                |(peer, median)| format!(
                    "{} ({})",
                    fmt_ratio(ratio(head, Some(median))),
                    peer.name()
                )
            ),
            others.join(", "),
            fmt_spread(spread(samples, Sample::cpu_per_gb)),
            if rss.median.is_nan() {
                "-".to_owned()
            } else {
                format!("{} MiB", fmt_num(rss.median))
            },
        )?;
    }
    writeln!(md)?;
    Ok(())
}

/// The targets, each judged on this run's medians.
/// Issue #21's targets: the ephemeral-port path, and `HAProxy` as the peer.
fn peer_targets(r: &Results) -> Vec<(&'static str, Option<f64>, bool)> {
    use Subject::{Haproxy, HaproxyClientPort, Plain};
    use Workload::{ConnectionsEphemeralPort, ConnectionsPerSecond, Flood, RequestResponse};
    let flood = |s| median_of(r, Flood, s, "down_mbit_s");
    let cps = |s| median_of(r, ConnectionsPerSecond, s, "connections_s");
    let ephemeral_cps = |s| median_of(r, ConnectionsEphemeralPort, s, "connections_s");
    let rr = |s| median_of(r, RequestResponse, s, "requests_s");
    vec![
        (
            "connections/s: --source-port ephemeral >= 1.0x the default (plain)",
            ratio(ephemeral_cps(Plain), cps(Plain)),
            true,
        ),
        (
            "request/response: plain >= 1.0x HAProxy usesrc",
            ratio(rr(Plain), rr(Haproxy)),
            true,
        ),
        (
            "connections/s, ephemeral port: plain >= 1.0x HAProxy usesrc clientip",
            ratio(ephemeral_cps(Plain), ephemeral_cps(Haproxy)),
            true,
        ),
        (
            "flood: plain >= 1.0x HAProxy usesrc",
            ratio(flood(Plain), flood(Haproxy)),
            true,
        ),
        (
            "request/response: plain >= 1.0x HAProxy usesrc client",
            ratio(rr(Plain), rr(HaproxyClientPort)),
            true,
        ),
        (
            "connections/s, client port kept: plain >= 1.0x HAProxy usesrc client",
            ratio(cps(Plain), cps(HaproxyClientPort)),
            true,
        ),
    ]
}

/// Issue #18: in every row plain mode (TCP) or mmproxy (UDP) at least
/// 1.2x the best of the other implementations.
fn best_peer_targets(r: &Results) -> Vec<(String, Option<f64>, bool)> {
    Workload::all()
        .into_iter()
        .filter_map(|w| {
            let (peer, median) = best_peer(r, w)?;
            let plain = median_of(r, w, Subject::Plain, w.headline().0);
            Some((
                format!(
                    "{}: plain >= 1.2x the best peer ({})",
                    w.name(),
                    peer.name()
                ),
                ratio(plain, Some(median)),
                true,
            ))
        })
        .collect()
}

fn targets(md: &mut String, r: &Results) -> Result<()> {
    use Subject::{Direct, Ebpf, GoMmproxy, Plain};
    use Workload::{Bulk, ConnectionsPerSecond, Flood, RequestResponse, Udp64, Udp1400};
    let flood = |s| median_of(r, Flood, s, "down_mbit_s");
    let p99 = |s| median_of(r, RequestResponse, s, "p99_us");
    let cps = |s| median_of(r, ConnectionsPerSecond, s, "connections_s");
    let udp = |w, s| median_of(r, w, s, "round_trips_s");
    let rows: Vec<(&str, Option<f64>, bool)> = vec![
        (
            "flood: ebpf >= 0.8x direct",
            ratio(flood(Ebpf), flood(Direct)),
            true,
        ),
        (
            "flood: ebpf >= 1.3x plain",
            ratio(flood(Ebpf), flood(Plain)),
            true,
        ),
        (
            "flood: plain >= 0.6x direct",
            ratio(flood(Plain), flood(Direct)),
            true,
        ),
        (
            "request/response p99: plain <= 1.5x direct",
            ratio(p99(Plain), p99(Direct)),
            false,
        ),
        (
            "request/response p99: ebpf <= 1.5x direct",
            ratio(p99(Ebpf), p99(Direct)),
            false,
        ),
        (
            "connections/s: plain >= 1.2x go-mmproxy",
            ratio(cps(Plain), cps(GoMmproxy)),
            true,
        ),
        (
            "connections/s: ebpf >= 1.2x go-mmproxy",
            ratio(cps(Ebpf), cps(GoMmproxy)),
            true,
        ),
        (
            "CPU s/GB flood: ebpf <= 0.7x plain",
            ratio(cpu_median(r, Flood, Ebpf), cpu_median(r, Flood, Plain)),
            false,
        ),
        (
            "CPU s/GB bulk: ebpf <= 0.7x plain",
            ratio(cpu_median(r, Bulk, Ebpf), cpu_median(r, Bulk, Plain)),
            false,
        ),
        (
            "UDP 64 B: mmproxy >= 1.5x go-mmproxy",
            ratio(udp(Udp64, Plain), udp(Udp64, GoMmproxy)),
            true,
        ),
        (
            "UDP 1400 B: mmproxy >= 1.5x go-mmproxy",
            ratio(udp(Udp1400, Plain), udp(Udp1400, GoMmproxy)),
            true,
        ),
    ];
    let rows: Vec<(String, Option<f64>, bool)> = rows
        .into_iter()
        .chain(peer_targets(r))
        .map(|(name, m, at_least)| (name.to_owned(), m, at_least))
        .chain(best_peer_targets(r))
        .collect();
    writeln!(md, "## Targets (issues #7, #18, #21), judged on this run\n")?;
    writeln!(md, "| target | measured | |")?;
    writeln!(md, "|---|---|---|")?;
    for (name, measured, at_least) in rows {
        let bound: f64 = name
            .rsplit_once("= ")
            .and_then(|(_, b)| b.split('x').next())
            .and_then(|b| b.parse().ok())
            .unwrap_or(f64::NAN);
        let verdict = match measured {
            None => "not measured",
            Some(m) if (at_least && m >= bound) || (!at_least && m <= bound) => "met",
            Some(_) => "**missed**",
        };
        writeln!(md, "| {name} | {} | {verdict} |", fmt_ratio(measured))?;
    }
    writeln!(md)?;
    Ok(())
}

fn draw_chart(path: &Path, results: &Results, subjects: &[Subject]) -> Result<()> {
    let colors = [
        RGBColor(120, 120, 120),
        RGBColor(31, 119, 180),
        RGBColor(44, 160, 44),
        RGBColor(214, 39, 40),
        RGBColor(148, 103, 189),
        RGBColor(255, 127, 14),
        RGBColor(140, 86, 75),
    ];
    let workloads = Workload::all();
    let groups = workloads.len();
    let per_group = subjects.len();
    let root = SVGBackend::new(path, (1000, 480)).into_drawing_area();
    root.fill(&WHITE).context("chart")?;
    #[allow(clippy::cast_precision_loss)] // a handful of groups
    let x_max = groups as f64;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Headline metric relative to direct (median of repeats)",
            ("sans-serif", 18),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(0f64..x_max, 0f64..1.6f64)
        .context("chart")?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(groups * 2 + 1)
        .x_label_formatter(&|x| {
            let i = x.floor();
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            let idx = i as usize;
            if (x - i - 0.5).abs() < 1e-6 && idx < groups {
                short_name(workloads[idx]).to_owned()
            } else {
                String::new()
            }
        })
        .y_desc("x direct")
        .draw()
        .context("chart")?;
    for (si, &s) in subjects.iter().enumerate() {
        let color = colors[si % colors.len()];
        let bars: Vec<Rectangle<(f64, f64)>> = workloads
            .iter()
            .enumerate()
            .filter_map(|(wi, &w)| {
                let key = w.headline().0;
                let r = ratio(
                    median_of(results, w, s, key),
                    median_of(results, w, Subject::Direct, key),
                )?;
                #[allow(clippy::cast_precision_loss)]
                let x0 = wi as f64 + 0.1 + 0.8 * si as f64 / per_group as f64;
                #[allow(clippy::cast_precision_loss)]
                let x1 = x0 + 0.8 / per_group as f64;
                Some(Rectangle::new(
                    [(x0, 0.0), (x1, r.min(1.6))],
                    color.filled(),
                ))
            })
            .collect();
        chart
            .draw_series(bars)
            .context("chart")?
            .label(s.name())
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], color.filled()));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .border_style(BLACK)
        .background_style(WHITE.mix(0.8))
        .draw()
        .context("chart")?;
    root.present().context("chart")?;
    Ok(())
}

fn short_name(w: Workload) -> &'static str {
    match w {
        Workload::Flood => "flood",
        Workload::Bulk => "bulk",
        Workload::RequestResponse => "req/resp",
        Workload::ConnectionsPerSecond => "conn/s",
        Workload::ConnectionsEphemeralPort => "conn/s eph.",
        Workload::Udp64 => "UDP 64 B",
        Workload::Udp1400 => "UDP 1400 B",
    }
}
