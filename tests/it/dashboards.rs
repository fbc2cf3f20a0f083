//! The Grafana dashboard and the alerting rules in deploy/ stay true to the
//! binary: every metric (and label) they use is one `/metrics` exports,
//! every exported family is on the dashboard, the plain rule file and the
//! PrometheusRule carry the same rules, and promtool accepts the rules and
//! every dashboard query. promtool is the Debian package `prometheus`
//! (`scripts/test` installs it); without it these tests fail. The rule
//! files are read with yaml-rust2, every expression with promql-parser.

use crate::support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use promql_parser::parser::{Expr, VectorSelector};
use serde_json::Value;
use wiremock::ResponseTemplate;
use yaml_rust2::{Yaml, YamlEmitter, YamlLoader};

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
    // By hand: prometheus-parse, the crate for this format, folds histograms' `_bucket` samples into one and drops their labels.
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
/// `/metrics` of a gateway before its first call, and after a few calls.
async fn scrape_a_busy_gateway() -> (String, String) {
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
    let metrics = format!("http://{}/metrics", gw.admin);
    let first = String::from_utf8(support::get(&metrics).await.body.to_vec()).unwrap();

    let read = support::get(&format!("http://{}/open/product/get", gw.gateway)).await;
    assert_eq!(read.status, 200, "the read is retried after the 503");
    let write = Request::post(format!("http://{}/alibaba/order/create", gw.gateway))
        .header("idempotency-key", "dashboards-1")
        .body(Full::new(Bytes::from_static(b"{}")))
        .unwrap();
    assert_eq!(support::send(write).await.status, 200);
    assert_eq!(support::push_signed(&gw.gateway, SECRET, "D1").await, 200);

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
            return (first, text);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let text = String::from_utf8(support::get(&metrics).await.body.to_vec()).unwrap();
    panic!("the push was not delivered (or the calls not counted) within 10 s:\n{text}");
}

// ------------------------------------------------------------------ PromQL

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

/// The PromQL of a rule, a dashboard query or a Grafana variable query,
/// read by promql-parser. Grafana fills its interval variables before
/// Prometheus sees a query (a range must be a duration); `$job` and the
/// like stand in label values, which PromQL reads as strings.
fn uses(expr: &str) -> Uses {
    // `label_values(SELECTOR, LABEL)` is Grafana's syntax, not PromQL: its selector is cut out by hand.
    let promql = match expr
        .trim()
        .strip_prefix("label_values(")
        .and_then(|args| args.strip_suffix(')'))
    {
        Some(args) => match args.rsplit_once(',') {
            Some((selector, _label)) => selector.to_owned(),
            None => return Uses::default(),
        },
        None => expr.to_owned(),
    };
    let promql = promql
        .replace("$__rate_interval", "5m")
        .replace("$__interval", "1m")
        .replace("$__range", "1h");
    let ast = promql_parser::parser::parse(&promql)
        .unwrap_or_else(|e| panic!("not PromQL ({e}): {expr:?}"));
    let mut u = Uses::default();
    u.walk(&ast);
    u
}

impl Uses {
    fn walk(&mut self, expr: &Expr) {
        match expr {
            Expr::VectorSelector(vs) => self.selector(vs),
            Expr::MatrixSelector(ms) => self.selector(&ms.vs),
            Expr::Aggregate(a) => {
                if let Some(modifier) = &a.modifier {
                    let mut aggregated = Uses::default();
                    aggregated.walk(&a.expr);
                    let labels = modifier.labels().labels.iter().cloned().collect();
                    self.groupings.push((labels, aggregated.metrics));
                }
                self.walk(&a.expr);
                if let Some(param) = &a.param {
                    self.walk(param);
                }
            }
            Expr::Unary(u) => self.walk(&u.expr),
            Expr::Binary(b) => {
                self.walk(&b.lhs);
                self.walk(&b.rhs);
            }
            Expr::Paren(p) => self.walk(&p.expr),
            Expr::Subquery(s) => self.walk(&s.expr),
            Expr::Call(c) => c.args.args.iter().for_each(|arg| self.walk(arg)),
            Expr::NumberLiteral(_) | Expr::StringLiteral(_) | Expr::Extension(_) => {}
        }
    }

    fn selector(&mut self, vs: &VectorSelector) {
        let Some(name) = vs.name.as_ref().filter(|n| n.starts_with("pandagate_")) else {
            return;
        };
        self.metrics.insert(name.clone());
        let labels: BTreeSet<String> = vs
            .matchers
            .matchers
            .iter()
            .chain(vs.matchers.or_matchers.iter().flatten())
            .map(|m| m.name.clone())
            .collect();
        if labels.is_empty() {
            self.bare.push(name.clone());
        } else {
            self.matchers.push((name.clone(), labels));
        }
    }
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
    let (first, busy) = scrape_a_busy_gateway().await;
    let exported = Exported::parse(&busy);
    assert!(
        exported.families.len() >= 20,
        "too few families scraped: {:?}",
        exported.families
    );
    // Every family is there from the first scrape, and the series whose
    // labels are known in advance are there at 0, so that a rule or panel
    // sees them before the first event.
    let fresh = Exported::parse(&first);
    let late: Vec<&String> = exported
        .families
        .keys()
        .filter(|f| !fresh.families.contains_key(*f))
        .collect();
    assert!(
        late.is_empty(),
        "families missing from the first scrape: {late:?}\n{first}"
    );
    for series in [
        r#"pandagate_idempotency_total{result="replayed"} 0"#,
        r#"pandagate_idempotency_total{result="unknown_outcome"} 0"#,
        r#"pandagate_cache_requests_total{result="hit"} 0"#,
        r#"pandagate_cache_requests_total{result="stale"} 0"#,
        r#"pandagate_retries_total{reason="timeout"} 0"#,
        r#"pandagate_upstream_attempts_total{class="write"} 0"#,
        r#"pandagate_request_duration_seconds_count{class="read"} 0"#,
        r#"pandagate_config_reloads_total{result="refused"} 0"#,
        r#"pandagate_quota_refused_total{client="default"} 0"#,
    ] {
        assert!(
            first.contains(series),
            "not in the first scrape: {series}\n{first}"
        );
    }
    let build = format!(
        r#"pandagate_build_info{{version="{}",commit=""#,
        env!("CARGO_PKG_VERSION")
    );
    assert!(first.contains(&build), "{build}\n{first}");

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
    let spec = parse_yaml(&read(PROMETHEUS_RULE)).get("spec").clone();
    let mut groups = String::new();
    let mut emitter = YamlEmitter::new(&mut groups);
    emitter.multiline_strings(true);
    emitter.dump(&spec).unwrap();
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

/// One YAML document, read by yaml-rust2, which refuses a key written twice
/// in one mapping (a rule's second `expr:` is an error, not a silent win).
fn parse_yaml(text: &str) -> Yaml {
    let mut docs = YamlLoader::load_from_str(text).unwrap_or_else(|e| panic!("YAML: {e}"));
    assert_eq!(docs.len(), 1, "one YAML document");
    docs.remove(0)
}

/// Look-ups that panic, saying what was there, where yaml-rust2's index
/// gives `BadValue`.
trait Node {
    fn opt(&self, key: &str) -> Option<&Yaml>;
    fn get(&self, key: &str) -> &Yaml;
    fn seq(&self) -> &[Yaml];
    fn str(&self) -> &str;
}

impl Node for Yaml {
    fn opt(&self, key: &str) -> Option<&Yaml> {
        match self {
            Yaml::Hash(entries) => entries.get(&Yaml::String(key.to_owned())),
            other => panic!("looking up {key:?} in {other:?}"),
        }
    }

    fn get(&self, key: &str) -> &Yaml {
        self.opt(key)
            .unwrap_or_else(|| panic!("no {key:?} in {self:?}"))
    }

    fn seq(&self) -> &[Yaml] {
        match self {
            Yaml::Array(items) => items,
            other => panic!("a sequence expected: {other:?}"),
        }
    }

    fn str(&self) -> &str {
        match self {
            Yaml::String(s) => s,
            other => panic!("a string expected: {other:?}"),
        }
    }
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
    // Flow collections and anchors are YAML that yaml-rust2 reads; the hand-written reader refused them.
    for bad in ["a:\n  b: 1\n   c: 2\n", "a: 1\na: 2\n"] {
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
