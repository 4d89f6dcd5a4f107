//! The gateway's calls, op by op, each made as the development identity the
//! sharing agreements let make it:
//!
//! - GetRecord, FindRecords: school-oakfield, purpose SAFEGUARDING, on the records
//!   [`super::seed`] shared (health ones disclosed on CONSENT, police ones on the
//!   agreement alone); a wrong basis or a short content counts as an error.
//! - RaiseConcern: police-met to school-oakfield (the front door is added by the
//!   gateway), a narrative of the payload size carrying the run id and the send
//!   time (see [`Narrative`]), and a unique request_id.
//! - QueryDisclosures: the auditor dpo, one page of 10.

use std::sync::Arc;
use std::time::Instant;

use tonic::transport::Channel;

use super::seed::{self, Seeded};
use super::{pick, CallFuture, Caller, Failure, Op};
use crate::proto::v1::audit_service_client::AuditServiceClient;
use crate::proto::v1::concern_service_client::ConcernServiceClient;
use crate::proto::v1::record_service_client::RecordServiceClient;
use crate::proto::v1::{
    ConcernCategory, FindRecordsRequest, GetRecordRequest, QueryDisclosuresRequest,
    RaiseConcernRequest, Urgency,
};

/// The agency concerns are raised to.
pub const CONCERN_RECIPIENT: &str = "school-oakfield";

/// Connections per identity; an identity the ops do not need has none.
#[derive(Default)]
pub struct MixChannels {
    /// school-oakfield: GetRecord, FindRecords.
    pub school: Vec<Channel>,
    /// police-met: RaiseConcern.
    pub police: Vec<Channel>,
    /// auditor dpo: QueryDisclosures.
    pub auditor: Vec<Channel>,
}

/// The round-robin mix of `ops` over `seeded`.
pub fn caller(
    ops: Vec<Op>,
    ch: MixChannels,
    seeded: Arc<Seeded>,
    narrative: Arc<Narrative>,
) -> Caller {
    let ch = Arc::new(ch);
    Arc::new(move |w, n| -> CallFuture {
        let op = ops[(w + n as usize) % ops.len()];
        let (ch, seeded, narrative) = (ch.clone(), seeded.clone(), narrative.clone());
        Box::pin(async move {
            let result = match op {
                Op::GetRecord => get_record(&ch.school, &seeded, w, n).await,
                Op::FindRecords => find_records(&ch.school, &seeded, w, n).await,
                Op::RaiseConcern => raise_concern(&ch.police, &narrative, w, n).await,
                Op::QueryDisclosures => query_disclosures(&ch.auditor, w).await,
                Op::Echo => Err(Failure::Unexpected("echo is the baseline's op")),
            };
            (op, result)
        })
    })
}

/// Spreads workers over the records so each worker walks them all, from a
/// different starting point.
fn nth(len: usize, w: usize, n: u64) -> usize {
    (w.wrapping_mul(7) + n as usize) % len.max(1)
}

async fn get_record(ch: &[Channel], seeded: &Seeded, w: usize, n: u64) -> Result<(), Failure> {
    let Some(record) = seeded.records.get(nth(seeded.records.len(), w, n)) else {
        return Err(Failure::Unexpected("no records seeded"));
    };
    let got = RecordServiceClient::new(pick(ch, w))
        .get_record(GetRecordRequest {
            record_id: record.id.clone(),
            purpose: seed::PURPOSE as i32,
            r#override: None,
        })
        .await?
        .into_inner();
    if got.basis != record.basis as i32 {
        return Err(Failure::Unexpected("wrong disclosure basis"));
    }
    if got.content.len() != seeded.content_bytes {
        return Err(Failure::Unexpected("content of the wrong size"));
    }
    Ok(())
}

async fn find_records(ch: &[Channel], seeded: &Seeded, w: usize, n: u64) -> Result<(), Failure> {
    let Some(nhs) = seeded.subjects.get(nth(seeded.subjects.len(), w, n)) else {
        return Err(Failure::Unexpected("no children seeded"));
    };
    let found = RecordServiceClient::new(pick(ch, w))
        .find_records(FindRecordsRequest {
            subject: seed::subject(nhs),
            purpose: seed::PURPOSE as i32,
            ..Default::default()
        })
        .await?
        .into_inner();
    if found.records.is_empty() {
        return Err(Failure::Unexpected("no records found for a seeded child"));
    }
    Ok(())
}

async fn raise_concern(
    ch: &[Channel],
    narrative: &Narrative,
    w: usize,
    n: u64,
) -> Result<(), Failure> {
    let Some(nhs) = narrative.subjects.get(nth(narrative.subjects.len(), w, n)) else {
        return Err(Failure::Unexpected("no children to raise concerns about"));
    };
    let raised = ConcernServiceClient::new(pick(ch, w))
        .raise_concern(RaiseConcernRequest {
            subject: seed::subject(nhs),
            category: ConcernCategory::DomesticAbuse as i32,
            urgency: Urgency::Urgent as i32,
            narrative: narrative.now(),
            recipient_agency_ids: vec![CONCERN_RECIPIENT.into()],
            request_id: format!("{}-{w}-{n}", narrative.run),
        })
        .await?
        .into_inner();
    match raised.concern {
        Some(c) if !c.concern_id.is_empty() => Ok(()),
        _ => Err(Failure::Unexpected("no concern in the answer")),
    }
}

async fn query_disclosures(ch: &[Channel], w: usize) -> Result<(), Failure> {
    AuditServiceClient::new(pick(ch, w))
        .query_disclosures(QueryDisclosuresRequest {
            page_size: 10,
            ..Default::default()
        })
        .await?;
    Ok(())
}

/// A concern narrative that says when it was sent: `sgw-bench <run> t=<µs> `, the
/// microseconds since `epoch`, padded with `x` to the payload size (never shorter
/// than the prefix). The run id keeps other runs' concerns, replayed to an inbox
/// subscriber, from being measured.
#[derive(Debug, Clone)]
pub struct Narrative {
    /// The run's id, also the request_id prefix.
    pub run: String,
    /// When t=0 is.
    pub epoch: Instant,
    /// The narrative's size in bytes (ASCII, so also in characters).
    pub bytes: usize,
    /// The children concerns are raised about.
    pub subjects: Vec<String>,
}

impl Narrative {
    /// A narrative stamped with the time now.
    pub fn now(&self) -> String {
        let mut s = format!(
            "sgw-bench {} t={} ",
            self.run,
            self.epoch.elapsed().as_micros()
        );
        if s.len() < self.bytes {
            s.extend(std::iter::repeat_n('x', self.bytes - s.len()));
        }
        s
    }

    /// When a narrative of this run was sent, or `None` for any other narrative.
    pub fn sent_at(&self, narrative: &str) -> Option<Instant> {
        let rest = narrative.strip_prefix("sgw-bench ")?;
        let rest = rest.strip_prefix(self.run.as_str())?;
        let micros: u64 = rest.strip_prefix(" t=")?.split(' ').next()?.parse().ok()?;
        Some(self.epoch + std::time::Duration::from_micros(micros))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_narrative_is_the_payload_size_and_carries_its_send_time() {
        let n = Narrative {
            run: "abc123".into(),
            epoch: Instant::now(),
            bytes: 1024,
            subjects: vec![],
        };
        let text = n.now();
        assert_eq!(text.len(), 1024);
        let sent = n.sent_at(&text).expect("own narrative");
        assert!(sent <= Instant::now());
        let other = Narrative {
            run: "abc12".into(),
            ..n.clone()
        };
        assert_eq!(other.sent_at(&text), None);
        assert_eq!(n.sent_at("Police attended a domestic incident"), None);
    }
}
