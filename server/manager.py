"""ModelManager: on-demand loading under a memory budget, LRU eviction, pinning, keep_alive.

Contract (used by server/api):

```python
manager = ModelManager(settings, metrics, engine_factory=make_engine)
await manager.start()                        # preloads Settings.model (if in the store) + warmup; starts the reaper
async with manager.acquire("name") as lm:    # LoadedModel: name, path, runner, tokenizer, engine, info, predicted...
    handle = lm.engine.submit(...)
manager.list_models()                        # list[ModelEntry]: available + loaded state (GET /v1/models)
await manager.load(name); await manager.unload(name)   # admin
await manager.close()                        # closes every engine, frees runners
```

`engine_factory(runner, settings, *, name, on_step, on_request)` builds and starts an engine for one model
(`settings` carries that model's max_context / max_batch_size overrides). The engine must have a blocking
`close()` (or `shutdown()`); the manager calls it in a worker thread when the model is unloaded.
`runner_loader(model_dir, *, device, dtype, max_batch_size, max_seq) -> Runner` defaults to
`models.loader.load_runner`; `tokenizer_loader(model_dir)` defaults to `models.tokenizer.Tokenizer.from_dir`.

Memory accounting: before a load the footprint is predicted from config.json + safetensors headers
(`models.loader.predict_footprint`). A model counts for max(predicted, measured) bytes. A load that would
exceed the budget evicts least-recently-used idle models (never pinned ones, never ones with requests in
flight or being acquired); if even evicting all of them is not enough, `InsufficientMemoryError` says by how
much. After a load the manager measures what it really took: process RSS delta around load + warmup on CPU
(includes the tokenizer and page-cache pages of mmap'd safetensors that the load touched), or the
`torch.cuda.memory_allocated` delta on GPU. Loads run one at a time in a worker thread (never on the event
loop) so the deltas are attributable.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable, Dict, List, Optional, Tuple

from models.threads import run_in_fresh_thread_async
from server.config import Settings, parse_memory_budget
from server.store import ModelLoadError, ModelNotFoundError, ModelSpec, ModelStore
from server.telemetry.memory import MemorySource, memory_source_for, process_model_bytes

if TYPE_CHECKING:  # models.loader imports torch: imported where used, so importing this module stays light
    from models.loader import CheckpointInfo, Footprint

logger = logging.getLogger(__name__)

__all__ = [
    "ModelManager",
    "LoadedModel",
    "ModelEntry",
    "ModelNotFoundError",
    "ModelLoadError",
    "InsufficientMemoryError",
    "ModelBusyError",
]

GiB = 1024**3


class InsufficientMemoryError(RuntimeError):
    """The model does not fit in the budget even after evicting every idle, unpinned model. Maps to 507/503."""

    def __init__(
        self, name: str, needed: int, budget: int, in_use: int, evictable: int, available: Optional[int] = None
    ):
        self.name, self.needed, self.budget, self.in_use, self.evictable = name, needed, budget, in_use, evictable
        self.available = available
        msg = (
            f"model {name!r} needs {needed / GiB:.3f} GiB ({needed} B) but the memory budget is "
            f"{budget / GiB:.3f} GiB with {in_use / GiB:.3f} GiB in use, of which only "
            f"{evictable / GiB:.3f} GiB is evictable (idle, unpinned models)"
        )
        if available is not None:
            msg += f"; the system reports {available / GiB:.3f} GiB available"
        super().__init__(msg)


class ModelBusyError(RuntimeError):
    """Unload refused: the model has requests in flight. Maps to 409."""


@dataclass
class LoadedModel:
    """One loaded model. `in_flight` and `last_used` are owned by the manager."""

    name: str
    path: Path
    spec: ModelSpec
    runner: Any
    tokenizer: Any
    engine: Any
    info: CheckpointInfo
    predicted: Footprint
    measured_bytes: int
    load_seconds: float
    settings: Settings
    in_flight: int = 0
    last_used: float = field(default_factory=time.monotonic)
    loaded_at: float = field(default_factory=time.time)

    @property
    def accounted_bytes(self) -> int:
        return max(self.predicted.total_bytes, self.measured_bytes)


@dataclass(frozen=True)
class ModelEntry:
    """A row of GET /v1/models and GET /admin/models."""

    name: str
    path: str
    aliases: tuple
    state: str  # "available" | "loading" | "loaded"
    pinned: bool
    in_flight: int = 0
    predicted_bytes: Optional[int] = None
    measured_bytes: Optional[int] = None
    loaded_at: Optional[float] = None


def _process_bytes(device: str, model_dir: Path) -> int:
    """What a load is measured with: on CUDA memory_allocated; on CPU anonymous RSS + resident pages of the
    model's mmap'd files (server.telemetry.memory.process_model_bytes), after returning free heap to the OS."""
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()
        return int(torch.cuda.memory_allocated())
    from models.heap import release_freed_heap

    release_freed_heap()
    return process_model_bytes(model_dir)


def compile_cache_dir(settings: Settings, device: str) -> Optional[Path]:
    """Where compiled decode steps are cached: `compile_cache_dir`, else .compile-cache in the model store; None when
    compiling is off or the device is not the CPU (CUDA decodes through CUDA graphs)."""
    if not settings.compile_decode or not str(device).startswith("cpu"):
        return None
    return settings.compile_cache_dir or Path(settings.model_store) / ".compile-cache"


def _default_runner_loader(model_dir: Path, *, dtype: str, **kw):
    """models.loader.load_runner with the dtype name turned into a torch.dtype."""
    import torch

    from models.loader import load_runner

    return load_runner(model_dir, dtype=getattr(torch, dtype), **kw)


def _import_default_loaders(
    model_dir: Path,
    compile_cache: Optional[Path] = None,
    device: str = "cpu",
    cpu_int4: str = "auto",
    cpu_attention: str = "auto",
    cpu_fused: str = "auto",
) -> None:
    """Import the runtime before a measured load, so module imports are not counted as model memory.

    The first tokenizer load imports ~700 transformers modules (~50 MiB); loading the tokenizer once and
    dropping it pays that before the baseline is taken. On CPU the int4 kernel and the decode attention are
    chosen here too (and the fused prefill ops), which builds or loads the C++ extension (torch's cpp_extension machinery) once per process.
    """
    import models.loader  # noqa: F401
    import models.runner  # noqa: F401
    import models.tokenizer  # noqa: F401

    models.tokenizer.Tokenizer.from_dir(model_dir)
    if compile_cache is not None:  # compiling's one-time machinery (models.compile.prewarm) is not a model's
        from models.compile import prewarm

        prewarm(compile_cache)
    if device == "cpu":
        import torch

        from models.attention import cpu_attention_op
        from models.fused import cpu_fused_ops
        from models.kernels import device_kernel

        device_kernel(torch.device("cpu"), cpu_int4=cpu_int4)
        cpu_attention_op(cpu_attention)
        cpu_fused_ops(cpu_fused)


def _default_tokenizer_loader(model_dir: Path, trust_remote_code: bool = False):
    from models.tokenizer import Tokenizer

    return Tokenizer.from_dir(model_dir, trust_remote_code=trust_remote_code)


class ModelManager:
    """See module docstring. All public coroutines must be called from one event loop."""

    def __init__(
        self,
        settings: Settings,
        metrics: Any = None,
        *,
        engine_factory: Optional[Callable] = None,
        runner_loader: Optional[Callable] = None,
        tokenizer_loader: Optional[Callable] = None,
        memory_source: Optional[MemorySource] = None,
        store: Optional[ModelStore] = None,
    ):
        self.settings = settings
        self.metrics = metrics
        self.store = store or ModelStore(settings.model_store, settings.models_config)
        from models.loader import resolve_device

        self.device = str(resolve_device(settings.device))
        self._engine_factory = engine_factory
        # trust_remote_code reaches the runtime only from Settings (off unless the operator sets it)
        trust = settings.trust_remote_code
        self._runner_loader = runner_loader or functools.partial(
            _default_runner_loader,
            trust_remote_code=trust,
            lm_head=settings.lm_head_dtype,
            cpu_int4=settings.cpu_int4_kernel,
            cpu_attention=settings.cpu_attention_kernel,
            cpu_fused=settings.cpu_fused_ops,
            kv_cache_dtype=settings.kv_cache_dtype,
            compile_cache_dir=compile_cache_dir(settings, self.device),
        )
        self._default_tokenizer = tokenizer_loader is None
        self._tokenizer_loader = tokenizer_loader or functools.partial(
            _default_tokenizer_loader, trust_remote_code=trust
        )
        self.memory_source = memory_source or memory_source_for(self.device)
        self.budget_bytes = parse_memory_budget(settings.memory_budget, self.memory_source.snapshot().total)
        self._loaded: Dict[str, LoadedModel] = {}
        self._loading: Dict[str, asyncio.Future] = {}
        self._reserved: Dict[str, int] = {}  # predicted bytes of models being loaded
        self._lock: Optional[asyncio.Lock] = None
        self._load_serial = threading.Lock()  # one load at a time: measured deltas stay attributable
        self._reaper: Optional[asyncio.Task] = None
        self._closed = False
        self._runtime_imported = False
        if metrics is not None:
            metrics.set_memory_budget(self.budget_bytes)
        logger.info(
            "memory budget %.3f GiB (%s of %s source, device %s)",
            self.budget_bytes / GiB,
            settings.memory_budget,
            self.memory_source.kind,
            self.device,
        )

    # ------------------------------------------------------------ helpers

    @property
    def lock(self) -> asyncio.Lock:
        if self._lock is None:
            self._lock = asyncio.Lock()
        return self._lock

    def used_bytes(self) -> int:
        """Bytes accounted to loaded models plus reservations of loads in progress."""
        return sum(m.accounted_bytes for m in self._loaded.values()) + sum(self._reserved.values())

    def _settings_for(self, spec: ModelSpec) -> Settings:
        upd: Dict[str, Any] = {}
        if spec.max_context is not None:
            upd["max_context"] = int(spec.max_context)
        if spec.max_batch_size is not None:
            upd["max_batch_size"] = int(spec.max_batch_size)
        if spec.keep_alive_s is not None:
            upd["keep_alive_s"] = float(spec.keep_alive_s)
        return self.settings.model_copy(update=upd) if upd else self.settings

    def predict(self, name: str) -> Footprint:
        """Predicted footprint of a model with its effective settings (headers only)."""
        return self._inspect(self.store.resolve(name))[1]

    def _inspect(self, spec: ModelSpec) -> Tuple[CheckpointInfo, Footprint]:
        """Checkpoint info and predicted footprint (headers only); ModelLoadError when they cannot be read."""
        import torch

        from models.loader import inspect_checkpoint, predict_footprint

        s = self._settings_for(spec)
        try:
            info = inspect_checkpoint(spec.path)
            fp = predict_footprint(
                info,
                max_batch_size=s.max_batch_size,
                max_seq=s.max_context,
                dtype=getattr(torch, s.dtype),
                prefill_chunk=s.prefill_chunk,
                device=self.device,
                lm_head=s.lm_head_dtype,
                cpu_int4=s.cpu_int4_kernel,
                compile_decode=compile_cache_dir(s, self.device) is not None,
                kv_cache_dtype=s.kv_cache_dtype,
            )
        except Exception as e:  # any surprise while reading config/headers is a load error, not a crash
            raise ModelLoadError(f"{spec.name}: cannot predict its memory footprint: {e}") from e
        return info, fp

    def _update_memory_metrics(self) -> None:
        if self.metrics is not None:
            self.metrics.set_memory_used(self.used_bytes())

    def get_loaded(self, name: str) -> Optional[LoadedModel]:
        return self._loaded.get(self.store.canonical_name(name))

    # ------------------------------------------------------------ listing

    def list_models(self) -> List[ModelEntry]:
        """Every model in the store with its state; loaded ones carry memory figures."""
        rows = []
        for spec in self.store.available():
            lm = self._loaded.get(spec.name)
            state = "loaded" if lm else ("loading" if spec.name in self._loading else "available")
            rows.append(
                ModelEntry(
                    name=spec.name,
                    path=str(spec.path),
                    aliases=spec.aliases,
                    state=state,
                    pinned=spec.pinned,
                    in_flight=lm.in_flight if lm else 0,
                    predicted_bytes=lm.predicted.total_bytes if lm else None,
                    measured_bytes=lm.measured_bytes if lm else None,
                    loaded_at=lm.loaded_at if lm else None,
                )
            )
        return rows

    # ------------------------------------------------------------ acquire / load

    @asynccontextmanager
    async def acquire(self, name: str) -> AsyncIterator[LoadedModel]:
        """Loaded model for `name` (loading it on demand); counts as in flight until the block exits."""
        lm = await self._ensure_loaded(name, hold=True)
        try:
            yield lm
        finally:
            lm.in_flight -= 1
            lm.last_used = time.monotonic()

    async def load(self, name: str) -> LoadedModel:
        """Load (if needed) without holding it. Admin endpoint and preload."""
        return await self._ensure_loaded(name, hold=False)

    async def _ensure_loaded(self, name: str, *, hold: bool) -> LoadedModel:
        if self._closed:
            raise ModelLoadError("the server is shutting down")
        spec = self.store.resolve(name)  # ModelNotFoundError
        while True:
            async with self.lock:
                lm = self._loaded.get(spec.name)
                if lm is not None:
                    if hold:
                        lm.in_flight += 1
                    lm.last_used = time.monotonic()
                    return lm
                fut = self._loading.get(spec.name)
                if fut is None:
                    victims = self._reserve(spec)  # raises InsufficientMemoryError / ModelLoadError
                    fut = asyncio.get_running_loop().create_future()
                    self._loading[spec.name] = fut
                    # the load runs as its own task: a cancelled request never leaves a half-registered model
                    asyncio.get_running_loop().create_task(
                        self._load_task(spec, victims, fut), name=f"jetserve-load-{spec.name}"
                    )
            # wait for the (possibly someone else's) load, then take the model under the lock
            await asyncio.shield(fut)

    async def _load_task(self, spec: ModelSpec, victims: List[LoadedModel], fut: asyncio.Future) -> None:
        try:
            for v in victims:
                await self._dispose(v, reason="evicted")
            # a thread that exits after the load: the engine thread stays the model's only OpenMP user (models.threads)
            lm = await run_in_fresh_thread_async(self._load_blocking, spec, name=f"jetserve-load-{spec.name}")
        except BaseException as e:
            async with self.lock:
                self._loading.pop(spec.name, None)
                self._reserved.pop(spec.name, None)
                self._update_memory_metrics()
            fut.set_exception(e if isinstance(e, Exception) else ModelLoadError(f"load of {spec.name!r} aborted"))
            fut.exception()  # waiters re-raise it; don't log "never retrieved"
            return
        async with self.lock:
            self._reserved.pop(spec.name, None)
            self._loaded[spec.name] = lm
            self._loading.pop(spec.name, None)
            self._update_memory_metrics()
        fut.set_result(lm)

    def _reserve(self, spec: ModelSpec) -> List[LoadedModel]:
        """Under the lock: reserve the predicted footprint, choosing LRU idle victims. Returns them (removed)."""
        _, fp = self._inspect(spec)  # ModelLoadError
        needed = fp.total_bytes
        in_use = self.used_bytes()
        idle = sorted(
            (m for m in self._loaded.values() if m.in_flight == 0 and not m.spec.pinned), key=lambda m: m.last_used
        )
        evictable = sum(m.accounted_bytes for m in idle)
        if in_use - evictable + needed > self.budget_bytes:
            raise InsufficientMemoryError(spec.name, needed, self.budget_bytes, in_use, evictable)
        victims: List[LoadedModel] = []
        freed = 0
        for m in idle:
            if in_use - freed + needed <= self.budget_bytes:
                break
            victims.append(m)
            freed += m.accounted_bytes
        # the rest of the system may hold memory too (Jetson: other processes, the desktop)
        available = self.memory_source.snapshot().available
        if needed > available + freed:
            raise InsufficientMemoryError(spec.name, needed, self.budget_bytes, in_use, evictable, available)
        for v in victims:
            del self._loaded[v.name]
        self._reserved[spec.name] = needed
        logger.info(
            "loading %s: predicted %.1f MiB (weights %.1f, kv %.1f, workspace %.1f)%s",
            spec.name,
            needed / 2**20,
            fp.weights_bytes / 2**20,
            fp.kv_cache_bytes / 2**20,
            fp.workspace_bytes / 2**20,
            f"; evicting {[v.name for v in victims]}" if victims else "",
        )
        return victims

    def _load_blocking(self, spec: ModelSpec) -> LoadedModel:
        """Worker thread: build runner + tokenizer + engine and measure what the load took."""
        s = self._settings_for(spec)
        info, fp = self._inspect(spec)
        if not self._runtime_imported and self._default_tokenizer:
            try:
                _import_default_loaders(
                    spec.path,
                    compile_cache_dir(self.settings, self.device),
                    self.device,
                    s.cpu_int4_kernel,
                    s.cpu_attention_kernel,
                    s.cpu_fused_ops,
                )
            except Exception:  # a broken tokenizer is reported by the measured load below, as a ModelLoadError
                logger.debug("pre-import with %s failed", spec.name, exc_info=True)
            self._runtime_imported = True
        with self._load_serial:
            t0 = time.perf_counter()
            before = _process_bytes(self.device, spec.path)
            try:
                runner = self._runner_loader(
                    spec.path, device=self.device, dtype=s.dtype, max_batch_size=s.max_batch_size, max_seq=s.max_context
                )
                tokenizer = self._tokenizer_loader(spec.path)
                warm = getattr(runner, "warmup", None)
                if warm is not None:
                    warm()
            except (ModelLoadError, MemoryError):
                raise
            except Exception as e:
                raise ModelLoadError(f"cannot load model {spec.name!r}: {type(e).__name__}: {e}") from e
            measured = max(0, _process_bytes(self.device, spec.path) - before)
            load_s = time.perf_counter() - t0
        engine = None
        if self._engine_factory is not None:
            on_step = getattr(self.metrics, "on_step", None)
            on_request = getattr(self.metrics, "on_request_finished", None)
            engine = self._engine_factory(runner, s, name=spec.name, on_step=on_step, on_request=on_request)
        lm = LoadedModel(
            name=spec.name,
            path=spec.path,
            spec=spec,
            runner=runner,
            tokenizer=tokenizer,
            engine=engine,
            info=info,
            predicted=fp,
            measured_bytes=measured,
            load_seconds=load_s,
            settings=s,
        )
        err = (measured - fp.total_bytes) / fp.total_bytes if fp.total_bytes else 0.0
        logger.info(
            "loaded %s in %.2fs: predicted %.1f MiB, measured %.1f MiB (%+.1f%%)",
            spec.name,
            load_s,
            fp.total_bytes / 2**20,
            measured / 2**20,
            100 * err,
        )
        if self.metrics is not None:
            self.metrics.model_loaded(
                spec.name,
                predicted_bytes=fp.total_bytes,
                measured_bytes=measured,
                load_seconds=load_s,
                weight_bytes=fp.weights_bytes,
            )
        return lm

    # ------------------------------------------------------------ unload / evict

    async def unload(self, name: str, *, force: bool = False) -> bool:
        """Unload a loaded model. Returns False if it was not loaded. ModelBusyError when requests are in flight."""
        spec = self.store.resolve(name)
        async with self.lock:
            lm = self._loaded.get(spec.name)
            if lm is None:
                return False
            if lm.in_flight and not force:
                raise ModelBusyError(f"model {spec.name!r} has {lm.in_flight} request(s) in flight")
            del self._loaded[spec.name]
            self._update_memory_metrics()
        await self._dispose(lm, reason="unloaded")
        return True

    async def _dispose(self, lm: LoadedModel, *, reason: str) -> None:
        """Close the engine and drop the runner (worker thread). The model is already out of `_loaded`."""
        logger.info("%s %s (idle %.1fs)", reason, lm.name, time.monotonic() - lm.last_used)
        engine = lm.engine
        closer = None
        if engine is not None:
            closer = getattr(engine, "close", None) or getattr(engine, "shutdown", None)
        if closer is not None:
            try:
                await asyncio.to_thread(closer)
            except Exception:
                logger.exception("closing the engine of %s failed", lm.name)
        lm.engine = lm.runner = lm.tokenizer = None
        if self.device.startswith("cuda"):
            import torch

            await asyncio.to_thread(torch.cuda.empty_cache)
        if self.metrics is not None:
            self.metrics.model_unloaded(lm.name, evicted=(reason == "evicted"))
        self._update_memory_metrics()

    async def reap_idle(self, now: Optional[float] = None) -> List[str]:
        """Unload idle, unpinned models whose keep_alive has expired. Returns their names."""
        now = time.monotonic() if now is None else now
        async with self.lock:
            expired = [
                m
                for m in self._loaded.values()
                if m.in_flight == 0
                and not m.spec.pinned
                and m.settings.keep_alive_s > 0
                and now - m.last_used >= m.settings.keep_alive_s
            ]
            for m in expired:
                del self._loaded[m.name]
            self._update_memory_metrics()
        for m in expired:
            await self._dispose(m, reason="keep_alive expired, unloaded")
        return [m.name for m in expired]

    async def _reaper_loop(self) -> None:
        ttls = [self.settings.keep_alive_s] + [s.keep_alive_s or 0 for s in self.store.available()]
        period = max(0.05, min([t for t in ttls if t > 0] or [1.0]) / 4)
        while True:
            await asyncio.sleep(period)
            try:
                await self.reap_idle()
            except Exception:
                logger.exception("keep_alive reaper failed")

    # ------------------------------------------------------------ lifecycle

    async def start(self, *, preload: bool = True) -> None:
        """Preload Settings.model when it is in the store (errors propagate), start the keep_alive reaper."""
        if preload and self.settings.model:
            try:
                self.store.resolve(self.settings.model)
            except ModelNotFoundError:
                logger.warning(
                    "default model %r is not in %s: nothing preloaded", self.settings.model, self.settings.model_store
                )
            else:
                await self.load(self.settings.model)
        if self._reaper is None:
            self._reaper = asyncio.get_running_loop().create_task(self._reaper_loop(), name="jetserve-keep-alive")

    async def close(self) -> None:
        """Stop the reaper, close every engine, free every model."""
        self._closed = True
        if self._reaper is not None:
            self._reaper.cancel()
            try:
                await self._reaper
            except (asyncio.CancelledError, Exception):
                pass
            self._reaper = None
        async with self.lock:
            models = list(self._loaded.values())
            self._loaded.clear()
        for m in models:
            await self._dispose(m, reason="shutdown, unloaded")
