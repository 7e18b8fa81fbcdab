"""Calibration and evaluation text: where the built-in texts live and how samples are cut.

Built-in texts (`c4`, `wiki`, `tiny`, ...) are the `.utf8` files shipped in the exllamav2 wheel
(`exllamav2/conversion/standard_cal_data/`). `jetserve demo prepare` copies them to `<store>/data/`; lookups
try that copy first, then the wheel's files (located by path; exllamav2 is never imported).
"""

from __future__ import annotations

import importlib.util
import logging
import random
from pathlib import Path
from typing import List, Optional, Sequence

log = logging.getLogger(__name__)

BUILTIN_TEXTS = ("c4", "wiki", "tiny", "code", "multilingual", "technical")


class CalibrationError(ValueError):
    """Calibration text missing or too short for the requested samples."""


def wheel_data_dir() -> Optional[Path]:
    """`standard_cal_data` inside the installed exllamav2 wheel, or None (never imports exllamav2)."""
    spec = importlib.util.find_spec("exllamav2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        d = Path(loc) / "conversion" / "standard_cal_data"
        if d.is_dir():
            return d
    return None


def resolve_text(name_or_path: str, store: Optional[Path] = None) -> Path:
    """A built-in text name (`c4`, `wiki`, `tiny`) or a path to a UTF-8 text file -> existing file path."""
    if name_or_path in BUILTIN_TEXTS:
        candidates = []
        if store is not None:
            candidates.append(Path(store) / "data" / f"{name_or_path}.utf8")
        wheel = wheel_data_dir()
        if wheel is not None:
            candidates.append(wheel / f"{name_or_path}.utf8")
        for c in candidates:
            if c.is_file():
                return c
        raise CalibrationError(
            f"built-in text {name_or_path!r} not found (looked in {', '.join(map(str, candidates)) or 'nothing'}); "
            "run `jetserve demo prepare` or pass a text file path"
        )
    p = Path(name_or_path)
    if not p.is_file():
        raise CalibrationError(
            f"calibration text {name_or_path!r} is neither a built-in ({'|'.join(BUILTIN_TEXTS)}) nor an existing file"
        )
    return p


def tokenize_text(tokenizer, path: Path) -> List[int]:
    """All token ids of the file (no special tokens)."""
    text = Path(path).read_text(encoding="utf-8", errors="replace")
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def cut_samples(ids: Sequence[int], nsamples: int, seqlen: int, seed: int) -> List[List[int]]:
    """`nsamples` non-overlapping windows of exactly `seqlen` tokens, chosen at random with `seed`.

    Raises CalibrationError when the text holds fewer than nsamples * seqlen tokens.
    """
    if nsamples < 1 or seqlen < 1:
        raise CalibrationError(f"nsamples and seqlen must be >= 1 (got {nsamples}, {seqlen})")
    n_windows = len(ids) // seqlen
    if n_windows < nsamples:
        raise CalibrationError(
            f"calibration text too short: {len(ids)} tokens hold {n_windows} windows of {seqlen}, "
            f"need nsamples*seqlen = {nsamples}x{seqlen} = {nsamples * seqlen} tokens"
        )
    starts = sorted(random.Random(seed).sample(range(n_windows), nsamples))
    return [list(ids[s * seqlen : (s + 1) * seqlen]) for s in starts]
