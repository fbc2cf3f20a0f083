"""Small helpers shared by the Python benchmark scripts in bench/."""

import signal
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def stop(proc, grace=25):
    """SIGTERM, then SIGKILL after `grace` seconds."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


def git_version():
    try:
        r = subprocess.run(["git", "describe", "--always", "--dirty=+uncommitted changes"], cwd=ROOT,
                           capture_output=True, text=True, timeout=10)
        return f"git {r.stdout.strip() or '?'}"
    except (OSError, subprocess.SubprocessError):
        return "git ?"


def quantile(values, q):
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def pct(part, whole):
    return f"{100.0 * part / whole:.2f} %" if whole else "n/a"


def hist(counter):
    if not counter:
        return "none"
    return ", ".join(f"`{k}`: {v}" for k, v in sorted(counter.items(), key=lambda kv: (-kv[1], str(kv[0]))))
