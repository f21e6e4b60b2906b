"""`ct-edge serve` over real HTTP: the bearer token (everything but health and the page is
guarded), CORS, /metrics in the Prometheus text format, and the browser page with its assets."""

from __future__ import annotations

import json
import re
from pathlib import Path

from server_helpers import PNG, TOKEN, Running, raw_exchange, serving

from ct_edge import DISCLAIMER
from ct_edge.classifier import Classifier

# --- auth, CORS, metrics, the page ---------------------------------------------------------------


def test_token_guards_everything_but_health_and_the_page(classifier: Classifier,
                                                          tmp_path: Path) -> None:
    with serving(classifier, tmp_path / "data", token=TOKEN) as api:
        for method, path, body in [("GET", "/v1/results", None), ("POST", "/v1/classify", PNG),
                                   ("GET", "/v2", None), ("GET", "/v2/models/ct-edge", None),
                                   ("POST", "/v2/models/ct-edge/infer", b"{}"),
                                   ("GET", "/metrics", None), ("GET", "/v1/results/1", None),
                                   ("GET", "/v1/series", None), ("GET", "/v1/series/1", None),
                                   ("GET", "/nowhere", None)]:
            for headers in ({}, {"Authorization": "Bearer wrong-token-xx"},
                            {"Authorization": TOKEN}, {"Authorization": f"Basic {TOKEN}"}):
                status, answer_headers, answer = api.request(method, path, body, headers)
                assert status == 401, (method, path, headers)
                assert answer_headers["www-authenticate"].startswith("Bearer")
                assert "bearer token" in json.loads(answer)["error"]
        # An unauthenticated upload is refused from its headers alone, never read.
        reply = raw_exchange(api, b"POST /v1/classify HTTP/1.1\r\nHost: x\r\n"
                                  b"Content-Length: 30000000\r\n\r\n")
        assert reply.startswith(b"HTTP/1.1 401 ") and b"Connection: close" in reply
        good = {"Authorization": f"Bearer {TOKEN}"}
        assert api.request("POST", "/v1/classify", PNG, good)[0] == 200
        assert api.request("GET", "/v1/results", None, good)[0] == 200
        assert api.request("GET", "/v1/series", None, good)[0] == 200
        assert api.store.count() == 1  # refused requests stored nothing
        for path in ("/v2/health/live", "/v2/health/ready", "/", "/static/app.js"):
            assert api.request("GET", path)[0] == 200, path


def test_cors_preflight_and_origin_header(api: Running) -> None:
    status, headers, _ = api.request("OPTIONS", "/v1/classify",
                                     headers={"Origin": "https://viewer.example",
                                              "Access-Control-Request-Method": "POST"})
    assert status == 204
    assert "Authorization" in headers["access-control-allow-headers"]
    assert headers["access-control-allow-origin"] == "https://viewer.example"
    _, headers, _ = api.request("GET", "/v2", headers={"Origin": "https://viewer.example"})
    assert headers["access-control-allow-origin"] == "https://viewer.example"
    _, headers, _ = api.request("GET", "/v2", headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in headers


def test_metrics_in_prometheus_text_format(api: Running, classifier: Classifier) -> None:
    api.request("POST", "/v1/classify", PNG)
    api.request("POST", "/v1/classify", b"text")
    status, headers, body = api.request("GET", "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain; version=0.0.4")
    text = body.decode()
    assert re.search(r'^ct_edge_requests_total\{endpoint="classify",method="POST",status="200"\} '
                     r"[1-9]", text, re.M)
    assert 'status="415"' in text
    buckets = [int(v) for v in re.findall(
        r'^ct_edge_request_seconds_bucket\{endpoint="classify",le="[^"]+"\} (\d+)', text, re.M)]
    assert buckets == sorted(buckets) and buckets[-1] >= 2
    assert re.search(r"^ct_edge_queue_depth 0$", text, re.M)
    assert f'artifact_sha256="{classifier.artifact.sha256}"' in text
    for line in text.splitlines():
        assert line.startswith("#") or re.fullmatch(r'[a-z_]+(\{[^}]*\})? [0-9.e+-]+', line), line


def test_the_page_and_its_assets(api: Running) -> None:
    status, headers, body = api.request("GET", "/")
    assert status == 200 and headers["content-type"].startswith("text/html")
    page = body.decode()
    assert DISCLAIMER in page and "{{" not in page
    assert "default-src 'self'" in headers["content-security-policy"]
    # No CDN: every script and stylesheet is served by the package itself.
    assert not re.search(r'(src|href)="(https?:)?//', page)
    for asset in re.findall(r'(?:src|href)="(/static/[^"]+)"', page):
        assert api.request("GET", asset)[0] == 200, asset
    assert api.request("GET", "/static/nothing.js")[0] == 404
    assert api.request("GET", "/static/..%2Fapp.py")[0] == 404


def test_the_page_says_each_status_in_the_words_of_the_cli(api: Running) -> None:
    from ct_edge import STATUS_WORDS

    status, _, body = api.request("GET", "/static/app.js")
    assert status == 200
    tags = re.search(r"const names = (\{[^}]*\})", body.decode()).group(1)
    assert json.loads(re.sub(r"(\w+):", r'"\1":', tags)) == STATUS_WORDS
