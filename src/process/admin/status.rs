//! `GET /` on the admin listener: one HTML page a person can read at a
//! glance, rendered on the server, with no asset from elsewhere, refreshing
//! itself every few seconds. Its figures are read from the same exposition
//! `/metrics` serves, so the page and the scrape never disagree. It only
//! reads: for each action it shows the command, not a button.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::base::build;
use crate::gateway::Gateway;
use crate::observe::metrics::ErrorSeen;

/// Seconds between the page's own refreshes.
pub const REFRESH_SECONDS: u64 = 5;

/// What the page says beside the gateway's own state.
pub struct Page {
    started: Instant,
    /// Where the actions it shows are sent.
    control: SocketAddr,
    /// Whether the control listener wants a bearer token.
    control_token: bool,
    /// The quota clients' granted slots at the last view, for the rate now.
    last: Mutex<Option<Granted>>,
}

/// When the quota clients' granted slots were read, and each client's.
type Granted = (Instant, Vec<(String, f64)>);

/// What the page shows of the push receiver.
pub struct Pushes {
    /// Deliveries pending, and given up, counted up to a page's worth.
    pub pending: usize,
    pub dead: usize,
    /// Whether either count stopped at the page's limit.
    pub more: bool,
}

/// One sample of the exposition: its name, its labels as written, its value.
struct Sample<'a> {
    name: &'a str,
    labels: &'a str,
    value: f64,
}

/// The samples of a Prometheus text exposition (comments skipped).
struct Exposition<'a> {
    samples: Vec<Sample<'a>>,
}

impl<'a> Exposition<'a> {
    fn parse(text: &'a str) -> Exposition<'a> {
        let samples = text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .filter_map(|line| {
                let (series, value) = line.rsplit_once(' ')?;
                let (name, labels) = match series.split_once('{') {
                    Some((name, rest)) => (name, rest.strip_suffix('}')?),
                    None => (series, ""),
                };
                Some(Sample {
                    name,
                    labels,
                    value: value.parse().ok()?,
                })
            })
            .collect();
        Exposition { samples }
    }

    /// The sum of `name`'s samples whose labels include each of `with`.
    fn sum(&self, name: &str, with: &[(&str, &str)]) -> f64 {
        self.samples
            .iter()
            .filter(|s| s.name == name && with.iter().all(|(k, v)| has_label(s.labels, k, v)))
            .map(|s| s.value)
            .sum()
    }

    /// Each value of label `label` on `name`, with its sample's value.
    fn by_label(&self, name: &str, label: &str) -> Vec<(String, f64)> {
        self.samples
            .iter()
            .filter(|s| s.name == name)
            .filter_map(|s| Some((label_value(s.labels, label)?, s.value)))
            .collect()
    }
}

fn has_label(labels: &str, key: &str, value: &str) -> bool {
    label_value(labels, key).as_deref() == Some(value)
}

/// The value of `key` among `k="v",...` (values as the exposition escapes
/// them; the names and codes shown here have no quotes in them).
fn label_value(labels: &str, key: &str) -> Option<String> {
    labels.split("\",").find_map(|pair| {
        let (k, v) = pair.split_once("=\"")?;
        (k.trim_start_matches(',') == key).then(|| v.trim_end_matches('"').to_owned())
    })
}

/// `s` with `&`, `<`, `>`, `"` and `'` escaped for HTML text and attributes.
fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// An AccessKey as the page shows it: its first 4 characters.
fn redacted_key(key: &str) -> String {
    let shown: String = key.chars().take(4).collect();
    format!("{shown}… ({} characters)", key.chars().count())
}

fn uptime(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..60 => format!("{s} s"),
        60..3600 => format!("{} min {} s", s / 60, s % 60),
        3600..86_400 => format!("{} h {} min", s / 3600, (s % 3600) / 60),
        _ => format!("{} d {} h", s / 86_400, (s % 86_400) / 3600),
    }
}

impl Page {
    pub fn new(control: SocketAddr, control_token: bool) -> Page {
        Page {
            started: Instant::now(),
            control,
            control_token,
            last: Mutex::new(None),
        }
    }

    /// The page for `gateway` as it is now; `exposition` is what `/metrics`
    /// would answer, `ready` what `/readyz` says.
    pub fn render(
        &self,
        gateway: &Gateway,
        exposition: &str,
        ready: &str,
        pushes: Option<&Pushes>,
    ) -> String {
        let m = Exposition::parse(exposition);
        let mut h = String::with_capacity(16 * 1024);
        let _ = write!(
            h,
            "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
             <meta http-equiv=\"refresh\" content=\"{REFRESH_SECONDS}\">\
             <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
             <title>pandagate status</title><style>{STYLE}</style></head><body>"
        );
        let _ = write!(
            h,
            "<header><h1>pandagate</h1><p id=\"build\">version {} · commit {} · up {} · {}</p></header>",
            escape(build::VERSION_NUMBER),
            escape(build::COMMIT),
            uptime(self.started.elapsed()),
            escape(ready.trim()),
        );
        self.profiles(&mut h, gateway);
        self.quota(&mut h, gateway, &m);
        self.resilience(&mut h, gateway, &m);
        self.cache(&mut h, &m);
        self.pushes(&mut h, pushes);
        errors(&mut h, &gateway.lasting().metrics.errors_seen());
        self.actions(&mut h);
        let _ = write!(
            h,
            "<footer>Refreshes every {REFRESH_SECONDS} s. Read-only: every figure is also in \
             <a href=\"/metrics\">/metrics</a>.</footer></body></html>"
        );
        h
    }

    fn profiles(&self, h: &mut String, gateway: &Gateway) {
        let _ = write!(
            h,
            "<section id=\"profiles\"><h2>Profiles</h2><table><tr><th>profile</th>\
             <th>AccessKey</th><th>quota key</th><th>default</th></tr>"
        );
        let default = &gateway.profiles().default_profile().name;
        for p in gateway.profiles().iter() {
            let key = p.access_key.to_str().unwrap_or("");
            let _ = write!(
                h,
                "<tr><td>{}</td><td>{}</td><td>#{}</td><td>{}</td></tr>",
                escape(&p.name),
                escape(&redacted_key(key)),
                p.quota_key + 1,
                if p.name == *default { "yes" } else { "" },
            );
        }
        h.push_str("</table></section>");
    }

    fn quota(&self, h: &mut String, gateway: &Gateway, m: &Exposition<'_>) {
        let _ = write!(h, "<section id=\"quota\"><h2>Quota</h2>");
        match gateway.quota_config() {
            None => h.push_str("<p>No quota set (<code>[rate_limit]</code> absent).</p>"),
            Some(q) => {
                let _ = write!(
                    h,
                    "<p>{} calls/s, burst {}, per AccessKey; backend {}{}.</p>",
                    q.requests_per_second,
                    q.burst
                        .map_or("one second's worth".to_owned(), |b| b.to_string()),
                    escape(&format!("{:?}", q.backend).to_lowercase()),
                    if m.sum("pandagate_rate_limit_fallback", &[]) > 0.0 {
                        " — <strong>Redis away, fallback in force</strong>"
                    } else {
                        ""
                    },
                );
            }
        }
        let granted = m.by_label("pandagate_quota_granted_total", "client");
        let refused = m.by_label("pandagate_quota_refused_total", "client");
        let now = Instant::now();
        let rates = {
            let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
            let rates: Vec<Option<f64>> = granted
                .iter()
                .map(|(client, n)| {
                    let (at, before) = last.as_ref()?;
                    let secs = now.duration_since(*at).as_secs_f64();
                    let (_, b) = before.iter().find(|(c, _)| c == client)?;
                    (secs >= 0.5).then(|| (n - b) / secs)
                })
                .collect();
            let stale = last
                .as_ref()
                .is_none_or(|(at, _)| now.duration_since(*at) >= Duration::from_millis(500));
            if stale {
                *last = Some((now, granted.clone()));
            }
            rates
        };
        let _ = write!(
            h,
            "<table><tr><th>client</th><th>granted</th><th>refused (429)</th>\
             <th>granted now, per s</th></tr>"
        );
        for ((client, n), rate) in granted.iter().zip(rates) {
            let refused = refused
                .iter()
                .find(|(c, _)| c == client)
                .map_or(0.0, |(_, r)| *r);
            let rate = rate.map_or("—".to_owned(), |r| format!("{r:.1}"));
            let _ = write!(
                h,
                "<tr><td>{}</td><td>{n}</td><td>{refused}</td><td>{rate}</td></tr>",
                escape(client)
            );
        }
        h.push_str("</table></section>");
    }

    fn resilience(&self, h: &mut String, gateway: &Gateway, m: &Exposition<'_>) {
        let circuit = match m.sum("pandagate_circuit_state", &[]) as i64 {
            0 => "closed",
            1 => "<strong>open</strong>: calls are refused until the provider is tried again",
            _ => "half-open: trying the provider again",
        };
        let _ = write!(
            h,
            "<section id=\"resilience\"><h2>Circuit and retries</h2><table>\
             <tr><th>circuit</th><td>{circuit}</td></tr>\
             <tr><th>retries made</th><td>{}</td></tr>\
             <tr><th>retries refused by the budget</th><td>{}</td></tr>\
             <tr><th>calls in flight</th><td>{}</td></tr>\
             <tr><th>calls answered</th><td>{}</td></tr></table></section>",
            m.sum("pandagate_retries_total", &[]),
            m.sum("pandagate_retries_budget_refused_total", &[]),
            m.sum("pandagate_calls_in_flight", &[]),
            m.sum("pandagate_calls_total", &[]),
        );
        let _ = gateway;
    }

    fn cache(&self, h: &mut String, m: &Exposition<'_>) {
        let count = |result| m.sum("pandagate_cache_requests_total", &[("result", result)]);
        let (hit, miss, stale, coalesced) = (
            count("hit"),
            count("miss"),
            count("stale"),
            count("coalesced"),
        );
        let looked = hit + miss + stale + coalesced;
        let ratio = if looked > 0.0 {
            format!("{:.0} %", 100.0 * (hit + coalesced) / looked)
        } else {
            "— (no cached route called yet)".to_owned()
        };
        let _ = write!(
            h,
            "<section id=\"cache\"><h2>Read cache</h2><table>\
             <tr><th>hit ratio</th><td>{ratio}</td></tr>\
             <tr><th>hits, misses, stale, coalesced</th><td>{hit}, {miss}, {stale}, {coalesced}</td></tr>\
             <tr><th>size</th><td>{:.1} KiB</td></tr></table></section>",
            m.sum("pandagate_cache_bytes", &[]) / 1024.0,
        );
    }

    fn pushes(&self, h: &mut String, pushes: Option<&Pushes>) {
        h.push_str("<section id=\"pushes\"><h2>Pushed messages</h2>");
        match pushes {
            None => h.push_str("<p>No push receiver (<code>[callbacks]</code> absent).</p>"),
            Some(p) => {
                let more = if p.more { " (at least)" } else { "" };
                let _ = write!(
                    h,
                    "<table><tr><th>deliveries pending</th><td>{}{more}</td></tr>\
                     <tr><th>dead letters</th><td>{}{more}</td></tr></table>",
                    p.pending, p.dead
                );
            }
        }
        h.push_str("</section>");
    }

    fn actions(&self, h: &mut String) {
        let auth = if self.control_token {
            " -H \"Authorization: Bearer $PANDAGATE_CONTROL_TOKEN\""
        } else {
            ""
        };
        let c = self.control;
        let _ = write!(
            h,
            "<section id=\"actions\"><h2>Actions</h2><p>On the control listener, from where it \
             can be reached:</p><table>\
             <tr><th>reload the config</th><td><code>curl -X POST{auth} http://{c}/reload</code></td></tr>\
             <tr><th>purge cached answers</th><td><code>curl -X POST{auth} 'http://{c}/cache/purge?prefix=/'</code></td></tr>\
             <tr><th>list dead letters</th><td><code>pandagate callbacks list --dead</code></td></tr>\
             <tr><th>replay dead letters</th><td><code>pandagate callbacks replay --all-dead</code></td></tr>\
             <tr><th>drain and exit</th><td><code>curl -X POST{auth} http://{c}/quitquitquit</code></td></tr>\
             </table></section>",
        );
    }
}

fn errors(h: &mut String, seen: &[ErrorSeen]) {
    h.push_str("<section id=\"errors\"><h2>Errors by kind</h2>");
    if seen.is_empty() {
        h.push_str("<p>None since start.</p></section>");
        return;
    }
    h.push_str("<table><tr><th>kind</th><th>calls</th><th>last</th><th>last message</th></tr>");
    let mut seen = seen.to_vec();
    seen.sort_by_key(|e| std::cmp::Reverse(e.last));
    for e in &seen {
        let _ = write!(
            h,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            escape(e.kind),
            e.count,
            httpdate::fmt_http_date(e.last),
            escape(&e.message),
        );
    }
    h.push_str("</table></section>");
}

const STYLE: &str = "body{font:15px/1.4 system-ui,sans-serif;margin:1.5em auto;max-width:60em;\
color:#1b1b1b;padding:0 1em}h1{margin:0}header p{color:#555;margin:.2em 0 1em}\
h2{font-size:1.05em;margin:1.4em 0 .4em;border-bottom:1px solid #ddd}\
table{border-collapse:collapse;width:100%}th,td{text-align:left;padding:.25em .6em;\
border-bottom:1px solid #eee;vertical-align:top}th{font-weight:600;width:16em}\
code{background:#f3f3f3;padding:.1em .3em;border-radius:3px}footer{margin-top:2em;color:#777}";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exposition_is_read_by_name_and_label() {
        let text = "# HELP x y\n# TYPE pandagate_quota_granted counter\n\
                    pandagate_quota_granted_total{client=\"orders\"} 12\n\
                    pandagate_quota_granted_total{client=\"reports\"} 3\n\
                    pandagate_cache_requests_total{result=\"hit\"} 4\n\
                    pandagate_calls_in_flight 2\n";
        let m = Exposition::parse(text);
        assert_eq!(m.sum("pandagate_quota_granted_total", &[]), 15.0);
        assert_eq!(
            m.sum("pandagate_quota_granted_total", &[("client", "reports")]),
            3.0
        );
        assert_eq!(m.sum("pandagate_calls_in_flight", &[]), 2.0);
        assert_eq!(
            m.by_label("pandagate_quota_granted_total", "client"),
            vec![("orders".to_owned(), 12.0), ("reports".to_owned(), 3.0)]
        );
        assert_eq!(label_value("a=\"1\",b=\"2\"", "b").as_deref(), Some("2"));
    }

    #[test]
    fn text_is_escaped_and_keys_are_cut() {
        assert_eq!(
            escape("<script>\"x\" & 'y'"),
            "&lt;script&gt;&quot;x&quot; &amp; &#39;y&#39;"
        );
        let shown = redacted_key("AK-0123456789");
        assert!(shown.starts_with("AK-0…"), "{shown}");
        assert!(!shown.contains("0123456789"), "{shown}");
    }
}
