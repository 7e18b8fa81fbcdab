"""ModelManager logic with fake runners: budget, LRU eviction, pinning, refusals, keep_alive, single loads.

Models are tiny real folders (config.json + a real safetensors file) so predictions read real headers;
the runner/tokenizer/engine are fakes, so these tests take milliseconds.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from models.loader import inspect_checkpoint, predict_footprint
from server.config import Settings
from server.manager import InsufficientMemoryError, ModelBusyError, ModelLoadError, ModelManager, ModelNotFoundError
from server.store import ModelSpec
from server.metrics import Metrics
from server.store import ModelStore
from server.telemetry.memory import MemorySnapshot, MemorySource

MiB = 1024**2
CFG = dict(
    architectures=["LlamaForCausalLM"],
    model_type="llama",
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    vocab_size=1000,
    max_position_embeddings=512,
)


def make_model(store: Path, name: str, n_floats: int) -> Path:
    d = store / name
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps(CFG))
    save_file({"w": torch.zeros(n_floats, dtype=torch.float32)}, str(d / "model.safetensors"))
    return d


class FakeMemory(MemorySource):
    kind = "fake"

    def __init__(self, total=64 * 1024**3, available=32 * 1024**3):
        self.total, self.available = total, available

    def snapshot(self):
        return MemorySnapshot(self.total, self.available)


class FakeRunner:
    def __init__(self, path, **kw):
        self.path, self.kw = path, kw


class FakeEngine:
    def __init__(self, runner, settings, *, name, on_step, on_request):
        self.runner, self.settings, self.name = runner, settings, name
        self.closed = False

    def close(self):
        self.closed = True


class Loader:
    """Counts loads; optional delay; optional failure for one name."""

    def __init__(self, delay=0.0, fail=None):
        self.calls = []
        self.delay, self.fail = delay, fail
        self.lock = threading.Lock()

    def __call__(self, path, **kw):
        with self.lock:
            self.calls.append(Path(path).name)
            self.threads = getattr(self, "threads", []) + [threading.current_thread()]
        if self.delay:
            time.sleep(self.delay)
        if self.fail and Path(path).name == self.fail:
            raise RuntimeError("boom: bad tensor")
        return FakeRunner(path, **kw)


def settings(store: Path, budget: int, **kw) -> Settings:
    base = dict(
        model_store=store,
        memory_budget=str(budget),
        max_batch_size=2,
        max_context=64,
        device="cpu",
        model="none",
        lm_head_dtype="bf16",  # the budgets below are sized for the headers as stored
    )
    base.update(kw)
    return Settings(**base)


@pytest.fixture
def store(tmp_path):
    s = tmp_path / "store"
    s.mkdir()
    for name, n in (("a", 1000), ("b", 2000), ("c", 3000)):
        make_model(s, name, n)
    return s


def footprint(store, name, s):
    return predict_footprint(
        inspect_checkpoint(store / name),
        max_batch_size=s.max_batch_size,
        max_seq=s.max_context,
        dtype=getattr(torch, s.dtype),
        prefill_chunk=s.prefill_chunk,
    ).total_bytes


def mk(store, budget, loader=None, **kw):
    s = settings(store, budget, **kw)
    metrics = Metrics()
    mgr = ModelManager(
        s,
        metrics,
        engine_factory=FakeEngine,
        runner_loader=loader or Loader(),
        tokenizer_loader=lambda p: "tok",
        memory_source=FakeMemory(),
    )
    return mgr, metrics


def test_prediction_reads_headers(store):
    s = settings(store, 10**9)
    fp = predict_footprint(
        inspect_checkpoint(store / "b"),
        max_batch_size=2,
        max_seq=64,
        dtype=torch.bfloat16,
        prefill_chunk=s.prefill_chunk,
        lm_head=s.lm_head_dtype,
    )
    assert fp.weights_bytes == 2000 * 2  # a float32 tensor in the header, loaded as bfloat16
    assert fp.as_dict() == mk(store, 10**9)[0].predict("b").as_dict()  # what the manager budgets
    assert fp.kv_cache_bytes == 2 * (2 + 1) * 64 * 2 * 16 * 2 * 2  # layers*(slots+scratch)*seq*kv_heads*head_dim*2*bf16
    assert fp.total_bytes == fp.weights_bytes + fp.kv_cache_bytes + fp.workspace_bytes


def test_acquire_loads_once_and_counts_in_flight(store):
    async def main():
        loader = Loader(delay=0.2)
        mgr, metrics = mk(store, 10 * 1024**3, loader)

        async def use():
            async with mgr.acquire("a") as lm:
                assert lm.in_flight >= 1
                await asyncio.sleep(0.01)
                return lm

        lms = await asyncio.gather(*(use() for _ in range(5)))
        assert loader.calls == ["a"]
        assert all(lm is lms[0] for lm in lms)
        assert lms[0].in_flight == 0
        assert isinstance(lms[0].engine, FakeEngine) and lms[0].tokenizer == "tok"
        assert lms[0].runner.kw == dict(device="cpu", dtype="bfloat16", max_batch_size=2, max_seq=64)
        rows = {r.name: r for r in mgr.list_models()}
        assert rows["a"].state == "loaded" and rows["b"].state == "available"
        await mgr.close()
        assert lms[0].engine is None

    asyncio.run(main())


def test_lru_eviction_order_and_pinning(store, tmp_path):
    s0 = settings(store, 1)
    fa, fb, fc = (footprint(store, n, s0) for n in "abc")
    cfg = tmp_path / "models.json"
    cfg.write_text(json.dumps({"models": {"a": {"pinned": True}}}))

    async def main():
        loader = Loader()
        # room for a + b, or a + c, never all three
        mgr, metrics = mk(store, fa + fc + 10, loader, models_config=cfg)
        evicted_engines = []
        await mgr.load("a")
        lb = await mgr.load("b")
        evicted_engines.append(lb.engine)
        assert {m.name for m in mgr.list_models() if m.state == "loaded"} == {"a", "b"}
        await mgr.load("a")  # refresh a: a is pinned anyway
        await mgr.load("c")  # must evict b (LRU idle, unpinned), never pinned a
        loaded = {m.name for m in mgr.list_models() if m.state == "loaded"}
        assert loaded == {"a", "c"}
        assert evicted_engines[0].closed
        assert loader.calls == ["a", "b", "c"]
        assert metrics.registry.get_sample_value("jetserve:model_evictions_total", {"model": "b"}) == 1
        assert metrics.registry.get_sample_value("jetserve:model_loads_total", {"model": "c"}) == 1
        assert metrics.registry.get_sample_value("jetserve:memory_used_bytes") == mgr.used_bytes() == fa + fc
        await mgr.close()

    asyncio.run(main())


def test_lru_picks_least_recently_used(store):
    s0 = settings(store, 1)
    fa, fb, fc = (footprint(store, n, s0) for n in "abc")

    async def main():
        mgr, _ = mk(store, fa + fb + fc - 1)  # two fit, never three
        await mgr.load("a")
        await mgr.load("b")
        async with mgr.acquire("a"):
            pass  # a is now more recent than b
        await mgr.load("c")
        assert {m.name for m in mgr.list_models() if m.state == "loaded"} == {"a", "c"}
        await mgr.close()

    asyncio.run(main())


def test_refusal_gives_numbers_and_in_flight_is_never_evicted(store):
    s0 = settings(store, 1)
    fa, fc = footprint(store, "a", s0), footprint(store, "c", s0)

    async def main():
        mgr, _ = mk(store, fa + fc - 1)
        async with mgr.acquire("a"):
            with pytest.raises(InsufficientMemoryError) as ei:
                await mgr.load("c")  # only fits by evicting a, which is in flight
            e = ei.value
            assert (e.needed, e.budget, e.in_use, e.evictable) == (fc, fa + fc - 1, fa, 0)
            assert "needs" in str(e) and "evictable" in str(e)
            with pytest.raises(ModelBusyError):
                await mgr.unload("a")
        lc = await mgr.load("c")  # now a is idle: evicted
        assert lc.name == "c" and mgr.get_loaded("a") is None
        big = 10**12
        mgr2, _ = mk(store, big)
        mgr2.budget_bytes = fc - 1
        with pytest.raises(InsufficientMemoryError):
            await mgr2.load("c")  # larger than the whole budget
        await mgr.close()

    asyncio.run(main())


def test_system_available_memory_is_respected(store):
    async def main():
        mgr, _ = mk(store, 10 * 1024**3)
        mgr.memory_source.available = 1000
        with pytest.raises(InsufficientMemoryError) as ei:
            await mgr.load("a")
        assert ei.value.available == 1000 and "system reports" in str(ei.value)

    asyncio.run(main())


def test_load_errors_and_not_found(store, tmp_path):
    (store / "broken").mkdir()
    (store / "broken" / "config.json").write_text(json.dumps(CFG))
    (store / "broken" / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    outside = make_model(tmp_path, "outside", 10)
    (store / "link").symlink_to(outside)

    async def main():
        loader = Loader(fail="b")
        mgr, _ = mk(store, 10 * 1024**3, loader)
        for bad in ("nope", "../outside", "/etc", "link", "a/../b", ""):
            with pytest.raises(ModelNotFoundError):
                await mgr.load(bad)
        with pytest.raises(ModelLoadError, match="safetensors"):
            await mgr.load("broken")
        with pytest.raises(ModelLoadError, match="boom"):
            await mgr.load("b")
        assert mgr.used_bytes() == 0  # the failed load released its reservation
        assert "link" not in {m.name for m in mgr.list_models()}

    asyncio.run(main())


def test_keep_alive_reaps_idle_unpinned(store, tmp_path):
    cfg = tmp_path / "models.yaml"
    cfg.write_text(
        "models:\n  a:\n    keep_alive: 50ms\n  b:\n    pinned: true\n    keep_alive: 50ms\naliases:\n  alpha: a\n"
    )

    async def main():
        mgr, metrics = mk(store, 10 * 1024**3, models_config=cfg)
        await mgr.start(preload=False)
        la = await mgr.load("alpha")
        assert la.name == "a"
        await mgr.load("b")
        await mgr.load("c")  # no keep_alive: default 0 = never
        await asyncio.sleep(0.3)
        loaded = {m.name for m in mgr.list_models() if m.state == "loaded"}
        assert loaded == {"b", "c"}
        assert la.engine is None
        assert (
            metrics.registry.get_sample_value("jetserve:model_memory_bytes", {"model": "a", "kind": "predicted"})
            is None
        )
        await mgr.close()

    asyncio.run(main())


def test_per_model_settings_and_aliases(store, tmp_path):
    cfg = tmp_path / "models.json"
    cfg.write_text(
        json.dumps(
            {
                "models": {"a": {"aliases": ["x"], "max_context": 32, "max_batch_size": 1}},
                "aliases": {"gpt-4o-mini": "b"},
            }
        )
    )
    st = ModelStore(store, cfg)
    assert st.resolve("x").name == "a" and st.resolve("gpt-4o-mini").name == "b"
    assert st.resolve("a").aliases == ("x",)

    async def main():
        mgr, _ = mk(store, 10 * 1024**3, models_config=cfg)
        lm = await mgr.load("x")
        assert lm.runner.kw["max_seq"] == 32 and lm.runner.kw["max_batch_size"] == 1
        assert lm.settings.max_context == 32 and lm.predicted.max_seq == 32
        await mgr.close()

    asyncio.run(main())
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"models": {"a": {"pinnned": True}}}))
    with pytest.raises(ValueError, match="pinnned"):
        ModelStore(store, bad)
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"models": {"a": {"max_batch": 2}}}))
    with pytest.raises(ValueError, match="'max_batch' is now 'max_batch_size'"):
        ModelStore(store, old)


def test_cuda_runtime_terms(monkeypatch):
    from models.loader import CUDA_CONSTANT_BYTES, cublas_workspace_bytes, cuda_runtime_bytes

    # 2 streams x 1 MiB + logits of graphs (1+2) x 2 kv buckets x vocab x 4 + the calibrated constant
    assert (
        cuda_runtime_bytes(1000, batch_buckets=[1, 2], kv_buckets=[256, 512], cublas_workspace=2**20)
        == 2 * 2**20 + 3 * 2 * 1000 * 4 + CUDA_CONSTANT_BYTES
    )
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:2:16:8")
    assert cublas_workspace_bytes("cuda") == 4096 * 1024 * 2 + 16 * 1024 * 8


def test_trust_remote_code_reaches_default_loaders_only_from_settings(tmp_path):
    """The default runner and tokenizer loaders get Settings.trust_remote_code (False unless set)."""
    for flag in (False, True):
        mgr = ModelManager(Settings(model_store=tmp_path, trust_remote_code=flag))
        assert mgr._runner_loader.keywords == {
            "trust_remote_code": flag,
            "lm_head": "auto",
            "cpu_int4": "auto",
            "cpu_attention": "auto",
            "cpu_fused": "auto",
            "kv_cache_dtype": "auto",
            "compile_cache_dir": None,  # the suite runs with JETSERVE_COMPILE_DECODE=0 (tests/conftest.py)
        }
        assert mgr._tokenizer_loader.keywords == {"trust_remote_code": flag}


def test_kv_cache_dtype_reaches_the_loader_and_the_prediction(tmp_path, tiny_llama_dir):
    """Settings.kv_cache_dtype: the default runner loader gets it, and the predicted KV bytes follow it."""
    fps = {}
    for kv in ("auto", "int8"):
        mgr = ModelManager(Settings(model_store=tmp_path, kv_cache_dtype=kv))
        assert mgr._runner_loader.keywords["kv_cache_dtype"] == kv
        spec = ModelSpec(name="tiny", path=tiny_llama_dir)
        fps[kv] = mgr._inspect(spec)[1]
    info = inspect_checkpoint(tiny_llama_dir)
    d = info.head_dim  # bf16 rows of 2 D bytes against int8 rows of D + 4
    assert fps["int8"].kv_cache_bytes * 2 * d == fps["auto"].kv_cache_bytes * (d + 4)
    assert fps["int8"].weights_bytes == fps["auto"].weights_bytes


def test_lm_head_dtype_reaches_the_default_runner_loader(tmp_path):
    for head in ("int8", "int4"):
        mgr = ModelManager(Settings(model_store=tmp_path, lm_head_dtype=head))
        assert mgr._runner_loader.keywords["lm_head"] == head


def test_compile_settings_reach_the_default_runner_loader(tmp_path):
    mgr = ModelManager(Settings(model_store=tmp_path, compile_decode=True))
    assert mgr._runner_loader.keywords["compile_cache_dir"] == tmp_path / ".compile-cache"
    mgr = ModelManager(Settings(model_store=tmp_path, compile_decode=True, compile_cache_dir=tmp_path / "cc"))
    assert mgr._runner_loader.keywords["compile_cache_dir"] == tmp_path / "cc"
    mgr = ModelManager(Settings(model_store=tmp_path, compile_decode=False, compile_cache_dir=tmp_path / "cc"))
    assert mgr._runner_loader.keywords["compile_cache_dir"] is None
    from server.manager import compile_cache_dir

    on = Settings(model_store=tmp_path, compile_decode=True)
    assert compile_cache_dir(on, "cpu") == tmp_path / ".compile-cache"
    assert compile_cache_dir(on, "cuda:0") is None  # CUDA decodes through CUDA graphs


def test_loads_run_in_a_thread_that_exits(store):
    """The engine thread must be the model's only OpenMP user (models.threads): the load thread is gone after."""

    async def main():
        loader = Loader()
        mgr, _ = mk(store, 10 * 1024**3, loader)
        async with mgr.acquire("a"):
            pass
        (t,) = loader.threads
        assert t is not threading.main_thread() and t.name == "jetserve-load-a"
        t.join(5)
        assert not t.is_alive()
        await mgr.close()

    asyncio.run(main())
