#!/usr/bin/env python3
"""Checks that the folders of src/ are layers: every use points down.

    python3 scripts/layers.py [SRC_DIR]      (default: src)

The layers are the top-level modules of SRC_DIR, in the order SRC_DIR/lib.rs
declares them (`mod name;` or `pub mod name;`), lowest first. A module is a
folder SRC_DIR/NAME/ or a file SRC_DIR/NAME.rs. It uses module B when its
code outside `#[cfg(test)] mod` blocks and comments names `crate::B` (in a
`use`, a `use crate::{...}` group or a path).

Exits 1, naming each offending use, when a module uses one declared after it
(or itself through `crate::`, which is allowed: that is a path inside it), when
a module of SRC_DIR is not declared in lib.rs, or when the files inside one
folder use each other in a circle. Else prints a summary and exits 0. A use
pointing down can never close a cycle, so this also rules out import cycles
between folders.
"""
import os
import re
import sys


def declared(lib):
    """Top-level modules in the order lib.rs declares them."""
    text = without_tests_and_comments(open(lib, encoding="utf-8").read())
    return re.findall(r"^\s*(?:pub(?:\([^)]*\))?\s+)?mod\s+(\w+)\s*;", text, re.M)


def modules(src):
    found = {}
    for entry in sorted(os.listdir(src)):
        path = os.path.join(src, entry)
        if entry.endswith(".rs") and entry not in ("lib.rs", "main.rs"):
            found[entry[:-3]] = [path]
        elif os.path.isdir(path):
            found[entry] = sorted(
                os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs if f.endswith(".rs")
            )
    return found


def without_tests_and_comments(text):
    out, i = [], 0
    for m in re.finditer(r"#\[cfg\(test\)\]\s*(pub\s+)?mod\s+\w+\s*\{", text):
        if m.start() < i:
            continue
        out.append(text[i : m.start()])
        depth, j = 1, m.end()
        while j < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            j += 1
        i = j
    out.append(text[i:])
    return re.sub(r"//.*", "", "".join(out))


def paths(text, prefix):
    """Every path that starts with `prefix::`, group items expanded:
    `crate::{a::b, c}` gives `a::b` and `c`."""
    found = []
    for m in re.finditer(r"\b" + prefix + r"::", text):
        j = m.end()
        if text[j : j + 1] == "{":
            depth, k = 1, j + 1
            while k < len(text) and depth:
                depth += {"{": 1, "}": -1}.get(text[k], 0)
                k += 1
            for item in top_level_items(text[j + 1 : k - 1]):
                found.append(item)
        else:
            found.append(re.match(r"[\w:]*", text[j:]).group(0))
    return found


def top_level_items(group):
    items, depth, cur = [], 0, ""
    for ch in group:
        depth += {"{": 1, "}": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            items.append(cur.strip())
            cur = ""
        else:
            cur += ch
    items.append(cur.strip())
    return [i for i in items if i]


def first(path):
    return re.match(r"\w*", path).group(0)


def folder_cycles(name, files, src):
    """Circles among the files of one folder (`super::x` or `crate::name::x`)."""
    folder = os.path.join(src, name)
    def sub(f):
        rel = os.path.relpath(f, folder)
        return rel.split(os.sep)[0].removesuffix(".rs")
    subs = {sub(f) for f in files} - {"mod"}
    graph = {s: set() for s in subs}
    for f in files:
        me = sub(f)
        if me == "mod":
            continue
        text = without_tests_and_comments(open(f, encoding="utf-8").read())
        used = {first(p) for p in paths(text, "crate::" + name)}
        # super:: in a file directly inside the folder names a sibling
        if os.path.dirname(f) == folder:
            used |= {first(p) for p in paths(text, "super")}
        graph[me] |= (used & subs) - {me}
    # depth-first search for a back edge
    state, cycles = {}, []
    def visit(n, stack):
        state[n] = 1
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                cycles.append(stack[stack.index(m):] + [m] if m in stack else [n, m])
            elif m not in state:
                visit(m, stack + [m])
        state[n] = 2
    for n in sorted(graph):
        if n not in state:
            visit(n, [n])
    return cycles, sum(len(v) for v in graph.values())


def main():
    src = sys.argv[1] if len(sys.argv) > 1 else "src"
    order = declared(os.path.join(src, "lib.rs"))
    rank = {m: i for i, m in enumerate(order)}
    mods = modules(src)
    problems = []
    for m in mods:
        if m not in rank:
            problems.append(f"{m}: not declared in {src}/lib.rs, so in no layer")
    arrows, inner = 0, 0
    for m in order:
        if m not in mods:
            problems.append(f"{m}: declared in lib.rs, but {src}/{m}.rs or {src}/{m}/ is missing")
            continue
        seen = set()
        for f in mods[m]:
            text = without_tests_and_comments(open(f, encoding="utf-8").read())
            for p in paths(text, "crate"):
                used = first(p)
                if used == m or used not in rank or used in seen:
                    continue
                seen.add(used)
                arrows += 1
                if rank[used] > rank[m]:
                    problems.append(
                        f"{f}: {m} (layer {rank[m] + 1}) uses {used} (layer {rank[used] + 1}): "
                        "a folder may use only folders declared before it in lib.rs"
                    )
        cycles, edges = folder_cycles(m, mods[m], src)
        inner += edges
        for c in cycles:
            problems.append(f"{src}/{m}/: its files use each other in a circle: {' -> '.join(c)}")
    if problems:
        print("\n".join(problems))
        sys.exit(1)
    print(f"layers.py: {len(order)} layers, {arrows} uses between them, all pointing down; "
          f"{inner} uses between files inside folders, no circle")


if __name__ == "__main__":
    main()
