//! The operator's payout duties besides receipts: closing periods on schedule, signing a
//! checkpoint whenever the ledger's tail has waited long enough, and mirroring statements.
//!
//! A killed operator leaves at most one `checkpoint_every` of entries unsigned (`ledger verify`
//! refuses an unsigned tail unless told to accept it); a stopped one leaves none (see `main`).

pub mod mirror;
pub mod webhook;

use std::sync::Arc;
use std::time::Duration;

use kube::Api;
use tracing::{debug, info, warn};

use crate::crd::PayoutStatement;
use crate::ledger::Ledger;

/// What the payout loops do and how often.
#[derive(Debug, Clone)]
pub struct PayoutConfig {
    /// Close a period this often (None: only by `payout close`).
    pub close_every: Option<Duration>,
    /// Sign a checkpoint this often when entries follow the last one.
    pub checkpoint_every: Duration,
    /// Mirror statements into PayoutStatements (and retry webhook deliveries) this often.
    pub mirror_every: Duration,
    /// POST each closed statement here.
    pub webhook_url: Option<String>,
}

/// Runs the payout loops until the process ends.
pub async fn run(client: kube::Client, ledger: Arc<Ledger>, config: PayoutConfig) {
    let close = async {
        let Some(every) = config.close_every else { return std::future::pending().await };
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        loop {
            tick.tick().await;
            match ledger.close_period().await {
                Ok(closed) => info!(statements = closed.len(), "payout period closed"),
                Err(e) => warn!(error = %e, "cannot close the payout period; retrying at the next interval"),
            }
        }
    };
    let checkpoints = async {
        let mut tick = tokio::time::interval(config.checkpoint_every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            // A checkpoint at a head that is one already appends nothing (and costs no write).
            if let Err(e) = ledger.checkpoint().await {
                debug!(error = %e, "cannot sign a timed ledger checkpoint");
            }
        }
    };
    let mirror = async {
        let api: Api<PayoutStatement> = Api::all(client);
        let mut tick = tokio::time::interval(config.mirror_every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if let Err(e) = mirror::sync(&api, &ledger, config.webhook_url.as_deref()).await {
                warn!(error = %e, "cannot mirror payout statements; retrying");
            }
        }
    };
    tokio::join!(close, checkpoints, mirror);
}
