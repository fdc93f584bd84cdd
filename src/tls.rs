//! TLS to Postgres with rustls, and the libpq `sslmode` / `sslrootcert`
//! options tokio-postgres does not parse itself.
//!
//! | `sslmode` | encrypts | verifies the certificate chain | verifies the host name |
//! | --- | --- | --- | --- |
//! | `disable` | no | - | - |
//! | `prefer` (default) | if the server offers it | no | no |
//! | `require` | yes, or fail | no | no |
//! | `verify-ca` | yes, or fail | against `sslrootcert` | no |
//! | `verify-full` | yes, or fail | against `sslrootcert` | yes |
//!
//! As in libpq, `prefer` and `require` protect against eavesdropping only;
//! use `verify-full` to be sure of the server.

use std::path::PathBuf;
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use tokio_postgres::config::SslMode;

use crate::error::{Error, Result};

/// The TLS connector every connection of a [`PgStore`](crate::PgStore) uses.
pub type Tls = tokio_postgres_rustls::MakeRustlsConnect;

/// How connections are encrypted and the server checked, from `sslmode`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum TlsMode {
    /// Never encrypt.
    Disable,
    /// Encrypt when the server offers it, without checking its certificate.
    #[default]
    Prefer,
    /// Always encrypt, without checking the certificate.
    Require,
    /// Always encrypt; the certificate must chain to `root_cert`.
    VerifyCa {
        /// PEM file of the trusted certificate authorities.
        root_cert: PathBuf,
    },
    /// Always encrypt; the certificate must chain to `root_cert` and name
    /// the host connected to.
    VerifyFull {
        /// PEM file of the trusted certificate authorities.
        root_cert: PathBuf,
    },
}

/// Parses a libpq-style URL or key=value string into a connection config
/// and its TLS mode. Unlike tokio-postgres alone, it understands
/// `sslmode=verify-ca`, `sslmode=verify-full` and `sslrootcert=PATH`.
pub fn parse_url(url: &str) -> Result<(tokio_postgres::Config, TlsMode)> {
    let bad = Error::BadUrl;
    let mut sslmode = None;
    let mut rootcert = None;
    let mut take = |key: &str, value: &str| match key {
        "sslmode" => {
            sslmode = Some(value.to_owned());
            true
        }
        "sslrootcert" => {
            rootcert = Some(PathBuf::from(value));
            true
        }
        _ => false,
    };
    let rest = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        match url.split_once('?') {
            Some((base, query)) => {
                let kept: Vec<&str> = query
                    .split('&')
                    .filter(|pair| {
                        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                        !take(k, &percent_decode(v))
                    })
                    .collect();
                if kept.is_empty() {
                    base.to_owned()
                } else {
                    format!("{base}?{}", kept.join("&"))
                }
            }
            None => url.to_owned(),
        }
    } else {
        url.split_whitespace()
            .filter(|token| {
                let (k, v) = token.split_once('=').unwrap_or((token, ""));
                !take(k.trim(), v.trim().trim_matches('\''))
            })
            .collect::<Vec<_>>()
            .join(" ")
    };
    let mut config: tokio_postgres::Config = rest.parse().map_err(|e| bad(format!("{e}")))?;
    let need_root = |mode: &str| {
        rootcert.clone().ok_or_else(|| {
            bad(format!(
                "sslmode={mode} needs sslrootcert=PATH, the PEM file of the certificate authority to trust"
            ))
        })
    };
    let mode = match sslmode.as_deref() {
        None | Some("prefer") => TlsMode::Prefer,
        Some("disable") => TlsMode::Disable,
        Some("allow") => TlsMode::Prefer,
        Some("require") => TlsMode::Require,
        Some("verify-ca") => TlsMode::VerifyCa {
            root_cert: need_root("verify-ca")?,
        },
        Some("verify-full") => TlsMode::VerifyFull {
            root_cert: need_root("verify-full")?,
        },
        Some(other) => {
            return Err(bad(format!(
                "sslmode={other:?} is not one of disable, allow, prefer, require, verify-ca, verify-full"
            )));
        }
    };
    config.ssl_mode(match mode {
        TlsMode::Disable => SslMode::Disable,
        TlsMode::Prefer => SslMode::Prefer,
        _ => SslMode::Require,
    });
    Ok((config, mode))
}

/// The rustls connector for `mode`.
pub fn connector(mode: &TlsMode) -> Result<Tls> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Tls {
            what: "the protocol versions".into(),
            source: e.into(),
        })?;
    let verifier: Arc<dyn ServerCertVerifier> = match mode {
        TlsMode::Disable | TlsMode::Prefer | TlsMode::Require => Arc::new(EncryptOnly { provider }),
        TlsMode::VerifyCa { root_cert } => Arc::new(ChainOnly(webpki(root_cert, provider)?)),
        TlsMode::VerifyFull { root_cert } => webpki(root_cert, provider)?,
    };
    let config = builder
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
}

fn webpki(root_cert: &PathBuf, provider: Arc<CryptoProvider>) -> Result<Arc<WebPkiServerVerifier>> {
    let unreadable = |e: Box<dyn std::error::Error + Send + Sync>| Error::Tls {
        what: format!("reading sslrootcert {}", root_cert.display()),
        source: e,
    };
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(root_cert).map_err(|e| unreadable(e.into()))? {
        let cert = cert.map_err(|e| unreadable(e.into()))?;
        roots.add(cert).map_err(|e| unreadable(e.into()))?;
    }
    if roots.is_empty() {
        return Err(unreadable("no certificate in the file".into()));
    }
    WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
        .build()
        .map_err(|e| unreadable(e.into()))
}

/// `prefer` and `require`: accept any certificate, but still check that the
/// handshake is signed by the key in it.
#[derive(Debug)]
struct EncryptOnly {
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for EncryptOnly {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// `verify-ca`: the chain must verify; the name in the certificate need not
/// match the host.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

fn percent_decode(s: &str) -> String {
    fn hex(b: u8) -> Option<u8> {
        (b as char).to_digit(16).map(|d| d as u8)
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let (Some(&h), Some(&l)) = (bytes.get(i + 1), bytes.get(i + 2))
            && let (Some(h), Some(l)) = (hex(h), hex(l))
        {
            out.push(h * 16 + l);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verify_modes_are_taken_out_of_the_url() {
        let (config, mode) =
            parse_url("postgres://u@db.example:5433/app?sslmode=verify-full&sslrootcert=%2Fetc%2Fca.pem&application_name=x")
                .unwrap();
        assert_eq!(
            mode,
            TlsMode::VerifyFull {
                root_cert: "/etc/ca.pem".into()
            }
        );
        assert_eq!(config.get_ssl_mode(), SslMode::Require);
        assert_eq!(config.get_application_name(), Some("x"));
        assert_eq!(config.get_ports(), &[5433]);
    }

    #[test]
    fn key_value_strings_work_too() {
        let (config, mode) =
            parse_url("host=localhost user=u sslmode=verify-ca sslrootcert=/ca.pem").unwrap();
        assert_eq!(
            mode,
            TlsMode::VerifyCa {
                root_cert: "/ca.pem".into()
            }
        );
        assert_eq!(config.get_user(), Some("u"));
    }

    #[test]
    fn the_default_is_prefer_and_errors_name_the_problem() {
        assert_eq!(parse_url("postgres://u@h/d").unwrap().1, TlsMode::Prefer);
        let e = parse_url("postgres://u@h/d?sslmode=verify-full").unwrap_err();
        assert!(e.to_string().contains("needs sslrootcert"), "{e}");
        let e = parse_url("postgres://u@h/d?sslmode=sometimes").unwrap_err();
        assert!(e.to_string().contains("sslmode=\"sometimes\""), "{e}");
    }
}
