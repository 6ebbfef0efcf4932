//! CPU time of another process (the server under test), from /proc/PID/stat, to tell how much
//! server CPU each request costs independently of which side saturates first.

use std::time::Duration;

use crate::driver::Window;

/// Clock ticks per second of /proc's utime and stime: USER_HZ, 100 on Linux for every
/// architecture it reports to user space this way.
const TICKS_PER_SECOND: f64 = 100.0;

/// User plus system CPU seconds consumed so far by every thread of `pid`.
pub fn process_cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may contain spaces: count fields after
    // the last ')'. utime and stime are fields 14 and 15, so the 12th and 13th after it.
    let after_name = &stat[stat.rfind(')')? + 1..];
    let mut fields = after_name.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some((utime + stime) as f64 / TICKS_PER_SECOND)
}

/// The CPU seconds `pid` used during the measured part of `window`, if a pid was given and
/// /proc could be read.
pub async fn server_cpu_during(pid: Option<u32>, window: Window) -> Option<f64> {
    let pid = pid?;
    tokio::time::sleep_until(window.measure_from.into()).await;
    let start = process_cpu_seconds(pid)?;
    tokio::time::sleep_until(window.until.into()).await;
    let end = process_cpu_seconds(pid)?;
    // Below one tick per second of window the figure is mostly rounding.
    (window.measured() >= Duration::from_secs(1)).then_some(end - start)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_own_cpu_time() {
        let own = process_cpu_seconds(std::process::id()).expect("/proc/self/stat is readable");
        assert!(own >= 0.0);
    }
}
