"""Quantize an fp16/bf16 Hugging Face causal LM with GPTQ, AWQ or RTN through GPTQModel.

Contract:
- `QuantSpec` holds every setting; `validate(src, out, spec, overwrite)` checks everything cheap
  (method, bits, group size against each linear layer's in_features, SRC, OUT, calibration length)
  and raises `QuantizeInputError` with one clear line before any heavy work.
- `quantize(src, out, spec, overwrite)` writes a standard checkpoint (config.json with
  `quantization_config`, safetensors, tokenizer, README.md model card, `jetserve-quantize.json`) into a
  temporary folder next to OUT and renames it into place, so OUT is never half-written.
- Methods: `gptq` (GPTQModel GPTQ, checkpoint format GPTQ v1), `awq` (GPTQModel AWQ, GEMM layout) and
  `rtn` (GPTQModel's round-to-nearest weight-only path, GPTQ v1 layout; the floor for benchmarks).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import platform
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from models.quantize.calibration import CalibrationError, cut_samples, resolve_text, tokenize_text
from models.quantize.sink import sink_weighted_hessian

log = logging.getLogger(__name__)

METHODS = ("gptq", "awq", "rtn")
SUPPORTED_BITS = {"gptq": (2, 3, 4, 8), "awq": (4,), "rtn": (2, 3, 4, 8)}
GROUP_SIZES = (16, 32, 64, 128, 256, 512, 1024)
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "generation_config.json",
)
SETTINGS_FILE = "jetserve-quantize.json"


class QuantizeInputError(ValueError):
    """Bad input to `jetserve quantize`; the message is one line for the user."""


@dataclass(frozen=True)
class QuantSpec:
    """Settings of one quantization run. `None` means "the method's jetserve default" (see `resolved()`)."""

    method: str = "gptq"
    bits: int = 4
    group_size: int = 128
    # GPTQ
    sym: Optional[bool] = None
    desc_act: Optional[bool] = None
    damp_percent: Optional[float] = None
    act_group_aware: Optional[bool] = None
    static_groups: bool = False
    true_sequential: bool = True
    mse: float = 0.0
    sink_weight: Optional[float] = None
    # AWQ
    zero_point: bool = True
    # calibration
    calib: str = "c4"
    nsamples: int = 64
    seqlen: int = 512
    seed: int = 0
    extra: Dict[str, Any] = field(default_factory=dict)

    def resolved(self) -> "QuantSpec":
        """Fill method defaults. jetserve's GPTQ defaults come from the sweep in docs/benchmarks.md."""
        if self.method in ("gptq", "rtn"):
            return dataclasses.replace(
                self,
                sym=GPTQ_DEFAULTS["sym"] if self.sym is None else self.sym,
                desc_act=GPTQ_DEFAULTS["desc_act"] if self.desc_act is None else self.desc_act,
                damp_percent=GPTQ_DEFAULTS["damp_percent"] if self.damp_percent is None else self.damp_percent,
                act_group_aware=(
                    GPTQ_DEFAULTS["act_group_aware"] if self.act_group_aware is None else self.act_group_aware
                ),
                sink_weight=GPTQ_DEFAULTS["sink_weight"] if self.sink_weight is None else self.sink_weight,
            )
        return self

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self.resolved())
        if self.method == "awq":
            for k in (
                "sym",
                "desc_act",
                "damp_percent",
                "act_group_aware",
                "static_groups",
                "true_sequential",
                "mse",
                "sink_weight",
            ):
                d.pop(k)
        else:
            d.pop("zero_point")
        if self.method == "rtn":
            for k in (
                "desc_act",
                "damp_percent",
                "act_group_aware",
                "static_groups",
                "true_sequential",
                "mse",
                "sink_weight",
                "calib",
                "nsamples",
                "seqlen",
                "seed",
            ):
                d.pop(k)
        return d

    def settings_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


# jetserve's GPTQ defaults (see docs/benchmarks.md, "GPTQ sweep"): asymmetric grid, no act-order, damp 0.01,
# GPTQModel's act_group_aware ordering off, each sample's first (attention-sink) token weighted SINK_WEIGHT times in
# the Hessians of the q/k/v projections (models/quantize/sink.py).
SINK_WEIGHT = 128.0
GPTQ_DEFAULTS: Dict[str, Any] = {
    "sym": False,
    "desc_act": False,
    "damp_percent": 0.01,
    "act_group_aware": False,
    "sink_weight": SINK_WEIGHT,
}


@dataclass
class QuantizeResult:
    out_dir: Path
    seconds: float
    spec: Dict[str, Any]
    calibration: Dict[str, Any]


# ---------------------------------------------------------------- validation (cheap, before heavy work)


def _linear_shapes(src: Path) -> Dict[str, Tuple[int, int]]:
    """name -> (out_features, in_features) of every 2-D `*.weight` in decoder layers, from safetensors headers."""
    from safetensors import safe_open

    files = sorted(src.glob("*.safetensors"))
    if not files:
        raise QuantizeInputError(f"SRC {src} has no *.safetensors weights")
    out: Dict[str, Tuple[int, int]] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as h:
            for name in h.keys():
                if not name.endswith(".weight") or ".layers." not in name:
                    continue
                shape = h.get_slice(name).get_shape()
                if len(shape) == 2:
                    out[name[: -len(".weight")]] = (int(shape[0]), int(shape[1]))
    return out


def _check_shapes(src: Path, method: str, group_size: int) -> None:
    if group_size <= 0 and group_size != -1:
        raise QuantizeInputError(f"--group-size must be -1 (per channel) or positive, got {group_size}")
    shapes = _linear_shapes(src)
    if not shapes:
        raise QuantizeInputError(f"SRC {src} has no linear layers under '.layers.' to quantize")
    if method == "awq":
        # GPTQModel's AWQ clip search processes output channels in blocks of 64.
        for name, (n, _) in sorted(shapes.items()):
            if n % 64:
                raise QuantizeInputError(f"awq needs out_features divisible by 64; layer {name} has {n}")
    if group_size == -1:
        return
    g = 0
    for _, v in shapes.values():
        g = math.gcd(g, v)
    for name, (_, k) in sorted(shapes.items()):
        if k % group_size:
            valid = [s for s in GROUP_SIZES if g % s == 0] + [-1]
            raise QuantizeInputError(
                f"--group-size {group_size} does not divide in_features={k} of layer {name}; "
                f"valid group sizes for this model: {', '.join(map(str, valid))}"
            )


def resolve_src(src: str) -> Path:
    """A local HF folder, or a hub id (`org/name`) fetched with huggingface_hub.snapshot_download."""
    p = Path(src).expanduser()
    if p.exists():
        if not (p / "config.json").is_file():
            raise QuantizeInputError(f"SRC {src} is not a Hugging Face model folder (no config.json)")
        return p
    parts = src.split("/")
    if len(parts) == 2 and all(parts) and not src.startswith((".", "/", "~")):
        from huggingface_hub import snapshot_download

        try:
            return Path(
                snapshot_download(src, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"])
            )
        except Exception as e:  # network or not-found errors from the hub
            raise QuantizeInputError(f"SRC {src} is not a local folder and the hub download failed: {e}") from e
    raise QuantizeInputError(f"SRC {src} does not exist")


def validate(
    src: str, out: str, spec: QuantSpec, overwrite: bool = False, store: Optional[Path] = None, tokenizer=None
) -> Tuple[Path, Optional[List[List[int]]], Dict[str, Any]]:
    """Check every input; return (src_dir, calibration samples or None for RTN, calibration info).

    Raises QuantizeInputError with one line. Only reads headers, config and the calibration text.
    """
    if spec.method not in METHODS:
        raise QuantizeInputError(f"unknown method {spec.method!r}; choose one of {', '.join(METHODS)}")
    if spec.bits not in SUPPORTED_BITS[spec.method]:
        raise QuantizeInputError(
            f"{spec.method} does not support --bits {spec.bits}; "
            f"supported: {', '.join(map(str, SUPPORTED_BITS[spec.method]))}"
        )
    r = spec.resolved()
    if r.method == "gptq" and not (0.0 < float(r.damp_percent) < 1.0):
        raise QuantizeInputError(f"--damp-percent must be in (0, 1), got {r.damp_percent}")
    if r.method == "gptq" and not (float(r.sink_weight) >= 1.0 and math.isfinite(float(r.sink_weight))):
        raise QuantizeInputError(f"--sink-weight must be a finite number >= 1 (1 = plain GPTQ), got {r.sink_weight}")
    outp = Path(out).expanduser()
    if outp.exists() and (not outp.is_dir() or any(outp.iterdir())) and not overwrite:
        raise QuantizeInputError(f"OUT {out} exists and is not empty; pass --overwrite to replace it")
    src_dir = resolve_src(src)
    if outp.resolve() == src_dir.resolve():
        raise QuantizeInputError("OUT must differ from SRC")
    _check_shapes(src_dir, spec.method, spec.group_size)
    if spec.method == "rtn":
        return src_dir, None, {"data": None}
    try:
        text_path = resolve_text(spec.calib, store)
        if tokenizer is None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(src_dir))
        ids = tokenize_text(tokenizer, text_path)
        samples = cut_samples(ids, spec.nsamples, spec.seqlen, spec.seed)
    except CalibrationError as e:
        raise QuantizeInputError(str(e)) from e
    info = {
        "data": spec.calib,
        "file": str(text_path),
        "file_sha256": _sha256(text_path)[:16],
        "text_tokens": len(ids),
        "nsamples": spec.nsamples,
        "seqlen": spec.seqlen,
        "seed": spec.seed,
        "selection": "non-overlapping windows chosen uniformly at random with the seed",
    }
    return src_dir, samples, info


def _sha256(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------- heavy work


def _gptqmodel_config(spec: QuantSpec, device: str):
    from gptqmodel import QuantizeConfig
    from gptqmodel.quantization.config import AWQConfig, RTNConfig

    r = spec.resolved()
    if r.method == "gptq":
        return QuantizeConfig(
            bits=r.bits,
            group_size=r.group_size,
            sym=r.sym,
            desc_act=r.desc_act,
            damp_percent=r.damp_percent,
            act_group_aware=r.act_group_aware,
            static_groups=r.static_groups,
            true_sequential=r.true_sequential,
            mse=r.mse,
            device=device,
            **r.extra,
        )
    if r.method == "awq":
        return AWQConfig(bits=r.bits, group_size=r.group_size, sym=not r.zero_point, device=device, **r.extra)
    return RTNConfig(bits=r.bits, group_size=r.group_size, sym=r.sym, desc_act=False, device=device, **r.extra)


def tool_versions() -> Dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("jetserve", "gptqmodel", "transformers", "torch", "safetensors"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    out["python"] = platform.python_version()
    return out


def quantize(
    src: str,
    out: str,
    spec: QuantSpec,
    overwrite: bool = False,
    store: Optional[Path] = None,
    device: Optional[str] = None,
) -> QuantizeResult:
    """Validate, quantize through GPTQModel, write OUT atomically. Raises QuantizeInputError on bad input."""
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    src_dir, samples, calib_info = validate(src, out, spec, overwrite, store)
    import torch

    from models.loader import resolve_device

    device = str(resolve_device(device or "auto"))
    outp = Path(out).expanduser().resolve()
    outp.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{outp.name}.tmp-", dir=outp.parent))
    t0 = time.perf_counter()
    try:
        from gptqmodel import BACKEND, GPTQModel

        qcfg = _gptqmodel_config(spec, device)
        log.info("quantizing %s with %s on %s: %s", src_dir, spec.method, device, spec.to_dict())
        # Calibration forwards run in float32 on CPU: about 2x faster than bf16 on CPUs without bf16 matmul units,
        # and never less accurate. Unquantized tensors are cast back to the source dtype after saving.
        # GPTQModel's AWQ path only accepts fp16/bf16 layers, so AWQ keeps the checkpoint dtype.
        load_kw = {"dtype": torch.float32} if (device == "cpu" and spec.method != "awq") else {}
        model = GPTQModel.load(str(src_dir), qcfg, **load_kw)
        backend = BACKEND.AWQ_TORCH if (spec.method == "awq" and device == "cpu") else BACKEND.AUTO
        calibration = None
        if samples is not None:
            calibration = [{"input_ids": s, "attention_mask": [1] * len(s)} for s in samples]
        sink = spec.resolved().sink_weight if spec.method == "gptq" else 1.0
        with sink_weighted_hessian(float(sink)):
            model.quantize(calibration, batch_size=1, backend=backend, calibration_sort=None)
        model.save(str(tmp))
        del model
        if load_kw:
            _restore_dtype(tmp, src_dir)
        seconds = time.perf_counter() - t0
        for name in TOKENIZER_FILES:
            f = src_dir / name
            if f.is_file() and not (tmp / name).exists():
                shutil.copy2(f, tmp / name)
        record = {
            "source": str(src),
            "source_dir": str(src_dir.resolve()),
            "spec": spec.to_dict(),
            "settings_hash": spec.settings_hash(),
            "calibration": calib_info,
            "seconds": round(seconds, 1),
            "device": device,
            "versions": tool_versions(),
            "machine": f"{platform.machine()} {os.cpu_count()} cpus",
        }
        (tmp / SETTINGS_FILE).write_text(json.dumps(record, indent=2) + "\n")
        (tmp / "README.md").write_text(model_card(record))
        _check_written(tmp)
        if outp.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{outp.name}.old-", dir=outp.parent))
            os.replace(outp, trash / "old")
            os.replace(tmp, outp)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, outp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return QuantizeResult(outp, seconds, spec.to_dict(), calib_info)


def _restore_dtype(out: Path, src_dir: Path) -> None:
    """Cast float32 unquantized tensors (embeddings, norms) back to the source checkpoint's dtype."""
    import torch
    from safetensors.torch import load_file, save_file

    src_cfg = json.loads((src_dir / "config.json").read_text())
    name = src_cfg.get("dtype") or src_cfg.get("torch_dtype") or "bfloat16"
    dtype = getattr(torch, str(name).replace("torch.", ""), torch.bfloat16)
    if dtype == torch.float32:
        return
    for f in out.glob("*.safetensors"):
        tensors = load_file(str(f))
        tensors = {k: (v.to(dtype) if v.dtype == torch.float32 else v) for k, v in tensors.items()}
        save_file(tensors, str(f), metadata={"format": "pt"})
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["dtype"] = str(dtype).replace("torch.", "")
    cfg.pop("torch_dtype", None)
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")


def _check_written(d: Path) -> None:
    cfg = json.loads((d / "config.json").read_text())
    if "quantization_config" not in cfg:
        raise RuntimeError(f"GPTQModel wrote {d}/config.json without quantization_config")
    if not list(d.glob("*.safetensors")):
        raise RuntimeError(f"GPTQModel wrote no safetensors into {d}")


def model_card(record: Dict[str, Any]) -> str:
    s = record["spec"]
    c = record["calibration"]
    lines = [
        f"# {record['source'].rstrip('/').split('/')[-1]} — {s['method'].upper()} {s['bits']}-bit g{s['group_size']}",
        "",
        "Written by `jetserve quantize` (GPTQModel). Loads with transformers (`AutoModelForCausalLM`) and jetserve.",
        "",
        "## Settings",
        "",
        "| setting | value |",
        "|---|---|",
    ]
    lines += [f"| {k} | {v} |" for k, v in s.items() if k != "extra"] + [
        f"| {k} | {v} |" for k, v in s["extra"].items()
    ]
    lines += ["", "## Calibration data", ""]
    if c.get("data") is None:
        lines.append("None: round-to-nearest needs no calibration.")
    else:
        lines += [
            f"- text: `{c['data']}` ({c['file']}, sha256 {c['file_sha256']}…, {c['text_tokens']} tokens)",
            f"- {c['nsamples']} samples x {c['seqlen']} tokens, seed {c['seed']}: {c['selection']}",
        ]
    lines += [
        "",
        "## Run",
        "",
        f"- time taken: {record['seconds']} s on {record['device']} ({record['machine']})",
        "- tool versions: " + ", ".join(f"{k} {v}" for k, v in record["versions"].items()),
        f"- settings hash: `{record['settings_hash']}`",
        "",
    ]
    return "\n".join(lines)
