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

# How a check's verdict begins where closed sequences could only be compared within the tolerance, the base model
# itself not being reproducible run to run (``scenarios.compare_outputs``)
NOT_BITWISE = "ok, not bitwise"


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
    """The commit of the source tree gatedlora runs from, if it is a git checkout. ``GATEDLORA_COMMIT``
    overrides it, for a copy of a tree whose ``.git`` does not describe it (a GPU machine's copy)."""
    if os.environ.get("GATEDLORA_COMMIT"):
        return os.environ["GATEDLORA_COMMIT"].strip()[:12]
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


# a timing whose half interquartile range exceeds this share of its median is called out
SPREAD_WARN = 0.10


def half_iqr_share(scenario: dict, provider: str) -> float:
    """Half the interquartile range of ``provider``'s calls in ``scenario``, as a share of its median."""
    q1, q3 = scenario["iqr_ms"][provider]
    return (q3 - q1) / 2 / scenario["median_ms"][provider]


def spread_warnings(result: dict) -> list[str]:
    """One line when timings spread more than SPREAD_WARN, naming the worst."""
    spread = [(half_iqr_share(s, p), s["name"], p) for s in result["scenarios"] for p in s["median_ms"]]
    wide = sorted((w for w in spread if w[0] > SPREAD_WARN), reverse=True)
    if not wide:
        return []
    share, name, provider = wide[0]
    return [f"{len(wide)} of {len(spread)} timings spread by more than ±{SPREAD_WARN:.0%} (worst: {provider} in "
            f"'{name}', ±{share:.0%}): ratios closer to 1 than that spread are not distinguishable"]


def _legend(result: dict) -> list[str]:
    tolerance = result.get("check_tolerance")
    within = f"within {tolerance:g}" if tolerance is not None else "within a dtype tolerance"
    runs = sorted({n for s in result["scenarios"] for n in s.get("runs", {}).values()})
    rounds = "several calls" if not runs else f"{runs[0]} calls" if len(runs) == 1 else f"{runs[0]}-{runs[-1]} calls"
    several = any("adapters" in s for s in result["scenarios"])
    routes = ("N adapters, k/B base: k of the batch's B sequences on the base model, the others spread over the N "
              "adapters, as a router decides" if several else
              "open k/B: k of the batch's B sequences take the adapter, as a router decides; the others get the "
              "base model")
    check = ("sequences on the base model equal it bitwise and its others match PEFT's mixed batch" if several
             else "closed sequences equal the base model bitwise and its open ones match PEFT")
    return [
        (f"times: median ms per call, lower is better; ±p%: half the interquartile range of the {rounds} per "
         "provider, as a share of the median; (r x): median / base median, timed side by side (providers "
         "interleaved)"),
        routes,
        (f"check: gatedlora's {check} {within} (logits), tested before timing; 'not run' where a scenario was not "
         "checked; '-': the provider does not take part in that scenario"),
    ]


def _timing_cell(scenario: dict, provider: str, ratio: bool) -> str:
    times = scenario["median_ms"]
    if provider not in times:
        return "-"
    cell = f"{times[provider]:.2f}"
    if "iqr_ms" in scenario and provider in scenario["iqr_ms"]:
        cell += f" ±{half_iqr_share(scenario, provider):.0%}"
    if ratio:
        cell += f" ({times[provider] / times['base']:.2f}x)"
    return cell


def timing_table(scenarios: list[dict], providers: list[str], with_check: bool = True) -> list[str]:
    """Rows of a text table: per scenario (dicts with ``name``, ``median_ms``, ``iqr_ms`` and, with
    ``with_check``, ``check``) the base time and each other provider's time and ratio to base."""
    others = [p for p in providers if p != "base"]
    header = ["scenario"] + (["check"] if with_check else []) + ["base ms"] + [f"{p} ms (x base)" for p in others]
    rows = [header]
    for s in scenarios:
        row = [s["name"]]
        if with_check:
            row.append("not run" if s["check"].startswith("not checked") else s["check"].split(":")[0])
        row += [_timing_cell(s, "base", ratio=False)] + [_timing_cell(s, p, ratio=True) for p in others]
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return lines


def differences_text(scenario: dict) -> str:
    """The check's measured differences, e.g. "largest difference from PEFT (logits): gatedlora torch 0.102, ..."
    (a scenario recorded before they were kept has none: empty)."""
    differences = scenario.get("differences") or {}
    if not differences:
        return ""
    return "largest difference from PEFT (logits): " + ", ".join(f"{k} {v:.3g}" for k, v in differences.items())


def format_table(result: dict) -> str:
    """A text table: per scenario the correctness check, the base time and each adapter path's time and
    ratio to base, each with its spread; then the legend, notes and warnings."""
    lines = timing_table(result["scenarios"], result["providers"])
    env = result["environment"]
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v)
    lines.insert(0, f"device: {env['device']}  |  {versions}  |  commit {env['commit'] or 'n/a'}")
    lines += [f"legend: {line}" for line in _legend(result)]
    lines += [f"note: {note}" for note in result.get("notes", [])]
    lines += [f"note: {s['name']}: {note}" for s in result["scenarios"] for note in s.get("notes", [])]
    for problem in [s for s in result["scenarios"] if s["check"].startswith("FAILED")]:
        lines.append(f"check FAILED in '{problem['name']}': {problem['check'][len('FAILED: '):]}"
                     + (f" ({differences_text(problem)})" if problem.get("differences") else ""))
    lines += [f"check in '{s['name']}': {s['check']}" for s in result["scenarios"]
              if s["check"].startswith(NOT_BITWISE)]
    warnings = result.get("warnings")
    if warnings is None:  # a run recorded before the report judged the spread: judge it now
        warnings = spread_warnings(result) if all("iqr_ms" in s for s in result["scenarios"]) else []
    lines += [f"WARNING: {w}" for w in warnings]
    if warnings:
        lines.append("WARNING: these numbers are not to be trusted as they are; rerun on a quiet machine "
                     "(or with a larger --budget)")
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
        raise RuntimeError("--plot needs matplotlib: pip install matplotlib (or the bench extra)") from err
    providers = [p for p in result["providers"] if p != "base"]
    scenarios = [s for s in result["scenarios"] if "base" in s["median_ms"]]  # a failed scenario has no times
    width = 0.8 / max(len(providers), 1)
    fig, ax = plt.subplots(figsize=(max(8, 0.9 * len(scenarios)), 4.5))
    nan = float("nan")
    for i, p in enumerate(providers):
        xs = [j + (i - (len(providers) - 1) / 2) * width for j in range(len(scenarios))]
        base = [s["median_ms"]["base"] for s in scenarios]
        ratios = [s["median_ms"].get(p, nan) / b for s, b in zip(scenarios, base)]
        quartiles = [s.get("iqr_ms", {}).get(p, (nan, nan)) for s in scenarios]
        below = [r - q[0] / b for r, q, b in zip(ratios, quartiles, base)]
        above = [q[1] / b - r for r, q, b in zip(ratios, quartiles, base)]
        ax.bar(xs, ratios, width, label=p, yerr=[below, above], capsize=2, error_kw={"linewidth": 0.8})
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(scenarios)))
    ax.set_xticklabels([s["name"] for s in scenarios], rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("time / base model time (lower is better)")
    ax.set_title(f"adapter path vs base path — {result['environment']['device']}\n"
                 "bar: median / base median; whiskers: the provider's interquartile range / base median", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
