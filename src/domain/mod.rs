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

/// The most sections of one gateway that run to their end at once: a caller
/// that opens and resets streams cannot pile up detached work beyond it (a
/// section waits for a place before it starts, holding its stream meanwhile).
pub const MAX_SECTIONS: usize = 1024;

/// The sections of one gateway that run to their end ([`Sections::to_the_end`]):
/// tracked, so that the gateway waits for them before it closes its stores and
/// audit log, and counted against [`MAX_SECTIONS`]. Cheap to clone.
#[derive(Clone)]
pub struct Sections {
    tracker: tokio_util::task::TaskTracker,
    places: std::sync::Arc<tokio::sync::Semaphore>,
}

impl Default for Sections {
    fn default() -> Self {
        Sections {
            tracker: tokio_util::task::TaskTracker::new(),
            places: std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_SECTIONS)),
        }
    }
}

impl Sections {
    /// Sections with `places` places instead of [`MAX_SECTIONS`] (tests).
    #[cfg(test)]
    pub(crate) fn with_places(places: usize) -> Self {
        Sections {
            tracker: tokio_util::task::TaskTracker::new(),
            places: std::sync::Arc::new(tokio::sync::Semaphore::new(places)),
        }
    }

    /// Runs `section` to its end in a task of its own and returns what it returns.
    ///
    /// tonic drops a handler's future when its call is cancelled by the client or
    /// by the server's request timeout. A section that appends an audit entry and
    /// then stores the change it records must not stop between the two: the entry,
    /// once queued, is committed anyway, and the log would record a change that
    /// never happened (or a hold on a child would be let go too early). Dropping
    /// the future this returns detaches the task; it does not cancel it. A section
    /// first waits for one of [`MAX_SECTIONS`] places; dropped meanwhile, it never
    /// starts. `internal` makes the caller's error for a section that panicked.
    pub async fn to_the_end<T, E>(
        &self,
        section: impl std::future::Future<Output = Result<T, E>> + Send + 'static,
        internal: impl FnOnce(String) -> E,
    ) -> Result<T, E>
    where
        T: Send + 'static,
        E: Send + 'static,
    {
        let Ok(place) = self.places.clone().acquire_owned().await else {
            return Err(internal("the gateway is closing".into()));
        };
        let running = self.tracker.spawn(async move {
            let done = section.await;
            drop(place);
            done
        });
        match running.await {
            Ok(done) => done,
            Err(e) => Err(internal(format!("a task that must run to its end: {e}"))),
        }
    }

    /// Spawns a part of a running section (which holds the place): tracked, not
    /// counted again, and not cancelled when the returned handle is dropped.
    pub fn spawn_part<F>(&self, part: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.tracker.spawn(part)
    }

    /// Waits up to `at_most` for every section to end; returns how many are still
    /// running. Sections started later are not waited for.
    pub async fn finish(&self, at_most: std::time::Duration) -> usize {
        self.tracker.close();
        let _ = tokio::time::timeout(at_most, self.tracker.wait()).await;
        self.tracker.len()
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

#[cfg(test)]
mod sections_tests {
    use super::Sections;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    /// A section runs to its end though its caller is dropped; beyond the places,
    /// a section waits, and one dropped while waiting never starts.
    #[tokio::test]
    async fn sections_outlive_their_callers_and_wait_for_a_place() {
        let sections = Sections::with_places(1);
        let (release, released) = tokio::sync::oneshot::channel::<()>();
        let first_done = Arc::new(AtomicBool::new(false));
        let first = sections.to_the_end(
            {
                let done = first_done.clone();
                async move {
                    let _ = released.await;
                    done.store(true, Ordering::SeqCst);
                    Ok::<(), String>(())
                }
            },
            |e| e,
        );
        // Started, then its caller is dropped.
        assert!(tokio::time::timeout(Duration::from_millis(20), first)
            .await
            .is_err());
        let second_started = Arc::new(AtomicBool::new(false));
        let second = sections.to_the_end(
            {
                let started = second_started.clone();
                async move {
                    started.store(true, Ordering::SeqCst);
                    Ok::<(), String>(())
                }
            },
            |e| e,
        );
        assert!(tokio::time::timeout(Duration::from_millis(20), second)
            .await
            .is_err());
        release.send(()).unwrap();
        assert_eq!(sections.finish(Duration::from_secs(60)).await, 0);
        assert!(
            first_done.load(Ordering::SeqCst),
            "the first ran to its end"
        );
        assert!(
            !second_started.load(Ordering::SeqCst),
            "the second, dropped while waiting for a place, never started"
        );
    }
}
