//! `anumate events …`: follow the event stream through the events service
//! (so it works in embedded mode, without Kafka) and replay archived events
//! to Kafka.

use std::process::ExitCode;
use std::time::Duration;

use anumate_proto::events::v1 as pb;
use clap::{Args, Subcommand};
use pb::events_service_client::EventsServiceClient;

use crate::cli::{Connection, Failure, Output, finish, print_json};

/// `anumate events …`
#[derive(Args, Debug)]
pub struct EventsCommand {
    #[command(subcommand)]
    pub command: EventsSub,
    #[command(flatten)]
    pub conn: Connection,
}

/// Events subcommands.
#[derive(Subcommand, Debug)]
pub enum EventsSub {
    /// Follow your tenant's events (the token's tenant): history from
    /// --since/--after, then live ones.
    Tail {
        /// CloudEvents type to show (repeatable); a trailing `*` matches a
        /// prefix, e.g. `dev.anumate.capsule.*`.
        #[arg(long = "type", short = 't')]
        types: Vec<String>,
        /// Only events of this aggregate (Kafka key), e.g. a capsule name.
        #[arg(long, default_value = "")]
        key: String,
        /// Only events on this topic, e.g. anumate.runs.
        #[arg(long, default_value = "")]
        topic: String,
        /// Start with history: `all`, an RFC 3339 time, or an age like 10m,
        /// 2h, 1d. Default: live events only.
        #[arg(long, conflicts_with = "after")]
        since: Option<String>,
        /// Start after this history sequence (resume a tail).
        #[arg(long)]
        after: Option<i64>,
        /// Stop once the history is printed instead of following.
        #[arg(long)]
        no_follow: bool,
    },
    /// Republish archived outbox events of a topic to Kafka, marked as
    /// replays (admin).
    Replay {
        /// Topic, e.g. anumate.capsules.
        #[arg(long)]
        topic: String,
        /// Where to start: an outbox sequence number, an RFC 3339 time, or
        /// an age like 10m, 2h, 1d.
        #[arg(long)]
        from: String,
        /// Most events to republish (0: the server's limit).
        #[arg(long, default_value_t = 0)]
        limit: i32,
    },
}

/// Runs `anumate events …`.
pub async fn run(cmd: EventsCommand) -> ExitCode {
    finish(events(cmd).await.map(|()| ExitCode::SUCCESS), None)
}

/// Parses `all`, an RFC 3339 time or an age (`90s`, `10m`, `2h`, `1d`) into a
/// timestamp.
fn parse_time(s: &str) -> Result<pbjson_types::Timestamp, String> {
    let now = chrono::Utc::now();
    let at = if s == "all" {
        chrono::DateTime::<chrono::Utc>::UNIX_EPOCH
    } else if let Ok(t) = chrono::DateTime::parse_from_rfc3339(s) {
        t.with_timezone(&chrono::Utc)
    } else {
        let (num, unit) = s.split_at(s.len().saturating_sub(1));
        let n: u64 = num
            .parse()
            .map_err(|_| format!("{s:?} is not `all`, an RFC 3339 time or an age like 10m"))?;
        let secs = match unit {
            "s" => n,
            "m" => n.saturating_mul(60),
            "h" => n.saturating_mul(3600),
            "d" => n.saturating_mul(86_400),
            _ => return Err(format!("{s:?}: the age unit must be s, m, h or d")),
        };
        let age = chrono::Duration::from_std(Duration::from_secs(secs))
            .map_err(|_| format!("{s:?} is too far back"))?;
        now.checked_sub_signed(age)
            .ok_or_else(|| format!("{s:?} is too far back"))?
    };
    Ok(pbjson_types::Timestamp {
        seconds: at.timestamp(),
        nanos: i32::try_from(at.timestamp_subsec_nanos()).unwrap_or(0),
    })
}

fn time_text(t: Option<&pbjson_types::Timestamp>) -> String {
    t.and_then(|t| chrono::DateTime::from_timestamp(t.seconds, u32::try_from(t.nanos).unwrap_or(0)))
        .map(|t| t.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string())
        .unwrap_or_default()
}

fn print_event(e: &pb::CloudEvent, out: Output) {
    match out {
        Output::Json => match serde_json::to_string(e) {
            Ok(s) => println!("{s}"),
            Err(err) => eprintln!("error: cannot encode event: {err}"),
        },
        Output::Human => {
            let mut line = format!(
                "#{:<6} {}  {}  {}",
                e.sequence,
                time_text(e.time.as_ref()),
                e.r#type,
                e.subject
            );
            if !e.tenant_id.is_empty() {
                line.push_str(&format!("  tenant={}", e.tenant_id));
            }
            if e.replay {
                line.push_str("  (replay)");
            }
            println!("{line}");
            if !e.data_json.is_empty() {
                println!("        {}", e.data_json);
            }
        }
    }
}

async fn events(cmd: EventsCommand) -> Result<(), Failure> {
    let out = cmd.conn.output;
    let mut client = cmd
        .conn
        .client(EventsServiceClient::with_interceptor)
        .await?;
    match cmd.command {
        EventsSub::Tail {
            types,
            key,
            topic,
            since,
            after,
            no_follow,
        } => {
            let start = match (since, after) {
                (Some(s), _) => Some(pb::tail_events_request::Start::Since(
                    parse_time(&s).map_err(|e| Failure::Local(format!("--since: {e}")))?,
                )),
                (None, Some(n)) => Some(pb::tail_events_request::Start::AfterSequence(n)),
                (None, None) => None,
            };
            let mut stream = client
                .tail_events(pb::TailEventsRequest {
                    filter: Some(pb::EventFilter { types, key, topic }),
                    start,
                })
                .await?
                .into_inner();
            while let Some(msg) = stream.message().await? {
                if let Some(e) = &msg.event {
                    print_event(e, out);
                }
                if msg.caught_up {
                    if no_follow {
                        return Ok(());
                    }
                    if out == Output::Human {
                        eprintln!("-- caught up; following live events (Ctrl-C to stop)");
                    }
                }
            }
            Ok(())
        }
        EventsSub::Replay { topic, from, limit } => {
            let origin = match from.parse::<i64>() {
                Ok(seq) => pb::replay_events_request::Origin::FromSequence(seq),
                Err(_) => pb::replay_events_request::Origin::FromTime(
                    parse_time(&from).map_err(|e| Failure::Local(format!("--from: {e}")))?,
                ),
            };
            let resp = client
                .replay_events(pb::ReplayEventsRequest {
                    topic,
                    origin: Some(origin),
                    limit,
                })
                .await?
                .into_inner();
            match out {
                Output::Json => print_json(&resp),
                Output::Human => {
                    println!(
                        "replayed {} events (outbox sequence {}..{}) as replay {}",
                        resp.replayed_count,
                        resp.first_sequence,
                        resp.last_sequence,
                        resp.replay_id
                    );
                    if resp.truncated {
                        println!(
                            "stopped at the limit; continue with --from {}",
                            resp.last_sequence + 1
                        );
                    }
                }
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_parse_as_all_rfc3339_or_age() {
        assert_eq!(parse_time("all").unwrap().seconds, 0);
        assert_eq!(
            parse_time("2026-11-25T10:00:00Z").unwrap().seconds,
            1_795_600_800
        );
        let now = chrono::Utc::now().timestamp();
        let t = parse_time("10m").unwrap().seconds;
        assert!((now - 600 - t).abs() <= 2);
        assert!(parse_time("10w").is_err());
        assert!(parse_time("yesterday").is_err());
    }
}
