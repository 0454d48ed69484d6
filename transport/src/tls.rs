//! Trust: which certificates a process presents and which CA it believes.
//!
//! Two sources, chosen once at start-up and named in the log by
//! [`Trust::describe`]:
//!
//! - **Files** (production): `--cert` and `--key` (PEM) are what this process
//!   presents; `--ca` (PEM, one or more certificates) is what it trusts, as a
//!   client and, with [`TlsConfig::server_config_mutual`], to verify client
//!   certificates. A pure client needs only `--ca`; a pure server only
//!   `--cert` and `--key`.
//! - **Development CA** (the default when no certificate flag is given): a CA
//!   kept in the data directory (`$STATECAST_DATA`, else `./.statecast`),
//!   created by the first process that needs it. Every process then issues
//!   itself a fresh leaf certificate in memory for `localhost`, `127.0.0.1`,
//!   `::1` and any extra names, and trusts that CA, so origin, relays and
//!   clients on one machine trust each other with no set-up and without
//!   trusting anything else.
//!
//! ## The development CA on disk
//!
//! | file | holds | mode |
//! | --- | --- | --- |
//! | `ca-key.pem` | the CA's private key (PKCS#8) followed by its certificate | 0600 |
//! | `ca.pem` | the CA certificate alone, to hand to other tools | 0644 |
//!
//! `ca-key.pem` is the source of truth and is only ever created whole: a
//! process writes a temporary file, flushes it, and hard-links it to the final
//! name, which fails if another process got there first. The loser discards
//! its own CA and loads the winner's. So any number of processes may start at
//! once and all end up trusting one CA; a reader never sees a half-written
//! key. `ca.pem` is derived from it (temporary file, then rename; every writer
//! writes the same bytes).
//!
//! The key and certificate are ECDSA P-256. The CA is valid for ten years and
//! may not sign intermediates; leaves are valid for a year from issue (a
//! process issues its own at every start) and carry both the server and the
//! client extended key usages, so the same leaf serves mutual TLS between
//! relays and origins.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use time::{Duration as TimeDuration, OffsetDateTime};

use crate::quic::TransportTuning;

/// Environment variable that names the data directory.
pub const DATA_DIR_ENV: &str = "STATECAST_DATA";

/// Data directory used when [`DATA_DIR_ENV`] is unset or empty, relative to
/// the working directory.
pub const DEFAULT_DATA_DIR: &str = ".statecast";

/// Names every development leaf certificate is valid for.
pub const DEV_NAMES: [&str; 3] = ["localhost", "127.0.0.1", "::1"];

/// File name of the development CA's key and certificate bundle.
pub const DEV_CA_KEY_FILE: &str = "ca-key.pem";

/// File name of the development CA certificate alone.
pub const DEV_CA_CERT_FILE: &str = "ca.pem";

const DEV_CA_COMMON_NAME: &str = "statecast development CA";
const DEV_CA_ORGANIZATION: &str = "statecast (local development only)";
/// Ten years: long enough that nobody meets it on a development machine.
const DEV_CA_VALIDITY_DAYS: i64 = 3650;
/// A year: leaves are issued at every process start, so this only bounds a
/// single process's uptime.
const DEV_LEAF_VALIDITY_DAYS: i64 = 365;
/// Clock skew tolerated between processes on one machine (and a VM's clock).
const BACKDATE_HOURS: i64 = 1;

/// The data directory: `$STATECAST_DATA` if set and non-empty, else
/// `./.statecast`.
pub fn default_data_dir() -> PathBuf {
    match std::env::var_os(DATA_DIR_ENV) {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => PathBuf::from(DEFAULT_DATA_DIR),
    }
}

/// The ring crypto provider, the only one statecast uses.
pub fn crypto_provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Where a process's certificates come from: the choice, before anything is
/// read. [`Trust::load`] turns it into a [`TlsConfig`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Trust {
    /// Certificates from PEM files (production).
    Files {
        /// Certificate chain this process presents, leaf first.
        cert: Option<PathBuf>,
        /// Private key for `cert` (PKCS#8, PKCS#1 or SEC1).
        key: Option<PathBuf>,
        /// CA certificate(s) this process trusts.
        ca: Option<PathBuf>,
    },
    /// A local development CA kept in `dir`, created on first use.
    DevCa {
        /// The data directory holding the CA.
        dir: PathBuf,
        /// Names the leaf is valid for besides [`DEV_NAMES`].
        extra_names: Vec<String>,
    },
}

impl Trust {
    /// The trust that command-line flags ask for: files if any of `cert`,
    /// `key` or `ca` is given, otherwise the development CA in `data_dir`
    /// (or [`default_data_dir`]).
    pub fn from_flags(
        cert: Option<PathBuf>,
        key: Option<PathBuf>,
        ca: Option<PathBuf>,
        data_dir: Option<PathBuf>,
    ) -> Trust {
        if cert.is_none() && key.is_none() && ca.is_none() {
            Trust::dev(data_dir.unwrap_or_else(default_data_dir))
        } else {
            Trust::Files { cert, key, ca }
        }
    }

    /// The development CA in `dir`, with the default names.
    pub fn dev(dir: impl Into<PathBuf>) -> Trust {
        Trust::DevCa {
            dir: dir.into(),
            extra_names: Vec::new(),
        }
    }

    /// Adds names (DNS names or IP addresses) to the development leaf
    /// certificate. No effect on [`Trust::Files`].
    pub fn with_names<I, S>(mut self, names: I) -> Trust
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        if let Trust::DevCa { extra_names, .. } = &mut self {
            for name in names {
                let name = name.into();
                if !DEV_NAMES.contains(&name.as_str()) && !extra_names.contains(&name) {
                    extra_names.push(name);
                }
            }
        }
        self
    }

    /// One line for the start-up log saying plainly which trust is in use.
    pub fn describe(&self) -> String {
        match self {
            Trust::DevCa { dir, .. } => format!(
                "development CA at {} (self-made, local only)",
                dir.join(DEV_CA_CERT_FILE).display()
            ),
            Trust::Files { cert, key, ca } => {
                let mut parts = Vec::new();
                match (cert, key) {
                    (Some(cert), Some(key)) => parts.push(format!(
                        "certificates from {} (key {})",
                        cert.display(),
                        key.display()
                    )),
                    (Some(cert), None) => {
                        parts.push(format!("certificates from {} (no key!)", cert.display()))
                    }
                    (None, Some(key)) => {
                        parts.push(format!("key {} (no certificate!)", key.display()))
                    }
                    (None, None) => parts.push("no certificate of its own".to_owned()),
                }
                match ca {
                    Some(ca) => parts.push(format!("trusting the CA in {}", ca.display())),
                    None => parts.push("trusting no CA".to_owned()),
                }
                parts.join(", ")
            }
        }
    }

    /// Reads (and for the development CA, creates if needed) the
    /// certificates. Blocking file I/O: call it at start-up, or through
    /// `tokio::task::spawn_blocking`.
    pub fn load(&self) -> Result<TlsConfig, TlsError> {
        match self {
            Trust::Files { cert, key, ca } => load_files(
                cert.as_deref(),
                key.as_deref(),
                ca.as_deref(),
                self.describe(),
            ),
            Trust::DevCa { dir, extra_names } => {
                let ca = DevCa::open(dir)?;
                let mut names: Vec<String> = DEV_NAMES.iter().map(|s| (*s).to_owned()).collect();
                names.extend(extra_names.iter().cloned());
                let (chain, key) = ca.issue(&names)?;
                let mut roots = RootCertStore::empty();
                roots
                    .add(ca.cert.clone())
                    .map_err(|source| TlsError::BadCa {
                        path: ca.cert_path(),
                        source,
                    })?;
                Ok(TlsConfig {
                    identity: Some(Identity { chain, key }),
                    ca_certs: vec![ca.cert.clone()],
                    roots: Arc::new(roots),
                    description: self.describe(),
                    transport: TransportTuning::default(),
                })
            }
        }
    }
}

/// Why certificates could not be read, made or used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A file or directory could not be read or written.
    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        /// What was being done ("read", "create", ...).
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The operating system's error.
        source: io::Error,
    },
    /// A file is not valid PEM or holds no item of the expected kind.
    #[error("cannot read {what} from {}: {source}", path.display())]
    Pem {
        /// What was expected ("certificate", "private key").
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The parser's error.
        source: rustls::pki_types::pem::Error,
    },
    /// A certificate file holds no certificate.
    #[error("{} holds no certificate", path.display())]
    NoCertificate {
        /// The file.
        path: PathBuf,
    },
    /// Only one of `--cert` and `--key` was given.
    #[error("--cert and --key go together: give both, or neither to use the development CA")]
    IncompleteIdentity,
    /// A server config was asked for, but this trust has no certificate to
    /// present.
    #[error(
        "no certificate to present: give --cert and --key, or no certificate flags at all to use the development CA"
    )]
    NoIdentity,
    /// A client config (or client verification) was asked for, but this
    /// trust names no CA.
    #[error("no CA to trust: give --ca, or no certificate flags at all to use the development CA")]
    NoRoots,
    /// A CA certificate could not be added to the trust store.
    #[error("bad CA certificate in {}: {source}", path.display())]
    BadCa {
        /// The file it came from.
        path: PathBuf,
        /// Why rustls refused it.
        source: rustls::Error,
    },
    /// The development CA on disk cannot be used.
    #[error("development CA {} is unusable ({reason}); remove it to have a new one made", path.display())]
    CorruptDevCa {
        /// The bundle file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// Certificate generation failed (for instance, an extra name that is
    /// neither a DNS name nor an IP address).
    #[error("cannot generate certificate: {0}")]
    Generate(#[from] rcgen::Error),
    /// rustls refused the certificate, key or configuration.
    #[error("TLS configuration refused: {0}")]
    Rustls(#[from] rustls::Error),
    /// The client-certificate verifier could not be built.
    #[error("cannot verify client certificates: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    /// The TLS configuration cannot carry QUIC.
    #[error("TLS configuration unusable for QUIC: {0}")]
    Quic(#[from] quinn::crypto::rustls::NoInitialCipherSuite),
}

fn io_err(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> TlsError + use<> {
    let path = path.to_owned();
    move |source| TlsError::Io {
        action,
        path,
        source,
    }
}

struct Identity {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

impl Clone for Identity {
    fn clone(&self) -> Identity {
        Identity {
            chain: self.chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

/// Loaded certificates, ready to build quinn configurations.
///
/// Cheap to clone. Holds the transport tuning that the quinn configurations
/// it builds carry ([`TlsConfig::with_transport`]).
#[derive(Clone)]
pub struct TlsConfig {
    identity: Option<Identity>,
    ca_certs: Vec<CertificateDer<'static>>,
    roots: Arc<RootCertStore>,
    description: String,
    transport: TransportTuning,
}

impl std::fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsConfig")
            .field("description", &self.description)
            .field("has_identity", &self.identity.is_some())
            .field("ca_certs", &self.ca_certs.len())
            .field("transport", &self.transport)
            .finish_non_exhaustive()
    }
}

impl TlsConfig {
    /// One line for the start-up log saying which trust is in use (the
    /// same as [`Trust::describe`]).
    pub fn describe(&self) -> &str {
        &self.description
    }

    /// Whether there is a certificate to present (needed to serve).
    pub fn has_identity(&self) -> bool {
        self.identity.is_some()
    }

    /// The certificate chain this process presents, leaf first (empty if
    /// none).
    pub fn certificate_chain(&self) -> &[CertificateDer<'static>] {
        self.identity.as_ref().map_or(&[], |id| &id.chain)
    }

    /// The CA certificates this process trusts.
    pub fn ca_certificates(&self) -> &[CertificateDer<'static>] {
        &self.ca_certs
    }

    /// The trust store built from [`TlsConfig::ca_certificates`].
    pub fn roots(&self) -> Arc<RootCertStore> {
        self.roots.clone()
    }

    /// The transport tuning that built configurations carry.
    pub fn transport(&self) -> &TransportTuning {
        &self.transport
    }

    /// Replaces the transport tuning.
    pub fn with_transport(mut self, transport: TransportTuning) -> TlsConfig {
        self.transport = transport;
        self
    }

    fn identity(&self) -> Result<&Identity, TlsError> {
        self.identity.as_ref().ok_or(TlsError::NoIdentity)
    }

    fn check_roots(&self) -> Result<(), TlsError> {
        if self.roots.is_empty() {
            Err(TlsError::NoRoots)
        } else {
            Ok(())
        }
    }

    /// A rustls server configuration: TLS 1.3 only, ring, the given ALPN
    /// protocols, and client certificates required (and verified against
    /// the trusted CAs) if `verify_clients`.
    pub fn server_crypto(
        &self,
        alpn: &[&[u8]],
        verify_clients: bool,
    ) -> Result<rustls::ServerConfig, TlsError> {
        let identity = self.identity()?;
        let provider = crypto_provider();
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?;
        let builder = if verify_clients {
            self.check_roots()?;
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                self.roots.clone(),
                provider,
            )
            .build()?;
            builder.with_client_cert_verifier(verifier)
        } else {
            builder.with_no_client_auth()
        };
        let mut config =
            builder.with_single_cert(identity.chain.clone(), identity.key.clone_key())?;
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(config)
    }

    /// A rustls client configuration: TLS 1.3 only, ring, the trusted CAs,
    /// the given ALPN protocols, and this process's certificate offered when
    /// a server asks for one.
    pub fn client_crypto(&self, alpn: &[&[u8]]) -> Result<rustls::ClientConfig, TlsError> {
        self.check_roots()?;
        let builder = rustls::ClientConfig::builder_with_provider(crypto_provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(self.roots.clone());
        let mut config = match &self.identity {
            Some(id) => builder.with_client_auth_cert(id.chain.clone(), id.key.clone_key())?,
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(config)
    }

    fn quinn_server(&self, crypto: rustls::ServerConfig) -> Result<quinn::ServerConfig, TlsError> {
        let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(crypto)?;
        let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        config.transport_config(Arc::new(self.transport.to_quinn()));
        Ok(config)
    }

    /// A quinn server configuration accepting the given ALPN protocols, with
    /// no client certificates asked for.
    pub fn server_config(&self, alpn: &[&[u8]]) -> Result<quinn::ServerConfig, TlsError> {
        self.quinn_server(self.server_crypto(alpn, false)?)
    }

    /// A quinn server configuration that requires every client to present a
    /// certificate issued by a trusted CA (mutual TLS, for upstream links).
    pub fn server_config_mutual(&self, alpn: &[&[u8]]) -> Result<quinn::ServerConfig, TlsError> {
        self.quinn_server(self.server_crypto(alpn, true)?)
    }

    /// A quinn client configuration offering the given ALPN protocols.
    ///
    /// Connect with the server's name as it appears in its certificate; for
    /// the development CA that is `localhost`, `127.0.0.1` or `::1`
    /// (`endpoint.connect_with(config, addr, "127.0.0.1")`).
    pub fn client_config(&self, alpn: &[&[u8]]) -> Result<quinn::ClientConfig, TlsError> {
        let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(self.client_crypto(alpn)?)?;
        let mut config = quinn::ClientConfig::new(Arc::new(crypto));
        config.transport_config(Arc::new(self.transport.to_quinn()));
        Ok(config)
    }
}

fn load_files(
    cert: Option<&Path>,
    key: Option<&Path>,
    ca: Option<&Path>,
    description: String,
) -> Result<TlsConfig, TlsError> {
    let identity = match (cert, key) {
        (Some(cert), Some(key)) => {
            let chain = read_certs(cert)?;
            warn_if_key_readable(key);
            let key_der = PrivateKeyDer::from_pem_file(key).map_err(|source| TlsError::Pem {
                what: "private key",
                path: key.to_owned(),
                source,
            })?;
            Some(Identity {
                chain,
                key: key_der,
            })
        }
        (None, None) => None,
        _ => return Err(TlsError::IncompleteIdentity),
    };
    let mut roots = RootCertStore::empty();
    let mut ca_certs = Vec::new();
    if let Some(ca) = ca {
        for der in read_certs(ca)? {
            roots.add(der.clone()).map_err(|source| TlsError::BadCa {
                path: ca.to_owned(),
                source,
            })?;
            ca_certs.push(der);
        }
    }
    Ok(TlsConfig {
        identity,
        ca_certs,
        roots: Arc::new(roots),
        description,
        transport: TransportTuning::default(),
    })
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem_err = |source| TlsError::Pem {
        what: "certificate",
        path: path.to_owned(),
        source,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(pem_err)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(pem_err)?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

#[cfg(unix)]
fn warn_if_key_readable(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = fs::metadata(path) {
        let mode = meta.permissions().mode();
        if mode & 0o077 != 0 {
            tracing::warn!(
                path = %path.display(),
                mode = format_args!("{:o}", mode & 0o777),
                "private key file is readable by other users; chmod 600 it"
            );
        }
    }
}

#[cfg(not(unix))]
fn warn_if_key_readable(_path: &Path) {}

/// The development CA: its key and certificate, loaded from the data
/// directory or created there.
pub struct DevCa {
    dir: PathBuf,
    key: KeyPair,
    cert: CertificateDer<'static>,
}

impl std::fmt::Debug for DevCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DevCa")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

impl DevCa {
    /// Loads the development CA from `dir`, creating the directory and the
    /// CA if they do not exist. Safe to call from several processes (or
    /// threads) at once: all of them end up with the same CA.
    pub fn open(dir: &Path) -> Result<DevCa, TlsError> {
        create_private_dir(dir)?;
        let bundle = dir.join(DEV_CA_KEY_FILE);
        // Each round either finds the bundle, links ours, or finds that
        // someone else linked theirs between our read and our link; the
        // next round then reads theirs. Only a bundle deleted again right
        // after appearing (by hand) uses up the rounds.
        for _ in 0..3 {
            match fs::read(&bundle) {
                Ok(pem) => {
                    let ca = DevCa::parse(dir, &bundle, &pem)?;
                    ca.write_public_cert()?;
                    return Ok(ca);
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err("read", &bundle)(e)),
            }
            let (key, cert) = generate_ca()?;
            let mut pem = key.serialize_pem();
            pem.push_str(&cert_pem(&cert));
            let tmp = temp_path(dir, DEV_CA_KEY_FILE);
            write_new_file(&tmp, pem.as_bytes(), 0o600).map_err(io_err("write", &tmp))?;
            let linked = fs::hard_link(&tmp, &bundle);
            // The temporary name goes either way; the bundle keeps the data.
            let _ = fs::remove_file(&tmp);
            match linked {
                Ok(()) => {
                    sync_dir(dir);
                    tracing::info!(path = %bundle.display(), "created a development CA");
                    let ca = DevCa {
                        dir: dir.to_owned(),
                        key,
                        cert,
                    };
                    ca.write_public_cert()?;
                    return Ok(ca);
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    tracing::debug!(path = %bundle.display(), "another process created the development CA first");
                }
                Err(e) => return Err(io_err("create", &bundle)(e)),
            }
        }
        Err(TlsError::CorruptDevCa {
            path: bundle,
            reason: "it keeps appearing and disappearing".to_owned(),
        })
    }

    fn parse(dir: &Path, path: &Path, pem: &[u8]) -> Result<DevCa, TlsError> {
        let corrupt = |reason: String| TlsError::CorruptDevCa {
            path: path.to_owned(),
            reason,
        };
        let key_der = PrivateKeyDer::from_pem_slice(pem)
            .map_err(|e| corrupt(format!("no private key: {e}")))?;
        let key =
            KeyPair::try_from(&key_der).map_err(|e| corrupt(format!("bad private key: {e}")))?;
        if key.algorithm() != &rcgen::PKCS_ECDSA_P256_SHA256 {
            return Err(corrupt("the key is not ECDSA P-256".to_owned()));
        }
        let cert = CertificateDer::pem_slice_iter(pem)
            .next()
            .ok_or_else(|| corrupt("no certificate".to_owned()))?
            .map_err(|e| corrupt(format!("bad certificate: {e}")))?;
        let public = key.public_key_raw();
        if !cert.as_ref().windows(public.len()).any(|w| w == public) {
            return Err(corrupt(
                "the certificate does not belong to the key".to_owned(),
            ));
        }
        Ok(DevCa {
            dir: dir.to_owned(),
            key,
            cert,
        })
    }

    /// The data directory holding the CA.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Path of the CA certificate file (`ca.pem`).
    pub fn cert_path(&self) -> PathBuf {
        self.dir.join(DEV_CA_CERT_FILE)
    }

    /// The CA certificate.
    pub fn certificate(&self) -> &CertificateDer<'static> {
        &self.cert
    }

    /// Issues a leaf certificate for `names` (DNS names or IP addresses),
    /// with a fresh ECDSA P-256 key: the chain (leaf only) and the key.
    pub fn issue(
        &self,
        names: &[String],
    ) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError> {
        let issuer = Issuer::new(ca_params(&self.key), &self.key);
        let mut params = CertificateParams::new(names.to_vec())?;
        let mut dn = DistinguishedName::new();
        dn.push(
            DnType::CommonName,
            format!(
                "statecast dev {}",
                names.first().map_or("leaf", String::as_str)
            ),
        );
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        let now = OffsetDateTime::now_utc();
        params.not_before = now - TimeDuration::hours(BACKDATE_HOURS);
        params.not_after = now + TimeDuration::days(DEV_LEAF_VALIDITY_DAYS);
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let cert = params.signed_by(&key, &issuer)?;
        let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        Ok((vec![cert.der().clone()], key_der))
    }

    /// Writes `ca.pem` unless it already holds exactly this certificate.
    fn write_public_cert(&self) -> Result<(), TlsError> {
        let path = self.cert_path();
        let pem = cert_pem(&self.cert);
        match fs::read(&path) {
            Ok(existing) if existing == pem.as_bytes() => return Ok(()),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("read", &path)(e)),
        }
        let tmp = temp_path(&self.dir, DEV_CA_CERT_FILE);
        write_new_file(&tmp, pem.as_bytes(), 0o644).map_err(io_err("write", &tmp))?;
        // Every writer writes the same bytes, so replacing is harmless.
        let renamed = fs::rename(&tmp, &path);
        if renamed.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        renamed.map_err(io_err("create", &path))
    }
}

/// Parameters of the development CA with `key`. Its name carries a short
/// fingerprint of the key, so two development CAs (two data directories)
/// never share a name and a client of one refuses the other's leaves as
/// "unknown issuer". [`Issuer`] uses only the name, the key identifier
/// method and the key usages, all derived from the key here, so a CA loaded
/// from disk signs exactly as the one that was created.
fn ca_params(key: &KeyPair) -> CertificateParams {
    let mut params = CertificateParams::default();
    let fingerprint: String = params
        .key_identifier(key)
        .iter()
        .take(6)
        .map(|b| format!("{b:02x}"))
        .collect();
    let mut dn = DistinguishedName::new();
    dn.push(
        DnType::CommonName,
        format!("{DEV_CA_COMMON_NAME} {fingerprint}"),
    );
    dn.push(DnType::OrganizationName, DEV_CA_ORGANIZATION);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params
}

fn generate_ca() -> Result<(KeyPair, CertificateDer<'static>), TlsError> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = ca_params(&key);
    let now = OffsetDateTime::now_utc();
    params.not_before = now - TimeDuration::hours(BACKDATE_HOURS);
    params.not_after = now + TimeDuration::days(DEV_CA_VALIDITY_DAYS);
    let cert = params.self_signed(&key)?;
    Ok((key, cert.der().clone()))
}

fn cert_pem(cert: &CertificateDer<'_>) -> String {
    // A loaded certificate is only DER here; PEM is simple enough to write.
    const LINE: usize = 64;
    let b64 = base64_encode(cert.as_ref());
    let mut pem = String::with_capacity(b64.len() + b64.len() / LINE + 64);
    pem.push_str("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(LINE) {
        // base64 output is ASCII.
        pem.push_str(std::str::from_utf8(line).unwrap_or_default());
        pem.push('\n');
    }
    pem.push_str("-----END CERTIFICATE-----\n");
    pem
}

fn base64_encode(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Creates `dir` (and its parents); a directory this creates is private
/// (0700) since it holds keys.
fn create_private_dir(dir: &Path) -> Result<(), TlsError> {
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder.create(dir).map_err(io_err("create directory", dir))
}

/// A name in `dir` no other process or thread uses.
fn temp_path(dir: &Path, name: &str) -> PathBuf {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    dir.join(format!(".{name}.{}.{n}.{nanos}.tmp", std::process::id()))
}

/// Creates `path` (which must not exist) with `mode`, writes `contents` and
/// flushes them to disk.
fn write_new_file(path: &Path, contents: &[u8], mode: u32) -> io::Result<()> {
    let mut options = fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(mode);
    }
    #[cfg(not(unix))]
    let _ = mode;
    let mut file = options.open(path)?;
    let written = file.write_all(contents).and_then(|()| file.sync_all());
    if written.is_err() {
        let _ = fs::remove_file(path);
    }
    written
}

/// Flushes a directory entry to disk (best effort: a crash right after
/// creation at worst loses a CA nobody has used yet).
fn sync_dir(dir: &Path) {
    #[cfg(unix)]
    if let Ok(d) = fs::File::open(dir) {
        let _ = d.sync_all();
    }
    #[cfg(not(unix))]
    let _ = dir;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_known_vectors() {
        assert_eq!(base64_encode(b""), "");
        assert_eq!(base64_encode(b"f"), "Zg==");
        assert_eq!(base64_encode(b"fo"), "Zm8=");
        assert_eq!(base64_encode(b"foo"), "Zm9v");
        assert_eq!(base64_encode(b"foob"), "Zm9vYg==");
        assert_eq!(base64_encode(b"fooba"), "Zm9vYmE=");
        assert_eq!(base64_encode(b"foobar"), "Zm9vYmFy");
    }

    #[test]
    fn cert_pem_round_trips_through_the_pem_parser() {
        let (_, cert) = generate_ca().unwrap();
        let pem = cert_pem(&cert);
        let back = CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
        assert_eq!(back, cert);
    }

    #[test]
    fn flags_choose_the_trust() {
        let dev = Trust::from_flags(None, None, None, Some("/tmp/x".into()));
        assert_eq!(dev, Trust::dev("/tmp/x"));
        assert_eq!(
            dev.describe(),
            "development CA at /tmp/x/ca.pem (self-made, local only)"
        );
        let files = Trust::from_flags(
            Some("/etc/s/cert.pem".into()),
            Some("/etc/s/key.pem".into()),
            Some("/etc/s/ca.pem".into()),
            None,
        );
        assert_eq!(
            files.describe(),
            "certificates from /etc/s/cert.pem (key /etc/s/key.pem), trusting the CA in /etc/s/ca.pem"
        );
        let half = Trust::from_flags(Some("/etc/s/cert.pem".into()), None, None, None);
        assert!(matches!(half.load(), Err(TlsError::IncompleteIdentity)));
    }
}
