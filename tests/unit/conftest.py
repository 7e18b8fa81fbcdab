"""The unit tier is hermetic: it reads no model store and no exllamav2 wheel.

For every unit test module (autouse, undone after the module):
- `JETSERVE_MODEL_STORE` points at an empty temp folder, so `Settings().model_store` and the CLIs' default
  `--store` never reach `./model-store`;
- the built-in texts (`tiny`, `wiki`, `c4`, ... : `models.quantize.calibration.BUILTIN_TEXTS`) resolve to
  `builtin_texts_dir`, generated text files, instead of the exllamav2 wheel that `jetserve demo prepare`
  installs. Each file is a few hundred KB of seeded sentences mixing English words, made-up words (thousands
  of distinct ones) and words in other scripts (accents, CJK, Cyrillic, Arabic, Hebrew, Thai, emoji), so
  byte-level tokenizers split characters across tokens.

`isa`: every build of our C++ extension (models/w4a8.py) this CPU can run; a test that takes it runs once per build.
`no_cpp_compiler`: the extension as where no C++ compiler is found (the "auto" fallbacks and explicit-choice errors).
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest


def _extension_isas() -> list:
    from models.w4a8 import cpu_flags

    flags = cpu_flags()
    vnni = {"avx512f", "avx512bw", "avx512vl", "avx512_vnni"}
    return [
        pytest.param("avx512_vnni", marks=pytest.mark.skipif(not vnni <= flags, reason="CPU has no AVX-512 VNNI")),
        pytest.param("avx2", marks=pytest.mark.skipif(not {"avx2", "fma", "f16c"} <= flags, reason="CPU has no AVX2")),
        "scalar",
    ]


@pytest.fixture(params=_extension_isas())
def isa(request) -> str:
    return request.param


@pytest.fixture
def no_cpp_compiler(monkeypatch):
    """The extension as on a SIMD CPU without a C++ compiler: `w4a8.load` says "no C++ compiler (test)" (its
    per-process cache cleared before and after, so real builds load again afterwards)."""
    from models import w4a8

    monkeypatch.setattr(w4a8, "build_unavailable", lambda: "no C++ compiler (test)")
    monkeypatch.setattr(w4a8, "native_isa", lambda: "avx2")  # a SIMD CPU, so "auto" tries the build
    w4a8._load.cache_clear()
    yield
    w4a8._load.cache_clear()


_ENGLISH = (
    "the of and to in is was for on that with as by at from his her their this which are were be has have had "
    "not but an or its it one all also first new after year years other city time world people state part "
    "during between many most some than more into over under about before known called used later made two "
    "three river music school house village country system model server token memory number small large"
).split()
_FOREIGN = (
    "café naïve über straße señor façade déjà mañana Zürich Ærø smörgåsbord crème brûlée "
    "中文 日本語 東京 北京 漢字 한국어 서울 русский Москва язык العربية القاهرة עברית ירושלים ไทย กรุงเทพ "
    "Ελληνικά Αθήνα हिन्दी 😀 🚀 👍🏽 👨‍👩‍👧 🇫🇷 € £ ¥ © ® ™ ° ± µ ¿ ¡ — – … “ ” ‘ ’"
).split()
_SYLLABLES = ("ka", "lo", "mi", "ner", "tos", "va", "ri", "bel", "qu", "an", "dor", "fi", "shu", "em", "plo", "zar")


def generated_text(seed: int, n_chars: int = 200_000) -> str:
    """Seeded lines of mixed-script sentences, at least `n_chars` characters long."""
    rnd = random.Random(seed)
    lines, size = [], 0
    while size < n_chars:
        words = []
        for _ in range(rnd.randint(6, 24)):
            r = rnd.random()
            if r < 0.6:
                words.append(rnd.choice(_ENGLISH))
            elif r < 0.85:
                words.append("".join(rnd.choice(_SYLLABLES) for _ in range(rnd.randint(2, 4))))
            else:
                words.append(rnd.choice(_FOREIGN))
        words[0] = words[0].capitalize()
        line = " ".join(words) + rnd.choice(".,;:!?") + (f" {rnd.randint(1, 2024)}." if rnd.random() < 0.3 else "")
        lines.append(line)
        size += len(line) + 1
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="session")
def builtin_texts_dir(tmp_path_factory) -> Path:
    """A folder laid out like exllamav2's `standard_cal_data`: `<name>.utf8` for every built-in text."""
    from models.quantize.calibration import BUILTIN_TEXTS

    d = tmp_path_factory.mktemp("builtin-texts")
    for i, name in enumerate(BUILTIN_TEXTS):
        (d / f"{name}.utf8").write_text(generated_text(seed=i), encoding="utf-8")
    return d


@pytest.fixture(scope="module", autouse=True)
def _hermetic_unit_tier(tmp_path_factory, builtin_texts_dir: Path):
    """Empty model store and generated built-in texts for the module (see the module docstring)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JETSERVE_MODEL_STORE", str(tmp_path_factory.mktemp("empty-store")))
        mp.setattr("models.quantize.calibration.wheel_data_dir", lambda: builtin_texts_dir)
        mp.setattr("models.quantize.demo.wheel_data_dir", lambda: builtin_texts_dir)
        yield
