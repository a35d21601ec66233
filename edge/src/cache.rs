//! Per-isolate caches of what D1 answered, for reads made many times a second whose answers
//! rarely change: the runner a token hash names (a runner's event batches), the grants of a user
//! (every job a user submits), the webhook subscriptions of an owner (every status change of
//! their jobs). Entries live the cache's TTL; the map never holds more than its bound.
//!
//! A cache is a copy: whoever changes what it holds forgets the entries in its own isolate at
//! once ([`TtlCache::forget`], [`TtlCache::clear`]), and must accept that other isolates may keep
//! answering the old value for up to the TTL. A read that raced such a change is not kept: each
//! change moves the cache's generation, and [`TtlCache::put`] of an answer read under an older
//! generation is dropped.

use std::cell::RefCell;
use std::collections::HashMap;
use std::future::Future;
use std::thread::LocalKey;

pub struct TtlCache<V> {
    entries: HashMap<String, (V, i64)>,
    ttl_ms: i64,
    max: usize,
    generation: u64,
}

impl<V: Clone> TtlCache<V> {
    pub fn new(ttl_ms: i64, max: usize) -> Self {
        Self { entries: HashMap::new(), ttl_ms, max, generation: 0 }
    }

    /// What `key` resolved to, if that was less than the TTL before `now` (ms).
    pub fn get(&mut self, key: &str, now: i64) -> Option<V> {
        match self.entries.get(key) {
            Some((value, at)) if now - at < self.ttl_ms => Some(value.clone()),
            Some(_) => {
                self.entries.remove(key);
                None
            }
            None => None,
        }
    }

    /// The generation to hand back to [`TtlCache::put`] with an answer about to be read.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Remembers `value` for `key` from `now`, unless the cache changed since `generation` (the
    /// answer may predate that change). When full, expired entries go first, then all.
    pub fn put(&mut self, key: String, value: V, now: i64, generation: u64) {
        if generation != self.generation {
            return;
        }
        if self.entries.len() >= self.max && !self.entries.contains_key(&key) {
            let ttl = self.ttl_ms;
            self.entries.retain(|_, (_, at)| now - *at < ttl);
            if self.entries.len() >= self.max {
                self.entries.clear();
            }
        }
        self.entries.insert(key, (value, now));
    }

    /// Forgets `key` (its value changed).
    pub fn forget(&mut self, key: &str) {
        self.generation += 1;
        self.entries.remove(key);
    }

    /// Forgets everything (a change that may touch any key).
    pub fn clear(&mut self) {
        self.generation += 1;
        self.entries.clear();
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// `key`'s value from `cache` while it is fresh, else what `load` answers, kept unless the cache
/// changed while it was read (see [`TtlCache::put`]); a failed `load` keeps nothing. `now` is the
/// clock, in ms.
pub async fn read_through<V: Clone + 'static, E>(
    cache: &'static LocalKey<RefCell<TtlCache<V>>>,
    key: &str,
    now: fn() -> i64,
    load: impl Future<Output = Result<V, E>>,
) -> Result<V, E> {
    if let Some(value) = cache.with(|c| c.borrow_mut().get(key, now())) {
        return Ok(value);
    }
    let generation = cache.with(|c| c.borrow().generation());
    let value = load.await?;
    cache.with(|c| c.borrow_mut().put(key.to_string(), value.clone(), now(), generation));
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: i64 = 60_000;
    const MAX: usize = 1024;

    #[test]
    fn an_entry_expires_after_the_ttl() {
        let mut cache = TtlCache::new(TTL, MAX);
        assert_eq!(cache.get("h", 0), None);
        cache.put("h".into(), "runner-a", 1_000, cache.generation());
        assert_eq!(cache.get("h", 1_000 + TTL - 1), Some("runner-a"));
        assert_eq!(cache.get("h", 1_000 + TTL), None);
        assert!(cache.is_empty(), "an expired entry is dropped when read");
    }

    #[test]
    fn the_cache_never_grows_past_its_bound() {
        let mut cache = TtlCache::new(TTL, MAX);
        for i in 0..MAX * 3 {
            cache.put(format!("h-{i}"), i, 0, 0);
            assert!(cache.len() <= MAX);
        }
        // Expired entries make room before live ones are dropped.
        let mut cache = TtlCache::new(TTL, MAX);
        for i in 0..MAX - 1 {
            cache.put(format!("old-{i}"), 0, 0, 0);
        }
        cache.put("live".into(), 1, TTL, 0);
        cache.put("new".into(), 2, TTL + 1, 0);
        assert_eq!(cache.len(), 2);
        assert_eq!(cache.get("live", TTL + 1), Some(1));
    }

    #[test]
    fn a_change_forgets_and_an_answer_read_before_it_is_not_kept() {
        let mut cache = TtlCache::new(TTL, MAX);
        cache.put("ann".into(), vec!["acme/*"], 0, cache.generation());
        cache.put("bob".into(), vec!["acme/web"], 0, cache.generation());
        let read_before = cache.generation();
        cache.forget("ann");
        assert_eq!(cache.get("ann", 1), None);
        assert_eq!(cache.get("bob", 1), Some(vec!["acme/web"]), "only the changed key goes");
        cache.put("ann".into(), vec!["acme/*"], 2, read_before);
        assert_eq!(cache.get("ann", 3), None, "an answer that may predate the change is dropped");
        cache.put("ann".into(), vec![], 4, cache.generation());
        assert_eq!(cache.get("ann", 5), Some(vec![]));
        cache.clear();
        assert!(cache.is_empty());
    }

    thread_local! {
        static GRANTS: RefCell<TtlCache<Vec<&'static str>>> = RefCell::new(TtlCache::new(TTL, MAX));
    }

    fn clock() -> i64 {
        0
    }

    #[test]
    fn read_through_loads_once_keeps_no_failure_and_no_answer_that_raced_a_change() {
        use futures::executor::block_on;
        let loads = std::cell::Cell::new(0);
        let load = |value: Result<Vec<&'static str>, &'static str>| {
            let loads = &loads;
            async move {
                loads.set(loads.get() + 1);
                value
            }
        };
        assert_eq!(block_on(read_through(&GRANTS, "ann", clock, load(Ok(vec!["acme/*"])))), Ok(vec!["acme/*"]));
        assert_eq!(block_on(read_through(&GRANTS, "ann", clock, load(Ok(vec![])))), Ok(vec!["acme/*"]));
        assert_eq!(loads.get(), 1, "a fresh entry answers without a load");

        assert_eq!(block_on(read_through(&GRANTS, "bob", clock, load(Err("d1 down")))), Err("d1 down"));
        assert_eq!(block_on(read_through(&GRANTS, "bob", clock, load(Ok(vec!["acme/web"])))), Ok(vec!["acme/web"]));
        assert_eq!(loads.get(), 3, "a failed load is not kept");

        let raced = async {
            GRANTS.with(|c| c.borrow_mut().forget("cat"));
            Ok::<_, &str>(vec!["old"])
        };
        assert_eq!(block_on(read_through(&GRANTS, "cat", clock, raced)), Ok(vec!["old"]));
        assert_eq!(GRANTS.with(|c| c.borrow_mut().get("cat", 0)), None, "an answer read across a change is not kept");
    }
}
