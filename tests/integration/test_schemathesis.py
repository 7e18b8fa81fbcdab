"""Property-based fuzzing of the HTTP API with schemathesis (`st run`) against a real server.

The schema is the server's own /openapi.json. The generation routes parse their JSON body by hand; if the
schema lacks their request body, the test adds the pydantic request models' JSON schema before fuzzing
(positive and negative cases). Checks: no 5xx (`not_a_server_error`), every request answered within
`--max-response-time`, and every 4xx OpenAI-shaped (checked from the recorded cassette).

CI runs `JETSERVE_FUZZ_EXAMPLES` (default 200) examples per operation and the phases in
`JETSERVE_FUZZ_PHASES` (default examples,fuzzing); the published >= 1000-case figure
(docs/reliability.md) comes from the same test with a larger value.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.slow

BODY_MODELS = {"/v1/chat/completions": "ChatCompletionRequest", "/v1/completions": "CompletionRequest"}


def openapi_with_bodies(raw: dict) -> dict:
    """`raw` with a JSON request-body schema on every generation route that lacks one."""
    from server.api import protocol

    schemas = raw.setdefault("components", {}).setdefault("schemas", {})
    for path, model_name in BODY_MODELS.items():
        op = raw["paths"].get(path, {}).get("post")
        if op is None or "requestBody" in op:
            continue
        js = getattr(protocol, model_name).model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(js.pop("$defs", {}))
        schemas[model_name] = js
        op["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{model_name}"}}},
        }
    return raw


def run_schemathesis(
    base_url: str,
    workdir: Path,
    examples: int,
    *,
    seed: int = 1,
    timeout_s: float = 900,
    phases: str = "examples,coverage,fuzzing",
) -> dict:
    """Run `st run` on the augmented schema; return counts of cases, statuses, and failures."""
    raw = httpx.get(base_url + "/openapi.json", timeout=30, trust_env=False).json()
    schema_path = workdir / "openapi.json"
    schema_path.write_text(json.dumps(openapi_with_bodies(raw)))
    cassette = workdir / "cassette.yaml"
    st = Path(sys.executable).with_name("st")
    cmd = [
        str(st),
        "run",
        str(schema_path),
        "--url",
        base_url,
        "--checks",
        "not_a_server_error",
        "--max-examples",
        str(examples),
        "--seed",
        str(seed),
        "--mode",
        "all",
        "--workers",
        "2",
        "--request-timeout",
        "30",
        "--max-response-time",
        "30",
        "--generation-database",
        "none",
        "--phases",
        phases,
        "--report",
        "vcr",
        "--report-vcr-path",
        str(cassette),
        "--no-color",
        "--suppress-health-check",
        "all",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, cwd=workdir)
    statuses: dict = {}
    unshaped = []
    import yaml

    doc = yaml.safe_load(cassette.read_text()) if cassette.exists() else {"http_interactions": []}
    for it in doc.get("http_interactions") or []:
        resp = it.get("response") or {}
        code = int((resp.get("status") or {}).get("code", 0))
        statuses[code] = statuses.get(code, 0) + 1
        if 400 <= code < 600:
            body = (resp.get("body") or {}).get("string") or ""
            try:
                err = json.loads(body).get("error")
                ok = isinstance(err, dict) and isinstance(err.get("message"), str) and isinstance(err.get("type"), str)
            except (ValueError, AttributeError):
                ok = False
            if not ok:
                unshaped.append((it.get("request", {}).get("uri"), code, body[:200]))
    return {
        "returncode": proc.returncode,
        "cases": sum(statuses.values()),
        "statuses": statuses,
        "unshaped": unshaped,
        "stdout": proc.stdout[-6000:],
        "stderr": proc.stderr[-3000:],
    }


def test_schemathesis_no_5xx(server, tmp_path):
    examples = int(os.environ.get("JETSERVE_FUZZ_EXAMPLES", "200"))
    # The coverage phase is off by default: schemathesis/hypothesis intermittently dies inside it with
    # "SystemError: AST constructor recursion depth mismatch" (a client-side error, not a server response).
    phases = os.environ.get("JETSERVE_FUZZ_PHASES", "examples,fuzzing")
    res = run_schemathesis(server.base_url, tmp_path, examples, phases=phases)
    print(json.dumps({k: v for k, v in res.items() if k not in ("stdout", "stderr")}, default=str))
    assert res["cases"] >= examples // 2, res["stdout"]  # sanity floor: the run really generated cases
    assert not any(code >= 500 for code in res["statuses"]), (res["statuses"], res["stdout"])
    assert res["returncode"] == 0, res["stdout"] + res["stderr"]
    assert not res["unshaped"], res["unshaped"][:5]
    assert httpx.get(server.base_url + "/health", trust_env=False).status_code == 200


@pytest.fixture(scope="module")
def server(start_server, tmp_path_factory, tiny_llama_dir):
    """The shared real-uvicorn server over a copy of the tiny Llama (64-token context keeps generations short)."""
    store = tmp_path_factory.mktemp("fuzz-store")
    shutil.copytree(tiny_llama_dir, store / "tiny")
    with start_server(model_store=store, model="tiny", max_context=64, max_batch_size=4, max_queue=64) as srv:
        yield srv
