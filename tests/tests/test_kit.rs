//! The test kit: a schema with the service's migrations in one call, and a clear error when the
//! database is not there.

use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use oncely::testing::{TestSchema, TestSchemaError};

#[tokio::test]
async fn a_test_schema_takes_the_inbox_and_outbox_migrations_in_one_call() {
    let schema =
        TestSchema::with_migrations([oncely::INBOX_MIGRATIONS, oncely::outbox::OUTBOX_MIGRATIONS])
            .await
            .expect("schema with migrations");
    let mut conn = AsyncPgConnection::establish(schema.url())
        .await
        .expect("connect");
    for table in ["message_inbox", "outbox_message"] {
        diesel::sql_query(format!("SELECT 1 FROM {table} LIMIT 1"))
            .execute(&mut conn)
            .await
            .unwrap_or_else(|e| panic!("{table} in the test schema: {e}"));
    }
}

#[tokio::test]
async fn a_missing_database_is_a_connection_error_naming_it_without_the_password() {
    let url = "postgres://postgres:hunter2@127.0.0.1:5432/oncely_no_such_database";
    let error = TestSchema::create_in(url)
        .await
        .expect_err("no such database");
    assert!(
        matches!(error, TestSchemaError::Connect { .. }),
        "{error:?}"
    );
    let text = error.to_string();
    assert!(text.contains("oncely_no_such_database"), "{text}");
    assert!(text.contains("DATABASE_URL"), "says what to set: {text}");
    assert!(!text.contains("hunter2"), "no password: {text}");
    assert!(
        !format!("{error:?}").contains("hunter2"),
        "no password in Debug"
    );
}
