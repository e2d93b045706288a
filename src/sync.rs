//! Locking that outlives a panic: a lock whose holder panicked still hands out its data (every
//! mutex here guards state that a panic cannot leave half-written: counters, maps replaced
//! whole), so one panicked task does not take the sidecar down with it.

use std::sync::{Mutex, MutexGuard, PoisonError};

/// `mutex`'s guard, poisoned or not.
pub fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[test]
    fn a_lock_whose_holder_panicked_still_hands_out_its_data() {
        let mutex = Arc::new(Mutex::new(7));
        let holder = mutex.clone();
        let panicked = std::thread::spawn(move || {
            let _guard = holder.lock();
            panic!("the holder panics");
        })
        .join();
        assert!(panicked.is_err() && mutex.is_poisoned());
        assert_eq!(*lock(&mutex), 7);
    }
}
