//! The events service as the binary composes it.

use std::sync::Arc;
use std::time::Duration;

use anumate_events::relay::KafkaConfig;
use anumate_proto::events::v1 as pb;
use anumate_service::{BuildError, Context, Module, ServiceModule, no_keys};

use crate::{Events, EventsGrpc, EventsServiceConfig, feed, kafka};

/// The events service module: the history is fed from Kafka when a broker
/// is configured (`[kafka] brokers`), else straight from this store's outbox.
pub fn module() -> Box<dyn ServiceModule> {
    Box::new(Module::<EventsServiceConfig> {
        name: pb::events_service_server::SERVICE_NAME,
        section: "events",
        about: "Events: the event history (tail, list) and replays",
        migrations: crate::REPO_MIGRATIONS,
        missing_keys: no_keys,
        build,
    })
}

fn build(ctx: &mut Context, cfg: EventsServiceConfig) -> Result<(), BuildError> {
    let kafka: KafkaConfig = ctx.section("kafka")?;
    let store = ctx.store("events")?;
    let replayer = match kafka.enabled() {
        true => Some(Arc::new(kafka::Replayer::new(&kafka).map_err(|e| {
            BuildError::failed("events service: replay producer", e)
        })?)),
        false => None,
    };
    let events = Events::new(store, &cfg, replayer);
    if kafka.enabled() {
        let consumer = kafka::spawn_history_consumer(&events, &kafka)
            .map_err(|e| BuildError::failed("events service: history consumer", e))?;
        ctx.tasks
            .spawn("events history consumer", |cancel| async move {
                cancel.cancelled().await;
                consumer.stop().await;
                Ok(())
            });
    } else {
        let feeder = events.clone();
        let interval = Duration::from_millis(cfg.feed_poll_ms.max(1));
        ctx.tasks.spawn("events outbox feed", |cancel| async move {
            // Each pass commits on its own: stopping between awaits leaves
            // nothing half-written (the next start resumes where it was).
            tokio::select! {
                _ = cancel.cancelled() => {}
                _ = feed::run(feeder, interval) => {}
            }
            Ok(())
        });
    }
    ctx.routes
        .add_service(EventsGrpc::new(events).into_server());
    Ok(())
}
