//! The gRPC adapter: decode, call [`Events`], encode. Who may call each RPC
//! is enforced before the handler by the auth layer (the proto's `authz` options).

use std::pin::Pin;

use anumate_proto::events::v1 as pb;
use pb::events_service_server::{EventsService, EventsServiceServer};
use tokio_stream::{Stream, StreamExt as _};
use tonic::{Request, Response, Status};

use crate::{Caller, Events, TailStart};

/// The events service behind the generated `EventsService` trait.
#[derive(Clone)]
pub struct EventsGrpc {
    events: Events,
}

impl EventsGrpc {
    /// Wraps an events service.
    pub fn new(events: Events) -> Self {
        EventsGrpc { events }
    }

    /// The tonic server.
    pub fn into_server(self) -> EventsServiceServer<EventsGrpc> {
        EventsServiceServer::new(self).max_decoding_message_size(64 * 1024)
    }
}

/// The caller, as the auth layer verified it and admitted it by the RPC's
/// `(anumate.common.v1.authz)` rule.
fn caller<T>(req: &Request<T>) -> Result<Caller, Status> {
    let principal = anumate_auth::principal(req)?;
    Ok(Caller {
        tenant: principal.tenant_id,
        subject: principal.subject,
    })
}

/// The stream type of `TailEvents`.
pub type TailStream =
    Pin<Box<dyn Stream<Item = Result<pb::TailEventsResponse, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl EventsService for EventsGrpc {
    type TailEventsStream = TailStream;

    async fn tail_events(
        &self,
        req: Request<pb::TailEventsRequest>,
    ) -> Result<Response<TailStream>, Status> {
        let caller = caller(&req)?;
        let r = req.into_inner();
        let start = match r.start {
            None => TailStart::Live,
            Some(pb::tail_events_request::Start::Since(t)) => {
                TailStart::Since(crate::micros("since", &t)?)
            }
            Some(pb::tail_events_request::Start::AfterSequence(n)) if n < 0 => {
                return Err(anumate_errors::Error::invalid_argument(
                    "after_sequence",
                    "must not be negative",
                )
                .into());
            }
            Some(pb::tail_events_request::Start::AfterSequence(n)) => TailStart::After(n),
        };
        let filter = r.filter.unwrap_or_default();
        let rx = self.events.tail(&caller, &filter, start).await?;
        let stream = tokio_stream::wrappers::ReceiverStream::new(rx).map(|r| r.map_err(Into::into));
        Ok(Response::new(Box::pin(stream)))
    }

    async fn list_events(
        &self,
        req: Request<pb::ListEventsRequest>,
    ) -> Result<Response<pb::ListEventsResponse>, Status> {
        let caller = caller(&req)?;
        let (events, next_page_token) = self.events.list(&caller, req.get_ref()).await?;
        Ok(Response::new(pb::ListEventsResponse {
            events,
            next_page_token,
        }))
    }

    async fn replay_events(
        &self,
        req: Request<pb::ReplayEventsRequest>,
    ) -> Result<Response<pb::ReplayEventsResponse>, Status> {
        let caller = caller(&req)?;
        tracing::info!(tenant = %caller.tenant, subject = %caller.subject, topic = %req.get_ref().topic, "replay requested");
        let out = self.events.replay(&caller, req.get_ref()).await?;
        Ok(Response::new(out))
    }
}
