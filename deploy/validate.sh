#!/usr/bin/env bash
# Validates the Kubernetes manifests in deploy/ against the Kubernetes JSON
# schemas, offline, in strict mode (an unknown field is an error).
#
#   deploy/validate.sh                 # every deploy/*.yaml
#   deploy/validate.sh FILE...         # the given files
#
# The validator is the PyPI package kubernetes-validate, which ships the
# schemas of each Kubernetes version inside the package: nothing is fetched
# at validation time. When the pinned version is not importable by python3,
# it is installed (pip install --quiet) into a virtualenv under
# ${XDG_CACHE_HOME:-~/.cache}/pandagate/ (override with PANDAGATE_VALIDATE_VENV).
#
# Each document is checked against every version in KUBERNETES_VERSIONS:
# the newest one the package ships, and 1.29, the oldest with native sidecars
# (init containers with restartPolicy: Always). On top of the schemas, a few
# cross-references the schemas cannot see are checked within each file:
# selectors match a pod template, named ports and volumes exist, Secret and
# ConfigMap keys referenced exist, Secret/ConfigMap volumes are not mounted
# with subPath (that would stop rotation), and embedded *.toml files parse.
#
# Prints one line per file and exits non-zero if any file fails.
set -euo pipefail

VALIDATOR_VERSION="1.37.0"
KUBERNETES_VERSIONS="${KUBERNETES_VERSIONS:-1.37.0 1.29.0}"
PYTHON="${PYTHON:-python3}"

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if [ "$#" -eq 0 ]; then
    shopt -s nullglob
    set -- "$here"/*.yaml
    shopt -u nullglob
    if [ "$#" -eq 0 ]; then
        echo "validate.sh: no manifests in $here" >&2
        exit 1
    fi
fi

has_validator() {
    "$1" -c "import sys, kubernetes_validate.version as v; sys.exit(v.__version__ != '$VALIDATOR_VERSION')" \
        >/dev/null 2>&1
}

if ! has_validator "$PYTHON"; then
    venv="${PANDAGATE_VALIDATE_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/pandagate/validate-venv}"
    if ! has_validator "$venv/bin/python"; then
        echo "validate.sh: installing kubernetes-validate==$VALIDATOR_VERSION (PyPI) into $venv" >&2
        if "$PYTHON" -m venv "$venv" >/dev/null 2>&1; then
            "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
                "kubernetes-validate==$VALIDATOR_VERSION"
        else
            # No venv module (Debian without python3-venv): the interpreter's
            # own site-packages, which works where pip may install there.
            echo "validate.sh: python3 -m venv unavailable; installing with $PYTHON -m pip" >&2
            "$PYTHON" -m pip install --quiet --disable-pip-version-check \
                "kubernetes-validate==$VALIDATOR_VERSION"
            venv=""
        fi
    fi
    if [ -n "$venv" ]; then PYTHON="$venv/bin/python"; fi
    if ! has_validator "$PYTHON"; then
        echo "validate.sh: kubernetes-validate==$VALIDATOR_VERSION is not importable by $PYTHON" >&2
        exit 1
    fi
fi

export KUBERNETES_VERSIONS
exec "$PYTHON" - "$@" <<'PY'
import os
import sys

import yaml
import kubernetes_validate.utils as kv
from kubernetes_validate.version import __version__ as validator_version

versions = os.environ["KUBERNETES_VERSIONS"].split()
shipped = kv.all_versions()
for v in versions:
    if v not in shipped:
        sys.exit(f"validate.sh: kubernetes-validate {validator_version} ships no schemas for "
                 f"Kubernetes {v} (it has {shipped[0]} .. {shipped[-1]})")


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


def name_of(doc):
    meta = doc.get("metadata") if isinstance(doc.get("metadata"), dict) else {}
    return f"{str(doc.get('kind', '?')).lower()}/{meta.get('name', '?')}"


def pod_templates(docs):
    """(owner name, pod template) for each workload in the file."""
    out = []
    for d in docs:
        spec = d.get("spec") or {}
        if d.get("kind") in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"):
            out.append((name_of(d), spec.get("template") or {}))
        elif d.get("kind") == "Pod":
            out.append((name_of(d), {"metadata": d.get("metadata") or {}, "spec": spec}))
    return out


def matches(match_labels, labels):
    return all(labels.get(k) == v for k, v in (match_labels or {}).items())


def containers_of(pod_spec):
    return (pod_spec.get("initContainers") or []) + (pod_spec.get("containers") or [])


def cross_checks(docs):
    errors = []
    templates = pod_templates(docs)
    secrets = {d["metadata"]["name"]: d for d in docs if d.get("kind") == "Secret"}
    configmaps = {d["metadata"]["name"]: d for d in docs if d.get("kind") == "ConfigMap"}

    def key_exists(kind, name, key, optional, where):
        store = secrets if kind == "Secret" else configmaps
        obj = store.get(name)
        if obj is None or optional:
            return  # defined elsewhere (e.g. created out of band)
        keys = set((obj.get("data") or {})) | set((obj.get("stringData") or {})) | set((obj.get("binaryData") or {}))
        if key not in keys:
            errors.append(f"{where}: {kind} {name} has no key {key!r}")

    def selected(selector, what):
        hits = [t for _, t in templates
                if matches(selector, (t.get("metadata") or {}).get("labels") or {})]
        if not hits:
            errors.append(f"{what}: selector {selector} matches no pod template in this file")
        return hits

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
        if kind == "ConfigMap":
            for key, text in (d.get("data") or {}).items():
                if key.endswith(".toml"):
                    try:
                        import tomllib
                    except ImportError:  # Python < 3.11: skip this check
                        continue
                    try:
                        tomllib.loads(text)
                    except tomllib.TOMLDecodeError as e:
                        errors.append(f"{where}: data.{key} is not valid TOML: {e}")

    for owner, t in templates:
        pod = t.get("spec") or {}
        volumes = {v.get("name"): v for v in pod.get("volumes") or []}
        for v in volumes.values():
            for kind, src, name_key in (("Secret", v.get("secret"), "secretName"),
                                        ("ConfigMap", v.get("configMap"), "name")):
                if src:
                    for item in src.get("items") or []:
                        key_exists(kind, src.get(name_key), item.get("key"), src.get("optional"),
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
                ref = e.get("valueFrom") or {}
                for kind, r in (("Secret", ref.get("secretKeyRef")), ("ConfigMap", ref.get("configMapKeyRef"))):
                    if r:
                        key_exists(kind, r.get("name"), r.get("key"), r.get("optional"),
                                   f"{where}: env {e.get('name')}")
    return errors


def describe(e):
    return f"{'.'.join(str(p) for p in e.path) or '(top level)'}: {e.message}"


def every_error(doc, version, first):
    """All schema errors of a document that kv.validate() rejected (it stops
    at the first): the same strict schema, with jsonschema's iter_errors."""
    try:
        from referencing import Registry, Resource
        import jsonschema
        import re
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


def check_file(path):
    """Returns (resource names, errors)."""
    try:
        with open(path, encoding="utf-8") as f:
            docs = [d for d in yaml.load_all(f, Loader=StrictLoader) if d is not None]
    except (OSError, yaml.YAMLError) as e:
        return [], [f"cannot read YAML: {e}".replace("\n", " ")]
    if not docs:
        return [], ["no Kubernetes resources in the file"]
    errors, names = [], []
    for i, doc in enumerate(docs, 1):
        if not isinstance(doc, dict) or not all(isinstance(doc.get(k), str) for k in ("apiVersion", "kind")) \
                or not isinstance((doc.get("metadata") or {}).get("name") if isinstance(doc.get("metadata"), dict) else None, str):
            errors.append(f"document {i}: not a Kubernetes resource (needs apiVersion, kind and metadata.name)")
            continue
        names.append(name_of(doc))
        found = {}  # message -> versions it was found with
        for v in versions:
            try:
                kv.validate(doc, v, strict=True)
            except kv.ValidationError as e:
                for msg in every_error(doc, v, e):
                    found.setdefault(msg, []).append(v)
            except kv.SchemaNotFoundError as e:
                # The library only warns about this; here it is a failure
                # (a misspelt kind or apiVersion would otherwise pass).
                errors.append(f"{name_of(doc)}: {e.message}")
                break
            except kv.VersionNotSupportedError as e:
                errors.append(e.message)
                break
        for msg, vs in found.items():
            errors.append(f"{name_of(doc)} (Kubernetes {', '.join(vs)}): {msg}")
    if not errors:
        errors = cross_checks([d for d in docs if isinstance(d, dict)])
    return names, errors


failed = 0
for path in sys.argv[1:]:
    shown = os.path.relpath(path) if not os.path.relpath(path).startswith("..") else path
    names, errors = check_file(path)
    if errors:
        failed += 1
        print(f"FAIL {shown}: {len(errors)} error(s)")
        for e in errors:
            print(f"       {e}")
    else:
        print(f"ok   {shown}: {len(names)} resources valid against Kubernetes "
              f"{', '.join(versions)} (strict): {', '.join(names)}")

total = len(sys.argv) - 1
print(f"validate.sh: kubernetes-validate {validator_version}; {total - failed} of {total} file(s) valid")
sys.exit(1 if failed else 0)
PY
