//! Raise-to-receive: SubscribeInbox streams held open on the agencies a concern
//! reaches (the recipient and the front door), each timing every concern of this
//! run from the moment RaiseConcern was sent (stamped in the narrative, see
//! [`super::mix::Narrative`]) to the moment the event arrives on that stream.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use hdrhistogram::Histogram;
use tokio::task::JoinSet;
use tonic::transport::Channel;
use tonic::Streaming;

use super::mix::Narrative;
use super::{new_histogram, Window};
use crate::proto::v1::concern_service_client::ConcernServiceClient;
use crate::proto::v1::subscribe_inbox_response::Event;
use crate::proto::v1::{SubscribeInboxRequest, SubscribeInboxResponse};

/// What the subscribers saw of the concerns raised in the measured window.
#[derive(Debug, Clone)]
pub struct InboxFigures {
    /// Streams held open.
    pub subscribers: usize,
    /// Events received, over all streams.
    pub received: u64,
    /// Events that should have been received: measured raises × streams.
    pub expected: u64,
    /// Streams that ended early, by gRPC code.
    pub stream_errors: std::collections::BTreeMap<String, u64>,
    /// Raise sent to event received, microseconds.
    pub latency: Histogram<u64>,
}

impl InboxFigures {
    /// Events that never arrived.
    pub fn missed(&self) -> u64 {
        self.expected.saturating_sub(self.received)
    }
}

/// One stream's tally; the lock is held only to record, never across an await.
struct Tally {
    received: u64,
    latency: Histogram<u64>,
    ended: Option<String>,
}

/// Open streams, not yet read.
pub struct Subscribers {
    streams: Vec<Streaming<SubscribeInboxResponse>>,
}

/// Streams being read.
pub struct Probe {
    tallies: Vec<Arc<Mutex<Tally>>>,
    tasks: JoinSet<()>,
}

impl Subscribers {
    /// Opens `n` streams, round robin over `agencies` (each a set of connections as
    /// one agency), replaying from the start of each inbox.
    pub async fn open(agencies: &[Vec<Channel>], n: usize) -> anyhow::Result<Subscribers> {
        let mut streams = Vec::with_capacity(n);
        for i in 0..n {
            let channels = &agencies[i % agencies.len()];
            let channel = channels[(i / agencies.len()) % channels.len()].clone();
            let stream = ConcernServiceClient::new(channel)
                .subscribe_inbox(SubscribeInboxRequest { after_cursor: 0 })
                .await
                .with_context(|| {
                    format!(
                        "cannot open inbox subscription {} of {n} (is limits.max_subscribers_per_agency high enough?)",
                        i + 1
                    )
                })?
                .into_inner();
            streams.push(stream);
        }
        Ok(Subscribers { streams })
    }

    /// Reads every stream, timing the concerns of `narrative`'s run raised in
    /// `window`.
    pub fn start(self, window: Window, narrative: Arc<Narrative>) -> Probe {
        let mut tasks = JoinSet::new();
        let mut tallies = Vec::with_capacity(self.streams.len());
        for mut stream in self.streams {
            let tally = Arc::new(Mutex::new(Tally {
                received: 0,
                latency: new_histogram(),
                ended: None,
            }));
            tallies.push(tally.clone());
            let narrative = narrative.clone();
            tasks.spawn(async move {
                loop {
                    let event = stream.message().await;
                    let at = Instant::now();
                    let mut t = tally.lock().unwrap_or_else(PoisonError::into_inner);
                    match event {
                        Ok(Some(SubscribeInboxResponse {
                            event: Some(Event::Concern(c)),
                            ..
                        })) => {
                            let Some(sent) = narrative.sent_at(&c.narrative) else {
                                continue;
                            };
                            if window.measures(sent) {
                                t.received += 1;
                                let micros = at.duration_since(sent).as_micros().max(1);
                                let _ = t.latency.record(micros as u64);
                            }
                        }
                        Ok(Some(_)) => {}
                        Ok(None) => {
                            t.ended = Some("ended".into());
                            return;
                        }
                        Err(status) => {
                            t.ended = Some(format!("{:?}", status.code()));
                            return;
                        }
                    }
                }
            });
        }
        Probe { tallies, tasks }
    }
}

impl Probe {
    /// Waits until every stream has received `raised` concerns of the window (or
    /// nothing has arrived for `quiet`), then closes the streams and adds up.
    pub async fn finish(mut self, raised: u64, quiet: Duration) -> InboxFigures {
        let expected = raised * self.tallies.len() as u64;
        let mut last = (self.received(), Instant::now());
        loop {
            let now = self.received();
            if now >= expected {
                break;
            }
            if now != last.0 {
                last = (now, Instant::now());
            } else if last.1.elapsed() >= quiet {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.tasks.abort_all();
        while self.tasks.join_next().await.is_some() {}
        let mut figures = InboxFigures {
            subscribers: self.tallies.len(),
            received: 0,
            expected,
            stream_errors: Default::default(),
            latency: new_histogram(),
        };
        for tally in &self.tallies {
            let t = tally.lock().unwrap_or_else(PoisonError::into_inner);
            figures.received += t.received;
            let _ = figures.latency.add(&t.latency);
            if let Some(code) = &t.ended {
                *figures.stream_errors.entry(code.clone()).or_default() += 1;
            }
        }
        figures
    }

    fn received(&self) -> u64 {
        self.tallies
            .iter()
            .map(|t| t.lock().unwrap_or_else(PoisonError::into_inner).received)
            .sum()
    }
}
