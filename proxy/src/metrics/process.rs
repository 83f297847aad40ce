//! The standard process metrics every Prometheus exporter (and Linkerd's proxy) exports,
//! read from `/proc/self` at each scrape: `process_cpu_seconds_total`,
//! `process_resident_memory_bytes`, `process_virtual_memory_bytes`, `process_open_fds`,
//! `process_max_fds`, `process_start_time_seconds`.
//!
//! A value that cannot be read (no `/proc`, say) is left out of the scrape rather than
//! reported as zero, which would be a wrong value rather than a missing one.

use std::fmt;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;

/// The fields of `/proc/self/stat` we use, in clock ticks and pages as the kernel gives
/// them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stat {
    utime: u64,
    stime: u64,
    starttime: u64,
    vsize: u64,
    rss_pages: u64,
}

/// Parses `/proc/self/stat`. The command name (field 2) is in parentheses and may hold
/// spaces and parentheses itself, so fields are counted from the last `)`.
fn parse_stat(text: &str) -> Option<Stat> {
    let rest = &text[text.rfind(')')? + 1..];
    // rest[0] is field 3 (state): field N is rest[N - 3].
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |n: usize| fields.get(n - 3)?.parse::<u64>().ok();
    Some(Stat {
        utime: field(14)?,
        stime: field(15)?,
        starttime: field(22)?,
        vsize: field(23)?,
        rss_pages: field(24)?,
    })
}

/// The boot time in seconds since the epoch: the `btime` line of `/proc/stat`.
fn parse_btime(text: &str) -> Option<u64> {
    text.lines()
        .find_map(|line| line.strip_prefix("btime "))
        .and_then(|value| value.trim().parse().ok())
}

/// Encodes the process metrics at each scrape.
#[derive(Debug)]
pub(super) struct ProcessCollector;

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> fmt::Result {
        use nix::unistd::{sysconf, SysconfVar};
        let sysconf = |var| {
            sysconf(var)
                .ok()
                .flatten()
                .and_then(|v| u64::try_from(v).ok())
        };
        let ticks = sysconf(SysconfVar::CLK_TCK).filter(|t| *t > 0);
        let page = sysconf(SysconfVar::PAGE_SIZE);
        let stat = std::fs::read_to_string("/proc/self/stat")
            .ok()
            .and_then(|text| parse_stat(&text));
        let btime = std::fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|text| parse_btime(&text));

        if let (Some(stat), Some(ticks)) = (stat, ticks) {
            let cpu = (stat.utime + stat.stime) as f64 / ticks as f64;
            let metric = encoder.encode_descriptor(
                "process_cpu_seconds",
                "Total user and system CPU time spent in seconds.",
                None,
                MetricType::Counter,
            )?;
            ConstCounter::new(cpu).encode(metric)?;
        }
        let mut gauge = |name: &str, help: &str, value: Option<f64>| -> fmt::Result {
            if let Some(value) = value {
                let metric = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
                ConstGauge::new(value).encode(metric)?;
            }
            Ok(())
        };
        gauge(
            "process_resident_memory_bytes",
            "Resident memory size in bytes.",
            stat.zip(page).map(|(s, page)| (s.rss_pages * page) as f64),
        )?;
        gauge(
            "process_virtual_memory_bytes",
            "Virtual memory size in bytes.",
            stat.map(|s| s.vsize as f64),
        )?;
        gauge(
            "process_open_fds",
            "Number of open file descriptors.",
            std::fs::read_dir("/proc/self/fd")
                .ok()
                // The directory handle itself is one of the entries: not counted.
                .map(|dir| dir.count().saturating_sub(1) as f64),
        )?;
        gauge(
            "process_max_fds",
            "Maximum number of open file descriptors.",
            nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
                .ok()
                .map(|(soft, _)| soft as f64),
        )?;
        gauge(
            "process_start_time_seconds",
            "Start time of the process since unix epoch in seconds.",
            match (stat, btime, ticks) {
                (Some(stat), Some(btime), Some(ticks)) => {
                    Some(btime as f64 + stat.starttime as f64 / ticks as f64)
                }
                _ => None,
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_counted_from_the_last_parenthesis() {
        // A command name with a space and a parenthesis, as a process may name itself.
        let text = "4242 (mesh) proxy) S 1 4242 4242 0 -1 4194560 900 0 0 0 \
                    150 50 0 0 20 0 3 0 12345 1048576 256 18446744073709551615 \
                    1 1 0 0 0 0 0 0 0 0 0 0 17 0 0 0 0 0 0";
        assert_eq!(
            parse_stat(text),
            Some(Stat {
                utime: 150,
                stime: 50,
                starttime: 12345,
                vsize: 1048576,
                rss_pages: 256,
            })
        );
        assert_eq!(parse_stat("4242 (x) S 1"), None);
        assert_eq!(parse_stat(""), None);
    }

    #[test]
    fn btime_is_read_from_proc_stat() {
        assert_eq!(
            parse_btime("cpu  1 2 3\nbtime 1764403200\nprocesses 7\n"),
            Some(1764403200)
        );
        assert_eq!(parse_btime("cpu 1\n"), None);
    }
}
