"""Drives a modelcast agent with the real Triton client (tritonclient.http and .grpc), as a
user of a KServe v2 server would, and compares every corpus model's answers with onnxruntime's
on the same inputs: over HTTP with binary tensors (the client's default) and JSON, and gRPC.

usage: check.py HTTP_HOST:PORT GRPC_HOST:PORT MODELS_TSV CORPUS_DIR ID [ID ...]

Prints one table row per model and the API checks; exits 1 when anything differs or fails.
"""
import sys

import numpy as np
import onnxruntime as ort
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from common import as_text, infer_inputs, load_rows, make_inputs

url, grpc_url, tsv, corpus, ids = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5:]
rows = load_rows(tsv)
client = httpclient.InferenceServerClient(url=url, network_timeout=120.0)
grpc = grpcclient.InferenceServerClient(url=grpc_url)
failures = []


def make(row, metadata):
    return make_inputs(row, {i["name"]: i["datatype"] for i in metadata["inputs"]})


def call(model, inputs, binary):
    req = infer_inputs(httpclient, inputs, binary_data=binary)
    if binary:
        # The client's default: no outputs named, all come back binary.
        return client.infer(model, req)
    meta = client.get_model_metadata(model)
    outs = [httpclient.InferRequestedOutput(o["name"], binary_data=False) for o in meta["outputs"]]
    return client.infer(model, req, outputs=outs)


def call_grpc(model, inputs):
    return grpc.infer(model, infer_inputs(grpcclient, inputs), client_timeout=120.0)


def worst(result, reference, names):
    w = 0.0
    for name, ref in zip(names, reference):
        got = result.as_numpy(name)
        if got is None or got.shape != ref.shape:
            raise AssertionError(f"{name}: got {None if got is None else got.shape}, expected {ref.shape}")
        if as_text(ref) is not None:
            # Strings: equal or not.
            w = max(w, 0.0 if as_text(got) == as_text(ref) else float("inf"))
            continue
        ref64 = ref.astype(np.float64)
        scale = max(1.0, float(np.max(np.abs(ref64)))) if ref.size else 1.0
        w = max(w, float(np.max(np.abs(got.astype(np.float64) - ref64))) / scale if ref.size else 0.0)
    return w


print(f"{'model':22} {'package':30} {'outputs':>7} {'binary':>10} {'json':>10} {'grpc':>10} {'tol':>6}  result")
for mid in ids:
    row = rows[mid]
    try:
        meta = client.get_model_metadata(mid)
        inputs = make(row, meta)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        sess = ort.InferenceSession(f"{corpus}/{mid}.onnx", opts, providers=["CPUExecutionProvider"])
        names = [o["name"] for o in meta["outputs"]]
        reference = sess.run(names, inputs)
        wb = worst(call(mid, inputs, True), reference, names)
        wj = worst(call(mid, inputs, False), reference, names)
        wg = worst(call_grpc(mid, inputs), reference, names)
        tol = float(row["tol"])
        ok = wb <= tol and wj <= tol and wg <= tol
        known = row["expect"].startswith("differs:")
        verdict = ("ok" if ok else "DIFFERS") if not known else (
            "NOW MATCHES: update models.tsv" if ok else "differs, as known")
        print(f"{mid:22} {row['package'] + ' ' + row['version']:30} {len(names):>7} {wb:>10.2e} {wj:>10.2e} {wg:>10.2e} {tol:>6.0e}  {verdict}")
        if ok == known:
            failures.append(f"{mid}: max difference from onnxruntime {max(wb, wj, wg):.3e} (tolerance {tol}); models.tsv expects {row['expect'][:40]!r}")
    except Exception as e:  # one model's failure must not hide the others'
        print(f"{mid:22} FAILED: {e}")
        failures.append(f"{mid}: {e}")


def check(what, cond):
    print(f"  {'ok' if cond else 'FAILED'}  {what}")
    if not cond:
        failures.append(what)


def raises(what, f):
    try:
        f()
    except InferenceServerException as e:
        check(f"{what} -> error {e.status() or ''} {e.message()[:60]!r}", True)
        return
    check(f"{what} -> expected an error", False)


# The Triton client's calls, against one model with several outputs and one without.
print("tritonclient.http API:")
if ids:
    m = "osc_fsmn_vad" if "osc_fsmn_vad" in ids else ids[0]
    version = client.get_model_metadata(m)["versions"][0]
    check("is_server_live", client.is_server_live())
    check("is_server_ready", client.is_server_ready())
    check("get_server_metadata lists binary_tensor_data",
          "binary_tensor_data" in client.get_server_metadata()["extensions"])
    check(f"is_model_ready({m!r}, {version!r})", client.is_model_ready(m, version))
    check(f"is_model_ready({m!r}, '999') is false", not client.is_model_ready(m, "999"))
    check("get_model_metadata by version", client.get_model_metadata(m, version)["name"] == m)
    cfg = client.get_model_config(m)
    check("get_model_config names the inputs", [i["name"] for i in cfg["input"]] ==
          [i["name"] for i in client.get_model_metadata(m)["inputs"]])
    index = client.get_model_repository_index()
    check("get_model_repository_index lists every model", sorted(r["name"] for r in index) == sorted(ids))
    before = client.get_inference_statistics(m)["model_stats"][0]["inference_count"]
    inputs = make(rows[m], client.get_model_metadata(m))
    req = infer_inputs(httpclient, inputs)
    first = client.get_model_metadata(m)["outputs"][0]["name"]
    r = client.infer(m, req, request_id="req-42",
                     outputs=[httpclient.InferRequestedOutput(first)])
    check("request id echoed", r.get_response()["id"] == "req-42")
    check(f"only the requested output {first!r} comes back", [o["name"] for o in r.get_response()["outputs"]] == [first])
    r = client.infer(m, req, model_version=version)
    check("infer by version", r.get_response()["model_version"] == version)
    after = client.get_inference_statistics(m)["model_stats"][0]["inference_count"]
    check(f"get_inference_statistics counts requests ({before} -> {after})", after >= before + 2)
    bad = httpclient.InferInput(list(inputs)[0], [1, 1], "FP32")
    bad.set_data_from_numpy(np.zeros((1, 1), np.float32))
    raises("infer with a shape outside the model's", lambda: client.infer(m, [bad]))
    raises("infer on a model that does not serve", lambda: client.infer("nope", req))
    raises("load_model (the fleet loads models)", lambda: client.load_model(m))

print("tritonclient.grpc API:")
if ids:
    try:
        m = "osc_fsmn_vad" if "osc_fsmn_vad" in ids else ids[0]
        version = grpc.get_model_metadata(m).versions[0]
        check("is_server_live", grpc.is_server_live())
        check("is_server_ready", grpc.is_server_ready())
        check("get_server_metadata", grpc.get_server_metadata().name == "modelcast-agent")
        check(f"is_model_ready({m!r}, {version!r})", grpc.is_model_ready(m, version))
        check(f"is_model_ready({m!r}, '999') is false", not grpc.is_model_ready(m, "999"))
        meta = grpc.get_model_metadata(m, version)
        check("get_model_metadata by version", meta.name == m and len(meta.inputs) >= 1)
        inputs = make(rows[m], client.get_model_metadata(m))
        req = infer_inputs(grpcclient, inputs)
        first = meta.outputs[0].name
        r = grpc.infer(m, req, request_id="g-7", outputs=[grpcclient.InferRequestedOutput(first)])
        check("request id echoed", r.get_response().id == "g-7")
        check(f"only the requested output {first!r} comes back",
              [o.name for o in r.get_response().outputs] == [first])
        bad = grpcclient.InferInput(list(inputs)[0], [1, 1], "FP32")
        bad.set_data_from_numpy(np.zeros((1, 1), np.float32))
        raises("infer with a shape outside the model's", lambda: grpc.infer(m, [bad]))
        raises("infer on a model that does not serve", lambda: grpc.infer("nope", req))
        cfg = grpc.get_model_config(m).config
        check("get_model_config names the inputs and their types",
              [(i.name, "TYPE_" + i.datatype) for i in meta.inputs] ==
              [(i.name, grpcclient.model_config_pb2.DataType.Name(i.data_type)) for i in cfg.input])
        check("get_model_config by version", grpc.get_model_config(m, version).config.name == m)
        raises("get_model_config of a version that does not serve",
               lambda: grpc.get_model_config(m, "999"))
        index = grpc.get_model_repository_index().models
        check("get_model_repository_index lists every model",
              sorted(r.name for r in index) == sorted(ids) and all(r.state == "READY" for r in index))
        stats = grpc.get_inference_statistics(m).model_stats
        count = stats[0].inference_count
        grpc.infer(m, req)
        stats = grpc.get_inference_statistics(m, version).model_stats
        check(f"get_inference_statistics counts requests ({count} -> {stats[0].inference_count})",
              len(stats) == 1 and stats[0].inference_count == count + 1
              and stats[0].inference_stats.success.ns > 0)
        check("get_inference_statistics of every model",
              sorted(s.name for s in grpc.get_inference_statistics().model_stats) == sorted(ids))
    except Exception as e:
        check(f"gRPC API: {e}", False)

if failures:
    print("FAILED:\n  " + "\n  ".join(failures))
    sys.exit(1)
print(f"all {len(ids)} models answer as models.tsv expects")
