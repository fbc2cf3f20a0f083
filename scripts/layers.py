#!/usr/bin/env python3
"""Checks that every module of src/ uses only modules of lower layers.

    python3 scripts/layers.py [SRC_DIR]      (default: src)

The layers are read from the `# Layers` list in SRC_DIR/lib.rs's module
doc (`//! N. name: module module ...`). A module is a file SRC_DIR/NAME.rs
or a folder SRC_DIR/NAME/; it uses module B when its code outside
`#[cfg(test)] mod` blocks names `crate::B` (in a `use` or a path). Exits 1,
naming each offending use, when a module uses one of its own layer or
above, or when a module is in no layer (or in two); else prints a summary
and exits 0. A use pointing down can never close a cycle, so this also
rules out import cycles.
"""
import os
import re
import sys


def layers_of(lib):
    layers = {}
    in_list = False
    for line in open(lib, encoding="utf-8"):
        line = line.rstrip("\n")
        if line.startswith("//! # Layers"):
            in_list = True
            continue
        if not in_list:
            continue
        if not line.startswith("//!"):
            break
        m = re.match(r"//!\s*(\d+)\.\s*[^:]*:\s*(.*)$", line)
        if m:
            for module in m.group(2).split():
                if module in layers:
                    sys.exit(f"layers.py: {module} is in layers {layers[module]} and {m.group(1)}")
                layers[module] = int(m.group(1))
    return layers


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


def uses(files, names):
    found = {}
    for f in files:
        text = without_tests_and_comments(open(f, encoding="utf-8").read())
        for lineno, line in enumerate(text.split("\n"), 1):
            names_here = set(re.findall(r"crate::(\w+)", line))
            for group in re.findall(r"crate::\{([^}]*)\}", line):
                names_here |= set(re.findall(r"(?:^|,)\s*(\w+)", group))
            for n in names_here & names:
                found.setdefault(n, (f, lineno))
    # `use crate::{a, b}` spread over several lines
    for f in files:
        text = without_tests_and_comments(open(f, encoding="utf-8").read())
        for group in re.findall(r"crate::\{([^}]*)\}", text, re.S):
            for n in set(re.findall(r"(?:^|,)\s*(\w+)", group)) & names:
                found.setdefault(n, (f, 0))
    return found


def main():
    src = sys.argv[1] if len(sys.argv) > 1 else "src"
    layers = layers_of(os.path.join(src, "lib.rs"))
    mods = modules(src)
    problems = []
    for m in mods:
        if m not in layers:
            problems.append(f"{m}: in no layer of lib.rs's `# Layers` list")
    for m in layers:
        if m not in mods:
            problems.append(f"{m}: listed in lib.rs's layers, but no such module")
    arrows = 0
    for m, files in mods.items():
        if m not in layers:
            continue
        for used, (f, lineno) in sorted(uses(files, set(mods) - {m}).items()):
            arrows += 1
            if used in layers and layers[used] >= layers[m]:
                where = f"{f}:{lineno}" if lineno else f
                problems.append(
                    f"{where}: {m} (layer {layers[m]}) uses {used} (layer {layers[used]}): "
                    "a module may use only lower layers"
                )
    if problems:
        print("\n".join(problems))
        sys.exit(1)
    print(f"layers.py: {len(mods)} modules in {len(set(layers.values()))} layers, "
          f"{arrows} uses, all pointing down")


if __name__ == "__main__":
    main()
