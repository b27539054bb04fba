//! TLS and SASL settings of every Kafka client the project creates (`[kafka.security]`):
//! the relay's producer, the replayer, consumers and their dead-letter producer
//! all call [`KafkaSecurity::apply`] on their `ClientConfig`, so one section
//! secures them all.
//!
//! The SASL password is never part of the configuration itself: it is read,
//! when a client is created, from a file (`sasl_password_file`, e.g. a mounted
//! secret) or an environment variable (`sasl_password_env`), held as a
//! [`SaslPassword`] whose `Debug` prints `[redacted]`, and handed to librdkafka
//! (whose `ClientConfig` `Debug` leaves `sasl.password` out too).

use std::path::{Path, PathBuf};

use rdkafka::ClientConfig;
use serde::{Deserialize, Serialize};

/// `security.protocol` of the Kafka clients.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SecurityProtocol {
    /// No TLS, no authentication (the default; local brokers only).
    #[default]
    Plaintext,
    /// TLS, no SASL (a client certificate may authenticate).
    Ssl,
    /// SASL over plain TCP: the password crosses the network unencrypted
    /// with `PLAIN`.
    SaslPlaintext,
    /// SASL over TLS.
    SaslSsl,
}

impl SecurityProtocol {
    /// librdkafka's name.
    pub fn as_str(self) -> &'static str {
        match self {
            SecurityProtocol::Plaintext => "plaintext",
            SecurityProtocol::Ssl => "ssl",
            SecurityProtocol::SaslPlaintext => "sasl_plaintext",
            SecurityProtocol::SaslSsl => "sasl_ssl",
        }
    }

    /// Whether the connection uses TLS.
    pub fn tls(self) -> bool {
        matches!(self, SecurityProtocol::Ssl | SecurityProtocol::SaslSsl)
    }

    /// Whether the client authenticates with SASL.
    pub fn sasl(self) -> bool {
        matches!(
            self,
            SecurityProtocol::SaslPlaintext | SecurityProtocol::SaslSsl
        )
    }
}

/// `sasl.mechanisms` of the Kafka clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SaslMechanism {
    /// `PLAIN`: username and password as they are (use with `sasl_ssl`).
    #[serde(rename = "PLAIN")]
    Plain,
    /// `SCRAM-SHA-256`.
    #[serde(rename = "SCRAM-SHA-256")]
    ScramSha256,
    /// `SCRAM-SHA-512`.
    #[serde(rename = "SCRAM-SHA-512")]
    ScramSha512,
}

impl SaslMechanism {
    /// librdkafka's name.
    pub fn as_str(self) -> &'static str {
        match self {
            SaslMechanism::Plain => "PLAIN",
            SaslMechanism::ScramSha256 => "SCRAM-SHA-256",
            SaslMechanism::ScramSha512 => "SCRAM-SHA-512",
        }
    }
}

/// `[kafka.security]`: TLS and SASL of every Kafka client.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaSecurity {
    /// `plaintext` (default), `ssl`, `sasl_plaintext` or `sasl_ssl`.
    pub protocol: SecurityProtocol,
    /// PEM file of the CAs that sign the brokers' certificates (TLS only).
    /// Unset: the system's trust store.
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate, for brokers that authenticate clients by TLS
    /// (TLS only; needs `key_file`).
    pub cert_file: Option<PathBuf>,
    /// PEM private key of `cert_file` (unencrypted).
    pub key_file: Option<PathBuf>,
    /// `PLAIN`, `SCRAM-SHA-256` or `SCRAM-SHA-512` (SASL only, required there).
    pub sasl_mechanism: Option<SaslMechanism>,
    /// SASL username (SASL only, required there).
    pub sasl_username: String,
    /// File holding the SASL password (one line; a trailing newline is
    /// ignored). Exactly one of this and `sasl_password_env` under SASL.
    pub sasl_password_file: Option<PathBuf>,
    /// Name of the environment variable holding the SASL password.
    pub sasl_password_env: String,
}

/// A SASL password: its `Debug` and `Display` never show it.
#[derive(Clone, PartialEq, Eq)]
pub struct SaslPassword(String);

impl SaslPassword {
    /// The password itself, for the Kafka client only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for SaslPassword {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("[redacted]")
    }
}

/// An unusable `[kafka.security]`; each names the key or file at fault.
#[derive(Debug, thiserror::Error)]
pub enum KafkaSecurityError {
    /// A key the protocol needs is not set.
    #[error("kafka.security.{key} is required when kafka.security.protocol is {protocol}")]
    Missing {
        /// The key, e.g. `sasl_mechanism`.
        key: &'static str,
        /// The configured protocol.
        protocol: &'static str,
    },
    /// A key is set that the protocol does not use (a likely mistake).
    #[error("kafka.security.{key} is set but kafka.security.protocol is {protocol}")]
    Unused {
        /// The key set.
        key: &'static str,
        /// The configured protocol.
        protocol: &'static str,
    },
    /// Both password sources are set.
    #[error("kafka.security: set one of sasl_password_file and sasl_password_env, not both")]
    TwoPasswords,
    /// A file cannot be read.
    #[error("kafka.security.{key}: cannot read {}: {source}", path.display())]
    Unreadable {
        /// The key naming the file.
        key: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The password's environment variable is unset or not UTF-8.
    #[error("kafka.security.sasl_password_env: environment variable {0} is not set")]
    NoEnv(String),
    /// The password is empty.
    #[error("kafka.security: the SASL password from {0} is empty")]
    EmptyPassword(String),
}

fn readable(key: &'static str, path: &Path) -> Result<Vec<u8>, KafkaSecurityError> {
    std::fs::read(path).map_err(|source| KafkaSecurityError::Unreadable {
        key,
        path: path.to_path_buf(),
        source,
    })
}

impl KafkaSecurity {
    /// Checks the settings and reads every file they name (CA, certificate,
    /// key, password), so a mistake stops start-up with the key or file at
    /// fault. Returns the SASL password when SASL is on.
    pub fn validate(&self) -> Result<Option<SaslPassword>, KafkaSecurityError> {
        let protocol = self.protocol.as_str();
        let files = [
            ("ca_file", &self.ca_file),
            ("cert_file", &self.cert_file),
            ("key_file", &self.key_file),
        ];
        if self.protocol.tls() {
            match (&self.cert_file, &self.key_file) {
                (Some(_), None) => {
                    return Err(KafkaSecurityError::Missing {
                        key: "key_file",
                        protocol,
                    });
                }
                (None, Some(_)) => {
                    return Err(KafkaSecurityError::Missing {
                        key: "cert_file",
                        protocol,
                    });
                }
                _ => {}
            }
            for (key, path) in files {
                if let Some(p) = path {
                    readable(key, p)?;
                }
            }
        } else if let Some((key, _)) = files.iter().find(|(_, p)| p.is_some()) {
            return Err(KafkaSecurityError::Unused { key, protocol });
        }
        if !self.protocol.sasl() {
            let set = [
                ("sasl_mechanism", self.sasl_mechanism.is_some()),
                ("sasl_username", !self.sasl_username.is_empty()),
                ("sasl_password_file", self.sasl_password_file.is_some()),
                ("sasl_password_env", !self.sasl_password_env.is_empty()),
            ];
            if let Some((key, _)) = set.iter().find(|(_, s)| *s) {
                return Err(KafkaSecurityError::Unused { key, protocol });
            }
            return Ok(None);
        }
        if self.sasl_mechanism.is_none() {
            return Err(KafkaSecurityError::Missing {
                key: "sasl_mechanism",
                protocol,
            });
        }
        if self.sasl_username.trim().is_empty() {
            return Err(KafkaSecurityError::Missing {
                key: "sasl_username",
                protocol,
            });
        }
        let (password, from) = match (&self.sasl_password_file, self.sasl_password_env.as_str()) {
            (Some(_), env) if !env.is_empty() => return Err(KafkaSecurityError::TwoPasswords),
            (Some(path), _) => {
                let bytes = readable("sasl_password_file", path)?;
                let text =
                    String::from_utf8(bytes).map_err(|e| KafkaSecurityError::Unreadable {
                        key: "sasl_password_file",
                        path: path.clone(),
                        source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
                    })?;
                (
                    text.trim_end_matches(['\r', '\n']).to_string(),
                    path.display().to_string(),
                )
            }
            (None, "") => {
                return Err(KafkaSecurityError::Missing {
                    key: "sasl_password_file (or sasl_password_env)",
                    protocol,
                });
            }
            (None, env) => (
                std::env::var(env).map_err(|_| KafkaSecurityError::NoEnv(env.to_string()))?,
                format!("${env}"),
            ),
        };
        if password.is_empty() {
            return Err(KafkaSecurityError::EmptyPassword(from));
        }
        Ok(Some(SaslPassword(password)))
    }

    /// Validates (see [`KafkaSecurity::validate`]) and sets
    /// `security.protocol`, the `ssl.*` file locations and the `sasl.*`
    /// credentials on `client`.
    pub fn apply(&self, client: &mut ClientConfig) -> Result<(), KafkaSecurityError> {
        let password = self.validate()?;
        client.set("security.protocol", self.protocol.as_str());
        for (prop, path) in [
            ("ssl.ca.location", &self.ca_file),
            ("ssl.certificate.location", &self.cert_file),
            ("ssl.key.location", &self.key_file),
        ] {
            if let Some(p) = path {
                client.set(prop, p.display().to_string());
            }
        }
        if let (Some(mechanism), Some(password)) = (self.sasl_mechanism, password) {
            client
                .set("sasl.mechanisms", mechanism.as_str())
                .set("sasl.username", self.sasl_username.trim())
                .set("sasl.password", password.expose());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn temp(name: &str, contents: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("anumate-kafka-sec-{}", uuid::Uuid::now_v7()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(name);
        std::fs::write(&p, contents).unwrap();
        p
    }

    fn sasl() -> KafkaSecurity {
        KafkaSecurity {
            protocol: SecurityProtocol::SaslSsl,
            sasl_mechanism: Some(SaslMechanism::ScramSha512),
            sasl_username: "relay".into(),
            sasl_password_file: Some(temp("password", "s3cret-pw\n")),
            ..KafkaSecurity::default()
        }
    }

    #[test]
    fn sasl_without_mechanism_or_username_names_the_key() {
        let mut s = sasl();
        s.sasl_mechanism = None;
        let e = s.validate().unwrap_err().to_string();
        assert_eq!(
            e,
            "kafka.security.sasl_mechanism is required when kafka.security.protocol is sasl_ssl"
        );
        let mut s = sasl();
        s.protocol = SecurityProtocol::SaslPlaintext;
        s.sasl_username = " ".into();
        let e = s.validate().unwrap_err().to_string();
        assert_eq!(
            e,
            "kafka.security.sasl_username is required when kafka.security.protocol is sasl_plaintext"
        );
        let mut s = sasl();
        s.sasl_password_file = None;
        let e = s.validate().unwrap_err().to_string();
        assert!(e.starts_with("kafka.security.sasl_password_file"), "{e}");
        let mut s = sasl();
        s.sasl_password_file = Some(temp("empty", "\n"));
        assert!(matches!(
            s.validate(),
            Err(KafkaSecurityError::EmptyPassword(_))
        ));
        let mut s = sasl();
        s.sasl_password_env = "ANUMATE_TEST_UNSET_KAFKA_PASSWORD".into();
        assert!(matches!(
            s.validate(),
            Err(KafkaSecurityError::TwoPasswords)
        ));
        s.sasl_password_file = None;
        let e = s.validate().unwrap_err().to_string();
        assert!(e.contains("ANUMATE_TEST_UNSET_KAFKA_PASSWORD"), "{e}");
    }

    #[test]
    fn tls_with_an_unreadable_file_names_the_file() {
        let missing = std::env::temp_dir().join("anumate-no-such-ca.pem");
        let s = KafkaSecurity {
            protocol: SecurityProtocol::Ssl,
            ca_file: Some(missing.clone()),
            ..KafkaSecurity::default()
        };
        let e = s.validate().unwrap_err().to_string();
        assert!(
            e.starts_with(&format!(
                "kafka.security.ca_file: cannot read {}",
                missing.display()
            )),
            "{e}"
        );
        // A certificate needs its key.
        let s = KafkaSecurity {
            protocol: SecurityProtocol::Ssl,
            cert_file: Some(temp("cert.pem", "x")),
            ..KafkaSecurity::default()
        };
        assert_eq!(
            s.validate().unwrap_err().to_string(),
            "kafka.security.key_file is required when kafka.security.protocol is ssl"
        );
        // Settings the protocol ignores are refused, not silently dropped.
        let s = KafkaSecurity {
            ca_file: Some(temp("ca.pem", "x")),
            ..KafkaSecurity::default()
        };
        assert_eq!(
            s.validate().unwrap_err().to_string(),
            "kafka.security.ca_file is set but kafka.security.protocol is plaintext"
        );
        let s = KafkaSecurity {
            protocol: SecurityProtocol::Ssl,
            sasl_username: "u".into(),
            ..KafkaSecurity::default()
        };
        assert_eq!(
            s.validate().unwrap_err().to_string(),
            "kafka.security.sasl_username is set but kafka.security.protocol is ssl"
        );
    }

    #[test]
    fn apply_sets_the_librdkafka_properties_and_never_shows_the_password() {
        let mut s = sasl();
        let ca = temp("ca.pem", "-----BEGIN CERTIFICATE-----\n");
        s.ca_file = Some(ca.clone());
        let mut c = ClientConfig::new();
        s.apply(&mut c).unwrap();
        assert_eq!(c.get("security.protocol"), Some("sasl_ssl"));
        assert_eq!(c.get("sasl.mechanisms"), Some("SCRAM-SHA-512"));
        assert_eq!(c.get("sasl.username"), Some("relay"));
        assert_eq!(c.get("sasl.password"), Some("s3cret-pw"));
        assert_eq!(c.get("ssl.ca.location"), Some(ca.to_str().unwrap()));
        assert_eq!(c.get("ssl.certificate.location"), None);
        assert!(!format!("{c:?}").contains("s3cret-pw"));
        assert!(!format!("{s:?}").contains("s3cret-pw"));
        let pw = s.validate().unwrap().unwrap();
        assert_eq!(format!("{pw:?}"), "[redacted]");

        // From an environment variable (one every test process has: setting
        // one would need `unsafe` in edition 2024).
        let s = KafkaSecurity {
            protocol: SecurityProtocol::SaslPlaintext,
            sasl_mechanism: Some(SaslMechanism::Plain),
            sasl_username: "u".into(),
            sasl_password_env: "PATH".into(),
            ..KafkaSecurity::default()
        };
        let mut c = ClientConfig::new();
        s.apply(&mut c).unwrap();
        assert_eq!(c.get("security.protocol"), Some("sasl_plaintext"));
        assert_eq!(c.get("sasl.mechanisms"), Some("PLAIN"));
        assert_eq!(
            c.get("sasl.password"),
            Some(std::env::var("PATH").unwrap().as_str())
        );

        // Plaintext: only the protocol.
        let mut c = ClientConfig::new();
        KafkaSecurity::default().apply(&mut c).unwrap();
        assert_eq!(c.get("security.protocol"), Some("plaintext"));
        assert_eq!(c.get("sasl.mechanisms"), None);
    }
}
