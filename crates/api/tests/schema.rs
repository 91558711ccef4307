//! The checked-in SDL (`crates/api/schema.graphql`) must equal what the code
//! defines. Regenerate with `UPDATE_SCHEMA=1 cargo test -p observer-api --test schema`.

#[test]
fn schema_sdl_has_not_drifted() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/schema.graphql");
    let sdl = observer_api::sdl();
    if std::env::var_os("UPDATE_SCHEMA").is_some() {
        std::fs::write(path, &sdl).expect("write schema.graphql");
        return;
    }
    let checked_in = std::fs::read_to_string(path).unwrap_or_default();
    assert!(
        checked_in == sdl,
        "crates/api/schema.graphql is out of date; run UPDATE_SCHEMA=1 cargo test -p observer-api --test schema\n--- code ---\n{sdl}"
    );
}

#[test]
fn schema_keeps_the_fixed_names_of_design_section_7() {
    let sdl = observer_api::sdl();
    for needle in [
        "viewer: Viewer!",
        "guilds: [Guild!]!",
        "guild(id: ID!): Guild",
        "channel(id: ID!): Channel",
        "message(id: ID!): Message",
        "messages(channelId: ID!, first: Int = 50, after: String): MessageConnection!",
        "searchMessages(query: String!, guildId: ID, first: Int = 25, after: String): MessageConnection!",
        "messageEvents(guildId: ID, channelIds: [ID!], after: String): MessageEvent!",
        "setObserverRoles(guildId: ID!, roleIds: [ID!]!): Guild!",
        "createApiToken(name: String!): NewApiToken!",
        "revokeApiToken(id: ID!): Boolean!",
        "scalar DateTime",
        "PRIVATE_THREAD",
        "ANNOUNCEMENT_THREAD",
    ] {
        assert!(sdl.contains(needle), "SDL lacks `{needle}`:\n{sdl}");
    }
}
