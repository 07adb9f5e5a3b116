//! Every run-profile shipped in `run-profiles/` loads through `Profile::load`, carries the figures
//! the deployment promises (memory, CPUs, timers, folders) and keeps the invariants all profiles share.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use protocol::Profile;

/// The profiles the project ships; more may be added, none of these may go.
const SHIPPED_PROFILES: [&str; 4] = ["dev", "legal", "ide", "lab"];

fn repository_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("protocol/ sits in the repository root").to_owned()
}

fn profiles_directory() -> PathBuf {
    repository_root().join("run-profiles")
}

/// Loads every folder of `run-profiles/`, failing on anything there that is not a loadable profile.
fn load_every_profile() -> BTreeMap<String, Profile> {
    let mut profiles = BTreeMap::new();
    let entries = std::fs::read_dir(profiles_directory()).expect("run-profiles/ is readable");
    for entry in entries {
        let entry = entry.expect("directory entry");
        let folder = entry.path();
        if folder.extension().is_some_and(|extension| extension == "md") {
            continue; // documentation of the profiles
        }
        assert!(folder.is_dir(), "{} is not a profile folder: run-profiles/ holds folders and their README", folder.display());
        let folder_name = entry.file_name().into_string().expect("profile folder names are UTF-8");
        let profile = Profile::load(&folder.join("profile.toml")).unwrap_or_else(|error| panic!("{folder_name}: {error}"));
        assert_eq!(profile.name, folder_name, "a profile is named after its folder, as `--profile <name>` finds it");
        profiles.insert(folder_name, profile);
    }
    profiles
}

fn legal_text() -> String {
    std::fs::read_to_string(profiles_directory().join("legal/profile.toml")).expect("legal profile readable")
}

#[test]
fn every_profile_folder_loads_and_the_shipped_ones_are_there() {
    let profiles = load_every_profile();
    for name in SHIPPED_PROFILES {
        assert!(profiles.contains_key(name), "run-profiles/{name} is missing (found {:?})", profiles.keys().collect::<Vec<_>>());
    }
}

#[test]
fn every_pattern_a_profile_runs_is_a_pattern_file_of_that_name() {
    for (name, profile) in load_every_profile() {
        for pattern_name in &profile.patterns {
            let path = repository_root().join("patterns").join(format!("{pattern_name}.json"));
            let text = std::fs::read_to_string(&path)
                .unwrap_or_else(|error| panic!("{name}: pattern {pattern_name}: {}: {error}", path.display()));
            let pattern: serde_json::Value = serde_json::from_str(&text).unwrap_or_else(|error| panic!("{}: {error}", path.display()));
            assert_eq!(pattern["name"], pattern_name.as_str(), "{}: a pattern file is named after its pattern", path.display());
        }
    }
}

#[test]
fn each_profile_carries_the_figures_it_promises() {
    let profiles = load_every_profile();

    let dev = &profiles["dev"];
    assert!(dev.container.memory_mib <= 256, "dev keeps small limits");
    assert!(dev.container.cpus <= 1.0, "dev keeps small limits");
    assert!(dev.container.ready_timeout_secs <= 30, "dev keeps short timeouts");
    assert!(dev.services.store_url.starts_with("sqlite://"), "dev runs on embedded defaults (unless BERTH_STORE_URL says otherwise)");

    let legal = &profiles["legal"];
    assert_eq!(legal.container.memory_mib, 4096, "legal: 4 GiB");
    assert_eq!(legal.container.cpus, 2.0, "legal: 2 CPUs");
    assert_eq!(legal.container.ready_timeout_secs, 60, "legal: 60 s ready timeout");
    let case_folders: BTreeSet<&str> = legal.workspace.skeleton.iter().map(String::as_str).collect();
    for folder in ["pleadings", "motions", "discovery", "correspondence", "research", "exhibits"] {
        assert!(case_folders.contains(folder), "legal: the case skeleton lacks {folder}");
    }

    let ide = &profiles["ide"];
    assert_eq!(ide.timers.idle_after_secs, 5 * 60, "ide: idle after 5 minutes");
    assert_eq!(ide.timers.stop_after_idle_secs, 30 * 60, "ide: stop 30 minutes after going idle");
    assert_eq!(ide.timers.max_age_secs, 2 * 60 * 60, "ide: 2 hour cap");

    let lab = &profiles["lab"];
    assert_eq!(lab.timers.max_age_secs, 30 * 60, "lab: 30 minute TTL");
    assert_eq!(lab.container.memory_mib, 1536, "lab: 1.5 GiB");
    assert_eq!(lab.container.cpus, 1.0, "lab: 1 CPU");
    assert!(!lab.container.privileged, "lab: the seed's Docker-in-Docker is refused, never granted");
}

#[test]
fn every_profile_keeps_the_shared_invariants() {
    for (name, profile) in load_every_profile() {
        let container = &profile.container;
        let timers = &profile.timers;
        // A session has to be able to come up before it could be considered idle or too old.
        assert!(container.ready_timeout_secs < timers.idle_after_secs, "{name}: ready timeout must be shorter than the idle timeout");
        assert!(timers.idle_after_secs < timers.max_age_secs, "{name}: going idle must come before the age cap");
        assert!(timers.autosave_secs < timers.max_age_secs, "{name}: an autosave must happen before the age cap");
        // The idle ladder climbs in order, and each warning comes before the step it announces.
        assert!(timers.dormant_after_idle_secs < timers.stop_after_idle_secs, "{name}: the dormant tier must come before the close");
        for step in
            [timers.idle_after_secs, timers.dormant_after_idle_secs, timers.stop_after_idle_secs].into_iter().filter(|step| *step > 0)
        {
            assert!(timers.idle_warning_secs < step, "{name}: a warning {} s before a step {step} s away", timers.idle_warning_secs);
        }
        assert!(timers.idle_cpu_percent > 0.0 && timers.idle_cpu_percent < 100.0, "{name}: the CPU threshold is a share of one CPU");
        // Workspace processes never run as root: the files they write belong to the Berth user.
        let user = container.user.as_deref().unwrap_or_else(|| panic!("{name}: container.user must be set"));
        let uid = user.split(':').next().unwrap_or_default();
        assert!(uid != "0" && uid != "root", "{name}: workspace containers run as a non-root user, got {user:?}");
        assert!(container.tmpfs_size_mib < container.memory_mib, "{name}: /tmp lives in memory and must fit in the limit");
        // Object-store prefixes name the profile so two deployments on one bucket never share files.
        assert!(profile.workspace.prefix.contains("{profile}"), "{name}: workspace.prefix must contain {{profile}}");
        // Berth's own configuration and secrets (BERTH_JWT_SECRET...) never reach a workspace.
        for variable in container.env.keys() {
            assert!(!variable.starts_with("BERTH_"), "{name}: container.env must not pass {variable} into a workspace");
        }
        // Seed users: unique ids, known roles, and someone who can see every session.
        let mut seen_users = BTreeSet::new();
        for user in &profile.users {
            assert!(seen_users.insert(user.id.as_str()), "{name}: seed user {} appears twice", user.id);
            for role in &user.roles {
                assert!(role == "user" || role == "admin", "{name}: seed user {} has unknown role {role:?}", user.id);
            }
        }
        assert!(profile.users.iter().any(|user| user.roles.iter().any(|role| role == "admin")), "{name}: seeds no admin");
    }
}

#[track_caller]
fn check(edit: impl Fn(String) -> String, expected_fragments: &[&str]) {
    let edited = edit(legal_text());
    assert_ne!(edited, legal_text(), "the edit must change the profile");
    let error =
        Profile::parse(&edited, Path::new("run-profiles/legal/profile.toml")).expect_err("the edited profile must be refused").to_string();
    for fragment in expected_fragments {
        assert!(error.contains(fragment), "{error:?} does not contain {fragment:?}");
    }
}

#[test]
fn a_broken_profile_is_refused_with_the_file_and_the_field() {
    let path = "run-profiles/legal/profile.toml";
    check(|text| text.replace("memory_mib = 4096", "memory_mib = \"4g\""), &[path, "memory_mib"]);
    check(|text| text.replace("cpus = 2.0", "cpus = 0.0"), &[path, "`container.cpus`"]);
    check(|text| text.replace("ready_timeout_secs = 60", "ready_timeout_secs = 0"), &[path, "`container.ready_timeout_secs`"]);
    check(|text| text.replace("ready_timeout_secs = 60\n", ""), &[path, "missing field `ready_timeout_secs`"]);
    check(|text| text.replace("health = { http = \"/health\" }", "health = \"ping\""), &[path, "ping"]);
    check(|text| text.replace("\"pleadings\"", "\"../pleadings\""), &[path, "`workspace.skeleton`"]);
    check(|text| text.replace("prefix = \"{profile}/{user}/cases/{workspace}\"", "prefix = \"cases\""), &["`workspace.prefix`"]);
    check(|text| text.replace("cap_add = []", "cap_add = [\"SYS_ADMIN\"]"), &["`container.cap_add`"]);
    // What the lab seed asked for to run Docker-in-Docker.
    check(|text| text.replace("[container]\n", "[container]\nprivileged = true\n"), &["`container.privileged`"]);
    check(|text| text.replace("[timers]\n", "[timers]\nidle_after_minutes = 15\n"), &["unknown field `idle_after_minutes`"]);
    // The idle ladder: the dormant tier before the close, warnings before their steps, a real threshold.
    check(
        |text| text.replace("dormant_after_idle_secs = 1200", "dormant_after_idle_secs = 3600"),
        &[path, "`timers.dormant_after_idle_secs`"],
    );
    check(|text| text.replace("idle_warning_secs = 120", "idle_warning_secs = 900"), &[path, "`timers.idle_warning_secs`"]);
    check(|text| text.replace("idle_cpu_percent = 5.0", "idle_cpu_percent = 0.0"), &[path, "`timers.idle_cpu_percent`"]);
    check(|text| text.replace("max_keepalives = 6\n", ""), &[path, "missing field `max_keepalives`"]);
}
