"""The checks of deploy/validate.sh, which runs this with a Python that has
kubernetes-validate, after rendering every kustomize overlay:

    validate.py --rendered DIR [--write]   # DIR/<overlay>.yaml for each overlay
    validate.py --files FILE...            # only these manifest files

With --rendered it checks, and prints one line per subject (`ok` or `FAIL`
followed by the errors):

* each overlay's rendering: every document against the Kubernetes JSON
  schemas, strict, for each of KUBERNETES_VERSIONS; what a schema cannot
  see (selectors, named ports, volumes, ConfigMap references, no subPath
  mounts of Secrets or ConfigMaps); the gateway container against its own
  config (the listeners match the declared ports, every file it reads is
  mounted, its store is writable, a sidecar is a native one); egress
  restricted by a NetworkPolicy; no Secret inlined, and every Secret
  referenced created by a command in deploy/README.md;
* the rendered examples deploy/*.yaml: each exactly its overlay's rendering
  under a fixed header (--write rewrites them first);
* the Prometheus Operator objects in deploy/prometheus/, structurally (their
  kinds are not in the Kubernetes schemas), and the monitors' selectors and
  port names against the overlays they scrape;
* every .toml under deploy/kustomize/ parses and feeds a configMapGenerator;
* deploy/Dockerfile's OCI labels and the repository's .dockerignore;
* with PANDAGATE_BIN set: `pandagate check` on each overlay's config, with
  the environment the manifests set and stand-ins for the mounted Secrets.

Exits 1 if anything fails.
"""

import difflib
import os
import re
import secrets
import shlex
import subprocess
import sys
import tempfile

try:
    import tomllib
except ImportError:  # Python < 3.11
    sys.exit("validate.py: needs Python >= 3.11 (tomllib, to parse the gateway's .toml files)")

import yaml
import kubernetes_validate.utils as kv
from kubernetes_validate.version import __version__ as validator_version

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
OVERLAYS = os.path.join(HERE, "kustomize", "overlays")

# The rendered example of each overlay, in deploy/. push-receiver keeps the
# name callbacks-receiver.yaml, which docs/callbacks.md links to.
EXAMPLE_NAMES = {"push-receiver": "callbacks-receiver.yaml"}
EXAMPLE_HEADER = """\
# Rendered from deploy/kustomize/overlays/{overlay} by kustomize. Do not
# edit: edit the overlay (its files carry the comments) and run
# `deploy/validate.sh --write`. deploy/validate.sh fails while this file
# differs from the overlay's rendering.
"""

# The Prometheus Operator objects, and the overlays whose workloads each
# monitor must find (it is applied in the namespace of those overlays).
MONITORS = {
    "prometheus/pandagate-servicemonitor.yaml": ("shared-gateway", "push-receiver"),
    "prometheus/pandagate-podmonitor.yaml": ("sidecar",),
}
RULES = ("prometheus/pandagate-prometheusrule.yaml",)

# The container every check of the gateway looks at.
GATEWAY = "pandagate"
# Workloads (and their pods) that carry the gateway as a sidecar.
SIDECAR_LABEL = "pandagate-sidecar"

versions = os.environ["KUBERNETES_VERSIONS"].split()


# ------------------------------------------------------------------- YAML

class StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate mapping keys (the API server keeps the
    last one silently, so a duplicate usually hides a mistake)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_docs(path):
    """(documents, errors) of a YAML file."""
    try:
        with open(path, encoding="utf-8") as f:
            return [d for d in yaml.load_all(f, Loader=StrictLoader) if d is not None], []
    except (OSError, yaml.YAMLError) as e:
        return [], [f"cannot read YAML: {e}".replace("\n", " ")]


def shown(path):
    rel = os.path.relpath(path, ROOT)
    return path if rel.startswith("..") else rel


# ----------------------------------------------------------- shared helpers

def meta(doc):
    return doc.get("metadata") if isinstance(doc.get("metadata"), dict) else {}


def name_of(doc):
    return f"{str(doc.get('kind', '?')).lower()}/{meta(doc).get('name', '?')}"


def labels_of(doc):
    return meta(doc).get("labels") or {}


def pod_templates(docs):
    """(workload document, pod template) for each workload."""
    out = []
    for d in docs:
        spec = d.get("spec") or {}
        if d.get("kind") in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"):
            out.append((d, spec.get("template") or {}))
        elif d.get("kind") == "Pod":
            out.append((d, {"metadata": meta(d), "spec": spec}))
    return out


def matches(match_labels, labels):
    return all(labels.get(k) == v for k, v in (match_labels or {}).items())


def containers_of(pod_spec):
    return (pod_spec.get("initContainers") or []) + (pod_spec.get("containers") or [])


def by_kind(docs, kind):
    return {meta(d).get("name"): d for d in docs if d.get("kind") == kind}


def mount_for(path, container, volumes):
    """(mount, volume, path relative to the mount) of the deepest mount that
    holds `path`, or None."""
    best = None
    for m in container.get("volumeMounts") or []:
        mp = (m.get("mountPath") or "").rstrip("/")
        if path == mp or path.startswith(mp + "/"):
            if best is None or len(mp) > len(best[0].get("mountPath", "").rstrip("/")):
                best = (m, volumes.get(m.get("name")), path[len(mp):].lstrip("/"))
    return best


# ---------------------------------------------------------------- schemas

def describe(e):
    return f"{'.'.join(str(p) for p in e.path) or '(top level)'}: {e.message}"


def every_error(doc, version, first):
    """All schema errors of a document that kv.validate() rejected (it stops
    at the first): the same strict schema, with jsonschema's iter_errors."""
    try:
        from referencing import Registry, Resource
        import jsonschema
        api = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", doc["apiVersion"])
        folder = f"kubernetes-json-schema/v{version}-local-strict"
        schema = kv.schema_contents(f"{folder}/{doc['kind'].lower()}-{api}.json", version)
        defs = kv.schema_contents(f"{folder}/_definitions.json", version)
        registry = Resource.from_contents(defs) @ (Resource.from_contents(schema) @ Registry())
        validator = jsonschema.validators.Draft202012Validator(schema, registry=registry)
        found = sorted((describe(e) for e in validator.iter_errors(doc)))
        if found:
            return found
    except Exception:
        pass
    return [describe(first)]


def schema_errors(doc):
    if (doc.get("apiVersion"), doc.get("kind")) in OPERATOR_KINDS:
        return [f"{name_of(doc)}: {e}" for e in OPERATOR_KINDS[(doc["apiVersion"], doc["kind"])](doc)]
    errors, found = [], {}  # message -> versions it was found with
    for v in versions:
        try:
            kv.validate(doc, v, strict=True)
        except kv.ValidationError as e:
            for msg in every_error(doc, v, e):
                found.setdefault(msg, []).append(v)
        except kv.SchemaNotFoundError as e:
            # The library only warns about this; here it is a failure (a
            # misspelt kind or apiVersion would otherwise pass).
            return [f"{name_of(doc)}: {e.message}"]
        except kv.VersionNotSupportedError as e:
            return [e.message]
    for msg, vs in found.items():
        errors.append(f"{name_of(doc)} (Kubernetes {', '.join(vs)}): {msg}")
    return errors


# ------------------------------------- Prometheus Operator kinds, by structure

DURATION = re.compile(r"^(0|([0-9]+(ms|s|m|h|d|w|y))+)$")
DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
METRIC_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
PORT_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]{0,13}[a-z0-9])?$")


def shape(obj, where, allowed, required=()):
    """Errors for a mapping with a field outside `allowed` (strict, as the
    Kubernetes schemas are here) or without a `required` one."""
    if not isinstance(obj, dict):
        return [f"{where}: expected a mapping"]
    errors = [f"{where}: unknown field {k!r}" for k in obj if k not in allowed]
    errors += [f"{where}: missing {k!r}" for k in required if k not in obj]
    return errors


def string_map(obj, where):
    if obj is None:
        return []
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in obj.items()):
        return [f"{where}: expected a mapping of strings to strings"]
    return []


def object_meta(doc):
    errors = shape(doc, "(top level)", {"apiVersion", "kind", "metadata", "spec"}, ("metadata", "spec"))
    m = meta(doc)
    errors += shape(m, "metadata", {"name", "namespace", "labels", "annotations"}, ("name",))
    if not DNS_SUBDOMAIN.match(str(m.get("name", ""))):
        errors.append(f"metadata.name {m.get('name')!r} is not a DNS subdomain")
    errors += string_map(m.get("labels"), "metadata.labels") + string_map(m.get("annotations"), "metadata.annotations")
    return errors


def label_selector(sel, where):
    errors = shape(sel, where, {"matchLabels", "matchExpressions"})
    if isinstance(sel, dict):
        errors += string_map(sel.get("matchLabels"), f"{where}.matchLabels")
        if not sel.get("matchLabels") and not sel.get("matchExpressions"):
            errors.append(f"{where}: empty (it would select everything)")
    return errors


ENDPOINT_COMMON = {"port", "path", "scheme", "interval", "scrapeTimeout", "honorLabels",
                   "honorTimestamps", "trackTimestampsStaleness", "relabelings",
                   "metricRelabelings", "params", "tlsConfig", "basicAuth", "authorization",
                   "oauth2", "bearerTokenSecret", "followRedirects", "enableHttp2",
                   "filterRunning", "proxyUrl"}


def scrape_endpoints(endpoints, where, extra):
    if not isinstance(endpoints, list) or not endpoints:
        return [f"{where}: expected a non-empty list"]
    errors = []
    for i, ep in enumerate(endpoints):
        at = f"{where}[{i}]"
        errors += shape(ep, at, ENDPOINT_COMMON | extra)
        if not isinstance(ep, dict):
            continue
        if not isinstance(ep.get("port"), str) or not PORT_NAME.match(ep["port"]):
            errors.append(f"{at}.port: expected the name of a port (it is what the checks against the overlays use)")
        if "path" in ep and not str(ep["path"]).startswith("/"):
            errors.append(f"{at}.path: {ep['path']!r} does not start with /")
        if ep.get("scheme", "http") not in ("http", "https"):
            errors.append(f"{at}.scheme: {ep['scheme']!r} is neither http nor https")
        for k in ("interval", "scrapeTimeout"):
            if k in ep and not DURATION.match(str(ep[k])):
                errors.append(f"{at}.{k}: {ep[k]!r} is not a duration")
    return errors


def check_service_monitor(doc):
    spec = doc.get("spec") or {}
    return (object_meta(doc)
            + shape(spec, "spec", {"selector", "endpoints", "namespaceSelector", "jobLabel",
                                   "targetLabels", "podTargetLabels", "sampleLimit",
                                   "scrapeProtocols", "attachMetadata"}, ("selector", "endpoints"))
            + label_selector(spec.get("selector"), "spec.selector")
            + scrape_endpoints(spec.get("endpoints"), "spec.endpoints", {"targetPort"}))


def check_pod_monitor(doc):
    spec = doc.get("spec") or {}
    return (object_meta(doc)
            + shape(spec, "spec", {"selector", "podMetricsEndpoints", "namespaceSelector", "jobLabel",
                                   "podTargetLabels", "sampleLimit", "scrapeProtocols",
                                   "attachMetadata"}, ("selector", "podMetricsEndpoints"))
            + label_selector(spec.get("selector"), "spec.selector")
            + scrape_endpoints(spec.get("podMetricsEndpoints"), "spec.podMetricsEndpoints",
                               {"portNumber", "targetPort"}))


def check_prometheus_rule(doc):
    spec = doc.get("spec") or {}
    errors = object_meta(doc) + shape(spec, "spec", {"groups"}, ("groups",))
    groups = spec.get("groups")
    if not isinstance(groups, list) or not groups:
        return errors + ["spec.groups: expected a non-empty list"]
    names = set()
    for i, g in enumerate(groups):
        at = f"spec.groups[{i}]"
        errors += shape(g, at, {"name", "rules", "interval", "limit", "query_offset",
                                "partial_response_strategy", "labels"}, ("name", "rules"))
        if not isinstance(g, dict):
            continue
        if g.get("name") in names:
            errors.append(f"{at}.name: group {g.get('name')!r} appears twice")
        names.add(g.get("name"))
        if "interval" in g and not DURATION.match(str(g["interval"])):
            errors.append(f"{at}.interval: {g['interval']!r} is not a duration")
        rules = g.get("rules")
        if not isinstance(rules, list) or not rules:
            errors.append(f"{at}.rules: expected a non-empty list")
            continue
        for j, r in enumerate(rules):
            rat = f"{at}.rules[{j}]"
            errors += shape(r, rat, {"alert", "record", "expr", "for", "keep_firing_for",
                                     "labels", "annotations"}, ("expr",))
            if not isinstance(r, dict):
                continue
            if ("alert" in r) == ("record" in r):
                errors.append(f"{rat}: needs exactly one of alert and record")
            if "record" in r and not METRIC_NAME.match(str(r["record"])):
                errors.append(f"{rat}.record: {r['record']!r} is not a metric name")
            if "alert" in r and not (isinstance(r["alert"], str) and r["alert"]):
                errors.append(f"{rat}.alert: expected a name")
            if not str(r.get("expr", "")).strip():
                errors.append(f"{rat}.expr: empty")
            for k in ("for", "keep_firing_for"):
                if k in r and not DURATION.match(str(r[k])):
                    errors.append(f"{rat}.{k}: {r[k]!r} is not a duration")
            if "record" in r and ("for" in r or "annotations" in r):
                errors.append(f"{rat}: a recording rule takes no for or annotations")
            errors += string_map(r.get("labels"), f"{rat}.labels") + string_map(r.get("annotations"), f"{rat}.annotations")
    return errors


OPERATOR_KINDS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): check_service_monitor,
    ("monitoring.coreos.com/v1", "PodMonitor"): check_pod_monitor,
    ("monitoring.coreos.com/v1", "PrometheusRule"): check_prometheus_rule,
}


# ------------------------------------------------------ cross-references

def cross_checks(docs, rendered):
    """What a schema cannot see, within one file. `rendered`: an overlay's
    rendering, where every ConfigMap is generated, so a reference to one
    that is not there would leave the pod waiting for it."""
    errors = []
    templates = pod_templates(docs)
    configmaps = by_kind(docs, "ConfigMap")

    def selected(selector, what):
        hits = [t for _, t in templates
                if matches(selector, (t.get("metadata") or {}).get("labels") or {})]
        if not hits:
            errors.append(f"{what}: selector {selector} matches no pod template in this file")
        return hits

    def configmap_key(name, key, optional, where):
        cm = configmaps.get(name)
        if cm is None:
            if rendered and not optional:
                errors.append(f"{where}: ConfigMap {name} is not in the rendering "
                              "(a configMapGenerator name that kustomize did not rewrite?)")
            return
        if key is not None and key not in set(cm.get("data") or {}) | set(cm.get("binaryData") or {}):
            errors.append(f"{where}: ConfigMap {name} has no key {key!r}")

    for d in docs:
        kind, spec, where = d.get("kind"), d.get("spec") or {}, name_of(d)
        if kind in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet"):
            sel = (spec.get("selector") or {}).get("matchLabels") or {}
            labels = ((spec.get("template") or {}).get("metadata") or {}).get("labels") or {}
            if not sel or not matches(sel, labels):
                errors.append(f"{where}: spec.selector.matchLabels {sel} does not match the template labels {labels}")
        if kind == "Service" and spec.get("selector"):
            for t in selected(spec["selector"], where):
                names = {p.get("name") for c in containers_of(t.get("spec") or {}) for p in c.get("ports") or []}
                for p in spec.get("ports") or []:
                    tp = p.get("targetPort")
                    if isinstance(tp, str) and tp not in names:
                        errors.append(f"{where}: targetPort {tp!r} is not a named container port of the selected pods")
        if kind in ("PodDisruptionBudget", "NetworkPolicy"):
            sel = spec.get("selector") if kind == "PodDisruptionBudget" else spec.get("podSelector")
            if (sel or {}).get("matchLabels"):
                selected(sel["matchLabels"], where)
        if kind == "Ingress" and rendered:
            services = by_kind(docs, "Service")
            for rule in spec.get("rules") or []:
                for p in ((rule.get("http") or {}).get("paths") or []):
                    svc = ((p.get("backend") or {}).get("service") or {})
                    target = services.get(svc.get("name"))
                    port = (svc.get("port") or {}).get("name")
                    if target is None:
                        errors.append(f"{where}: backend Service {svc.get('name')} is not in this file")
                    elif port and port not in {q.get("name") for q in (target.get("spec") or {}).get("ports") or []}:
                        errors.append(f"{where}: Service {svc.get('name')} has no port named {port!r}")
        if kind == "ConfigMap":
            for key, text in (d.get("data") or {}).items():
                if key.endswith(".toml"):
                    try:
                        tomllib.loads(text)
                    except tomllib.TOMLDecodeError as e:
                        errors.append(f"{where}: data.{key} is not valid TOML: {e}")

    for owner, t in templates:
        owner = name_of(owner)
        pod = t.get("spec") or {}
        volumes = {v.get("name"): v for v in pod.get("volumes") or []}
        for v in volumes.values():
            cm = v.get("configMap")
            if cm:
                for item in cm.get("items") or [{"key": None}]:
                    configmap_key(cm.get("name"), item.get("key"), cm.get("optional"),
                                  f"{owner}: volume {v.get('name')}")
        for c in containers_of(pod):
            where = f"{owner}: container {c.get('name')}"
            port_names = {p.get("name") for p in c.get("ports") or []}
            for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                for handler in ("httpGet", "tcpSocket", "grpc"):
                    port = ((c.get(probe) or {}).get(handler) or {}).get("port")
                    if isinstance(port, str) and port not in port_names:
                        errors.append(f"{where}: {probe} port {port!r} is not a named port of the container")
            for m in c.get("volumeMounts") or []:
                vol = volumes.get(m.get("name"))
                if vol is None:
                    errors.append(f"{where}: volumeMount {m.get('name')!r} names no volume")
                elif m.get("subPath") and (vol.get("secret") or vol.get("configMap")):
                    errors.append(f"{where}: volumeMount {m.get('name')!r} uses subPath: "
                                  "the file would not follow Secret/ConfigMap updates")
            for e in c.get("env") or []:
                ref = (e.get("valueFrom") or {}).get("configMapKeyRef")
                if ref:
                    configmap_key(ref.get("name"), ref.get("key"), ref.get("optional"),
                                  f"{where}: env {e.get('name')}")
    return errors


# ------------------------------------------------- the gateway and its config

def config_path(container):
    """The file after the gateway's --config, or None."""
    args = [str(a) for a in container.get("args") or []]
    path = None
    for i, a in enumerate(args):
        if a == "--config" and i + 1 < len(args):
            path = args[i + 1]
        elif a.startswith("--config="):
            path = a.split("=", 1)[1]
    return path


def config_source(container, volumes, configmaps):
    """(path, text, error) of the gateway's config file: the file after
    --config, found through its mount in a ConfigMap of the file. The text
    is None when the ConfigMap or its key is missing (cross_checks reports
    that)."""
    path = config_path(container)
    if path is None:
        return None, None, None
    found = mount_for(path, container, volumes)
    cm = (found[1] or {}).get("configMap") if found else None
    if not cm:
        return path, None, f"--config {path} is not on a ConfigMap volume mount"
    items = {i.get("path"): i.get("key") for i in cm.get("items") or []}
    key = items.get(found[2], found[2] if not items else None)
    return path, ((configmaps.get(cm.get("name")) or {}).get("data") or {}).get(key), None


def gateway_config(container, volumes, configmaps):
    """(config path, parsed TOML, errors) of a gateway container; {} for no
    config, or one that does not parse (cross_checks reports that)."""
    path, text, error = config_source(container, volumes, configmaps)
    if error:
        return path, {}, [error]
    try:
        return path, tomllib.loads(text or ""), []
    except tomllib.TOMLDecodeError:
        return path, {}, []


def config_files(config):
    """(dotted key, path) of every file the config names (the *_file keys)."""
    out = []

    def walk(node, prefix):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}.{k}" if prefix else k)
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{prefix}[{i}]")
        elif isinstance(node, str) and prefix.endswith("_file"):
            out.append((prefix, node))
    walk(config, "")
    return out


def config_dirs(config):
    """(dotted key, directory) the gateway writes to: the local stores."""
    out = []
    cb = config.get("callbacks")
    if isinstance(cb, dict) and cb.get("backend", "local") == "local":
        out.append(("callbacks.store", cb.get("store", "/var/lib/pandagate")))
    idem = config.get("idempotency")
    if isinstance(idem, dict) and idem.get("backend", idem.get("store", "local")) == "local":
        out.append(("idempotency.path", idem.get("path", "/var/lib/pandagate/idempotency")))
    return out


def is_loopback(host):
    host = host.strip("[]")
    return host in ("localhost", "::1") or host.startswith("127.")


def gateways(docs):
    """(workload, pod template, container, is init container) per gateway."""
    out = []
    for w, t in pod_templates(docs):
        pod = t.get("spec") or {}
        for init, key in ((True, "initContainers"), (False, "containers")):
            for c in pod.get(key) or []:
                if c.get("name") == GATEWAY:
                    out.append((w, t, c, init))
    return out


def gateway_checks(docs, secret_files):
    """The gateway container against its config. Adds to `secret_files`
    (Secret name -> {key: where}) the files it reads from Secret volumes
    mounted without items, whose keys only the config names."""
    errors = []
    configmaps = by_kind(docs, "ConfigMap")
    for w, t, c, init in gateways(docs):
        where = f"{name_of(w)}: container {GATEWAY}"
        pod = t.get("spec") or {}
        volumes = {v.get("name"): v for v in pod.get("volumes") or []}
        path, config, errs = gateway_config(c, volumes, configmaps)
        errors += [f"{where}: {e}" for e in errs]
        env = {e.get("name"): e.get("value") for e in c.get("env") or [] if "value" in e}

        # Listeners: each declared port is where the gateway listens.
        server = config.get("server") if isinstance(config.get("server"), dict) else {}
        callbacks = config.get("callbacks") if isinstance(config.get("callbacks"), dict) else {}
        listening = {
            "http": env.get("PANDAGATE_LISTEN") or server.get("listen") or "127.0.0.1:8080",
            "admin": env.get("PANDAGATE_ADMIN_LISTEN") or server.get("admin_listen") or "127.0.0.1:9901",
            "callbacks": callbacks.get("listen"),
        }
        ports = {p.get("name"): p.get("containerPort") for p in c.get("ports") or []}
        if "admin" not in ports:
            errors.append(f"{where}: no port named admin (the probes and Prometheus use it)")
        for name, number in ports.items():
            if name not in listening:
                continue
            addr = listening[name]
            if addr is None:
                errors.append(f"{where}: port {name} ({number}) declared, but the config has no callbacks.listen")
                continue
            host, _, port = str(addr).rpartition(":")
            if is_loopback(host):
                errors.append(f"{where}: port {name} ({number}) declared, but the gateway listens on {addr}, "
                              "which the pod network cannot reach")
            elif port != str(number):
                errors.append(f"{where}: port {name} is {number}, but the gateway listens on {addr}")

        # Files it reads: on a mount, and in the Secret or ConfigMap behind it.
        reads = config_files(config) + [(f"env {k}", v) for k, v in env.items()
                                        if k.endswith("_FILE") and v]
        for key, f in reads:
            found = mount_for(f, c, volumes)
            if found is None:
                errors.append(f"{where}: {key} = {f} is on no volume mount")
                continue
            m, vol, rel = found
            vol = vol or {}
            src = vol.get("secret") or vol.get("configMap")
            if src is None:
                continue
            items = [i.get("path") for i in src.get("items") or []]
            if items and rel not in items:
                errors.append(f"{where}: {key} = {f}, but volume {m.get('name')} holds only {items}")
            elif not items and vol.get("secret"):
                secret_files.setdefault(vol["secret"].get("secretName"), {})[rel] = f"{where}: {key}"
            elif not items and vol.get("configMap"):
                cm = configmaps.get(vol["configMap"].get("name"))
                if cm is not None and rel not in (cm.get("data") or {}):
                    errors.append(f"{where}: {key} = {f}, but ConfigMap {vol['configMap'].get('name')} has no key {rel!r}")

        # Where it writes: the root filesystem is read-only.
        for key, d in config_dirs(config):
            found = mount_for(d, c, volumes)
            if found is None:
                errors.append(f"{where}: {key} = {d} is on no volume mount (the root filesystem is read-only)")
                continue
            m, vol, _ = found
            if m.get("readOnly") or any(k in (vol or {}) for k in ("secret", "configMap", "projected", "downwardAPI")):
                errors.append(f"{where}: {key} = {d} is on the read-only mount {m.get('name')}")

        # A sidecar is a native one: an init container that keeps running.
        sidecar = labels_of(w).get(SIDECAR_LABEL) == "true"
        if init and c.get("restartPolicy") != "Always":
            errors.append(f"{where}: an init container without restartPolicy: Always; the pod would wait for "
                          "the gateway to exit before starting its containers")
        if sidecar and not init:
            errors.append(f"{where}: the workload is labelled {SIDECAR_LABEL}, but the gateway is not an "
                          "init container (a native sidecar)")
        if sidecar and ((t.get("metadata") or {}).get("labels") or {}).get(SIDECAR_LABEL) != "true":
            errors.append(f"{name_of(w)}: pod template not labelled {SIDECAR_LABEL}: \"true\", which "
                          "prometheus/pandagate-podmonitor.yaml selects")
    return errors


def egress_checks(docs):
    """Every pod with the gateway is selected by a NetworkPolicy restricting
    both ingress and egress, whose egress rules each name destinations and
    ports, admit any address only for HTTPS (the provider, which a
    NetworkPolicy cannot name), and admit DNS."""
    errors = []
    policies = [d for d in docs if d.get("kind") == "NetworkPolicy"]
    for w, t, _, _ in gateways(docs):
        labels = (t.get("metadata") or {}).get("labels") or {}
        mine = [p for p in policies
                if matches(((p.get("spec") or {}).get("podSelector") or {}).get("matchLabels"), labels)]
        types = {ty for p in mine for ty in (p.get("spec") or {}).get("policyTypes") or []}
        for ty in ("Ingress", "Egress"):
            if ty not in types:
                errors.append(f"{name_of(w)}: no NetworkPolicy with policyTypes {ty} selects its pods")
        dns = set()
        for p in mine:
            spec = p.get("spec") or {}
            if "Egress" not in (spec.get("policyTypes") or []):
                continue
            for i, rule in enumerate(spec.get("egress") or []):
                at = f"{name_of(p)}: egress[{i}]"
                ports = rule.get("ports") or []
                if not ports:
                    errors.append(f"{at} names no port, so it admits every port")
                if not rule.get("to"):
                    errors.append(f"{at} names no destination, so it admits every address")
                for peer in rule.get("to") or []:
                    cidr = (peer.get("ipBlock") or {}).get("cidr", "")
                    if cidr.endswith("/0") and any((q.get("port"), q.get("protocol", "TCP")) != (443, "TCP") for q in ports):
                        errors.append(f"{at} admits any address ({cidr}) on a port other than 443/TCP")
                for q in ports:
                    if q.get("port") == 53:
                        dns.add(q.get("protocol", "TCP"))
        if "Egress" in types and dns != {"UDP", "TCP"}:
            errors.append(f"{name_of(w)}: its egress admits no DNS (port 53 over UDP and TCP)")
    return errors


# ----------------------------------------------------------------- Secrets

def documented_secrets():
    """Secret name -> set of keys, from the `kubectl create secret` commands
    in deploy/README.md (a command may continue over lines ending in \\)."""
    with open(os.path.join(HERE, "README.md"), encoding="utf-8") as f:
        text = f.read().replace("\\\n", " ")
    out = {}
    for line in text.splitlines():
        m = re.search(r"\bcreate secret (generic|tls) ([a-z0-9][-a-z0-9.]*)(.*)", line)
        if not m:
            continue
        kind, name, rest = m.groups()
        keys = out.setdefault(name, set())
        if kind == "tls":
            keys |= {"tls.crt", "tls.key"}
        for flag, spec in re.findall(r"--from-(literal|file)[= ](\S+)", rest):
            key, eq, _ = spec.partition("=")
            keys.add(key if (eq or flag == "literal") else os.path.basename(key))
    return out


def secret_checks(docs, secret_files, documented):
    """No Secret inlined; each one referenced is created by a documented
    command with the keys used."""
    errors, refs = [], []  # refs: (name, key or None, where)
    for d in docs:
        if d.get("kind") == "Secret":
            errors.append(f"{name_of(d)}: a Secret in the manifests; create it out of band "
                          "(deploy/README.md, \"Secrets\") and reference it")
        if d.get("kind") == "Ingress":
            for tls in (d.get("spec") or {}).get("tls") or []:
                refs += [(tls.get("secretName"), k, name_of(d)) for k in ("tls.crt", "tls.key")]
    for w, t in pod_templates(docs):
        pod = t.get("spec") or {}
        for v in pod.get("volumes") or []:
            s = v.get("secret")
            if s:
                items = s.get("items") or []
                refs += [(s.get("secretName"), i.get("key"), f"{name_of(w)}: volume {v.get('name')}") for i in items]
                if not items:
                    refs.append((s.get("secretName"), None, f"{name_of(w)}: volume {v.get('name')}"))
        for c in containers_of(pod):
            for e in c.get("env") or []:
                r = (e.get("valueFrom") or {}).get("secretKeyRef")
                if r:
                    refs.append((r.get("name"), r.get("key"), f"{name_of(w)}: container {c.get('name')}: env {e.get('name')}"))
            for e in c.get("envFrom") or []:
                if e.get("secretRef"):
                    refs.append((e["secretRef"].get("name"), None, f"{name_of(w)}: container {c.get('name')}: envFrom"))
    for name, files in secret_files.items():
        refs += [(name, key, where) for key, where in files.items()]
    for name, key, where in refs:
        if name not in documented:
            errors.append(f"{where}: Secret {name} is referenced, but deploy/README.md has no "
                          f"`kubectl create secret ... {name}` command")
        elif key is not None and key not in documented[name]:
            errors.append(f"{where}: Secret {name} key {key!r} is not in deploy/README.md's command "
                          f"(it has {sorted(documented[name])})")
    return errors


# --------------------------------------------------------------- subjects

class Report:
    def __init__(self):
        self.failed = 0
        self.total = 0

    def subject(self, what, errors, summary):
        errors = list(dict.fromkeys(errors))  # one line per distinct error
        self.total += 1
        if errors:
            self.failed += 1
            print(f"FAIL {what}: {len(errors)} error(s)")
            for e in errors:
                print(f"       {e}")
        else:
            print(f"ok   {what}: {summary}")


def manifest_errors(docs, rendered):
    errors = []
    for i, doc in enumerate(docs, 1):
        if not isinstance(doc, dict) or not all(isinstance(doc.get(k), str) for k in ("apiVersion", "kind")) \
                or not isinstance(meta(doc).get("name"), str):
            errors.append(f"document {i}: not a Kubernetes resource (needs apiVersion, kind and metadata.name)")
            continue
        errors += schema_errors(doc)
    if not errors:
        errors = cross_checks(docs, rendered) + egress_checks(docs)
    return errors


def check_manifests(report, path, rendered=False, documented=None):
    docs, errors = load_docs(path)
    if not errors and not docs:
        errors = ["no Kubernetes resources in the file"]
    if not errors:
        errors = manifest_errors(docs, rendered)
    if not errors:
        secret_files = {}
        errors = gateway_checks(docs, secret_files)
        if documented is not None:
            errors += secret_checks(docs, secret_files, documented)
    report.subject(shown(path) if not rendered else f"overlay {os.path.basename(path)[:-5]}", errors,
                   f"{len(docs)} resources valid against Kubernetes {', '.join(versions)} (strict): "
                   + ", ".join(name_of(d) + (" (by structure)" if (d.get("apiVersion"), d.get("kind")) in OPERATOR_KINDS else "")
                               for d in docs if isinstance(d, dict)))
    return docs


def example_path(overlay):
    return os.path.join(HERE, EXAMPLE_NAMES.get(overlay, f"{overlay}.yaml"))


def check_examples(report, rendered, write):
    """deploy/*.yaml are the overlays' renderings, each under the header."""
    expected = {}
    for overlay, path in rendered.items():
        with open(path, encoding="utf-8") as f:
            expected[example_path(overlay)] = EXAMPLE_HEADER.format(overlay=overlay) + f.read()
    if write:
        for path, text in expected.items():
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
            print(f"wrote {shown(path)}")
    for name in sorted(os.listdir(HERE)):
        path = os.path.join(HERE, name)
        if name.endswith(".yaml") and path not in expected:
            report.subject(shown(path), ["not the rendering of any overlay: delete it, or make it an overlay "
                                         "under deploy/kustomize/overlays/"], "")
    for path, text in sorted(expected.items()):
        try:
            with open(path, encoding="utf-8") as f:
                actual = f.read()
        except OSError:
            actual = None
        errors = []
        if actual is None:
            errors = ["missing; run deploy/validate.sh --write"]
        elif actual != text:
            diff = list(difflib.unified_diff(actual.splitlines(), text.splitlines(), "committed", "rendered", lineterm="", n=1))
            errors = ["differs from its overlay's rendering; run deploy/validate.sh --write. The diff begins:\n"
                      + "\n".join(f"         {line}" for line in diff[:16])]
        report.subject(shown(path), errors, "the rendering of its overlay")


def check_monitors(report, renders):
    for rel, overlays in MONITORS.items():
        path = os.path.join(HERE, rel)
        docs, errors = load_docs(path)
        for doc in docs:
            errors += schema_errors(doc)
        if not docs and not errors:
            errors = ["no resources in the file"]
        for doc in docs if not errors else []:
            spec = doc.get("spec") or {}
            selector = (spec.get("selector") or {}).get("matchLabels") or {}
            for overlay in overlays:
                rdocs = renders.get(overlay)
                if rdocs is None:
                    errors.append(f"{name_of(doc)}: overlay {overlay} was not rendered")
                    continue
                if doc["kind"] == "ServiceMonitor":
                    ports = [ep.get("port") for ep in spec.get("endpoints") or []]
                    services = [s for s in rdocs if s.get("kind") == "Service" and matches(selector, labels_of(s))]
                    if not services:
                        errors.append(f"{name_of(doc)}: selector {selector} matches no Service of overlay {overlay}")
                    for s in services:
                        names = {p.get("name") for p in (s.get("spec") or {}).get("ports") or []}
                        for port in ports:
                            if port not in names:
                                errors.append(f"{name_of(doc)}: {name_of(s)} of overlay {overlay} has no port named {port!r}")
                else:
                    ports = [ep.get("port") for ep in spec.get("podMetricsEndpoints") or []]
                    pods = [(w, t) for w, t in pod_templates(rdocs)
                            if matches(selector, (t.get("metadata") or {}).get("labels") or {})]
                    if not pods:
                        errors.append(f"{name_of(doc)}: selector {selector} matches no pod template of overlay {overlay}")
                    for w, t in pods:
                        names = {p.get("name") for c in containers_of(t.get("spec") or {}) for p in c.get("ports") or []}
                        for port in ports:
                            if port not in names:
                                errors.append(f"{name_of(doc)}: the pods of {name_of(w)} (overlay {overlay}) "
                                              f"have no container port named {port!r}")
        report.subject(shown(path), errors,
                       f"{', '.join(name_of(d) for d in docs)} (structure), matching overlay(s) {', '.join(overlays)}")
    for rel in RULES:
        path = os.path.join(HERE, rel)
        docs, errors = load_docs(path)
        for doc in docs:
            errors += schema_errors(doc)
        rules = sum(len(g.get("rules") or []) for d in docs for g in (d.get("spec") or {}).get("groups") or [])
        report.subject(shown(path), errors or ([] if docs else ["no resources in the file"]),
                       f"{', '.join(name_of(d) for d in docs)} (structure): {rules} rules")


def check_toml_sources(report):
    """Every .toml under deploy/kustomize/ parses and is what some
    configMapGenerator reads."""
    fed, tomls = set(), []
    for dirpath, _, files in os.walk(os.path.join(HERE, "kustomize")):
        for name in files:
            path = os.path.join(dirpath, name)
            if name.endswith(".toml"):
                tomls.append(path)
            if name == "kustomization.yaml":
                docs, _ = load_docs(path)
                for gen in (docs[0] if docs else {}).get("configMapGenerator") or []:
                    for entry in gen.get("files") or []:
                        fed.add(os.path.normpath(os.path.join(dirpath, entry.split("=", 1)[-1])))
    for path in sorted(tomls):
        errors = []
        try:
            with open(path, "rb") as f:
                tomllib.load(f)
        except (OSError, tomllib.TOMLDecodeError) as e:
            errors.append(f"not valid TOML: {e}")
        if os.path.normpath(path) not in fed:
            errors.append("no configMapGenerator reads it (an edit would change nothing)")
        report.subject(shown(path), errors, "valid TOML (tomllib), read by a configMapGenerator")


# ------------------------------------------------- Dockerfile, .dockerignore

def dockerfile_instructions(text):
    """(instruction, arguments) in order, continuation lines joined."""
    out, current = [], ""
    for line in text.splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if current and line.lstrip().startswith("#"):
            continue  # a comment inside a continued instruction
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        current += line
        word, _, rest = current.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        current = ""
    return out


def dockerignore_patterns(text):
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pat = os.path.normpath(line.lstrip("!").strip().lstrip("/"))
        out.append((negate, pat))
    return out


def glob_regex(pattern):
    """Go's filepath.Match, plus `**` for any number of directories, as
    Docker reads .dockerignore."""
    out, i = "", 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**", i):
            out += ".*"
            i += 2
            continue
        out += {"*": "[^/]*", "?": "[^/]"}.get(c, re.escape(c))
        i += 1
    return re.compile(f"^{out}$")


def dockerignored(path, patterns):
    """Whether Docker leaves `path` (relative to the context) out: the last
    pattern matching it or one of its parent directories decides."""
    parts = path.split("/")
    prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    excluded = False
    for negate, pat in patterns:
        rx = glob_regex(pat)
        if any(rx.match(p) for p in prefixes):
            excluded = not negate
    return excluded


def check_docker(report):
    errors = []
    with open(os.path.join(ROOT, "Cargo.toml"), "rb") as f:
        package = tomllib.load(f).get("package", {})
    with open(os.path.join(HERE, "Dockerfile"), encoding="utf-8") as f:
        text = f.read()
    steps = dockerfile_instructions(text)
    last_from = max(i for i, (ins, _) in enumerate(steps) if ins == "FROM")
    final = steps[last_from + 1:]
    args = {a.split("=", 1)[0] for ins, a in final if ins == "ARG"}
    labels = {}
    for ins, rest in final:
        if ins == "LABEL":
            for token in shlex.split(rest):
                key, _, value = token.partition("=")
                labels[key] = value
    oci = "org.opencontainers.image."
    for key, arg in (("source", None), ("version", "VERSION"), ("revision", "REVISION")):
        value = labels.get(oci + key)
        if not value:
            errors.append(f"Dockerfile: no LABEL {oci}{key} in the final stage")
            continue
        used = set(re.findall(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)", value))
        if arg and arg not in used:
            errors.append(f"Dockerfile: LABEL {oci}{key}={value} does not take the build ARG {arg}")
        for a in used - args:
            errors.append(f"Dockerfile: LABEL {oci}{key} uses ${a}, which is not an ARG of the final stage "
                          "(an ARG is scoped to the stage that declares it)")
        if arg and f"--build-arg {arg}=" not in text:
            errors.append(f"Dockerfile: the header's docker build command does not pass --build-arg {arg}=")
    for key, expected in (("title", package.get("name")), ("description", package.get("description")),
                          ("licenses", package.get("license"))):
        if oci + key in labels and labels[oci + key] != expected:
            errors.append(f"Dockerfile: LABEL {oci}{key}={labels[oci + key]!r}, but Cargo.toml says {expected!r}")

    try:
        with open(os.path.join(ROOT, ".dockerignore"), encoding="utf-8") as f:
            patterns = dockerignore_patterns(f.read())
    except OSError:
        patterns = None
        errors.append(".dockerignore: missing at the repository root (the build context)")
    if patterns is not None:
        for path in ("target/release/pandagate", ".git/HEAD"):
            if not dockerignored(path, patterns):
                errors.append(f".dockerignore: does not exclude {path.split('/')[0]}/ ({path} would be sent)")
        copied = []
        for ins, rest in steps:
            if ins == "COPY" and "--from=" not in rest:
                words = [w for w in shlex.split(rest) if not w.startswith("--")]
                copied += words[:-1]
        for src in copied:
            full = os.path.join(ROOT, src)
            if not os.path.exists(full):
                errors.append(f"Dockerfile: COPY {src}: not in the repository")
                continue
            files = [src] if os.path.isfile(full) else [
                os.path.relpath(os.path.join(d, n), ROOT) for d, _, ns in os.walk(full) for n in ns]
            left_out = [p for p in files if dockerignored(p.replace(os.sep, "/"), patterns)]
            if left_out:
                errors.append(f".dockerignore: excludes {left_out[0]}, which the Dockerfile copies (COPY {src})")
    report.subject("deploy/Dockerfile, .dockerignore", errors,
                   "OCI source, version and revision labels from build ARGs; the context leaves out target/ "
                   "and .git/ and keeps what COPY reads")


# ----------------------------------------------------- pandagate check

def stand_in(key):
    """The content of a file the config reads, for `pandagate check`:
    loopback URLs for stores (nothing leaves the machine), a token else."""
    if "postgres" in key:
        return "postgres://pandagate@127.0.0.1:1/pandagate\n"
    if "redis" in key:
        return "redis://127.0.0.1:1\n"
    if key.endswith(("ca_file", "cert_file", "key_file")):
        return None
    return secrets.token_hex(32) + "\n"


def under_root(text, mounts, root):
    """`text` (the config, or an env value) with every quoted or bare path
    under one of the container's mounts moved under `root`."""
    for m in sorted(mounts, key=len, reverse=True):
        text = re.sub(r'(^|["\'])' + re.escape(m) + r'(?=$|[/"\'])', lambda x: x.group(1) + root + m, text)
    return text


def check_with_binary(report, binary, renders):
    for overlay, docs in sorted(renders.items()):
        configmaps = by_kind(docs, "ConfigMap")
        for w, t, c, _ in gateways(docs):
            volumes = {v.get("name"): v for v in (t.get("spec") or {}).get("volumes") or []}
            path, config, errors = gateway_config(c, volumes, configmaps)
            text = config_source(c, volumes, configmaps)[1] or ""
            what = f"pandagate check: overlay {overlay}, {name_of(w)}"
            if path is None or errors:
                report.subject(what, errors or ["the gateway has no --config"], "")
                continue
            mounts = [(m.get("mountPath") or "").rstrip("/") for m in c.get("volumeMounts") or []]
            with tempfile.TemporaryDirectory(prefix="pandagate-check-") as root:
                env = {"PATH": "/usr/bin:/bin", "HOME": root}
                for e in c.get("env") or []:
                    if "value" in e:
                        env[e["name"]] = under_root(str(e["value"]), mounts, root)
                    elif ((e.get("valueFrom") or {}).get("secretKeyRef") or {}).get("optional"):
                        continue  # may be absent from the Secret
                    else:
                        env[e["name"]] = "validate-" + secrets.token_hex(8)
                reads = config_files(config) + [(k, v) for k, v in env.items() if k.endswith("_FILE")]
                for key, f in reads:
                    content = stand_in(key.lower())
                    target = f if f.startswith(root) else root + f
                    if content is None:
                        errors.append(f"{key} = {f}: no stand-in for a certificate file; check it by hand")
                        continue
                    os.makedirs(os.path.dirname(target), exist_ok=True)
                    with open(target, "w", encoding="utf-8") as out:
                        out.write(content)
                for _, d in config_dirs(config):
                    os.makedirs(root + d, exist_ok=True)
                config_file = root + path
                os.makedirs(os.path.dirname(config_file), exist_ok=True)
                with open(config_file, "w", encoding="utf-8") as out:
                    out.write(under_root(text, mounts, root))
                if not errors:
                    try:
                        run = subprocess.run([binary, "check", "--config", config_file], env=env,
                                             capture_output=True, text=True, timeout=60)
                        lines = run.stdout.splitlines()
                        if run.returncode != 0 or not lines or "config is valid" not in lines[0]:
                            errors.append(f"exit {run.returncode}: {(run.stderr or run.stdout).strip()}")
                    except (OSError, subprocess.TimeoutExpired) as e:
                        errors.append(f"cannot run {binary}: {e}")
            report.subject(what, errors, "config is valid (with the manifests' environment and stand-in secrets)")


# ------------------------------------------------------------------- main

def main(argv):
    shipped = kv.all_versions()
    for v in versions:
        if v not in shipped:
            sys.exit(f"validate.py: kubernetes-validate {validator_version} ships no schemas for "
                     f"Kubernetes {v} (it has {shipped[0]} .. {shipped[-1]})")
    report = Report()
    if argv[:1] == ["--files"]:
        for path in argv[1:]:
            check_manifests(report, path)
    elif argv[:1] == ["--rendered"] and len(argv) >= 2:
        rendered_dir, write = argv[1], "--write" in argv[2:]
        rendered = {n[:-5]: os.path.join(rendered_dir, n) for n in sorted(os.listdir(rendered_dir)) if n.endswith(".yaml")}
        documented = documented_secrets()
        renders = {o: check_manifests(report, p, rendered=True, documented=documented) for o, p in rendered.items()}
        check_examples(report, rendered, write)
        check_monitors(report, renders)
        check_toml_sources(report)
        check_docker(report)
        binary = os.environ.get("PANDAGATE_BIN")
        if binary:
            check_with_binary(report, binary, renders)
    else:
        sys.exit(__doc__)
    print(f"validate.sh: kubernetes-validate {validator_version}; "
          f"{report.total - report.failed} of {report.total} checked subject(s) valid")
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
