"""Model store: names confined to one directory and an optional models config.

A model is an HF folder (config.json + *.safetensors + tokenizer files) directly or nested inside
`Settings.model_store`. Names are relative paths inside the store; `..`, absolute paths and symlinks that
resolve outside the store are rejected. The optional models config (`Settings.models_config`, YAML or
JSON) adds aliases and per-model settings:

```yaml
models:
  smollm2-135m-instruct-gptq-g64:
    aliases: [smollm2]
    max_context: 1024     # overrides Settings.max_context (sizes the KV cache)
    max_batch_size: 4     # overrides Settings.max_batch_size (KV slots)
    pinned: true          # never evicted
    keep_alive: 10m       # seconds or "30s"/"10m"/"1h"; 0 = never unload when idle
aliases:
  gpt-4o-mini: smollm2-135m-instruct-gptq-g64
```

A model's memory footprint is predicted by `models.loader.predict_footprint` (server/manager.py calls it).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

logger = logging.getLogger(__name__)


class ModelNotFoundError(LookupError):
    """The requested name is not a model in the store (or not allowed). Maps to HTTP 404."""


class ModelLoadError(RuntimeError):
    """The model exists but cannot be loaded (corrupt file, unsupported format...). Message says why."""


@dataclass(frozen=True)
class ModelSpec:
    """A model the store can serve, with its per-model settings (None = use Settings)."""

    name: str
    path: Path
    aliases: Tuple[str, ...] = ()
    max_context: Optional[int] = None
    max_batch_size: Optional[int] = None
    pinned: bool = False
    keep_alive_s: Optional[float] = None


# ---------------------------------------------------------------- models config

_DURATION_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(ms|s|m|h)?\s*$")


def parse_duration(value: Union[str, int, float, None]) -> Optional[float]:
    """Seconds from 30, "30s", "10m", "1h" (None stays None)."""
    if value is None:
        return None
    if isinstance(value, (int, float)):
        return float(value)
    m = _DURATION_RE.match(str(value))
    if not m:
        raise ValueError(f"invalid duration {value!r}: use seconds or '30s', '10m', '1h'")
    return float(m.group(1)) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[m.group(2) or "s"]


def load_models_config(path: Path) -> Dict[str, Any]:
    """Read the models config file (JSON, or YAML when it ends in .yaml/.yml). Raises ValueError with the path."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ValueError(f"models config {path}: {e}") from e
    if str(path).endswith((".yaml", ".yml")):
        try:
            import yaml
        except ImportError as e:
            raise ValueError(f"models config {path} is YAML but PyYAML is not installed (pip install pyyaml)") from e
        data = yaml.safe_load(text) or {}
    else:
        data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError(f"models config {path}: top level must be a mapping with 'models' and/or 'aliases'")
    unknown = set(data) - {"models", "aliases"}
    if unknown:
        raise ValueError(f"models config {path}: unknown keys {sorted(unknown)}")
    return data


_ALLOWED_MODEL_KEYS = {"aliases", "max_context", "max_batch_size", "pinned", "keep_alive"}


class ModelStore:
    """Names -> confined folders, plus the models config. Read-only; cheap to call from the event loop."""

    def __init__(self, root: Path, models_config: Optional[Path] = None):
        self.root = Path(root)
        self._per_model: Dict[str, Dict[str, Any]] = {}
        self._aliases: Dict[str, str] = {}
        if models_config is not None:
            data = load_models_config(models_config)
            for name, opts in (data.get("models") or {}).items():
                opts = dict(opts or {})
                if "max_batch" in opts:
                    raise ValueError(f"models config: model {name!r}: 'max_batch' is now 'max_batch_size'")
                bad = set(opts) - _ALLOWED_MODEL_KEYS
                if bad:
                    raise ValueError(f"models config: model {name!r} has unknown keys {sorted(bad)}")
                opts["keep_alive"] = parse_duration(opts.get("keep_alive"))
                self._per_model[name] = opts
                for a in opts.get("aliases") or ():
                    self._aliases[str(a)] = name
            for a, target in (data.get("aliases") or {}).items():
                self._aliases[str(a)] = str(target)

    # -- names

    def _root_resolved(self) -> Path:
        return self.root.resolve()

    def _confined(self, name: str) -> Path:
        """The folder for `name`, or ModelNotFoundError when the name escapes the store or is no model."""
        if not name or "\x00" in name or "\\" in name or name.startswith("/") or Path(name).is_absolute():
            raise ModelNotFoundError(f"model {name!r} not found: names are paths relative to the model store")
        parts = name.split("/")
        if any(p in ("", ".", "..") for p in parts):
            raise ModelNotFoundError(f"model {name!r} not found: '..', '.' and empty path parts are not allowed")
        root = self._root_resolved()
        try:
            path = (root / name).resolve()
            is_model = (path / "config.json").is_file()
        except OSError as e:  # e.g. ENAMETOOLONG for a 5000-character name: still just "not found"
            raise ModelNotFoundError(f"model {name[:200]!r} not found: {e.strerror or e}") from None
        if not path.is_relative_to(root) or path == root:
            raise ModelNotFoundError(f"model {name!r} not found: it resolves outside the model store")
        if not is_model:
            raise ModelNotFoundError(f"model {name!r} not found in the model store")
        return path

    def canonical_name(self, name: str) -> str:
        """Alias -> model name (one level), else the name itself."""
        return self._aliases.get(name, name)

    def resolve(self, name: str) -> ModelSpec:
        """ModelSpec for a name or alias; ModelNotFoundError when absent or outside the store."""
        canon = self.canonical_name(name)
        path = self._confined(canon)
        opts = self._per_model.get(canon, {})
        aliases = tuple(sorted(a for a, t in self._aliases.items() if t == canon))
        return ModelSpec(
            name=canon,
            path=path,
            aliases=aliases,
            max_context=opts.get("max_context"),
            max_batch_size=opts.get("max_batch_size"),
            pinned=bool(opts.get("pinned", False)),
            keep_alive_s=opts.get("keep_alive"),
        )

    def available(self) -> List[ModelSpec]:
        """Every model folder in the store (up to two levels deep, e.g. `org/model`), sorted by name."""
        root = self._root_resolved()
        if not root.is_dir():
            return []
        names: List[str] = []
        for cfg in list(root.glob("*/config.json")) + list(root.glob("*/*/config.json")):
            rel = cfg.parent.relative_to(root).as_posix()
            names.append(rel)
        specs = []
        for n in sorted(set(names)):
            try:
                specs.append(self.resolve(n))
            except ModelNotFoundError:
                logger.warning("skipping %s: it resolves outside the model store", n)
        return specs
