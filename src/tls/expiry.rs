//! A certificate's `notAfter`, read straight from its DER for `/status`: rustls does not
//! expose it, and a whole X.509 parser is not worth one field.

const SEQUENCE: u8 = 0x30;
const INTEGER: u8 = 0x02;
const EXPLICIT_VERSION: u8 = 0xa0;
const UTC_TIME: u8 = 0x17;
const GENERALIZED_TIME: u8 = 0x18;

/// When the certificate expires, as RFC 3339 (`2030-01-31T12:00:00Z`); `None` when the DER
/// is not shaped as RFC 5280 says.
pub(super) fn not_after(der: &[u8]) -> Option<String> {
    let (certificate, _) = element(der)?.expect(SEQUENCE)?;
    let (mut tbs, _) = element(certificate)?.expect(SEQUENCE)?;
    if tbs.first() == Some(&EXPLICIT_VERSION) {
        tbs = element(tbs)?.2;
    }
    let (_, rest) = element(tbs)?.expect(INTEGER)?; // serialNumber
    let (_, rest) = element(rest)?.expect(SEQUENCE)?; // signature
    let (_, rest) = element(rest)?.expect(SEQUENCE)?; // issuer
    let (validity, _) = element(rest)?.expect(SEQUENCE)?;
    let (_, _, rest) = element(validity)?; // notBefore
    let (tag, time, _) = element(rest)?;
    let text = std::str::from_utf8(time).ok()?;
    let digits = text.strip_suffix('Z')?;
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let (year, rest) = match (tag, digits.len()) {
        // RFC 5280 §4.1.2.5.1: two-digit years 50..99 are 19xx.
        (UTC_TIME, 12) => {
            let yy: u32 = digits[..2].parse().ok()?;
            (if yy >= 50 { 1900 + yy } else { 2000 + yy }, &digits[2..])
        }
        (GENERALIZED_TIME, 14) => (digits[..4].parse().ok()?, &digits[4..]),
        _ => return None,
    };
    let part = |at: usize| &rest[at..at + 2];
    Some(format!(
        "{year:04}-{}-{}T{}:{}:{}Z",
        part(0),
        part(2),
        part(4),
        part(6),
        part(8)
    ))
}

/// The tag, contents and what follows of the DER element at the start of `input`.
fn element(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, input) = input.split_first()?;
    let (&first, input) = input.split_first()?;
    let (length, input) = if first < 0x80 {
        (usize::from(first), input)
    } else {
        let count = usize::from(first & 0x7f);
        if count == 0 || count > 4 || input.len() < count {
            return None;
        }
        let (bytes, input) = input.split_at(count);
        let length = bytes
            .iter()
            .fold(0usize, |length, &byte| length << 8 | usize::from(byte));
        (length, input)
    };
    if input.len() < length {
        return None;
    }
    let (contents, rest) = input.split_at(length);
    Some((tag, contents, rest))
}

trait Expect<'a> {
    fn expect(self, tag: u8) -> Option<(&'a [u8], &'a [u8])>;
}

impl<'a> Expect<'a> for (u8, &'a [u8], &'a [u8]) {
    fn expect(self, tag: u8) -> Option<(&'a [u8], &'a [u8])> {
        (self.0 == tag).then_some((self.1, self.2))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn certificate_expiring(year: i32) -> Vec<u8> {
        let mut params = rcgen::CertificateParams::new(vec!["a.test".to_owned()]).expect("params");
        params.not_after = rcgen::date_time_ymd(year, 7, 31);
        let key = rcgen::KeyPair::generate().expect("key");
        params.self_signed(&key).expect("cert").der().to_vec()
    }

    #[test]
    fn utc_and_generalized_times_are_read() {
        assert_eq!(
            not_after(&certificate_expiring(2031)).as_deref(),
            Some("2031-07-31T00:00:00Z")
        );
        // Years from 2050 on are written as GeneralizedTime.
        assert_eq!(
            not_after(&certificate_expiring(2061)).as_deref(),
            Some("2061-07-31T00:00:00Z")
        );
    }

    #[test]
    fn truncated_or_foreign_der_is_none_not_a_panic() {
        let der = certificate_expiring(2031);
        for cut in 0..der.len() {
            let _ = not_after(&der[..cut]);
        }
        assert_eq!(not_after(b"not DER at all"), None);
        assert_eq!(not_after(&[]), None);
    }
}
