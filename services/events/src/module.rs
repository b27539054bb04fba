//! The events service as the binary composes it.

use std::sync::Arc;
use std::time::Duration;

use anumate_events::relay::KafkaConfig;
use anumate_proto::events::v1 as pb;
use anumate_service::{BuildError, Context, ServiceModule};
use anumate_store::Migration;

use crate::{Events, EventsGrpc, EventsServiceConfig, feed, kafka};

/// The events service module: the history is fed from Kafka when a broker
/// is configured (`[kafka] brokers`), else straight from this store's outbox.
pub fn module() -> Box<dyn ServiceModule> {
    Box::new(Module)
}

struct Module;

impl ServiceModule for Module {
    fn name(&self) -> &'static str {
        pb::events_service_server::SERVICE_NAME
    }

    fn about(&self) -> &'static str {
        "Events: the event history (tail, list) and replays"
    }

    fn section(&self) -> &'static str {
        "events"
    }

    fn default_config(&self) -> Option<serde_json::Value> {
        anumate_service::default_section::<EventsServiceConfig>()
    }

    fn check_config(&self, section: &serde_json::Value) -> Result<(), BuildError> {
        anumate_service::check_section::<EventsServiceConfig>(self.section(), section)
    }

    fn migrations(&self) -> Vec<Migration> {
        crate::REPO_MIGRATIONS.to_vec()
    }

    fn build(&self, ctx: &mut Context) -> Result<(), BuildError> {
        let cfg: EventsServiceConfig = ctx.section(self.section())?;
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
                // Each pass commits on its own: stopping between awaits
                // leaves nothing half-written (the next start resumes).
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
}
