//! Consent: what a child, parent or carer said about sharing, and which statement is in
//! force for one disclosure. Pure: no I/O, and time is always a parameter.
//!
//! ## What a statement covers
//! A [`ConsentStatement`] gives or refuses consent within a [`ConsentScope`]:
//! - **purposes**: never empty. Consent is always given (or refused) for stated
//!   purposes, never for "any purpose".
//! - **recipients**: a recipient is covered when its agency id is in
//!   `recipient_agency_ids` *or* its sector is in `recipient_sectors`. At least one of
//!   the two is not empty: consent is given to stated recipients, never to "anyone".
//! - **categories**: empty means every record category; otherwise only those listed.
//! - **period**: from when it is recorded until `valid_until` (exclusive), or open
//!   ended when there is none. An expired statement says nothing any more.
//!
//! ## Which statement is in force
//! [`consent_in_force`] looks at the statements whose scope covers the disclosure
//! (purpose, recipient agency and sector, category) and that have not expired at
//! `now`. **The newest matching statement wins**: the one recorded last decides.
//! - GIVEN: consent is in force.
//! - REFUSED: consent is explicitly refused.
//! - WITHDRAWN: the consent it gave no longer applies; there is no consent in force,
//!   and the reason says it was withdrawn. A withdrawal does not bring an older
//!   statement back: whoever withdrew has said "no more sharing" for that scope, and
//!   sharing again needs a new statement. Once its own period ends, though, a withdrawn
//!   statement is ignored like any other expired one.
//! - ties (the same `recorded_at`) go to the more restrictive statement (REFUSED, then
//!   WITHDRAWN, then GIVEN), then to the greater `consent_id`, so the answer never
//!   depends on the order the store returned them in.
//!
//! A new statement is stamped by [`recording_time`]: never earlier than a microsecond
//! after the newest statement about the child, so the one recorded last is the
//! newest even when the recording clock is behind (clock skew between replicas, a
//! clock stepped back).
//!
//! Statements count as they stand in the store. A withdrawal takes effect for the
//! very next request (invariant 5) even if `now`, read on another replica whose clock is
//! behind, is earlier than `withdrawn_at`; likewise a statement whose `recorded_at`
//! is later than `now` still counts. Only expiry is judged against `now`.

use std::collections::BTreeSet;

use time::OffsetDateTime;

use crate::domain::{named_enum, AgencyId, Purpose, RecordCategory, Sector};

/// Why a consent statement, or a change to one, was refused. Messages name the field
/// and what to do; they never echo the subject.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConsentError {
    /// `purposes` is empty.
    #[error(
        "purposes must name at least one purpose: consent is given or refused for \
         stated purposes, never for any purpose"
    )]
    NoPurposes,
    /// `recipient_sectors` and `recipient_agency_ids` are both empty.
    #[error(
        "recipient_sectors and recipient_agency_ids must not both be empty: consent is \
         given or refused to stated recipients, never to anyone"
    )]
    NoRecipients,
    /// `valid_until` is not later than the moment the statement is recorded.
    #[error(
        "valid_until ({}) must be later than the time of recording ({})",
        rfc3339(valid_until),
        rfc3339(recorded_at)
    )]
    ValidUntilNotAfterRecording {
        /// The requested end of validity.
        valid_until: OffsetDateTime,
        /// When the statement was being recorded.
        recorded_at: OffsetDateTime,
    },
    /// A new statement was given the state WITHDRAWN.
    #[error(
        "state must be GIVEN or REFUSED when recording consent; to withdraw consent, \
         call WithdrawConsent with its consent_id"
    )]
    RecordedAsWithdrawn,
    /// The statement was already withdrawn.
    #[error("consent {consent_id} is already withdrawn")]
    AlreadyWithdrawn {
        /// The statement.
        consent_id: String,
    },
    /// The statement records a refusal, which is not something that can be withdrawn.
    #[error(
        "consent {consent_id} records a refusal, which cannot be withdrawn; to give \
         consent, record a new statement with state GIVEN (the newest statement in \
         scope wins)"
    )]
    RefusalCannotBeWithdrawn {
        /// The statement.
        consent_id: String,
    },
}

named_enum!(
    /// What a statement says.
    ConsentState {
        /// Consent is given.
        Given => "GIVEN",
        /// Consent is refused.
        Refused => "REFUSED",
        /// Consent was given and has since been withdrawn (see
        /// [`ConsentStatement::withdrawn_at`]).
        Withdrawn => "WITHDRAWN",
    }
);

named_enum!(
    /// Who gave, refused or withdrew consent.
    ConsentGiver {
        /// The child.
        Child => "CHILD",
        /// A parent.
        Parent => "PARENT",
        /// A carer.
        Carer => "CARER",
    }
);

/// The purposes, recipients, categories and period a statement covers. One that
/// exists is valid: build it with [`ConsentScope::parse`]. The meaning of each set is
/// in the module documentation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsentScope {
    purposes: BTreeSet<Purpose>,
    recipient_sectors: BTreeSet<Sector>,
    recipient_agency_ids: BTreeSet<AgencyId>,
    categories: BTreeSet<RecordCategory>,
    valid_until: Option<OffsetDateTime>,
}

/// One disclosure, as consent sees it: for what, to whom, of what.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConsentQuery<'a> {
    /// Why the recipient asks.
    pub purpose: Purpose,
    /// The agency that would receive the record.
    pub recipient_agency: &'a AgencyId,
    /// That agency's sector.
    pub recipient_sector: Sector,
    /// The record's category.
    pub category: RecordCategory,
}

/// A statement of consent about one child, as stored.
///
/// Build new ones with [`ConsentStatement::record`] and change them only with
/// [`ConsentStatement::withdraw`], which keep `state` and `withdrawn_at` in step. The
/// fields are public so that the store can rebuild a statement it wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsentStatement {
    /// Its id, unique across the gateway.
    pub consent_id: String,
    /// The child it is about: an opaque key chosen by the store (e.g. the keyed hash of
    /// the NHS number). [`consent_in_force`] expects statements about one child only.
    pub subject: String,
    /// What it says now. WITHDRAWN counts as withdrawn even without a `withdrawn_at`.
    pub state: ConsentState,
    /// Who said it.
    pub given_by: ConsentGiver,
    /// What it covers.
    pub scope: ConsentScope,
    /// The agency that recorded it.
    pub recorded_by: AgencyId,
    /// When it was recorded; the newest matching statement wins.
    pub recorded_at: OffsetDateTime,
    /// When it was withdrawn, if it was.
    pub withdrawn_at: Option<OffsetDateTime>,
}

/// Which consent, if any, applies to one disclosure at one moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConsentFinding {
    /// The newest matching statement gives consent.
    InForce {
        /// That statement.
        consent_id: String,
    },
    /// The newest matching statement refuses consent.
    Refused {
        /// That statement.
        consent_id: String,
    },
    /// The newest matching statement was withdrawn: no consent is in force.
    Withdrawn {
        /// That statement.
        consent_id: String,
    },
    /// No statement that has not expired covers the disclosure.
    None,
}

/// When a new statement about a child is recorded: `now`, or one microsecond after
/// the newest statement already recorded about the child if `now` is not later (the
/// recording clock is behind another replica's, or was stepped back). So the
/// statement recorded last is always the newest, and [`consent_in_force`] follows
/// the order of recording whatever the clocks say. `existing` must be every
/// statement about the child, read while no other can be recorded.
pub fn recording_time<'a>(
    now: OffsetDateTime,
    existing: impl IntoIterator<Item = &'a ConsentStatement>,
) -> OffsetDateTime {
    existing
        .into_iter()
        .filter_map(|s| s.recorded_at.checked_add(time::Duration::MICROSECOND))
        .fold(now, OffsetDateTime::max)
}

/// Finds the consent in force for `query` at `now`: among `statements` (all about the
/// same child) that cover the query and have not expired, the newest decides. The
/// rules, including ties and withdrawals, are in the module documentation.
pub fn consent_in_force(
    statements: &[ConsentStatement],
    query: &ConsentQuery<'_>,
    now: OffsetDateTime,
) -> ConsentFinding {
    let newest = statements
        .iter()
        .filter(|s| !s.is_expired(now) && s.scope.covers(query))
        .max_by(|a, b| a.precedence().cmp(&b.precedence()));
    match newest {
        None => ConsentFinding::None,
        Some(s) => {
            let consent_id = s.consent_id.clone();
            match s.state {
                ConsentState::Given => ConsentFinding::InForce { consent_id },
                ConsentState::Refused => ConsentFinding::Refused { consent_id },
                ConsentState::Withdrawn => ConsentFinding::Withdrawn { consent_id },
            }
        }
    }
}

// === impl ConsentScope ===

impl ConsentScope {
    /// Checks a scope: `purposes` must not be empty, and `recipient_sectors` and
    /// `recipient_agency_ids` must not both be empty. Empty `categories` means every
    /// category; `valid_until` `None` means open ended (it is checked against the time
    /// of recording by [`ConsentStatement::record`]).
    pub fn parse(
        purposes: BTreeSet<Purpose>,
        recipient_sectors: BTreeSet<Sector>,
        recipient_agency_ids: BTreeSet<AgencyId>,
        categories: BTreeSet<RecordCategory>,
        valid_until: Option<OffsetDateTime>,
    ) -> Result<Self, ConsentError> {
        if purposes.is_empty() {
            return Err(ConsentError::NoPurposes);
        }
        if recipient_sectors.is_empty() && recipient_agency_ids.is_empty() {
            return Err(ConsentError::NoRecipients);
        }
        Ok(ConsentScope {
            purposes,
            recipient_sectors,
            recipient_agency_ids,
            categories,
            valid_until,
        })
    }

    /// Whether this scope covers the query's purpose, recipient and category (its
    /// period is not considered: see [`ConsentStatement::is_expired`]).
    pub fn covers(&self, query: &ConsentQuery<'_>) -> bool {
        let recipient = self.recipient_agency_ids.contains(query.recipient_agency)
            || self.recipient_sectors.contains(&query.recipient_sector);
        let category = self.categories.is_empty() || self.categories.contains(&query.category);
        self.purposes.contains(&query.purpose) && recipient && category
    }

    /// The purposes covered; never empty.
    pub fn purposes(&self) -> &BTreeSet<Purpose> {
        &self.purposes
    }

    /// Recipient sectors covered (any agency of these sectors).
    pub fn recipient_sectors(&self) -> &BTreeSet<Sector> {
        &self.recipient_sectors
    }

    /// Recipient agencies covered, whatever their sector.
    pub fn recipient_agency_ids(&self) -> &BTreeSet<AgencyId> {
        &self.recipient_agency_ids
    }

    /// Record categories covered; empty means every category.
    pub fn categories(&self) -> &BTreeSet<RecordCategory> {
        &self.categories
    }

    /// The end of validity (exclusive), if any.
    pub fn valid_until(&self) -> Option<OffsetDateTime> {
        self.valid_until
    }
}

// === impl ConsentStatement ===

impl ConsentStatement {
    /// A new statement, recorded by `recorded_by` at `recorded_at`. `state` must be
    /// GIVEN or REFUSED, and the scope's `valid_until`, if any, later than
    /// `recorded_at`.
    pub fn record(
        consent_id: String,
        subject: String,
        state: ConsentState,
        given_by: ConsentGiver,
        scope: ConsentScope,
        recorded_by: AgencyId,
        recorded_at: OffsetDateTime,
    ) -> Result<Self, ConsentError> {
        if state == ConsentState::Withdrawn {
            return Err(ConsentError::RecordedAsWithdrawn);
        }
        if let Some(valid_until) = scope.valid_until {
            if valid_until <= recorded_at {
                return Err(ConsentError::ValidUntilNotAfterRecording {
                    valid_until,
                    recorded_at,
                });
            }
        }
        Ok(ConsentStatement {
            consent_id,
            subject,
            state,
            given_by,
            scope,
            recorded_by,
            recorded_at,
            withdrawn_at: None,
        })
    }

    /// Withdraws given consent at `at`; it stops applying from that moment. `at` is
    /// raised to `recorded_at` if a clock behind the recorder's puts it earlier, so a
    /// withdrawal is never refused for the time it carries. Refusals and statements
    /// already withdrawn cannot be withdrawn.
    pub fn withdraw(&mut self, at: OffsetDateTime) -> Result<(), ConsentError> {
        match self.state {
            ConsentState::Given => {
                self.state = ConsentState::Withdrawn;
                self.withdrawn_at = Some(at.max(self.recorded_at));
                Ok(())
            }
            ConsentState::Refused => Err(ConsentError::RefusalCannotBeWithdrawn {
                consent_id: self.consent_id.clone(),
            }),
            ConsentState::Withdrawn => Err(ConsentError::AlreadyWithdrawn {
                consent_id: self.consent_id.clone(),
            }),
        }
    }

    /// Whether the statement's period is over at `now` (`valid_until` is exclusive).
    pub fn is_expired(&self, now: OffsetDateTime) -> bool {
        self.scope.valid_until.is_some_and(|until| now >= until)
    }

    /// The order in which matching statements win: newest first, then the more
    /// restrictive, then the greater id.
    fn precedence(&self) -> (OffsetDateTime, u8, &str) {
        let restrictive = match self.state {
            ConsentState::Given => 0,
            ConsentState::Withdrawn => 1,
            ConsentState::Refused => 2,
        };
        (self.recorded_at, restrictive, self.consent_id.as_str())
    }
}

/// A timestamp as RFC 3339 for messages, falling back to `Debug` for the (unreachable
/// for UTC times) values RFC 3339 cannot express.
fn rfc3339(t: &OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| format!("{t:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;
    use time::Duration;

    const T0: OffsetDateTime = datetime!(2026-03-02 09:00 UTC);

    fn at(minutes: i64) -> OffsetDateTime {
        T0 + Duration::minutes(minutes)
    }

    fn agency(id: &str) -> AgencyId {
        AgencyId::parse(id).expect("test agency id")
    }

    fn scope(
        purposes: &[Purpose],
        sectors: &[Sector],
        agencies: &[&str],
        categories: &[RecordCategory],
        valid_until: Option<OffsetDateTime>,
    ) -> Result<ConsentScope, ConsentError> {
        ConsentScope::parse(
            purposes.iter().copied().collect(),
            sectors.iter().copied().collect(),
            agencies.iter().map(|a| agency(a)).collect(),
            categories.iter().copied().collect(),
            valid_until,
        )
    }

    fn given(id: &str, minutes: i64, s: ConsentScope) -> ConsentStatement {
        ConsentStatement::record(
            id.into(),
            "subject-1".into(),
            ConsentState::Given,
            ConsentGiver::Parent,
            s,
            agency("gp-camberwell"),
            at(minutes),
        )
        .expect("valid statement")
    }

    fn education_support() -> ConsentScope {
        scope(
            &[Purpose::EducationSupport],
            &[Sector::Education],
            &[],
            &[],
            None,
        )
        .expect("valid scope")
    }

    #[test]
    fn scope_without_purposes_is_refused() {
        let err = scope(&[], &[Sector::Education], &[], &[], None).expect_err("no purposes");
        assert_eq!(err, ConsentError::NoPurposes);
        assert!(err
            .to_string()
            .starts_with("purposes must name at least one purpose"));
    }

    #[test]
    fn scope_without_recipients_is_refused() {
        let err = scope(&[Purpose::EarlyHelp], &[], &[], &[], None).expect_err("no recipients");
        assert_eq!(err, ConsentError::NoRecipients);
        assert!(err
            .to_string()
            .starts_with("recipient_sectors and recipient_agency_ids must not both be empty"));
        assert!(scope(&[Purpose::EarlyHelp], &[], &["school-a"], &[], None).is_ok());
        assert!(scope(&[Purpose::EarlyHelp], &[Sector::Health], &[], &[], None).is_ok());
    }

    #[test]
    fn recipient_matches_by_agency_or_by_sector() {
        let s = scope(
            &[Purpose::EarlyHelp],
            &[Sector::Health],
            &["school-a"],
            &[],
            None,
        )
        .expect("valid scope");
        let school_a = agency("school-a");
        let school_b = agency("school-b");
        let q = |a, sector| ConsentQuery {
            purpose: Purpose::EarlyHelp,
            recipient_agency: a,
            recipient_sector: sector,
            category: RecordCategory::SchoolAttendance,
        };
        assert!(s.covers(&q(&school_a, Sector::Education)));
        assert!(!s.covers(&q(&school_b, Sector::Education)));
        assert!(s.covers(&q(&school_b, Sector::Health)));
    }

    #[test]
    fn empty_categories_cover_every_category_and_listed_ones_only_those() {
        let all = education_support();
        let some = scope(
            &[Purpose::EducationSupport],
            &[Sector::Education],
            &[],
            &[RecordCategory::SchoolAttendance],
            None,
        )
        .expect("valid scope");
        let school = agency("school-a");
        for &category in RecordCategory::ALL {
            let q = ConsentQuery {
                purpose: Purpose::EducationSupport,
                recipient_agency: &school,
                recipient_sector: Sector::Education,
                category,
            };
            assert!(all.covers(&q), "{category}");
            assert_eq!(
                some.covers(&q),
                category == RecordCategory::SchoolAttendance,
                "{category}"
            );
        }
    }

    #[test]
    fn valid_until_must_follow_recording() {
        let s = scope(
            &[Purpose::EarlyHelp],
            &[Sector::Health],
            &[],
            &[],
            Some(at(0)),
        )
        .expect("valid scope");
        let err = ConsentStatement::record(
            "c1".into(),
            "subject-1".into(),
            ConsentState::Given,
            ConsentGiver::Child,
            s,
            agency("gp-camberwell"),
            at(0),
        )
        .expect_err("valid_until not after recording");
        assert_eq!(
            err.to_string(),
            "valid_until (2026-03-02T09:00:00Z) must be later than the time of recording \
             (2026-03-02T09:00:00Z)"
        );
    }

    #[test]
    fn a_new_statement_cannot_be_withdrawn_already() {
        let err = ConsentStatement::record(
            "c1".into(),
            "subject-1".into(),
            ConsentState::Withdrawn,
            ConsentGiver::Carer,
            education_support(),
            agency("gp-camberwell"),
            at(0),
        )
        .expect_err("withdrawn on record");
        assert_eq!(err, ConsentError::RecordedAsWithdrawn);
    }

    #[test]
    fn withdrawal_sets_state_and_time_once() {
        let mut c = given("c1", 0, education_support());
        c.withdraw(at(5)).expect("withdraws");
        assert_eq!(c.state, ConsentState::Withdrawn);
        assert_eq!(c.withdrawn_at, Some(at(5)));
        assert_eq!(
            c.withdraw(at(6)),
            Err(ConsentError::AlreadyWithdrawn {
                consent_id: "c1".into()
            })
        );
        assert_eq!(c.withdrawn_at, Some(at(5)));
    }

    #[test]
    fn withdrawal_time_is_never_before_recording() {
        let mut c = given("c1", 10, education_support());
        c.withdraw(at(3)).expect("withdraws");
        assert_eq!(c.withdrawn_at, Some(at(10)));
    }

    #[test]
    fn refusal_cannot_be_withdrawn() {
        let mut c = given("c1", 0, education_support());
        c.state = ConsentState::Refused;
        let err = c.withdraw(at(1)).expect_err("refusal");
        assert!(
            err.to_string()
                .starts_with("consent c1 records a refusal, which cannot be withdrawn"),
            "{err}"
        );
    }

    #[test]
    fn withdrawal_counts_even_when_now_reads_earlier() {
        let mut c = given("c1", 0, education_support());
        c.withdraw(at(10)).expect("withdraws");
        let school = agency("school-a");
        let q = ConsentQuery {
            purpose: Purpose::EducationSupport,
            recipient_agency: &school,
            recipient_sector: Sector::Education,
            category: RecordCategory::SchoolAttendance,
        };
        assert_eq!(
            consent_in_force(&[c], &q, at(9)),
            ConsentFinding::Withdrawn {
                consent_id: "c1".into()
            }
        );
    }

    #[test]
    fn same_time_ties_go_to_the_refusal_whatever_the_order() {
        let a = given("c-a", 0, education_support());
        let mut b = given("c-b", 0, education_support());
        b.state = ConsentState::Refused;
        let school = agency("school-a");
        let q = ConsentQuery {
            purpose: Purpose::EducationSupport,
            recipient_agency: &school,
            recipient_sector: Sector::Education,
            category: RecordCategory::SchoolAttendance,
        };
        let want = ConsentFinding::Refused {
            consent_id: "c-b".into(),
        };
        assert_eq!(consent_in_force(&[a.clone(), b.clone()], &q, at(1)), want);
        assert_eq!(consent_in_force(&[b, a], &q, at(1)), want);
    }

    #[test]
    fn a_statement_is_recorded_after_every_earlier_one_whatever_the_clock() {
        let older = [
            given("c-a", 10, education_support()),
            given("c-b", 5, education_support()),
        ];
        assert_eq!(recording_time(at(20), &older), at(20));
        assert_eq!(
            recording_time(at(0), &older),
            at(10) + Duration::microseconds(1)
        );
        assert_eq!(
            recording_time(at(10), &older),
            at(10) + Duration::microseconds(1)
        );
        assert_eq!(recording_time(at(0), &[]), at(0));
    }

    #[test]
    fn names_round_trip() {
        for &s in ConsentState::ALL {
            assert_eq!(s.as_str().parse::<ConsentState>(), Ok(s));
        }
        for &g in ConsentGiver::ALL {
            assert_eq!(g.as_str().parse::<ConsentGiver>(), Ok(g));
        }
        let err = "MAYBE".parse::<ConsentState>().expect_err("unknown");
        assert_eq!(
            err.to_string(),
            "unknown ConsentState \"MAYBE\"; expected one of GIVEN, REFUSED, WITHDRAWN"
        );
    }
}
