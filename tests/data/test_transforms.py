import torch
from PIL import Image

from lesionkit.config import AugmentConfig
from lesionkit.data.preprocessing import Preprocessing
from lesionkit.data.transforms import eval_transform, train_transform

PRE = Preprocessing(180, 240, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bicubic", 0.9)


def test_eval_is_deterministic_and_keeps_the_frame():
    image = Image.new("RGB", (600, 450), (200, 100, 50))
    a, b = eval_transform(PRE)(image), eval_transform(PRE)(image)
    assert a.shape == (3, 180, 240) and torch.equal(a, b)
    # mean = std = 0.5 maps 200/255 to 2 * 0.784 - 1.
    assert torch.allclose(a[0], torch.full_like(a[0], 2 * 200 / 255 - 1), atol=1e-3)


def test_any_shape_is_covered_not_squashed():
    # A circle in a portrait photo stays a circle: the width is scaled as much as the height.
    image = Image.new("RGB", (300, 500), "black")
    image.paste((255, 255, 255), (100, 200, 200, 300))
    out = eval_transform(PRE)(image)
    assert out.shape == (3, 180, 240)
    bright = (out[0] > 0).nonzero()
    height = bright[:, 0].max() - bright[:, 0].min()
    width = bright[:, 1].max() - bright[:, 1].min()
    assert abs(int(height) - int(width)) <= 2


def test_train_transform_augments_with_the_same_shape():
    image = Image.effect_noise((200, 150), 50).convert("RGB")
    transform = train_transform(PRE, AugmentConfig())
    outs = [transform(image) for _ in range(3)]
    assert all(o.shape == (3, 180, 240) for o in outs)
    assert not torch.equal(outs[0], outs[1])
    assert torch.equal(train_transform(PRE, AugmentConfig(enabled=False))(image), eval_transform(PRE)(image))


def test_one_pass_normalisation_is_torchvisions():
    import numpy as np
    from torchvision.transforms import v2

    from lesionkit.data.transforms import ToNormalizedTensor

    pixels = np.random.default_rng(0).integers(0, 256, (45, 60, 3), dtype=np.uint8)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    torchvision = v2.Compose([v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])
    expected = torchvision(Image.fromarray(pixels))
    ours = ToNormalizedTensor(mean, std)
    for image in (Image.fromarray(pixels), torch.from_numpy(pixels).permute(2, 0, 1)):
        out = ours(image)
        assert out.is_contiguous() and out.dtype == torch.float32
        assert torch.allclose(out, expected, atol=1e-5)


def test_serving_frames_images_exactly_as_torchvision_does():
    """predict --backend onnx frames images with Pillow and NumPy alone (lesionkit.preprocessing.eval_array):
    the same numbers as eval_transform, to the bit, for any size, crop and interpolation."""
    import numpy as np

    from lesionkit.data.preprocessing import eval_array

    images = [Image.effect_noise(size, 60).convert("RGB") for size in ((600, 450), (300, 500), (97, 61), (240, 180))]
    presets = [PRE, Preprocessing(240, 320, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "bilinear", 0.875),
               Preprocessing(224, 224, (0.5,) * 3, (0.5,) * 3, "bicubic", 1.0)]
    for pre in presets:
        for image in images:
            expected = eval_transform(pre)(image).numpy()
            assert np.array_equal(eval_array(image, pre), expected), (pre, image.size)


def test_saturation_and_hue_change_colour_and_leave_grey_alone():
    still = dict(hflip=0, vflip=0, rotation=0, zoom=0, brightness=0, contrast=0)
    grey, red = Image.new("RGB", (240, 180), (120, 120, 120)), Image.new("RGB", (240, 180), (180, 60, 40))
    for colour in (dict(saturation=0.5), dict(hue=0.1)):
        transform = train_transform(PRE, AugmentConfig(**still, **colour))
        torch.manual_seed(0)
        assert all(torch.allclose(transform(grey), eval_transform(PRE)(grey), atol=1e-2) for _ in range(3))
        assert any(not torch.allclose(transform(red), eval_transform(PRE)(red), atol=1e-2) for _ in range(3))
    # Off by default: the study's augmentation has neither.
    assert AugmentConfig().saturation == AugmentConfig().hue == 0
