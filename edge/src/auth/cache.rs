//! A per-isolate cache of what a token hash resolved to, for tokens presented many times a second
//! (a runner's event batches). Entries live `TOKEN_CACHE_TTL_MS`; the map never holds more than
//! `TOKEN_CACHE_MAX` entries. Whoever revokes such a token must accept that an isolate may still
//! honour it for up to the TTL.

use std::collections::HashMap;

pub const TOKEN_CACHE_TTL_MS: i64 = 60_000;
pub const TOKEN_CACHE_MAX: usize = 1024;

pub struct TokenCache<V> {
    entries: HashMap<String, (V, i64)>,
}

impl<V> Default for TokenCache<V> {
    fn default() -> Self {
        Self { entries: HashMap::new() }
    }
}

impl<V: Clone> TokenCache<V> {
    /// What `hash` resolved to, if that was less than the TTL before `now` (ms).
    pub fn get(&mut self, hash: &str, now: i64) -> Option<V> {
        match self.entries.get(hash) {
            Some((value, at)) if now - at < TOKEN_CACHE_TTL_MS => Some(value.clone()),
            Some(_) => {
                self.entries.remove(hash);
                None
            }
            None => None,
        }
    }

    /// Remembers `value` for `hash` from `now`; when full, expired entries go first, then all.
    pub fn put(&mut self, hash: String, value: V, now: i64) {
        if self.entries.len() >= TOKEN_CACHE_MAX && !self.entries.contains_key(&hash) {
            self.entries.retain(|_, (_, at)| now - *at < TOKEN_CACHE_TTL_MS);
            if self.entries.len() >= TOKEN_CACHE_MAX {
                self.entries.clear();
            }
        }
        self.entries.insert(hash, (value, now));
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_expires_after_the_ttl() {
        let mut cache = TokenCache::default();
        assert_eq!(cache.get("h", 0), None);
        cache.put("h".into(), "runner-a", 1_000);
        assert_eq!(cache.get("h", 1_000 + TOKEN_CACHE_TTL_MS - 1), Some("runner-a"));
        assert_eq!(cache.get("h", 1_000 + TOKEN_CACHE_TTL_MS), None);
        assert!(cache.is_empty(), "an expired entry is dropped when read");
    }

    #[test]
    fn the_cache_never_grows_past_its_bound() {
        let mut cache = TokenCache::default();
        for i in 0..TOKEN_CACHE_MAX * 3 {
            cache.put(format!("h-{i}"), i, 0);
            assert!(cache.len() <= TOKEN_CACHE_MAX);
        }
        // Expired entries make room before live ones are dropped.
        let mut cache = TokenCache::default();
        for i in 0..TOKEN_CACHE_MAX - 1 {
            cache.put(format!("old-{i}"), 0, 0);
        }
        cache.put("live".into(), 1, TOKEN_CACHE_TTL_MS);
        cache.put("new".into(), 2, TOKEN_CACHE_TTL_MS + 1);
        assert_eq!(cache.len(), 2);
        assert_eq!(cache.get("live", TOKEN_CACHE_TTL_MS + 1), Some(1));
    }
}
