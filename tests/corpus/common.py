"""What check.py and bench.py share: the corpus rows, and each model's seeded inputs."""
import zlib

import numpy as np

NP = {
    "BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32,
    "UINT64": np.uint64, "INT8": np.int8, "INT16": np.int16, "INT32": np.int32,
    "INT64": np.int64, "FP16": np.float16, "FP32": np.float32, "FP64": np.float64,
    "BYTES": np.object_,
}


def datatype(value):
    """The KServe v2 name of a numpy array's type."""
    return [k for k, v in NP.items() if v == value.dtype.type][0]


def as_text(value):
    """A BYTES array (numpy objects: str from onnxruntime, bytes from tritonclient) as a list
    of str; None for any other array."""
    if value.dtype != np.object_:
        return None
    return [v.decode() if isinstance(v, bytes) else str(v) for v in value.flat]


def load_rows(tsv):
    rows = {}
    for line in open(tsv):
        if line.startswith("#") or not line.strip():
            continue
        f = line.rstrip("\n").split("\t")
        rows[f[0]] = dict(id=f[0], package=f[1], version=f[2], kind=f[5], inputs=f[7],
                          expect=f[8], tol=f[9])
    return rows


def make_inputs(row, input_types):
    """The row's inputs (name=shape:values;...), seeded by the model's id; `input_types` maps
    each input to its KServe v2 datatype. BYTES inputs are drawn from a list of words
    (`words:a,b,c`)."""
    rng = np.random.default_rng(zlib.crc32(row["id"].encode()))
    out = {}
    for spec in row["inputs"].split(";"):
        name, rest = spec.split("=", 1)
        shape, how = rest.split(":", 1)
        shape = [int(d) for d in shape.split("x")]
        dtype = NP[input_types[name]]
        if how == "uniform":
            v = rng.random(shape)
        elif how == "normal":
            v = rng.standard_normal(shape)
        elif how.startswith("ints:"):
            _, lo, hi = how.split(":")
            v = rng.integers(int(lo), int(hi), shape)
        elif how.startswith("words:"):
            words = how.split(":", 1)[1].split(",")
            v = np.array(words, dtype=object)[rng.integers(0, len(words), shape)]
        elif how == "ones":
            v = np.ones(shape)
        else:
            v = np.zeros(shape)
        out[name] = v.astype(dtype)
        if dtype == np.object_ and not how.startswith("words:"):
            raise ValueError(f"{row['id']}: BYTES input {name} needs words:...")
    return out


def infer_inputs(module, inputs, **kw):
    """The request tensors of `inputs` for a tritonclient module (`tritonclient.http` takes
    `binary_data=`)."""
    req = []
    for name, value in inputs.items():
        i = module.InferInput(name, list(value.shape), datatype(value))
        i.set_data_from_numpy(value, **kw)
        req.append(i)
    return req
