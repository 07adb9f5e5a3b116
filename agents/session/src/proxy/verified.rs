//! Credentials the proxy has already verified, so a keep-alive client does not pay a JWT decode
//! (base64, HMAC, JSON) on every request. Keyed by the exact token or cookie value; an entry is
//! used only while `now < exp` (at or past expiry the full verification decides again, so expiry
//! holds exactly as without the cache). Failures are never kept. Bounded: when full, expired
//! entries go, and if that frees nothing the cache starts over.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

use crate::auth::unix_now;

/// At most this many verified values are kept.
pub const CAPACITY: usize = 4096;

/// Values verified once, with the Unix second they stop being valid.
pub struct Verified<T> {
    entries: Mutex<HashMap<String, (T, u64)>>,
}

impl<T: Clone> Verified<T> {
    pub fn new() -> Verified<T> {
        Verified { entries: Mutex::new(HashMap::new()) }
    }

    /// The kept result for `key`, if it has not expired.
    pub fn get(&self, key: &str) -> Option<T> {
        self.get_at(key, unix_now())
    }

    fn get_at(&self, key: &str, now: u64) -> Option<T> {
        let entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        entries.get(key).filter(|(_, expires_at)| now < *expires_at).map(|(value, _)| value.clone())
    }

    /// Keeps a successful verification of `key`, valid until `expires_at` (Unix seconds).
    pub fn put(&self, key: &str, value: T, expires_at: u64) {
        self.put_at(key, value, expires_at, unix_now());
    }

    fn put_at(&self, key: &str, value: T, expires_at: u64, now: u64) {
        if now >= expires_at {
            return;
        }
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        if entries.len() >= CAPACITY && !entries.contains_key(key) {
            entries.retain(|_, (_, at)| now < *at);
            if entries.len() >= CAPACITY {
                entries.clear();
            }
        }
        entries.insert(key.to_owned(), (value, expires_at));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kept_until_expiry_and_bounded() {
        let cache = Verified::<u32>::new();
        cache.put_at("a", 1, 100, 50);
        assert_eq!(cache.get_at("a", 99), Some(1));
        assert_eq!(cache.get_at("a", 100), None, "at expiry the full check decides");
        assert_eq!(cache.get_at("b", 50), None);
        cache.put_at("late", 2, 100, 100);
        assert_eq!(cache.get_at("late", 99), None, "an expired result is not kept");
        for index in 0..CAPACITY + 10 {
            cache.put_at(&format!("k{index}"), 3, 200, 60);
        }
        assert!(cache.entries.lock().unwrap().len() <= CAPACITY);
        assert_eq!(cache.get_at(&format!("k{}", CAPACITY + 9), 61), Some(3));
    }
}
