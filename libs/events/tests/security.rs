#![allow(clippy::unwrap_used, clippy::expect_used)]
//! `[kafka.security]` reaches librdkafka: a client built through
//! [`KafkaSecurity::apply`] speaks TLS (or SASL) to the broker, so against a
//! plaintext Tansu it fails the handshake, where the plaintext client works.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anumate_events::relay::{KafkaConfig, ensure_topics};
use anumate_events::security::{KafkaSecurity, SaslMechanism, SecurityProtocol};
use anumate_events::testing::TestBroker;
use rdkafka::ClientConfig;
use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::error::KafkaError;
use rdkafka::producer::{BaseProducer, Producer as _, ProducerContext};

/// Records what librdkafka reports.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<String>>>);

impl ClientContext for Capture {
    fn log(&self, _level: RDKafkaLogLevel, fac: &str, message: &str) {
        self.0.lock().unwrap().push(format!("{fac}: {message}"));
    }
    fn error(&self, error: KafkaError, reason: &str) {
        self.0.lock().unwrap().push(format!("{error}: {reason}"));
    }
}
impl ProducerContext for Capture {
    type DeliveryOpaque = ();
    fn delivery(&self, _: &rdkafka::message::DeliveryResult<'_>, _: ()) {}
}

/// Fetches metadata from `bootstrap` with `security` applied; returns whether
/// it worked and what librdkafka reported.
async fn metadata(bootstrap: &str, security: &KafkaSecurity) -> (bool, Vec<String>) {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", bootstrap)
        // A TLS client waits for the plaintext broker's answer to its hello:
        // give up soon, naming the state it was in.
        .set("socket.connection.setup.timeout.ms", "1000")
        .set_log_level(RDKafkaLogLevel::Info);
    security.apply(&mut c).unwrap();
    let capture = Capture::default();
    let client: BaseProducer<Capture> = c.create_with_context(capture.clone()).unwrap();
    let ok = tokio::task::spawn_blocking(move || {
        let ok = client
            .client()
            .fetch_metadata(None, Duration::from_secs(4))
            .is_ok();
        // Logs and errors are served by polling the main queue.
        for _ in 0..10 {
            client.poll(Duration::from_millis(100));
        }
        drop(client);
        ok
    })
    .await
    .unwrap();
    let lines = capture.0.lock().unwrap().clone();
    eprintln!("{lines:#?}");
    (ok, lines)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_and_sasl_settings_reach_librdkafka() {
    let broker = TestBroker::start();
    let (ok, lines) = metadata(&broker.bootstrap(), &KafkaSecurity::default()).await;
    assert!(ok, "plaintext works: {lines:?}");

    let ssl = KafkaSecurity {
        protocol: SecurityProtocol::Ssl,
        ..KafkaSecurity::default()
    };
    let (ok, lines) = metadata(&broker.bootstrap(), &ssl).await;
    assert!(!ok, "TLS to a plaintext broker must fail");
    assert!(
        lines.iter().any(|l| l.contains("in state SSL_HANDSHAKE")),
        "{lines:#?}"
    );

    let dir = std::env::temp_dir().join(format!("anumate-sasl-{}", uuid::Uuid::now_v7()));
    std::fs::create_dir_all(&dir).unwrap();
    let password = dir.join("password");
    std::fs::write(&password, "pw\n").unwrap();
    let sasl = KafkaSecurity {
        protocol: SecurityProtocol::SaslPlaintext,
        sasl_mechanism: Some(SaslMechanism::ScramSha256),
        sasl_username: "relay".into(),
        sasl_password_file: Some(password),
        ..KafkaSecurity::default()
    };
    let (ok, lines) = metadata(&broker.bootstrap(), &sasl).await;
    assert!(!ok, "SASL to a broker without it must fail: {lines:#?}");
    assert!(
        lines
            .iter()
            .any(|l| l.contains("SASL SCRAM-SHA-256 mechanism handshake")),
        "{lines:#?}"
    );

    // The relay's own clients take the same settings: topics cannot be
    // created over TLS against this broker, and start-up fails on a CA file
    // that is not there.
    let cfg = KafkaConfig {
        brokers: broker.bootstrap(),
        security: ssl,
        ..KafkaConfig::default()
    };
    assert!(ensure_topics(&cfg).await.is_err());
    let missing = dir.join("no-ca.pem");
    let cfg = KafkaConfig {
        brokers: broker.bootstrap(),
        security: KafkaSecurity {
            protocol: SecurityProtocol::SaslSsl,
            ca_file: Some(missing.clone()),
            ..KafkaSecurity::default()
        },
        ..KafkaConfig::default()
    };
    let db = anumate_store::testing::TestDb::sqlite();
    let store = anumate_store::Store::connect(&db.config).await.unwrap();
    let err = anumate_events::relay::Relay::new(store, cfg)
        .err()
        .expect("refused")
        .to_string();
    assert!(err.contains(&missing.display().to_string()), "{err}");
}
