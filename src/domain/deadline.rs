//! When a concern must be acknowledged: its acknowledgement deadline, from the moment
//! it was raised, its urgency, and whether it is an Operation Encompass notification.
//!
//! Pure: no I/O and no clock reads; the caller passes the moment in (from its
//! `Clock`). Instants go in and come out in UTC. Working days and Operation
//! Encompass's 08:30 are reckoned in Europe/London local time, worked out from the
//! UK's summer-time rule ([`london_offset`]) rather than a time-zone database.
//!
//! # The rules
//! | concern | due | measured in |
//! | --- | --- | --- |
//! | `IMMEDIATE_RISK` | `raised_at + immediate_risk` (default 1 hour) | elapsed time |
//! | `URGENT` | `raised_at + urgent` (default 4 hours) | elapsed time |
//! | `ROUTINE` | the same local time of day on the Nth working day after the day it was raised (N = `routine_working_days`, default 1) | working days |
//! | Operation Encompass | 08:30 local on the next school day | school days |
//!
//! - **Elapsed time.** The two short deadlines run through nights, weekends, bank
//!   holidays and clock changes alike: an hour is an hour. A concern raised at 00:30
//!   GMT on the night the clocks go forward is due at 02:30 BST.
//! - **Routine.** Working Together 2023 asks children's social care to decide within
//!   one working day of a referral what response is needed; a routine concern is
//!   therefore due at the same local time on the Nth working day after the day it was
//!   raised (Monday 14:00 → Tuesday 14:00; Friday 16:00 → Monday 16:00). A concern
//!   raised on a day that is not a working day is taken as received at the start of
//!   the next working day, 09:00 local ([`WORKING_DAY_START`]), and N working days are
//!   counted from there (Saturday 10:00 → received Monday 09:00 → due Tuesday 09:00).
//!   A working day is Monday to Friday, except the configured bank holidays.
//! - **Operation Encompass** ([`is_encompass`]: a police domestic-abuse concern to a
//!   school). The school must be told before the start of the next school day, so the
//!   concern is due at 08:30 local ([`ENCOMPASS_CUTOFF`]) on the first school day
//!   that has not yet reached 08:30 when the concern is raised: Tuesday 02:00 (a
//!   night-time incident) → Tuesday 08:30; Tuesday 08:30 or 10:00 → Wednesday 08:30;
//!   Friday 22:00 → Monday 08:30. Encompass sets a latest time and never relaxes a
//!   tighter one: the deadline is the earlier of 08:30 and the urgency's own deadline,
//!   so an immediate-risk Encompass concern raised at 02:00 is still due at 03:00.
//!
//! # Limitations
//! - A school day is a working day: there is no school-holiday or INSET-day
//!   calendar, so in school holidays an Encompass concern falls due on a day the
//!   school is closed.
//! - Bank holidays are whatever the configuration lists; England and Wales, Scotland
//!   and Northern Ireland differ, and nothing here knows which applies.
//! - The summer-time rule is the one in force since 1996; earlier instants are
//!   reckoned by it too.
//! - A deadline later than the last instant `time` can represent (the end of year
//!   9999) saturates to that instant ([`AckCalendar::ack_due`]).

use std::collections::BTreeSet;
use std::ops::Bound;
use std::time::Duration;

use time::macros::time;
use time::{Date, Month, OffsetDateTime, PrimitiveDateTime, Time, UtcOffset, Weekday};

use crate::domain::{ConcernCategory, Sector, Urgency};

/// Local time at which a concern raised on a day that is not a working day is taken
/// to have been received, for routine deadlines.
pub const WORKING_DAY_START: Time = time!(09:00);

/// Local time before which an Operation Encompass notification must reach a school on
/// a school day.
pub const ENCOMPASS_CUTOFF: Time = time!(08:30);

/// The latest instant `time` can represent; deadlines beyond it saturate to it.
const LATEST: OffsetDateTime = PrimitiveDateTime::MAX.assume_utc();

/// Greenwich Mean Time, London's offset in winter.
const GMT: UtcOffset = UtcOffset::UTC;

/// British Summer Time, London's offset in summer.
const BST: UtcOffset = time::macros::offset!(+1);

/// Whether a concern is an Operation Encompass notification: a police report of
/// domestic abuse to a child's school, due before the next school day starts.
pub fn is_encompass(sender: Sector, recipient: Sector, category: ConcernCategory) -> bool {
    sender == Sector::Police
        && recipient == Sector::Education
        && category == ConcernCategory::DomesticAbuse
}

/// The acknowledgement deadlines of one area: how long each urgency allows, and which
/// days are working days. Built from the `[deadlines]` section of the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AckCalendar {
    immediate_risk: Duration,
    urgent: Duration,
    routine_working_days: u32,
    bank_holidays: BTreeSet<Date>,
}

// === impl AckCalendar ===

impl AckCalendar {
    /// A calendar from its parts. `routine_working_days` is at least 1 in any loaded
    /// configuration; 0 would make a routine concern due the moment it is raised (or at
    /// 09:00 on the next working day, when raised on a day off).
    pub fn new(
        immediate_risk: Duration,
        urgent: Duration,
        routine_working_days: u32,
        bank_holidays: BTreeSet<Date>,
    ) -> Self {
        AckCalendar {
            immediate_risk,
            urgent,
            routine_working_days,
            bank_holidays,
        }
    }

    /// The calendar the configuration's `[deadlines]` section describes.
    pub fn from_config(deadlines: &crate::config::Deadlines) -> Self {
        AckCalendar::new(
            deadlines.immediate_risk,
            deadlines.urgent,
            deadlines.routine_working_days,
            deadlines.bank_holidays.clone(),
        )
    }

    /// When a concern raised at `raised_at` with `urgency` must be acknowledged, in
    /// UTC. `encompass` says whether it is an Operation Encompass notification (see
    /// [`is_encompass`]); the rules are in the [module documentation](self).
    ///
    /// `raised_at` may carry any offset; the result is always UTC. A deadline beyond
    /// the end of year 9999 saturates to the last representable instant.
    pub fn ack_due(
        &self,
        raised_at: OffsetDateTime,
        urgency: Urgency,
        encompass: bool,
    ) -> OffsetDateTime {
        let by_urgency = match urgency {
            Urgency::ImmediateRisk => after_elapsed(raised_at, self.immediate_risk),
            Urgency::Urgent => after_elapsed(raised_at, self.urgent),
            Urgency::Routine => self.routine_due(raised_at),
        }
        .unwrap_or(LATEST);
        if encompass {
            let by_school_day = self.encompass_due(raised_at).unwrap_or(LATEST);
            by_urgency.min(by_school_day)
        } else {
            by_urgency
        }
    }

    /// Whether `date` is a working day (and a school day): Monday to Friday, and not
    /// a configured bank holiday.
    pub fn is_working_day(&self, date: Date) -> bool {
        is_weekday(date) && !self.bank_holidays.contains(&date)
    }

    /// The routine deadline, or `None` when it is beyond what `time` can represent.
    fn routine_due(&self, raised_at: OffsetDateTime) -> Option<OffsetDateTime> {
        let raised = to_london(raised_at)?;
        let (received_on, at) = if self.is_working_day(raised.date()) {
            (raised.date(), raised.time())
        } else {
            (
                self.working_days_after(raised.date(), 1)?,
                WORKING_DAY_START,
            )
        };
        let due_on = self.working_days_after(received_on, self.routine_working_days.into())?;
        to_utc(london_local_to_utc(due_on, at))
    }

    /// The Operation Encompass deadline, or `None` when it is beyond what `time` can
    /// represent.
    fn encompass_due(&self, raised_at: OffsetDateTime) -> Option<OffsetDateTime> {
        let raised = to_london(raised_at)?;
        let due_on = if self.is_working_day(raised.date()) && raised.time() < ENCOMPASS_CUTOFF {
            raised.date()
        } else {
            self.working_days_after(raised.date(), 1)?
        };
        to_utc(london_local_to_utc(due_on, ENCOMPASS_CUTOFF))
    }

    /// The `n`th working day after `from` (`from` itself when `n` is 0), or `None`
    /// past the last representable date.
    ///
    /// Jumps straight to the `n`th weekday, then moves on by as many weekdays as bank
    /// holidays were passed over, until a jump passes over none: the number of rounds
    /// is bounded by the number of bank holidays, not by `n`.
    fn working_days_after(&self, from: Date, n: u64) -> Option<Date> {
        let (mut from, mut remaining) = (from, n);
        while remaining > 0 {
            let to = weekdays_after(from, remaining)?;
            remaining = self
                .bank_holidays
                .range((Bound::Excluded(from), Bound::Included(to)))
                .filter(|d| is_weekday(**d))
                .count() as u64;
            from = to;
        }
        Some(from)
    }
}

/// `start + elapsed` in UTC, or `None` when it is beyond what `time` can represent.
fn after_elapsed(start: OffsetDateTime, elapsed: Duration) -> Option<OffsetDateTime> {
    let elapsed = time::Duration::try_from(elapsed).ok()?;
    to_utc(start.checked_add(elapsed)?)
}

/// Whether `date` falls Monday to Friday.
fn is_weekday(date: Date) -> bool {
    !matches!(date.weekday(), Weekday::Saturday | Weekday::Sunday)
}

/// The `n`th Monday-to-Friday date after `from` (`from` itself when `n` is 0), in
/// constant time, or `None` past the last representable date.
fn weekdays_after(from: Date, n: u64) -> Option<Date> {
    if n == 0 {
        return Some(from);
    }
    let day = i64::from(from.to_julian_day());
    let since_monday = i64::from(from.weekday().number_days_from_monday());
    let monday = day - since_monday;
    // A Saturday or Sunday is followed by the same weekdays as the Friday before it.
    let weekdays_into_week = since_monday.min(4);
    let total = i64::try_from(n).ok()?.checked_add(weekdays_into_week)?;
    let target = (total / 5)
        .checked_mul(7)?
        .checked_add(total % 5)?
        .checked_add(monday)?;
    Date::from_julian_day(i32::try_from(target).ok()?).ok()
}

/// `t` as UTC, or `None` when that is outside what `time` can represent.
fn to_utc(t: OffsetDateTime) -> Option<OffsetDateTime> {
    t.checked_to_offset(UtcOffset::UTC)
}

/// `t` as a Europe/London wall-clock date and time, or `None` when that is outside
/// what `time` can represent.
fn to_london(t: OffsetDateTime) -> Option<PrimitiveDateTime> {
    let local = t.checked_to_offset(london_offset(t))?;
    Some(PrimitiveDateTime::new(local.date(), local.time()))
}

/// Europe/London's offset from UTC at the instant `t`: BST (UTC+1) from 01:00 UTC on
/// the last Sunday of March until 01:00 UTC on the last Sunday of October, GMT (UTC+0)
/// otherwise. This is the UK rule since 1996 (and the EU's); no time-zone database is
/// consulted.
pub fn london_offset(t: OffsetDateTime) -> UtcOffset {
    // Only the year is needed; an instant whose UTC form cannot be represented lies at
    // the very start or end of the range, in winter either way.
    let Some(utc) = to_utc(t) else {
        return GMT;
    };
    let year = utc.year();
    let summer_starts = last_sunday(year, Month::March).with_time(time!(01:00));
    let summer_ends = last_sunday(year, Month::October).with_time(time!(01:00));
    let local = PrimitiveDateTime::new(utc.date(), utc.time());
    if summer_starts <= local && local < summer_ends {
        BST
    } else {
        GMT
    }
}

/// The UTC instant at which Europe/London's clocks show `date` and `time`.
///
/// Around the clock changes a wall-clock time may not exist, or exist twice; this
/// resolves both the way most calendar software does:
/// - **the gap** (01:00 to 01:59:59 on the last Sunday of March, skipped when the
///   clocks go forward): the time is moved forward by the hour skipped, so 01:30 is
///   read as 02:30 BST (01:30 UTC);
/// - **the overlap** (01:00 to 01:59:59 on the last Sunday of October, which happens
///   first in BST and again in GMT): the earlier instant, in BST, is taken, so 01:30
///   is 00:30 UTC.
///
/// Working days and school days are Monday to Friday and the clocks change on a
/// Sunday, so no deadline lands in either; the rules exist so the function is total.
pub fn london_local_to_utc(date: Date, time: Time) -> OffsetDateTime {
    let local = PrimitiveDateTime::new(date, time);
    let as_gmt = local.assume_utc();
    // Earlier of the two readings first, so the overlap resolves to BST.
    let as_bst = as_gmt.checked_sub(time::Duration::HOUR);
    match as_bst {
        Some(instant) if london_offset(instant) == BST => instant,
        // GMT's reading is either valid, or (in the gap) the same wall-clock time read
        // with the offset in force before the gap, which is one hour later in BST.
        _ => as_gmt,
    }
}

/// The last Sunday of `month` in `year`.
fn last_sunday(year: i32, month: Month) -> Date {
    // Year comes from a valid date and the day is the month's own length, so the date
    // exists.
    let last_day = Date::from_calendar_date(year, month, month.length(year))
        .expect("the last day of a month in a representable year is a valid date");
    let since_sunday = last_day.weekday().number_days_from_sunday();
    // At most six days back from the 28th or later: still in the same month.
    Date::from_calendar_date(year, month, last_day.day() - since_sunday)
        .expect("a day in the last week of a month is a valid date")
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::{date, datetime};
    use Urgency::{ImmediateRisk, Routine, Urgent};

    /// Defaults (1h, 4h, 1 working day) and the 2026 bank holidays of England and
    /// Wales that the tests meet.
    fn calendar(routine_working_days: u32) -> AckCalendar {
        AckCalendar::new(
            Duration::from_secs(3600),
            Duration::from_secs(4 * 3600),
            routine_working_days,
            [
                date!(2026 - 05 - 04), // Early May bank holiday (Monday)
                date!(2026 - 08 - 31), // Summer bank holiday (Monday)
                date!(2026 - 12 - 25), // Christmas Day (Friday)
                date!(2026 - 12 - 26), // Boxing Day itself, a Saturday: no effect
                date!(2026 - 12 - 28), // Boxing Day, substitute (Monday)
            ]
            .into_iter()
            .collect(),
        )
    }

    struct Case {
        name: &'static str,
        working_days: u32,
        raised: OffsetDateTime,
        urgency: Urgency,
        encompass: bool,
        due: OffsetDateTime,
    }

    const fn case(
        name: &'static str,
        raised: OffsetDateTime,
        urgency: Urgency,
        encompass: bool,
        due: OffsetDateTime,
    ) -> Case {
        Case {
            name,
            working_days: 1,
            raised,
            urgency,
            encompass,
            due,
        }
    }

    const fn with_days(working_days: u32, c: Case) -> Case {
        Case { working_days, ..c }
    }

    fn run(cases: &[Case]) {
        for c in cases {
            let due = calendar(c.working_days).ack_due(c.raised, c.urgency, c.encompass);
            assert_eq!(due, c.due, "{}", c.name);
            assert_eq!(due.offset(), UtcOffset::UTC, "{}: result is UTC", c.name);
        }
    }

    #[test]
    fn short_deadlines_are_elapsed_time_across_midnight_and_clock_changes() {
        run(&[
            case(
                "immediate risk across midnight",
                datetime!(2026-01-14 23:30 UTC),
                ImmediateRisk,
                false,
                datetime!(2026-01-15 00:30 UTC),
            ),
            case(
                "urgent across midnight, in summer",
                datetime!(2026-07-14 22:00 UTC), // 23:00 BST
                Urgent,
                false,
                datetime!(2026-07-15 02:00 UTC), // 03:00 BST
            ),
            case(
                "urgent over a weekend and a bank holiday is still four hours",
                datetime!(2026-12-24 22:00 UTC),
                Urgent,
                false,
                datetime!(2026-12-25 02:00 UTC),
            ),
            case(
                "immediate risk as the clocks go forward: 00:30 GMT to 02:30 BST",
                datetime!(2026-03-29 00:30 UTC),
                ImmediateRisk,
                false,
                datetime!(2026-03-29 01:30 UTC),
            ),
            case(
                "urgent as the clocks go back: 01:00 BST to 04:00 GMT, four hours on",
                datetime!(2026-10-25 00:00 UTC),
                Urgent,
                false,
                datetime!(2026-10-25 04:00 UTC),
            ),
            case(
                "an offset on the way in makes no difference on the way out",
                datetime!(2026-01-14 23:30 -05:00),
                ImmediateRisk,
                false,
                datetime!(2026-01-15 05:30 UTC),
            ),
        ]);
    }

    #[test]
    fn routine_is_due_at_the_same_local_time_n_working_days_later() {
        run(&[
            case(
                "Monday to Tuesday",
                datetime!(2026-01-12 14:00 UTC),
                Routine,
                false,
                datetime!(2026-01-13 14:00 UTC),
            ),
            case(
                "Monday to Tuesday in summer keeps local time",
                datetime!(2026-06-15 13:00 UTC), // 14:00 BST
                Routine,
                false,
                datetime!(2026-06-16 13:00 UTC),
            ),
            case(
                "Friday to Monday",
                datetime!(2026-01-16 16:00 UTC),
                Routine,
                false,
                datetime!(2026-01-19 16:00 UTC),
            ),
            case(
                "Monday late evening to Tuesday late evening",
                datetime!(2026-01-12 23:30 UTC),
                Routine,
                false,
                datetime!(2026-01-13 23:30 UTC),
            ),
            case(
                "Saturday counts from Monday 09:00, so Tuesday 09:00",
                datetime!(2026-01-17 10:00 UTC),
                Routine,
                false,
                datetime!(2026-01-20 09:00 UTC),
            ),
            case(
                "Sunday night counts from Monday 09:00, so Tuesday 09:00",
                datetime!(2026-01-18 23:59 UTC),
                Routine,
                false,
                datetime!(2026-01-20 09:00 UTC),
            ),
            case(
                "Thursday before Christmas skips Friday, the weekend and Monday",
                datetime!(2026-12-24 11:00 UTC),
                Routine,
                false,
                datetime!(2026-12-29 11:00 UTC),
            ),
            case(
                "raised on a bank holiday Monday counts from Tuesday 09:00",
                datetime!(2026-08-31 09:00 UTC), // 10:00 BST
                Routine,
                false,
                datetime!(2026-09-02 08:00 UTC), // Wednesday 09:00 BST
            ),
            case(
                "Friday 16:00 GMT to Monday 16:00 BST over the spring change",
                datetime!(2026-03-27 16:00 UTC),
                Routine,
                false,
                datetime!(2026-03-30 15:00 UTC),
            ),
            case(
                "Friday 16:00 BST to Monday 16:00 GMT over the autumn change",
                datetime!(2026-10-23 15:00 UTC),
                Routine,
                false,
                datetime!(2026-10-26 16:00 UTC),
            ),
            case(
                "Sunday 00:30 GMT, before the spring change, counts from Monday 09:00 BST",
                datetime!(2026-03-29 00:30 UTC),
                Routine,
                false,
                datetime!(2026-03-31 08:00 UTC), // Tuesday 09:00 BST
            ),
            with_days(
                2,
                case(
                    "two working days: Monday to Wednesday",
                    datetime!(2026-01-12 14:00 UTC),
                    Routine,
                    false,
                    datetime!(2026-01-14 14:00 UTC),
                ),
            ),
            with_days(
                2,
                case(
                    "two working days: Friday to Tuesday",
                    datetime!(2026-01-16 16:00 UTC),
                    Routine,
                    false,
                    datetime!(2026-01-20 16:00 UTC),
                ),
            ),
            with_days(
                2,
                case(
                    "two working days: Saturday counts from Monday 09:00, so Wednesday",
                    datetime!(2026-01-17 10:00 UTC),
                    Routine,
                    false,
                    datetime!(2026-01-21 09:00 UTC),
                ),
            ),
            with_days(
                2,
                case(
                    "two working days: Thursday before Christmas to Wednesday",
                    datetime!(2026-12-24 11:00 UTC),
                    Routine,
                    false,
                    datetime!(2026-12-30 11:00 UTC),
                ),
            ),
            with_days(
                2,
                case(
                    "two working days: Wednesday before Christmas to Tuesday",
                    datetime!(2026-12-23 11:00 UTC),
                    Routine,
                    false,
                    datetime!(2026-12-29 11:00 UTC),
                ),
            ),
            with_days(
                10,
                case(
                    "ten working days from Friday 18 December skip both bank holidays",
                    datetime!(2026-12-18 11:00 UTC),
                    Routine,
                    false,
                    datetime!(2027-01-05 11:00 UTC),
                ),
            ),
        ]);
    }

    #[test]
    fn encompass_is_due_before_the_next_school_day_starts() {
        run(&[
            case(
                "night incident on Tuesday 02:00: due Tuesday 08:30",
                datetime!(2026-01-13 02:00 UTC),
                Routine,
                true,
                datetime!(2026-01-13 08:30 UTC),
            ),
            case(
                "Tuesday 10:00: due Wednesday 08:30",
                datetime!(2026-01-13 10:00 UTC),
                Routine,
                true,
                datetime!(2026-01-14 08:30 UTC),
            ),
            case(
                "Tuesday at 08:30 exactly is too late for Tuesday",
                datetime!(2026-01-13 08:30 UTC),
                Routine,
                true,
                datetime!(2026-01-14 08:30 UTC),
            ),
            case(
                "Tuesday a moment before 08:30 is due that morning",
                datetime!(2026-01-13 08:29:59.999 UTC),
                Routine,
                true,
                datetime!(2026-01-13 08:30 UTC),
            ),
            case(
                "Friday 22:00: due Monday 08:30",
                datetime!(2026-01-16 22:00 UTC),
                Routine,
                true,
                datetime!(2026-01-19 08:30 UTC),
            ),
            case(
                "Saturday 07:00: due Monday 08:30",
                datetime!(2026-01-17 07:00 UTC),
                Routine,
                true,
                datetime!(2026-01-19 08:30 UTC),
            ),
            case(
                "Friday before the May bank holiday: due Tuesday 08:30 BST",
                datetime!(2026-05-01 21:00 UTC), // 22:00 BST
                Routine,
                true,
                datetime!(2026-05-05 07:30 UTC),
            ),
            case(
                "early on a bank holiday Monday: due Tuesday 08:30 BST",
                datetime!(2026-05-04 05:00 UTC), // 06:00 BST
                Routine,
                true,
                datetime!(2026-05-05 07:30 UTC),
            ),
            case(
                "Monday after the spring change: 08:30 BST is 07:30 UTC",
                datetime!(2026-03-27 20:00 UTC), // Friday 20:00 GMT
                Routine,
                true,
                datetime!(2026-03-30 07:30 UTC),
            ),
            case(
                "Sunday night after the spring change: Monday 08:30 BST",
                datetime!(2026-03-29 22:00 UTC), // 23:00 BST
                Routine,
                true,
                datetime!(2026-03-30 07:30 UTC),
            ),
            case(
                "Monday after the autumn change: 08:30 GMT is 08:30 UTC",
                datetime!(2026-10-23 19:00 UTC), // Friday 20:00 BST
                Routine,
                true,
                datetime!(2026-10-26 08:30 UTC),
            ),
            case(
                "Monday 08:00 BST is 07:00 UTC, still before 08:30 local",
                datetime!(2026-06-15 07:00 UTC),
                Routine,
                true,
                datetime!(2026-06-15 07:30 UTC),
            ),
            case(
                "Monday 08:00 UTC is 09:00 BST, past 08:30 local",
                datetime!(2026-06-15 08:00 UTC),
                Routine,
                true,
                datetime!(2026-06-16 07:30 UTC),
            ),
            case(
                "Encompass never relaxes an immediate risk: 02:00 is due 03:00",
                datetime!(2026-01-13 02:00 UTC),
                ImmediateRisk,
                true,
                datetime!(2026-01-13 03:00 UTC),
            ),
            case(
                "urgent at 06:00 is due by 08:30, before its four hours run out",
                datetime!(2026-01-13 06:00 UTC),
                Urgent,
                true,
                datetime!(2026-01-13 08:30 UTC),
            ),
            case(
                "urgent on Friday 22:00 keeps its four hours",
                datetime!(2026-01-16 22:00 UTC),
                Urgent,
                true,
                datetime!(2026-01-17 02:00 UTC),
            ),
        ]);
    }

    #[test]
    fn only_police_domestic_abuse_to_a_school_is_encompass() {
        for &sender in Sector::ALL {
            for &recipient in Sector::ALL {
                for &category in ConcernCategory::ALL {
                    let want = sender == Sector::Police
                        && recipient == Sector::Education
                        && category == ConcernCategory::DomesticAbuse;
                    assert_eq!(
                        is_encompass(sender, recipient, category),
                        want,
                        "{sender} -> {recipient}, {category}"
                    );
                }
            }
        }
    }

    #[test]
    fn london_is_on_summer_time_from_the_last_sunday_of_march_to_october() {
        let cases = [
            (datetime!(2026-03-29 00:59:59.999999999 UTC), GMT),
            (datetime!(2026-03-29 01:00 UTC), BST),
            (datetime!(2026-10-25 00:59:59.999999999 UTC), BST),
            (datetime!(2026-10-25 01:00 UTC), GMT),
            (datetime!(2026-01-01 00:00 UTC), GMT),
            (datetime!(2026-07-01 12:00 UTC), BST),
            (datetime!(2026-12-31 23:59 UTC), GMT),
            (datetime!(2024-03-31 00:59 UTC), GMT),
            (datetime!(2024-03-31 01:00 UTC), BST),
            (datetime!(2024-10-27 00:59 UTC), BST),
            (datetime!(2024-10-27 01:00 UTC), GMT),
            (datetime!(2025-03-30 01:00 UTC), BST),
            (datetime!(2025-10-26 01:00 UTC), GMT),
            (datetime!(2027-03-28 01:00 UTC), BST),
            (datetime!(2027-03-28 00:59 UTC), GMT),
            // The same instant written with another offset.
            (datetime!(2026-03-29 02:00 +01:00), BST),
            (datetime!(2026-03-29 01:59 +01:00), GMT),
        ];
        for (instant, want) in cases {
            assert_eq!(london_offset(instant), want, "{instant}");
        }
    }

    #[test]
    fn london_local_times_resolve_gap_forward_and_overlap_to_summer_time() {
        let cases = [
            (
                "winter",
                date!(2026 - 01 - 13),
                time!(08:30),
                datetime!(2026-01-13 08:30 UTC),
            ),
            (
                "summer",
                date!(2026 - 06 - 15),
                time!(08:30),
                datetime!(2026-06-15 07:30 UTC),
            ),
            (
                "just before the gap",
                date!(2026 - 03 - 29),
                time!(00:59),
                datetime!(2026-03-29 00:59 UTC),
            ),
            (
                "start of the gap moves forward",
                date!(2026 - 03 - 29),
                time!(01:00),
                datetime!(2026-03-29 01:00 UTC),
            ),
            (
                "inside the gap moves forward",
                date!(2026 - 03 - 29),
                time!(01:30),
                datetime!(2026-03-29 01:30 UTC),
            ),
            (
                "just after the gap",
                date!(2026 - 03 - 29),
                time!(02:00),
                datetime!(2026-03-29 01:00 UTC),
            ),
            (
                "just before the overlap",
                date!(2026 - 10 - 25),
                time!(00:59),
                datetime!(2026-10-24 23:59 UTC),
            ),
            (
                "start of the overlap is BST",
                date!(2026 - 10 - 25),
                time!(01:00),
                datetime!(2026-10-25 00:00 UTC),
            ),
            (
                "inside the overlap is BST",
                date!(2026 - 10 - 25),
                time!(01:30),
                datetime!(2026-10-25 00:30 UTC),
            ),
            (
                "just after the overlap",
                date!(2026 - 10 - 25),
                time!(02:00),
                datetime!(2026-10-25 02:00 UTC),
            ),
            (
                "first moment of the year",
                date!(2026 - 01 - 01),
                time!(00:00),
                datetime!(2026-01-01 00:00 UTC),
            ),
        ];
        for (name, day, at, want) in cases {
            assert_eq!(london_local_to_utc(day, at), want, "{name}");
        }
    }

    #[test]
    fn london_local_time_round_trips_except_the_repeated_hour() {
        for start in [
            datetime!(2026-03-28 12:00 UTC),
            datetime!(2026-10-24 12:00 UTC),
        ] {
            for step in 0..(24 * 4) {
                let instant = start + time::Duration::minutes(15 * step);
                let local = to_london(instant).expect("2026 is representable");
                let back = london_local_to_utc(local.date(), local.time());
                let repeated_hour = datetime!(2026-10-25 01:00 UTC) <= instant
                    && instant < datetime!(2026-10-25 02:00 UTC);
                if repeated_hour {
                    assert_eq!(back, instant - time::Duration::HOUR, "{instant}");
                } else {
                    assert_eq!(back, instant, "{instant}");
                }
            }
        }
    }

    #[test]
    fn working_day_count_matches_a_day_by_day_walk() {
        let cal = calendar(1);
        let walk = |from: Date, n: u64| {
            let (mut d, mut left) = (from, n);
            while left > 0 {
                d = d.next_day().expect("in range");
                if cal.is_working_day(d) {
                    left -= 1;
                }
            }
            d
        };
        let mut from = date!(2026 - 12 - 10);
        while from < date!(2027 - 01 - 05) {
            for n in 0..12 {
                assert_eq!(
                    cal.working_days_after(from, n),
                    Some(walk(from, n)),
                    "{from} + {n}"
                );
            }
            from = from.next_day().expect("in range");
        }
    }

    #[test]
    fn deadlines_beyond_year_9999_saturate() {
        let cal = AckCalendar::new(Duration::MAX, Duration::MAX, u32::MAX, BTreeSet::new());
        let raised = datetime!(2026-01-13 10:00 UTC);
        for urgency in [ImmediateRisk, Urgent, Routine] {
            assert_eq!(cal.ack_due(raised, urgency, false), LATEST, "{urgency}");
        }
        // Encompass still bounds them.
        assert_eq!(
            cal.ack_due(raised, ImmediateRisk, true),
            datetime!(2026-01-14 08:30 UTC)
        );
        let near_the_end = datetime!(9999-12-31 20:00 UTC);
        assert_eq!(calendar(1).ack_due(near_the_end, Urgent, false), LATEST);
        assert_eq!(calendar(1).ack_due(near_the_end, Routine, true), LATEST);
    }

    #[test]
    fn from_config_takes_every_part() {
        let deadlines = crate::config::Deadlines {
            immediate_risk: Duration::from_secs(1800),
            urgent: Duration::from_secs(7200),
            routine_working_days: 3,
            bank_holidays: [date!(2026 - 12 - 25)].into_iter().collect(),
        };
        assert_eq!(
            AckCalendar::from_config(&deadlines),
            AckCalendar::new(
                Duration::from_secs(1800),
                Duration::from_secs(7200),
                3,
                [date!(2026 - 12 - 25)].into_iter().collect(),
            )
        );
    }
}
