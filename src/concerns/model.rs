//! What a concern is and the rules of its lifecycle. Pure: no I/O, no clock reads,
//! no gRPC and no sled; every moment comes in as an argument.

use std::fmt;

use time::OffsetDateTime;

use crate::domain::{AgencyId, ConcernCategory, NhsNumber, Sector, Urgency};
use crate::store::keys::SubjectRef;

/// Longest lead practitioner name, in characters.
pub const MAX_LEAD_PRACTITIONER_CHARS: usize = 200;

/// Most entries a request may list in `recipient_agency_ids` (before duplicates are
/// removed); more than there could ever be registered agencies to tell apart.
pub const MAX_REQUESTED_RECIPIENTS: usize = 256;

/// A concern's id: `c-` and 32 lower-case hex digits (128 random bits).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConcernId(String);

// === impl ConcernId ===

impl ConcernId {
    /// The id made from 16 random bytes.
    pub fn from_random(bytes: [u8; 16]) -> Self {
        ConcernId(format!("c-{}", crate::tls::hex(&bytes)))
    }

    /// Parses an id of the form `c-` + 32 lower-case hex digits.
    pub fn parse(s: &str) -> Result<Self, String> {
        let ok = s.len() == 34
            && s.starts_with("c-")
            && s[2..]
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if ok {
            Ok(ConcernId(s.to_owned()))
        } else if s.is_empty() {
            Err("concern_id is required".into())
        } else {
            Err("concern_id must be \"c-\" followed by 32 lower-case hex digits".into())
        }
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ConcernId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The front door's decision on a concern.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// No further action.
    NoFurtherAction,
    /// Early help.
    EarlyHelp,
    /// Child in need (s.17 Children Act 1989).
    ChildInNeed,
    /// Child protection enquiry (s.47 Children Act 1989).
    ChildProtectionEnquiry,
    /// Police action.
    PoliceAction,
}

// === impl Decision ===

impl Decision {
    /// Every decision.
    pub const ALL: &'static [Decision] = &[
        Decision::NoFurtherAction,
        Decision::EarlyHelp,
        Decision::ChildInNeed,
        Decision::ChildProtectionEnquiry,
        Decision::PoliceAction,
    ];

    /// The canonical name, as in API.md.
    pub fn as_str(self) -> &'static str {
        match self {
            Decision::NoFurtherAction => "NO_FURTHER_ACTION",
            Decision::EarlyHelp => "EARLY_HELP",
            Decision::ChildInNeed => "CHILD_IN_NEED",
            Decision::ChildProtectionEnquiry => "CHILD_PROTECTION_ENQUIRY",
            Decision::PoliceAction => "POLICE_ACTION",
        }
    }

    /// The decision named `s` (canonical name).
    pub fn from_name(s: &str) -> Option<Self> {
        Decision::ALL.iter().copied().find(|d| d.as_str() == s)
    }
}

/// Where a concern is in its lifecycle. Derived from the concern, never stored: see
/// [`Concern::status`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConcernStatus {
    /// Not yet delivered to every recipient.
    Raised,
    /// Delivered to every recipient, not yet acknowledged by all of them.
    Delivered,
    /// Acknowledged by every recipient, awaiting the front door's decision.
    Acknowledged,
    /// The front door has recorded a decision.
    Decided,
    /// Closed. No call closes a concern yet, so no concern is in this state.
    Closed,
    /// A recipient let its acknowledgement deadline pass and the concern was escalated;
    /// it stays here until every recipient has acknowledged or a decision is made.
    Overdue,
}

/// The delivery of a concern to one recipient.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// The recipient.
    pub agency: AgencyId,
    /// When this recipient must have acknowledged the concern.
    pub due_at: OffsetDateTime,
    /// When the narrative first reached the recipient (after its CONCERN_DELIVERED
    /// audit entry was durable).
    pub delivered_at: Option<OffsetDateTime>,
    /// When the recipient acknowledged it.
    pub acknowledged_at: Option<OffsetDateTime>,
    /// The recipient's note with its acknowledgement (sealed at rest).
    pub note: String,
    /// Whether this recipient's missed deadline has been escalated (at most once).
    pub escalated: bool,
}

/// The front door's recorded decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecisionRecord {
    /// What was decided.
    pub decision: Decision,
    /// The named lead practitioner.
    pub lead_practitioner: String,
    /// The reasons, optional (sealed at rest).
    pub note: String,
    /// When.
    pub decided_at: OffsetDateTime,
    /// By which agency (the front door at the time).
    pub decided_by: AgencyId,
}

/// A safeguarding concern about a child.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Concern {
    /// The gateway's id.
    pub id: ConcernId,
    /// The child.
    pub subject: NhsNumber,
    /// The child's keyed hash, for audit entries.
    pub subject_ref: SubjectRef,
    /// The sender.
    pub raised_by: AgencyId,
    /// The kind of harm.
    pub category: ConcernCategory,
    /// How soon it must be acknowledged.
    pub urgency: Urgency,
    /// The sender's account (sealed at rest, never logged or audited).
    pub narrative: String,
    /// One delivery per recipient, the front door included unless it is the sender.
    pub recipients: Vec<Delivery>,
    /// When it was raised.
    pub raised_at: OffsetDateTime,
    /// The front door's decision, once made.
    pub decision: Option<DecisionRecord>,
    /// The front door it was routed to: the one named in config when it was
    /// raised. `None` for a concern stored before concerns recorded theirs.
    pub front_door: Option<AgencyId>,
}

// === impl Concern ===

impl Concern {
    /// The front door that decides on this concern and is told when it is late: the
    /// one it was routed to, so that changing `front_door` in config routes new
    /// concerns only. A concern stored without one falls back to `configured`.
    pub fn front_door<'a>(&'a self, configured: &'a AgencyId) -> &'a AgencyId {
        self.front_door.as_ref().unwrap_or(configured)
    }

    /// The status, from the deliveries and the decision:
    /// decided → DECIDED; else every recipient acknowledged → ACKNOWLEDGED; else an
    /// escalation was sent → OVERDUE; else delivered to every recipient → DELIVERED;
    /// else RAISED. A late acknowledgement therefore moves an OVERDUE concern on to
    /// ACKNOWLEDGED once the last recipient has acknowledged.
    pub fn status(&self) -> ConcernStatus {
        if self.decision.is_some() {
            ConcernStatus::Decided
        } else if self.recipients.iter().all(|d| d.acknowledged_at.is_some()) {
            ConcernStatus::Acknowledged
        } else if self.recipients.iter().any(|d| d.escalated) {
            ConcernStatus::Overdue
        } else if self.recipients.iter().all(|d| d.delivered_at.is_some()) {
            ConcernStatus::Delivered
        } else {
            ConcernStatus::Raised
        }
    }

    /// The earliest acknowledgement deadline among the recipients (the Concern's
    /// `ack_due_at`).
    pub fn ack_due_at(&self) -> OffsetDateTime {
        self.recipients
            .iter()
            .map(|d| d.due_at)
            .min()
            .unwrap_or(self.raised_at)
    }

    /// The delivery to `agency`, when it is a recipient.
    pub fn delivery(&self, agency: &AgencyId) -> Option<&Delivery> {
        self.recipients.iter().find(|d| &d.agency == agency)
    }

    fn delivery_mut(&mut self, agency: &AgencyId) -> Option<&mut Delivery> {
        self.recipients.iter_mut().find(|d| &d.agency == agency)
    }

    /// Whether `agency` sent it or receives it: only they may know it exists.
    pub fn is_party(&self, agency: &AgencyId) -> bool {
        &self.raised_by == agency || self.delivery(agency).is_some()
    }

    /// Records the first delivery to `agency`. False when it is not a recipient or
    /// was delivered before (the first time is kept).
    pub fn mark_delivered(&mut self, agency: &AgencyId, at: OffsetDateTime) -> bool {
        match self.delivery_mut(agency) {
            Some(d) if d.delivered_at.is_none() => {
                d.delivered_at = Some(at);
                true
            }
            _ => false,
        }
    }

    /// Records `agency`'s acknowledgement. False when it is not a recipient or had
    /// already acknowledged (the first acknowledgement and its note are kept).
    pub fn acknowledge(&mut self, agency: &AgencyId, at: OffsetDateTime, note: &str) -> bool {
        match self.delivery_mut(agency) {
            Some(d) if d.acknowledged_at.is_none() => {
                d.acknowledged_at = Some(at);
                d.note = note.to_owned();
                true
            }
            _ => false,
        }
    }

    /// The status the concern would have once delivered to `agency` (for filtering a
    /// list before delivering what it returns).
    pub fn status_once_delivered_to(&self, agency: &AgencyId, at: OffsetDateTime) -> ConcernStatus {
        let mut after = self.clone();
        after.mark_delivered(agency, at);
        after.status()
    }

    /// Marks the given recipients escalated; returns those that still needed it (not
    /// acknowledged, not escalated before).
    pub fn mark_escalated(&mut self, agencies: &[AgencyId]) -> Vec<AgencyId> {
        let mut marked = Vec::new();
        for d in &mut self.recipients {
            if agencies.contains(&d.agency) && d.acknowledged_at.is_none() && !d.escalated {
                d.escalated = true;
                marked.push(d.agency.clone());
            }
        }
        marked
    }
}

/// An event in an agency's inbox, as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InboxEvent {
    /// A concern delivered to the agency (rendered as it stands when sent).
    Concern(ConcernId),
    /// A concern the agency sent (or, for the front door, received) is overdue.
    Escalation(Escalation),
    /// One of the agency's records was disclosed under a safeguarding override.
    OverrideNotice(OverrideNoticeEvent),
}

/// Tells a record's owner that another agency read it under a safeguarding
/// override. The justification is sealed at rest and never logged.
#[derive(Clone, PartialEq, Eq)]
pub struct OverrideNoticeEvent {
    /// The record disclosed.
    pub record_id: String,
    /// The agency that read it.
    pub recipient: AgencyId,
    /// The recipient's written justification.
    pub justification: String,
    /// The seq of the durable RECORD_DISCLOSED audit entry.
    pub audit_seq: u64,
}

impl std::fmt::Debug for OverrideNoticeEvent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OverrideNoticeEvent")
            .field("record_id", &self.record_id)
            .field("recipient", &self.recipient)
            .field("justification", &"<redacted>")
            .field("audit_seq", &self.audit_seq)
            .finish()
    }
}

/// An overdue concern's escalation notice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Escalation {
    /// The concern.
    pub concern_id: ConcernId,
    /// Which recipients missed which deadline. Names agencies only, never content.
    pub reason: String,
    /// The deadline missed (the earliest, when several recipients missed theirs).
    pub due_at: OffsetDateTime,
}

/// Recipients of one concern whose acknowledgement deadline has passed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Overdue {
    /// The concern.
    pub concern_id: ConcernId,
    /// Recipients past their deadline, not acknowledged and not escalated before.
    pub recipients: Vec<AgencyId>,
    /// The earliest of their deadlines.
    pub due_at: OffsetDateTime,
}

// === impl Overdue ===

impl Overdue {
    /// The escalation's reason text.
    pub fn reason(&self, urgency: Urgency) -> String {
        let names: Vec<&str> = self.recipients.iter().map(AgencyId::as_str).collect();
        format!(
            "not acknowledged by {} within the {} deadline ({})",
            names.join(", "),
            urgency,
            rfc3339(self.due_at)
        )
    }
}

/// The concerns with recipients whose acknowledgement deadline had passed at `now`
/// and that have not been escalated for them yet. A decided concern is never
/// overdue: the front door has dealt with it. Each recipient is escalated once.
pub fn overdue<'a>(
    now: OffsetDateTime,
    concerns: impl IntoIterator<Item = &'a Concern>,
) -> Vec<Overdue> {
    concerns
        .into_iter()
        .filter(|c| c.decision.is_none())
        .filter_map(|c| {
            let late: Vec<&Delivery> = c
                .recipients
                .iter()
                .filter(|d| d.acknowledged_at.is_none() && !d.escalated && d.due_at <= now)
                .collect();
            let due_at = late.iter().map(|d| d.due_at).min()?;
            Some(Overdue {
                concern_id: c.id.clone(),
                recipients: late.iter().map(|d| d.agency.clone()).collect(),
                due_at,
            })
        })
        .collect()
}

/// Who receives a concern: the requested agencies in the order given, duplicates
/// removed, then the front door if it is not already there and did not send it.
/// `sector_of` looks an agency up in the registry.
///
/// Refused (the message names the offending entry): an id that is not a registered
/// agency, the sender itself, too many entries, or no recipient at all (the front
/// door raising a concern must name someone).
pub fn route(
    sender: &AgencyId,
    requested: &[String],
    front_door: &AgencyId,
    sector_of: impl Fn(&str) -> Option<Sector>,
) -> Result<Vec<(AgencyId, Sector)>, String> {
    if requested.len() > MAX_REQUESTED_RECIPIENTS {
        return Err(format!(
            "recipient_agency_ids has {} entries; at most {MAX_REQUESTED_RECIPIENTS} are allowed",
            requested.len()
        ));
    }
    let mut out: Vec<(AgencyId, Sector)> = Vec::new();
    for (i, id) in requested.iter().enumerate() {
        let unknown = || {
            format!(
                "recipient_agency_ids[{i}] {:?} is not a registered agency",
                crate::domain::ids::shown(id)
            )
        };
        let agency = AgencyId::parse(id).map_err(|_| unknown())?;
        let sector = sector_of(agency.as_str()).ok_or_else(unknown)?;
        if &agency == sender {
            return Err(format!(
                "recipient_agency_ids[{i}] {:?} is the sender; a concern is not sent to its own sender",
                agency.as_str()
            ));
        }
        if !out.iter().any(|(a, _)| a == &agency) {
            out.push((agency, sector));
        }
    }
    if front_door != sender && !out.iter().any(|(a, _)| a == front_door) {
        let sector = sector_of(front_door.as_str())
            .ok_or_else(|| "the configured front door is not a registered agency".to_owned())?;
        out.push((front_door.clone(), sector));
    }
    if out.is_empty() {
        return Err(
            "recipient_agency_ids is empty; a concern raised by the front door must name at least one other agency"
                .into(),
        );
    }
    Ok(out)
}

/// Checks a free-text field's length in characters (Unicode scalar values).
pub fn check_text(field: &str, text: &str, min: usize, max: usize) -> Result<(), String> {
    crate::domain::check_text(field, text, min, max)
}

/// RFC 3339 with second precision, for messages.
pub fn rfc3339(t: OffsetDateTime) -> String {
    t.replace_nanosecond(0)
        .unwrap_or(t)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| t.unix_timestamp().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    fn agency(s: &str) -> AgencyId {
        AgencyId::parse(s).unwrap()
    }

    fn delivery(id: &str, due: OffsetDateTime) -> Delivery {
        Delivery {
            agency: agency(id),
            due_at: due,
            delivered_at: None,
            acknowledged_at: None,
            note: String::new(),
            escalated: false,
        }
    }

    fn concern(recipients: Vec<Delivery>) -> Concern {
        Concern {
            id: ConcernId::from_random([7; 16]),
            subject: NhsNumber::parse("9434765919").unwrap(),
            subject_ref: SubjectRef::from_hex("ab".repeat(32)),
            raised_by: agency("police-met"),
            category: ConcernCategory::DomesticAbuse,
            urgency: Urgency::ImmediateRisk,
            narrative: "n".into(),
            recipients,
            raised_at: datetime!(2026-11-23 10:00 UTC),
            decision: None,
            front_door: Some(agency("csc-southwark")),
        }
    }

    fn sectors(id: &str) -> Option<Sector> {
        match id {
            "police-met" => Some(Sector::Police),
            "school-oakfield" => Some(Sector::Education),
            "csc-southwark" => Some(Sector::ChildrensSocialCare),
            "nhs-guys" => Some(Sector::Health),
            _ => None,
        }
    }

    #[test]
    fn concern_ids_are_parsed_strictly() {
        let id = ConcernId::from_random([0xab; 16]);
        assert_eq!(ConcernId::parse(id.as_str()), Ok(id.clone()));
        assert_eq!(id.as_str().len(), 34);
        for bad in [
            "",
            "c-",
            "x-abababababababababababababababab",
            "c-ABABABABABABABABABABABABABABABAB",
            "c-abababababababababababababababa",
            "c-ababababababababababababababababab",
        ] {
            assert!(ConcernId::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn routing_adds_the_front_door_and_removes_duplicates() {
        let police = agency("police-met");
        let fd = agency("csc-southwark");
        let got = route(
            &police,
            &["school-oakfield".into(), "school-oakfield".into()],
            &fd,
            sectors,
        )
        .unwrap();
        let ids: Vec<&str> = got.iter().map(|(a, _)| a.as_str()).collect();
        assert_eq!(ids, ["school-oakfield", "csc-southwark"]);
        assert_eq!(got[0].1, Sector::Education);

        // Listing the front door is harmless; it is not added twice.
        let got = route(&police, &["csc-southwark".into()], &fd, sectors).unwrap();
        assert_eq!(got.len(), 1);
        // Nothing listed: the front door alone.
        let got = route(&police, &[], &fd, sectors).unwrap();
        assert_eq!(got, vec![(fd.clone(), Sector::ChildrensSocialCare)]);
    }

    #[test]
    fn routing_refuses_unknown_agencies_the_sender_and_an_empty_front_door_concern() {
        let police = agency("police-met");
        let fd = agency("csc-southwark");
        let err = route(&police, &["nobody".into()], &fd, sectors).unwrap_err();
        assert!(
            err.contains("recipient_agency_ids[0] \"nobody\" is not a registered agency"),
            "{err}"
        );
        let err = route(&police, &["Bad Id".into()], &fd, sectors).unwrap_err();
        assert!(err.contains("not a registered agency"), "{err}");
        let err = route(
            &police,
            &["nhs-guys".into(), "police-met".into()],
            &fd,
            sectors,
        )
        .unwrap_err();
        assert!(
            err.contains("recipient_agency_ids[1] \"police-met\" is the sender"),
            "{err}"
        );
        let err = route(&fd, &[], &fd, sectors).unwrap_err();
        assert!(err.contains("front door must name at least one"), "{err}");
        let got = route(&fd, &["nhs-guys".into()], &fd, sectors).unwrap();
        assert_eq!(got, vec![(agency("nhs-guys"), Sector::Health)]);
        let many = vec!["nhs-guys".to_owned(); MAX_REQUESTED_RECIPIENTS + 1];
        assert!(route(&police, &many, &fd, sectors).is_err());
    }

    #[test]
    fn text_lengths_count_characters() {
        assert!(check_text("narrative", "é".repeat(5).as_str(), 1, 5).is_ok());
        let err = check_text("narrative", &"é".repeat(6), 1, 5).unwrap_err();
        assert_eq!(err, "narrative has 6 characters, more than the limit of 5");
        assert_eq!(
            check_text("narrative", "", 1, 5).unwrap_err(),
            "narrative is required"
        );
        assert_eq!(
            check_text("narrative", "  \n", 1, 5).unwrap_err(),
            "narrative is blank (white space only)"
        );
        assert_eq!(
            check_text("justification", " abc ", 4, 50).unwrap_err(),
            "justification has 3 characters after trimming; at least 4 are required"
        );
        assert!(check_text("note", "", 0, 5).is_ok());
    }

    #[test]
    fn status_follows_deliveries_acknowledgements_escalation_and_decision() {
        let due = datetime!(2026-11-23 11:00 UTC);
        let at = datetime!(2026-11-23 10:01 UTC);
        let school = agency("school-oakfield");
        let fd = agency("csc-southwark");
        let mut c = concern(vec![
            delivery("school-oakfield", due),
            delivery("csc-southwark", due),
        ]);
        assert_eq!(c.status(), ConcernStatus::Raised);
        assert_eq!(
            c.status_once_delivered_to(&school, at),
            ConcernStatus::Raised
        );
        assert!(c.mark_delivered(&school, at));
        assert!(
            !c.mark_delivered(&school, due),
            "the first delivery is kept"
        );
        assert_eq!(c.delivery(&school).unwrap().delivered_at, Some(at));
        assert_eq!(
            c.status_once_delivered_to(&fd, at),
            ConcernStatus::Delivered
        );
        assert!(c.mark_delivered(&fd, at));
        assert_eq!(c.status(), ConcernStatus::Delivered);
        assert!(c.acknowledge(&school, at, "seen"));
        assert!(
            !c.acknowledge(&school, due, "again"),
            "acknowledging again changes nothing"
        );
        assert_eq!(c.delivery(&school).unwrap().note, "seen");
        assert_eq!(
            c.status(),
            ConcernStatus::Delivered,
            "one recipient still to acknowledge"
        );
        assert_eq!(
            c.mark_escalated(&[school.clone(), fd.clone()]),
            vec![fd.clone()]
        );
        assert_eq!(c.status(), ConcernStatus::Overdue);
        assert!(c.acknowledge(&fd, due, ""));
        assert_eq!(c.status(), ConcernStatus::Acknowledged);
        c.decision = Some(DecisionRecord {
            decision: Decision::EarlyHelp,
            lead_practitioner: "A. Worker".into(),
            note: String::new(),
            decided_at: due,
            decided_by: fd.clone(),
        });
        assert_eq!(c.status(), ConcernStatus::Decided);
        assert!(
            !c.acknowledge(&agency("police-met"), at, ""),
            "the sender is not a recipient"
        );
        assert!(c.is_party(&agency("police-met")));
        assert!(!c.is_party(&agency("nhs-guys")));
    }

    #[test]
    fn overdue_finds_each_late_recipient_once() {
        let early = datetime!(2026-11-23 08:30 UTC);
        let late = datetime!(2026-11-23 14:00 UTC);
        let school = agency("school-oakfield");
        let fd = agency("csc-southwark");
        let mut c = concern(vec![
            delivery("school-oakfield", early),
            delivery("csc-southwark", late),
        ]);

        assert!(overdue(datetime!(2026-11-23 08:29:59 UTC), [&c]).is_empty());
        // At the deadline itself it is overdue.
        let at_deadline = overdue(early, [&c]);
        assert_eq!(at_deadline.len(), 1);
        assert_eq!(at_deadline[0].recipients, vec![school.clone()]);
        assert_eq!(at_deadline[0].due_at, early);

        // Once escalated, the school is not escalated again; the front door's later
        // deadline is escalated on its own.
        c.mark_escalated(&at_deadline[0].recipients);
        assert!(overdue(datetime!(2026-11-23 13:00 UTC), [&c]).is_empty());
        let later = overdue(datetime!(2026-11-23 15:00 UTC), [&c]);
        assert_eq!(later[0].recipients, vec![fd.clone()]);
        assert_eq!(later[0].due_at, late);
        assert!(later[0]
            .reason(Urgency::ImmediateRisk)
            .contains("csc-southwark"));

        // Acknowledged recipients and decided concerns are never overdue.
        let mut acked = concern(vec![delivery("school-oakfield", early)]);
        acked.acknowledge(&school, early, "");
        assert!(overdue(late, [&acked]).is_empty());
        let mut decided = concern(vec![delivery("school-oakfield", early)]);
        decided.decision = Some(DecisionRecord {
            decision: Decision::NoFurtherAction,
            lead_practitioner: "x".into(),
            note: String::new(),
            decided_at: early,
            decided_by: fd,
        });
        assert!(overdue(late, [&decided]).is_empty());

        // Several concerns at once, each reported separately.
        let a = concern(vec![delivery("school-oakfield", early)]);
        let mut b = concern(vec![delivery("csc-southwark", early)]);
        b.id = ConcernId::from_random([9; 16]);
        let both = overdue(late, [&a, &b]);
        assert_eq!(both.len(), 2);
        assert_eq!(both[1].concern_id, b.id);
    }

    #[test]
    fn decisions_round_trip_by_name() {
        for d in Decision::ALL {
            assert_eq!(Decision::from_name(d.as_str()), Some(*d));
        }
        assert_eq!(Decision::from_name("MAYBE"), None);
    }
}
