"""The bench command, run the way a user runs it: a real server process, real uploads, real files out."""
import json
import subprocess
import sys

import pytest

BENCH = [sys.executable, "-m", "bench"]


def test_bench_measures_the_service_and_the_baseline_it_starts(model_repository, photos, tmp_path):
    out = tmp_path / "results"
    finished = subprocess.run(
        [*BENCH, "--model-repository", str(model_repository),
         "--models", "mobilenetv3_small,no_such_model", "--concurrency", "1,4",
         "--requests", "24", "--warmup", "4", "--bare-runs", "20", "--baseline",
         "--image", str(photos["coffee"]), "--out", str(out)],
        capture_output=True, text=True, timeout=480,
    )
    assert finished.returncode == 0, finished.stderr

    results = json.loads((out / "bench.json").read_text())
    cells = {(c["server"], c["model"], c["concurrency"]): c for c in results["cells"]}
    assert set(cells) == {(server, model, clients) for server in ("service", "baseline")
                          for model in ("mobilenetv3_small", "no_such_model") for clients in (1, 4)}
    for (_server, model, _clients), cell in cells.items():
        assert cell["sent"] == 24 and not cell["time_limited"]
        assert cell["ok"] + cell["errors"] == cell["sent"] == sum(cell["statuses"].values())
        if model == "mobilenetv3_small":
            assert cell["statuses"] == {"200": 24}
            assert 0 < cell["p50_ms"] <= cell["p90_ms"] <= cell["p99_ms"]
            assert cell["requests_per_s"] > 0 and cell["client_cpu_ms_per_request"] > 0
        else:  # the servers answer 404 for a model they lack, and the bench counts it as errors
            assert cell["statuses"] == {"404": 24} and cell["p50_ms"] is None

    # Bare session.run of the model file, once with each server's threads (the baseline's is 1).
    # The service reports per model how many threads a lone inference gets; the bare run matches it.
    bare = {(b["model"], b["intra_op_threads"]): b for b in results["bare_session_run"]}
    threads = {s["name"]: s["model_threads"].get("mobilenetv3_small", s["intra_op_threads"])
               for s in results["servers"]}
    assert threads["baseline"] == 1 and threads["service"] >= 1
    assert set(bare) == {("mobilenetv3_small", t) for t in threads.values()}
    assert all(b["runs"] == 20 and b["p50_ms"] > 0 and b["preprocess_p50_ms"] > 0
               for b in bare.values())
    for (server, model, _clients), cell in cells.items():
        same = {}
        if model == "mobilenetv3_small":
            same = bare[(model, threads[server])]
            assert cell["intra_op_threads"] == threads[server]
        assert cell["bare_p50_ms"] == same.get("p50_ms")
        assert cell["preprocess_p50_ms"] == same.get("preprocess_p50_ms")
    assert {(v["model"], v["concurrency"]) for v in results["service_vs_baseline"]} == {
        ("mobilenetv3_small", 1), ("mobilenetv3_small", 4)}
    assert (out / "bench.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    # The trade-off: one point per served model measured (not the name the servers lack), with its
    # size and cost from its metadata and the latencies of the run.
    [point] = results["tradeoff"]
    assert (point["model"], point["precision"], point["params"]) == ("mobilenetv3_small", "fp32", 2_542_856)
    assert 56e6 < point["macs"] < 57e6
    assert point["bare_p50_ms"] == bare[("mobilenetv3_small", threads["service"])]["p50_ms"]
    assert point["service_p50_ms"] == cells[("service", "mobilenetv3_small", 1)]["p50_ms"]
    assert (out / "tradeoff.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    tradeoff_rows = finished.stdout.split("The trade-off")[1].splitlines()
    assert tradeoff_rows[1].split()[:4] == ["model", "precision", "params", "MACs"]
    assert tradeoff_rows[3].split()[:4] == ["mobilenetv3_small", "fp32", "2,542,856", "56.5M"]

    table = finished.stdout.splitlines()
    assert table[0].split()[:4] == ["server", "model", "clients", "req/s"]
    rows = [line.split() for line in table if line.startswith(("service ", "baseline "))]
    assert sorted((r[0], r[1], r[2], r[7]) for r in rows if r[1] in ("mobilenetv3_small", "no_such_model")) == sorted(
        [(s, "mobilenetv3_small", c, "0/24") for s in ("service", "baseline") for c in ("1", "4")]
        + [(s, "no_such_model", c, "24/24") for s in ("service", "baseline") for c in ("1", "4")])


def test_bench_sends_the_photo_as_bytes_over_rest_and_grpc_and_puts_them_side_by_side(
        model_repository, photos, tmp_path):
    out = tmp_path / "results"
    finished = subprocess.run(
        [*BENCH, "--model-repository", str(model_repository), "--protocol", "rest,grpc",
         "--models", "mobilenetv3_small,no_such_model", "--concurrency", "1,16",
         "--requests", "16", "--warmup", "4", "--bare-runs", "5",
         "--image", str(photos["coffee"]), "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert finished.returncode == 0, finished.stderr

    results = json.loads((out / "bench.json").read_text())
    cells = {(c["protocol"], c["model"], c["concurrency"]): c for c in results["cells"]}
    assert set(cells) == {(protocol, model, clients) for protocol in ("rest", "grpc")
                          for model in ("mobilenetv3_small", "no_such_model") for clients in (1, 16)}
    # Each protocol's own words: HTTP statuses over REST, gRPC status codes over gRPC.
    answered = {("rest", "mobilenetv3_small"): "200", ("grpc", "mobilenetv3_small"): "OK",
                ("rest", "no_such_model"): "404", ("grpc", "no_such_model"): "NOT_FOUND"}
    for (protocol, model, _clients), cell in cells.items():
        assert cell["server"] == "service" and cell["sent"] == 16
        assert cell["statuses"] == {answered[(protocol, model)]: 16}
        assert cell["ok"] == (16 if model == "mobilenetv3_small" else 0)
        # /proc counts CPU in clock ticks: 20 refusals may cost less than one.
        assert cell["server_cpu_ms_per_request"] > 0 if cell["ok"] else cell["server_cpu_ms_per_request"] >= 0

    # Side by side: one row per model and client count that both protocols served.
    rows = {(r["model"], r["concurrency"]): r for r in results["grpc_vs_rest"]}
    assert set(rows) == {("mobilenetv3_small", 1), ("mobilenetv3_small", 16)}
    for (model, clients), row in rows.items():
        rest, grpc = cells[("rest", model, clients)], cells[("grpc", model, clients)]
        assert row["rest_cpu_ms_per_request"] == rest["server_cpu_ms_per_request"]
        assert row["grpc_cpu_ms_per_request"] == grpc["server_cpu_ms_per_request"]
        assert row["cpu_ratio"] == pytest.approx(grpc["server_cpu_ms_per_request"]
                                                 / rest["server_cpu_ms_per_request"], abs=1e-3)
        assert row["throughput_ratio"] == pytest.approx(grpc["requests_per_s"] / rest["requests_per_s"],
                                                        abs=1e-3)
    side_by_side = finished.stdout.split("gRPC against REST")[1].splitlines()
    assert side_by_side[1].split()[:4] == ["model", "clients", "REST", "CPU"]
    assert [line.split()[:2] for line in side_by_side[3:5]] == [["mobilenetv3_small", "1"],
                                                                 ["mobilenetv3_small", "16"]]
    table = [line.split() for line in finished.stdout.splitlines() if line.startswith("service ")]
    assert sorted((r[-1], r[1], r[2], r[7]) for r in table) == sorted(
        (protocol, model, str(clients), f"{0 if model == 'mobilenetv3_small' else 16}/16")
        for protocol, model, clients in cells)


@pytest.mark.parametrize("url", ["http://192.0.2.10:8000", "http://bench.example:8000"])
def test_bench_refuses_a_server_that_is_not_on_loopback(photos, tmp_path, url):
    out = tmp_path / "results"
    finished = subprocess.run([*BENCH, "--url", url, "--models", "effnet",
                               "--image", str(photos["coffee"]), "--out", str(out)],
                              capture_output=True, text=True, timeout=60)
    assert finished.returncode == 2
    assert "refusing non-loopback URL" in finished.stderr and "--allow-remote" in finished.stderr
    assert not out.exists()


@pytest.mark.tool
def test_bench_count_counts_the_instructions_a_request_costs(small_repository, photos):
    """Two servers counted under callgrind: one that also writes every span to its log as JSON
    (the console exporter, every 50 ms, so within the counted time) does clearly more work per
    request than the same service without."""
    finished = subprocess.run(
        [sys.executable, "-m", "bench.count", "--model-repository", str(small_repository),
         "--model", "small_cifar", "--image", str(photos["coffee"]), "--requests", "24",
         "--concurrency", "4", "--idle", "3", "--server", "plain",
         "--server", "spans:OTEL_TRACES_EXPORTER=console OTEL_TRACES_SAMPLER=always_on OTEL_BSP_SCHEDULE_DELAY=50"],
        capture_output=True, text=True, timeout=900,
    )
    assert finished.returncode == 0, finished.stderr
    rows = {line.split()[0]: line.split() for line in finished.stdout.splitlines()[1:]}
    assert set(rows) == {"plain", "spans"}
    plain, spans = (float(rows[name][3]) for name in ("plain", "spans"))  # less idle, millions
    assert plain > 0 and spans > 1.05 * plain
    assert rows["plain"][-2] == "+0.0"

