//! The gRPC adapter: decode, call [`Orchestrator`], encode. Who may call
//! each RPC is enforced before the handler by the auth layer (the proto's
//! `authz` options).

use std::pin::Pin;
use std::time::Duration;

use anumate_errors::Error;
use anumate_proto::orchestrator::v1 as pb;
use futures::Stream;
use pb::orchestrator_service_server::{OrchestratorService, OrchestratorServiceServer};
use tonic::{Request, Response, Status};

use crate::{Actor, Orchestrator, Starter, is_terminal, ts};

/// How often a quiet `WatchRun` stream sends a heartbeat.
pub const HEARTBEAT: Duration = Duration::from_secs(15);

/// The orchestrator behind the generated `OrchestratorService` trait.
#[derive(Clone)]
pub struct OrchestratorGrpc {
    orchestrator: Orchestrator,
    max_request_bytes: usize,
}

impl OrchestratorGrpc {
    /// Wraps the service.
    pub fn new(orchestrator: Orchestrator) -> Self {
        let max_request_bytes = orchestrator.inner.cfg.max_request_bytes;
        OrchestratorGrpc {
            orchestrator,
            max_request_bytes,
        }
    }

    /// The tonic server, refusing oversized requests from their length prefix.
    pub fn into_server(self) -> OrchestratorServiceServer<OrchestratorGrpc> {
        let max = self.max_request_bytes;
        OrchestratorServiceServer::new(self)
            .max_decoding_message_size(max)
            .max_encoding_message_size(64 * 1024 * 1024)
    }
}

fn actor<T>(req: &Request<T>) -> Result<Actor, Status> {
    let principal = anumate_auth::principal(req)?;
    let mut roles: Vec<String> = principal
        .roles
        .iter()
        .map(|r| r.as_str().to_string())
        .collect();
    roles.sort();
    Ok(Actor {
        starter: Starter {
            tenant: principal.tenant_id.clone(),
            subject: principal.originator().to_string(),
            roles,
            groups: principal.groups.clone(),
            traceparent: anumate_telemetry::current_traceparent(),
        },
    })
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::WatchRunResponse, Status>> + Send>>;

#[tonic::async_trait]
impl OrchestratorService for OrchestratorGrpc {
    async fn execute(
        &self,
        req: Request<pb::ExecuteRequest>,
    ) -> Result<Response<pb::ExecuteResponse>, Status> {
        let actor = actor(&req)?;
        let header = match req.metadata().get("idempotency-key") {
            None => None,
            Some(v) => Some(
                v.to_str()
                    .map_err(|_| {
                        Error::invalid_argument("idempotency_key", "the metadata is not ASCII")
                    })?
                    .to_string(),
            ),
        };
        let (run, created) = self
            .orchestrator
            .execute(&actor, req.into_inner(), header)
            .await?;
        Ok(Response::new(pb::ExecuteResponse {
            run: Some(run),
            created,
        }))
    }

    async fn get_run(
        &self,
        req: Request<pb::GetRunRequest>,
    ) -> Result<Response<pb::GetRunResponse>, Status> {
        let actor = actor(&req)?;
        let run = self.orchestrator.get(&actor, &req.get_ref().run_id).await?;
        Ok(Response::new(pb::GetRunResponse { run: Some(run) }))
    }

    async fn list_runs(
        &self,
        req: Request<pb::ListRunsRequest>,
    ) -> Result<Response<pb::ListRunsResponse>, Status> {
        let actor = actor(&req)?;
        let (runs, next_page_token) = self.orchestrator.list(&actor, req.get_ref()).await?;
        Ok(Response::new(pb::ListRunsResponse {
            runs,
            next_page_token,
        }))
    }

    async fn pause_run(
        &self,
        req: Request<pb::PauseRunRequest>,
    ) -> Result<Response<pb::PauseRunResponse>, Status> {
        let actor = actor(&req)?;
        let run = self.orchestrator.pause(&actor, req.get_ref()).await?;
        Ok(Response::new(pb::PauseRunResponse { run: Some(run) }))
    }

    async fn resume_run(
        &self,
        req: Request<pb::ResumeRunRequest>,
    ) -> Result<Response<pb::ResumeRunResponse>, Status> {
        let actor = actor(&req)?;
        let run = self.orchestrator.resume(&actor, req.get_ref()).await?;
        Ok(Response::new(pb::ResumeRunResponse { run: Some(run) }))
    }

    async fn cancel_run(
        &self,
        req: Request<pb::CancelRunRequest>,
    ) -> Result<Response<pb::CancelRunResponse>, Status> {
        let actor = actor(&req)?;
        let run = self.orchestrator.cancel(&actor, req.get_ref()).await?;
        Ok(Response::new(pb::CancelRunResponse { run: Some(run) }))
    }

    async fn kill_run(
        &self,
        req: Request<pb::KillRunRequest>,
    ) -> Result<Response<pb::KillRunResponse>, Status> {
        let actor = actor(&req)?;
        let run = self.orchestrator.kill(&actor, req.get_ref()).await?;
        Ok(Response::new(pb::KillRunResponse { run: Some(run) }))
    }

    async fn resolve_step(
        &self,
        req: Request<pb::ResolveStepRequest>,
    ) -> Result<Response<pb::ResolveStepResponse>, Status> {
        let actor = actor(&req)?;
        let run = self.orchestrator.resolve(&actor, req.get_ref()).await?;
        Ok(Response::new(pb::ResolveStepResponse { run: Some(run) }))
    }

    async fn list_run_history(
        &self,
        req: Request<pb::ListRunHistoryRequest>,
    ) -> Result<Response<pb::ListRunHistoryResponse>, Status> {
        let actor = actor(&req)?;
        let (entries, next_page_token) = self.orchestrator.history(&actor, req.get_ref()).await?;
        Ok(Response::new(pb::ListRunHistoryResponse {
            entries,
            next_page_token,
        }))
    }

    type WatchRunStream = WatchStream;

    async fn watch_run(
        &self,
        req: Request<pb::WatchRunRequest>,
    ) -> Result<Response<Self::WatchRunStream>, Status> {
        let actor = actor(&req)?;
        let r = req.into_inner();
        let tenant = actor.starter.tenant.clone();
        let o = self.orchestrator.clone();
        // Unknown runs fail the call itself, not the stream.
        let first = o.get(&actor, &r.run_id).await?;
        let changes = o.subscribe();
        let stream = async_stream(o, tenant, r.run_id, r.after_sequence, first, changes);
        Ok(Response::new(Box::pin(stream)))
    }
}

/// Snapshot (or the changes after `after`), then each change, heartbeats
/// while quiet; ends after the change that makes the run terminal.
fn async_stream(
    o: Orchestrator,
    tenant: String,
    run_id: String,
    after: i64,
    first: pb::Run,
    mut changes: tokio::sync::broadcast::Receiver<(String, String)>,
) -> impl Stream<Item = Result<pb::WatchRunResponse, Status>> + Send {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<pb::WatchRunResponse, Status>>(64);
    tokio::spawn(async move {
        let mut seen = after;
        let mut state = first.state;
        // Resume when the changes are still journaled; else a snapshot.
        let resumable = after > 0 && after <= first.sequence;
        if !resumable {
            seen = first.sequence;
            let terminal = is_terminal(first.state);
            let msg = pb::WatchRunResponse {
                sequence: first.sequence,
                time: first.update_time,
                change: Some(pb::watch_run_response::Change::Snapshot(first)),
            };
            if tx.send(Ok(msg)).await.is_err() || terminal {
                return;
            }
        }
        loop {
            match o.changes(&tenant, &run_id, seen).await {
                Ok(list) => {
                    for c in list {
                        seen = c.sequence;
                        let end = matches!(&c.change, Some(pb::watch_run_response::Change::Run(r)) if is_terminal(r.state));
                        if let Some(pb::watch_run_response::Change::Run(r)) = &c.change {
                            state = r.state;
                        }
                        if tx.send(Ok(c)).await.is_err() || end {
                            return;
                        }
                    }
                }
                Err(e) => {
                    let _ = tx.send(Err(e.into())).await;
                    return;
                }
            }
            let wait = tokio::time::sleep(HEARTBEAT);
            tokio::pin!(wait);
            loop {
                tokio::select! {
                    () = &mut wait => {
                        let hb = pb::WatchRunResponse {
                            sequence: seen,
                            time: ts(crate::now_micros()),
                            change: Some(pb::watch_run_response::Change::Heartbeat(pb::WatchHeartbeat { state })),
                        };
                        if tx.send(Ok(hb)).await.is_err() {
                            return;
                        }
                        break;
                    }
                    got = changes.recv() => match got {
                        Ok((t, r)) if t == tenant && r == run_id => break,
                        Ok(_) => {}
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => break,
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                    },
                    () = tokio::time::sleep(Duration::from_millis(500)) => break,
                    () = tx.closed() => return,
                }
            }
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}
