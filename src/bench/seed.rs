//! The data the mix reads: records shared by nhs-guys (A&E attendances, which the
//! school may read with consent) and police-met (police incidents, which the school
//! may read without), a consent per child covering the former, and a check that
//! each record discloses to school-oakfield on the basis the agreements imply.
//!
//! It relies on the sharing agreements of the development config
//! (`DEV_CONFIG_TOML`): HEALTH → EDUCATION, UNSCHEDULED_CARE_ATTENDANCE, consent
//! required; POLICE → EDUCATION, POLICE_INCIDENT for SAFEGUARDING, no consent.

use anyhow::Context as _;
use tonic::transport::Channel;

use crate::proto::v1::consent_service_client::ConsentServiceClient;
use crate::proto::v1::record_service_client::RecordServiceClient;
use crate::proto::v1::{
    ConsentGiver, ConsentState, DisclosureBasis, GetRecordRequest, Purpose, RecordCategory,
    RecordConsentRequest, Sector, ShareRecordRequest, Subject,
};

/// The purpose every read of the mix gives.
pub const PURPOSE: Purpose = Purpose::Safeguarding;

/// A seeded record and what a read of it by school-oakfield must look like.
#[derive(Debug, Clone)]
pub struct SeededRecord {
    /// The gateway's id.
    pub id: String,
    /// The basis GetRecord must report.
    pub basis: DisclosureBasis,
}

/// What [`seed`] shared.
#[derive(Debug, Clone)]
pub struct Seeded {
    /// The children, as NHS numbers (ten digits).
    pub subjects: Vec<String>,
    /// The records, alternately health (basis CONSENT) and police (no consent
    /// needed).
    pub records: Vec<SeededRecord>,
    /// Their content size.
    pub content_bytes: usize,
}

/// The identities seeding needs, one channel each.
pub struct SeedChannels {
    /// As nhs-guys: shares A&E attendances and records consents.
    pub health: Channel,
    /// As police-met: shares police incidents.
    pub police: Channel,
    /// As school-oakfield: reads each record once to check it.
    pub school: Channel,
}

/// Shares `records` records of `content_bytes` bytes over `subjects` children,
/// records each child's consent, and reads every record once as the school.
pub async fn seed(
    ch: &SeedChannels,
    records: usize,
    subjects: usize,
    content_bytes: usize,
) -> anyhow::Result<Seeded> {
    let subjects = nhs_numbers(subjects.max(1));
    let mut health = RecordServiceClient::new(ch.health.clone());
    let mut police = RecordServiceClient::new(ch.police.clone());
    let mut consents = ConsentServiceClient::new(ch.health.clone());
    for nhs in &subjects {
        consents
            .record_consent(RecordConsentRequest {
                subject: subject(nhs),
                state: ConsentState::Given as i32,
                given_by: ConsentGiver::Parent as i32,
                purposes: vec![PURPOSE as i32],
                recipient_sectors: vec![Sector::Education as i32],
                recipient_agency_ids: vec![],
                categories: vec![RecordCategory::UnscheduledCareAttendance as i32],
                valid_until: None,
                note: "sgw bench: parental consent for the school to see A&E attendances".into(),
            })
            .await
            .context("seeding: RecordConsent as nhs-guys")?;
    }
    let content = vec![b'r'; content_bytes];
    let mut seeded = Vec::with_capacity(records);
    for i in 0..records.max(1) {
        let nhs = &subjects[i % subjects.len()];
        let (client, category, basis, who) = if i % 2 == 0 {
            (
                &mut health,
                RecordCategory::UnscheduledCareAttendance,
                DisclosureBasis::Consent,
                "nhs-guys",
            )
        } else {
            (
                &mut police,
                RecordCategory::PoliceIncident,
                DisclosureBasis::AgreementNoConsentNeeded,
                "police-met",
            )
        };
        let shared = client
            .share_record(ShareRecordRequest {
                subject: subject(nhs),
                category: category as i32,
                summary: format!("sgw bench record {i}"),
                content: content.clone(),
                media_type: "application/octet-stream".into(),
                retain_until: None,
            })
            .await
            .with_context(|| format!("seeding: ShareRecord as {who}"))?
            .into_inner()
            .record
            .context("seeding: ShareRecord answered without a record")?;
        seeded.push(SeededRecord {
            id: shared.record_id,
            basis,
        });
    }
    let mut school = RecordServiceClient::new(ch.school.clone());
    for r in &seeded {
        let got = school
            .get_record(GetRecordRequest {
                record_id: r.id.clone(),
                purpose: PURPOSE as i32,
                r#override: None,
            })
            .await
            .context("seeding: GetRecord as school-oakfield (are the dev agreements in force?)")?
            .into_inner();
        anyhow::ensure!(
            got.basis == r.basis as i32 && got.content.len() == content_bytes,
            "seeding: record {} disclosed on basis {} with {} bytes, expected {:?} and {content_bytes}",
            r.id,
            got.basis,
            got.content.len(),
            r.basis
        );
    }
    Ok(Seeded {
        subjects,
        records: seeded,
        content_bytes,
    })
}

/// A subject message for `nhs`.
pub fn subject(nhs: &str) -> Option<Subject> {
    Some(Subject {
        nhs_number: nhs.to_owned(),
    })
}

/// `n` valid NHS numbers: nine digits counting up from 943 476 591, each followed
/// by its modulus-11 check digit; bodies whose check digit would be 10 (no valid
/// number) are skipped.
pub fn nhs_numbers(n: usize) -> Vec<String> {
    (943_476_591u64..)
        .filter_map(|body| {
            let digits: Vec<u32> = format!("{body:09}")
                .bytes()
                .map(|b| u32::from(b - b'0'))
                .collect();
            let sum: u32 = digits.iter().zip((2..=10).rev()).map(|(d, w)| d * w).sum();
            let check = match 11 - sum % 11 {
                11 => 0,
                10 => return None,
                c => c,
            };
            Some(format!("{body:09}{check}"))
        })
        .take(n)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::NhsNumber;

    #[test]
    fn nhs_numbers_start_at_the_known_valid_one_and_all_parse() {
        let numbers = nhs_numbers(50);
        assert_eq!(numbers[0], "9434765919");
        assert_eq!(numbers.len(), 50);
        for n in &numbers {
            assert!(NhsNumber::parse(n).is_ok(), "{n}");
        }
        let mut unique = numbers.clone();
        unique.dedup();
        assert_eq!(unique.len(), numbers.len());
    }
}
