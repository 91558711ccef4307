//! Shared renderings of live events: a subscription's [`SelectionKey`] and
//! each event's cache of what it rendered to per key ([`Renders`]). No
//! GraphQL types here, so the hub can hold a cache without knowing the
//! schema (`super::gql` fills it).

use std::sync::{Arc, Mutex, OnceLock};

use sha2::{Digest, Sha256};

/// What a subscription's events are rendered with: a digest of a canonical
/// form we own of the request — the document text, the operation name and the
/// variables as canonical JSON (object keys sorted). Equal keys render any
/// event identically, because the rendering depends on nothing else (see the
/// module note; `tests/it/schema.rs` holds the fields under `MessageEvent` to a
/// reviewed list). Two spellings of one selection get two keys: that only
/// costs sharing, never correctness.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SelectionKey([u8; 32]);

impl SelectionKey {
    /// The key of a subscription request, computed by the WebSocket loop before
    /// execution and handed to the resolver as request data.
    pub fn of_request(
        query: &str,
        operation_name: Option<&str>,
        variables: &serde_json::Value,
    ) -> Self {
        let mut canonical = String::new();
        canonical_json(variables, &mut canonical);
        let mut h = Sha256::new();
        h.update(b"selection-v1\0");
        h.update(query.as_bytes());
        h.update(b"\0");
        // An absent name and an empty one are different requests.
        match operation_name {
            Some(name) => {
                h.update(b"some:");
                h.update(name.as_bytes());
            }
            None => h.update(b"none"),
        }
        h.update(b"\0");
        h.update(canonical.as_bytes());
        Self(h.finalize().into())
    }

    /// The key of the subscription being resolved in `ctx`: the one its
    /// transport computed, or a key of its own (no sharing) when it came by a
    /// path that computed none.
    pub fn of(ctx: &async_graphql::Context<'_>) -> Self {
        if let Some(k) = ctx.data_opt::<SelectionKey>() {
            return *k;
        }
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut h = Sha256::new();
        h.update(b"unshared\0");
        h.update(n.to_le_bytes());
        Self(h.finalize().into())
    }
}

/// `v` as JSON text with every object's keys sorted, whatever order the
/// client sent (or a map type keeps): the same variables give the same text.
fn canonical_json(v: &serde_json::Value, out: &mut String) {
    match v {
        serde_json::Value::Object(map) => {
            let mut entries: Vec<_> = map.iter().collect();
            entries.sort_by(|a, b| a.0.cmp(b.0));
            out.push('{');
            for (i, (k, v)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&serde_json::Value::String(k.clone()).to_string());
                out.push(':');
                canonical_json(v, out);
            }
            out.push('}');
        }
        serde_json::Value::Array(items) => {
            out.push('[');
            for (i, v) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                canonical_json(v, out);
            }
            out.push(']');
        }
        scalar => out.push_str(&scalar.to_string()),
    }
}

#[cfg(test)]
impl SelectionKey {
    pub(crate) fn fixed(b: u8) -> Self {
        Self([b; 32])
    }
}

/// Renderings of one event, by selection: the resolved value (for
/// executions without a [`Lane`]) and its JSON text (spliced into frames by
/// the WebSocket loop). Bounded: past [`MAX_RENDERS`] distinct selections
/// (many different queries subscribed at once) further ones are resolved
/// per subscriber, uncached.
///
/// The first rendering sits in a `OnceLock`, read without a lock: usually
/// every subscriber has the same selection, and a mutex here was taken by
/// each of an event's hundreds of deliveries, from both runtime threads.
#[derive(Debug, Default)]
pub struct Renders {
    first: OnceLock<Rendering>,
    rest: Mutex<Vec<Rendering>>,
}

#[derive(Debug)]
struct Rendering {
    key: SelectionKey,
    value: async_graphql::Value,
    json: Arc<str>,
}

/// Distinct selections cached per event.
pub const MAX_RENDERS: usize = 8;

impl Renders {
    fn rest(&self) -> std::sync::MutexGuard<'_, Vec<Rendering>> {
        self.rest.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn find<T>(&self, key: &SelectionKey, f: impl Fn(&Rendering) -> T) -> Option<T> {
        match self.first.get() {
            Some(r) if r.key == *key => Some(f(r)),
            Some(_) => self.rest().iter().find(|r| r.key == *key).map(f),
            None => None,
        }
    }

    pub(crate) fn value(&self, key: &SelectionKey) -> Option<async_graphql::Value> {
        self.find(key, |r| r.value.clone())
    }

    /// The JSON text of the event for `key`, when already rendered.
    pub fn json(&self, key: &SelectionKey) -> Option<Arc<str>> {
        self.find(key, |r| Arc::clone(&r.json))
    }

    pub(crate) fn put(&self, key: SelectionKey, value: &async_graphql::Value) {
        if self.find(&key, |_| ()).is_some() {
            return;
        }
        let json: Arc<str> = match serde_json::to_string(value) {
            Ok(json) => json.into(),
            Err(e) => {
                tracing::error!(error = %e, "serialising a live event failed");
                return;
            }
        };
        let rendering = Rendering {
            key,
            value: value.clone(),
            json,
        };
        // Another subscriber may have set the first slot meanwhile: then
        // this one goes to the rest (unless it is the same selection).
        let Err(rendering) = self.first.set(rendering) else {
            return;
        };
        if self.first.get().is_some_and(|r| r.key == key) {
            return;
        }
        let mut rest = self.rest();
        if rest.len() + 1 < MAX_RENDERS && !rest.iter().any(|r| r.key == key) {
            rest.push(rendering);
        }
    }
}
