//! Same seed, same scenario, same steps → the same ground truth.
#![allow(clippy::unwrap_used)]

use observer_sim::{GenOptions, Scenario, SimConfig, Simulator};

async fn run(seed: u64, steps: u64) -> Vec<observer_sim::MessageState> {
    let sim = Simulator::start(SimConfig {
        virtual_clock_start_ms: Some(1_760_000_000_000),
        cdn_base_url: Some("https://cdn.example.test".into()),
        ..SimConfig::default()
    })
    .await
    .unwrap();
    sim.load(Scenario::generate(seed, GenOptions::default()));
    sim.run_traffic_steps(seed, steps);
    let truth = sim.ground_truth();
    sim.shutdown().await;
    truth
}

#[tokio::test]
async fn same_seed_gives_the_same_ground_truth() {
    assert_eq!(
        Scenario::generate(4, GenOptions::default()),
        Scenario::generate(4, GenOptions::default())
    );
    assert_ne!(
        Scenario::generate(4, GenOptions::default()),
        Scenario::generate(5, GenOptions::default())
    );

    let a = run(42, 2_000).await;
    let b = run(42, 2_000).await;
    assert_eq!(a.len(), b.len());
    if let Some(i) = (0..a.len()).find(|i| a[*i] != b[*i]) {
        panic!("runs differ at {i}: {:?} vs {:?}", a[i], b[i]);
    }
    assert!(a.len() > 1_000, "{} messages", a.len());
    assert!(
        a.iter()
            .any(|m| m.edited_at.is_some() && m.revisions.len() > 1),
        "edits happen"
    );
    assert!(a.iter().any(|m| m.deleted), "deletions happen");
    assert!(
        a.iter().any(|m| !m.attachments.is_empty()),
        "attachments happen"
    );
    assert!(a.iter().any(|m| m.reply_to.is_some()), "staff replies");
    let guilds: std::collections::BTreeSet<u64> = a.iter().map(|m| m.guild_id).collect();
    assert_eq!(guilds.len(), 3, "traffic spans every guild");
    assert!(a.windows(2).all(|w| w[0].id < w[1].id));

    let c = run(43, 2_000).await;
    assert!(a != c, "another seed gives other traffic");
}

#[test]
fn generated_scenario_is_a_realistic_support_org() {
    use observer_sim::{perms, ChannelKind, OverwriteKind};
    let s = Scenario::generate(1, GenOptions::default());
    assert_eq!(s.guilds.len(), 3);
    for g in &s.guilds {
        let names: Vec<&str> = g.roles.iter().map(|r| r.name.as_str()).collect();
        for r in ["@everyone", "Admin", "Moderator", "Staff", "Customer"] {
            assert!(names.contains(&r), "{r} in {names:?}");
        }
        let staff = g.channels.iter().find(|c| c.name == "staff-chat").unwrap();
        assert!(staff
            .overwrites
            .iter()
            .any(|o| o.id == g.id && o.deny & perms::VIEW_CHANNEL != 0));
        assert!(g.channels.iter().any(|c| c.kind == ChannelKind::Forum));
        assert!(g
            .channels
            .iter()
            .any(|c| c.kind == ChannelKind::PublicThread));
        let private = g
            .channels
            .iter()
            .find(|c| c.kind == ChannelKind::PrivateThread)
            .unwrap();
        assert!(!private.thread.as_ref().unwrap().members.is_empty());
        assert!(g
            .channels
            .iter()
            .flat_map(|c| &c.overwrites)
            .any(|o| o.kind == OverwriteKind::Member));
        assert!(g.members.iter().any(|m| m.user_id == g.owner_id));
    }
    assert!(s
        .guilds
        .iter()
        .flat_map(|g| &g.members)
        .any(|m| m.communication_disabled_until.is_some()));
    let json = serde_json::to_string(&s).unwrap();
    let back: Scenario = serde_json::from_str(&json).unwrap();
    assert_eq!(back, s);
}
