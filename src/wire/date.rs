//! The `Date` an answer carries (RFC 9110 §6.6.1), formatted once a second per thread.

use std::cell::RefCell;
use std::time::{Duration, UNIX_EPOCH};

use crate::clock;

/// `Sun, 06 Nov 1994 08:49:37 GMT`: always 29 bytes.
const LENGTH: usize = 29;

pub(crate) struct Date;

struct Cached {
    second: u64,
    text: [u8; LENGTH],
}

thread_local! {
    static CACHED: RefCell<Cached> = const { RefCell::new(Cached { second: u64::MAX, text: [0; LENGTH] }) };
}

impl Date {
    /// Appends `date: <now>\r\n`.
    pub(crate) fn write_line(buffer: &mut Vec<u8>) {
        let second = clock::coarse_unix_seconds();
        CACHED.with_borrow_mut(|cached| {
            if cached.second != second {
                let text = httpdate::fmt_http_date(UNIX_EPOCH + Duration::from_secs(second));
                if text.len() == LENGTH {
                    cached.text.copy_from_slice(text.as_bytes());
                    cached.second = second;
                }
            }
            buffer.extend_from_slice(b"date: ");
            buffer.extend_from_slice(&cached.text);
            buffer.extend_from_slice(b"\r\n");
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::SystemTime;

    #[test]
    fn the_date_line_is_an_http_date_of_now() {
        let mut line = Vec::new();
        Date::write_line(&mut line);
        let line = String::from_utf8(line).expect("ascii");
        let value = line
            .strip_prefix("date: ")
            .and_then(|rest| rest.strip_suffix("\r\n"))
            .expect("a date line");
        let parsed = httpdate::parse_http_date(value).expect("an HTTP date");
        let skew = SystemTime::now()
            .duration_since(parsed)
            .expect("not in the future");
        assert!(skew.as_secs() <= 1, "{value} is not now");
    }
}
