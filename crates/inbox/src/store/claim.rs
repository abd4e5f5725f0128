//! The claim, the heart of the guarantee: one statement that inserts the inbox row as
//! processed, or turns a failed row into a processed one, or returns nothing when the message was
//! processed already. Single and batched mode share its conflict clause and its `RETURNING`.

/// The status of an inbox row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Status {
    /// Committed with its handler's effect.
    Processed,
    /// The last attempt failed; the row records it.
    Failed,
}

impl Status {
    /// The value stored in `message_inbox.status`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Status::Processed => "processed",
            Status::Failed => "failed",
        }
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the claim does with an existing row: a processed one stays as it is (no row comes back:
/// a duplicate); any other becomes processed, one attempt more.
macro_rules! claim_on_conflict {
    () => {
        "ON CONFLICT (consumer_name, message_id) DO UPDATE \
         SET status = 'processed', attempts = message_inbox.attempts + 1, \
             processed_at = now(), error_code = NULL, error_message = NULL \
         WHERE message_inbox.status <> 'processed'"
    };
}

/// What a claimed row gives back. `set_config(.., true)` marks the claiming transaction
/// (transaction-local) for the verified commit in `tx.rs`, at no extra statement.
macro_rules! claim_returning {
    () => {
        "RETURNING message_id, attempts, \
         set_config('oncely.claim_open', '1', true) AS claim_open"
    };
}

/// The claim of a batch: every id in one statement, rows locked in id order so two batches
/// sharing ids wait for each other, never deadlock. Binds: `$1` consumer, `$2` ids (text[]).
pub(super) const BATCH_CLAIM: &str = concat!(
    "INSERT INTO message_inbox (consumer_name, message_id, status, attempts, processed_at) \
     SELECT $1, id, 'processed', 1, now() FROM unnest($2::text[]) AS id ORDER BY id ",
    claim_on_conflict!(),
    " ",
    claim_returning!()
);

/// The claim: one statement that inserts the row as processed, or turns a failed row into a
/// processed one, or returns nothing when the message was processed already.
///
/// A query type of its own rather than diesel's `insert_into(..).on_conflict(..).do_update()`:
/// diesel marks every `DO UPDATE` (and every `sql_query`) unsafe to cache, so that version was
/// prepared (one extra round trip) and planned again for every message. This one has a static
/// query id, so each connection prepares it once and then only binds and executes it.
#[derive(Debug, Clone, Copy)]
pub(super) struct Claim<'a> {
    pub(super) consumer: &'a str,
    pub(super) message_id: &'a str,
}

impl diesel::query_builder::QueryId for Claim<'_> {
    type QueryId = Claim<'static>;
    const HAS_STATIC_QUERY_ID: bool = true;
}

impl diesel::query_builder::Query for Claim<'_> {
    /// `RETURNING` of [`claim_returning!`]: message id, attempts, the claim-open marker.
    type SqlType = (
        diesel::sql_types::Text,
        diesel::sql_types::Integer,
        diesel::sql_types::Text,
    );
}

impl diesel::query_builder::QueryFragment<diesel::pg::Pg> for Claim<'_> {
    fn walk_ast<'b>(
        &'b self,
        mut out: diesel::query_builder::AstPass<'_, 'b, diesel::pg::Pg>,
    ) -> diesel::QueryResult<()> {
        use diesel::sql_types::Text;
        out.push_sql(
            "INSERT INTO message_inbox \
             (consumer_name, message_id, status, attempts, processed_at) VALUES (",
        );
        out.push_bind_param::<Text, _>(self.consumer)?;
        out.push_sql(", ");
        out.push_bind_param::<Text, _>(self.message_id)?;
        out.push_sql(concat!(
            ", 'processed', 1, now()) ",
            claim_on_conflict!(),
            " ",
            claim_returning!()
        ));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_are_stored_as_the_migration_allows() {
        let (sql, _) = crate::INBOX_SQL;
        for status in [Status::Processed, Status::Failed] {
            assert!(
                sql.contains(&format!("'{status}'")),
                "the table's check constraint names {status}"
            );
        }
    }

    #[test]
    fn single_and_batch_claims_share_the_conflict_clause() {
        let (conflict, returning): (&str, &str) = (claim_on_conflict!(), claim_returning!());
        assert!(BATCH_CLAIM.contains(conflict));
        assert!(BATCH_CLAIM.ends_with(returning));
    }
}
