"""Shared plumbing of the curvature benchmarks: command-line options, the collector of medians, the
JSON summary (``benchmarks/results/curvature.json``) and the table printed at the end of the run.

The benchmarks time with pytest-benchmark; this file only gathers the medians of one run, turns them
into ratios (each ratio divides two medians measured in the same session, on the same model) and
records the environment they were measured in. Nothing here asserts on time.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from machine import cpu_model

RESULTS_KEY = pytest.StashKey["CurvatureResults"]()
DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "curvature.json"

# Targets of the issue (CPU): HVP ≤ 2.5 gradients, a batched 3-vector HVP ≤ 0.6 × three single HVPs.
TARGET_HVP_OVER_GRADIENT = 2.5
TARGET_BATCHED_OVER_SINGLES = 0.6


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("curvature benchmarks")
    group.addoption("--bench-threads", type=int, default=1,
                    help="torch.set_num_threads for the model benchmarks (default 1; the thread study "
                         "measures 1 and 2 regardless)")
    group.addoption("--bench-json", default=str(DEFAULT_JSON),
                    help=f"where to write the JSON summary (default {DEFAULT_JSON})")


class CurvatureResults:
    """Medians (seconds) and facts per case and benchmark, filled in by the benchmarks as they run."""

    def __init__(self) -> None:
        self.cases: dict[str, dict[str, Any]] = {}  # case id -> {"info": {...}, "timings": {name: {...}}}
        self.threads: dict[str, dict[str, Any]] = {}  # "<threads>-<op>" -> timing, and the subprocess probe
        self.loadavg_start = _loadavg()

    def record(self, case: str, name: str, benchmark: Any, **facts: Any) -> dict[str, Any] | None:
        """Store the median of the benchmark that just ran; None when benchmarks are disabled."""
        if benchmark.stats is None:  # --benchmark-disable: the function ran once, untimed
            return None
        stats = benchmark.stats.stats
        entry = {"median_s": stats.median, "min_s": stats.min, "iqr_s": stats.iqr, "rounds": stats.rounds,
                 **facts}
        self.cases.setdefault(case, {"info": {}, "timings": {}})["timings"][name] = entry
        return entry

    def measured(self) -> bool:
        """Whether anything was timed (False under --benchmark-disable)."""
        return bool(self.threads) or any(body["timings"] for body in self.cases.values())

    def median(self, case: str, name: str, stat: str = "median_s") -> float | None:
        entry = self.cases.get(case, {}).get("timings", {}).get(name)
        return None if entry is None else entry[stat]

    def ratios(self, case: str, stat: str = "median_s") -> dict[str, float]:
        """The ratios of the issue from the medians of this run (those whose two medians exist);
        ``stat="min_s"`` gives the same ratios from the fastest rounds (less sensitive to other load)."""
        m = {name: self.median(case, name, stat) for name in
             ("gradient", "hvp", "hvp_fresh_operator", "hvp_batched3", "hvp_three_singles",
              "cg3_hessian", "cg3_ggn", "ggn_batched3")}
        out: dict[str, float] = {}

        def put(key: str, num: float | None, den: float | None, scale: float = 1.0) -> None:
            if num is not None and den is not None and den > 0:
                out[key] = num / (scale * den)

        put("hvp_over_gradient", m["hvp"], m["gradient"])
        put("hvp_fresh_operator_over_gradient", m["hvp_fresh_operator"], m["gradient"])
        put("batched3_over_three_singles", m["hvp_batched3"], m["hvp_three_singles"])
        put("batched3_over_3x_single", m["hvp_batched3"], m["hvp"], 3.0)
        put("batched3_per_vector_over_gradient", m["hvp_batched3"], m["gradient"], 3.0)
        put("cg3_hessian_over_gradient", m["cg3_hessian"], m["gradient"])
        put("cg3_ggn_over_gradient", m["cg3_ggn"], m["gradient"])
        put("ggn_batched3_over_hvp_batched3", m["ggn_batched3"], m["hvp_batched3"])
        return out

    def summary(self, config: pytest.Config) -> dict[str, Any]:
        cases = {}
        for case, body in self.cases.items():
            if not body["timings"]:
                continue
            ratios = self.ratios(case)
            targets = {}
            if "hvp_over_gradient" in ratios:
                targets["hvp_over_gradient<=2.5"] = ratios["hvp_over_gradient"] <= TARGET_HVP_OVER_GRADIENT
            if "batched3_over_three_singles" in ratios:
                targets["batched3_over_three_singles<=0.6"] = (ratios["batched3_over_three_singles"]
                                                               <= TARGET_BATCHED_OVER_SINGLES)
            cases[case] = {**body, "ratios": ratios, "ratios_from_min": self.ratios(case, "min_s"),
                           "targets_met": targets}
        return {"benchmark": "curvature", "created": datetime.datetime.now().isoformat(timespec="seconds"),
                "environment": environment(config, self.loadavg_start), "cases": cases,
                "threads": self.threads}


def _loadavg() -> list[float] | None:
    try:
        return list(os.getloadavg())
    except OSError:
        return None


def _git_commit() -> str | None:
    """The checked-out commit, read from .git without running git."""
    git = Path(__file__).resolve().parent.parent / ".git"
    try:
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref: "):
            return head
        ref = head[5:]
        path = git / ref
        if path.exists():
            return path.read_text().strip()
        for line in (git / "packed-refs").read_text().splitlines():
            if line.endswith(" " + ref):
                return line.split()[0]
    except OSError:
        pass
    return None


def environment(config: pytest.Config, loadavg_start: list[float] | None) -> dict[str, Any]:
    cuda = torch.cuda.is_available()
    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads_models": config.getoption("bench_threads"),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "parallel_backend": next((line.split(":", 1)[1].strip()
                                  for line in torch.__config__.parallel_info().splitlines()
                                  if line.startswith("ATen parallel backend")), None),
        "env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY")},
        "loadavg_start": loadavg_start,
        "loadavg_end": _loadavg(),
        "cuda_device": torch.cuda.get_device_name(0) if cuda else None,
        "cuda_version": torch.version.cuda,
        "git_commit": _git_commit(),
    }


@pytest.fixture(scope="session")
def curvature_results(pytestconfig: pytest.Config) -> CurvatureResults:
    return pytestconfig.stash.setdefault(RESULTS_KEY, CurvatureResults())


def _write_json(config: pytest.Config) -> Path | None:
    results = config.stash.get(RESULTS_KEY, None)
    if results is None or not results.measured():
        return None
    path = Path(config.getoption("bench_json"))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results.summary(config), indent=2) + "\n")
    return path


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{1e3 * seconds:.1f}"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    results = config.stash.get(RESULTS_KEY, None)
    if results is None or not results.measured():
        return
    path = _write_json(config)
    tr = terminalreporter
    tr.section("curvature benchmarks: medians (ms) and ratios of this run")
    tr.write_line("ratios: median/median, and in brackets min/min (the fastest rounds: less sensitive to other load)")
    header = (f"{'case':<24}{'grad':>7}{'hvp':>7}{'b3':>7}{'3x1':>7}{'cg3H':>8}{'cg3G':>8}"
              f"{'hvp/g':>14}{'b3/3x1':>14}{'cgH/g':>14}{'cgG/g':>14}")
    tr.write_line(header)
    for case, body in results.cases.items():
        if not body["timings"]:
            continue
        r, rm = results.ratios(case), results.ratios(case, "min_s")

        def both(key: str) -> str:
            return f"{_ratio(r.get(key))} ({_ratio(rm.get(key))})"

        tr.write_line(
            f"{case:<24}{_ms(results.median(case, 'gradient')):>7}{_ms(results.median(case, 'hvp')):>7}"
            f"{_ms(results.median(case, 'hvp_batched3')):>7}{_ms(results.median(case, 'hvp_three_singles')):>7}"
            f"{_ms(results.median(case, 'cg3_hessian')):>8}{_ms(results.median(case, 'cg3_ggn')):>8}"
            f"{both('hvp_over_gradient'):>14}{both('batched3_over_three_singles'):>14}"
            f"{both('cg3_hessian_over_gradient'):>14}{both('cg3_ggn_over_gradient'):>14}")
    tr.write_line(f"targets (CPU): hvp/g <= {TARGET_HVP_OVER_GRADIENT}, b3/3x1 <= {TARGET_BATCHED_OVER_SINGLES} "
                  "(b3/3x1: the batched (N,3) HVP over the three-single-HVPs baseline)")
    if results.threads:
        tr.write_line("threads (digits MLP, float32):")
        for key, entry in results.threads.items():
            tr.write_line(f"  {key:<30} median {1e3 * entry['median_s']:>10.3f} ms"
                          + (f"   ({entry['note']})" if entry.get("note") else ""))
    env = environment(config, results.loadavg_start)
    tr.write_line(f"torch {env['torch']}, {env['cpu']} x{env['cpu_count']}, model threads "
                  f"{env['torch_threads_models']}, loadavg start {env['loadavg_start']} end {env['loadavg_end']}"
                  + (f", cuda {env['cuda_device']}" if env["cuda_device"] else ""))
    if path is not None:
        tr.write_line(f"summary written to {path}")
