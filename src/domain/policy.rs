//! The disclosure decision: may this agency see this record, for this purpose, now, and
//! on what basis? One pure function, [`decide`] (no I/O, no clock reads: `now` is a
//! parameter); [`access_for`] is the same decision without an override, for
//! FindRecords.
//!
//! ## The rules, in order
//! 1. **Retention.** At or after the record's `retain_until` it is not disclosed to
//!    anyone, its owner included: [`DenyReason::Expired`], which the API reports as
//!    NOT_FOUND because a record past retention is one the gateway no longer holds
//!    (it awaits purging).
//! 2. **Owner.** The agency that shared the record may always read it:
//!    [`Basis::Owner`], lawful basis `"owner"`.
//! 3. **Agreement.** A sharing agreement must cover the owner's sector → the
//!    recipient's sector, the record's category and the purpose; otherwise
//!    [`DenyReason::NoAgreement`] (PERMISSION_DENIED). The config refuses overlapping
//!    agreements, so at most one matches; if several are passed anyway, the one that
//!    does not need consent is preferred, then one that allows an override, then the
//!    first given.
//! 4. **No consent needed.** Most safeguarding agreements rest on a public task, not
//!    on consent ("you do not need consent" where a child is at risk):
//!    [`Basis::AgreementNoConsentNeeded`] with the agreement's lawful basis.
//! 5. **Consent.** If the agreement rests on consent, the consent in force at `now`
//!    is looked up (see [`super::consent`]: the newest matching statement wins). Given
//!    consent allows: [`Basis::Consent`] with its `consent_id` and the agreement's
//!    lawful basis.
//! 6. **Safeguarding override.** Without consent in force (none, refused or
//!    withdrawn), an override may share anyway when the agreement allows one
//!    ([`DenyReason::OverrideNotAllowed`], PERMISSION_DENIED, otherwise), its
//!    justification has at least [`MIN_JUSTIFICATION_CHARS`] characters after trimming
//!    ([`DenyReason::JustificationTooShort`], INVALID_ARGUMENT) and its lawful basis is
//!    not blank ([`DenyReason::LawfulBasisMissing`], INVALID_ARGUMENT):
//!    [`Basis::SafeguardingOverride`] with the override's lawful basis. Such a
//!    disclosure is flagged, and the owner is told.
//! 7. **Otherwise** [`DenyReason::ConsentNeeded`], [`DenyReason::ConsentRefused`] or
//!    [`DenyReason::ConsentWithdrawn`] (FAILED_PRECONDITION), each saying whether an
//!    override is possible.
//!
//! An override that is not needed (owner, no consent needed, or consent in force) is
//! not relied on. The decision says so ([`Allowed::override_ignored`]), and the audit
//! entry records no justification that was not relied on. Its form is checked all
//! the same, before any decision, by [`check_override`]: the records flow refuses a
//! malformed override (INVALID_ARGUMENT) whether or not it would be needed, so that
//! a case system learns that its overrides are malformed at once, not on the night
//! consent has lapsed and it needs one.
//!
//! ## Messages
//! A refusal's message says exactly what is missing and how to proceed, and reveals
//! nothing of another agency's data: no consent notes, no narrative, no subject. When
//! no agreement applies, the message names only the caller's own sector and purpose,
//! not the record's category or owner, since such a caller may not learn anything about
//! the record.

use std::fmt;

use time::OffsetDateTime;

use super::consent::{consent_in_force, ConsentFinding, ConsentQuery, ConsentStatement};
use crate::config::Agreement;
use crate::domain::{named_enum, AgencyId, Purpose, RecordCategory, Sector};

/// The fewest characters (Unicode scalar values, after trimming white space) an
/// override's justification may have.
pub const MIN_JUSTIFICATION_CHARS: usize = 40;

/// The lawful basis recorded when an owner reads its own record.
pub const OWNER_LAWFUL_BASIS: &str = "owner";

/// A request to share without consent because a child is at risk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OverrideRequest {
    /// The lawful basis relied on instead of consent; must not be blank.
    pub lawful_basis: String,
    /// Why sharing without consent is necessary; at least [`MIN_JUSTIFICATION_CHARS`]
    /// characters after trimming.
    pub justification: String,
}

/// One attempt to read one record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DisclosureRequest {
    /// The agency that shared the record.
    pub owner_agency: AgencyId,
    /// Its sector.
    pub owner_sector: Sector,
    /// The agency asking.
    pub recipient_agency: AgencyId,
    /// Its sector.
    pub recipient_sector: Sector,
    /// The record's category.
    pub category: RecordCategory,
    /// Why the recipient asks.
    pub purpose: Purpose,
    /// A safeguarding override, if the caller set one (ignored by [`access_for`]).
    pub r#override: Option<OverrideRequest>,
    /// The end of the record's retention (exclusive).
    pub retain_until: OffsetDateTime,
}

named_enum!(
    /// Why a disclosure is allowed (API.md `DisclosureBasis`).
    Basis {
        /// The recipient owns the record.
        Owner => "OWNER",
        /// The agreement rests on consent, and consent is in force.
        Consent => "CONSENT",
        /// The agreement does not need consent.
        AgreementNoConsentNeeded => "AGREEMENT_NO_CONSENT_NEEDED",
        /// A justified safeguarding override, without consent: flagged, and the owner
        /// is told.
        SafeguardingOverride => "SAFEGUARDING_OVERRIDE",
    }
);

/// What the decision allowed, and everything the audit entry needs to say why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allowed {
    /// Why.
    pub basis: Basis,
    /// The lawful basis to record: `"owner"`, the agreement's, or the override's
    /// (trimmed).
    pub lawful_basis: String,
    /// For [`Basis::Consent`] only: the statement that gave consent.
    pub consent_id: Option<String>,
    /// For [`Basis::SafeguardingOverride`] only: the refused or withdrawn statement the
    /// override set aside, if there was one.
    pub overridden_consent_id: Option<String>,
    /// The lawful basis of the agreement relied on; `None` for the owner.
    pub agreement_lawful_basis: Option<String>,
    /// For [`Basis::SafeguardingOverride`] only: the justification, trimmed.
    pub justification: Option<String>,
    /// An override was given but not needed, so it was neither checked nor relied on.
    pub override_ignored: bool,
}

/// Why a disclosure is refused. The gRPC code is chosen in `api::status`; the code
/// each variant is meant to get is given here.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum DenyReason {
    /// The record is past its retention date (NOT_FOUND: the gateway no longer holds
    /// it for disclosure).
    Expired,
    /// No sharing agreement covers the owner's sector → the recipient's sector, the
    /// category and the purpose (PERMISSION_DENIED).
    NoAgreement,
    /// The agreement needs consent and no statement in scope is in force
    /// (FAILED_PRECONDITION).
    ConsentNeeded {
        /// Whether the agreement allows a safeguarding override.
        override_possible: bool,
    },
    /// The agreement needs consent and the newest statement in scope refuses it
    /// (FAILED_PRECONDITION).
    ConsentRefused {
        /// That statement.
        consent_id: String,
        /// Whether the agreement allows a safeguarding override.
        override_possible: bool,
    },
    /// The agreement needs consent and the newest statement in scope was withdrawn
    /// (FAILED_PRECONDITION).
    ConsentWithdrawn {
        /// That statement.
        consent_id: String,
        /// Whether the agreement allows a safeguarding override.
        override_possible: bool,
    },
    /// An override was given, consent is not in force, and the agreement does not
    /// allow an override (PERMISSION_DENIED).
    OverrideNotAllowed,
    /// The override's justification is shorter than [`MIN_JUSTIFICATION_CHARS`] after
    /// trimming (INVALID_ARGUMENT).
    JustificationTooShort {
        /// Its length in characters after trimming.
        chars: usize,
    },
    /// The override's lawful basis is blank (INVALID_ARGUMENT).
    LawfulBasisMissing,
}

/// A refusal: why, for code, and what to do, for people.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Denied {
    /// Why, as a value to match on.
    pub reason: DenyReason,
    /// What is missing and how to proceed; safe to return to the caller.
    pub message: String,
}

/// The outcome of [`decide`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// The record may be disclosed.
    Allow(Allowed),
    /// It may not.
    Deny(Denied),
}

named_enum!(
    /// What a caller could do with a record FindRecords lists (API.md `RecordAccess`).
    RecordAccess {
        /// The caller owns it.
        Owner => "OWNER",
        /// Readable now, by agreement or consent in force.
        Readable => "READABLE",
        /// No consent in force, and no override allowed.
        NeedsConsent => "NEEDS_CONSENT",
        /// No consent in force, but a safeguarding override is allowed.
        OverrideOnly => "OVERRIDE_ONLY",
    }
);

/// Decides whether `request` may see the record now, and on what basis. Pure: no I/O,
/// no clock reads. `agreements` are the sharing agreements from the owner's sector to
/// the recipient's (e.g. `Registry::agreements_for`; others are ignored), `consents`
/// every statement about the record's subject. The rules are in the module
/// documentation.
pub fn decide<'a>(
    agreements: impl IntoIterator<Item = &'a Agreement>,
    consents: &[ConsentStatement],
    request: &DisclosureRequest,
    now: OffsetDateTime,
) -> Decision {
    decide_with(
        agreements,
        consents,
        request,
        request.r#override.as_ref(),
        now,
    )
}

/// What FindRecords tells `request`'s recipient about the record: [`decide`] without an
/// override (`request.r#override` is ignored). `None` when the record must not be
/// revealed: no agreement lets the recipient's sector receive that category for that
/// purpose, or the record is past retention.
pub fn access_for<'a>(
    agreements: impl IntoIterator<Item = &'a Agreement>,
    consents: &[ConsentStatement],
    request: &DisclosureRequest,
    now: OffsetDateTime,
) -> Option<RecordAccess> {
    match decide_with(agreements, consents, request, None, now) {
        Decision::Allow(allowed) => Some(match allowed.basis {
            Basis::Owner => RecordAccess::Owner,
            Basis::Consent | Basis::AgreementNoConsentNeeded | Basis::SafeguardingOverride => {
                RecordAccess::Readable
            }
        }),
        Decision::Deny(denied) => match denied.reason {
            DenyReason::ConsentNeeded { override_possible }
            | DenyReason::ConsentRefused {
                override_possible, ..
            }
            | DenyReason::ConsentWithdrawn {
                override_possible, ..
            } => Some(if override_possible {
                RecordAccess::OverrideOnly
            } else {
                RecordAccess::NeedsConsent
            }),
            DenyReason::Expired | DenyReason::NoAgreement => None,
            // Only an override leads here, and there is none: fail closed.
            DenyReason::OverrideNotAllowed
            | DenyReason::JustificationTooShort { .. }
            | DenyReason::LawfulBasisMissing => None,
        },
    }
}

/// [`decide`], with the override passed apart so that [`access_for`] can leave it out.
fn decide_with<'a>(
    agreements: impl IntoIterator<Item = &'a Agreement>,
    consents: &[ConsentStatement],
    req: &DisclosureRequest,
    override_request: Option<&OverrideRequest>,
    now: OffsetDateTime,
) -> Decision {
    if now >= req.retain_until {
        return deny(
            DenyReason::Expired,
            "the record is past its retention date and is no longer disclosed".into(),
        );
    }
    let override_given = override_request.is_some();
    if req.owner_agency == req.recipient_agency {
        return Decision::Allow(Allowed {
            basis: Basis::Owner,
            lawful_basis: OWNER_LAWFUL_BASIS.into(),
            consent_id: None,
            overridden_consent_id: None,
            agreement_lawful_basis: None,
            justification: None,
            override_ignored: override_given,
        });
    }
    let Some(agreement) = governing_agreement(agreements, req) else {
        return deny(
            DenyReason::NoAgreement,
            format!(
                "no sharing agreement lets an agency of sector {} receive this record for \
                 purpose {}",
                req.recipient_sector, req.purpose
            ),
        );
    };
    if !agreement.consent_required {
        return Decision::Allow(Allowed {
            basis: Basis::AgreementNoConsentNeeded,
            lawful_basis: agreement.lawful_basis.clone(),
            consent_id: None,
            overridden_consent_id: None,
            agreement_lawful_basis: Some(agreement.lawful_basis.clone()),
            justification: None,
            override_ignored: override_given,
        });
    }

    let query = ConsentQuery {
        purpose: req.purpose,
        recipient_agency: &req.recipient_agency,
        recipient_sector: req.recipient_sector,
        category: req.category,
    };
    let finding = consent_in_force(consents, &query, now);
    let overridden_consent_id = match finding {
        ConsentFinding::InForce { consent_id } => {
            return Decision::Allow(Allowed {
                basis: Basis::Consent,
                lawful_basis: agreement.lawful_basis.clone(),
                consent_id: Some(consent_id),
                overridden_consent_id: None,
                agreement_lawful_basis: Some(agreement.lawful_basis.clone()),
                justification: None,
                override_ignored: override_given,
            });
        }
        ConsentFinding::Refused { ref consent_id }
        | ConsentFinding::Withdrawn { ref consent_id } => Some(consent_id.clone()),
        ConsentFinding::None => None,
    };
    let missing = MissingConsent {
        finding: &finding,
        purpose: req.purpose,
        category: req.category,
    };

    let Some(o) = override_request else {
        let override_possible = agreement.override_allowed;
        let message = format!("{missing}; {}", override_hint(override_possible));
        let reason = match finding {
            ConsentFinding::Refused { consent_id } => DenyReason::ConsentRefused {
                consent_id,
                override_possible,
            },
            ConsentFinding::Withdrawn { consent_id } => DenyReason::ConsentWithdrawn {
                consent_id,
                override_possible,
            },
            ConsentFinding::None | ConsentFinding::InForce { .. } => {
                DenyReason::ConsentNeeded { override_possible }
            }
        };
        return deny(reason, message);
    };

    if !agreement.override_allowed {
        return deny(
            DenyReason::OverrideNotAllowed,
            format!(
                "the sharing agreement from {} to {} for category {} and purpose {} does \
                 not allow a safeguarding override; the record can be disclosed only with \
                 consent in force ({missing})",
                agreement.from, agreement.to, req.category, req.purpose
            ),
        );
    }
    if let Err(denied) = check_override(o) {
        return Decision::Deny(denied);
    }
    Decision::Allow(Allowed {
        basis: Basis::SafeguardingOverride,
        lawful_basis: o.lawful_basis.trim().into(),
        consent_id: None,
        overridden_consent_id,
        agreement_lawful_basis: Some(agreement.lawful_basis.clone()),
        justification: Some(o.justification.trim().into()),
        override_ignored: false,
    })
}

/// Checks an override's form, whether or not it will be needed: a justification of
/// at least [`MIN_JUSTIFICATION_CHARS`] characters after trimming
/// ([`DenyReason::JustificationTooShort`]) and a lawful basis that is not blank
/// ([`DenyReason::LawfulBasisMissing`]), both INVALID_ARGUMENT.
pub fn check_override(o: &OverrideRequest) -> Result<(), Denied> {
    let lawful_basis = o.lawful_basis.trim();
    let chars = o.justification.trim().chars().count();
    if chars < MIN_JUSTIFICATION_CHARS {
        let also = if lawful_basis.is_empty() {
            "; override lawful_basis is empty too"
        } else {
            ""
        };
        return Err(Denied {
            reason: DenyReason::JustificationTooShort { chars },
            message: format!(
                "override justification must be at least {MIN_JUSTIFICATION_CHARS} \
                 characters after trimming, and has {chars}: record why sharing without \
                 consent is necessary to protect the child{also}"
            ),
        });
    }
    if lawful_basis.is_empty() {
        return Err(Denied {
            reason: DenyReason::LawfulBasisMissing,
            message: "override lawful_basis must not be empty: name the lawful basis for \
                      sharing without consent, e.g. \"UK GDPR Art 6(1)(e); DPA 2018 Sch 1 \
                      para 18\""
                .into(),
        });
    }
    Ok(())
}

/// The agreement that governs the request, if any: see rule 3 of the module
/// documentation for the preference among several.
fn governing_agreement<'a>(
    agreements: impl IntoIterator<Item = &'a Agreement>,
    req: &DisclosureRequest,
) -> Option<&'a Agreement> {
    agreements
        .into_iter()
        .filter(|a| {
            a.from == req.owner_sector
                && a.to == req.recipient_sector
                && a.categories.contains(&req.category)
                && a.purposes.contains(&req.purpose)
        })
        // `min_by_key` keeps the first of equals, so file order breaks ties.
        .min_by_key(|a| (a.consent_required, !a.override_allowed))
}

fn deny(reason: DenyReason, message: String) -> Decision {
    Decision::Deny(Denied { reason, message })
}

fn override_hint(override_possible: bool) -> String {
    if override_possible {
        format!(
            "the agreement allows a safeguarding override (set override with a lawful \
             basis and a justification of at least {MIN_JUSTIFICATION_CHARS} characters)"
        )
    } else {
        "the agreement does not allow a safeguarding override, so consent covering this \
         purpose, category and recipient must be recorded first"
            .into()
    }
}

/// Says why no consent is in force, naming only what the caller asked about.
struct MissingConsent<'a> {
    finding: &'a ConsentFinding,
    purpose: Purpose,
    category: RecordCategory,
}

impl fmt::Display for MissingConsent<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (p, c) = (self.purpose, self.category);
        match self.finding {
            ConsentFinding::None | ConsentFinding::InForce { .. } => {
                write!(f, "no consent in force for purpose {p} and category {c}")
            }
            ConsentFinding::Refused { consent_id } => write!(
                f,
                "consent {consent_id}, the newest statement covering purpose {p} and \
                 category {c}, refuses consent"
            ),
            ConsentFinding::Withdrawn { consent_id } => write!(
                f,
                "consent {consent_id}, the newest statement covering purpose {p} and \
                 category {c}, was withdrawn, so no consent is in force"
            ),
        }
    }
}

// === impl Decision, Basis, DenyReason, RecordAccess ===

impl Decision {
    /// The allowance, if allowed.
    pub fn allowed(&self) -> Option<&Allowed> {
        match self {
            Decision::Allow(a) => Some(a),
            Decision::Deny(_) => None,
        }
    }

    /// The refusal, if denied.
    pub fn denied(&self) -> Option<&Denied> {
        match self {
            Decision::Allow(_) => None,
            Decision::Deny(d) => Some(d),
        }
    }
}

impl DenyReason {
    /// A stable upper-snake-case name for the audit entry's `reason` and for logs.
    pub fn as_str(&self) -> &'static str {
        match self {
            DenyReason::Expired => "EXPIRED",
            DenyReason::NoAgreement => "NO_AGREEMENT",
            DenyReason::ConsentNeeded { .. } => "CONSENT_NEEDED",
            DenyReason::ConsentRefused { .. } => "CONSENT_REFUSED",
            DenyReason::ConsentWithdrawn { .. } => "CONSENT_WITHDRAWN",
            DenyReason::OverrideNotAllowed => "OVERRIDE_NOT_ALLOWED",
            DenyReason::JustificationTooShort { .. } => "JUSTIFICATION_TOO_SHORT",
            DenyReason::LawfulBasisMissing => "LAWFUL_BASIS_MISSING",
        }
    }
}

impl fmt::Display for DenyReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::super::consent::{ConsentGiver, ConsentScope, ConsentState};
    use super::*;
    use std::collections::BTreeSet;
    use time::macros::datetime;
    use time::Duration;

    const T0: OffsetDateTime = datetime!(2026-03-02 09:00 UTC);
    const PUBLIC_TASK: &str = "UK GDPR Art 6(1)(e) public task; DPA 2018 Sch 1 para 18";
    const CONSENT_BASIS: &str = "UK GDPR Art 6(1)(a) consent";
    const OVERRIDE_BASIS: &str = "UK GDPR Art 6(1)(d) vital interests";
    /// Exactly 40 characters.
    const JUSTIFICATION_40: &str = "New bruising seen; child afraid of home.";
    /// Minutes after T0: "now" in every case.
    const NOW: i64 = 60;

    fn at(minutes: i64) -> OffsetDateTime {
        T0 + Duration::minutes(minutes)
    }

    fn agency(id: &str) -> AgencyId {
        AgencyId::parse(id).expect("test agency id")
    }

    fn agreement(
        from: Sector,
        to: Sector,
        categories: &[RecordCategory],
        purposes: &[Purpose],
        consent_required: bool,
        override_allowed: bool,
    ) -> Agreement {
        Agreement {
            from,
            to,
            categories: categories.iter().copied().collect(),
            purposes: purposes.iter().copied().collect(),
            lawful_basis: if consent_required {
                CONSENT_BASIS
            } else {
                PUBLIC_TASK
            }
            .into(),
            consent_required,
            override_allowed,
        }
    }

    /// Health → Education, unscheduled care attendance, for education support and
    /// safeguarding, resting on consent.
    fn health_to_school(override_allowed: bool) -> Agreement {
        agreement(
            Sector::Health,
            Sector::Education,
            &[RecordCategory::UnscheduledCareAttendance],
            &[Purpose::EducationSupport, Purpose::Safeguarding],
            true,
            override_allowed,
        )
    }

    /// Police → Education, police incidents, for safeguarding, without consent.
    fn police_to_school() -> Agreement {
        agreement(
            Sector::Police,
            Sector::Education,
            &[RecordCategory::PoliceIncident],
            &[Purpose::Safeguarding],
            false,
            false,
        )
    }

    /// A hospital's A&E attendance record, asked for by school-a for education support.
    fn request() -> DisclosureRequest {
        DisclosureRequest {
            owner_agency: agency("nhs-kings"),
            owner_sector: Sector::Health,
            recipient_agency: agency("school-a"),
            recipient_sector: Sector::Education,
            category: RecordCategory::UnscheduledCareAttendance,
            purpose: Purpose::EducationSupport,
            r#override: None,
            retain_until: at(NOW + 24 * 60),
        }
    }

    /// A police incident record, asked for by school-a for safeguarding.
    fn police_request() -> DisclosureRequest {
        DisclosureRequest {
            owner_agency: agency("police-met"),
            owner_sector: Sector::Police,
            category: RecordCategory::PoliceIncident,
            purpose: Purpose::Safeguarding,
            ..request()
        }
    }

    fn with_override(lawful_basis: &str, justification: &str) -> DisclosureRequest {
        DisclosureRequest {
            r#override: Some(OverrideRequest {
                lawful_basis: lawful_basis.into(),
                justification: justification.into(),
            }),
            ..request()
        }
    }

    fn scope(
        purposes: &[Purpose],
        sectors: &[Sector],
        agencies: &[&str],
        categories: &[RecordCategory],
        valid_until: Option<i64>,
    ) -> ConsentScope {
        ConsentScope::parse(
            purposes.iter().copied().collect(),
            sectors.iter().copied().collect(),
            agencies.iter().map(|a| agency(a)).collect(),
            categories.iter().copied().collect(),
            valid_until.map(at),
        )
        .expect("valid test scope")
    }

    /// Education support, to any school, every category, open ended.
    fn schools() -> ConsentScope {
        scope(
            &[Purpose::EducationSupport],
            &[Sector::Education],
            &[],
            &[],
            None,
        )
    }

    /// A statement recorded `recorded` minutes after T0; a withdrawn one was withdrawn
    /// a minute later.
    fn stmt(id: &str, state: ConsentState, recorded: i64, scope: ConsentScope) -> ConsentStatement {
        ConsentStatement {
            consent_id: id.into(),
            subject: "subject-1".into(),
            state,
            given_by: ConsentGiver::Parent,
            scope,
            recorded_by: agency("gp-camberwell"),
            recorded_at: at(recorded),
            withdrawn_at: (state == ConsentState::Withdrawn).then(|| at(recorded + 1)),
        }
    }

    use ConsentState::{Given, Refused, Withdrawn};

    #[derive(Debug)]
    enum Want {
        Allow {
            basis: Basis,
            lawful_basis: &'static str,
            consent_id: Option<&'static str>,
        },
        Deny(DenyReason),
    }

    fn allow(basis: Basis, lawful_basis: &'static str, consent_id: Option<&'static str>) -> Want {
        Want::Allow {
            basis,
            lawful_basis,
            consent_id,
        }
    }

    fn needs_consent(override_possible: bool) -> Want {
        Want::Deny(DenyReason::ConsentNeeded { override_possible })
    }

    struct Case {
        name: &'static str,
        agreements: Vec<Agreement>,
        consents: Vec<ConsentStatement>,
        req: DisclosureRequest,
        want: Want,
    }

    fn case(
        name: &'static str,
        agreements: Vec<Agreement>,
        consents: Vec<ConsentStatement>,
        req: DisclosureRequest,
        want: Want,
    ) -> Case {
        Case {
            name,
            agreements,
            consents,
            req,
            want,
        }
    }

    /// Every row of the policy.
    fn table() -> Vec<Case> {
        let given = |id, at, s| stmt(id, Given, at, s);
        let owner_reads = DisclosureRequest {
            recipient_agency: agency("nhs-kings"),
            recipient_sector: Sector::Health,
            ..request()
        };
        vec![
            // Owner and retention.
            case(
                "owner reads its own record without any agreement",
                vec![],
                vec![],
                owner_reads.clone(),
                allow(Basis::Owner, "owner", None),
            ),
            case(
                "owner cannot read its record past retention",
                vec![],
                vec![],
                DisclosureRequest {
                    retain_until: at(NOW),
                    ..owner_reads
                },
                Want::Deny(DenyReason::Expired),
            ),
            case(
                "retention ending exactly now denies even with consent",
                vec![health_to_school(true)],
                vec![given("c1", 0, schools())],
                DisclosureRequest {
                    retain_until: at(NOW),
                    ..request()
                },
                Want::Deny(DenyReason::Expired),
            ),
            case(
                "retention ending a minute from now still allows",
                vec![health_to_school(true)],
                vec![given("c1", 0, schools())],
                DisclosureRequest {
                    retain_until: at(NOW + 1),
                    ..request()
                },
                allow(Basis::Consent, CONSENT_BASIS, Some("c1")),
            ),
            case(
                "past retention denies before any agreement is looked at",
                vec![],
                vec![],
                DisclosureRequest {
                    retain_until: at(0),
                    ..request()
                },
                Want::Deny(DenyReason::Expired),
            ),
            // Agreements.
            case(
                "no agreement at all",
                vec![],
                vec![given("c1", 0, schools())],
                request(),
                Want::Deny(DenyReason::NoAgreement),
            ),
            case(
                "agreement for another purpose",
                vec![health_to_school(true)],
                vec![],
                DisclosureRequest {
                    purpose: Purpose::CrimePrevention,
                    ..request()
                },
                Want::Deny(DenyReason::NoAgreement),
            ),
            case(
                "agreement for another category",
                vec![health_to_school(true)],
                vec![],
                DisclosureRequest {
                    category: RecordCategory::ChildProtectionPlan,
                    ..request()
                },
                Want::Deny(DenyReason::NoAgreement),
            ),
            case(
                "agreement for another recipient sector",
                vec![health_to_school(true)],
                vec![],
                DisclosureRequest {
                    recipient_agency: agency("police-met"),
                    recipient_sector: Sector::Police,
                    ..request()
                },
                Want::Deny(DenyReason::NoAgreement),
            ),
            case(
                "agreement in the other direction",
                vec![agreement(
                    Sector::Education,
                    Sector::Health,
                    &[RecordCategory::UnscheduledCareAttendance],
                    &[Purpose::EducationSupport],
                    false,
                    false,
                )],
                vec![],
                request(),
                Want::Deny(DenyReason::NoAgreement),
            ),
            case(
                "agreement without consent allows",
                vec![police_to_school()],
                vec![],
                police_request(),
                allow(Basis::AgreementNoConsentNeeded, PUBLIC_TASK, None),
            ),
            case(
                "agreement without consent allows even against a refusal",
                vec![police_to_school()],
                vec![stmt(
                    "c1",
                    Refused,
                    0,
                    scope(
                        &[Purpose::Safeguarding],
                        &[Sector::Education],
                        &[],
                        &[],
                        None,
                    ),
                )],
                police_request(),
                allow(Basis::AgreementNoConsentNeeded, PUBLIC_TASK, None),
            ),
            case(
                "agreement without consent ignores an invalid override",
                vec![police_to_school()],
                vec![],
                DisclosureRequest {
                    r#override: Some(OverrideRequest {
                        lawful_basis: String::new(),
                        justification: "short".into(),
                    }),
                    ..police_request()
                },
                allow(Basis::AgreementNoConsentNeeded, PUBLIC_TASK, None),
            ),
            case(
                "of two matching agreements the one without consent governs",
                vec![
                    health_to_school(true),
                    agreement(
                        Sector::Health,
                        Sector::Education,
                        &[RecordCategory::UnscheduledCareAttendance],
                        &[Purpose::EducationSupport],
                        false,
                        false,
                    ),
                ],
                vec![],
                request(),
                allow(Basis::AgreementNoConsentNeeded, PUBLIC_TASK, None),
            ),
            case(
                "of two consent agreements the one allowing an override governs",
                vec![health_to_school(false), health_to_school(true)],
                vec![],
                request(),
                needs_consent(true),
            ),
            case(
                "agreements between other sectors are ignored",
                vec![police_to_school()],
                vec![],
                DisclosureRequest {
                    owner_sector: Sector::Health,
                    ..police_request()
                },
                Want::Deny(DenyReason::NoAgreement),
            ),
            // Consent in and out of scope.
            case(
                "consent in scope by sector",
                vec![health_to_school(false)],
                vec![given("c1", 0, schools())],
                request(),
                allow(Basis::Consent, CONSENT_BASIS, Some("c1")),
            ),
            case(
                "consent in scope by agency",
                vec![health_to_school(false)],
                vec![given(
                    "c1",
                    0,
                    scope(&[Purpose::EducationSupport], &[], &["school-a"], &[], None),
                )],
                request(),
                allow(Basis::Consent, CONSENT_BASIS, Some("c1")),
            ),
            case(
                "consent in scope by category",
                vec![health_to_school(false)],
                vec![given(
                    "c1",
                    0,
                    scope(
                        &[Purpose::EducationSupport],
                        &[Sector::Education],
                        &[],
                        &[RecordCategory::UnscheduledCareAttendance],
                        None,
                    ),
                )],
                request(),
                allow(Basis::Consent, CONSENT_BASIS, Some("c1")),
            ),
            case(
                "consent out of scope by purpose",
                vec![health_to_school(false)],
                vec![given(
                    "c1",
                    0,
                    scope(&[Purpose::EarlyHelp], &[Sector::Education], &[], &[], None),
                )],
                request(),
                needs_consent(false),
            ),
            case(
                "consent out of scope by sector",
                vec![health_to_school(false)],
                vec![given(
                    "c1",
                    0,
                    scope(
                        &[Purpose::EducationSupport],
                        &[Sector::Health],
                        &[],
                        &[],
                        None,
                    ),
                )],
                request(),
                needs_consent(false),
            ),
            case(
                "consent out of scope by agency",
                vec![health_to_school(false)],
                vec![given(
                    "c1",
                    0,
                    scope(&[Purpose::EducationSupport], &[], &["school-b"], &[], None),
                )],
                request(),
                needs_consent(false),
            ),
            case(
                "consent out of scope by category",
                vec![health_to_school(false)],
                vec![given(
                    "c1",
                    0,
                    scope(
                        &[Purpose::EducationSupport],
                        &[Sector::Education],
                        &[],
                        &[RecordCategory::SchoolAttendance],
                        None,
                    ),
                )],
                request(),
                needs_consent(false),
            ),
            case(
                "consent expired exactly now",
                vec![health_to_school(true)],
                vec![given(
                    "c1",
                    0,
                    scope(
                        &[Purpose::EducationSupport],
                        &[Sector::Education],
                        &[],
                        &[],
                        Some(NOW),
                    ),
                )],
                request(),
                needs_consent(true),
            ),
            case(
                "consent valid until a minute from now",
                vec![health_to_school(true)],
                vec![given(
                    "c1",
                    0,
                    scope(
                        &[Purpose::EducationSupport],
                        &[Sector::Education],
                        &[],
                        &[],
                        Some(NOW + 1),
                    ),
                )],
                request(),
                allow(Basis::Consent, CONSENT_BASIS, Some("c1")),
            ),
            case(
                "consent refused",
                vec![health_to_school(false)],
                vec![stmt("c1", Refused, 0, schools())],
                request(),
                Want::Deny(DenyReason::ConsentRefused {
                    consent_id: "c1".into(),
                    override_possible: false,
                }),
            ),
            case(
                "consent withdrawn",
                vec![health_to_school(true)],
                vec![stmt("c1", Withdrawn, 0, schools())],
                request(),
                Want::Deny(DenyReason::ConsentWithdrawn {
                    consent_id: "c1".into(),
                    override_possible: true,
                }),
            ),
            // The newest matching statement wins.
            case(
                "given then refused: refused",
                vec![health_to_school(false)],
                vec![
                    given("c1", 0, schools()),
                    stmt("c2", Refused, 10, schools()),
                ],
                request(),
                Want::Deny(DenyReason::ConsentRefused {
                    consent_id: "c2".into(),
                    override_possible: false,
                }),
            ),
            case(
                "refused then given: in force",
                vec![health_to_school(false)],
                vec![
                    given("c2", 10, schools()),
                    stmt("c1", Refused, 0, schools()),
                ],
                request(),
                allow(Basis::Consent, CONSENT_BASIS, Some("c2")),
            ),
            case(
                "given then a newer given withdrawn: withdrawn",
                vec![health_to_school(false)],
                vec![
                    given("c1", 0, schools()),
                    stmt("c2", Withdrawn, 10, schools()),
                ],
                request(),
                Want::Deny(DenyReason::ConsentWithdrawn {
                    consent_id: "c2".into(),
                    override_possible: false,
                }),
            ),
            case(
                "an older withdrawn statement does not undo newer consent",
                vec![health_to_school(false)],
                vec![
                    stmt("c1", Withdrawn, 0, schools()),
                    given("c2", 10, schools()),
                ],
                request(),
                allow(Basis::Consent, CONSENT_BASIS, Some("c2")),
            ),
            case(
                "a newer refusal out of scope leaves older consent in force",
                vec![health_to_school(false)],
                vec![
                    given("c1", 0, schools()),
                    stmt(
                        "c2",
                        Refused,
                        10,
                        scope(&[Purpose::EducationSupport], &[], &["school-b"], &[], None),
                    ),
                ],
                request(),
                allow(Basis::Consent, CONSENT_BASIS, Some("c1")),
            ),
            case(
                "a newer refusal that has expired leaves older consent in force",
                vec![health_to_school(false)],
                vec![
                    given("c1", 0, schools()),
                    stmt(
                        "c2",
                        Refused,
                        10,
                        scope(
                            &[Purpose::EducationSupport],
                            &[Sector::Education],
                            &[],
                            &[],
                            Some(20),
                        ),
                    ),
                ],
                request(),
                allow(Basis::Consent, CONSENT_BASIS, Some("c1")),
            ),
            case(
                "a refusal recorded at the same moment as consent wins",
                vec![health_to_school(false)],
                vec![
                    given("c9", 10, schools()),
                    stmt("c1", Refused, 10, schools()),
                ],
                request(),
                Want::Deny(DenyReason::ConsentRefused {
                    consent_id: "c1".into(),
                    override_possible: false,
                }),
            ),
            // Overrides.
            case(
                "override allowed, no consent",
                vec![health_to_school(true)],
                vec![],
                with_override(OVERRIDE_BASIS, JUSTIFICATION_40),
                allow(Basis::SafeguardingOverride, OVERRIDE_BASIS, None),
            ),
            case(
                "override allowed, against a refusal",
                vec![health_to_school(true)],
                vec![stmt("c1", Refused, 0, schools())],
                with_override(OVERRIDE_BASIS, JUSTIFICATION_40),
                allow(Basis::SafeguardingOverride, OVERRIDE_BASIS, None),
            ),
            case(
                "override allowed, after a withdrawal",
                vec![health_to_school(true)],
                vec![stmt("c1", Withdrawn, 0, schools())],
                with_override(OVERRIDE_BASIS, JUSTIFICATION_40),
                allow(Basis::SafeguardingOverride, OVERRIDE_BASIS, None),
            ),
            case(
                "override not needed when consent is in force",
                vec![health_to_school(true)],
                vec![given("c1", 0, schools())],
                with_override(OVERRIDE_BASIS, JUSTIFICATION_40),
                allow(Basis::Consent, CONSENT_BASIS, Some("c1")),
            ),
            case(
                "override not allowed",
                vec![health_to_school(false)],
                vec![],
                with_override(OVERRIDE_BASIS, JUSTIFICATION_40),
                Want::Deny(DenyReason::OverrideNotAllowed),
            ),
            case(
                "override not allowed is reported before a short justification",
                vec![health_to_school(false)],
                vec![stmt("c1", Refused, 0, schools())],
                with_override("", "short"),
                Want::Deny(DenyReason::OverrideNotAllowed),
            ),
            case(
                "justification of 39 characters",
                vec![health_to_school(true)],
                vec![],
                with_override(OVERRIDE_BASIS, &JUSTIFICATION_40[..39]),
                Want::Deny(DenyReason::JustificationTooShort { chars: 39 }),
            ),
            case(
                "justification of 39 characters padded with spaces to 45",
                vec![health_to_school(true)],
                vec![],
                with_override(
                    OVERRIDE_BASIS,
                    &format!("  {}\t\n ", &JUSTIFICATION_40[..39]),
                ),
                Want::Deny(DenyReason::JustificationTooShort { chars: 39 }),
            ),
            case(
                "justification of white space only",
                vec![health_to_school(true)],
                vec![],
                with_override(OVERRIDE_BASIS, &" \t\n".repeat(20)),
                Want::Deny(DenyReason::JustificationTooShort { chars: 0 }),
            ),
            case(
                "justification counts characters, not bytes (20 × é is 40 bytes)",
                vec![health_to_school(true)],
                vec![],
                with_override(OVERRIDE_BASIS, &"é".repeat(20)),
                Want::Deny(DenyReason::JustificationTooShort { chars: 20 }),
            ),
            case(
                "justification of 40 non-ASCII characters",
                vec![health_to_school(true)],
                vec![],
                with_override(OVERRIDE_BASIS, &"é".repeat(40)),
                allow(Basis::SafeguardingOverride, OVERRIDE_BASIS, None),
            ),
            case(
                "override lawful basis empty",
                vec![health_to_school(true)],
                vec![],
                with_override("", JUSTIFICATION_40),
                Want::Deny(DenyReason::LawfulBasisMissing),
            ),
            case(
                "override lawful basis blank",
                vec![health_to_school(true)],
                vec![],
                with_override(" \t ", JUSTIFICATION_40),
                Want::Deny(DenyReason::LawfulBasisMissing),
            ),
            case(
                "override lawful basis is trimmed",
                vec![health_to_school(true)],
                vec![],
                with_override(&format!("  {OVERRIDE_BASIS} "), JUSTIFICATION_40),
                allow(Basis::SafeguardingOverride, OVERRIDE_BASIS, None),
            ),
            case(
                "override past retention",
                vec![health_to_school(true)],
                vec![],
                DisclosureRequest {
                    retain_until: at(NOW - 1),
                    ..with_override(OVERRIDE_BASIS, JUSTIFICATION_40)
                },
                Want::Deny(DenyReason::Expired),
            ),
            case(
                "override cannot stand in for a missing agreement",
                vec![],
                vec![],
                with_override(OVERRIDE_BASIS, JUSTIFICATION_40),
                Want::Deny(DenyReason::NoAgreement),
            ),
        ]
    }

    #[test]
    fn decision_table() {
        assert_eq!(JUSTIFICATION_40.chars().count(), MIN_JUSTIFICATION_CHARS);
        let mut failures = Vec::new();
        for c in table() {
            let got = decide(&c.agreements, &c.consents, &c.req, at(NOW));
            let ok = match (&c.want, &got) {
                (
                    Want::Allow {
                        basis,
                        lawful_basis,
                        consent_id,
                    },
                    Decision::Allow(a),
                ) => {
                    a.basis == *basis
                        && a.lawful_basis == *lawful_basis
                        && a.consent_id.as_deref() == *consent_id
                }
                (Want::Deny(reason), Decision::Deny(d)) => d.reason == *reason,
                _ => false,
            };
            if !ok {
                failures.push(format!("{}: want {:?}, got {got:?}", c.name, c.want));
            }
        }
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }

    #[test]
    fn missing_consent_message_says_what_is_missing_and_how_to_proceed() {
        let d = decide(&[health_to_school(true)], &[], &request(), at(NOW));
        assert_eq!(
            d.denied().expect("denied").message,
            "no consent in force for purpose EDUCATION_SUPPORT and category \
             UNSCHEDULED_CARE_ATTENDANCE; the agreement allows a safeguarding override \
             (set override with a lawful basis and a justification of at least 40 \
             characters)"
        );
        let d = decide(&[health_to_school(false)], &[], &request(), at(NOW));
        assert_eq!(
            d.denied().expect("denied").message,
            "no consent in force for purpose EDUCATION_SUPPORT and category \
             UNSCHEDULED_CARE_ATTENDANCE; the agreement does not allow a safeguarding \
             override, so consent covering this purpose, category and recipient must be \
             recorded first"
        );
    }

    #[test]
    fn refused_and_withdrawn_messages_name_the_statement() {
        let refused = [stmt("c-7", Refused, 0, schools())];
        let d = decide(&[health_to_school(true)], &refused, &request(), at(NOW));
        let msg = &d.denied().expect("denied").message;
        assert!(
            msg.starts_with(
                "consent c-7, the newest statement covering purpose EDUCATION_SUPPORT and \
                 category UNSCHEDULED_CARE_ATTENDANCE, refuses consent; the agreement \
                 allows a safeguarding override"
            ),
            "{msg}"
        );
        let withdrawn = [stmt("c-8", Withdrawn, 0, schools())];
        let d = decide(&[health_to_school(false)], &withdrawn, &request(), at(NOW));
        let msg = &d.denied().expect("denied").message;
        assert!(
            msg.starts_with("consent c-8, the newest statement covering purpose")
                && msg.contains(
                    "was withdrawn, so no consent is in force; the agreement does not allow"
                ),
            "{msg}"
        );
    }

    #[test]
    fn no_agreement_message_names_only_the_callers_sector_and_purpose() {
        let d = decide(&[], &[], &request(), at(NOW));
        let msg = &d.denied().expect("denied").message;
        assert_eq!(
            msg,
            "no sharing agreement lets an agency of sector EDUCATION receive this record \
             for purpose EDUCATION_SUPPORT"
        );
        assert!(
            !msg.contains("UNSCHEDULED_CARE")
                && !msg.contains("HEALTH")
                && !msg.contains("nhs-kings")
        );
    }

    #[test]
    fn override_refusal_messages_are_precise() {
        let msg = |agreement: Agreement, req: DisclosureRequest| {
            decide(&[agreement], &[], &req, at(NOW))
                .denied()
                .expect("denied")
                .message
                .clone()
        };
        assert_eq!(
            msg(
                health_to_school(false),
                with_override(OVERRIDE_BASIS, JUSTIFICATION_40)
            ),
            "the sharing agreement from HEALTH to EDUCATION for category \
             UNSCHEDULED_CARE_ATTENDANCE and purpose EDUCATION_SUPPORT does not allow a \
             safeguarding override; the record can be disclosed only with consent in force \
             (no consent in force for purpose EDUCATION_SUPPORT and category \
             UNSCHEDULED_CARE_ATTENDANCE)"
        );
        assert_eq!(
            msg(
                health_to_school(true),
                with_override(OVERRIDE_BASIS, "too short")
            ),
            "override justification must be at least 40 characters after trimming, and has \
             9: record why sharing without consent is necessary to protect the child"
        );
        assert!(msg(health_to_school(true), with_override(" ", "too short"))
            .ends_with("; override lawful_basis is empty too"));
        assert!(
            msg(health_to_school(true), with_override("", JUSTIFICATION_40))
                .starts_with("override lawful_basis must not be empty")
        );
    }

    #[test]
    fn override_decision_records_justification_agreement_and_set_aside_consent() {
        let refused = [stmt("c1", Refused, 0, schools())];
        let req = with_override(OVERRIDE_BASIS, &format!("  {JUSTIFICATION_40}  "));
        let d = decide(&[health_to_school(true)], &refused, &req, at(NOW));
        assert_eq!(
            d,
            Decision::Allow(Allowed {
                basis: Basis::SafeguardingOverride,
                lawful_basis: OVERRIDE_BASIS.into(),
                consent_id: None,
                overridden_consent_id: Some("c1".into()),
                agreement_lawful_basis: Some(CONSENT_BASIS.into()),
                justification: Some(JUSTIFICATION_40.into()),
                override_ignored: false,
            })
        );
    }

    #[test]
    fn an_override_that_is_not_needed_is_flagged_as_ignored() {
        let req = DisclosureRequest {
            r#override: Some(OverrideRequest {
                lawful_basis: OVERRIDE_BASIS.into(),
                justification: JUSTIFICATION_40.into(),
            }),
            ..police_request()
        };
        let d = decide(&[police_to_school()], &[], &req, at(NOW));
        let a = d.allowed().expect("allowed");
        assert!(a.override_ignored);
        assert_eq!(a.justification, None);
        let d = decide(&[police_to_school()], &[], &police_request(), at(NOW));
        assert!(!d.allowed().expect("allowed").override_ignored);
    }

    #[test]
    fn withdrawal_takes_effect_for_the_very_next_request() {
        let mut consents = vec![stmt("c1", Given, 0, schools())];
        let agreements = [health_to_school(false)];
        let before = decide(&agreements, &consents, &request(), at(NOW));
        assert_eq!(before.allowed().map(|a| a.basis), Some(Basis::Consent));
        consents[0].withdraw(at(NOW)).expect("withdraws");
        let after = decide(&agreements, &consents, &request(), at(NOW));
        assert_eq!(
            after.denied().map(|d| &d.reason),
            Some(&DenyReason::ConsentWithdrawn {
                consent_id: "c1".into(),
                override_possible: false
            })
        );
    }

    #[test]
    fn access_for_find_records() {
        let consent = [stmt("c1", Given, 0, schools())];
        let refused = [stmt("c1", Refused, 0, schools())];
        let owner = DisclosureRequest {
            recipient_agency: agency("nhs-kings"),
            recipient_sector: Sector::Health,
            ..request()
        };
        let expired = DisclosureRequest {
            retain_until: at(NOW),
            ..request()
        };
        type Row<'a> = (
            &'a str,
            Vec<Agreement>,
            &'a [ConsentStatement],
            DisclosureRequest,
            Option<RecordAccess>,
        );
        let rows: Vec<Row<'_>> = vec![
            ("owner", vec![], &[], owner, Some(RecordAccess::Owner)),
            (
                "agreement without consent",
                vec![police_to_school()],
                &[],
                police_request(),
                Some(RecordAccess::Readable),
            ),
            (
                "consent in force",
                vec![health_to_school(false)],
                &consent,
                request(),
                Some(RecordAccess::Readable),
            ),
            (
                "no consent, no override",
                vec![health_to_school(false)],
                &[],
                request(),
                Some(RecordAccess::NeedsConsent),
            ),
            (
                "refused, no override",
                vec![health_to_school(false)],
                &refused,
                request(),
                Some(RecordAccess::NeedsConsent),
            ),
            (
                "no consent, override allowed",
                vec![health_to_school(true)],
                &[],
                request(),
                Some(RecordAccess::OverrideOnly),
            ),
            (
                "refused, override allowed",
                vec![health_to_school(true)],
                &refused,
                request(),
                Some(RecordAccess::OverrideOnly),
            ),
            (
                "no agreement: not revealed",
                vec![],
                &consent,
                request(),
                None,
            ),
            (
                "past retention: not revealed",
                vec![health_to_school(true)],
                &consent,
                expired,
                None,
            ),
            (
                "an override in the request is ignored",
                vec![health_to_school(true)],
                &[],
                with_override(OVERRIDE_BASIS, JUSTIFICATION_40),
                Some(RecordAccess::OverrideOnly),
            ),
        ];
        for (name, agreements, consents, req, want) in rows {
            assert_eq!(
                access_for(&agreements, consents, &req, at(NOW)),
                want,
                "{name}"
            );
        }
    }

    #[test]
    fn decide_accepts_the_registry_iterator_shape() {
        let all = [police_to_school(), health_to_school(true)];
        let from_health = all
            .iter()
            .filter(|a| a.from == Sector::Health && a.to == Sector::Education);
        let d = decide(from_health, &[], &request(), at(NOW));
        assert_eq!(
            d.denied().map(|d| &d.reason),
            Some(&DenyReason::ConsentNeeded {
                override_possible: true
            })
        );
    }

    mod properties {
        use super::*;
        use proptest::collection::{btree_set, vec};
        use proptest::prelude::*;
        use proptest::sample::select;

        // Small pools, so that agreements, consents and requests often meet (Sector
        // and the other enums have more values, but the policy treats them alike).
        const SECTORS: &[Sector] = &[Sector::Health, Sector::Education];
        const PURPOSES: &[Purpose] = &[Purpose::Safeguarding, Purpose::EducationSupport];
        const CATEGORIES: &[RecordCategory] = &[
            RecordCategory::UnscheduledCareAttendance,
            RecordCategory::SchoolAttendance,
        ];
        const AGENCIES: &[&str] = &["nhs-kings", "school-a", "school-b"];
        /// Owners are drawn from here and recipients from [`AGENCIES`], so that about
        /// one request in six is the owner's.
        const OWNERS: &[&str] = &["nhs-kings", "police-met"];
        /// Neither may ever appear in a refusal's message.
        const SUBJECT: &str = "subject-secret";
        const RECORDER: &str = "csc-recorder";

        /// An agreement, between the sectors `usual` three times in four.
        fn arb_agreement(usual: (Sector, Sector)) -> impl Strategy<Value = Agreement> {
            (
                prop_oneof![3 => Just(usual), 1 => (select(SECTORS), select(SECTORS))],
                btree_set(select(CATEGORIES), 1..=2),
                btree_set(select(PURPOSES), 1..=2),
                // Most rest on consent, where the policy has the most to decide.
                proptest::bool::weighted(0.7),
                any::<bool>(),
                0..3u8,
            )
                .prop_map(
                    |((from, to), categories, purposes, consent_required, override_allowed, n)| {
                        Agreement {
                            from,
                            to,
                            categories,
                            purposes,
                            lawful_basis: format!("agreement basis {n}"),
                            consent_required,
                            override_allowed,
                        }
                    },
                )
        }

        fn arb_statement() -> impl Strategy<Value = ConsentStatement> {
            (
                select(ConsentState::ALL),
                btree_set(select(PURPOSES), 0..=2),
                btree_set(select(SECTORS), 0..=2),
                btree_set(select(AGENCIES), 0..=2),
                btree_set(select(CATEGORIES), 0..=2),
                proptest::option::of(0..40i64),
                0..40i64,
                proptest::option::of(0..40i64),
            )
                .prop_filter_map(
                    "scope must be valid",
                    |(
                        state,
                        purposes,
                        sectors,
                        agencies,
                        categories,
                        until,
                        recorded,
                        withdrawn,
                    )| {
                        let scope = ConsentScope::parse(
                            purposes,
                            sectors,
                            agencies.into_iter().map(agency).collect::<BTreeSet<_>>(),
                            categories,
                            until.map(at),
                        )
                        .ok()?;
                        Some(ConsentStatement {
                            consent_id: String::new(),
                            subject: SUBJECT.into(),
                            state,
                            given_by: ConsentGiver::Child,
                            scope,
                            recorded_by: agency(RECORDER),
                            recorded_at: at(recorded),
                            // Sometimes incoherent on purpose: the policy must cope.
                            withdrawn_at: withdrawn.map(at),
                        })
                    },
                )
        }

        fn arb_statements() -> impl Strategy<Value = Vec<ConsentStatement>> {
            vec(arb_statement(), 0..6).prop_map(|mut v| {
                for (i, s) in v.iter_mut().enumerate() {
                    s.consent_id = format!("c{i}");
                }
                v
            })
        }

        fn arb_override() -> impl Strategy<Value = OverrideRequest> {
            (
                select(&["", "  ", "UK GDPR Art 6(1)(e)", "UK GDPR Art 6(1)(d)"][..]),
                select(&[0, 12, 39, 40, 41, 58][..]),
                any::<bool>(),
            )
                .prop_map(|(basis, len, pad)| {
                    let j = "j".repeat(len);
                    OverrideRequest {
                        lawful_basis: basis.into(),
                        justification: if pad { format!("  {j}\n") } else { j },
                    }
                })
        }

        fn arb_request() -> impl Strategy<Value = (DisclosureRequest, i64)> {
            (
                select(OWNERS),
                select(SECTORS),
                select(AGENCIES),
                select(SECTORS),
                select(CATEGORIES),
                select(PURPOSES),
                proptest::option::of(arb_override()),
                // Retention ends mostly after `now`, sometimes at or before it.
                -4..60i64,
                0..40i64,
            )
                .prop_map(
                    |(
                        owner,
                        owner_sector,
                        recipient,
                        recipient_sector,
                        category,
                        purpose,
                        o,
                        retain,
                        now,
                    )| {
                        (
                            DisclosureRequest {
                                owner_agency: agency(owner),
                                owner_sector,
                                recipient_agency: agency(recipient),
                                recipient_sector,
                                category,
                                purpose,
                                r#override: o,
                                retain_until: at(now + retain),
                            },
                            now,
                        )
                    },
                )
        }

        /// Agreements (mostly between the request's sectors), statements, a request and
        /// `now`, in minutes after T0.
        fn arb_case() -> impl Strategy<
            Value = (
                Vec<Agreement>,
                Vec<ConsentStatement>,
                DisclosureRequest,
                i64,
            ),
        > {
            arb_request().prop_flat_map(|(req, now)| {
                let usual = (req.owner_sector, req.recipient_sector);
                (
                    vec(arb_agreement(usual), 0..4),
                    arb_statements(),
                    Just(req),
                    Just(now),
                )
            })
        }

        /// The agreements that cover the request, written out independently.
        fn covering<'a>(agreements: &'a [Agreement], r: &DisclosureRequest) -> Vec<&'a Agreement> {
            agreements
                .iter()
                .filter(|a| {
                    a.from == r.owner_sector
                        && a.to == r.recipient_sector
                        && a.categories.contains(&r.category)
                        && a.purposes.contains(&r.purpose)
                })
                .collect()
        }

        /// Whether a statement speaks about the request at `now`, written out from the
        /// documented semantics.
        fn speaks(s: &ConsentStatement, r: &DisclosureRequest, now: OffsetDateTime) -> bool {
            let sc = &s.scope;
            let unexpired = sc.valid_until().is_none_or(|u| now < u);
            let recipient = sc.recipient_agency_ids().contains(&r.recipient_agency)
                || sc.recipient_sectors().contains(&r.recipient_sector);
            let category = sc.categories().is_empty() || sc.categories().contains(&r.category);
            unexpired && recipient && category && sc.purposes().contains(&r.purpose)
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(4096))]

            #[test]
            fn every_allow_has_its_basis_and_every_deny_a_safe_message(
                (agreements, consents, req, now) in arb_case(),
            ) {
                let now = at(now);
                let d = decide(&agreements, &consents, &req, now);
                let covering = covering(&agreements, &req);
                let speaking: Vec<_> = consents.iter().filter(|s| speaks(s, &req, now)).collect();
                match &d {
                    Decision::Allow(a) => {
                        prop_assert!(now < req.retain_until, "allowed past retention: {d:?}");
                        prop_assert!(!a.lawful_basis.trim().is_empty());
                        if a.basis != Basis::Owner {
                            prop_assert!(req.owner_agency != req.recipient_agency);
                            prop_assert!(!covering.is_empty(), "allowed without agreement: {d:?}");
                        }
                        if a.basis != Basis::Consent {
                            prop_assert_eq!(&a.consent_id, &None);
                        }
                        match a.basis {
                            Basis::Owner => {
                                prop_assert_eq!(&req.owner_agency, &req.recipient_agency);
                                prop_assert_eq!(a.lawful_basis.as_str(), OWNER_LAWFUL_BASIS);
                            }
                            Basis::AgreementNoConsentNeeded => {
                                prop_assert!(covering.iter().any(|g| !g.consent_required
                                    && g.lawful_basis == a.lawful_basis));
                            }
                            Basis::Consent => {
                                let id = a.consent_id.as_deref().expect("consent id");
                                let s = consents.iter().find(|s| s.consent_id == id)
                                    .expect("a statement with that id");
                                prop_assert_eq!(s.state, ConsentState::Given);
                                prop_assert!(speaks(s, &req, now), "not in scope: {s:?}");
                                // The newest speaking statement, and no refusal or
                                // withdrawal recorded at the same moment.
                                for o in &speaking {
                                    prop_assert!(o.recorded_at < s.recorded_at
                                        || (o.recorded_at == s.recorded_at && o.state == ConsentState::Given),
                                        "{o:?} outranks {s:?}");
                                }
                                prop_assert!(covering.iter().all(|g| g.consent_required));
                                prop_assert!(covering.iter().any(|g| g.lawful_basis == a.lawful_basis));
                            }
                            Basis::SafeguardingOverride => {
                                let o = req.r#override.as_ref().expect("an override was given");
                                prop_assert!(o.justification.trim().chars().count() >= MIN_JUSTIFICATION_CHARS);
                                prop_assert!(!o.lawful_basis.trim().is_empty());
                                prop_assert_eq!(a.lawful_basis.as_str(), o.lawful_basis.trim());
                                prop_assert!(covering.iter().all(|g| g.consent_required));
                                prop_assert!(covering.iter().any(|g| g.override_allowed));
                                let newest = speaking.iter().map(|s| s.recorded_at).max();
                                prop_assert!(speaking.iter().all(|s| Some(s.recorded_at) != newest
                                    || s.state != ConsentState::Given
                                    || speaking.iter().any(|t| t.recorded_at == s.recorded_at
                                        && t.state != ConsentState::Given)),
                                    "override used while consent was in force");
                            }
                        }
                    }
                    Decision::Deny(denied) => {
                        prop_assert!(!denied.message.contains(SUBJECT));
                        prop_assert!(!denied.message.contains(RECORDER));
                        if denied.reason == DenyReason::NoAgreement {
                            prop_assert!(covering.is_empty());
                        }
                        if denied.reason == DenyReason::Expired {
                            prop_assert!(now >= req.retain_until);
                        }
                    }
                }
            }

            #[test]
            fn access_for_agrees_with_decide_without_an_override(
                (agreements, consents, req, now) in arb_case(),
            ) {
                let now = at(now);
                let access = access_for(&agreements, &consents, &req, now);
                let plain = DisclosureRequest { r#override: None, ..req.clone() };
                let want = match decide(&agreements, &consents, &plain, now) {
                    Decision::Allow(a) if a.basis == Basis::Owner => Some(RecordAccess::Owner),
                    Decision::Allow(_) => Some(RecordAccess::Readable),
                    Decision::Deny(d) => match d.reason {
                        DenyReason::ConsentNeeded { override_possible }
                        | DenyReason::ConsentRefused { override_possible, .. }
                        | DenyReason::ConsentWithdrawn { override_possible, .. } => Some(
                            if override_possible { RecordAccess::OverrideOnly } else { RecordAccess::NeedsConsent }),
                        _ => None,
                    },
                };
                prop_assert_eq!(access, want);
                // A record is revealed only to its owner or to a sector some agreement
                // lets receive it for this purpose.
                if access.is_some() && access != Some(RecordAccess::Owner) {
                    prop_assert!(!covering(&agreements, &req).is_empty());
                }
            }
        }
    }
}
