//! The Grafana dashboard and the alerting rules in deploy/ stay true to the
//! binary: every metric (and label) they use is one `/metrics` exports,
//! every exported family is on the dashboard, the plain rule file and the
//! PrometheusRule carry the same rules, and promtool accepts the rules and
//! every dashboard query. promtool is the Debian package `prometheus`
//! (`scripts/test` installs it); without it these tests fail.

use crate::support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use serde_json::Value;
use wiremock::ResponseTemplate;

const DASHBOARD: &str = "deploy/grafana/pandagate.json";
const RULES: &str = "deploy/prometheus/pandagate-rules.yaml";
const PROMETHEUS_RULE: &str = "deploy/prometheus/pandagate-prometheusrule.yaml";

/// Labels Prometheus adds to every scraped series.
const TARGET_LABELS: &[&str] = &["job", "instance"];

/// Exported families deliberately left off the dashboard (none today).
const NOT_ON_DASHBOARD: &[&str] = &[];

/// The alerts the rule files must have (deploy/DASHBOARDS.md describes each).
const ALERTS: &[&str] = &[
    "PandagateCircuitOpen",
    "PandagateRetryBudgetExhausted",
    "PandagateRateLimitRedisFallback",
    "PandagateHighErrorRatio",
    "PandagateCallbacksDeadLettered",
    "PandagateCallbackDeliveryLagHigh",
    "PandagateCallbackDeliveriesFailing",
    "PandagateSecretReloadFailed",
    "PandagateAccessLogDropped",
];

const SECRET: &str = "sk-dashboards";

fn path(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)
}

fn read(relative: &str) -> String {
    std::fs::read_to_string(path(relative)).unwrap_or_else(|e| panic!("{relative}: {e}"))
}

// ------------------------------------------------------------------ scrape

/// What one `/metrics` answer exports.
#[derive(Debug, Default)]
struct Exported {
    /// Family name (as in `# TYPE`) and its type.
    families: BTreeMap<String, String>,
    /// Every name a query may use: sample names, and the names each
    /// family's type gives (`_total`, `_bucket`, `_sum`, `_count`), so a
    /// family with no sample yet still counts.
    names: BTreeSet<String>,
    /// The label names seen on each sample name.
    labels: BTreeMap<String, BTreeSet<String>>,
}

impl Exported {
    fn parse(text: &str) -> Exported {
        let mut e = Exported::default();
        for line in text.lines() {
            let line = line.trim();
            if line.is_empty() || line == "# EOF" {
                continue;
            }
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let mut parts = rest.split_whitespace();
                let (name, kind) = (parts.next().unwrap(), parts.next().unwrap());
                e.families.insert(name.to_owned(), kind.to_owned());
                continue;
            }
            if line.starts_with('#') {
                continue;
            }
            let end = line
                .find(|c: char| c == '{' || c.is_whitespace())
                .unwrap_or_else(|| panic!("a sample line has a value: {line:?}"));
            let name = &line[..end];
            let labels = e.labels.entry(name.to_owned()).or_default();
            if line[end..].starts_with('{') {
                labels.extend(sample_label_names(&line[end + 1..]));
            }
            e.names.insert(name.to_owned());
        }
        for (family, kind) in &e.families {
            let names: Vec<String> = match kind.as_str() {
                "counter" => {
                    let base = family.strip_suffix("_total").unwrap_or(family);
                    vec![format!("{base}_total")]
                }
                "histogram" => ["_bucket", "_sum", "_count"]
                    .iter()
                    .map(|s| format!("{family}{s}"))
                    .collect(),
                "summary" => ["", "_sum", "_count"]
                    .iter()
                    .map(|s| format!("{family}{s}"))
                    .collect(),
                _ => vec![family.clone()],
            };
            e.names.extend(names);
        }
        e
    }

    /// The family a sample name belongs to.
    fn family_of(&self, name: &str) -> Option<&str> {
        if let Some((family, _)) = self.families.get_key_value(name) {
            return Some(family);
        }
        for suffix in ["_total", "_bucket", "_sum", "_count", "_created"] {
            if let Some(base) = name.strip_suffix(suffix)
                && let Some((family, _)) = self.families.get_key_value(base)
            {
                return Some(family);
            }
        }
        None
    }
}

/// The label names in `a="x",b="y"}...`.
fn sample_label_names(s: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        let name: String =
            std::iter::from_fn(|| chars.next_if(|c| *c != '=' && *c != '}')).collect();
        match chars.next() {
            Some('=') => {}
            _ => return names,
        }
        names.push(name.trim_start_matches(',').trim().to_owned());
        assert_eq!(chars.next(), Some('"'), "a quoted label value in {s:?}");
        while let Some(c) = chars.next() {
            match c {
                '\\' => {
                    chars.next();
                }
                '"' => break,
                _ => {}
            }
        }
    }
}

fn config(dir: &Path, subscriber: &str, collector: &str) -> PathBuf {
    let file = dir.join("pandagate.toml");
    let text = format!(
        "[retry]\nbackoff_base_ms = 1\nbackoff_cap_ms = 1\n\n\
         [telemetry]\notlp_endpoint = \"{collector}\"\n\n\
         [rate_limit]\nrequests_per_second = 1000\nburst = 1000\n\n\
         [[routes]]\nprefix = \"/open/product/\"\ncache_ttl_ms = 30000\n\n\
         [idempotency]\nstore = \"local\"\npath = \"{idempotency}\"\n\n\
         [callbacks]\nstore = \"{store}\"\nbackoff_base_ms = 20\nbackoff_cap_ms = 50\n\n\
         [[callbacks.subscribers]]\nurl = \"{subscriber}\"\n",
        idempotency = dir.join("idempotency").display(),
        store = dir.join("store").display(),
    );
    std::fs::write(&file, text).unwrap();
    file
}

/// `/metrics` of the real binary with callbacks, a rate limit, an
/// idempotency store, a cached route and trace export configured, after calls that give every labelled
/// family a sample: a read retried after a 503, a keyed write, a push
/// delivered.
async fn scrape_a_busy_gateway() -> String {
    let dir = tempfile::tempdir().unwrap();
    let upstream = support::provider::upstream_failing_first(
        1,
        ResponseTemplate::new(503),
        ResponseTemplate::new(200).set_body_raw(
            support::provider_body("r1", 200, "success"),
            "application/json",
        ),
    )
    .await;
    let subscriber = support::upstream_answering(ResponseTemplate::new(200)).await;
    let collector = support::upstream_answering(ResponseTemplate::new(200)).await;
    let config = config(
        dir.path(),
        &format!("{}/events", subscriber.uri()),
        &collector.uri(),
    );
    let gw = support::launch(
        &["--config", config.to_str().unwrap()],
        &[
            ("PANDAPON_ACCESS_KEY", "ak-dashboards"),
            ("PANDAPON_ACCESS_SECRET", SECRET),
            ("PANDAGATE_UPSTREAM", &upstream.uri()),
        ],
    )
    .await;

    let read = support::get(&format!("http://{}/open/product/get", gw.gateway)).await;
    assert_eq!(read.status, 200, "the read is retried after the 503");
    let write = Request::post(format!("http://{}/alibaba/order/create", gw.gateway))
        .header("idempotency-key", "dashboards-1")
        .body(Full::new(Bytes::from_static(b"{}")))
        .unwrap();
    assert_eq!(support::send(write).await.status, 200);
    assert_eq!(support::push_signed(&gw.gateway, SECRET, "D1").await, 200);

    let metrics = format!("http://{}/metrics", gw.admin);
    for _ in 0..500 {
        let text = String::from_utf8(support::get(&metrics).await.body.to_vec()).unwrap();
        let done = [
            "pandagate_callbacks_delivered_total 1",
            r#"pandagate_retries_total{reason="503"} 1"#,
            r#"pandagate_idempotency_total{result="new"} 1"#,
        ]
        .iter()
        .all(|line| text.contains(line));
        if done {
            return text;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let text = String::from_utf8(support::get(&metrics).await.body.to_vec()).unwrap();
    panic!("the push was not delivered (or the calls not counted) within 10 s:\n{text}");
}

// ------------------------------------------------------------------ PromQL

#[derive(Debug, Clone, PartialEq)]
enum Token {
    Ident(String),
    Str,
    Punct(char),
}

/// PromQL (or a Grafana variable query) as tokens; strings, numbers and
/// range selectors carry no names, so they are kept only as placeholders.
fn tokens(expr: &str) -> Vec<Token> {
    let mut out = Vec::new();
    let mut chars = expr.chars().peekable();
    while let Some(&c) = chars.peek() {
        if c.is_whitespace() {
            chars.next();
        } else if c == '"' || c == '\'' || c == '`' {
            chars.next();
            while let Some(d) = chars.next() {
                if d == '\\' && c != '`' {
                    chars.next();
                } else if d == c {
                    break;
                }
            }
            out.push(Token::Str);
        } else if c == '[' {
            for d in chars.by_ref() {
                if d == ']' {
                    break;
                }
            }
        } else if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let ident: String = std::iter::from_fn(|| {
                chars.next_if(|d| d.is_ascii_alphanumeric() || *d == '_' || *d == ':')
            })
            .collect();
            out.push(Token::Ident(ident));
        } else if c.is_ascii_digit() || c == '.' {
            while chars
                .next_if(|d| d.is_ascii_alphanumeric() || *d == '.')
                .is_some()
            {}
        } else {
            out.push(Token::Punct(c));
            chars.next();
        }
    }
    out
}

/// What one expression uses.
#[derive(Debug, Default)]
struct Uses {
    /// Metric names (`pandagate_...`).
    metrics: BTreeSet<String>,
    /// Each `pandagate_` selector with label matchers, and their labels.
    matchers: Vec<(String, BTreeSet<String>)>,
    /// Each `pandagate_` selector without any.
    bare: Vec<String>,
    /// (labels of a `by`/`without` clause, the metrics it aggregates).
    groupings: Vec<(BTreeSet<String>, BTreeSet<String>)>,
}

fn uses(expr: &str) -> Uses {
    let t = tokens(expr);
    let mut u = Uses::default();
    let metrics_in = |range: std::ops::Range<usize>| -> BTreeSet<String> {
        t[range]
            .iter()
            .filter_map(|tok| match tok {
                Token::Ident(i) if i.starts_with("pandagate_") => Some(i.clone()),
                _ => None,
            })
            .collect()
    };
    let matching = |open: usize| -> usize {
        let mut depth = 0;
        for (j, tok) in t.iter().enumerate().skip(open) {
            match tok {
                Token::Punct('(') => depth += 1,
                Token::Punct(')') => {
                    depth -= 1;
                    if depth == 0 {
                        return j;
                    }
                }
                _ => {}
            }
        }
        panic!("unbalanced parentheses in {expr:?}");
    };
    // The last parenthesised group closed before each token.
    let mut last_group: Option<(usize, usize)> = None;
    let mut opens = Vec::new();
    let mut i = 0;
    while i < t.len() {
        match &t[i] {
            Token::Punct('(') => opens.push(i),
            Token::Punct(')') => last_group = opens.pop().map(|o| (o, i)),
            Token::Ident(name) if name.starts_with("pandagate_") => {
                u.metrics.insert(name.clone());
                if t.get(i + 1) == Some(&Token::Punct('{')) {
                    let mut labels = BTreeSet::new();
                    let mut j = i + 2;
                    while j < t.len() && t[j] != Token::Punct('}') {
                        if let Token::Ident(label) = &t[j]
                            && matches!(t[j - 1], Token::Punct('{') | Token::Punct(','))
                        {
                            labels.insert(label.clone());
                        }
                        j += 1;
                    }
                    u.matchers.push((name.clone(), labels));
                    i = j;
                } else {
                    u.bare.push(name.clone());
                }
            }
            Token::Ident(kw)
                if (kw == "by" || kw == "without") && t.get(i + 1) == Some(&Token::Punct('(')) =>
            {
                let close = matching(i + 1);
                let labels: BTreeSet<String> = t[i + 2..close]
                    .iter()
                    .filter_map(|tok| match tok {
                        Token::Ident(l) => Some(l.clone()),
                        _ => None,
                    })
                    .collect();
                let group = if t.get(close + 1) == Some(&Token::Punct('(')) {
                    let end = matching(close + 1);
                    close + 1..end
                } else {
                    let (o, c) = last_group.expect("`by` after a group");
                    o..c
                };
                u.groupings.push((labels, metrics_in(group)));
                i = close;
            }
            _ => {}
        }
        i += 1;
    }
    u
}

/// Where each expression comes from, and the expression.
type Exprs = Vec<(String, String)>;

/// Every PromQL expression of the dashboard's panels (rows included), and
/// the queries of its template variables.
fn dashboard_exprs(dashboard: &Value) -> (Exprs, Exprs) {
    fn walk(panel: &Value, out: &mut Exprs) {
        let title = panel["title"].as_str().unwrap_or("?");
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().unwrap_or_default();
            let ref_id = target["refId"].as_str().unwrap_or("?");
            out.push((format!("panel {title:?} {ref_id}"), expr.to_owned()));
        }
        for inner in panel["panels"].as_array().into_iter().flatten() {
            walk(inner, out);
        }
    }
    let mut panels = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        walk(panel, &mut panels);
    }
    let mut variables = Vec::new();
    for var in dashboard["templating"]["list"]
        .as_array()
        .expect("templating.list")
    {
        if var["type"] == "query" {
            let query = match &var["query"] {
                Value::String(s) => s.clone(),
                q => q["query"].as_str().unwrap_or_default().to_owned(),
            };
            variables.push((format!("variable {}", var["name"]), query));
        }
    }
    (panels, variables)
}

fn rule_exprs(file: &str, groups: &Yaml) -> Exprs {
    let mut out = Vec::new();
    for group in groups.seq() {
        for rule in group.get("rules").seq() {
            let name = rule
                .opt("alert")
                .or(rule.opt("record"))
                .map_or("?", Yaml::str);
            out.push((format!("{file} {name}"), rule.get("expr").str().to_owned()));
        }
    }
    out
}

fn dashboard() -> Value {
    serde_json::from_str(&read(DASHBOARD)).expect("the dashboard is JSON")
}

// ------------------------------------------------------------------ tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_and_rules_use_only_exported_metrics_and_labels() {
    let exported = Exported::parse(&scrape_a_busy_gateway().await);
    assert!(
        exported.families.len() >= 20,
        "too few families scraped: {:?}",
        exported.families
    );

    let (panels, variables) = dashboard_exprs(&dashboard());
    let mut all: Exprs = panels.clone();
    all.extend(variables);
    all.extend(rule_exprs(RULES, &plain_groups()));
    all.extend(rule_exprs(PROMETHEUS_RULE, &operator_groups()));

    let mut missing: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut bad_labels = Vec::new();
    let labels_of = |metric: &str| -> BTreeSet<String> {
        let mut l: BTreeSet<String> = exported.labels.get(metric).cloned().unwrap_or_default();
        l.extend(TARGET_LABELS.iter().map(|s| s.to_string()));
        l
    };
    for (place, expr) in &all {
        let u = uses(expr);
        for metric in &u.metrics {
            if !exported.names.contains(metric) {
                missing
                    .entry(metric.clone())
                    .or_default()
                    .push(place.clone());
            }
        }
        for (metric, labels) in &u.matchers {
            let known = labels_of(metric);
            for label in labels.iter().filter(|l| !known.contains(*l)) {
                bad_labels.push(format!(
                    "{place}: {metric} has no label {label:?} (has {known:?})"
                ));
            }
        }
        for (labels, metrics) in &u.groupings {
            for metric in metrics {
                let known = labels_of(metric);
                for label in labels.iter().filter(|l| !known.contains(*l)) {
                    bad_labels.push(format!(
                        "{place}: by/without ({label}) but {metric} has no label {label:?} (has {known:?})"
                    ));
                }
            }
        }
    }
    assert!(
        missing.is_empty(),
        "metrics used but not exported by the binary:\n{}\nexported names: {:#?}",
        missing
            .iter()
            .map(|(m, places)| format!("  {m}  (in {})", places.join("; ")))
            .collect::<Vec<_>>()
            .join("\n"),
        exported.names
    );
    assert!(
        bad_labels.is_empty(),
        "labels not exported:\n{}",
        bad_labels.join("\n")
    );

    // The other way round: every exported family is on some panel.
    let on_dashboard: BTreeSet<String> = panels
        .iter()
        .flat_map(|(_, e)| uses(e).metrics)
        .filter_map(|m| exported.family_of(&m).map(str::to_owned))
        .collect();
    let off: Vec<&String> = exported
        .families
        .keys()
        .filter(|f| !on_dashboard.contains(*f) && !NOT_ON_DASHBOARD.contains(&f.as_str()))
        .collect();
    assert!(
        off.is_empty(),
        "exported but on no dashboard panel: {off:?}; add a panel to {DASHBOARD} \
         (and a line to deploy/DASHBOARDS.md), or list the family in NOT_ON_DASHBOARD"
    );
}

#[test]
fn dashboard_is_well_formed() {
    let d = dashboard();
    let schema = d["schemaVersion"].as_u64().expect("schemaVersion");
    assert!(schema >= 38, "schemaVersion {schema} < 38");
    assert!(d["uid"].as_str().is_some_and(|u| !u.is_empty()), "a uid");
    let vars = d["templating"]["list"].as_array().expect("templating.list");
    assert!(
        vars.iter().any(|v| v["name"] == "datasource"
            && v["type"] == "datasource"
            && v["query"] == "prometheus"),
        "a `datasource` variable of type prometheus: {vars:#?}"
    );
    for name in ["job", "instance"] {
        assert!(
            vars.iter()
                .any(|v| v["name"] == name && v["type"] == "query"),
            "a `{name}` variable"
        );
    }

    let mut problems = Vec::new();
    let mut ids = BTreeSet::new();
    let mut panels = 0;
    for p in d["panels"].as_array().expect("panels") {
        let title = p["title"].as_str().unwrap_or("?");
        let id = p["id"].as_u64().expect("every panel has an id");
        if !ids.insert(id) {
            problems.push(format!("{title}: id {id} used twice"));
        }
        let g = &p["gridPos"];
        let (x, w) = (g["x"].as_u64().unwrap_or(99), g["w"].as_u64().unwrap_or(99));
        if x + w > 24 || g["h"].as_u64().unwrap_or(0) == 0 {
            problems.push(format!("{title}: gridPos {g} outside the 24-column grid"));
        }
        if p["type"] == "row" {
            continue;
        }
        panels += 1;
        if p["description"]
            .as_str()
            .is_none_or(|s| s.trim().len() < 20)
        {
            problems.push(format!("{title}: no description"));
        }
        if p["datasource"]["uid"] != "${datasource}" {
            problems.push(format!("{title}: datasource is not ${{datasource}}"));
        }
        let targets = p["targets"].as_array().cloned().unwrap_or_default();
        if targets.is_empty() {
            problems.push(format!("{title}: no query"));
        }
        let mut ref_ids = BTreeSet::new();
        for t in &targets {
            let expr = t["expr"].as_str().unwrap_or_default();
            if !ref_ids.insert(t["refId"].as_str().unwrap_or_default().to_owned()) {
                problems.push(format!("{title}: refId {} used twice", t["refId"]));
            }
            if !t["datasource"].is_null() && t["datasource"]["uid"] != "${datasource}" {
                problems.push(format!(
                    "{title}: a query's datasource is not ${{datasource}}"
                ));
            }
            let u = uses(expr);
            if u.metrics.is_empty() {
                problems.push(format!("{title}: query {expr:?} uses no pandagate_ metric"));
            }
            // Every selector follows the job and instance variables.
            for (metric, labels) in &u.matchers {
                if !labels.contains("job") || !labels.contains("instance") {
                    problems.push(format!(
                        "{title}: {metric} is not filtered by $job and $instance"
                    ));
                }
            }
            for metric in &u.bare {
                problems.push(format!(
                    "{title}: {metric} is not filtered by $job and $instance"
                ));
            }
        }
    }
    assert!(panels >= 20, "only {panels} panels");
    assert!(
        problems.is_empty(),
        "dashboard problems:\n{}",
        problems.join("\n")
    );
}

#[test]
fn plain_rules_and_prometheus_rule_carry_the_same_rules() {
    let operator = parse_yaml(&read(PROMETHEUS_RULE));
    assert_eq!(operator.get("apiVersion").str(), "monitoring.coreos.com/v1");
    assert_eq!(operator.get("kind").str(), "PrometheusRule");
    assert!(!operator.get("metadata").get("name").str().is_empty());

    let (plain, operator) = (plain_groups(), operator_groups());
    let mut differences = Vec::new();
    let plain_groups = plain.seq();
    let operator_groups = operator.seq();
    if plain_groups.len() != operator_groups.len() {
        differences.push(format!(
            "{} groups in {RULES}, {} in {PROMETHEUS_RULE}",
            plain_groups.len(),
            operator_groups.len()
        ));
    }
    for (a, b) in plain_groups.iter().zip(operator_groups) {
        let group = a.get("name").str();
        if a.get("name") != b.get("name") {
            differences.push(format!(
                "group {group:?} is {:?} in {PROMETHEUS_RULE}",
                b.get("name")
            ));
        }
        let by_name = |g: &Yaml| -> BTreeMap<String, Yaml> {
            g.get("rules")
                .seq()
                .iter()
                .map(|r| {
                    (
                        r.opt("alert")
                            .or(r.opt("record"))
                            .expect("alert or record")
                            .str()
                            .to_owned(),
                        r.clone(),
                    )
                })
                .collect()
        };
        let (ra, rb) = (by_name(a), by_name(b));
        for name in ra.keys().chain(rb.keys()).collect::<BTreeSet<_>>() {
            match (ra.get(name), rb.get(name)) {
                (Some(x), Some(y)) => {
                    for field in ["expr", "for", "keep_firing_for", "labels", "annotations"] {
                        if x.opt(field) != y.opt(field) {
                            differences.push(format!(
                                "{group}/{name}: {field} differs:\n  {RULES}: {:?}\n  {PROMETHEUS_RULE}: {:?}",
                                x.opt(field),
                                y.opt(field)
                            ));
                        }
                    }
                    if x != y {
                        differences.push(format!(
                            "{group}/{name}: the rules differ:\n  {x:?}\n  {y:?}"
                        ));
                    }
                }
                (Some(_), None) => {
                    differences.push(format!("{group}/{name}: not in {PROMETHEUS_RULE}"))
                }
                (None, _) => differences.push(format!("{group}/{name}: not in {RULES}")),
            }
        }
        if a != b {
            differences.push(format!("group {group:?} differs (order or group settings)"));
        }
    }
    assert!(
        differences.is_empty(),
        "the two rule files are out of step:\n{}",
        differences.join("\n")
    );

    // Every alert the docs describe is there, with what an on-call needs.
    let mut problems = Vec::new();
    let mut names = BTreeSet::new();
    for group in plain.seq() {
        for rule in group.get("rules").seq() {
            let Some(alert) = rule.opt("alert") else {
                continue;
            };
            let alert = alert.str();
            names.insert(alert.to_owned());
            let severity = rule
                .opt("labels")
                .and_then(|l| l.opt("severity"))
                .map(Yaml::str);
            if !matches!(severity, Some("warning" | "critical")) {
                problems.push(format!("{alert}: severity label is {severity:?}"));
            }
            for annotation in ["summary", "description", "runbook"] {
                let text = rule
                    .opt("annotations")
                    .and_then(|a| a.opt(annotation))
                    .map(Yaml::str);
                if text.is_none_or(|t| t.trim().len() < 20) {
                    problems.push(format!("{alert}: no {annotation} annotation"));
                }
            }
        }
    }
    for alert in ALERTS {
        if !names.contains(*alert) {
            problems.push(format!("{alert}: missing from {RULES}"));
        }
    }
    let doc = read("deploy/DASHBOARDS.md");
    for alert in &names {
        if !doc.contains(alert.as_str()) {
            problems.push(format!("{alert}: not described in deploy/DASHBOARDS.md"));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

fn promtool(args: &[&str], file: &Path) -> (bool, String) {
    let out = std::process::Command::new("promtool")
        .args(args)
        .arg(file)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "promtool does not run ({e}): install the Debian package prometheus \
                 (apt-get install --no-install-recommends prometheus; scripts/test does)"
            )
        });
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn promtool_accepts_the_rules_and_the_dashboard_queries() {
    let (ok, out) = promtool(&["check", "rules"], &path(RULES));
    assert!(ok, "promtool check rules {RULES}:\n{out}");
    assert!(out.contains("SUCCESS"), "{out}");

    let dir = tempfile::tempdir().unwrap();
    // The PrometheusRule's spec is a rule file of its own.
    let text = read(PROMETHEUS_RULE);
    let (_, spec) = text
        .split_once("\nspec:\n")
        .expect("a top-level `spec:` in the PrometheusRule");
    let mut groups = String::new();
    for line in spec.lines() {
        if line.trim().is_empty() {
            groups.push('\n');
        } else if let Some(inner) = line.strip_prefix("  ") {
            groups.push_str(inner);
            groups.push('\n');
        } else {
            panic!("spec must be the PrometheusRule's last key, indented by 2: {line:?}");
        }
    }
    let spec_file = dir.path().join("prometheusrule-spec.yaml");
    std::fs::write(&spec_file, groups).unwrap();
    let (ok, out) = promtool(&["check", "rules"], &spec_file);
    assert!(
        ok,
        "promtool check rules on {PROMETHEUS_RULE}'s spec:\n{out}"
    );

    // Each dashboard query, its Grafana variables filled in, as a recording
    // rule: promtool parses it.
    let (panels, _) = dashboard_exprs(&dashboard());
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (n, (place, expr)) in panels.iter().enumerate() {
        let filled = expr
            .replace("$__rate_interval", "5m")
            .replace("$__interval", "1m")
            .replace("$__range", "1h")
            .replace("${job}", ".*")
            .replace("$job", ".*")
            .replace("${instance}", ".*")
            .replace("$instance", ".*");
        assert!(
            !filled.contains("$_") && !filled.contains("${"),
            "{place}: a Grafana variable this test does not know: {expr:?}"
        );
        rules.push_str(&format!(
            "      - record: pandagate_dashboard:query_{n}\n        expr: {}\n",
            serde_json::to_string(&filled).unwrap()
        ));
    }
    let dashboard_file = dir.path().join("dashboard-queries.yaml");
    std::fs::write(&dashboard_file, &rules).unwrap();
    let (ok, out) = promtool(&["check", "rules"], &dashboard_file);
    assert!(ok, "promtool rejects a dashboard query:\n{out}\n{rules}");
}

// ------------------------------------------------------------------ YAML

fn plain_groups() -> Yaml {
    parse_yaml(&read(RULES)).get("groups").clone()
}

fn operator_groups() -> Yaml {
    parse_yaml(&read(PROMETHEUS_RULE))
        .get("spec")
        .get("groups")
        .clone()
}

/// The YAML the rule files are written in: block mappings and sequences,
/// plain and quoted scalars, `|` and `>` block scalars, comments. Anything
/// else (flow collections, anchors, tags, multi-line plain scalars) panics
/// rather than being read wrong; promtool reads the files with a real
/// parser.
#[derive(Debug, Clone, PartialEq)]
enum Yaml {
    Str(String),
    Map(Vec<(String, Yaml)>),
    Seq(Vec<Yaml>),
}

impl Yaml {
    fn opt(&self, key: &str) -> Option<&Yaml> {
        match self {
            Yaml::Map(entries) => entries.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            other => panic!("looking up {key:?} in {other:?}"),
        }
    }

    fn get(&self, key: &str) -> &Yaml {
        self.opt(key)
            .unwrap_or_else(|| panic!("no {key:?} in {self:?}"))
    }

    fn seq(&self) -> &[Yaml] {
        match self {
            Yaml::Seq(items) => items,
            other => panic!("a sequence expected: {other:?}"),
        }
    }

    fn str(&self) -> &str {
        match self {
            Yaml::Str(s) => s,
            other => panic!("a string expected: {other:?}"),
        }
    }
}

fn parse_yaml(text: &str) -> Yaml {
    let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
    let mut i = 0;
    let node = parse_node(&mut lines, &mut i, 0);
    skip_blank(&lines, &mut i);
    assert!(
        i >= lines.len(),
        "YAML: unexpected line {}: {:?}",
        i + 1,
        lines[i]
    );
    node
}

fn indent(line: &str) -> usize {
    line.len() - line.trim_start_matches(' ').len()
}

fn is_blank(line: &str) -> bool {
    let t = line.trim();
    t.is_empty() || t.starts_with('#')
}

fn skip_blank(lines: &[String], i: &mut usize) {
    while *i < lines.len() && is_blank(&lines[*i]) {
        *i += 1;
    }
}

/// The node whose first line is the next non-blank one, indented at least `min`.
fn parse_node(lines: &mut [String], i: &mut usize, min: usize) -> Yaml {
    skip_blank(lines, i);
    assert!(*i < lines.len(), "YAML: a value expected at the end");
    let line = &lines[*i];
    assert!(!line.contains('\t'), "YAML: a tab on line {}", *i + 1);
    let n = indent(line);
    assert!(
        n >= min,
        "YAML: line {} indented {n}, expected at least {min}: {line:?}",
        *i + 1
    );
    let t = line.trim_start();
    if t == "-" || t.starts_with("- ") {
        parse_seq(lines, i, n)
    } else {
        parse_map(lines, i, n)
    }
}

fn split_key(text: &str) -> Option<(&str, &str)> {
    if text.starts_with(['"', '\'', '{', '[']) {
        return None;
    }
    let colon = text
        .find(": ")
        .or_else(|| text.strip_suffix(':').map(|k| k.len()))?;
    let key = &text[..colon];
    (!key.is_empty() && !key.contains(" #")).then(|| (key, text[colon + 1..].trim()))
}

fn parse_map(lines: &mut [String], i: &mut usize, n: usize) -> Yaml {
    let mut entries: Vec<(String, Yaml)> = Vec::new();
    loop {
        skip_blank(lines, i);
        if *i >= lines.len() || indent(&lines[*i]) < n {
            break;
        }
        let line = lines[*i].clone();
        let at = *i + 1;
        assert_eq!(
            indent(&line),
            n,
            "YAML: line {at} indented unexpectedly: {line:?}"
        );
        let (key, value) = split_key(line.trim_start())
            .unwrap_or_else(|| panic!("YAML: `key: value` expected on line {at}: {line:?}"));
        assert!(
            entries.iter().all(|(k, _)| k != key),
            "YAML: key {key:?} twice (line {at})"
        );
        *i += 1;
        let node = if value.is_empty() || value.starts_with('#') {
            parse_node(lines, i, n + 1)
        } else if value.starts_with(['|', '>']) {
            block_scalar(lines, i, n, value)
        } else {
            Yaml::Str(scalar(value, at))
        };
        entries.push((key.to_owned(), node));
    }
    Yaml::Map(entries)
}

fn parse_seq(lines: &mut [String], i: &mut usize, n: usize) -> Yaml {
    let mut items = Vec::new();
    loop {
        skip_blank(lines, i);
        if *i >= lines.len() || indent(&lines[*i]) < n {
            break;
        }
        let line = lines[*i].clone();
        let at = *i + 1;
        assert_eq!(
            indent(&line),
            n,
            "YAML: line {at} indented unexpectedly: {line:?}"
        );
        let t = line.trim_start();
        let rest = if t == "-" {
            ""
        } else {
            t.strip_prefix("- ")
                .unwrap_or_else(|| panic!("YAML: `- ` expected on line {at}: {line:?}"))
                .trim_start()
        };
        if rest.is_empty() {
            *i += 1;
            items.push(parse_node(lines, i, n + 1));
        } else if split_key(rest).is_some() {
            // `- key: value`: a mapping indented where its first key is.
            let col = line.len() - rest.len();
            lines[*i] = format!("{}{rest}", " ".repeat(col));
            items.push(parse_map(lines, i, col));
        } else {
            *i += 1;
            items.push(Yaml::Str(scalar(rest, at)));
        }
    }
    Yaml::Seq(items)
}

/// A `|` or `>` scalar whose key is indented `n`; `header` is `|`, `|-`, ...
fn block_scalar(lines: &[String], i: &mut usize, n: usize, header: &str) -> Yaml {
    let (style, chomp) = header.split_at(1);
    let chomp = chomp.split(" #").next().unwrap().trim();
    assert!(
        matches!(chomp, "" | "-" | "+"),
        "YAML: block header {header:?} (line {})",
        *i
    );
    let mut body: Vec<&str> = Vec::new();
    let mut block_indent = None;
    while *i < lines.len() {
        let line = &lines[*i];
        if line.trim().is_empty() {
            body.push("");
        } else if indent(line) > n {
            let bi = *block_indent.get_or_insert(indent(line));
            assert!(
                indent(line) >= bi,
                "YAML: block line {} less indented than the first",
                *i + 1
            );
            if style == ">" {
                assert_eq!(
                    indent(line),
                    bi,
                    "YAML: a more-indented line in a folded block, line {}",
                    *i + 1
                );
            }
            body.push(&line[bi..]);
        } else {
            break;
        }
        *i += 1;
    }
    let trailing = body.iter().rev().take_while(|l| l.is_empty()).count();
    let content = &body[..body.len() - trailing];
    let mut text = if style == "|" {
        content.join("\n")
    } else {
        let mut s = String::new();
        let mut blank_run = false;
        for (k, line) in content.iter().enumerate() {
            if line.is_empty() {
                s.push('\n');
                blank_run = true;
            } else {
                if k > 0 && !blank_run {
                    s.push(' ');
                }
                s.push_str(line);
                blank_run = false;
            }
        }
        s
    };
    match chomp {
        "-" => {}
        "+" => text.push_str(&"\n".repeat(trailing + 1)),
        _ if !content.is_empty() => text.push('\n'),
        _ => {}
    }
    Yaml::Str(text)
}

/// A one-line scalar: plain, "double-quoted" or 'single-quoted'.
fn scalar(s: &str, line: usize) -> String {
    let rest_is_comment = |rest: &str| {
        let r = rest.trim();
        assert!(
            r.is_empty() || r.starts_with('#'),
            "YAML: {rest:?} after a quoted scalar (line {line})"
        );
    };
    if let Some(body) = s.strip_prefix('"') {
        let mut out = String::new();
        let mut chars = body.char_indices();
        while let Some((k, c)) = chars.next() {
            match c {
                '"' => {
                    rest_is_comment(&body[k + 1..]);
                    return out;
                }
                '\\' => match chars.next().map(|(_, e)| e) {
                    Some('n') => out.push('\n'),
                    Some('t') => out.push('\t'),
                    Some(e @ ('"' | '\\' | '/')) => out.push(e),
                    e => panic!("YAML: escape \\{e:?} not supported (line {line})"),
                },
                c => out.push(c),
            }
        }
        panic!("YAML: unterminated double-quoted scalar on line {line}");
    }
    if let Some(body) = s.strip_prefix('\'') {
        let mut out = String::new();
        let mut chars = body.char_indices().peekable();
        while let Some((k, c)) = chars.next() {
            if c == '\'' {
                if chars.peek().map(|(_, d)| *d) == Some('\'') {
                    chars.next();
                    out.push('\'');
                } else {
                    rest_is_comment(&body[k + 1..]);
                    return out;
                }
            } else {
                out.push(c);
            }
        }
        panic!("YAML: unterminated single-quoted scalar on line {line}");
    }
    assert!(
        !s.starts_with(['{', '[', '&', '*', '!', '@', '`', '%']),
        "YAML: flow collections, anchors and tags are not supported (line {line}): {s:?}"
    );
    s.split(" #").next().unwrap().trim().to_owned()
}

#[test]
fn the_yaml_reader_reads_what_the_rule_files_use() {
    let y = parse_yaml(
        "# c\na:\n  - name: x # c\n    rules:\n      - expr: |-\n          up\n            == 1\n        d: >-\n          one\n          two\n\n          three\n        q: \"a \\\"b\\\" # c\"\n        s: 'it''s'\n  - plain\nb: |\n  keep\n",
    );
    let rule = &y.get("a").seq()[0].get("rules").seq()[0];
    assert_eq!(rule.get("expr").str(), "up\n  == 1");
    assert_eq!(rule.get("d").str(), "one two\nthree");
    assert_eq!(rule.get("q").str(), "a \"b\" # c");
    assert_eq!(rule.get("s").str(), "it's");
    assert_eq!(y.get("a").seq()[0].get("name").str(), "x");
    assert_eq!(y.get("a").seq()[1].str(), "plain");
    assert_eq!(y.get("b").str(), "keep\n");
    for bad in [
        "a: {b: 1}\n",
        "a: [1]\n",
        "a:\n  b: 1\n   c: 2\n",
        "a: 1\na: 2\n",
        "a: &x 1\n",
    ] {
        assert!(
            std::panic::catch_unwind(|| parse_yaml(bad)).is_err(),
            "{bad:?} is refused"
        );
    }
}

#[test]
fn expressions_are_read_for_names_and_labels() {
    let u = uses(
        r#"histogram_quantile(0.99, sum by (le, class) (rate(pandagate_x_bucket{job=~"$job", status=~"5.."}[5m]))) / sum(rate(pandagate_y_total[1m])) without (code)"#,
    );
    assert_eq!(
        u.metrics,
        BTreeSet::from([
            "pandagate_x_bucket".to_owned(),
            "pandagate_y_total".to_owned()
        ])
    );
    assert_eq!(u.matchers.len(), 1);
    assert_eq!(
        u.matchers[0].1,
        BTreeSet::from(["job".to_owned(), "status".to_owned()])
    );
    assert_eq!(u.groupings.len(), 2);
    assert!(u.groupings[0].1.contains("pandagate_x_bucket"));
    assert_eq!(u.groupings[1].0, BTreeSet::from(["code".to_owned()]));
    assert!(u.groupings[1].1.contains("pandagate_y_total"));

    let e = Exported::parse(
        "# HELP pandagate_a_total A.\n# TYPE pandagate_a_total counter\npandagate_a_total{k=\"v,\\\"x\",j=\"\"} 1\n\
         # TYPE pandagate_h_seconds histogram\n# TYPE pandagate_g gauge\npandagate_g 0\n",
    );
    assert!(e.names.contains("pandagate_a_total"));
    assert!(e.names.contains("pandagate_h_seconds_bucket"));
    assert!(!e.names.contains("pandagate_h_seconds"));
    assert!(e.names.contains("pandagate_g"));
    assert_eq!(
        e.labels["pandagate_a_total"],
        BTreeSet::from(["k".to_owned(), "j".to_owned()])
    );
    assert_eq!(
        e.family_of("pandagate_h_seconds_count"),
        Some("pandagate_h_seconds")
    );
}
