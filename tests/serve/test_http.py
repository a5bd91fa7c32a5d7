"""The HTTP service end to end: a real uvicorn server on loopback over the tiny bundle, spoken to
over real sockets with ``http.client`` — the API contract, every kind of bad input, a forced
internal error, concurrent load, and the ``moe-rec serve`` command itself."""

from __future__ import annotations

import http.client
import json
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pyarrow.parquet as pq
import pytest
import torch
import uvicorn
from fastapi import FastAPI
from prometheus_client.parser import text_string_to_metric_families

from moe_rec.export.bundle import CATALOGUE_FILE
from moe_rec.serve.config import ServeConfig
from moe_rec.serve.http import create_app
from moe_rec.serve.recommender import Recommender

BODY_LIMIT = 16 * 1024  # small, so the 413 tests send little
MAX_K = 20  # the beam width of every decode: smaller is faster


@dataclass
class Reply:
    status: int
    data: bytes
    headers: dict[str, str]

    @property
    def text(self) -> str:
        return self.data.decode()

    @property
    def json(self) -> Any:
        return json.loads(self.text)


class Client:
    """One keep-alive HTTP/1.1 connection; JSON bodies in, :class:`Reply` out."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)

    def call(
        self, method: str, path: str, body: Any = None, *, raw: bytes | None = None,
        content_type: str | None = "application/json",
    ) -> Reply:  # fmt: skip
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        headers = {"Content-Type": content_type} if data is not None and content_type else {}
        self.conn.request(method, path, body=data, headers=headers)
        r = self.conn.getresponse()
        return Reply(r.status, r.read(), {k.lower(): v for k, v in r.getheaders()})

    def close(self) -> None:
        self.conn.close()


@contextmanager
def serving(app: FastAPI) -> Iterator[str]:
    """Run ``app`` under uvicorn on a free loopback port in a thread; yields its base URL."""
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=0, log_config=None, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@dataclass
class Served:
    url: str
    recommender: Recommender
    catalogue: dict[str, list[str]]  # service -> its item ids


@pytest.fixture(scope="module")
def served(tiny_bundle: Path) -> Iterator[Served]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # what a small shared machine serves best with (docs/serving.md)
    config = ServeConfig(device="cpu", max_batch_size=16, max_k=MAX_K, max_body_bytes=BODY_LIMIT)
    recommender = Recommender.from_bundle(tiny_bundle, config)
    rows = pq.read_table(tiny_bundle / CATALOGUE_FILE, columns=["service", "item_id"]).to_pylist()
    catalogue: dict[str, list[str]] = {}
    for row in rows:
        catalogue.setdefault(row["service"], []).append(row["item_id"])
    with serving(create_app(recommender)) as url:  # closes the recommender
        yield Served(url, recommender, catalogue)
    torch.set_num_threads(threads)


@pytest.fixture
def client(served: Served) -> Iterator[Client]:
    c = Client(served.url)
    yield c
    c.close()


def history(catalogue: dict[str, list[str]], rng: random.Random, n: int = 6) -> list[dict[str, str]]:
    services = sorted(catalogue)
    out = []
    for _ in range(n):
        s = rng.choice(services)
        out.append({"service": s, "item_id": rng.choice(catalogue[s])})
    return out


def check_answer(body: dict[str, Any], request: dict[str, Any], catalogue: dict[str, list[str]]) -> None:
    """The contract of a 200 answer: k distinct real items of the service, best first, ranked 1..k
    (these requests leave more than k items unseen)."""
    assert (
        set(body) == {"service", "items", "available", "exhausted", "latency_ms"} and body["latency_ms"] > 0
    )
    assert body["service"] == request["service"] and body["exhausted"] is False
    seen = {e["item_id"] for e in request["history"] if e["service"] == request["service"]}
    unseen = len(catalogue[request["service"]]) - (len(seen) if request.get("exclude_seen", True) else 0)
    assert body["available"] == unseen
    items = body["items"]
    ids = [it["item_id"] for it in items]
    assert len(items) == request.get("k", 10) and len(set(ids)) == len(ids)
    assert set(ids) <= set(catalogue[request["service"]])
    scores = [it["score"] for it in items]
    assert scores == sorted(scores, reverse=True)
    assert [it["rank"] for it in items] == list(range(1, len(items) + 1))
    if request.get("exclude_seen", True):
        assert not seen & set(ids)


def no_traceback(text: str) -> None:
    assert "Traceback" not in text and 'File "' not in text and ".py" not in text


# --- the contract ------------------------------------------------------------------------------


def test_recommend_matches_the_python_api(served: Served, client: Client) -> None:
    rng = random.Random(0)
    for i, service in enumerate(sorted(served.catalogue) * 2):
        request = {
            "history": history(served.catalogue, rng, n=3 + i),
            "service": service,
            "k": 1 + 3 * i,  # 1 .. 16
            "exclude_seen": i % 2 == 0,
            "user_id": f"user-{i}" if i % 3 else None,
        }
        reply = client.call("POST", "/v1/recommend", request)
        assert reply.status == 200, reply.text
        assert reply.headers["content-type"] == "application/json"
        check_answer(reply.json, request, served.catalogue)
        direct = served.recommender.recommend(**request)
        assert [it["item_id"] for it in reply.json["items"]] == [r.item_id for r in direct]
        assert [it["score"] for it in reply.json["items"]] == pytest.approx(  # other batches: fp32 noise
            [r.score for r in direct], abs=1e-4
        )
        for it, r in zip(reply.json["items"], direct):
            assert {k: it[k] for k in r.fields} == r.fields  # catalogue fields ride along
            assert {"title", "brand", "categories", "price"} <= set(it)


def test_recommend_defaults(served: Served, client: Client) -> None:
    request = {
        "history": [{"service": "grocery", "item_id": served.catalogue["grocery"][0]}],
        "service": "market",
    }
    reply = client.call("POST", "/v1/recommend", request)
    assert reply.status == 200, reply.text
    check_answer(reply.json, request, served.catalogue)  # k=10, exclude_seen=true


@pytest.mark.parametrize("unseen", [7, 5, 3, 0])
def test_a_history_covering_most_of_the_service(served: Served, client: Client, unseen: int) -> None:
    """All but ``unseen`` items seen, k=5: ``min(5, unseen)`` unseen items (the Python API's), and
    ``exhausted`` says when that is fewer than k."""
    items = sorted(served.catalogue["grocery"])
    random.Random(unseen).shuffle(items)
    request = {
        "history": [{"service": "grocery", "item_id": i} for i in items[unseen:]],
        "service": "grocery",
        "k": 5,
    }
    reply = client.call("POST", "/v1/recommend", request)
    assert reply.status == 200, reply.text
    body = reply.json
    ids = [it["item_id"] for it in body["items"]]
    assert len(ids) == min(5, unseen) and set(ids) <= set(items[:unseen])
    assert body["available"] == unseen and body["exhausted"] is (unseen < 5)
    assert ids == [r.item_id for r in served.recommender.recommend(**request)]


def test_healthz(served: Served, client: Client) -> None:
    reply = client.call("GET", "/healthz")
    assert reply.status == 200
    body = reply.json
    assert body["status"] == "ok"
    assert body["services"] == sorted(served.catalogue) == served.recommender.services
    assert (
        body["max_k"] == served.recommender.config.max_k
        and body["max_history"] == served.recommender.max_history
    )
    assert body["bundle"]["items_per_service"] == {s: len(ids) for s, ids in served.catalogue.items()}


def test_items_known_and_unknown(served: Served, client: Client) -> None:
    item_id = served.catalogue["delivery"][3]
    reply = client.call("GET", f"/v1/items/delivery/{item_id}")
    assert reply.status == 200
    assert reply.json == served.recommender.item("delivery", item_id)
    assert reply.json["service"] == "delivery" and reply.json["item_id"] == item_id and "title" in reply.json
    for path, field, words in (
        ("/v1/items/delivery/no-such-item", "item_id", "unknown item 'no-such-item'"),
        ("/v1/items/pharmacy/delivery-1", "service", "unknown service 'pharmacy'"),
    ):
        reply = client.call("GET", path)
        assert reply.status == 404, reply.text
        assert reply.json["error"] == "not_found" and reply.json["field"] == field
        assert words in reply.json["message"]


def test_unknown_route_and_method_are_json(client: Client) -> None:
    reply = client.call("GET", "/v2/nothing")
    assert reply.status == 404 and reply.json["error"] == "not_found"
    reply = client.call("GET", "/v1/recommend")
    assert reply.status == 405 and "message" in reply.json


def test_openapi_lists_the_paths(client: Client) -> None:
    reply = client.call("GET", "/openapi.json")
    assert reply.status == 200
    spec = reply.json
    assert {"/v1/recommend", "/v1/items/{service}/{item_id}", "/healthz", "/metrics"} <= set(spec["paths"])
    post = spec["paths"]["/v1/recommend"]["post"]
    assert {"200", "400", "413", "415", "422", "500"} <= set(post["responses"])
    for path, operations in spec["paths"].items():  # every documented 422 is the one shape sent
        for op in operations.values():
            if "422" in op["responses"]:
                schema = op["responses"]["422"]["content"]["application/json"]["schema"]
                assert schema == {"$ref": "#/components/schemas/InvalidRequestResponse"}, path
    assert client.call("GET", "/docs").status == 200


def test_docs_pages_load_their_assets_from_this_server(client: Client) -> None:
    """/docs and /redoc reference only this server's own files (no CDN), and each of them loads."""
    for page in ("/docs", "/redoc"):
        reply = client.call("GET", page)
        assert reply.status == 200 and reply.headers["content-type"].startswith("text/html")
        urls = re.findall(r"""(?:src|href)\s*=\s*["']([^"']+)["']""", reply.text)
        urls += re.findall(r"""url:\s*["']([^"']+)["']""", reply.text)  # Swagger UI's spec URL
        assert urls and all(u.startswith("/") and not u.startswith("//") for u in urls), urls
        assert "http://" not in reply.text.replace("http://www.w3.org", "") and "https://" not in reply.text
        for url in urls:
            asset = client.call("GET", url)
            assert asset.status == 200 and len(asset.data) > 100, url


def demo_catalogue() -> dict[str, set[str]]:
    """Item ids per service of the demo run's synthetic catalogue (configs/experiments/demo.yaml)."""
    from moe_rec.config import load_config
    from moe_rec.data.sources.synthetic import SERVICES, build_catalogue
    from moe_rec.experiment import ExperimentConfig

    root = Path(__file__).resolve().parents[2]
    cfg = load_config(ExperimentConfig, root / "configs" / "experiments" / "demo.yaml", [])
    out: dict[str, set[str]] = {}
    for row in build_catalogue(cfg.data.synthetic, SERVICES).table.select(["service", "item_id"]).to_pylist():
        out.setdefault(row["service"], set()).add(row["item_id"])
    return out


def test_openapi_examples_name_items_of_the_demo_bundle(client: Client) -> None:
    spec = client.call("GET", "/openapi.json").json
    demo = demo_catalogue()
    body = spec["paths"]["/v1/recommend"]["post"]["requestBody"]["content"]["application/json"]
    requests = [e["value"] for e in body["examples"].values()]
    assert requests
    for request in requests:
        assert request["service"] in demo
        assert all(e["item_id"] in demo[e["service"]] for e in request["history"])
    event = spec["components"]["schemas"]["HistoryEvent"]["properties"]
    for service, item in zip(event["service"]["examples"], event["item_id"]["examples"], strict=True):
        assert item in demo[service]
    request_schema = spec["components"]["schemas"]["RecommendRequest"]["properties"]
    assert all(s in demo for s in request_schema["service"]["examples"])
    params = {
        p["name"]: [e["value"] for e in p["examples"].values()]
        for p in spec["paths"]["/v1/items/{service}/{item_id}"]["get"]["parameters"]
    }
    assert params["service"]
    for service, item in zip(params["service"], params["item_id"], strict=True):
        assert item in demo[service]


Key = tuple[str, tuple[tuple[str, str], ...]]


def key(name: str, **labels: str) -> Key:
    return name, tuple(sorted(labels.items()))


def metric_samples(text: str) -> dict[Key, float]:
    """Every sample of a Prometheus text page, keyed by :func:`key`."""
    return {
        key(s.name, **s.labels): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_metrics_parse_and_move(served: Served, client: Client) -> None:
    ok = key("moe_rec_http_requests_total", endpoint="/v1/recommend", method="POST", status="200")
    bad = key("moe_rec_http_requests_total", endpoint="/v1/recommend", method="POST", status="422")
    hist = key("moe_rec_http_request_duration_seconds_count", endpoint="/v1/recommend")
    decoded = key("moe_rec_recommender_requests")
    reply = client.call("GET", "/metrics")
    assert reply.status == 200 and reply.headers["content-type"].startswith("text/plain")
    before = metric_samples(reply.text)
    request = {"history": history(served.catalogue, random.Random(1)), "service": "grocery", "k": 5}
    for _ in range(3):
        assert client.call("POST", "/v1/recommend", request).status == 200
    assert client.call("POST", "/v1/recommend", {**request, "k": 0}).status == 422
    after = metric_samples(client.call("GET", "/metrics").text)
    assert after[ok] - before.get(ok, 0) == 3
    assert after[bad] - before.get(bad, 0) == 1
    assert after[hist] - before.get(hist, 0) == 4
    assert after[decoded] - before.get(decoded, 0) == 3
    assert after[key("moe_rec_recommender_mean_batch_size")] >= 1


def test_docs_openapi_and_413_have_their_own_endpoint_labels(served: Served, client: Client) -> None:
    def count(text: str, endpoint: str, method: str, status: str) -> float:
        name = key("moe_rec_http_requests_total", endpoint=endpoint, method=method, status=status)
        return metric_samples(text).get(name, 0.0)

    docs = client.call("GET", "/docs")
    asset = re.search(r"""src\s*=\s*["']([^"']+\.js)["']""", docs.text).group(1)
    sent = [("GET", "/docs", "/docs", "200"), ("GET", "/openapi.json", "/openapi.json", "200"),
            ("GET", "/redoc", "/redoc", "200"), ("GET", asset, asset.rsplit("/", 1)[0], "200"),
            ("POST", "/v1/recommend", "/v1/recommend", "413"), ("GET", "/v2/nothing", "unmatched", "404")]  # fmt: skip
    before = client.call("GET", "/metrics").text
    for method, path, _, _ in sent:
        body = {**GOOD, "history": [GOOD["history"][0]] * 400} if method == "POST" else None  # over the limit
        assert client.call(method, path, body).status != 0
    after = client.call("GET", "/metrics").text
    for method, _, endpoint, status in sent:
        assert count(after, endpoint, method, status) - count(before, endpoint, method, status) == 1, endpoint
    assert count(after, "unmatched", "GET", "200") == 0


# --- bad input: a 4xx that names the field, never a traceback ------------------------------------

GOOD = {"history": [{"service": "grocery", "item_id": "grocery-1"}, {"service": "market", "item_id": "market-2"}],
        "service": "delivery", "k": 5}  # fmt: skip
BAD = [
    # (what, body, status, field, words in the message)
    ("unknown item", {**GOOD, "history": [GOOD["history"][0], {"service": "market", "item_id": "nope"}]},
     422, "history[1].item_id", "unknown item 'nope'"),
    ("unknown history service", {**GOOD, "history": [{"service": "pharmacy", "item_id": "x"}]},
     422, "history[0].service", "unknown service 'pharmacy'"),
    ("unknown service", {**GOOD, "service": "pharmacy"}, 422, "service", "unknown service 'pharmacy'"),
    ("empty history", {**GOOD, "history": []}, 422, "history", "at least 1"),
    ("history not a list", {**GOOD, "history": "grocery-1"}, 422, "history", "valid list"),
    ("event without item", {**GOOD, "history": [{"service": "grocery"}]}, 422, "history[0].item_id", "required"),
    ("item id a number", {**GOOD, "history": [{"service": "grocery", "item_id": 7}]},
     422, "history[0].item_id", "valid string"),
    ("k zero", {**GOOD, "k": 0}, 422, "k", "greater than or equal to 1"),
    ("k over max_k", {**GOOD, "k": MAX_K + 1}, 422, "k", f"[1, {MAX_K}]"),
    ("k a string", {**GOOD, "k": "5"}, 422, "k", "valid integer"),
    ("k a float", {**GOOD, "k": 2.5}, 422, "k", "valid integer"),
    ("exclude_seen a string", {**GOOD, "exclude_seen": "yes"}, 422, "exclude_seen", "valid boolean"),
    ("user_id a number", {**GOOD, "user_id": 12}, 422, "user_id", "valid string"),
    ("missing service", {"history": GOOD["history"]}, 422, "service", "required"),
    ("unknown field", {**GOOD, "exclude_sen": False}, 422, "exclude_sen", "not permitted"),
    ("empty critique", {**GOOD, "critique": "  "}, 422, "critique", "must hold words"),
    ("critique a number", {**GOOD, "critique": 3}, 422, "critique", "valid string"),
    ("critique too long", {**GOOD, "critique": "x" * 501}, 422, "critique", "at most 500"),
    ("critique to a model without text", {**GOOD, "critique": "cheaper"}, 422, "critique", "no text"),
    ("explain from a model without text", {**GOOD, "explain": True}, 422, "explain", "no text"),
    ("explain a string", {**GOOD, "explain": "yes"}, 422, "explain", "valid boolean"),
    ("body a list", [GOOD], 422, "body", "valid dictionary"),
]  # fmt: skip


@pytest.mark.parametrize(("what", "body", "status", "field", "words"), BAD, ids=[b[0] for b in BAD])
def test_bad_request(client: Client, what: str, body: Any, status: int, field: str, words: str) -> None:
    """Every 422 has one shape, the schema's: each problem in ``errors``, joined in ``message``, the
    first one's ``field`` (whether pydantic or the Recommender found it)."""
    reply = client.call("POST", "/v1/recommend", body)
    assert reply.status == status, reply.text
    got = reply.json
    assert got["field"] == field and words in got["message"], got
    assert got["error"] == "invalid_request"
    assert set(got) == {"error", "message", "field", "errors"}
    assert got["errors"][0]["field"] == field and all(set(e) == {"field", "message"} for e in got["errors"])
    assert got["message"] == "; ".join(f"{e['field']}: {e['message']}" for e in got["errors"])
    schema = client.call("GET", "/openapi.json").json["components"]["schemas"]["InvalidRequestResponse"]
    assert set(schema["properties"]) == set(got) and set(schema["required"]) == {"error", "message", "errors"}
    no_traceback(reply.text)


def test_empty_and_invalid_json_are_400(client: Client) -> None:
    for raw, words in ((b'{"history": [', "not valid JSON"), (b"not json", "not valid JSON"),
                       (b'{"k": 1,}', "not valid JSON"), (b"", "body is empty"), (b"  \n", "not valid JSON")):  # fmt: skip
        reply = client.call("POST", "/v1/recommend", raw=raw)
        assert reply.status == 400, reply.text
        assert reply.json == {"error": "invalid_json", "message": reply.json["message"], "field": "body"}
        assert words in reply.json["message"]
        no_traceback(reply.text)


def test_a_body_not_sent_as_json_is_415(served: Served, client: Client) -> None:
    raw = json.dumps(GOOD).encode()
    for content_type in ("text/plain", "application/x-www-form-urlencoded", None, "application/xml"):
        reply = client.call("POST", "/v1/recommend", raw=raw, content_type=content_type)
        assert reply.status == 415, (content_type, reply.text)
        assert reply.json["error"] == "unsupported_media_type" and reply.json["field"] == "body"
        assert "Content-Type: application/json" in reply.json["message"]
    for content_type in ("application/json; charset=utf-8", "application/vnd.api+json"):
        assert client.call("POST", "/v1/recommend", raw=raw, content_type=content_type).status == 200


def test_body_over_the_limit_is_413(served: Served, client: Client) -> None:
    events = [{"service": "grocery", "item_id": "grocery-1"}] * 400  # ~18 KB > 16 KiB
    reply = client.call("POST", "/v1/recommend", {**GOOD, "history": events})
    assert reply.status == 413, reply.text
    assert reply.json["error"] == "too_large" and f"{BODY_LIMIT:,} bytes" in reply.json["message"]
    assert client.call("GET", "/healthz").status == 200  # the connection is still usable
    # a declared length far over the limit is refused before the body is read
    parts = urlsplit(served.url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    conn.putrequest("POST", "/v1/recommend")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Content-Length", str(1 << 30))
    conn.endheaders(b'{"history": [')
    r = conn.getresponse()
    assert r.status == 413 and json.loads(r.read())["field"] == "body"
    conn.close()


def test_history_longer_than_max_history_is_fine(served: Served, client: Client) -> None:
    request = {"history": history(served.catalogue, random.Random(2), n=served.recommender.max_history + 5),
               "service": "market", "k": 3}  # fmt: skip
    reply = client.call("POST", "/v1/recommend", request)
    assert reply.status == 200, reply.text
    assert [it["item_id"] for it in reply.json["items"]] == [
        r.item_id for r in served.recommender.recommend(**request)
    ]


# --- a server error: 500, an error id, no details ------------------------------------------------


class BrokenRecommender(Recommender):
    """A real Recommender whose model call fails with an internal detail in the message."""

    def answer(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("secret internal detail at /srv/model.py")


def test_internal_error_is_a_bare_500(tiny_bundle: Path, caplog: pytest.LogCaptureFixture) -> None:
    broken = BrokenRecommender.from_bundle(tiny_bundle, ServeConfig(device="cpu"))
    with serving(create_app(broken)) as url:
        c = Client(url)
        reply = c.call("POST", "/v1/recommend", GOOD)
        assert reply.status == 500
        body = reply.json
        assert body["error"] == "internal_error" and body["message"] == "internal server error"
        assert re.fullmatch(r"[0-9a-f]{12}", body["error_id"])
        assert "secret" not in reply.text
        no_traceback(reply.text)
        assert c.call("GET", "/healthz").status == 200  # the server lives on
        c.close()
    logged = [r for r in caplog.records if body["error_id"] in r.getMessage()]
    assert logged and logged[0].exc_info and "secret internal detail" in str(logged[0].exc_info[1])


# --- concurrent load -----------------------------------------------------------------------------


@pytest.mark.slow
def test_concurrent_load(served: Served) -> None:
    """8 clients x 200 requests: every answer valid, no errors, and requests share batches."""
    clients, per_client = 8, 200
    failures: list[str] = []
    before = served.recommender.stats()

    def drive(seed: int) -> None:
        rng, c = random.Random(seed), Client(served.url)
        try:
            for _ in range(per_client):
                request = {"history": history(served.catalogue, rng, n=rng.randint(1, 12)),
                           "service": rng.choice(sorted(served.catalogue)), "k": rng.randint(1, 20)}  # fmt: skip
                reply = c.call("POST", "/v1/recommend", request)
                if reply.status != 200:
                    failures.append(f"{reply.status} {reply.text}")
                    continue
                check_answer(reply.json, request, served.catalogue)
        except Exception as e:  # noqa: BLE001 - report it from the main thread
            failures.append(repr(e))
        finally:
            c.close()

    threads = [threading.Thread(target=drive, args=(seed,)) for seed in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, failures[:3]
    after = served.recommender.stats()
    requests, batches = after["requests"] - before["requests"], after["batches"] - before["batches"]
    assert requests == clients * per_client
    assert requests / batches > 1.5  # concurrent requests were decoded together


# --- the command -------------------------------------------------------------------------------


@pytest.mark.slow  # a fresh process imports torch and loads the bundle: ~10 s
@pytest.mark.parametrize("inherited_sigint", [signal.SIG_DFL, signal.SIG_IGN], ids=["default", "ignored"])
def test_cli_serve(tiny_bundle: Path, inherited_sigint: signal.Handlers) -> None:
    """``moe-rec serve BUNDLE --port 0`` logs its URL, answers, and shuts down cleanly on SIGINT with
    the interrupt's exit code, also when started with SIGINT ignored (as ``cmd &`` in a script)."""
    cmd = [sys.executable, "-m", "moe_rec.cli", "serve", str(tiny_bundle), "--port", "0", "--device", "cpu"]
    proc = subprocess.Popen(
        cmd,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, inherited_sigint),
    )
    lines: list[str] = []
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line)
            if found := re.search(r"moe-rec serving at (http://127\.0\.0\.1:\d+)", line):
                url = found.group(1)
                break
        else:
            pytest.fail(f"no startup line: {''.join(lines)}")
        c = Client(url)
        reply = c.call("GET", "/healthz")
        assert reply.status == 200 and reply.json["services"] == ["delivery", "grocery", "market"]
        assert c.call("POST", "/v1/recommend", GOOD).status == 200
        c.close()
        proc.send_signal(signal.SIGINT)
        rest = proc.stderr.read()
        assert proc.wait(timeout=60) == 130, "".join(lines) + rest  # the CLI's code for an interrupt
        assert "closing the recommender" in rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# --- the docs page in a real browser -----------------------------------------------------------

TOOL = Path(__file__).resolve().parents[2] / "tools" / "check_docs_page.py"


@pytest.mark.slow  # a server process and two headless Chromium runs: ~15 s
@pytest.mark.skipif(
    not any(shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome")),
    reason="needs Chromium (Debian: apt-get install chromium)",
)
def test_docs_page_renders_offline_in_chromium(tiny_bundle: Path, tmp_path: Path) -> None:
    """tools/check_docs_page.py: ``moe-rec serve`` on 127.0.0.1, /docs in headless Chromium with every
    other host unresolvable; the rendered page has one block per operation of /openapi.json."""
    shot = tmp_path / "docs.png"
    cmd = [sys.executable, str(TOOL), str(tiny_bundle), "--screenshot", str(shot)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    for operation in (
        "POST   /v1/recommend: ok",
        "GET    /v1/items/{service}/{item_id}: ok",
        "GET    /healthz: ok",
    ):
        assert operation in done.stdout, done.stdout
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
