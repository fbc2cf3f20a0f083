//! The endpoint catalogue: may a call be sent twice?
//!
//! The HTTP method does not tell (searches and previews are POST; refund
//! cancel and the 1688 pay URL are GETs that change state), so every path is
//! classified by name, from the provider's API reference:
//!
//! * `read`: safe to send twice;
//! * `write`: sending twice may buy, pay, cancel or submit twice;
//! * `unknown`: not in the catalogue, and treated exactly like `write`.
//!
//! v2 paths map onto v1 names (`/v2/taobao/x` ↔ `/open/x`, `/v2/alibaba/x` ↔
//! `/alibaba/x`), and `{param}` segments match any one segment. Matching is
//! exact: a path spelled any other way (`//`, a trailing `/`, `..`) is
//! `unknown`, so a misspelling can only make a call less retryable, never
//! more. Config `[[routes]]` entries (exact `path` or `prefix`, longest match
//! first) override the class and retry settings.

use std::collections::HashMap;

use crate::config::{Class, ConfigError, Rate, RouteConfig, v1_form};

use Class::{Read, Write};

/// Paths the provider's API reference names, in their v1 form.
const CATALOGUE: &[(&str, Class)] = &[
    // Taobao goods
    ("/open/product/get", Read),
    // Taobao orders
    ("/open/order", Write),
    ("/open/order/logistics/detail/get", Read),
    // Taobao carts
    ("/open/cart/add", Write),
    ("/open/cart/create/order", Write),
    // Taobao after-sales
    ("/open/order/refund/render", Read),
    ("/open/order/refund/query", Read),
    ("/open/order/refund/submit/message", Write),
    ("/open/order/refund/cancel/{refundId}", Write),
    // 1688 goods
    ("/alibaba/product/detail/get", Read),
    ("/alibaba/product/keywords/query", Read),
    ("/alibaba/product/query/selleroffer", Read),
    ("/alibaba/product/image/query", Read),
    ("/alibaba/product/openuid/decrypt", Read),
    // 1688 orders
    ("/alibaba/order/create/preview", Read),
    ("/alibaba/order/create/previewbatch", Read),
    ("/alibaba/order/create", Write),
    ("/alibaba/order/batch/create", Write),
    ("/alibaba/order/detail", Read),
    ("/alibaba/order/page", Read),
    ("/alibaba/order/cancel", Write),
    ("/alibaba/order/batch/submit/to/pay", Write),
    ("/alibaba/order/pay/url", Write),
    // 1688 carts
    ("/alibaba/cart/create/order", Write),
    ("/alibaba/cart/list", Read),
    // 1688 after-sales
    ("/alibaba/refund/goods/return", Write),
];

/// The built-in catalogue: exact paths in a map, parameterised ones in a list.
#[derive(Debug)]
pub struct Catalogue {
    exact: HashMap<&'static str, Class>,
    /// Parameterised paths: their segments, class and name.
    patterns: Vec<(Vec<&'static str>, Class, &'static str)>,
}

impl Default for Catalogue {
    fn default() -> Self {
        let mut exact = HashMap::new();
        let mut patterns = Vec::new();
        for &(path, class) in CATALOGUE {
            if path.contains('{') {
                patterns.push((path.split('/').collect(), class, path));
            } else {
                exact.insert(path, class);
            }
        }
        Catalogue { exact, patterns }
    }
}

impl Catalogue {
    pub fn classify(&self, path: &str) -> Class {
        self.entry(path).map_or(Class::Unknown, |(_, class)| class)
    }

    /// The catalogued endpoint `path` names (its v1 name) and its class.
    fn entry(&self, path: &str) -> Option<(&'static str, Class)> {
        let (prefix, rest) = v1_form(path);
        let lookup = |p: &str| {
            self.exact
                .get_key_value(p)
                .map(|(name, class)| (*name, *class))
                .or_else(|| {
                    self.patterns
                        .iter()
                        .find(|(pattern, ..)| segments_match(pattern, p))
                        .map(|(_, class, name)| (*name, *class))
                })
        };
        if prefix.is_empty() {
            lookup(rest)
        } else {
            let mut v1 = String::with_capacity(prefix.len() + rest.len());
            v1.push_str(prefix);
            v1.push_str(rest);
            lookup(&v1)
        }
    }

    /// The catalogued write that some server could route `path` to, if
    /// any: the path as sent or in its other generation's spelling, in any
    /// letter case, and with its last segment's `.suffix` cut (Spring's
    /// suffix patterns read `/create.json` as `/create`). Config entries
    /// never make such a path anything but a write.
    pub fn write_reached_by(&self, path: &str) -> Option<&'static str> {
        let lower = path.to_ascii_lowercase();
        let cut = |p: &str| -> Option<String> {
            let last = p.rfind('/')?;
            let dot = p[last..].find('.')?;
            Some(p[..last + dot].to_owned())
        };
        let spellings = [
            Some(path.to_owned()),
            cut(path),
            Some(lower.clone()),
            cut(&lower),
        ];
        spellings
            .iter()
            .flatten()
            .find_map(|p| self.entry(p).filter(|(_, class)| *class == Write))
            .map(|(name, _)| name)
    }
}

fn segments_match(pattern: &[&str], path: &str) -> bool {
    let mut segments = path.split('/');
    for want in pattern {
        match segments.next() {
            Some(got) if want.starts_with('{') => {
                if got.is_empty() {
                    return false;
                }
            }
            Some(got) if got == *want => {}
            _ => return false,
        }
    }
    segments.next().is_none()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn class(path: &str) -> Class {
        Catalogue::default().classify(path)
    }

    #[test]
    fn reads_and_writes_from_the_manual() {
        assert_eq!(class("/open/product/get"), Class::Read);
        assert_eq!(class("/open/order"), Class::Write);
        assert_eq!(class("/alibaba/order/create"), Class::Write);
        assert_eq!(class("/alibaba/order/create/preview"), Class::Read);
        assert_eq!(class("/alibaba/order/pay/url"), Class::Write);
        assert_eq!(class("/alibaba/product/keywords/query"), Class::Read);
    }

    #[test]
    fn v2_paths_take_their_v1_class() {
        assert_eq!(class("/v2/taobao/order/refund/render"), Class::Read);
        assert_eq!(class("/v2/taobao/order/refund/query"), Class::Read);
        assert_eq!(class("/v2/alibaba/order/page"), Class::Read);
        assert_eq!(class("/v2/alibaba/cart/list"), Class::Read);
        assert_eq!(class("/v2/alibaba/order/create"), Class::Write);
        assert_eq!(class("/v2/taobao/product/get"), Class::Read);
    }

    #[test]
    fn path_parameters_match_one_segment() {
        assert_eq!(class("/open/order/refund/cancel/R123"), Class::Write);
        assert_eq!(class("/v2/taobao/order/refund/cancel/R123"), Class::Write);
        assert_eq!(class("/open/order/refund/cancel/"), Class::Unknown);
        assert_eq!(class("/open/order/refund/cancel/R1/x"), Class::Unknown);
    }

    #[test]
    fn anything_else_is_unknown_and_never_repeatable() {
        for p in [
            "/",
            "/open/product/get/",
            "/open//product/get",
            "/open/product/get/../../order",
            "/OPEN/PRODUCT/GET",
            "/alibaba/order/create/preview/x",
            "/something/new",
        ] {
            assert_eq!(class(p), Class::Unknown, "{p}");
            assert!(!class(p).repeatable());
        }
        assert!(Class::Read.repeatable());
        assert!(!Class::Write.repeatable());
    }
}

/// Whether a server could read `path` as another path.
///
/// The provider's paths are plain: segments of letters, digits, `-`, `_`
/// and `.`. A path is unambiguous only when every segment is a non-empty
/// run of RFC 3986 unreserved characters (`ALPHA / DIGIT / "-" / "." / "_"
/// / "~"`) and is neither `.` nor `..`. Anything else is a spelling some
/// server decodes, splits or resolves its own way: percent-encoding
/// (`%2e%2e`, `%2f`), `;` path parameters (`/..;/` is `/../` to Tomcat),
/// `\` (a separator to Windows and IIS), `//` and a trailing `/`. Deciding
/// by what is allowed rather than by a list of known tricks means a new
/// trick can only make a path ambiguous, never let it through.
pub fn is_ambiguous(path: &str) -> bool {
    let Some(rest) = path.strip_prefix('/') else {
        return true;
    };
    rest.split('/').any(|segment| {
        segment.is_empty()
            || segment == "."
            || segment == ".."
            || !segment.bytes().all(is_unreserved)
    })
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// The other spelling of a path, as a prefix and the rest: the v1 and v2
/// names of one endpoint (`/open/x` ↔ `/v2/taobao/x`, `/alibaba/x` ↔
/// `/v2/alibaba/x`).
fn twin(path: &str) -> Option<(&'static str, &str)> {
    const PAIRS: [(&str, &str); 4] = [
        ("/v2/taobao/", "/open/"),
        ("/v2/alibaba/", "/alibaba/"),
        ("/open/", "/v2/taobao/"),
        ("/alibaba/", "/v2/alibaba/"),
    ];
    PAIRS
        .iter()
        .find_map(|&(from, to)| path.strip_prefix(from).map(|rest| (to, rest)))
}

/// A path spelled as `head` followed by `tail`, compared without joining them.
#[derive(Clone, Copy)]
struct Spelling<'a> {
    head: &'a str,
    tail: &'a str,
}

impl Spelling<'_> {
    fn equals(self, other: &str) -> bool {
        other.len() == self.head.len() + self.tail.len()
            && other.starts_with(self.head)
            && &other[self.head.len()..] == self.tail
    }

    fn starts_with(self, prefix: &str) -> bool {
        if prefix.len() <= self.head.len() {
            self.head.starts_with(prefix)
        } else {
            prefix.starts_with(self.head) && self.tail.starts_with(&prefix[self.head.len()..])
        }
    }
}

/// Whether `entry` covers `path`.
fn matches(entry: &RouteConfig, path: Spelling<'_>) -> bool {
    match (&entry.path, &entry.prefix) {
        (Some(exact), _) => path.equals(exact),
        (None, Some(prefix)) => path.starts_with(prefix),
        (None, None) => false,
    }
}

/// The pattern in its v1 spelling, to compare entries' specificity.
fn v1_len(pattern: &str) -> usize {
    let (prefix, rest) = v1_form(pattern);
    prefix.len() + rest.len()
}

/// What the gateway knows about a path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Route {
    pub class: Class,
    pub max_attempts: Option<u32>,
    pub attempt_timeout_ms: Option<u64>,
    /// The route's own rate-limit bucket, an index into [`Routes::buckets`].
    pub bucket: Option<usize>,
    /// How its answers are cached: only ever for a `read`.
    pub cache: Option<CacheRule>,
}

/// A read route's caching, from its `[[routes]]` entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CacheRule {
    pub ttl: std::time::Duration,
    /// Past the TTL, how long an entry may still answer a failing call.
    pub stale: std::time::Duration,
    pub sort_query: bool,
}

/// The catalogue plus config overrides.
#[derive(Debug, Default)]
pub struct Routes {
    catalogue: Catalogue,
    /// Longest pattern first; for equal lengths, exact paths first; each
    /// with its rate-limit bucket index, if it has one.
    overrides: Vec<(RouteConfig, Option<usize>)>,
    buckets: Vec<(String, Rate)>,
}

impl Routes {
    pub fn new(overrides: &[RouteConfig]) -> Routes {
        let mut sorted = overrides.to_vec();
        sorted.sort_by_key(|r| (std::cmp::Reverse(v1_len(r.pattern())), r.path.is_none()));
        let mut buckets = Vec::new();
        let overrides = sorted
            .into_iter()
            .map(|r| {
                let bucket = r.rate().and_then(Result::ok).map(|rate| {
                    buckets.push((r.pattern().to_owned(), rate));
                    buckets.len() - 1
                });
                (r, bucket)
            })
            .collect();
        Routes {
            catalogue: Catalogue::default(),
            overrides,
            buckets,
        }
    }

    /// Whether any entry caches answers.
    pub fn caches(&self) -> bool {
        self.overrides.iter().any(|(r, _)| r.cache_ttl_ms.is_some())
    }

    /// The route rate-limit buckets: pattern and rate.
    pub fn buckets(&self) -> &[(String, Rate)] {
        &self.buckets
    }

    /// The best-matching entry decides everything it sets, including the
    /// bucket: a shorter prefix's bucket does not apply under a longer entry.
    /// An entry covers both spellings of its paths (v1 and v2), so that
    /// neither its class nor its bucket depends on the spelling a caller
    /// picks.
    ///
    /// An ambiguous path ([`is_ambiguous`]) matches no entry and is
    /// `unknown`: a `prefix` entry could otherwise cover a path the provider
    /// resolves to somewhere outside it (`/open/product/../order`).
    pub fn route(&self, path: &str) -> Route {
        if is_ambiguous(path) {
            return Route {
                class: Class::Unknown,
                max_attempts: None,
                attempt_timeout_ms: None,
                bucket: None,
                cache: None,
            };
        }
        let as_sent = Spelling {
            head: "",
            tail: path,
        };
        let other = twin(path).map(|(head, tail)| Spelling { head, tail });
        let entry = self
            .overrides
            .iter()
            .find(|(r, _)| matches(r, as_sent) || other.is_some_and(|o| matches(r, o)));
        let config = entry.map(|(r, _)| r);
        // The catalogue's writes stay writes whatever an entry says: a
        // prefix entry of reads may cover an order create, and the
        // provider may route an odd spelling of one to it.
        let class = match config.and_then(|r| r.class) {
            Some(class) if self.catalogue.write_reached_by(path).is_none() => class,
            Some(_) => Write,
            None => self.catalogue.classify(path),
        };
        // Only reads are ever cached.
        let cache = config.filter(|_| class == Class::Read).and_then(|r| {
            r.cache_ttl_ms.map(|ttl| CacheRule {
                ttl: std::time::Duration::from_millis(ttl),
                stale: std::time::Duration::from_millis(r.cache_stale_ms.unwrap_or(0)),
                sort_query: r.cache_sort_query,
            })
        });
        Route {
            class,
            max_attempts: config.and_then(|r| r.max_attempts),
            attempt_timeout_ms: config.and_then(|r| r.attempt_timeout_ms),
            bucket: entry.and_then(|(_, b)| *b),
            cache,
        }
    }
}

/// Refuses an exact entry that tries to make a catalogued write something
/// else (a `read` or `unknown` class, a cache TTL): it could not take
/// effect, and its author meant something that must not happen.
pub fn check_entries(overrides: &[RouteConfig]) -> Result<(), ConfigError> {
    let catalogue = Catalogue::default();
    for (i, entry) in overrides.iter().enumerate() {
        let Some(path) = &entry.path else { continue };
        let Some(write) = catalogue.write_reached_by(path) else {
            continue;
        };
        let tried = match (entry.class, entry.cache_ttl_ms) {
            (Some(class @ (Class::Read | Class::Unknown)), _) => {
                format!("class {:?}", class.as_str())
            }
            (_, Some(_)) => "cache_ttl_ms".to_owned(),
            _ => continue,
        };
        return Err(ConfigError::new(
            format!("routes[{i}]"),
            format_args!(
                "path {path:?} is the catalogued write {write}; an entry cannot give it {tried}: \
                 writes are never cached and never sent twice"
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod override_tests {
    use super::*;
    use crate::config::check_overlaps;

    fn entry(path: Option<&str>, prefix: Option<&str>, class: Class) -> RouteConfig {
        RouteConfig {
            path: path.map(Into::into),
            prefix: prefix.map(Into::into),
            class: Some(class),
            ..RouteConfig::default()
        }
    }

    /// Spellings that some server resolves, decodes or splits differently
    /// from the gateway. None may be read as the plain path it resembles.
    const AMBIGUOUS: &[&str] = &[
        // dot segments, plain and encoded, any case
        "/open/product/../order",
        "/open/product/./x",
        "/open/product/..",
        "/open/product/.",
        "/open/product/%2e%2e/order",
        "/open/product/%2E%2e/order",
        "/open/product/.%2e/order",
        "/open/product/%252e%252e/order",
        // encoded and foreign separators
        "/open/product/x%2Forder",
        "/open/product/x%2forder",
        "/open/product/x%5corder",
        "/open/product/x\\..\\..\\order",
        "/open/product/..\\order",
        // path parameters (Tomcat, Spring, Jetty)
        "/open/product/..;/order",
        "/open/product/x;jsessionid=1",
        "/open/product;/../order",
        // empty segments
        "/open//product/get",
        "//open/product/get",
        "/open/product/get/",
        "/",
        // other encodings and characters outside the unreserved set
        "/open/product/%20",
        "/open/product/%00",
        "/open/product/%u002e%u002e/order",
        "/open/product/x:y",
        "/open/product/x@y",
        "/open/product/x!y",
        "/open/product/x$y",
        "/open/product/x&y",
        "/open/product/x'y",
        "/open/product/x(y)",
        "/open/product/x*y",
        "/open/product/x+y",
        "/open/product/x,y",
        "/open/product/x=y",
        "/open/product/\u{e9}",
        // not a path at all
        "",
        "open/product/get",
        "*",
    ];

    #[test]
    fn only_segments_of_unreserved_characters_are_unambiguous() {
        for path in AMBIGUOUS {
            assert!(is_ambiguous(path), "{path:?} was read as plain");
        }
        for path in [
            "/open/product/get",
            "/v2/taobao/order/refund/render",
            "/open/order/refund/cancel/R-123_4.5~6",
            "/open/product/a.b",
            "/open/product/...",
            "/..x",
            "/x..",
            "/a",
        ] {
            assert!(!is_ambiguous(path), "{path:?} is plain");
        }
    }

    #[test]
    fn ambiguous_paths_match_no_entry_and_are_unknown() {
        let routes = Routes::new(&[entry(None, Some("/open/product/"), Class::Read)]);
        assert_eq!(routes.route("/open/product/x").class, Class::Read);
        for path in AMBIGUOUS {
            assert_eq!(routes.route(path).class, Class::Unknown, "{path:?}");
            assert_eq!(routes.route(path).bucket, None, "{path:?}");
        }
    }

    #[test]
    fn an_entry_covers_both_spellings_of_its_paths() {
        let routes = Routes::new(&[
            RouteConfig {
                path: Some("/alibaba/order/create".into()),
                rate_limit_per_second: Some(2.0),
                ..RouteConfig::default()
            },
            RouteConfig {
                path: Some("/v2/taobao/order".into()),
                rate_limit_per_second: Some(1.0),
                ..RouteConfig::default()
            },
            RouteConfig {
                prefix: Some("/open/product/".into()),
                class: Some(Class::Read),
                max_attempts: Some(4),
                ..RouteConfig::default()
            },
            RouteConfig {
                prefix: Some("/v2/alibaba/cart/".into()),
                rate_limit_per_second: Some(3.0),
                ..RouteConfig::default()
            },
        ]);
        let bucket = |p: &str| routes.route(p).bucket;
        let create = bucket("/alibaba/order/create");
        assert!(create.is_some());
        assert_eq!(bucket("/v2/alibaba/order/create"), create, "v2 twin");
        let order = bucket("/v2/taobao/order");
        assert!(order.is_some() && order != create);
        assert_eq!(bucket("/open/order"), order, "v1 twin");
        let cart = bucket("/v2/alibaba/cart/list");
        assert!(cart.is_some());
        assert_eq!(bucket("/alibaba/cart/list"), cart, "prefix twin");
        for p in ["/open/product/x", "/v2/taobao/product/x"] {
            assert_eq!(routes.route(p).class, Class::Read, "{p}");
            assert_eq!(routes.route(p).max_attempts, Some(4), "{p}");
        }
        // Twins only across the two generations' roots: nothing else.
        assert_eq!(bucket("/v2/alibaba/order/create/x"), None);
        assert_eq!(bucket("/v3/alibaba/order/create"), None);
        assert_eq!(bucket("/alibaba/order/createx"), None);
        assert_eq!(bucket("/x/alibaba/order/create"), None);
    }

    #[test]
    fn the_more_specific_entry_wins_whatever_its_spelling() {
        let routes = Routes::new(&[
            entry(None, Some("/v2/alibaba/"), Class::Read),
            entry(Some("/alibaba/order/create"), None, Class::Write),
            entry(None, Some("/alibaba/order/"), Class::Unknown),
        ]);
        assert_eq!(routes.route("/v2/alibaba/order/create").class, Class::Write);
        assert_eq!(routes.route("/v2/alibaba/order/x").class, Class::Unknown);
        assert_eq!(routes.route("/alibaba/product/x").class, Class::Read);
    }

    #[test]
    fn two_entries_for_one_endpoint_are_refused() {
        let twins = [
            entry(Some("/alibaba/order/create"), None, Class::Write),
            entry(Some("/v2/alibaba/order/create"), None, Class::Write),
        ];
        let e = check_overlaps(&twins).unwrap_err();
        assert_eq!(e.key, "routes[1]", "{e}");
        let same = [
            entry(None, Some("/open/"), Class::Read),
            entry(None, Some("/v2/taobao/"), Class::Read),
        ];
        assert!(check_overlaps(&same).is_err());
        let distinct = [
            entry(Some("/open/order"), None, Class::Write),
            entry(None, Some("/open/order"), Class::Write),
        ];
        assert!(
            check_overlaps(&distinct).is_ok(),
            "a path and a prefix differ"
        );
    }

    #[test]
    fn longest_match_wins_and_exact_beats_prefix() {
        let routes = Routes::new(&[
            entry(None, Some("/open/"), Class::Read),
            entry(None, Some("/open/order/"), Class::Write),
            entry(Some("/open/order/list"), None, Class::Read),
            RouteConfig {
                prefix: Some("/open/order/list".into()),
                max_attempts: Some(9),
                ..RouteConfig::default()
            },
        ]);
        assert_eq!(routes.route("/open/foo").class, Class::Read);
        assert_eq!(routes.route("/open/order/x").class, Class::Write);
        let list = routes.route("/open/order/list");
        assert_eq!(list.class, Class::Read);
        assert_eq!(
            list.max_attempts, None,
            "exact entry wins over the equal-length prefix"
        );
        let more = routes.route("/open/order/listing");
        assert_eq!(more.max_attempts, Some(9));
        assert_eq!(more.class, Class::Unknown, "no class override: catalogue's");
    }

    #[test]
    fn route_buckets_belong_to_their_entry() {
        let routes = Routes::new(&[
            RouteConfig {
                path: Some("/alibaba/order/create".into()),
                rate_limit_per_second: Some(2.0),
                ..RouteConfig::default()
            },
            entry(None, Some("/alibaba/"), Class::Read),
        ]);
        assert_eq!(routes.buckets().len(), 1);
        assert_eq!(routes.buckets()[0].0, "/alibaba/order/create");
        assert_eq!(routes.buckets()[0].1.per_second(), 2.0);
        assert_eq!(routes.route("/alibaba/order/create").bucket, Some(0));
        assert_eq!(routes.route("/alibaba/order/detail").bucket, None);
    }

    #[test]
    fn without_overrides_the_catalogue_decides() {
        let routes = Routes::new(&[]);
        assert_eq!(routes.route("/alibaba/order/create").class, Class::Write);
        assert_eq!(routes.route("/alibaba/order/detail").class, Class::Read);
    }

    #[test]
    fn no_entry_makes_a_catalogued_write_a_read_in_any_spelling() {
        let routes = Routes::new(&[
            RouteConfig {
                prefix: Some("/alibaba/order/".into()),
                class: Some(Class::Read),
                cache_ttl_ms: Some(30_000),
                max_attempts: Some(3),
                ..RouteConfig::default()
            },
            entry(None, Some("/ALIBABA/"), Class::Read),
            entry(None, Some("/open/"), Class::Unknown),
        ]);
        for path in [
            "/alibaba/order/create",
            "/v2/alibaba/order/create",
            "/alibaba/order/batch/create",
            "/alibaba/order/cancel",
            "/alibaba/order/pay/url",
            "/alibaba/order/create.json",
            "/alibaba/order/Create",
            "/ALIBABA/ORDER/CREATE",
            "/ALIBABA/order/batch/submit/to/pay",
            "/open/order",
            "/open/order/refund/cancel/R1.json",
        ] {
            let route = routes.route(path);
            assert_eq!(route.class, Class::Write, "{path}");
            assert_eq!(route.cache, None, "{path}");
        }
        // The entry still governs what it may: reads and new paths.
        let detail = routes.route("/alibaba/order/detail");
        assert_eq!(detail.class, Class::Read);
        assert!(detail.cache.is_some());
        assert_eq!(routes.route("/alibaba/order/brand-new").class, Class::Read);
        assert_eq!(routes.route("/open/product/get").class, Class::Unknown);
    }

    #[test]
    fn an_exact_entry_trying_to_make_a_write_a_read_is_refused() {
        let tries = [
            entry(Some("/alibaba/order/create"), None, Class::Read),
            entry(Some("/v2/alibaba/order/create"), None, Class::Read),
            entry(Some("/open/order"), None, Class::Unknown),
            entry(Some("/Alibaba/Order/Create"), None, Class::Read),
            entry(Some("/open/order/refund/cancel/R9"), None, Class::Read),
            RouteConfig {
                path: Some("/alibaba/order/cancel".into()),
                cache_ttl_ms: Some(1_000),
                ..RouteConfig::default()
            },
        ];
        for tried in tries {
            let list = [entry(None, Some("/x/"), Class::Read), tried.clone()];
            let e = check_entries(&list).unwrap_err();
            assert_eq!(e.key, "routes[1]", "{e}");
            let text = e.to_string();
            assert!(text.contains(tried.pattern()), "{text}");
            assert!(!text.contains('\n'), "one line: {text}");
        }
        let e = check_entries(&[entry(Some("/v2/alibaba/order/create"), None, Class::Read)])
            .unwrap_err();
        assert!(
            e.to_string()
                .contains("catalogued write /alibaba/order/create"),
            "{e}"
        );
        // What may be said of a write is accepted.
        for fine in [
            entry(Some("/alibaba/order/create"), None, Class::Write),
            entry(Some("/alibaba/order/detail"), None, Class::Read),
            entry(None, Some("/alibaba/order/"), Class::Read),
            RouteConfig {
                path: Some("/alibaba/order/create".into()),
                rate_limit_per_second: Some(1.0),
                ..RouteConfig::default()
            },
        ] {
            assert!(check_entries(&[fine]).is_ok());
        }
    }

    #[test]
    fn entries_need_exactly_one_pattern() {
        assert!(
            entry(Some("/a"), Some("/b"), Class::Read)
                .validate("routes[0]")
                .is_err()
        );
        assert!(
            entry(None, None, Class::Read)
                .validate("routes[0]")
                .is_err()
        );
        assert!(
            entry(Some("a"), None, Class::Read)
                .validate("routes[0]")
                .is_err()
        );
        assert!(
            entry(Some("/a"), None, Class::Read)
                .validate("routes[0]")
                .is_ok()
        );
    }
}
