//! One log line per interval for a failure that repeats per request (a storage or ledger
//! outage fails every call): the first at once, then at most one per `every`, each
//! counting the lines left out since the last.

use std::sync::Mutex;
use std::time::{Duration, Instant};

pub struct LogEvery {
    every: Duration,
    /// When the last line was written, and how many were left out since.
    last: Mutex<(Option<Instant>, u64)>,
}

impl LogEvery {
    pub const fn new(every: Duration) -> Self {
        LogEvery {
            every,
            last: Mutex::new((None, 0)),
        }
    }

    /// `Some(left out since the last line)` when a line may be written now.
    pub fn due(&self) -> Option<u64> {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        if last.0.is_none_or(|t| t.elapsed() >= self.every) {
            last.0 = Some(Instant::now());
            Some(std::mem::take(&mut last.1))
        } else {
            last.1 += 1;
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_line_goes_out_then_one_per_interval_with_the_count_left_out() {
        let log = LogEvery::new(Duration::from_millis(50));
        assert_eq!(log.due(), Some(0));
        assert_eq!(log.due(), None);
        assert_eq!(log.due(), None);
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(log.due(), Some(2));
        assert_eq!(log.due(), None);
    }
}
