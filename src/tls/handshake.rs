//! Why a TLS handshake failed, in the few words `abproxy_tls_handshake_failures_total` uses.

use std::io;

use rustls::{AlertDescription, PeerIncompatible};

/// The `reason` label of a failed handshake; a small fixed set, so series stay bounded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandshakeFailure {
    /// No finished handshake within `handshake_timeout` (including a client that never
    /// sends a ClientHello).
    Timeout,
    /// The bytes are not TLS: plain HTTP on the TLS port (answered 400), or garbage.
    NotTls,
    /// The client hung up mid-handshake.
    Closed,
    /// A client certificate is required and the client sent none.
    NoCertificate,
    /// A certificate was refused: the client's failed verification, or the client refused
    /// ours.
    BadCertificate,
    /// The client offers only TLS versions older than 1.2.
    ProtocolVersion,
    /// No cipher suite, key exchange group or signature scheme in common.
    NoSharedCipher,
    /// Any other TLS error.
    Handshake,
}

impl HandshakeFailure {
    pub const ALL: [HandshakeFailure; 8] = [
        HandshakeFailure::Timeout,
        HandshakeFailure::NotTls,
        HandshakeFailure::Closed,
        HandshakeFailure::NoCertificate,
        HandshakeFailure::BadCertificate,
        HandshakeFailure::ProtocolVersion,
        HandshakeFailure::NoSharedCipher,
        HandshakeFailure::Handshake,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            HandshakeFailure::Timeout => "timeout",
            HandshakeFailure::NotTls => "not_tls",
            HandshakeFailure::Closed => "closed",
            HandshakeFailure::NoCertificate => "no_certificate",
            HandshakeFailure::BadCertificate => "bad_certificate",
            HandshakeFailure::ProtocolVersion => "protocol_version",
            HandshakeFailure::NoSharedCipher => "no_shared_cipher",
            HandshakeFailure::Handshake => "handshake",
        }
    }

    /// Classifies the error a handshake ended with (tokio-rustls wraps rustls's errors in
    /// `io::Error`s).
    pub fn of(err: &io::Error) -> HandshakeFailure {
        if let Some(tls) = err
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        {
            return Self::of_tls(tls);
        }
        match err.kind() {
            io::ErrorKind::UnexpectedEof
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::WriteZero => HandshakeFailure::Closed,
            io::ErrorKind::TimedOut => HandshakeFailure::Timeout,
            _ => HandshakeFailure::Handshake,
        }
    }

    fn of_tls(err: &rustls::Error) -> HandshakeFailure {
        use rustls::Error;
        match err {
            Error::InvalidMessage(_) => HandshakeFailure::NotTls,
            Error::NoCertificatesPresented => HandshakeFailure::NoCertificate,
            Error::InvalidCertificate(_) => HandshakeFailure::BadCertificate,
            Error::PeerIncompatible(incompatible) => match incompatible {
                // TLS 1.0 and 1.1 clients send no signature_algorithms (it came with 1.2),
                // and rustls asks for it before it looks at the version.
                PeerIncompatible::SignatureAlgorithmsExtensionRequired
                | PeerIncompatible::Tls12NotOffered
                | PeerIncompatible::Tls12NotOfferedOrEnabled
                | PeerIncompatible::SupportedVersionsExtensionRequired => {
                    HandshakeFailure::ProtocolVersion
                }
                PeerIncompatible::NoCipherSuitesInCommon
                | PeerIncompatible::NoKxGroupsInCommon
                | PeerIncompatible::NoSignatureSchemesInCommon
                | PeerIncompatible::NoCertificateRequestSignatureSchemesInCommon
                | PeerIncompatible::NoEcPointFormatsInCommon => HandshakeFailure::NoSharedCipher,
                _ => HandshakeFailure::Handshake,
            },
            Error::AlertReceived(alert) => match alert {
                AlertDescription::BadCertificate
                | AlertDescription::UnsupportedCertificate
                | AlertDescription::CertificateRevoked
                | AlertDescription::CertificateExpired
                | AlertDescription::CertificateUnknown
                | AlertDescription::UnknownCA
                | AlertDescription::BadCertificateStatusResponse => {
                    HandshakeFailure::BadCertificate
                }
                AlertDescription::CertificateRequired => HandshakeFailure::NoCertificate,
                AlertDescription::ProtocolVersion => HandshakeFailure::ProtocolVersion,
                AlertDescription::HandshakeFailure | AlertDescription::InsufficientSecurity => {
                    HandshakeFailure::NoSharedCipher
                }
                AlertDescription::CloseNotify | AlertDescription::UserCanceled => {
                    HandshakeFailure::Closed
                }
                _ => HandshakeFailure::Handshake,
            },
            _ => HandshakeFailure::Handshake,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wrapped(err: rustls::Error) -> io::Error {
        io::Error::new(io::ErrorKind::InvalidData, err)
    }

    #[test]
    fn tls_errors_map_to_their_reasons() {
        use rustls::{CertificateError, Error, InvalidMessage};
        let cases = [
            (
                Error::InvalidMessage(InvalidMessage::InvalidContentType),
                "not_tls",
            ),
            (Error::NoCertificatesPresented, "no_certificate"),
            (
                Error::InvalidCertificate(CertificateError::UnknownIssuer),
                "bad_certificate",
            ),
            (PeerIncompatible::Tls12NotOffered.into(), "protocol_version"),
            (
                PeerIncompatible::NoCipherSuitesInCommon.into(),
                "no_shared_cipher",
            ),
            (
                Error::AlertReceived(AlertDescription::UnknownCA),
                "bad_certificate",
            ),
            (Error::DecryptError, "handshake"),
        ];
        for (err, reason) in cases {
            let shown = format!("{err:?}");
            assert_eq!(
                HandshakeFailure::of(&wrapped(err)).as_str(),
                reason,
                "{shown}"
            );
        }
    }

    #[test]
    fn a_peer_hanging_up_is_closed() {
        let eof = io::Error::new(io::ErrorKind::UnexpectedEof, "tls handshake eof");
        assert_eq!(HandshakeFailure::of(&eof), HandshakeFailure::Closed);
        let reset = io::Error::from(io::ErrorKind::ConnectionReset);
        assert_eq!(HandshakeFailure::of(&reset), HandshakeFailure::Closed);
    }
}
