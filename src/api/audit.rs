//! AuditService: the auditor's read-only view of the log. Every call is audited
//! (AUDIT_QUERIED) before it answers; malformed requests are refused first and
//! change nothing.

use std::pin::Pin;
use std::sync::Arc;

use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use super::{request_context, App, Ctx};
use crate::api::status::ApiError;
use crate::audit::checkpoint::SignedCheckpoint;
use crate::audit::entry::micros_from_timestamp;
use crate::audit::{query, Actor, NewEntry};
use crate::proto::v1::audit_service_server::AuditService;
use crate::proto::v1::*;

/// Most entries a SubjectAccessReport returns; beyond it, QueryDisclosures pages.
const SUBJECT_REPORT_MAX: usize = 10_000;

/// The AuditService adapter.
#[derive(Clone)]
pub struct Audit {
    app: Arc<App>,
}

impl Audit {
    /// Wraps the shared application state.
    pub fn new(app: Arc<App>) -> Self {
        Audit { app }
    }

    /// Appends this call's own AUDIT_QUERIED entry.
    async fn audit_call(
        &self,
        ctx: &Ctx,
        what: String,
        subject: Option<crate::store::keys::SubjectRef>,
    ) -> Result<u64, ApiError> {
        let mut entry = NewEntry::new(
            Actor::from(&ctx.caller),
            AuditAction::AuditQueried,
            AuditOutcome::Allowed,
            &ctx.request_id,
        );
        entry.subject = subject;
        entry.reason = what;
        Ok(self.app.auditor.append(entry).await?.seq())
    }

    fn filter(&self, req: &QueryDisclosuresRequest) -> Result<query::Filter, ApiError> {
        let subject = match &req.subject {
            Some(s) => Some(self.app.subject_ref(s)?),
            None => None,
        };
        // Empty for no filter; otherwise a registry id, which an entry's actor or
        // target always is.
        let id = |name: &str, v: &str| -> Result<Option<String>, ApiError> {
            if v.is_empty() {
                return Ok(None);
            }
            crate::domain::PrincipalId::parse(v)
                .map(|_| Some(v.to_owned()))
                .map_err(|e| ApiError::Invalid(format!("{name}: {e}")))
        };
        let action = match AuditAction::try_from(req.action) {
            Ok(AuditAction::Unspecified) => None,
            Ok(a) => Some(a as i32),
            Err(_) => {
                return Err(ApiError::Invalid(format!(
                    "action {} is not an AuditAction",
                    req.action
                )))
            }
        };
        for (name, t) in [("since", &req.since), ("until", &req.until)] {
            if let Some(t) = t {
                super::records::time_in(t, name)?;
            }
        }
        let since_micros = req.since.as_ref().map(micros_from_timestamp);
        let until_micros = req.until.as_ref().map(micros_from_timestamp);
        if let (Some(s), Some(u)) = (since_micros, until_micros) {
            if u <= s {
                return Err(ApiError::Invalid("until must be after since".into()));
            }
        }
        let filter = query::Filter {
            subject,
            actor_id: id("actor_id", &req.actor_id)?,
            target_agency_id: id("target_agency_id", &req.target_agency_id)?,
            action,
            since_micros,
            until_micros,
        };
        // A token that is not one this filter's pages handed out is refused before
        // the call is audited.
        if !req.page_token.is_empty() {
            query::decode_token(&req.page_token, &filter)?;
        }
        Ok(filter)
    }

    /// The bytes of entries one response may carry: a message's limit, less room
    /// for the rest of the response.
    fn entry_budget(&self) -> usize {
        self.app
            .config
            .limits
            .max_message_bytes
            .saturating_sub(crate::config::MESSAGE_HEADROOM_BYTES)
    }
}

/// How many of `entries` fit in `budget` bytes of a response (at least one: no
/// entry comes near a message's limit).
fn fitting(entries: &[AuditEntry], budget: usize) -> usize {
    let mut bytes = 0usize;
    for (i, entry) in entries.iter().enumerate() {
        // The field's tag and length prefix take at most 6 bytes.
        bytes = bytes.saturating_add(prost::Message::encoded_len(entry) + 6);
        if bytes > budget {
            return i.max(1);
        }
    }
    entries.len()
}

fn checkpoint_message(signed: &SignedCheckpoint) -> Checkpoint {
    let cp = &signed.checkpoint;
    Checkpoint {
        log_id: cp.log_id.clone(),
        tree_size: cp.tree_size,
        root_hash: cp.root_hash.to_vec(),
        timestamp: Some(prost_types::Timestamp {
            seconds: cp.timestamp as i64,
            nanos: 0,
        }),
        signature: signed.signature.to_vec(),
        public_key: signed.public_key.to_vec(),
        signed_note: signed.signed_note(),
        verifier_key: signed.verifier_key(),
    }
}

/// Entries read at a time by ExportEntries.
const EXPORT_CHUNK: u64 = 64;

type ExportStream = Pin<Box<dyn Stream<Item = Result<ExportEntriesResponse, Status>> + Send>>;

#[tonic::async_trait]
impl AuditService for Audit {
    async fn query_disclosures(
        &self,
        req: Request<QueryDisclosuresRequest>,
    ) -> Result<Response<QueryDisclosuresResponse>, Status> {
        let ctx = request_context(&req)?;
        let req = req.into_inner();
        let result = async {
            let filter = self.filter(&req)?;
            let page_size = self.app.page_size(req.page_size)?;
            self.audit_call(
                &ctx,
                format!("QueryDisclosures {}", filter.describe())
                    .trim_end()
                    .to_owned(),
                filter.subject.clone(),
            )
            .await?;
            let max_scan = page_size.saturating_mul(20).max(10_000);
            let mut page = self
                .app
                .auditor
                .query(&filter, &req.page_token, page_size, max_scan)
                .await?;
            // A page also ends where the response would outgrow a message; the
            // next one starts at the first entry left out.
            let fit = fitting(&page.entries, self.entry_budget());
            if fit < page.entries.len() {
                let resume = page.entries[fit].seq;
                page.entries.truncate(fit);
                page.next_page_token = Some(query::encode_token(resume, &filter));
            }
            Ok(QueryDisclosuresResponse {
                entries: page.entries,
                next_page_token: page.next_page_token.unwrap_or_default(),
            })
        }
        .await;
        result
            .map(Response::new)
            .map_err(|e: ApiError| e.into_status(&ctx.request_id))
    }

    async fn subject_access_report(
        &self,
        req: Request<SubjectAccessReportRequest>,
    ) -> Result<Response<SubjectAccessReportResponse>, Status> {
        let ctx = request_context(&req)?;
        let req = req.into_inner();
        let result = async {
            let subject = req
                .subject
                .as_ref()
                .ok_or_else(|| ApiError::Invalid("subject is required".into()))?;
            let subject = self.app.subject_ref(subject)?;
            self.audit_call(&ctx, "SubjectAccessReport".into(), Some(subject.clone())).await?;
            let filter = query::Filter { subject: Some(subject), ..Default::default() };
            let page = self
                .app
                .auditor
                .query(&filter, "", SUBJECT_REPORT_MAX + 1, usize::MAX)
                .await?;
            if page.entries.len() > SUBJECT_REPORT_MAX {
                return Err(ApiError::Exhausted(format!(
                    "more than {SUBJECT_REPORT_MAX} entries concern this child; page through them with QueryDisclosures and the subject filter"
                )));
            }
            let budget = self.entry_budget();
            if fitting(&page.entries, budget) < page.entries.len() {
                return Err(ApiError::Exhausted(format!(
                    "the {} entries about this child take more than one response may carry ({budget} bytes, from limits.max_message_bytes); page through them with QueryDisclosures and the subject filter",
                    page.entries.len()
                )));
            }
            Ok(SubjectAccessReportResponse { entries: page.entries })
        }
        .await;
        result
            .map(Response::new)
            .map_err(|e: ApiError| e.into_status(&ctx.request_id))
    }

    async fn get_checkpoint(
        &self,
        req: Request<GetCheckpointRequest>,
    ) -> Result<Response<GetCheckpointResponse>, Status> {
        let ctx = request_context(&req)?;
        let result = async {
            self.audit_call(&ctx, "GetCheckpoint".into(), None).await?;
            let signed = self.app.auditor.checkpoint().await?;
            Ok(GetCheckpointResponse {
                checkpoint: Some(checkpoint_message(&signed)),
            })
        }
        .await;
        result
            .map(Response::new)
            .map_err(|e: ApiError| e.into_status(&ctx.request_id))
    }

    async fn get_inclusion_proof(
        &self,
        req: Request<GetInclusionProofRequest>,
    ) -> Result<Response<GetInclusionProofResponse>, Status> {
        let ctx = request_context(&req)?;
        let req = req.into_inner();
        let result = async {
            let size = self.app.auditor.size().await?;
            if req.tree_size > size || req.seq >= req.tree_size {
                return Err(ApiError::OutOfRange(format!(
                    "need seq < tree_size <= {size} (the log's size); got seq {} and tree_size {}",
                    req.seq, req.tree_size
                )));
            }
            self.audit_call(
                &ctx,
                format!(
                    "GetInclusionProof seq={} tree_size={}",
                    req.seq, req.tree_size
                ),
                None,
            )
            .await?;
            let (leaf, hashes) = self
                .app
                .auditor
                .inclusion_proof(req.seq, req.tree_size)
                .await?;
            Ok(GetInclusionProofResponse {
                leaf_index: req.seq,
                tree_size: req.tree_size,
                leaf_hash: leaf.to_vec(),
                hashes: hashes.iter().map(|h| h.to_vec()).collect(),
            })
        }
        .await;
        result
            .map(Response::new)
            .map_err(|e: ApiError| e.into_status(&ctx.request_id))
    }

    async fn get_consistency_proof(
        &self,
        req: Request<GetConsistencyProofRequest>,
    ) -> Result<Response<GetConsistencyProofResponse>, Status> {
        let ctx = request_context(&req)?;
        let req = req.into_inner();
        let result = async {
            let size = self.app.auditor.size().await?;
            if req.to_size > size || req.from_size > req.to_size {
                return Err(ApiError::OutOfRange(format!(
                    "need from_size <= to_size <= {size} (the log's size); got from_size {} and to_size {}",
                    req.from_size, req.to_size
                )));
            }
            if req.from_size == 0 && req.to_size > 0 {
                // RFC 9162 defines proofs for 0 < from_size only: an empty proof
                // would check nothing.
                return Err(ApiError::OutOfRange(
                    "from_size must be at least 1: every log extends the empty log, and no proof shows it".into(),
                ));
            }
            self.audit_call(
                &ctx,
                format!("GetConsistencyProof from_size={} to_size={}", req.from_size, req.to_size),
                None,
            )
            .await?;
            let hashes = self
                .app
                .auditor
                .consistency_proof(req.from_size, req.to_size)
                .await?;
            Ok(GetConsistencyProofResponse {
                from_size: req.from_size,
                to_size: req.to_size,
                hashes: hashes.iter().map(|h| h.to_vec()).collect(),
            })
        }
        .await;
        result
            .map(Response::new)
            .map_err(|e: ApiError| e.into_status(&ctx.request_id))
    }

    type ExportEntriesStream = ExportStream;

    async fn export_entries(
        &self,
        req: Request<ExportEntriesRequest>,
    ) -> Result<Response<Self::ExportEntriesStream>, Status> {
        let ctx = request_context(&req)?;
        let req = req.into_inner();
        let result = async {
            let log = self.app.auditor.clone();
            let size = log.size().await?;
            let to = if req.to_seq == 0 { size } else { req.to_seq };
            if req.from_seq > size || to > size || to < req.from_seq {
                return Err(ApiError::OutOfRange(format!(
                    "need from_seq <= to_seq <= {size} (the log's size; to_seq 0 means the end); got from_seq {} and to_seq {}",
                    req.from_seq, req.to_seq
                )));
            }
            self.audit_call(&ctx, format!("ExportEntries from_seq={} to_seq={to}", req.from_seq), None).await?;
            // Bounded: at most 64 entries wait in memory for a slow reader.
            let (tx, rx) = tokio::sync::mpsc::channel(64);
            let from = req.from_seq;
            let request_id = ctx.request_id.clone();
            tokio::spawn(async move {
                let mut seq = from;
                while seq < to {
                    let end = to.min(seq + EXPORT_CHUNK);
                    let entries = match log.entries(seq, end).await {
                        Ok(entries) => entries,
                        Err(e) => {
                            let _ = tx.send(Err(ApiError::from(e).into_status(&request_id))).await;
                            return;
                        }
                    };
                    for entry in entries {
                        if tx.send(Ok(ExportEntriesResponse { entry: Some(entry) })).await.is_err() {
                            return;
                        }
                    }
                    seq = end;
                }
            });
            Ok(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)) as ExportStream)
        }
        .await;
        result
            .map(Response::new)
            .map_err(|e: ApiError| e.into_status(&ctx.request_id))
    }
}
