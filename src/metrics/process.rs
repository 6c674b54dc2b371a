//! The process's own families (RSS, CPU seconds, uptime), read from `/proc` when scraped.
//!
//! Read at scrape time rather than kept in instruments: the kernel already counts them, and
//! a counter copied from it stays monotonic because the kernel's is.

/// What `/proc/self` says about this process; `None` where it cannot be read (not Linux).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ProcessSample {
    pub rss_bytes: Option<u64>,
    pub cpu_seconds: Option<f64>,
    pub uptime_seconds: Option<f64>,
}

/// Clock ticks per second of `/proc/*/stat` times.
fn clock_ticks() -> f64 {
    // SAFETY: sysconf only reads a configuration value.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

fn page_size() -> u64 {
    // SAFETY: sysconf only reads a configuration value.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 { p as u64 } else { 4096 }
}

/// Parses `/proc/self/stat` (fields after the parenthesised command name, which may hold
/// spaces) into (utime + stime, starttime), in clock ticks.
fn parse_stat(stat: &str) -> Option<(u64, u64)> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state): utime is field 14, stime 15, starttime 22.
    let at = |n: usize| f.get(n - 3).and_then(|v| v.parse::<u64>().ok());
    Some((at(14)? + at(15)?, at(22)?))
}

/// Samples this process now.
pub fn sample() -> ProcessSample {
    let ticks = clock_ticks();
    let rss_bytes = std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map(|pages| pages * page_size());
    let stat = std::fs::read_to_string("/proc/self/stat").ok().and_then(|s| parse_stat(&s));
    let boot_uptime = std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<f64>().ok());
    ProcessSample {
        rss_bytes,
        cpu_seconds: stat.map(|(cpu, _)| cpu as f64 / ticks),
        uptime_seconds: match (stat, boot_uptime) {
            (Some((_, start)), Some(up)) => Some((up - start as f64 / ticks).max(0.0)),
            _ => None,
        },
    }
}

/// The process families in exposition text (no `# EOF`).
pub fn render() -> String {
    let s = sample();
    let mut w = super::expo::Writer::default();
    if let Some(b) = s.rss_bytes {
        w.family("twinkle_process_resident_memory_bytes", "gauge", "Resident set size.").sample(
            "twinkle_process_resident_memory_bytes",
            &[],
            b as f64,
        );
    }
    if let Some(c) = s.cpu_seconds {
        w.family("twinkle_process_cpu_seconds", "counter", "User and system CPU time.").sample(
            "twinkle_process_cpu_seconds_total",
            &[],
            c,
        );
    }
    if let Some(u) = s.uptime_seconds {
        w.family("twinkle_process_uptime_seconds", "gauge", "Seconds since the process started.")
            .sample("twinkle_process_uptime_seconds", &[], u);
    }
    w.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_found_after_a_command_name_with_spaces() {
        // pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt
        // utime stime cutime cstime priority nice threads itrealvalue starttime ...
        let stat = "42 (my (odd) cmd) S 1 42 42 0 -1 0 10 0 0 0 150 50 0 0 20 0 3 0 9000 123 456";
        assert_eq!(parse_stat(stat), Some((200, 9000)));
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn this_process_has_memory_cpu_and_uptime() {
        let s = sample();
        assert!(s.rss_bytes.is_some_and(|b| b > 0));
        assert!(s.cpu_seconds.is_some_and(|c| c >= 0.0));
        assert!(s.uptime_seconds.is_some_and(|u| u >= 0.0));
    }
}
