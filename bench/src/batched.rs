//! The batched section: the PostgreSQL ceiling with 100 messages per transaction (multi-row
//! statements) and oncely's batched mode against it, at each number of clients.

use crate::report::{Report, Row};
use crate::support::{billing_schema, counted, rate};
use crate::{Args, ceiling, single};
use lapin::Connection;
use oncely::testing::unique_name;

/// The batched section's rows.
pub async fn section(
    args: &Args,
    connection: &Connection,
    report: &mut Report,
) -> anyhow::Result<()> {
    const PER_TRANSACTION: usize = 100;
    for &clients in &args.batch_clients {
        let schema = billing_schema().await?;
        let prefix = unique_name("bench_pgb");
        let elapsed = ceiling::batched(
            schema.url(),
            clients,
            args.batch_count,
            PER_TRANSACTION,
            &prefix,
        )
        .await?;
        let invoices = ceiling::count_invoices(schema.url(), &prefix).await?;
        anyhow::ensure!(
            invoices as usize == args.batch_count,
            "batched ceiling made {invoices} invoices"
        );
        report.push(
            Row::new(
                format!("pg_batch{PER_TRANSACTION}_c{clients}"),
                "PostgreSQL ceiling",
                format!(
                    "{PER_TRANSACTION} messages per transaction, {}",
                    counted(clients, "client", "clients")
                ),
                rate(args.batch_count, elapsed),
                "msgs/s",
            )
            .note("multi-row claim and insert (unnest)"),
        );
    }
    // oncely in batched mode: the billing consumer, PER_TRANSACTION deliveries per transaction,
    // `clients` batches at once, against the batched ceiling with as many clients.
    for &clients in &args.batch_clients {
        let drained = single::drain(
            connection,
            args,
            clients,
            args.batch_count,
            Some(PER_TRANSACTION),
        )
        .await?;
        let value = rate(drained.count, drained.elapsed);
        let versus_single = report
            .value("oncely_single_c16")
            .map(|single| format!("; {:.1}x single mode at concurrency 16", value / single))
            .unwrap_or_default();
        report.push(
            Row::new(
                format!("oncely_batched_c{clients}"),
                "oncely",
                format!(
                    "batched mode, {PER_TRANSACTION} per transaction, {} at once",
                    counted(clients, "batch", "batches")
                ),
                value,
                "msgs/s",
            )
            .against(format!("pg_batch{PER_TRANSACTION}_c{clients}"))
            .also_against("broker_ack_multiple")
            .note(format!(
                "billing::create_invoice, one claim statement and a savepoint per message; {}{versus_single}",
                drained.cpu.describe()
            )),
        );
    }
    Ok(())
}
