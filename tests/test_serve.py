"""`astra-ds serve`: answers equal to model.predict and model.encode, concurrent requests batched, every bad input
its status and a message naming the field, overload answered 503, reloads under load that lose no request and
fail without harm, SIGHUP, SIGTERM draining, digests verified once per model version, and inference that imports
only what it needs."""

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest
import uvicorn
from hypothesis import given, settings
from hypothesis import strategies as st

import astra_ds
from astra_ds.serve.batcher import Batcher, Overloaded
from astra_ds.serve.requests import ClientError, Limits, k_of, parse_body, texts_of, unknown_fields
from astra_ds.cli.main import main
from astra_ds.serve.server import ServeSettings, bind, build_app, load_warm
from conftest import REPO, fresh_process_env

TEXTS = ["w12 w7 w301", "w5 w5 w88 w91", "w400", "w3 w250 w17 w9 w100 w2"]


@pytest.fixture(scope="module")
def run_dir(finished_run):
    return finished_run


@pytest.fixture(scope="module")
def reference(run_dir):
    return astra_ds.load(run_dir)


class LiveServer:
    """The app on uvicorn in a thread of this process, on a free loopback port."""

    def __init__(self, settings: ServeSettings, loader=load_warm):
        sock = bind("127.0.0.1", 0)
        self.url = "http://127.0.0.1:%d" % sock.getsockname()[1]
        self.fatal = []
        self.app = build_app(settings, on_fatal=self.fatal.append, loader=loader)
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_config=None, log_level="warning", lifespan="on",
                                                    timeout_graceful_shutdown=settings.drain_s))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        self.client = httpx.Client(base_url=self.url, timeout=60)

    def wait_ready(self) -> "LiveServer":
        deadline = time.time() + 60
        while self.client.get("/readyz").status_code != 200:
            assert not self.fatal and time.time() < deadline, self.fatal
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        self.client.close()
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture(scope="module")
def live(run_dir):
    server = LiveServer(ServeSettings(str(run_dir), max_batch=8, max_wait_ms=20,
                                      limits=Limits(max_texts=8, max_chars=100, max_body_bytes=4096))).wait_ready()
    yield server
    server.stop()


def _metric(text: str, name: str, **labels) -> float:
    selector = ",".join(f'{key}="{value}"' for key, value in labels.items())
    match = re.search(rf"^{name}{{{selector}}} (\S+)$" if labels else rf"^{name} (\S+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


def test_answers_equal_the_models_own(live, reference):
    for k in (1, 3, 7):
        response = live.client.post("/v1/predict", json={"texts": TEXTS, "k": k})
        assert response.status_code == 200
        expected = reference.predict(TEXTS, k)
        answers = response.json()["predictions"]
        assert [answer["ids"] for answer in answers] == expected.ids.tolist()
        assert [answer["names"] for answer in answers] == expected.names
        np.testing.assert_allclose([answer["scores"] for answer in answers], expected.scores, rtol=1e-5, atol=1e-6)
    response = live.client.post("/v1/encode", json={"texts": TEXTS})
    np.testing.assert_allclose(response.json()["embeddings"], reference.encode(TEXTS), atol=1e-5)
    card = live.client.get("/v1/model").json()
    assert (card["num_labels"], card["dim"], card["step"]) == (reference.num_labels, reference.card.dim,
                                                               reference.card.step)
    assert card["version"] == reference.description()["version"] and card["index"] != "exact"
    assert live.client.get("/healthz").json() == {"status": "alive"}


def test_concurrent_requests_are_batched_and_each_gets_its_own_answer(live, reference):
    before = live.client.get("/metrics").text
    answers = {}

    def ask(i):
        with httpx.Client(base_url=live.url) as client:
            answers[i] = client.post("/v1/predict", json={"texts": [TEXTS[i % 4]], "k": 1 + i % 3}).json()

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for i, answer in answers.items():
        assert answer["predictions"][0]["ids"] == reference.predict([TEXTS[i % 4]], 1 + i % 3).ids[0].tolist()
    after = live.client.get("/metrics").text
    batches = _metric(after, "astra_ds_batch_texts_count") - _metric(before, "astra_ds_batch_texts_count")
    texts = _metric(after, "astra_ds_batch_texts_sum") - _metric(before, "astra_ds_batch_texts_sum")
    assert texts == 12 and batches < 12  # several requests shared a forward
    assert _metric(after, "astra_ds_requests_total", endpoint="/v1/predict", status="200") >= 12
    assert "astra_ds_queue_texts 0.0" in after and "astra_ds_request_seconds_bucket" in after


@pytest.mark.parametrize("body, status, field, words", [
    (b"{not json", 400, None, "not JSON"),
    (b"[1, 2]", 400, None, "JSON object, not array"),
    (b'{"k": 3}', 400, "texts", "required"),
    (b'{"texts": "one text"}', 400, "texts", "list of strings, not string"),
    (b'{"texts": []}', 400, "texts", "at least one"),
    (b'{"texts": ["a", 7]}', 400, "texts[1]", "string, not int"),
    (b'{"texts": ["a", "  "]}', 400, "texts[1]", "empty"),
    (b'{"texts": ["a"], "k": "5"}', 400, "k", "integer, not string"),
    (b'{"texts": ["a"], "k": true}', 400, "k", "integer, not boolean"),
    (b'{"texts": ["a"], "k": 0}', 400, "k", "between 1 and the model's 50 labels, not 0"),
    (b'{"texts": ["a"], "k": 51}', 400, "k", "not 51"),
    (b'{"texts": ["a"], "top_k": 3}', 400, "top_k", "not a field"),
    (json.dumps({"texts": ["a"] * 9}).encode(), 413, "texts", "9 texts, at most 8"),
    (json.dumps({"texts": ["a" * 101]}).encode(), 413, "texts[0]", "101 characters, at most 100"),
    (json.dumps({"texts": ["a"], "pad": "x" * 5000}).encode(), 413, None, "at most 4096"),
])
def test_a_bad_request_gets_its_status_and_names_the_field(live, body, status, field, words):
    response = live.client.post("/v1/predict", content=body)
    assert response.status_code == status
    error = response.json()["error"]
    assert error["status"] == status and error["field"] == field and words in error["message"]


def test_unknown_paths_and_methods_answer_json(live):
    assert live.client.get("/v1/nothing").json()["error"]["status"] == 404
    response = live.client.get("/v1/predict")
    assert response.status_code == 405 and response.json()["error"]["status"] == 405
    metrics = live.client.get("/metrics").text
    assert _metric(metrics, "astra_ds_request_errors_total", endpoint="other", kind="not_found") >= 1


def test_request_checks_without_a_server():
    limits = Limits(max_texts=2, max_chars=5)
    assert texts_of(parse_body(b'{"texts": ["ab", "cd"]}', limits), limits) == ["ab", "cd"]
    for body, field, words in ((b'{"texts": ["ab", "\\ud800"]}', "texts[1]", "lone surrogate"),
                               (b"[" * 2000 + b"]" * 2000, None, "nested too deeply")):
        with pytest.raises(ClientError) as err:
            texts_of(parse_body(body, Limits()), limits)
        assert (err.value.status, err.value.field) == (400, field) and words in err.value.message
    assert k_of({}, 10) == 5 and k_of({"k": 10}, 10) == 10
    with pytest.raises(ClientError) as err:
        k_of({"k": 2.5}, 10)
    assert (err.value.status, err.value.field) == (400, "k")


class FakeModel:
    """encode_tokens counts its calls and takes `seconds`; a text's embedding is [its length]."""

    def __init__(self, seconds=0.0):
        self.seconds, self.batches = seconds, []

    def tokenize(self, texts):
        return texts

    def encode_tokens(self, texts):
        self.batches.append(list(texts))
        time.sleep(self.seconds)
        import torch

        return torch.tensor([[float(len(text))] for text in texts]), None


def test_batcher_gathers_waiting_requests_up_to_max_batch_and_refuses_beyond_max_queue():
    model = FakeModel(seconds=0.2)

    async def scenario():
        batcher = Batcher(max_batch=3, max_wait_s=0.0, max_queue=4)
        batcher.start()
        first = asyncio.ensure_future(batcher.submit(model, ["a"], None))
        await asyncio.sleep(0.05)  # the model is busy with the first
        waiting = [asyncio.ensure_future(batcher.submit(model, [text], None)) for text in ("bb", "ccc", "dddd", "eeeee")]
        await asyncio.sleep(0)
        with pytest.raises(Overloaded):
            await batcher.submit(model, ["f"], None)  # 4 texts queued already
        results = await asyncio.gather(first, *waiting)
        await batcher.stop()
        return results

    results = asyncio.run(scenario())
    assert [result[0, 0] for result in results] == [1, 2, 3, 4, 5]
    assert model.batches == [["a"], ["bb", "ccc", "dddd"], ["eeeee"]]


def test_overload_and_loading_answer_503_with_retry_after(run_dir):
    loaded = threading.Event()

    def slow_loader(*args):
        loaded.wait(30)
        model = load_warm(*args)
        encode = model.encode_tokens
        model.encode_tokens = lambda tokens: (time.sleep(0.5), encode(tokens))[1]
        return model

    server = LiveServer(ServeSettings(str(run_dir), max_batch=1, max_wait_ms=0, max_queue=1), slow_loader)
    try:
        assert server.client.get("/healthz").status_code == 200
        for path in ("/readyz", "/v1/model"):
            response = server.client.get(path)
            assert response.status_code == 503 and response.headers["retry-after"] == "1"
        assert "loading" in server.client.post("/v1/predict", json={"texts": ["a"]}).json()["error"]["message"]
        loaded.set()
        server.wait_ready()
        statuses = []

        def ask():
            with httpx.Client(base_url=server.url, timeout=30) as client:
                response = client.post("/v1/predict", json={"texts": ["w1 w2"]})
                statuses.append((response.status_code, response.headers.get("retry-after")))

        threads = [threading.Thread(target=ask) for _ in range(4)]
        for thread in threads:  # one computing, one queued, the others beyond the queue
            thread.start()
            time.sleep(0.1)
        for thread in threads:
            thread.join()
        assert sorted(statuses) == [(200, None), (200, None), (503, "1"), (503, "1")]
    finally:
        server.stop()


def test_a_reload_under_load_loses_no_request_and_a_failed_one_keeps_the_old_model(live, run_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    damaged = tmp_path / "damaged"
    shutil.copytree(run_dir, damaged)
    with open(damaged / "encoder.pt", "r+b") as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 1]))
    statuses, stop = [], threading.Event()

    def hammer():
        with httpx.Client(base_url=live.url, timeout=60) as client:
            while not stop.is_set():
                statuses.append(client.post("/v1/predict", json={"texts": TEXTS[:2], "k": 3}).status_code)

    threads = [threading.Thread(target=hammer) for _ in range(8)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(0.3)
        response = live.client.post("/v1/reload", json={"run_dir": str(copy)})
        assert response.status_code == 200 and response.json()["model"]["run_dir"] == str(copy.resolve())
        for bad, words in ((damaged, "encoder.pt missing or changed"), (tmp_path / "none", "no run at")):
            response = live.client.post("/v1/reload", json={"run_dir": str(bad)})
            assert response.status_code == 422
            assert "still serving the old model" in response.json()["error"]["message"]
            assert words in response.json()["error"]["message"]
        time.sleep(0.3)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert len(statuses) > 16 and set(statuses) == {200}
    assert live.client.get("/v1/model").json()["run_dir"] == str(copy.resolve())
    metrics = live.client.get("/metrics").text
    assert _metric(metrics, "astra_ds_reloads_total", outcome="failed") == 2
    response = live.client.post("/v1/reload", content=b"")  # back to the fixture's run: the body is optional
    assert response.status_code == 200 and response.json()["model"]["run_dir"] == str(copy.resolve())


def test_the_command_reloads_on_sighup_and_drains_on_sigterm(run_dir, tmp_path):
    """A request waiting in the batcher when SIGTERM comes is answered; the command then exits 0."""
    log = open(tmp_path / "serve.log", "w+")
    server = subprocess.Popen([sys.executable, "-m", "astra_ds", "serve", "--run-dir", str(run_dir), "--port", "0",
                               "--max-wait-ms", "1500"], stderr=log, cwd=REPO, env=fresh_process_env())
    try:
        deadline = time.time() + 60
        while not (match := re.search(r"listening on (http://\S+),", (tmp_path / "serve.log").read_text())):
            assert server.poll() is None and time.time() < deadline
            time.sleep(0.1)
        url = match.group(1)
        while "serving" not in (tmp_path / "serve.log").read_text():
            assert server.poll() is None and time.time() < deadline
            time.sleep(0.1)
        server.send_signal(signal.SIGHUP)
        while (tmp_path / "serve.log").read_text().count("serving") < 2:
            assert server.poll() is None and time.time() < deadline
            time.sleep(0.1)
        answer = {}
        asking = threading.Thread(target=lambda: answer.update(
            response=httpx.post(f"{url}/v1/predict", json={"texts": ["w1 w2"]}, timeout=30)))
        asking.start()
        time.sleep(0.5)  # the request waits in the batcher (max wait 1.5 s)
        server.send_signal(signal.SIGTERM)
        asking.join()
        assert server.wait(30) == 0
    finally:
        if server.poll() is None:
            server.kill()
    assert answer["response"].status_code == 200
    assert len(answer["response"].json()["predictions"][0]["ids"]) == 5
    assert "stopped: the requests in flight were answered" in (tmp_path / "serve.log").read_text()


def test_a_damaged_run_ends_the_command_in_one_line(run_dir, tmp_path, capsys):
    damaged = tmp_path / "damaged"
    shutil.copytree(run_dir, damaged)
    (damaged / "label_names.txt").write_text("changed")
    assert main(["serve", "--run-dir", str(damaged), "--port", "0"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"astra-ds: error: {damaged} is damaged: label_names.txt missing or changed since training wrote them")
    assert main(["serve", "--run-dir", str(run_dir), "--max-batch", "0"]) == 2
    assert capsys.readouterr().err.strip() == "astra-ds: error: --max-batch must be >= 1, not 0"


def test_digests_are_read_once_per_model_version(run_dir, tmp_path, monkeypatch):
    from astra_ds import digests
    from astra_ds.rundir.run_dir import RunDir

    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    reads = []
    real_digest = digests.file_digest
    monkeypatch.setattr(digests, "file_digest", lambda path: (reads.append(path), real_digest(path))[1])
    RunDir(copy).read_card()
    assert len(reads) > 3  # every model file, once
    reads.clear()
    RunDir(copy).read_card()
    assert reads == []  # the same files: not read again
    moved = tmp_path / "moved"
    shutil.copytree(copy, moved)  # other inodes: read again
    RunDir(moved).read_card()
    assert len(reads) > 3
    with open(copy / "label_names.txt", "r+b") as f:  # the same size, other bytes
        first = f.read(1)
        f.seek(0)
        f.write(b"X" if first != b"X" else b"Y")
    with pytest.raises(astra_ds.errors.UserError, match="label_names.txt missing or changed"):
        RunDir(copy).read_card()
    assert os.environ["ASTRA_DS_CACHE"]  # the tests' own cache (conftest), not the user's


def test_inference_imports_neither_deepspeed_nor_transformers_modeling_code(run_dir):
    code = ("import sys, astra_ds; model = astra_ds.load(sys.argv[1]); model.predict(['w1 w2'], 3); "
            "print(sorted(m for m in sys.modules if m.startswith(('transformers.models.', 'deepspeed'))))")
    result = subprocess.run([sys.executable, "-c", code, str(run_dir)], capture_output=True, text=True,
                            env=fresh_process_env(), timeout=300)
    assert result.returncode == 0, result.stderr
    assert "modeling_bert" not in result.stdout and "deepspeed" not in result.stdout, result.stdout


def test_a_bug_answers_500_with_its_message_and_the_server_goes_on(run_dir):
    def failing_loader(*args):
        model = load_warm(*args)
        rank = model.rank
        model.rank = lambda queries, calibration, k, *rest: (rank(queries, calibration, k, *rest) if k != 2
                                                             else 1 / 0)
        return model

    server = LiveServer(ServeSettings(str(run_dir)), failing_loader).wait_ready()
    try:
        response = server.client.post("/v1/predict", json={"texts": ["w1"], "k": 2})
        assert response.status_code == 500
        assert response.json()["error"]["message"] == "internal error: division by zero"
        assert server.client.post("/v1/predict", json={"texts": ["w1"], "k": 3}).status_code == 200
        metrics = server.client.get("/metrics").text
        assert _metric(metrics, "astra_ds_request_errors_total", endpoint="/v1/predict", kind="internal") == 1
    finally:
        server.stop()


def test_a_malformed_request_fails_alone_while_concurrent_ones_are_answered(live, reference):
    expected = reference.predict(TEXTS[:2], k=3)
    bad = [b'{"texts": ["w1", "\\ud800 w2"]}', b"[" * 2000 + b"]" * 2000, b'{"texts": ["w1"], "k": 0}']
    answers = {}

    def ask(i):
        with httpx.Client(base_url=live.url, timeout=60) as client:
            if i < len(bad):
                answers[i] = client.post("/v1/predict", content=bad[i])
            else:
                answers[i] = client.post("/v1/predict", json={"texts": TEXTS[:2], "k": 3})

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(24)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [answers[i].status_code for i in range(len(bad))] == [400, 400, 400]
    for i in range(len(bad), 24):
        assert answers[i].status_code == 200
        assert [p["ids"] for p in answers[i].json()["predictions"]] == expected.ids.tolist()


def test_a_reload_to_a_model_with_fewer_labels_fails_no_valid_request(live, run_dir, tmp_path):
    fewer = shutil.copytree(run_dir, tmp_path / "fewer")
    astra_ds.load(fewer).retire_labels(ids=list(range(45)))  # 5 labels left to predict
    statuses, stop = [], threading.Event()

    def hammer():
        with httpx.Client(base_url=live.url, timeout=60) as client:
            while not stop.is_set():
                statuses.append(client.post("/v1/predict", json={"texts": TEXTS[:1], "k": 10}).status_code)

    threads = [threading.Thread(target=hammer) for _ in range(6)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(0.3)
        assert live.client.post("/v1/reload", json={"run_dir": str(fewer)}).status_code == 200
        time.sleep(0.3)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
        live.client.post("/v1/reload", json={"run_dir": str(run_dir)})
    # checked against the model it is answered by: k = 10 is valid for the old one, refused by the new one
    assert 200 in statuses and 400 in statuses and set(statuses) <= {200, 400}, sorted(set(statuses))


def test_a_client_that_hangs_up_is_counted_as_such_not_as_an_error(live, caplog):
    import socket

    before = _metric(live.client.get("/metrics").text, "astra_ds_requests_total", endpoint="/v1/predict",
                     status="500")
    host, port = live.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:  # promises 100 bytes, sends 10, hangs up
        sock.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n{\"texts\": ")
    deadline = time.time() + 10
    while not _metric(live.client.get("/metrics").text, "astra_ds_requests_total", endpoint="/v1/predict",
                      status="499"):
        assert time.time() < deadline, "the hang-up was not counted"
        time.sleep(0.05)
    metrics = live.client.get("/metrics").text
    assert _metric(metrics, "astra_ds_requests_total", endpoint="/v1/predict", status="500") == before
    assert _metric(metrics, "astra_ds_request_errors_total", endpoint="/v1/predict", kind="client_gone") >= 1
    assert "Traceback" not in caplog.text


def test_requests_past_the_drain_are_answered_503_in_json_and_counted(run_dir):
    def slow_loader(*args):
        model = load_warm(*args)
        encode = model.encode_tokens
        model.encode_tokens = lambda tokens: (time.sleep(3), encode(tokens))[1]
        return model

    server = LiveServer(ServeSettings(str(run_dir), max_wait_ms=0, drain_s=0.5), slow_loader).wait_ready()
    answer = {}
    asking = threading.Thread(target=lambda: answer.update(
        response=httpx.post(f"{server.url}/v1/predict", json={"texts": ["w1 w2"]}, timeout=30)))
    asking.start()
    time.sleep(0.5)  # the model works on it for 3 s
    server.stop()
    asking.join()
    response = answer["response"]
    assert response.status_code == 503 and response.headers["retry-after"] == "1"
    assert "stopped before answering" in response.json()["error"]["message"]
    assert server.app.state.metrics.requests_cut_off() == 1


TEXT = st.text(st.characters(exclude_categories=()), max_size=8)  # lone surrogates ("\ud800") included
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | TEXT,
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
                    max_leaves=12)
REQUESTS = st.fixed_dictionaries({}, optional={"texts": JSON | st.lists(TEXT, max_size=4), "k": JSON,
                                               "extra": JSON})


@settings(max_examples=300, deadline=None)
@given(body=st.binary(max_size=64) | JSON.map(lambda v: json.dumps(v).encode())
       | REQUESTS.map(lambda v: json.dumps(v).encode()))
def test_any_body_a_client_sends_is_accepted_or_answered_4xx(body):
    """Whatever the bytes, the request checks accept the body or raise a ClientError with a 4xx status: never
    another exception, which would be a 500 (or fail a batch)."""
    limits = Limits(max_texts=4, max_chars=50)
    try:
        request = parse_body(body, limits)
        unknown_fields(request, {"texts", "k"})
        texts, k = texts_of(request, limits), k_of(request, 50)
    except ClientError as err:
        assert 400 <= err.status < 500 and err.body()["error"]["message"]
        return
    assert all(isinstance(text, str) and text.strip() for text in texts) and 1 <= k <= 50
    for text in texts:
        text.encode("utf-8")  # what the tokenizer gets is text
