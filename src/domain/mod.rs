//! Plain-Rust domain: no gRPC, no sled. Types here are parsed once and then trusted
//! ("parse, don't validate"): an [`NhsNumber`] or an [`AgencyId`] that exists is valid.

pub mod clock;
pub mod consent;
pub mod deadline;
pub mod ids;
pub mod policy;
pub mod subject;

pub use clock::{Clock, ManualClock, SystemClock};
pub use ids::{AgencyId, IdError, PrincipalId};
pub use subject::{NhsNumber, NhsNumberError};

/// Checks a free text field's length in characters (Unicode scalar values): at
/// least `min` after trimming white space, at most `max` as given. The message
/// names the field and says which bound it missed, in one wording for every
/// service.
pub fn check_text(field: &str, text: &str, min: usize, max: usize) -> Result<(), String> {
    let n = text.chars().count();
    if n > max {
        return Err(format!(
            "{field} has {n} characters, more than the limit of {max}"
        ));
    }
    let trimmed = text.trim().chars().count();
    if trimmed < min {
        return Err(if text.is_empty() {
            format!("{field} is required")
        } else if trimmed == 0 {
            format!("{field} is blank (white space only)")
        } else {
            format!("{field} has {trimmed} characters after trimming; at least {min} are required")
        });
    }
    Ok(())
}

/// Runs `section` to its end in a task of its own and returns what it returns.
///
/// tonic drops a handler's future when its call is cancelled by the client or by
/// the server's request timeout. A section that appends an audit entry and then
/// stores the change it records must not stop between the two: the entry, once
/// queued, is committed anyway, and the log would record a change that never
/// happened (or a hold on a child would be let go too early). Dropping the future
/// this returns detaches the task; it does not cancel it. The task is tracked in
/// `sections`, which the gateway waits on before it closes its stores and audit
/// log, so that a section whose caller has gone still finishes at shutdown.
/// `internal` makes the caller's error for a section that panicked.
pub async fn to_the_end<T, E>(
    sections: &tokio_util::task::TaskTracker,
    section: impl std::future::Future<Output = Result<T, E>> + Send + 'static,
    internal: impl FnOnce(String) -> E,
) -> Result<T, E>
where
    T: Send + 'static,
    E: Send + 'static,
{
    match sections.spawn(section).await {
        Ok(done) => done,
        Err(e) => Err(internal(format!("a task that must run to its end: {e}"))),
    }
}

/// Declares a closed domain enum with its canonical upper-snake-case names, which are
/// the names used in the config file, in API.md (without the protobuf prefix) and in
/// log lines.
macro_rules! named_enum {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident => $text:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum $name { $(#[doc = $text] $(#[$vmeta])* $variant),+ }

        impl $name {
            /// Every value, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The canonical name, e.g. `CHILDRENS_SOCIAL_CARE`.
            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }
        }

        impl ::std::fmt::Display for $name {
            fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl ::std::str::FromStr for $name {
            type Err = $crate::domain::UnknownName;
            fn from_str(s: &str) -> Result<Self, $crate::domain::UnknownName> {
                match s {
                    $($text => Ok($name::$variant),)+
                    _ => Err($crate::domain::UnknownName {
                        kind: stringify!($name),
                        value: s.to_owned(),
                        expected: &[$($text),+],
                    }),
                }
            }
        }
    };
}

pub(crate) use named_enum;

/// A name that is not one of an enum's values; the message lists the allowed ones.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {kind} {value:?}; expected one of {}", expected.join(", "))]
pub struct UnknownName {
    /// The enum's name, e.g. `Sector`.
    pub kind: &'static str,
    /// What was given.
    pub value: String,
    /// The accepted names.
    pub expected: &'static [&'static str],
}

named_enum!(
    /// The kind of organisation an agency is.
    Sector {
        Health => "HEALTH",
        Police => "POLICE",
        Education => "EDUCATION",
        ChildrensSocialCare => "CHILDRENS_SOCIAL_CARE",
        Probation => "PROBATION",
        Housing => "HOUSING",
        Other => "OTHER",
    }
);

named_enum!(
    /// Why information is being asked for.
    Purpose {
        Safeguarding => "SAFEGUARDING",
        EarlyHelp => "EARLY_HELP",
        HealthCare => "HEALTH_CARE",
        EducationSupport => "EDUCATION_SUPPORT",
        CrimePrevention => "CRIME_PREVENTION",
    }
);

named_enum!(
    /// What a shared record is.
    RecordCategory {
        ChildProtectionPlan => "CHILD_PROTECTION_PLAN",
        LookedAfterStatus => "LOOKED_AFTER_STATUS",
        SchoolAttendance => "SCHOOL_ATTENDANCE",
        UnscheduledCareAttendance => "UNSCHEDULED_CARE_ATTENDANCE",
        PoliceIncident => "POLICE_INCIDENT",
        EarlyHelpAssessment => "EARLY_HELP_ASSESSMENT",
        Other => "OTHER",
    }
);

named_enum!(
    /// What a concern is about.
    ConcernCategory {
        Neglect => "NEGLECT",
        PhysicalAbuse => "PHYSICAL_ABUSE",
        SexualAbuse => "SEXUAL_ABUSE",
        EmotionalAbuse => "EMOTIONAL_ABUSE",
        DomesticAbuse => "DOMESTIC_ABUSE",
        Exploitation => "EXPLOITATION",
        MissingFromEducation => "MISSING_FROM_EDUCATION",
        OnlineHarm => "ONLINE_HARM",
        Other => "OTHER",
    }
);

named_enum!(
    /// How quickly a concern must be acknowledged.
    Urgency {
        ImmediateRisk => "IMMEDIATE_RISK",
        Urgent => "URGENT",
        Routine => "ROUTINE",
    }
);

named_enum!(
    /// What a caller is, from the path of its certificate's SPIFFE id.
    Role {
        Agency => "agency",
        Auditor => "auditor",
        Operator => "operator",
    }
);
