//! Envoy ext_authz `Authorization/Check` against VerifyKey for the same warm key, in alternating
//! phases on the same connections: what the gateway translation costs over the hot path.

use std::sync::Arc;

use envoy_types::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Request};
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use envoy_types::pb::envoy::service::auth::v3::{AttributeContext, CheckRequest};
use key_authority::pb;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::Channel;

use crate::client::{self, Net, Result, VerifyProbe};
use crate::driver::{self, Probe};
use crate::stats::{Failure, Summary, ratio, us};
use crate::warm::LoopSettings;

/// One Check of the warm key, as Envoy's filter sends it for `GET /v1/orders`; must be allowed.
pub struct CheckProbe {
    client: AuthorizationClient<Channel>,
    request: CheckRequest,
    auth: Option<MetadataValue<Ascii>>,
}

impl CheckProbe {
    fn new(net: &Net, channel: Channel, key: &str) -> Self {
        let headers = [
            ("authorization", format!("Bearer {key}")),
            (":authority", "api.example.com".to_owned()),
            ("user-agent", "loadgen".to_owned()),
            ("accept", "*/*".to_owned()),
        ]
        .into_iter()
        .map(|(name, value)| (name.to_owned(), value))
        .collect();
        let request = CheckRequest {
            attributes: Some(AttributeContext {
                request: Some(Request {
                    http: Some(HttpRequest {
                        method: "GET".into(),
                        path: "/v1/orders".into(),
                        headers,
                        ..HttpRequest::default()
                    }),
                    ..Request::default()
                }),
                ..AttributeContext::default()
            }),
        };
        Self {
            client: AuthorizationClient::new(channel),
            request,
            auth: net.verify_auth.clone(),
        }
    }
}

impl Probe for CheckProbe {
    async fn call(&mut self) -> std::result::Result<&'static str, Failure> {
        let mut request = tonic::Request::new(self.request.clone());
        if let Some(auth) = &self.auth {
            request.metadata_mut().insert("authorization", auth.clone());
        }
        let response = self
            .client
            .check(request)
            .await
            .map_err(|status| Failure::rpc(&status))?
            .into_inner();
        match response.status.map(|status| status.code) {
            Some(0) => Ok("OK"),
            other => Err(Failure::new("denied", format!("{other:?}"))),
        }
    }
}

pub async fn run(
    net: &Net,
    target: &str,
    concurrency: &[usize],
    loops: &LoopSettings,
) -> Result<()> {
    let channel = net.connect(target).await?;
    let key = client::issue_warm_key(net, channel, "loadgen ext_authz").await?;
    let secret: Arc<str> = Arc::from(key.secret.as_str());

    println!();
    println!(
        "## ext_authz: Envoy Authorization/Check vs VerifyKey of one warm key, target {target}, \
         {} s per phase after {} s warm-up, {} alternating pairs per level",
        loops.duration.as_secs_f64(),
        loops.warmup.as_secs_f64(),
        loops.pairs,
    );
    println!();
    println!("| c | pair | RPC | RPS | p50 µs | p99 µs | p99.9 µs | failures |");
    println!("|---|---|---|---|---|---|---|---|");
    let mut ratios = Vec::new();
    for &c in concurrency {
        let channels = net.connect_for_loops(target, c).await?;
        let mut level = Vec::new();
        for pair in 1..=loops.pairs.max(1) {
            let probes = (0..c)
                .map(|i| {
                    VerifyProbe::new(
                        net,
                        channels[i % channels.len()].clone(),
                        secret.clone(),
                        pb::VerifyCode::Valid,
                    )
                })
                .collect();
            let verify = driver::run_loops(probes, loops.window()).await;
            let verify_summary = verify.summary();
            print_row(c, pair, "VerifyKey", &verify_summary, &verify.failures);
            let probes = (0..c)
                .map(|i| CheckProbe::new(net, channels[i % channels.len()].clone(), &secret))
                .collect();
            let check = driver::run_loops(probes, loops.window()).await;
            let check_summary = check.summary();
            print_row(c, pair, "Check", &check_summary, &check.failures);
            level.push((
                ratio(check_summary.rps, verify_summary.rps),
                ratio(check_summary.p50_us, verify_summary.p50_us),
                ratio(check_summary.p99_us, verify_summary.p99_us),
            ));
        }
        ratios.push((c, level));
    }
    println!();
    println!("Medians over the pairs of each level:");
    println!();
    println!(
        "| c | Check RPS / VerifyKey RPS | Check p50 / VerifyKey p50 | Check p99 / VerifyKey p99 |"
    );
    println!("|---|---|---|---|");
    for (c, level) in ratios {
        let median = |pick: fn(&(f64, f64, f64)) -> f64| {
            let mut values: Vec<f64> = level.iter().map(pick).collect();
            values.sort_by(f64::total_cmp);
            values[(values.len() - 1) / 2]
        };
        println!(
            "| {c} | {:.3} | {:.3} | {:.3} |",
            median(|r| r.0),
            median(|r| r.1),
            median(|r| r.2)
        );
    }
    Ok(())
}

fn print_row(c: usize, pair: u32, rpc: &str, summary: &Summary, failures: &impl std::fmt::Display) {
    println!(
        "| {c} | {pair} | {rpc} | {:.0} | {} | {} | {} | {failures} |",
        summary.rps,
        us(summary.p50_us),
        us(summary.p99_us),
        us(summary.p999_us),
    );
}
