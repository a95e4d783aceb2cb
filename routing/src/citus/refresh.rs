//! Keeps the Citus snapshot current: one control connection to the
//! coordinator (the topology's primary), a full load at start and after
//! every topology change, and a cheap fingerprint check every
//! `refresh_interval` (Citus sends no notification of its own).

use super::{metadata, Citus};
use crate::confirm::{connect_as, CheckLogin};
use crate::Router;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

/// Every step has a client-side timeout: a stuck coordinator must not stop
/// the refreshes from noticing a new one.
const STEP_TIMEOUT: Duration = Duration::from_secs(5);

/// Runs forever. `changed` is called after each new snapshot (the proxy
/// retires pools of nodes that left).
pub async fn run(citus: Arc<Citus>, router: Router, login: CheckLogin, interval: Duration, changed: impl Fn() + Send) {
    let mut topology = router.subscribe();
    let mut generation = 0u64;
    loop {
        let Some(primary) = router.topology().primary.clone() else {
            // No coordinator (failover): wait for one.
            let _ = topology.changed().await;
            continue;
        };
        let addr = primary.addr.clone();
        let client = match tokio::time::timeout(STEP_TIMEOUT, connect_as(&addr, &login, "pgferry citus metadata")).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                fail(&citus, format!("connect to the coordinator {addr}: {e}"));
                let _ = tokio::time::timeout(Duration::from_secs(1), topology.changed()).await;
                continue;
            }
            Err(_) => {
                fail(&citus, format!("connect to the coordinator {addr}: timed out"));
                continue;
            }
        };
        let mut client = client;
        let mut fingerprint = String::new();
        let mut full = true;
        topology.borrow_and_update();
        loop {
            let step = async {
                if full {
                    generation += 1;
                    let snap = metadata::load(&mut client, generation).await?;
                    Ok::<_, metadata::LoadError>(Some(snap))
                } else {
                    let fp = metadata::fingerprint(&client).await?;
                    if fp == fingerprint {
                        Ok(None)
                    } else {
                        generation += 1;
                        Ok(Some(metadata::load(&mut client, generation).await?))
                    }
                }
            };
            match tokio::time::timeout(STEP_TIMEOUT, step).await {
                Ok(Ok(Some(snap))) => {
                    fingerprint = snap.fingerprint.clone();
                    tracing::info!(
                        coordinator = %addr,
                        tables = snap.tables.len(),
                        groups = snap.group_primaries().len(),
                        generation,
                        "citus: metadata loaded"
                    );
                    citus.install(snap);
                    citus.counters.refreshes.fetch_add(1, Relaxed);
                    *citus.last_error.lock().unwrap() = None;
                    changed();
                }
                Ok(Ok(None)) => {
                    citus.counters.checks.fetch_add(1, Relaxed);
                }
                Ok(Err(metadata::LoadError::NoCitus)) => {
                    fail(&citus, format!("Citus is not installed in database {:?} on {addr}", login.dbname));
                    tokio::time::sleep(interval.max(Duration::from_secs(10))).await;
                    break;
                }
                Ok(Err(e)) => {
                    fail(&citus, format!("reading metadata on {addr}: {e}"));
                    break;
                }
                Err(_) => {
                    fail(&citus, format!("reading metadata on {addr}: timed out"));
                    break;
                }
            }
            full = false;
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = citus.refresh_now.notified() => {}
                r = topology.changed() => {
                    if r.is_err() {
                        return;
                    }
                    // A new coordinator: reconnect there; any change: reload
                    // all (a worker failover changes pg_dist_node).
                    if router.topology().primary.as_ref().map(|p| p.addr.clone()) != Some(addr.clone()) {
                        break;
                    }
                    full = true;
                }
            }
        }
    }
}

fn fail(citus: &Citus, e: String) {
    citus.counters.refresh_errors.fetch_add(1, Relaxed);
    let mut last = citus.last_error.lock().unwrap();
    if last.as_deref() != Some(e.as_str()) {
        tracing::warn!(error = %e, "citus: metadata refresh failed; routing keeps the last snapshot");
    }
    *last = Some(e);
}
