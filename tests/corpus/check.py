"""Drives a modelcast agent with the real Triton client (tritonclient.http), as a user of a
KServe v2 server would, and compares every corpus model's answers with onnxruntime's on the
same inputs.

usage: check.py HOST:PORT MODELS_TSV CORPUS_DIR ID [ID ...]

Prints one table row per model and the API checks; exits 1 when anything differs or fails.
"""
import sys
import time
import zlib

import numpy as np
import onnxruntime as ort
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

NP = {
    "BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32,
    "UINT64": np.uint64, "INT8": np.int8, "INT16": np.int16, "INT32": np.int32,
    "INT64": np.int64, "FP16": np.float16, "FP32": np.float32, "FP64": np.float64,
}

url, tsv, corpus, ids = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
rows = {}
for line in open(tsv):
    if line.startswith("#") or not line.strip():
        continue
    f = line.rstrip("\n").split("\t")
    rows[f[0]] = dict(id=f[0], package=f[1], version=f[2], kind=f[5], inputs=f[7],
                      expect=f[8], tol=f[9])

client = httpclient.InferenceServerClient(url=url, network_timeout=120.0)
failures = []


def make_inputs(row, metadata):
    rng = np.random.default_rng(zlib.crc32(row["id"].encode()))
    types = {i["name"]: i["datatype"] for i in metadata["inputs"]}
    out = {}
    for spec in row["inputs"].split(";"):
        name, rest = spec.split("=", 1)
        shape, how = rest.split(":", 1)
        shape = [int(d) for d in shape.split("x")]
        dtype = NP[types[name]]
        if how == "uniform":
            v = rng.random(shape)
        elif how == "normal":
            v = rng.standard_normal(shape)
        elif how.startswith("ints:"):
            _, lo, hi = how.split(":")
            v = rng.integers(int(lo), int(hi), shape)
        elif how == "ones":
            v = np.ones(shape)
        else:
            v = np.zeros(shape)
        out[name] = v.astype(dtype)
    return out


def call(model, inputs, binary):
    req = []
    for name, value in inputs.items():
        dt = [k for k, v in NP.items() if v == value.dtype.type][0]
        i = httpclient.InferInput(name, list(value.shape), dt)
        i.set_data_from_numpy(value, binary_data=binary)
        req.append(i)
    if binary:
        # The client's default: no outputs named, all come back binary.
        return client.infer(model, req)
    meta = client.get_model_metadata(model)
    outs = [httpclient.InferRequestedOutput(o["name"], binary_data=False) for o in meta["outputs"]]
    return client.infer(model, req, outputs=outs)


def worst(result, reference, names):
    w = 0.0
    for name, ref in zip(names, reference):
        got = result.as_numpy(name)
        if got is None or got.shape != ref.shape:
            raise AssertionError(f"{name}: got {None if got is None else got.shape}, expected {ref.shape}")
        ref64 = ref.astype(np.float64)
        scale = max(1.0, float(np.max(np.abs(ref64)))) if ref.size else 1.0
        w = max(w, float(np.max(np.abs(got.astype(np.float64) - ref64))) / scale if ref.size else 0.0)
    return w


print(f"{'model':22} {'package':30} {'outputs':>7} {'binary':>10} {'json':>10} {'tol':>6}  result")
for mid in ids:
    row = rows[mid]
    try:
        meta = client.get_model_metadata(mid)
        inputs = make_inputs(row, meta)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        sess = ort.InferenceSession(f"{corpus}/{mid}.onnx", opts, providers=["CPUExecutionProvider"])
        names = [o["name"] for o in meta["outputs"]]
        reference = sess.run(names, inputs)
        wb = worst(call(mid, inputs, True), reference, names)
        wj = worst(call(mid, inputs, False), reference, names)
        tol = float(row["tol"])
        ok = wb <= tol and wj <= tol
        known = row["expect"].startswith("differs:")
        verdict = ("ok" if ok else "DIFFERS") if not known else (
            "NOW MATCHES: update models.tsv" if ok else "differs, as known")
        print(f"{mid:22} {row['package'] + ' ' + row['version']:30} {len(names):>7} {wb:>10.2e} {wj:>10.2e} {tol:>6.0e}  {verdict}")
        if ok == known:
            failures.append(f"{mid}: max difference from onnxruntime {max(wb, wj):.3e} (tolerance {tol}); models.tsv expects {row['expect'][:40]!r}")
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
    inputs = make_inputs(rows[m], client.get_model_metadata(m))
    req = []
    for name, value in inputs.items():
        dt = [k for k, v in NP.items() if v == value.dtype.type][0]
        i = httpclient.InferInput(name, list(value.shape), dt)
        i.set_data_from_numpy(value)
        req.append(i)
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

if failures:
    print("FAILED:\n  " + "\n  ".join(failures))
    sys.exit(1)
print(f"all {len(ids)} models answer as models.tsv expects")
