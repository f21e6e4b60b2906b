"""ct-edge training: data, models, the training loop and its reports (heavy side)."""

import os

# TensorFlow's C++ start-up chatter hides the progress that matters.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
