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

/// Live rendering is shared between subscribers with the same selection
/// (`live/gql.rs`), which is only right while nothing under `MessageEvent`
/// reads the viewer or the database. Every field reachable from it is listed
/// here after that review; a new one fails this test until someone checks it
/// and adds it.
#[test]
fn fields_under_message_event_are_reviewed_for_shared_rendering() {
    use std::collections::{BTreeMap, BTreeSet};
    // Each reads only the event it renders (`Message.revisions` reads the
    // revisions preloaded into live events, never the database).
    const REVIEWED: &[&str] = &[
        "MessageEvent.kind",
        "MessageEvent.cursor",
        "MessageEvent.message",
        "Message.id",
        "Message.guildId",
        "Message.channelId",
        "Message.author",
        "Message.content",
        "Message.createdAt",
        "Message.editedAt",
        "Message.deletedAt",
        "Message.deletionDetectedAt",
        "Message.attachments",
        "Message.replyToId",
        "Message.revisions",
        "Author.id",
        "Author.username",
        "Author.displayName",
        "Author.avatarUrl",
        "Author.bot",
        "Attachment.id",
        "Attachment.filename",
        "Attachment.url",
        "Attachment.size",
        "Attachment.contentType",
        "Revision.content",
        "Revision.editedAt",
    ];
    let doc = async_graphql::parser::parse_schema(observer_api::sdl()).expect("the SDL parses");
    let mut fields: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
    for def in &doc.definitions {
        if let async_graphql::parser::types::TypeSystemDefinition::Type(t) = def {
            if let async_graphql::parser::types::TypeKind::Object(o) = &t.node.kind {
                let list = o
                    .fields
                    .iter()
                    .map(|f| {
                        let ty = f.node.ty.node.to_string();
                        let base: String = ty
                            .chars()
                            .filter(|c| c.is_alphanumeric() || *c == '_')
                            .collect();
                        (f.node.name.node.to_string(), base)
                    })
                    .collect();
                fields.insert(t.node.name.node.to_string(), list);
            }
        }
    }
    let mut reachable = BTreeSet::new();
    let mut todo = vec!["MessageEvent".to_owned()];
    let mut seen = BTreeSet::new();
    while let Some(ty) = todo.pop() {
        if !seen.insert(ty.clone()) {
            continue;
        }
        for (name, target) in fields.get(&ty).into_iter().flatten() {
            reachable.insert(format!("{ty}.{name}"));
            if fields.contains_key(target) {
                todo.push(target.clone());
            }
        }
    }
    let reviewed: BTreeSet<String> = REVIEWED.iter().map(|s| (*s).to_owned()).collect();
    let new: Vec<_> = reachable.difference(&reviewed).collect();
    assert!(
        new.is_empty(),
        "fields under MessageEvent not yet reviewed for shared live rendering: {new:?} \
         (check that they read neither the viewer nor the database, then list them)"
    );
    let gone: Vec<_> = reviewed.difference(&reachable).collect();
    assert!(
        gone.is_empty(),
        "reviewed fields no longer in the schema: {gone:?}"
    );
}
