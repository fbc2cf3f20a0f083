//! One quota shared by weight among the clients that ask for it.
//!
//! The quota is a GCRA schedule at the provider's rate: a slot is free when
//! its theoretical arrival time, less the burst tolerance, has come. Every
//! attempt takes a free slot *now* or waits for a later one and asks again;
//! nothing is reserved ahead, so no slot promised to one client can be
//! wanted by another.
//!
//! Who may take a free slot:
//!
//! * Each client has a fair schedule of its own at `quota × share / Σ
//!   shares of the clients asking` (asking: it asked within the last
//!   [`ASKING_US`]); each slot it takes moves its schedule on by one of its
//!   intervals.
//! * A client takes a free slot unless another client is waiting for one
//!   with its fair schedule behind this client's: the slot goes to the
//!   client furthest below its share (stride scheduling, with the fair
//!   schedules as the strides' passes). With no such waiter, whoever asks
//!   takes it: what an idle or quiet client leaves goes to the others, and
//!   the rule is work conserving.
//! * A client told to wait is marked waiting until a little after the time
//!   it was given (one quota interval at least), so that a slot it has
//!   priority for is kept for it.
//! * A fair schedule never runs more than its part of the burst (and at
//!   least one interval) beyond the next slot ahead of now: a client that
//!   used idle capacity is not held back long once the others ask again,
//!   and a client back from idle starts from now, not from its past.
//! * A client's `cap` (its `quota_max_per_second`) is a schedule of its
//!   own that every grant to it must also fit.
//!
//! Times are microseconds on one clock (tokio's here, Redis's `TIME` in
//! `fair.lua`, which follows this code step by step).

/// A client is asking while its last request is at most this old.
pub const ASKING_US: u64 = 1_000_000;

/// How long after the time it was given a waiter is expected back, at
/// least: one quota interval, or this when that is shorter. Until then a
/// slot it has priority for is kept for it; one it does not come back for is
/// lost to the quota only when the burst is 1.
const COME_BACK_US: u64 = 2_000;

/// How late a waiter's wake-up may be made up for (a timer's millisecond,
/// a round trip to Redis).
const LATE_US: u64 = 2_000;

/// A schedule's tolerance: its burst's, and at least enough to make up a
/// waiter's late wake-up, which with a burst of 1 would otherwise be lost
/// to the quota on every slot (1 ms late at 60/s is 6 % of it). Never half
/// an interval or more, so that no second slot fits in that slack: no
/// window sees more than the rate and one slot.
pub fn tolerance(interval: u64, burst: u32) -> u64 {
    let burst = interval.saturating_mul(u64::from(burst.max(1) - 1));
    burst.max(LATE_US.min(interval.saturating_sub(1) / 2))
}

/// What a client's request may do now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// A slot is taken: send now.
    Go,
    /// Ask again at this time (when a slot this client may take should be
    /// free).
    WaitUntil(u64),
}

/// One client's part of a quota.
#[derive(Clone, Debug, PartialEq)]
pub struct Client {
    /// Its weight (`quota_share`), above 0.
    pub share: f64,
    /// The interval of its cap (`quota_max_per_second`), in µs.
    pub cap_interval: Option<u64>,
    /// The theoretical arrival time of its cap schedule.
    pub cap_tat: u64,
    /// The theoretical arrival time of its fair schedule.
    pub tat: u64,
    /// When it last asked; 0: never.
    pub seen: u64,
    /// Until when a request of it waits for a slot.
    pub waiting: u64,
}

impl Client {
    pub fn new(share: f64, cap_interval: Option<u64>) -> Client {
        Client {
            share,
            cap_interval,
            cap_tat: 0,
            tat: 0,
            seen: 0,
            waiting: 0,
        }
    }

    fn asking(&self, now: u64) -> bool {
        self.seen != 0 && self.seen.saturating_add(ASKING_US) >= now
    }
}

/// A quota and its clients.
#[derive(Clone, Debug, PartialEq)]
pub struct Fair {
    /// The quota's emission interval (µs per slot) and burst tolerance.
    pub interval: u64,
    pub tolerance: u64,
    /// The quota's theoretical arrival time.
    pub tat: u64,
    pub clients: Vec<Client>,
}

impl Fair {
    /// A quota of one slot per `interval` µs with `burst` slots at once.
    pub fn new(interval: u64, burst: u32, clients: Vec<Client>) -> Fair {
        let interval = interval.max(1);
        Fair {
            interval,
            tolerance: tolerance(interval, burst),
            tat: 0,
            clients,
        }
    }

    /// Client `c` asks for a slot at `now`.
    pub fn decide(&mut self, c: usize, now: u64) -> Step {
        self.clients[c].seen = now;
        // Its cap first: a slot it may not use is not taken from anyone.
        let me = &self.clients[c];
        if me.cap_interval.is_some() && me.cap_tat > now {
            return Step::WaitUntil(me.cap_tat);
        }
        let asking: f64 = self
            .clients
            .iter()
            .filter(|o| o.asking(now))
            .map(|o| o.share)
            .sum();
        let (fair_interval, lead) = self.fair(c, asking);
        let free_at = self.tat.saturating_sub(self.tolerance);
        if free_at > now {
            return self.wait(c, free_at);
        }
        let after = self.tat.max(now) + self.interval;
        if after > now + self.tolerance && self.behind_me(c, now) {
            // The last free slot is the waiter's; this one may have the
            // one after it.
            return self.wait(c, after - self.tolerance);
        }
        self.tat = after;
        let me = &mut self.clients[c];
        me.tat = (me.tat.max(now) + fair_interval).min(now + lead);
        me.waiting = 0;
        if let Some(cap) = me.cap_interval {
            me.cap_tat = me.cap_tat.max(now) + cap;
        }
        Step::Go
    }

    /// Client `c` waits for a slot until `until`: marked so until a little
    /// after, so that a client ahead of it asking then leaves it the slot.
    fn wait(&mut self, c: usize, until: u64) -> Step {
        let back = until + COME_BACK_US.max(self.interval);
        let me = &mut self.clients[c];
        me.waiting = me.waiting.max(back);
        Step::WaitUntil(until)
    }

    /// Client `c`'s fair interval, and how far ahead of now its fair
    /// schedule may run (its part of the burst, and at least one interval,
    /// beyond the next), when the clients asking have `asking` shares.
    fn fair(&self, c: usize, asking: f64) -> (u64, u64) {
        let share = self.clients[c].share;
        let ratio = (asking / share).max(1.0);
        let interval = (self.interval as f64 * ratio).round() as u64;
        let tolerance = ((self.tolerance as f64) / ratio).round() as u64;
        (interval, tolerance.max(interval) + interval)
    }

    /// Whether another client waits for a slot with its fair schedule
    /// behind `c`'s: that client is further below its share.
    fn behind_me(&self, c: usize, now: u64) -> bool {
        let mine = self.clients[c].tat.max(now);
        self.clients
            .iter()
            .enumerate()
            .any(|(i, o)| i != c && o.waiting >= now && o.tat.max(now) < mine)
    }
}

#[cfg(test)]
mod tests {
    use std::cmp::Reverse;
    use std::collections::{BinaryHeap, VecDeque};

    use super::*;

    const SECOND: u64 = 1_000_000;
    /// The simulation's clock starts here, as the limiters' clocks do.
    const T0: u64 = 10 * SECOND;

    /// How a client asks: `waiters` callers that ask again as soon as they
    /// are served, or one call every `every` µs; from `from` to `to`.
    #[derive(Clone, Copy)]
    enum Load {
        Flood { waiters: usize },
        Paced { every: u64 },
    }

    struct Asker {
        load: Load,
        from: u64,
        to: u64,
    }

    #[derive(Default)]
    struct Served {
        /// Per client: when each slot was taken, and how long its call waited.
        at: Vec<Vec<u64>>,
        waited: Vec<Vec<u64>>,
        refused: Vec<usize>,
    }

    impl Served {
        fn between(&self, c: usize, from: u64, to: u64) -> usize {
            self.at[c]
                .iter()
                .filter(|t| (from..to).contains(*t))
                .count()
        }

        /// The most slots taken in any window of `width` µs.
        fn busiest(&self, width: u64) -> usize {
            let mut all: Vec<u64> = self.at.iter().flatten().copied().collect();
            all.sort_unstable();
            let mut most = 0;
            let mut lo = 0;
            for hi in 0..all.len() {
                while all[hi] - all[lo] >= width {
                    lo += 1;
                }
                most = most.max(hi - lo + 1);
            }
            most
        }
    }

    /// Runs `askers` against `fair` until `end`, as the limiters do: each
    /// client's calls wait in line, its first one asking the quota; a call
    /// that would wait past `patience` is refused.
    fn simulate(fair: Fair, askers: &[Asker], end: u64, patience: u64) -> Served {
        simulate_late(fair, askers, end, patience, 0)
    }

    /// `simulate`, with every waiter waking up `late` µs after the time it
    /// was given.
    fn simulate_late(
        mut fair: Fair,
        askers: &[Asker],
        end: u64,
        patience: u64,
        late: u64,
    ) -> Served {
        #[derive(PartialEq, Eq, PartialOrd, Ord)]
        enum Event {
            /// A call of client `.0` arrives.
            Arrive(usize),
            /// The first call in client `.0`'s line asks the quota.
            Ask(usize),
        }
        let n = askers.len();
        let mut served = Served {
            at: vec![Vec::new(); n],
            waited: vec![Vec::new(); n],
            refused: vec![0; n],
        };
        let mut lines: Vec<VecDeque<u64>> = vec![VecDeque::new(); n];
        let mut events = BinaryHeap::new();
        let mut seq = 0u64;
        let mut push = |events: &mut BinaryHeap<_>, t: u64, e: Event| {
            seq += 1;
            events.push(Reverse((t, seq, e)));
        };
        for (c, a) in askers.iter().enumerate() {
            let first = match a.load {
                Load::Flood { waiters } => waiters,
                Load::Paced { .. } => 1,
            };
            for _ in 0..first {
                push(&mut events, a.from, Event::Arrive(c));
            }
        }
        let mut steps = 0;
        while let Some(Reverse((t, _, event))) = events.pop() {
            steps += 1;
            assert!(steps < 5_000_000, "the simulation does not end");
            if t >= end {
                break;
            }
            match event {
                Event::Arrive(c) => {
                    if let Load::Paced { every } = askers[c].load
                        && t + every < askers[c].to
                    {
                        push(&mut events, t + every, Event::Arrive(c));
                    }
                    lines[c].push_back(t);
                    if lines[c].len() == 1 {
                        push(&mut events, t, Event::Ask(c));
                    }
                }
                Event::Ask(c) => {
                    let Some(&since) = lines[c].front() else {
                        continue;
                    };
                    match fair.decide(c, t) {
                        Step::Go => {
                            served.at[c].push(t);
                            served.waited[c].push(t - since);
                            lines[c].pop_front();
                            if let Load::Flood { .. } = askers[c].load
                                && t < askers[c].to
                            {
                                lines[c].push_back(t);
                            }
                        }
                        Step::WaitUntil(w) => {
                            assert!(w > t, "told to wait until {w} at {t}");
                            if w - since <= patience {
                                push(&mut events, w + late, Event::Ask(c));
                                continue;
                            }
                            served.refused[c] += 1;
                            lines[c].pop_front();
                            if let Load::Flood { .. } = askers[c].load
                                && t < askers[c].to
                            {
                                lines[c].push_back(t);
                            }
                        }
                    }
                    if !lines[c].is_empty() {
                        push(&mut events, t, Event::Ask(c));
                    }
                }
            }
        }
        served
    }

    fn quota(per_second: u64, burst: u32, shares: &[f64]) -> Fair {
        Fair::new(
            SECOND / per_second,
            burst,
            shares.iter().map(|s| Client::new(*s, None)).collect(),
        )
    }

    fn flood(from: u64, to: u64) -> Asker {
        Asker {
            load: Load::Flood { waiters: 24 },
            from,
            to,
        }
    }

    fn within(got: usize, want: f64, tolerance: f64) -> bool {
        (got as f64 - want).abs() <= want * tolerance
    }

    #[test]
    fn a_client_alone_gets_the_whole_quota_and_no_more() {
        let end = T0 + 10 * SECOND;
        let served = simulate(quota(100, 5, &[1.0]), &[flood(T0, end)], end, SECOND);
        let got = served.between(0, T0, end);
        assert!(within(got, 1000.0, 0.01), "{got} of 1000");
        assert!(
            served.busiest(SECOND) <= 100 + 5,
            "{}",
            served.busiest(SECOND)
        );
    }

    #[test]
    fn late_wake_ups_are_made_up_for_and_never_add_a_slot() {
        // 60/s, burst 1: waiters waking 1.1 ms late would lose 6 % of the
        // quota if the schedule could not make it up.
        let end = T0 + 10 * SECOND;
        for late in [0, 1_100, 1_900] {
            let served = simulate_late(
                quota(60, 1, &[3.0, 1.0]),
                &[flood(T0, end), flood(T0, end)],
                end,
                SECOND,
                late,
            );
            let got = served.between(0, T0, end) + served.between(1, T0, end);
            assert!(got >= 594, "{late} µs late: {got} of 600");
            assert!(served.busiest(SECOND) <= 61, "{}", served.busiest(SECOND));
        }
    }

    #[test]
    fn clients_that_all_ask_share_by_weight() {
        let end = T0 + 10 * SECOND;
        let served = simulate(
            quota(100, 1, &[3.0, 1.0, 1.0]),
            &[flood(T0, end), flood(T0, end), flood(T0, end)],
            end,
            1_500_000,
        );
        let got: Vec<usize> = (0..3).map(|c| served.between(c, T0, end)).collect();
        for (c, want) in [600.0, 200.0, 200.0].iter().enumerate() {
            assert!(within(got[c], *want, 0.05), "{got:?}");
        }
        assert!(got.iter().sum::<usize>() >= 990, "{got:?}");
        assert!(served.busiest(SECOND) <= 101, "{}", served.busiest(SECOND));
    }

    #[test]
    fn an_idle_client_s_share_goes_to_the_others_until_it_asks() {
        let (half, end) = (T0 + 5 * SECOND, T0 + 10 * SECOND);
        let served = simulate(
            quota(100, 1, &[3.0, 1.0, 1.0]),
            &[flood(T0, end), flood(T0, end), flood(half, end)],
            end,
            1_500_000,
        );
        let first: Vec<usize> = (0..3).map(|c| served.between(c, T0, half)).collect();
        assert!(
            within(first[0], 375.0, 0.05) && within(first[1], 125.0, 0.05),
            "{first:?}"
        );
        assert_eq!(first[2], 0);
        // The late client's share is its own from its first second on.
        let settled = half + SECOND;
        let second: Vec<usize> = (0..3).map(|c| served.between(c, settled, end)).collect();
        for (c, want) in [240.0, 80.0, 80.0].iter().enumerate() {
            assert!(within(second[c], *want, 0.1), "{second:?}");
        }
    }

    #[test]
    fn a_steady_client_within_its_share_is_not_behind_a_flood() {
        // 20/s; checkout (3) asks 13.3/s, within its 15 but more than the
        // half a race between the two lines would give it; the batch (1)
        // floods with 24 callers; 1.5 s of patience.
        let end = T0 + 20 * SECOND;
        let checkout = Asker {
            load: Load::Paced { every: 75_000 },
            from: T0,
            to: end,
        };
        let served = simulate(
            quota(20, 1, &[3.0, 1.0]),
            &[checkout, flood(T0, end)],
            end,
            1_500_000,
        );
        let asked = 266;
        assert_eq!(served.refused[0], 0);
        assert!(served.at[0].len() >= asked - 1, "{}", served.at[0].len());
        let mut waits = served.waited[0].clone();
        waits.sort_unstable();
        let p95 = waits[waits.len() * 95 / 100];
        assert!(p95 <= 60_000, "checkout's p95 wait {p95} µs");
        // The batch gets what checkout leaves: the quota is used.
        let batch = served.between(1, T0 + SECOND, end);
        assert!(within(batch, 380.0 - 253.0, 0.05), "{batch}");
        assert!(served.busiest(SECOND) <= 21, "{}", served.busiest(SECOND));
    }

    #[test]
    fn a_cap_holds_and_what_it_leaves_goes_to_the_others() {
        let end = T0 + 10 * SECOND;
        let mut fair = quota(100, 1, &[9.0, 1.0]);
        fair.clients[0].cap_interval = Some(SECOND / 10);
        let served = simulate(fair, &[flood(T0, end), flood(T0, end)], end, 1_500_000);
        let (capped, other) = (served.between(0, T0, end), served.between(1, T0, end));
        assert!(within(capped, 100.0, 0.02), "{capped}");
        assert!(within(other, 900.0, 0.02), "{other}");
    }
}
