"""Makes the versions bench-delta sends after a model, as an ML team would produce them:

  a.onnx  the same weights re-published: exported again by a newer PyTorch (producer version
          and doc string changed, every tensor moved by a few bytes in the file)
  b.onnx  only the last layer retrained: the weights and bias of the graph's last Conv changed
  c.onnx  a full fine-tune: every floating-point weight changed slightly
  d.onnx  an FP16 variant (onnxconverter-common, inputs and outputs kept FP32)

Deterministic for the pinned versions; kept if already made.

usage: variants.py BASE.onnx OUT_DIR
"""
import os
import sys
import warnings

import numpy as np
import onnx
from onnx import numpy_helper

warnings.filterwarnings("ignore")
base, out = sys.argv[1], sys.argv[2]
os.makedirs(out, exist_ok=True)


def nudged(tensor, scale, rng):
    w = numpy_helper.to_array(tensor)
    noise = rng.normal(0.0, scale * (float(w.std()) or 1.0), w.shape).astype(w.dtype)
    return numpy_helper.from_array(w + noise, tensor.name)


def replace(model, changed):
    for i, t in enumerate(model.graph.initializer):
        if t.name in changed:
            model.graph.initializer[i].CopyFrom(changed[t.name])


def re_exported(path):
    m = onnx.load(base)
    m.producer_version = "2.5.1+cu124"
    m.doc_string = "re-exported for the edge fleet"
    onnx.save(m, path)


def last_layer(path):
    m = onnx.load(base)
    inits = {t.name: t for t in m.graph.initializer}
    conv = [n for n in m.graph.node if n.op_type == "Conv"][-1]
    rng = np.random.default_rng(1)
    replace(m, {n: nudged(inits[n], 0.05, rng) for n in conv.input if n in inits})
    onnx.save(m, path)


def fine_tuned(path):
    m = onnx.load(base)
    # The layers' weights and biases (not constants such as a Resize's scales).
    weights = {n for node in m.graph.node if node.op_type in ("Conv", "Gemm", "MatMul")
               for n in node.input[1:]}
    floats = [t for t in m.graph.initializer
              if t.data_type == onnx.TensorProto.FLOAT and t.name in weights]
    rng = np.random.default_rng(2)
    replace(m, {t.name: nudged(t, 0.01, rng) for t in floats})
    onnx.save(m, path)


def fp16(path):
    from onnxconverter_common import float16

    onnx.save(float16.convert_float_to_float16(onnx.load(base), keep_io_types=True), path)


for name, make in [("a", re_exported), ("b", last_layer), ("c", fine_tuned), ("d", fp16)]:
    path = os.path.join(out, name + ".onnx")
    if not os.path.exists(path):
        make(path + ".tmp.onnx")
        os.replace(path + ".tmp.onnx", path)
print("variants: made in " + out)
