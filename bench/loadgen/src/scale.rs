//! Cold VerifyKey against the size of the key table: fill `api_key` with filler rows straight
//! through SQL up to each size, then time the first verify of freshly issued real keys.

use std::time::{Duration, Instant};

use key_authority::pb::key_service_client::KeyServiceClient;
use key_authority::pb::verify_service_client::VerifyServiceClient;
use sqlx::postgres::PgPoolOptions;

use crate::client::{Net, Result};
use crate::cold;
use crate::report::TargetLine;
use crate::stats::{Failures, Summary, us};

/// The workspace of the filler rows; their key ids are `F` and 11 digits of a sequence number,
/// which no real (random) key id can collide with in practice and none of which can verify.
const FILLER_WORKSPACE: &str = "loadgen-filler";

/// Inserts filler rows `$1..=$2` in one statement.
const INSERT_FILLER: &str = "insert into api_key (key_id, workspace_id, name, description, \
     prefix, scopes, role, environment, secret_hash, metadata, create_time) \
     select id, $3, 'filler', '', 'ka_live_' || id, '[]', 'developer', 'live', \
     'filler: not an argon2 hash', '{}', $4 \
     from (select 'F' || lpad(n::text, 11, '0') as id \
           from generate_series($1::bigint, $2::bigint) as n) as ids";

pub struct SizeResult {
    /// Rows in `api_key` when the keys were issued.
    pub rows: i64,
    pub cold: Summary,
    pub failures: Failures,
}

pub struct ScaleReport {
    pub sizes: Vec<SizeResult>,
}

pub async fn run(
    net: &Net,
    target: &str,
    database_url: &str,
    sizes: &[u64],
    keys_per_size: usize,
) -> Result<ScaleReport> {
    let pool = PgPoolOptions::new()
        .max_connections(2)
        .acquire_timeout(Duration::from_secs(10))
        .connect(database_url)
        .await?;
    let channel = net.connect(target).await?;
    let mut manager = KeyServiceClient::new(channel.clone());
    let mut verifier = VerifyServiceClient::new(channel);

    // The target must use this database, or the filler rows would change nothing it reads.
    let probe = cold::issue_keys(net, &mut manager, 1, "loadgen scale probe").await?;
    let found: Option<i32> = sqlx::query_scalar("select 1 from api_key where key_id = $1")
        .bind(&probe[0].key_id)
        .fetch_optional(&pool)
        .await?;
    if found.is_none() {
        return Err(format!("{target} does not use the database {database_url}").into());
    }

    println!();
    println!(
        "## scale: first VerifyKey of {keys_per_size} freshly issued keys (sequential) by size \
         of the api_key table, target {target}"
    );
    println!();
    println!(
        "| size asked | rows in api_key | filler inserted | insert s | p50 µs | p99 µs | max µs | mean µs | failures |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    let mut results = Vec::new();
    for &size in sizes {
        let size_i64 = i64::try_from(size)?;
        let rows: i64 = sqlx::query_scalar("select count(*) from api_key")
            .fetch_one(&pool)
            .await?;
        let needed = size_i64 - rows;
        let started = Instant::now();
        let mut inserted = 0;
        if needed > 0 {
            let fillers: i64 =
                sqlx::query_scalar("select count(*) from api_key where workspace_id = $1")
                    .bind(FILLER_WORKSPACE)
                    .fetch_one(&pool)
                    .await?;
            let now_micros = i64::try_from(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)?
                    .as_micros(),
            )?;
            inserted = sqlx::query(INSERT_FILLER)
                .bind(fillers + 1)
                .bind(fillers + needed)
                .bind(FILLER_WORKSPACE)
                .bind(now_micros)
                .execute(&pool)
                .await?
                .rows_affected() as i64;
        } else if needed < 0 {
            println!(
                "NOTE: api_key already holds {rows} rows, more than {size}: measuring at {rows}."
            );
        }
        sqlx::query("analyze api_key").execute(&pool).await?;
        let insert_time = started.elapsed();
        let rows: i64 = sqlx::query_scalar("select count(*) from api_key")
            .fetch_one(&pool)
            .await?;

        let keys = cold::issue_keys(net, &mut manager, keys_per_size, "loadgen scale").await?;
        let (cold, failures) = cold::first_verifies(net, &mut verifier, &keys).await;
        println!(
            "| {size} | {rows} | {inserted} | {:.1} | {} | {} | {} | {} | {failures} |",
            insert_time.as_secs_f64(),
            us(cold.p50_us),
            us(cold.p99_us),
            us(cold.max_us),
            us(cold.mean_us),
        );
        results.push(SizeResult {
            rows,
            cold,
            failures,
        });
    }
    pool.close().await;
    let report = ScaleReport { sizes: results };
    if let (Some(first), Some(last)) = (report.sizes.first(), report.sizes.last()) {
        println!();
        println!(
            "difference {} rows − {} rows: p50 {} µs, p99 {} µs, mean {} µs",
            last.rows,
            first.rows,
            us(last.cold.p50_us - first.cold.p50_us),
            us(last.cold.p99_us - first.cold.p99_us),
            us(last.cold.mean_us - first.cold.mean_us),
        );
    }
    Ok(report)
}

impl ScaleReport {
    pub fn targets(&self) -> Vec<TargetLine> {
        const TARGET: &str = "cold verify at the largest size within 1 ms of the smallest";
        let (Some(first), Some(last)) = (self.sizes.first(), self.sizes.last()) else {
            return vec![TargetLine::not_measured(TARGET, "no sizes measured")];
        };
        let mut lines = Vec::new();
        let failures: u64 = self.sizes.iter().map(|s| s.failures.total()).sum();
        if failures > 0 {
            lines.push(TargetLine::not_measured(
                "every scale answer VALID",
                &format!("{failures} failures"),
            ));
        }
        for (label, small, large) in [
            ("p50", first.cold.p50_us, last.cold.p50_us),
            ("p99", first.cold.p99_us, last.cold.p99_us),
        ] {
            let difference = (large - small) / 1000.0;
            lines.push(TargetLine::at_most(
                &format!(
                    "cold verify {label} at {} rows within 1 ms of {} rows",
                    last.rows, first.rows
                ),
                difference,
                1.0,
                "ms",
                format!("{} − {} µs", us(large), us(small)),
            ));
        }
        lines
    }
}
