//! Egress rules: a session container reaches neither the host (the bridge gateway or any other
//! host address, on any port), nor link-local and metadata addresses, nor private ranges, unless
//! the profile allow-lists the destination (`container.egress_allow`).
//!
//! Docker's own firewall is the mechanism: iptables rules, per session network (bridge
//! interface), in two chains this agent owns:
//!
//! - `BERTH-E-<network id>`, jumped to from `DOCKER-USER` (Docker's chain for user rules, consulted
//!   first for every forwarded packet) for packets coming *in* from the bridge: what a container
//!   sends to another machine. Private, link-local and special ranges are rejected.
//! - `BERTH-H-<network id>`, jumped to from `INPUT` for packets from the bridge addressed to the
//!   host itself (the gateway or any other local address: they never pass `FORWARD`). All new
//!   connections are rejected.
//!
//! Both chains first let established and related packets through, so replies keep flowing: the
//! published port (Docker's proxy on `127.0.0.1` connects from the host to the container) and the
//! readiness probe still work. Rejections are `icmp-admin-prohibited`, so a refused connection
//! fails at once and each chain's counters show it. The rules are idempotent: chains are written
//! in one `iptables-restore --noflush` transaction only when their content differs, and the jumps
//! are checked before they are inserted (each labelled with a comment naming the network).

use std::process::Command;

use protocol::profile::{parse_ipv4_cidr, EgressAllow};

/// Ranges a session may not reach unless allow-listed (IPv4: session networks have no IPv6).
/// RFC 1918, carrier-grade NAT, link-local (cloud metadata at 169.254.169.254), loopback,
/// "this network", IETF protocol assignments, benchmarking, multicast and reserved.
pub const REFUSED_RANGES: [&str; 11] = [
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.0.0.0/24",
    "192.168.0.0/16",
    "198.18.0.0/15",
    "224.0.0.0/4",
    "240.0.0.0/4",
];

/// Docker's chain for rules of its users; every forwarded packet passes it first.
pub const DOCKER_USER_CHAIN: &str = "DOCKER-USER";
const INPUT_CHAIN: &str = "INPUT";
const REJECT: [&str; 4] = ["-j", "REJECT", "--reject-with", "icmp-admin-prohibited"];

/// The rules of one session network, computed from Docker's view of it and the profile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EgressPlan {
    /// The network's name, written into every rule's comment.
    pub network: String,
    /// The Linux bridge interface of the network (`br-<id prefix>` unless named explicitly).
    pub bridge: String,
    /// Forward chain: what containers send to other machines.
    pub egress_chain: String,
    /// Input chain: what containers send to the host itself.
    pub host_chain: String,
    pub allow: Vec<EgressAllow>,
}

impl EgressPlan {
    /// The plan for a network with this Docker id and bridge interface.
    pub fn new(network: &str, network_id: &str, bridge: &str, allow: &[EgressAllow]) -> EgressPlan {
        let short_id: String = network_id.chars().take(12).collect();
        EgressPlan {
            network: network.to_owned(),
            bridge: bridge.to_owned(),
            egress_chain: format!("BERTH-E-{short_id}"),
            host_chain: format!("BERTH-H-{short_id}"),
            allow: allow.to_vec(),
        }
    }

    fn comment(&self, what: &str) -> String {
        format!("berth {what} {}", self.network)
    }

    /// The jump into the egress chain from `DOCKER-USER`, as `iptables` arguments after the chain.
    pub fn egress_jump(&self) -> Vec<String> {
        jump(&self.bridge, &self.comment("egress"), &self.egress_chain)
    }

    /// The jump into the host chain from `INPUT`.
    pub fn host_jump(&self) -> Vec<String> {
        jump(&self.bridge, &self.comment("host"), &self.host_chain)
    }

    /// The allow-list as rule arguments (a port covers TCP and UDP).
    fn allow_rules(&self) -> Vec<Vec<String>> {
        let mut rules = Vec::new();
        for allowed in &self.allow {
            let Ok((address, length)) = parse_ipv4_cidr(&allowed.cidr) else { continue };
            let destination = format!("{address}/{length}");
            match allowed.port {
                Some(port) => {
                    for protocol in ["tcp", "udp"] {
                        rules.push(words(&[
                            "-d",
                            &destination,
                            "-p",
                            protocol,
                            "-m",
                            protocol,
                            "--dport",
                            &port.to_string(),
                            "-j",
                            "RETURN",
                        ]));
                    }
                }
                None => rules.push(words(&["-d", &destination, "-j", "RETURN"])),
            }
        }
        rules
    }

    /// The egress chain's rules, in `iptables -S <chain>` form (what the kernel reports back).
    pub fn egress_rules(&self) -> Vec<String> {
        let mut rules = vec![established(&self.egress_chain)];
        rules.extend(self.allow_rules().into_iter().map(|rule| append(&self.egress_chain, &rule)));
        for range in REFUSED_RANGES {
            let mut rule = words(&["-d", range]);
            rule.extend(words(&REJECT));
            rules.push(append(&self.egress_chain, &rule));
        }
        rules
    }

    /// The host chain's rules: every new connection to the host is refused.
    pub fn host_rules(&self) -> Vec<String> {
        let mut rules = vec![established(&self.host_chain)];
        rules.extend(self.allow_rules().into_iter().map(|rule| append(&self.host_chain, &rule)));
        rules.push(append(&self.host_chain, &words(&REJECT)));
        rules
    }

    /// The `iptables-restore --noflush` input that (re)writes both chains in one transaction.
    pub fn restore_input(&self) -> String {
        let mut text = String::from("*filter\n");
        text.push_str(&format!(":{} - [0:0]\n:{} - [0:0]\n", self.egress_chain, self.host_chain));
        for rule in self.egress_rules().into_iter().chain(self.host_rules()) {
            text.push_str(&rule);
            text.push('\n');
        }
        text.push_str("COMMIT\n");
        text
    }
}

fn words(parts: &[&str]) -> Vec<String> {
    parts.iter().map(|part| (*part).to_owned()).collect()
}

fn jump(bridge: &str, comment: &str, chain: &str) -> Vec<String> {
    words(&["-i", bridge, "-m", "comment", "--comment", comment, "-j", chain])
}

fn established(chain: &str) -> String {
    format!("-A {chain} -m conntrack --ctstate RELATED,ESTABLISHED -j RETURN")
}

fn append(chain: &str, rule: &[String]) -> String {
    format!("-A {chain} {}", rule.join(" "))
}

/// What `iptables -S` prints for a comment: quoted when it has spaces.
fn normalise_listing(line: &str) -> String {
    line.replace('"', "")
}

fn iptables(arguments: &[String]) -> Result<String, String> {
    let output = Command::new("iptables")
        .arg("-w")
        .arg("5")
        .args(arguments)
        .output()
        .map_err(|error| format!("cannot run iptables ({error}): the container agent manages the session network's egress rules and needs iptables and CAP_NET_ADMIN on the host"))?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(format!("iptables {}: {}", arguments.join(" "), String::from_utf8_lossy(&output.stderr).trim()))
    }
}

fn chain_listing(chain: &str) -> Option<Vec<String>> {
    let listed = iptables(&words(&["-S", chain])).ok()?;
    Some(listed.lines().filter(|line| line.starts_with("-A ")).map(normalise_listing).collect())
}

fn ensure_jump(parent: &str, rule: &[String]) -> Result<(), String> {
    let mut check = words(&["-C", parent]);
    check.extend(rule.iter().cloned());
    if iptables(&check).is_ok() {
        return Ok(());
    }
    let mut insert = words(&["-I", parent, "1"]);
    insert.extend(rule.iter().cloned());
    iptables(&insert).map(|_| ())
}

fn remove_jump(parent: &str, rule: &[String]) {
    // Two replicas racing on the check may have inserted it twice: delete until it is gone.
    for _ in 0..8 {
        let mut delete = words(&["-D", parent]);
        delete.extend(rule.iter().cloned());
        if iptables(&delete).is_err() {
            break;
        }
    }
}

/// Installs the plan's chains and jumps, touching nothing that is already right (blocking: run it
/// on a blocking thread). Returns whether anything had to change.
pub fn apply_blocking(plan: &EgressPlan) -> Result<bool, String> {
    let mut changed = false;
    let wanted_egress = plan.egress_rules();
    let wanted_host = plan.host_rules();
    let current_egress = chain_listing(&plan.egress_chain);
    let current_host = chain_listing(&plan.host_chain);
    if current_egress.as_ref() != Some(&wanted_egress) || current_host.as_ref() != Some(&wanted_host) {
        restore(&plan.restore_input())?;
        changed = true;
    }
    // Chains first, then the jumps into them: there is never a jump to a missing or empty chain.
    for (parent, rule) in [(DOCKER_USER_CHAIN, plan.egress_jump()), (INPUT_CHAIN, plan.host_jump())] {
        let mut check = words(&["-C", parent]);
        check.extend(rule.iter().cloned());
        if iptables(&check).is_err() {
            ensure_jump(parent, &rule)?;
            changed = true;
        }
    }
    Ok(changed)
}

fn restore(input: &str) -> Result<(), String> {
    use std::io::Write;
    let mut child = Command::new("iptables-restore")
        .args(["-w", "5", "--noflush"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|error| {
            format!("cannot run iptables-restore ({error}): the container agent needs iptables and CAP_NET_ADMIN on the host")
        })?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(input.as_bytes()).map_err(|error| format!("iptables-restore: {error}"))?;
    }
    let output = child.wait_with_output().map_err(|error| format!("iptables-restore: {error}"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!("iptables-restore: {}", String::from_utf8_lossy(&output.stderr).trim()))
    }
}

/// Removes the plan's jumps and chains (blocking). Missing pieces are fine.
pub fn remove_blocking(plan: &EgressPlan) {
    remove_jump(DOCKER_USER_CHAIN, &plan.egress_jump());
    remove_jump(INPUT_CHAIN, &plan.host_jump());
    for chain in [&plan.egress_chain, &plan.host_chain] {
        let _ = iptables(&words(&["-F", chain]));
        let _ = iptables(&words(&["-X", chain]));
    }
}

/// Removes every Berth egress rule of the network with this Docker id, found by chain name
/// (blocking; for cleanup when the network goes, including by tests).
pub fn remove_for_network_blocking(network_id: &str) {
    let short_id: String = network_id.chars().take(12).collect();
    let chains = [format!("BERTH-E-{short_id}"), format!("BERTH-H-{short_id}")];
    for parent in [DOCKER_USER_CHAIN, INPUT_CHAIN] {
        let Some(listing) = iptables(&words(&["-S", parent])).ok() else { continue };
        for line in listing.lines() {
            if chains.iter().any(|chain| line.ends_with(&format!("-j {chain}"))) {
                if let Some(rule) = line.strip_prefix("-A ") {
                    let arguments: Vec<String> = shell_words(rule);
                    let mut delete = vec!["-D".to_owned()];
                    delete.extend(arguments);
                    let _ = iptables(&delete);
                }
            }
        }
    }
    for chain in &chains {
        let _ = iptables(&words(&["-F", chain]));
        let _ = iptables(&words(&["-X", chain]));
    }
}

/// The network id prefixes of every Berth egress chain in the firewall (any deployment's).
pub fn chain_network_ids_blocking() -> Vec<String> {
    let Ok(listing) = iptables(&words(&["-S"])) else { return Vec::new() };
    let mut ids: Vec<String> = listing
        .lines()
        .filter_map(|line| line.strip_prefix("-N BERTH-E-").or_else(|| line.strip_prefix("-N BERTH-H-")))
        .map(str::to_owned)
        .collect();
    ids.sort();
    ids.dedup();
    ids
}

/// Whether the egress chains of the network with this id prefix still guard a bridge that exists
/// on this machine (blocking). Several Docker engines on one machine (one per host id) share the
/// firewall: a chain whose network another engine owns is not stale just because this engine
/// does not know the network, and its bridge interface tells.
pub fn chain_bridge_exists_blocking(short_id: &str) -> bool {
    let Ok(listing) = iptables(&words(&["-S", DOCKER_USER_CHAIN])) else { return false };
    let target = format!("-j BERTH-E-{short_id}");
    listing.lines().filter(|line| line.ends_with(&target)).any(|line| {
        let arguments = shell_words(line.strip_prefix("-A ").unwrap_or(line));
        let bridge = arguments.iter().position(|argument| argument == "-i").and_then(|index| arguments.get(index + 1));
        bridge.is_some_and(|bridge| !bridge.contains('/') && std::path::Path::new("/sys/class/net").join(bridge).exists())
    })
}

/// Splits an `iptables -S` line into arguments (comments are double-quoted there).
fn shell_words(line: &str) -> Vec<String> {
    let mut arguments = Vec::new();
    let mut current = String::new();
    let mut quoted = false;
    for character in line.chars() {
        match character {
            '"' => quoted = !quoted,
            ' ' if !quoted => {
                if !current.is_empty() {
                    arguments.push(std::mem::take(&mut current));
                }
            }
            other => current.push(other),
        }
    }
    if !current.is_empty() {
        arguments.push(current);
    }
    arguments
}

/// Packet counts of the rules of `chain` that mention `destination` (from `iptables -v -x -n -L`).
pub fn rule_packets_blocking(chain: &str, destination: &str) -> Option<u64> {
    let listing = iptables(&words(&["-v", "-x", "-n", "-L", chain])).ok()?;
    let total = listing
        .lines()
        .skip(2)
        .filter(|line| line.split_whitespace().any(|word| word == destination))
        .filter_map(|line| line.split_whitespace().next()?.parse::<u64>().ok())
        .sum();
    Some(total)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a clear test failure
mod tests {
    use super::*;

    fn plan(allow: Vec<EgressAllow>) -> EgressPlan {
        EgressPlan::new("berth-sessions-root-0", "0123456789abcdef0123", "br-0123456789ab", &allow)
    }

    #[test]
    fn chains_refuse_private_ranges_and_the_host_after_replies_and_allowances() {
        let plan = plan(vec![
            EgressAllow { cidr: "10.255.255.53".into(), port: Some(53) },
            EgressAllow { cidr: "192.168.7.0/24".into(), port: None },
        ]);
        assert_eq!(plan.egress_chain, "BERTH-E-0123456789ab");
        assert!(plan.egress_chain.len() <= 28 && plan.host_chain.len() <= 28, "iptables chain names are at most 28 characters");
        let egress = plan.egress_rules();
        assert_eq!(egress[0], "-A BERTH-E-0123456789ab -m conntrack --ctstate RELATED,ESTABLISHED -j RETURN");
        assert_eq!(egress[1], "-A BERTH-E-0123456789ab -d 10.255.255.53/32 -p tcp -m tcp --dport 53 -j RETURN");
        assert_eq!(egress[2], "-A BERTH-E-0123456789ab -d 10.255.255.53/32 -p udp -m udp --dport 53 -j RETURN");
        assert_eq!(egress[3], "-A BERTH-E-0123456789ab -d 192.168.7.0/24 -j RETURN");
        assert!(egress.contains(&"-A BERTH-E-0123456789ab -d 169.254.0.0/16 -j REJECT --reject-with icmp-admin-prohibited".to_owned()));
        assert_eq!(egress.len(), 4 + REFUSED_RANGES.len());
        let host = plan.host_rules();
        assert_eq!(host.last().unwrap(), "-A BERTH-H-0123456789ab -j REJECT --reject-with icmp-admin-prohibited");
        assert_eq!(host.len(), 5);
        let input = plan.restore_input();
        assert!(input.starts_with("*filter\n:BERTH-E-0123456789ab - [0:0]\n:BERTH-H-0123456789ab - [0:0]\n"), "{input}");
        assert!(input.ends_with("COMMIT\n"));
        assert_eq!(
            plan.egress_jump().join(" "),
            "-i br-0123456789ab -m comment --comment berth egress berth-sessions-root-0 -j BERTH-E-0123456789ab"
        );
    }

    #[test]
    fn listings_split_like_the_shell() {
        assert_eq!(
            shell_words(r#"DOCKER-USER -i br-1 -m comment --comment "berth egress n" -j BERTH-E-1"#),
            words(&["DOCKER-USER", "-i", "br-1", "-m", "comment", "--comment", "berth egress n", "-j", "BERTH-E-1"])
        );
    }
}
