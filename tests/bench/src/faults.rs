//! `berth bench faults`: the fault matrix ([`bootstrap::faults`]) `rounds` times over `sessions`
//! concurrent sessions on one deployment of separate `berth` processes, with the counts and the
//! freeze cost (`stopping` → `saving` in each session's audit trail).

use std::time::Duration;

use bootstrap::faults::{run_case, Case, Component, Deployment, HarnessConfig, Tally};

use crate::stats::{milliseconds, percentile};

/// `berth bench faults`: the whole matrix `rounds` times over `sessions` concurrent sessions on one
/// deployment. Prints the counts and the freeze cost; `Ok(false)` when anything was lost,
/// overwritten or stranded, or a case went wrong.
pub async fn bench(rounds: usize, sessions: usize) -> anyhow::Result<bool> {
    let binary = std::env::current_exe()?;
    let patterns_dir = std::fs::canonicalize(protocol::profile::patterns_dir())?;
    let config = HarnessConfig::local(binary, patterns_dir);
    let mut deployment = Deployment::start(&config).await?;
    eprintln!("deployment {} up (root {})", deployment.id, deployment.root.display());
    let mut total = Tally::default();
    // The freeze of sessions that closed while Docker was away includes the outage.
    let mut freeze_without_docker_outage = Vec::new();
    let mut failures = Vec::new();
    for round in 1..=rounds.max(1) {
        for case in Case::ALL {
            let started = std::time::Instant::now();
            match run_case(&mut deployment, case, sessions).await {
                Ok(tally) => {
                    eprintln!("round {round} {:<32} {:>6.1} s  {}", case.name(), started.elapsed().as_secs_f64(), tally.summary());
                    eprint!("{}", tally.findings());
                    if case != Case::RedisRestartAndDockerOutage {
                        freeze_without_docker_outage.extend(tally.freeze.iter().copied());
                    }
                    total.merge(tally);
                }
                Err(error) => {
                    eprintln!("round {round} {:<32} FAILED: {error:#}", case.name());
                    failures.push(format!("round {round} {}: {error:#}", case.name()));
                    // Bring back whatever the case left down, so the next one starts whole.
                    let _ = deployment.restore_store();
                    let _ = deployment.restore_docker();
                    for component in Component::ALL {
                        let _ = deployment.start_component(component);
                    }
                }
            }
        }
    }
    deployment.teardown().await;
    println!("{}", total.summary());
    println!("{}", freeze_line(&total.freeze));
    println!("{} (all but the sessions closed during the Docker outage)", freeze_line(&freeze_without_docker_outage));
    for failure in &failures {
        println!("case failed: {failure}");
    }
    Ok(total.is_clean() && failures.is_empty())
}

/// `freeze (stopping → saving): p50 … ms, p99 … ms over N sessions`
pub fn freeze_line(samples: &[Duration]) -> String {
    if samples.is_empty() {
        return "freeze (stopping → saving): no ended sessions".to_owned();
    }
    format!(
        "freeze (stopping → saving): p50 {:.1} ms, p99 {:.1} ms over {} sessions",
        milliseconds(percentile(samples, 0.5)),
        milliseconds(percentile(samples, 0.99)),
        samples.len()
    )
}
