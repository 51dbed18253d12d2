//! The agent process's own CPU and memory, for heartbeat reports (Linux `/proc`; zeros
//! elsewhere).

use std::time::Instant;

/// Samples CPU use between calls.
#[derive(Debug)]
pub struct ProcessSampler {
    last: Option<(Instant, u64)>,
}

/// Clock ticks per second of `/proc/self/stat` (`USER_HZ`; 100 on every Linux in practice).
const TICKS_PER_SEC: f64 = 100.0;
/// Bytes per page of `/proc/self/statm` (4 KiB on the platforms we run on).
const PAGE_BYTES: u64 = 4096;

impl Default for ProcessSampler {
    fn default() -> Self {
        Self::new()
    }
}

impl ProcessSampler {
    /// A sampler; the first CPU figure is 0.
    #[must_use]
    pub fn new() -> Self {
        Self { last: None }
    }

    /// (CPU percent of one core since the last call, resident bytes).
    #[allow(clippy::cast_precision_loss, reason = "tick counts are small")]
    pub fn sample(&mut self) -> (f64, u64) {
        let now = Instant::now();
        let ticks = cpu_ticks();
        let cpu = match (self.last, ticks) {
            (Some((at, before)), Some(ticks)) => {
                let secs = now.duration_since(at).as_secs_f64();
                if secs > 0.0 {
                    (ticks.saturating_sub(before) as f64 / TICKS_PER_SEC) / secs * 100.0
                } else {
                    0.0
                }
            }
            _ => 0.0,
        };
        if let Some(ticks) = ticks {
            self.last = Some((now, ticks));
        }
        (cpu, resident_bytes().unwrap_or(0))
    }
}

/// utime + stime of this process, in clock ticks.
fn cpu_ticks() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The command name may hold spaces; fields restart after its closing parenthesis.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After ')': state is field 3 of the file; utime and stime are fields 14 and 15.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * PAGE_BYTES)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_a_running_process_has_memory_and_cpu_is_measured_between_samples() {
        let mut s = ProcessSampler::new();
        let (first_cpu, memory) = s.sample();
        assert!(first_cpu.abs() < f64::EPSILON);
        if cfg!(target_os = "linux") {
            assert!(memory > 1024 * 1024, "resident {memory}");
            let mut x = 0u64;
            for i in 0..5_000_000u64 {
                x = x.wrapping_mul(31).wrapping_add(i);
            }
            std::hint::black_box(x);
            let (cpu, _) = s.sample();
            assert!(cpu >= 0.0);
        }
    }
}
