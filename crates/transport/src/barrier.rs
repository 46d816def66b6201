//! The receiver's iteration barrier across channels.
//!
//! Every connection carries a `Sync(iteration)` record at the end of each
//! iteration. A channel thread that reads one waits here until every channel
//! has read its own: so all pages of iterations `<= n` are in guest memory before
//! any page of iteration `n + 1` is written, whatever the channels' relative delay.
//! The barrier can be closed (a channel failed or ended), waking every waiter with
//! an error, so one bad channel never leaves the others blocked.

use std::sync::{Condvar, Mutex};

use crate::error::{Error, Result};

struct State {
    arrived: usize,
    generation: u64,
    iteration: u64,
    closed: Option<String>,
}

/// A reusable, closable barrier for `parties` channel threads.
pub(crate) struct IterationBarrier {
    parties: usize,
    state: Mutex<State>,
    cv: Condvar,
}

impl IterationBarrier {
    /// A barrier for `parties` channels.
    pub(crate) fn new(parties: usize) -> Self {
        IterationBarrier {
            parties,
            state: Mutex::new(State {
                arrived: 0,
                generation: 0,
                iteration: 0,
                closed: None,
            }),
            cv: Condvar::new(),
        }
    }

    /// Waits until every channel reached the end of `iteration`.
    pub(crate) fn wait(&self, iteration: u64) -> Result<()> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(why) = &st.closed {
            return Err(Error::Aborted(why.clone()));
        }
        if st.arrived == 0 {
            st.iteration = iteration;
        } else if st.iteration != iteration {
            let msg = format!(
                "channels disagree at the iteration barrier: {} vs {iteration}",
                st.iteration
            );
            st.closed = Some(msg.clone());
            self.cv.notify_all();
            return Err(Error::Protocol(msg));
        }
        st.arrived += 1;
        if st.arrived == self.parties {
            st.arrived = 0;
            st.generation += 1;
            self.cv.notify_all();
            return Ok(());
        }
        let gen = st.generation;
        while st.generation == gen && st.closed.is_none() {
            st = self.cv.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        match (&st.closed, st.generation != gen) {
            (_, true) => Ok(()),
            (Some(why), false) => Err(Error::Aborted(why.clone())),
            (None, false) => Ok(()),
        }
    }

    /// Closes the barrier: current and future waiters get an error.
    pub(crate) fn close(&self, why: &str) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if st.closed.is_none() {
            st.closed = Some(why.to_string());
        }
        self.cv.notify_all();
    }
}
