//! Pages of FindRecords and ListConsents. Both list what is about one child,
//! newest first, by time and then id. A token names where its page ended (the
//! last entry's time and id), not how many entries came before, so an entry added
//! between two pages makes the next page neither repeat nor skip another; one
//! newer than that position (as a new consent statement always is: see
//! [`crate::domain::consent::recording_time`]) is left for a new listing. A token
//! is bound to its query (the listing, the child and, for FindRecords, the
//! purpose) by a short hash, so another query's token is refused instead of being
//! read as a position in this one.

use base64::Engine;

use super::RecordError;

/// Room a page leaves in a message for its token and framing.
const PAGE_HEADROOM_BYTES: usize = 1024;

/// Which page of FindRecords or ListConsents to answer.
#[derive(Debug, Clone, Copy, Default)]
pub struct Page<'a> {
    /// The most entries to return; 0 for all of them in one answer.
    pub size: usize,
    /// Empty for the first page, else the previous page's `next_page_token`.
    pub token: &'a str,
}

/// Where a page of one query starts, and what its tokens are bound to.
pub(super) struct Paging {
    /// The listing's name, the first part of its tokens: `found`, `consents`.
    listing: &'static str,
    /// 16 hex digits of SHA-256 over the query.
    mark: String,
    /// The most entries in the page; 0 for all.
    size: usize,
    /// The position the token names (time in microseconds, id); `None` for the
    /// first page.
    after: Option<(i64, String)>,
}

impl Paging {
    /// The page `page` asks of `listing` for `query`. INVALID_ARGUMENT, before
    /// anything is read or audited, for a `page.size` above `max_page_size`, or a
    /// token of another query or not a token at all (`id_ok` checks its id).
    pub(super) fn start(
        listing: &'static str,
        query: &str,
        page: Page<'_>,
        max_page_size: usize,
        id_ok: fn(&str) -> bool,
    ) -> Result<Paging, RecordError> {
        if page.size > max_page_size {
            return Err(RecordError::Invalid(format!(
                "page_size {} is above the maximum of {max_page_size}",
                page.size
            )));
        }
        let digest = ring::digest::digest(&ring::digest::SHA256, query.as_bytes());
        let mut paging = Paging {
            listing,
            mark: crate::tls::hex(&digest.as_ref()[..8]),
            size: page.size,
            after: None,
        };
        paging.after = paging.position(page.token, id_ok)?;
        Ok(paging)
    }

    /// Sorts `listed` newest first by `key` (time in microseconds, id), keeps the
    /// entries after the token's position, and with a page size, at most that many:
    /// fewer if more would not fit in `max_message_bytes` (each entry counted by
    /// `bytes`), but always one if any are left. Returns the next page's token
    /// when entries are left out.
    pub(super) fn page_of<T>(
        &self,
        listed: &mut Vec<T>,
        max_message_bytes: usize,
        key: impl Fn(&T) -> (i64, &str),
        bytes: impl Fn(&T) -> usize,
    ) -> Option<String> {
        listed.sort_by(|a, b| key(b).cmp(&key(a)));
        if let Some((at, id)) = &self.after {
            listed.retain(|x| key(x) < (*at, id.as_str()));
        }
        if self.size == 0 {
            return None;
        }
        let budget = max_message_bytes.saturating_sub(PAGE_HEADROOM_BYTES);
        let (mut total, mut take) = (0, 0);
        for x in listed.iter().take(self.size) {
            total += bytes(x);
            if take > 0 && total > budget {
                break;
            }
            take += 1;
        }
        let next_page_token = (take < listed.len()).then(|| self.token(key(&listed[take - 1])));
        listed.truncate(take);
        next_page_token
    }

    /// Whether the caller asked for a page rather than the whole list.
    pub(super) fn is_paged(&self) -> bool {
        self.size > 0
    }

    /// The token of the page after the entry at `(at, id)`.
    fn token(&self, (at, id): (i64, &str)) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(format!("{}.{}.{at}.{id}", self.listing, self.mark))
    }

    /// The position `token` names, or `None` for the first page.
    fn position(
        &self,
        token: &str,
        id_ok: fn(&str) -> bool,
    ) -> Result<Option<(i64, String)>, RecordError> {
        if token.is_empty() {
            return Ok(None);
        }
        let bad = || RecordError::Invalid("page_token is not valid for this query".into());
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(token)
            .map_err(|_| bad())?;
        let text = String::from_utf8(bytes).map_err(|_| bad())?;
        let rest = text
            .strip_prefix(self.listing)
            .and_then(|r| r.strip_prefix('.'))
            .and_then(|r| r.strip_prefix(self.mark.as_str()))
            .and_then(|r| r.strip_prefix('.'))
            .ok_or_else(bad)?;
        let (at, id) = rest.split_once('.').ok_or_else(bad)?;
        let at = at
            .parse::<i64>()
            .ok()
            .filter(|n| n.to_string() == at)
            .ok_or_else(bad)?;
        if !id_ok(id) {
            return Err(bad());
        }
        Ok(Some((at, id.to_owned())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn paging(listing: &'static str, query: &str, size: usize, token: &str) -> Paging {
        Paging::start(listing, query, Page { size, token }, 1000, |id| {
            id.starts_with("x-")
        })
        .expect("a valid page")
    }

    /// (time, id, bytes) entries, in no particular order.
    fn entries() -> Vec<(i64, String, usize)> {
        [3, 1, 5, 2, 4]
            .into_iter()
            .map(|t| (t, format!("x-{t}"), 100))
            .collect()
    }

    fn page(p: &Paging, mut listed: Vec<(i64, String, usize)>) -> (Vec<i64>, Option<String>) {
        let next = p.page_of(&mut listed, 10_000, |e| (e.0, e.1.as_str()), |e| e.2);
        (listed.into_iter().map(|e| e.0).collect(), next)
    }

    #[test]
    fn pages_resume_after_the_last_entry_even_when_a_newer_one_arrives() {
        let (first, token) = page(&paging("found", "q", 2, ""), entries());
        assert_eq!(first, [5, 4]);
        let token = token.expect("more follow");
        let mut more = entries();
        more.push((6, "x-6".into(), 100));
        let (second, token) = page(&paging("found", "q", 2, &token), more);
        assert_eq!(second, [3, 2]);
        let (last, token) = page(
            &paging("found", "q", 2, &token.expect("one more")),
            entries(),
        );
        assert_eq!((last, token), (vec![1], None));
    }

    #[test]
    fn a_page_stops_early_to_fit_but_holds_at_least_one_entry() {
        let p = paging("consents", "q", 5, "");
        let mut listed = entries();
        let next = p.page_of(
            &mut listed,
            PAGE_HEADROOM_BYTES + 250,
            |e| (e.0, e.1.as_str()),
            |e| e.2,
        );
        assert_eq!(listed.len(), 2);
        assert!(next.is_some());
        let mut huge = vec![(1, "x-1".to_owned(), 1_000_000), (0, "x-0".into(), 1)];
        p.page_of(&mut huge, 10_000, |e| (e.0, e.1.as_str()), |e| e.2);
        assert_eq!(huge.len(), 1);
    }

    #[test]
    fn a_token_is_refused_by_another_query_another_listing_or_when_malformed() {
        let (_, token) = page(&paging("found", "q", 2, ""), entries());
        let token = token.expect("more follow");
        let refused = |listing, query: &str, token: &str| {
            let page = Page { size: 2, token };
            match Paging::start(listing, query, page, 1000, |id| id.starts_with("x-")) {
                Err(RecordError::Invalid(m)) => m == "page_token is not valid for this query",
                _ => false,
            }
        };
        assert!(refused("found", "other", &token));
        assert!(refused("consents", "q", &token));
        assert!(refused("found", "q", "not-a-token"));
        let forged = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(format!("found.{}.5.y-5", paging("found", "q", 2, "").mark));
        assert!(refused("found", "q", &forged));
        // A position is a number in its one spelling: no sign, no leading zeros.
        let mark = paging("found", "q", 2, "").mark;
        for at in ["+5", "05", " 5"] {
            let respelt = base64::engine::general_purpose::URL_SAFE_NO_PAD
                .encode(format!("found.{mark}.{at}.x-5"));
            assert!(refused("found", "q", &respelt), "{at}");
        }
        let canonical =
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("found.{mark}.5.x-5"));
        assert!(!refused("found", "q", &canonical));
        assert!(!refused("found", "q", &token));
    }

    #[test]
    fn a_page_size_above_the_maximum_is_invalid() {
        let page = Page {
            size: 1001,
            token: "",
        };
        assert!(matches!(
            Paging::start("found", "q", page, 1000, |_| true),
            Err(RecordError::Invalid(m)) if m == "page_size 1001 is above the maximum of 1000"
        ));
    }
}
