"""Environment record, the results table, JSON and plot of a benchmark run."""
from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path

import torch


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return (f"CPU {platform.processor() or platform.machine()} ({os.cpu_count()} cores, "
            f"{torch.get_num_threads()} threads)")


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def git_commit() -> str | None:
    """The commit of the source tree gatedlora runs from, if it is a git checkout."""
    root = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def environment(device: torch.device) -> dict:
    return {
        "device": device_name(device),
        "device_type": device.type,
        "versions": {p: _version(p) for p in ("gatedlora", "torch", "triton", "transformers", "peft")},
        "commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def format_table(result: dict) -> str:
    """A text table: per scenario the base time and each adapter path's time and ratio to base."""
    providers = [p for p in result["providers"] if p != "base"]
    header = ["scenario", "base ms"] + [f"{p} ms (x base)" for p in providers]
    rows = [header]
    for s in result["scenarios"]:
        times = s["median_ms"]
        row = [s["name"], f"{times['base']:.2f}"]
        for p in providers:
            row.append(f"{times[p]:.2f} ({times[p] / times['base']:.2f}x)" if p in times else "-")
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    env = result["environment"]
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v)
    lines.insert(0, f"device: {env['device']}  |  {versions}  |  commit {env['commit'] or 'n/a'}")
    for note in result.get("notes", []):
        lines.append(f"note: {note}")
    return "\n".join(lines)


def write_json(result: dict, path: str | os.PathLike) -> None:
    Path(path).write_text(json.dumps(result, indent=2) + "\n")


def plot(result: dict, path: str | os.PathLike) -> None:
    """Bars per scenario, one per adapter provider, height = time / base time."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise RuntimeError("--plot needs matplotlib: pip install 'gatedlora[bench]'") from err
    providers = [p for p in result["providers"] if p != "base"]
    scenarios = result["scenarios"]
    width = 0.8 / max(len(providers), 1)
    fig, ax = plt.subplots(figsize=(max(8, 0.9 * len(scenarios)), 4.5))
    for i, p in enumerate(providers):
        xs = [j + (i - (len(providers) - 1) / 2) * width for j in range(len(scenarios))]
        ratios = [s["median_ms"].get(p, float("nan")) / s["median_ms"]["base"] for s in scenarios]
        ax.bar(xs, ratios, width, label=p)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(scenarios)))
    ax.set_xticklabels([s["name"] for s in scenarios], rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("time / base model time")
    ax.set_title(f"adapter path vs base path — {result['environment']['device']}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
