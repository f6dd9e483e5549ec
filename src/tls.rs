//! TLS for both kinds of connection (SQL through tokio-postgres, replication through our own
//! client), with libpq's `sslmode` meanings:
//!
//! | sslmode | TLS | server certificate checked |
//! |---|---|---|
//! | `disable` | never | - |
//! | `prefer` (default) | if the server offers it | only when `sslrootcert` is given (chain) |
//! | `require` | always | only when `sslrootcert` is given (chain) |
//! | `verify-ca` | always | chain, against `sslrootcert` or the system's roots |
//! | `verify-full` | always | chain and host name |
//!
//! tokio-postgres's URL parser knows neither `verify-ca`/`verify-full` nor `sslrootcert`, so
//! [`TlsSettings::split_url`] takes them out of the URL before it is parsed.

use std::path::PathBuf;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};

/// libpq's `sslmode`, all five that matter here (`allow` is treated as `prefer`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TlsMode {
    Disable,
    #[default]
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl TlsMode {
    fn parse(s: &str) -> Option<TlsMode> {
        Some(match s {
            "disable" => TlsMode::Disable,
            "allow" | "prefer" => TlsMode::Prefer,
            "require" => TlsMode::Require,
            "verify-ca" => TlsMode::VerifyCa,
            "verify-full" => TlsMode::VerifyFull,
            _ => return None,
        })
    }

    /// Whether a server without TLS is refused.
    pub fn required(self) -> bool {
        matches!(self, TlsMode::Require | TlsMode::VerifyCa | TlsMode::VerifyFull)
    }

    /// The closest mode tokio-postgres itself understands (certificate checks are ours).
    pub fn for_tokio_postgres(self) -> tokio_postgres::config::SslMode {
        use tokio_postgres::config::SslMode;
        match self {
            TlsMode::Disable => SslMode::Disable,
            TlsMode::Prefer => SslMode::Prefer,
            _ => SslMode::Require,
        }
    }
}

/// A node's TLS wishes, from its URL.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TlsSettings {
    pub mode: TlsMode,
    /// PEM file of the certificate authorities to trust (`sslrootcert`).
    pub root_cert: Option<PathBuf>,
}

/// Why TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{0}")]
    Url(String),
    #[error("cannot read sslrootcert {path}: {message}")]
    RootCert { path: String, message: String },
    #[error("no trusted root certificates: set sslrootcert=<file> in the URL")]
    NoRoots,
    #[error("TLS setup: {0}")]
    Rustls(#[from] rustls::Error),
}

impl TlsSettings {
    /// Splits `sslmode` and `sslrootcert` off a libpq URL (`postgresql://...?k=v&...`) or
    /// keyword/value string (`host=... sslmode=...`); returns the rest for tokio-postgres.
    pub fn split_url(url: &str) -> Result<(String, TlsSettings), TlsError> {
        let mut settings = TlsSettings::default();
        let mut take = |key: &str, value: &str| -> Result<bool, TlsError> {
            match key {
                "sslmode" => {
                    settings.mode = TlsMode::parse(value).ok_or_else(|| {
                        TlsError::Url(format!(
                            "sslmode={value} is not one of disable, allow, prefer, require, verify-ca, verify-full"
                        ))
                    })?;
                    Ok(true)
                }
                "sslrootcert" => {
                    settings.root_cert = Some(PathBuf::from(value));
                    Ok(true)
                }
                _ => Ok(false),
            }
        };
        let rest = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            match url.split_once('?') {
                None => url.to_string(),
                Some((base, query)) => {
                    let mut kept = Vec::new();
                    for pair in query.split('&').filter(|p| !p.is_empty()) {
                        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                        if !take(k, &percent_decode(v))? {
                            kept.push(pair);
                        }
                    }
                    if kept.is_empty() { base.to_string() } else { format!("{base}?{}", kept.join("&")) }
                }
            }
        } else {
            let mut kept = Vec::new();
            for word in url.split_whitespace() {
                let (k, v) = word.split_once('=').unwrap_or((word, ""));
                if !take(k.trim(), v.trim().trim_matches('\''))? {
                    kept.push(word);
                }
            }
            kept.join(" ")
        };
        Ok((rest, settings))
    }

    /// The rustls configuration for these settings (certificate checks per the table above).
    pub fn client_config(&self) -> Result<Arc<ClientConfig>, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(provider.clone()).with_safe_default_protocol_versions()?;
        let check_chain = match self.mode {
            TlsMode::VerifyCa | TlsMode::VerifyFull => true,
            _ => self.root_cert.is_some(),
        };
        let config = if !check_chain {
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AcceptAnyCertificate(provider)))
                .with_no_client_auth()
        } else {
            let roots = Arc::new(self.roots()?);
            let webpki = WebPkiServerVerifier::builder_with_provider(roots, provider).build().map_err(|e| {
                TlsError::Url(format!("cannot use the trusted roots: {e}"))
            })?;
            if self.mode == TlsMode::VerifyFull {
                builder.with_webpki_verifier(webpki).with_no_client_auth()
            } else {
                builder
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::new(ChainOnly(webpki)))
                    .with_no_client_auth()
            }
        };
        Ok(Arc::new(config))
    }

    fn roots(&self) -> Result<RootCertStore, TlsError> {
        let mut roots = RootCertStore::empty();
        match &self.root_cert {
            Some(path) => {
                let err = |message: String| TlsError::RootCert { path: path.display().to_string(), message };
                let certs = CertificateDer::pem_file_iter(path).map_err(|e| err(e.to_string()))?;
                for cert in certs {
                    roots.add(cert.map_err(|e| err(e.to_string()))?).map_err(|e| err(e.to_string()))?;
                }
            }
            None => {
                for cert in rustls_native_certs::load_native_certs().certs {
                    // A system root rustls cannot parse is skipped, as browsers do.
                    let _ = roots.add(cert);
                }
            }
        }
        if roots.is_empty() {
            return Err(TlsError::NoRoots);
        }
        Ok(roots)
    }
}

/// `%XX` decoding of a URL query value.
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(v) = s.get(i + 1..i + 3).and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `require`/`prefer` without `sslrootcert`: encryption without authentication of the server,
/// as libpq does. Handshake signatures are still checked.
#[derive(Debug)]
struct AcceptAnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AcceptAnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `verify-ca`: the chain must lead to a trusted root; the host name is not compared.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self.0.verify_server_cert(end_entity, intermediates, server_name, ocsp, now) {
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
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_tls_keys_off_urls() {
        let (rest, s) =
            TlsSettings::split_url("postgresql://u:p@h:5432/db?sslmode=verify-full&application_name=x&sslrootcert=%2Ftmp%2Fca.pem")
                .unwrap();
        assert_eq!(rest, "postgresql://u:p@h:5432/db?application_name=x");
        assert_eq!(s, TlsSettings { mode: TlsMode::VerifyFull, root_cert: Some("/tmp/ca.pem".into()) });
        let (rest, s) = TlsSettings::split_url("host=h dbname=db sslmode=require").unwrap();
        assert_eq!(rest, "host=h dbname=db");
        assert_eq!(s.mode, TlsMode::Require);
        let (rest, s) = TlsSettings::split_url("postgresql://h/db").unwrap();
        assert_eq!((rest.as_str(), s), ("postgresql://h/db", TlsSettings::default()));
        let e = TlsSettings::split_url("postgresql://h/db?sslmode=sure").unwrap_err().to_string();
        assert!(e.contains("sslmode=sure"), "{e}");
    }

    #[test]
    fn configs_build_for_every_mode() {
        for mode in [TlsMode::Prefer, TlsMode::Require] {
            TlsSettings { mode, root_cert: None }.client_config().unwrap();
        }
        let e = TlsSettings { mode: TlsMode::VerifyFull, root_cert: Some("/nonexistent/ca.pem".into()) }
            .client_config()
            .unwrap_err()
            .to_string();
        assert!(e.contains("/nonexistent/ca.pem"), "{e}");
    }
}
