"""Fault tests (CI sizes) against `jetserve serve` child processes: the same scenario functions as
benchmarks/faults.py, which runs the full sizes (200 disconnecting clients...) for docs/reliability.md.

A child process (not the in-process fixture) so that RSS is the server's alone and SIGTERM is a real signal.
Most scenarios serve the tiny random Llama (fast); SIGTERM serves SmolLM2 so that streams are still running
when the signal lands.
"""

from __future__ import annotations

import asyncio
import importlib.util
import shutil
from pathlib import Path

import pytest

from benchmarks.loadtest import ServerProcess

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("jetserve_bench_faults", REPO / "benchmarks" / "faults.py")
faults = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(faults)

TINY_ARGS = ["--device", "cpu", "--max-context", "256", "--prefill-chunk", "64", "--log-level", "warning"]


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory, tiny_llama_dir) -> Path:
    store = tmp_path_factory.mktemp("faults-store")
    shutil.copytree(tiny_llama_dir, store / "tiny")
    return store


def _serve(
    store: Path, *extra: str, model: str = "tiny", log: str = "serve.log", module: str = "server.cli"
) -> ServerProcess:
    return ServerProcess(
        ["--model-store", str(store), "--model", model, *TINY_ARGS, *extra],
        cwd=REPO,
        log_path=store / log,
        module=module,
    )


def _check(res: dict, srv: ServerProcess) -> None:
    assert res["ok"], f"{res}\n--- server log ---\n{srv.log_tail()}"
    assert srv.proc.poll() is None, "server exited"


def test_disconnects_mid_stream_free_everything(tiny_store):
    with _serve(tiny_store, "--max-batch-size", "4", "--max-queue", "64", log="disconnects.log") as srv:
        srv.wait_ready(path="/ready")
        res = asyncio.run(faults.scenario_disconnects(srv.url, "tiny", srv.rss, clients=40, max_tokens=200, warmup=8))
        _check(res, srv)
        assert res["disconnected_mid_stream"] >= 10, res
        assert res["running_after"] == 0 and res["waiting_after"] == 0 and res["kv_usage_after"] == 0, res
        assert abs(res["rss_growth_pct"]) < 2.0, res


def test_queue_overflow_is_429_with_retry_after(tiny_store):
    with _serve(tiny_store, "--max-batch-size", "2", "--max-queue", "2", log="overflow.log") as srv:
        srv.wait_ready(path="/ready")
        res = asyncio.run(faults.scenario_overflow(srv.url, "tiny", requests=40, max_tokens=64))
        _check(res, srv)
        assert set(res["statuses"]) == {"200", "429"}, res
        assert res["all_429_have_retry_after"], res


def test_failure_inside_one_request_spares_the_others(tiny_store):
    # the runner is the test double benchmarks.fault_runner.FaultyRunner: it fails the marked request
    with _serve(tiny_store, "--max-batch-size", "8", log="fault.log", module="benchmarks.fault_runner") as srv:
        srv.wait_ready(path="/ready")
        res = asyncio.run(faults.scenario_injected_fault(srv.url, "tiny", others=5, max_tokens=32, stage="prefill"))
        _check(res, srv)
        assert res["faulted"]["error"] is not None and res["others_finished"] == 5, res
        # a failing batched decode fails its batch; every stream still ends with [DONE] and the server serves on
        res = asyncio.run(faults.scenario_injected_fault(srv.url, "tiny", others=5, max_tokens=32, stage="decode"))
        _check(res, srv)
        assert res["faulted"]["error"] is not None and res["others_ended"] == 5, res


def test_bad_model_loads_are_clear_errors(tiny_store, tmp_path, smollm2_dir):
    store = tmp_path / "store"
    shutil.copytree(tiny_store / "tiny", store / "tiny-good")
    big = faults._write_tiny(
        tmp_path / "big",
        smollm2_dir,
        hidden_size=1024,
        intermediate_size=1024,
        num_hidden_layers=1,
        num_attention_heads=16,
        num_key_value_heads=4,
        head_dim=64,
    )
    bad = faults.make_bad_models(store, store / "tiny-good", big_src=big)
    with ServerProcess(
        [
            "--model-store",
            str(store),
            "--model",
            "tiny-good",
            *TINY_ARGS,
            "--memory-budget",
            "80MB",
            "--admin-key",
            "adm",
        ],
        cwd=REPO,
        log_path=tmp_path / "bad.log",
    ) as srv:
        srv.wait_ready(path="/ready")
        res = asyncio.run(faults.scenario_bad_loads(srv.url, "tiny-good", bad, admin_key="adm"))
        _check(res, srv)
    cases = res["cases"]
    assert set(cases) == {"truncated", "corrupt", "unsupported", "overbudget"}
    assert cases["overbudget"]["admin_status"] == 503 and "budget" in cases["overbudget"]["admin_message"].lower()
    assert cases["unsupported"]["admin_status"] == 422 and "bitsandbytes" in cases["unsupported"]["admin_message"]
    for kind in ("truncated", "corrupt"):
        assert cases[kind]["admin_status"] == 422, cases[kind]


def test_sigterm_drains_in_flight_streams_and_refuses_new(model_store, serve_model, tmp_path):
    args = [
        "--model-store",
        str(model_store),
        "--model",
        serve_model,
        "--device",
        "cpu",
        "--max-context",
        "512",
        "--max-batch-size",
        "4",
        "--shutdown-grace-s",
        "30",
        "--log-level",
        "info",
    ]
    with ServerProcess(args, cwd=REPO, log_path=tmp_path / "sigterm.log") as srv:
        ready_s = srv.wait_ready(path="/ready")
        res = asyncio.run(faults.scenario_sigterm(srv, serve_model, streams=3, max_tokens=64, grace_s=30.0))
        assert res["ok"], f"{res}\n{srv.log_tail()}"
        assert res["new_request_during_drain"]["status"] == 503 and res["new_request_during_drain"]["shaped"], res
        assert res["exit_code"] == 0, res
    print(f"time to ready {ready_s:.1f}s; sigterm: {res}")
