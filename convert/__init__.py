"""ct-edge convert: the trained Keras model -> a verified bundle of TFLite and ONNX artifacts.

    python -m convert --model artifacts/model/model.keras --out artifacts/bundle [--data DIR]
"""

import os

# TensorFlow's C++ start-up chatter hides the progress that matters.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
