"""Per corpus model, the device's inference time against onnxruntime's on the same input in
the same run, both with BENCH_THREADS threads per inference (default 1), and what HTTP (binary tensors) and gRPC add on top of it.

usage: bench.py HTTP_HOST:PORT GRPC_HOST:PORT MODELS_TSV CORPUS_DIR ID [ID ...]

For each model the three are interleaved, one call each per round (so the machine's noise
falls on all of them alike), for BENCH_SECONDS (default 3) or at least 5 rounds: onnxruntime
in this process (BENCH_THREADS intra-op threads), tritonclient.http with binary tensors, tritonclient.grpc. The
device's own time is what its statistics say its engine spent on those same requests
(`compute_infer`); HTTP and gRPC are the client's wall time per call. Means over the rounds.
"""
import os
import statistics
import sys
import time

import onnxruntime as ort
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from common import infer_inputs, load_rows, make_inputs

url, grpc_url, tsv, corpus, ids = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5:]
rows = load_rows(tsv)
http = httpclient.InferenceServerClient(url=url, network_timeout=300.0)
grpc = grpcclient.InferenceServerClient(url=grpc_url)
seconds = float(os.environ.get("BENCH_SECONDS", "3"))
threads = int(os.environ.get("BENCH_THREADS", "1"))


def engine_ns(model):
    s = http.get_inference_statistics(model)["model_stats"][0]["inference_stats"]["compute_infer"]
    return s["count"], s["ns"]


print(f"{'model':22} {'rounds':>6} {'ort ms':>9} {'device ms':>10} {'http ms':>9} {'grpc ms':>9}"
      f" {'device/ort':>10} {'http/dev':>9} {'grpc/dev':>9}")
ratios = {"device/ort": [], "http/dev": [], "grpc/dev": []}
slow = {"http/dev": [], "grpc/dev": []}
for mid in ids:
    meta = http.get_model_metadata(mid)
    inputs = make_inputs(rows[mid], {i["name"]: i["datatype"] for i in meta["inputs"]})
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(f"{corpus}/{mid}.onnx", opts, providers=["CPUExecutionProvider"])
    names = [o["name"] for o in meta["outputs"]]
    h_in = infer_inputs(httpclient, inputs, binary_data=True)
    g_in = infer_inputs(grpcclient, inputs)
    # Warm-up: plans made, caches filled.
    for _ in range(2):
        sess.run(names, inputs)
        http.infer(mid, h_in)
        grpc.infer(mid, g_in, client_timeout=300.0)
    c0, n0 = engine_ns(mid)
    t_ort, t_http, t_grpc = [], [], []
    start = time.perf_counter()
    while len(t_ort) < 5 or (time.perf_counter() - start < seconds and len(t_ort) < 500):
        t = time.perf_counter(); sess.run(names, inputs); t_ort.append(time.perf_counter() - t)
        t = time.perf_counter(); http.infer(mid, h_in); t_http.append(time.perf_counter() - t)
        t = time.perf_counter(); grpc.infer(mid, g_in, client_timeout=300.0); t_grpc.append(time.perf_counter() - t)
    c1, n1 = engine_ns(mid)
    ort_ms = 1e3 * statistics.fmean(t_ort)
    dev_ms = (n1 - n0) / max(1, c1 - c0) / 1e6
    http_ms = 1e3 * statistics.fmean(t_http)
    grpc_ms = 1e3 * statistics.fmean(t_grpc)
    r = {"device/ort": dev_ms / ort_ms, "http/dev": http_ms / dev_ms, "grpc/dev": grpc_ms / dev_ms}
    for k, v in r.items():
        ratios[k].append(v)
    if dev_ms >= 5:
        slow["http/dev"].append(r["http/dev"])
        slow["grpc/dev"].append(r["grpc/dev"])
    print(f"{mid:22} {len(t_ort):>6} {ort_ms:>9.3f} {dev_ms:>10.3f} {http_ms:>9.3f} {grpc_ms:>9.3f}"
          f" {r['device/ort']:>10.2f} {r['http/dev']:>9.2f} {r['grpc/dev']:>9.2f}")

print("medians over the models: " + ", ".join(
    f"{k} {statistics.median(v):.2f}" for k, v in ratios.items() if v))
print("models of >= 5 ms on the device: " + ", ".join(
    f"{k} median {statistics.median(v):.2f} (max {max(v):.2f})" for k, v in slow.items() if v))
