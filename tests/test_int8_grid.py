"""Kernels snapped to TFLite's int8 grid: per output channel, symmetric, 127 steps of max |w|."""

from __future__ import annotations

import numpy as np

from training.int8_grid import LEVELS, snap, snap_convolutions


def test_snap_puts_each_channel_on_its_own_grid_and_is_idempotent() -> None:
    rng = np.random.default_rng(0)
    kernel = rng.normal(0, 1, (3, 3, 8, 16)).astype(np.float32) * np.geomspace(1e-3, 10, 16)
    snapped = snap(kernel, -1)
    for c in range(16):
        step = np.abs(kernel[..., c]).max() / LEVELS
        steps = snapped[..., c] / step
        np.testing.assert_allclose(steps, np.round(steps), atol=1e-3)  # whole steps of its own scale
        assert np.abs(snapped[..., c] - kernel[..., c]).max() <= step / 2 + 1e-7
        assert np.abs(snapped[..., c]).max() == np.abs(kernel[..., c]).max()  # the max keeps its scale
    np.testing.assert_allclose(snap(snapped, -1), snapped, rtol=1e-6, atol=1e-9)
    assert not snap(np.zeros((1, 1, 2, 2), np.float32), -1).any()  # an all-zero channel stays zero


def test_snap_convolutions_covers_conv_and_depthwise_per_channel() -> None:
    import keras

    inputs = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(4, 3, name="conv")(inputs)
    x = keras.layers.DepthwiseConv2D(3, name="dw")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, keras.layers.Dense(3, name="dense")(x))
    dense_before = model.get_layer("dense").get_weights()[0].copy()
    dw_before = model.get_layer("dw").get_weights()[0]
    assert snap_convolutions(model) == 2
    dw = model.get_layer("dw").get_weights()[0]  # (kh, kw, channels, 1): per channel is axis 2
    for c in range(4):
        steps = dw[:, :, c] / (np.abs(dw_before[:, :, c]).max() / LEVELS)
        np.testing.assert_allclose(steps, np.round(steps), atol=1e-3)
    np.testing.assert_array_equal(model.get_layer("dense").get_weights()[0], dense_before)
