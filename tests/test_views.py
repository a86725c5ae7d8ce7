"""Views in two stages: crops in the loader workers, photometric ops batched on the device.

Each batched op equals torchvision's functional op on every image for the same parameter; the
parameters are distributed as torchvision's transforms draw them; the crops are torchvision's for
the same RNG state; a batch stays a pure function of (seed, step) whatever the number of workers
or processes; the fast JPEG decode gives PIL's pixels."""

import io
import itertools
import math

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import RandomResizedCrop, v2
from torchvision.transforms.v2 import functional as TF

from dilemma.data import (
    Crop,
    Photometric,
    PretrainBatches,
    View,
    Views,
    decode,
    decode_pixels,
    load_source,
    multi_crop,
    pretrain_loader,
    two_views,
)
from dilemma.data import photometric as P
from dilemma.data.folders import pil_to_uint8
from tests.conftest import view_settings
from tests.imagefolder import make_image_folder


@pytest.fixture(scope="module")
def animal():
    return load_source("animal-mnist", img_size=28, in_chans=1)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("imgs") / "data", classes=3, per_class=4, sizes=(40, 90))


def _per_image(reference, images, params):
    """torchvision's op image by image."""
    return torch.stack([reference(image, float(param)) for image, param in zip(images, params, strict=True)])


# ---- the device stage, op by op ------------------------------------------------------------------

OPS = [  # (ours, torchvision's, parameter range, channels)
    (P.adjust_brightness, TF.adjust_brightness, (0.0, 2.0), (1, 3)),
    (P.adjust_contrast, TF.adjust_contrast, (0.0, 2.0), (1, 3)),
    (P.adjust_saturation, TF.adjust_saturation, (0.0, 2.0), (1, 3)),
    (P.adjust_hue, TF.adjust_hue, (-0.5, 0.5), (1, 3)),
    (lambda x, s: P.gaussian_blur(x, s, 5), lambda img, s: TF.gaussian_blur(img, [5, 5], [s, s]), (0.1, 2.0), (1, 3)),
    (P.solarize, lambda img, _: TF.solarize(img, 128 / 255 if img.is_floating_point() else 128), (0, 1), (1, 3)),
    (P.to_grayscale, lambda img, _: TF.rgb_to_grayscale(img, 3), (0, 1), (3,)),
]
OP_NAMES = ["brightness", "contrast", "saturation", "hue", "blur", "solarize", "grayscale"]


@pytest.mark.parametrize("ours, reference, span, channel_counts", OPS, ids=OP_NAMES)
def test_each_batched_op_is_torchvisions_per_image_on_floats(ours, reference, span, channel_counts):
    g = torch.Generator().manual_seed(0)
    for channels in channel_counts:
        images = torch.rand(8, channels, 20, 26, generator=g)
        images[0] = 0.5  # a grey image: hue undefined, chroma 0
        images[1, :, :4] = 1.0  # saturated pixels
        params = span[0] + (span[1] - span[0]) * torch.rand(8, generator=g)
        got = ours(images.clone(), params)
        # float32 round-off: the same formulas in another order (hue in closed form)
        assert (got - _per_image(reference, images, params)).abs().max() <= 2e-6


@pytest.mark.parametrize("ours, reference, span, channel_counts", OPS, ids=OP_NAMES)
def test_each_batched_op_is_torchvisions_per_image_on_uint8(ours, reference, span, channel_counts):
    """torchvision's uint8 path truncates each result to an integer (and floors the luma that
    contrast and saturation blend with); ours stays in floats: within 2 levels for those two, 1
    for the others."""
    g = torch.Generator().manual_seed(1)
    tolerance = 2 if ours in (P.adjust_contrast, P.adjust_saturation) else 1
    for channels in channel_counts:
        images = torch.randint(0, 256, (8, channels, 20, 26), generator=g, dtype=torch.uint8)
        params = span[0] + (span[1] - span[0]) * torch.rand(8, generator=g)
        got = ours(images.float() / 255, params) * 255
        expected = _per_image(reference, images, params).float()
        assert (got - expected).abs().max() <= tolerance + 1e-3


def test_blur_of_a_224_px_view_uses_simclrs_kernel_of_a_tenth_of_the_side():
    view = view_settings(224, 3).view()
    assert view.photometric.blur_kernel == 23 and view_settings(96, 3).view().photometric.blur_kernel == 9


# ---- the device stage, composed ------------------------------------------------------------------

JITTER_REFERENCE = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]


def _reference_view(image: torch.Tensor, u: torch.Tensor, p: Photometric) -> torch.Tensor:
    """One image through torchvision's functional ops, with the parameters read off its uniforms
    directly (as torchvision's transforms would apply them in this order)."""
    spans = p.jitter_ranges
    if u[0] < p.jitter_prob:
        for op_id in u[1:5].argsort().tolist():  # position k applies op order[k]
            if spans[op_id] is not None:
                lo, hi = spans[op_id]
                image = JITTER_REFERENCE[op_id](image, float(lo + (hi - lo) * u[5 + op_id].double()))
    if u[9] < p.grayscale_prob and image.shape[0] == 3:  # colour-only, as the batched op
        image = TF.rgb_to_grayscale(image, 3)
    if u[10] < p.blur_prob:
        sigma = float(p.blur_sigma[0] + (p.blur_sigma[1] - p.blur_sigma[0]) * u[11].double())
        image = TF.gaussian_blur(image, [p.blur_kernel] * 2, [sigma, sigma])
    if u[12] < p.solarize_prob:
        image = TF.solarize(image, 128 / 255)
    return image


@pytest.mark.parametrize("channels", [1, 3])
def test_the_device_stage_applies_every_image_its_own_ops_in_its_own_order(channels):
    p = Photometric(0.4, 0.4, 0.2, 0.1, grayscale_prob=0.3, blur_prob=0.5, blur_kernel=5, solarize_prob=0.3)
    g = torch.Generator().manual_seed(2)
    images, draws = torch.rand(64, channels, 12, 14, generator=g), torch.rand(64, Photometric.DRAWS, generator=g)
    got = p(images.clone(), draws)
    expected = torch.stack([_reference_view(img, u, p) for img, u in zip(images, draws, strict=True)])
    assert (got - expected).abs().max() <= 1e-5
    assert not torch.allclose(got, images)  # something happened


def test_jitter_parameters_are_distributed_as_torchvisions():
    """Gate p = 0.8, the order a uniformly random permutation (torch.randperm(4)), each factor
    uniform on torchvision's range: compared with ColorJitter's own draws over 24,000 images."""
    n = 24_000
    p = Photometric(brightness=1.5, contrast=0.4, saturation=0.2, hue=0.1)
    steps = p.steps(torch.rand(n, Photometric.DRAWS, generator=torch.Generator().manual_seed(3)))
    order = torch.full((n, 4), -1)
    factors = [torch.full((n,), float("nan")) for _ in range(4)]
    for step in steps:
        op_id = P.JITTER.index(step.op)
        position = (order[step.rows] >= 0).sum(1)  # ops are applied position by position
        order[step.rows, position] = op_id
        factors[op_id][step.rows] = step.params.double().float()
    jittered = (order >= 0).all(1)
    assert torch.equal(jittered, (order >= 0).any(1))  # all four ops or none
    assert abs(jittered.float().mean().item() - 0.8) < 4 * math.sqrt(0.8 * 0.2 / n)

    torch.manual_seed(0)
    jitter = v2.ColorJitter(brightness=1.5, contrast=0.4, saturation=0.2, hue=0.1)
    make_params = getattr(jitter, "make_params", None) or jitter._get_params  # its name before torchvision 0.21
    theirs = [make_params([]) for _ in range(n)]
    counts = {perm: 0 for perm in itertools.permutations(range(4))}
    for perm in order[jittered].tolist():
        counts[tuple(perm)] += 1
    m = int(jittered.sum())
    assert all(abs(c - m / 24) < 5 * math.sqrt(m / 24) for c in counts.values()), counts
    their_counts = {perm: 0 for perm in counts}
    for params in theirs:
        their_counts[tuple(params["fn_idx"].tolist())] += 1
    assert all(abs(c - n / 24) < 5 * math.sqrt(n / 24) for c in their_counts.values())  # the same law
    names = ["brightness_factor", "contrast_factor", "saturation_factor", "hue_factor"]
    for op_id, name in enumerate(names):
        ours = np.sort(factors[op_id][jittered].numpy())
        their = np.sort(np.array([params[name] for params in theirs]))
        assert abs(ours.min() - their.min()) < 0.01 and abs(ours.max() - their.max()) < 0.01, name
        # Kolmogorov-Smirnov distance between the two samples (5 % critical value ~0.013 here)
        grid = np.linspace(their.min(), their.max(), 200)
        ks = np.abs(np.searchsorted(ours, grid) / len(ours) - np.searchsorted(their, grid) / len(their)).max()
        assert ks < 0.02, (name, ks)


def test_gates_and_blur_sigma_follow_their_probabilities():
    n = 20_000
    p = Photometric(grayscale_prob=0.2, blur_prob=0.5, blur_sigma=(0.1, 2.0), solarize_prob=0.1)
    steps = {step.op.__name__: step for step in p.steps(torch.rand(n, Photometric.DRAWS))}
    for name, prob in (("to_grayscale", 0.2), ("_blur", 0.5), ("solarize", 0.1)):
        assert abs(len(steps[name].rows) / n - prob) < 4 * math.sqrt(prob * (1 - prob) / n), name
    sigma = steps["_blur"].params
    assert 0.1 <= sigma.min() and sigma.max() <= 2.0 and abs(sigma.mean().item() - 1.05) < 0.02
    assert Photometric().identity and not steps_of(Photometric(brightness=0.4, jitter_prob=0.0))


def steps_of(p: Photometric) -> list:
    return p.steps(torch.rand(100, Photometric.DRAWS))


def test_settings_out_of_range_are_refused():
    from dilemma.errors import DilemmaError

    for bad in ({"hue": 0.8}, {"blur_kernel": 4}, {"brightness": -0.1}, {"blur_prob": 1.5}, {"blur_sigma": (0, 1)}):
        with pytest.raises(DilemmaError):
            Photometric(**bad)


def test_views_alike_share_one_device_call_and_finish_as_alone():
    """DINO's views: two asymmetric global crops, three alike local ones (one call for the three)."""
    settings = view_settings(28, 3, saturation=0.2, hue=0.1, solarize_prob=0.2, asymmetric_views=True)
    views = multi_crop(settings, 12, 3, local_max_scale=0.4)
    assert views.alike == [[0], [1], [2, 3, 4]]
    images = torch.randint(0, 256, (6, 3, 40, 40), dtype=torch.uint8, generator=torch.Generator().manual_seed(5))
    crops, draws = views.crops(images, range(6))
    together = views.finish(crops, draws, torch.device("cpu"), (0.5,), (0.5,))
    for view, crop, draw, got in zip(views.views, crops, draws, together, strict=True):
        (alone,) = Views(view).finish([crop], [draw], torch.device("cpu"), (0.5,), (0.5,))
        assert (got - alone).abs().max() <= 1e-6


def test_grayscale_images_get_no_colour_only_ops():
    view = view_settings(16, 1, saturation=0.2, hue=0.1, grayscale_prob=0.2).view()
    assert (view.photometric.saturation, view.photometric.hue, view.photometric.grayscale_prob) == (0, 0, 0)
    rgb = view_settings(16, 3, color_jitter=0.4, saturation=0.2, hue=0.1, grayscale_prob=0.2).view()
    assert rgb.photometric.jitter_ranges == [(0.6, 1.4), (0.6, 1.4), (0.8, 1.2), (-0.1, 0.1)]


def test_asymmetric_views_differ_as_byol():
    first, second = view_settings(16, 3, blur_prob=0.3, solarize_prob=0.2, asymmetric_views=True).pair()
    assert (first.photometric.blur_prob, first.photometric.solarize_prob) == (1.0, 0.0)
    assert (second.photometric.blur_prob, second.photometric.solarize_prob) == (0.1, 0.2)


# ---- the worker stage --------------------------------------------------------------------------


def test_crop_boxes_and_flips_are_torchvisions_for_the_same_rng_state():
    crop, generator = Crop(28, (0.08, 1.0)), torch.Generator()
    for seed in range(300):
        height, width = (int(v) for v in torch.randint(1, 400, (2,), generator=torch.Generator().manual_seed(seed)))
        height = 3 * width if seed % 7 == 0 else height  # extreme aspect ratios reach the centre-crop fallback
        torch.manual_seed(seed)
        expected = RandomResizedCrop.get_params(torch.empty(1, height, width), (0.08, 1.0), (3 / 4, 4 / 3))
        flip = torch.rand(1) < 0.5  # RandomHorizontalFlip(p=0.5): the next draw
        generator.manual_seed(seed)
        assert crop.box(height, width, generator) == tuple(expected)
        assert (torch.rand(1, generator=generator) < 0.5) == flip


def test_crop_pixels_are_torchvisions_resized_crop():
    image = torch.randint(0, 256, (3, 60, 80), dtype=torch.uint8)
    crop, generator = Crop(32, (0.2, 1.0), hflip=False), torch.Generator().manual_seed(4)
    got = crop(image, generator)
    top, left, h, w = crop.box(60, 80, generator.manual_seed(4))
    expected = TF.resized_crop(image, top, left, h, w, [32, 32], antialias=True)
    # bitwise with today's torchvision; older ones (0.18) resample uint8 through floats: one level
    assert (got.int() - expected.int()).abs().max() <= 1
    # PIL's filter, which torchvision uses for PIL images, agrees to one level
    pil = Image.fromarray(image.permute(1, 2, 0).numpy()).crop((left, top, left + w, top + h)).resize((32, 32), 2)
    assert (got.int() - pil_to_uint8(pil).int()).abs().max() <= 1


def test_views_crop_the_full_resolution_image(folder):
    s = load_source(str(folder), img_size=16, in_chans=3)
    images, _, problems = s.train.raw([0, 1])
    assert not problems and all(min(img.shape[1:]) >= 40 for img in images)  # as stored, not 16 px thumbnails
    assert all(img.dtype == torch.uint8 and img.shape[0] == 3 for img in images)
    assert s.train.load([0, 1]).shape == (2, 3, 16, 16)  # evaluation: resized + centre crop


def _jpeg(img: Image.Image, path, **kwargs):
    img.save(path, "JPEG", quality=90, **kwargs)
    return str(path)


def test_fast_jpeg_decode_gives_pils_pixels(tmp_path):
    """Whichever decoder takes a file, the pixels are PIL's (EXIF applied, draft-reduced, converted)."""
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (120, 90, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated: PIL turns it upright
    files = {
        "baseline": _jpeg(rgb, tmp_path / "a.jpg"),
        "progressive": _jpeg(rgb, tmp_path / "b.jpg", progressive=True),
        "444": _jpeg(rgb, tmp_path / "c.jpg", subsampling=0),
        "grey": _jpeg(rgb.convert("L"), tmp_path / "d.jpg"),
        "rotated": _jpeg(rgb, tmp_path / "e.jpg", exif=exif.tobytes()),
        "large": _jpeg(rgb.resize((640, 480)), tmp_path / "f.jpg"),
        "png": str(tmp_path / "g.png"),
    }
    rgb.save(files["png"])
    for name, path in files.items():
        for mode in ("RGB", "L"):
            for min_side in (0, 64):
                expected = pil_to_uint8(decode(path, mode, min_side))
                assert torch.equal(decode_pixels(path, mode, min_side), expected), (name, mode, min_side)
    assert decode_pixels(files["rotated"], "RGB").shape == (3, 90, 120)
    assert decode_pixels(files["large"], "RGB", 64).shape == (3, 120, 160)  # draft: decoded at 1/4


def test_a_truncated_jpeg_is_named_by_the_careful_decoder(tmp_path):
    from dilemma.data import BadImage

    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 200, 30)).save(buf, "JPEG")
    path = tmp_path / "cut.jpg"
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(BadImage, match="unreadable"):
        decode_pixels(str(path), "RGB")


# ---- batches -----------------------------------------------------------------------------------


def test_pretrain_batches_are_a_function_of_step(animal):
    views = two_views(view_settings(28))
    batches = PretrainBatches(animal.train, 64, views, seed=3)
    (a1, a2), draws, labels, _ = batches[5]
    (b1, b2), again, _, _ = batches[5]
    assert a1.shape == (64, 1, 28, 28) and a1.dtype == torch.uint8  # the device stage finishes them
    assert draws[0].shape == (64, Photometric.DRAWS) and torch.equal(draws[1], again[1])
    assert torch.equal(a1, b1) and torch.equal(a2, b2) and not torch.equal(a1, a2)
    assert not torch.equal(batches[6].views[0], a1)
    assert torch.equal(labels, animal.train.labels[batches.indices(5)])
    # an epoch is a permutation; two ranks split the global batch
    epoch = torch.cat([batches.indices(s) for s in range(batches.steps_per_epoch)])
    assert len(set(epoch.tolist())) == len(epoch) == batches.steps_per_epoch * 64
    ranks = [PretrainBatches(animal.train, 64, views, seed=3, rank=r, world_size=2).indices(5) for r in (0, 1)]
    assert sorted(torch.cat(ranks).tolist()) == sorted(batches.indices(5).tolist())


def _finished(batches: PretrainBatches, batch) -> tuple[torch.Tensor, ...]:
    return batches.views.finish(batch.views, batch.draws, torch.device("cpu"), (0.5,), (0.5,))


@pytest.mark.parametrize("world_size", [2, 4])
def test_an_image_gets_the_same_views_however_many_processes_share_the_batch(animal, world_size):
    """Rank r's views are rows r::world of the single process's, after both stages (DDP 2 == 1)."""
    views = two_views(view_settings(28, blur_prob=0.5))
    single = PretrainBatches(animal.train, 16, views, seed=7)
    alone = _finished(single, single[3])
    for rank in range(world_size):
        part = PretrainBatches(animal.train, 16, views, seed=7, rank=rank, world_size=world_size)
        for got, expected in zip(_finished(part, part[3]), alone, strict=True):
            # to float round-off: convolution and mean kernels vectorise by batch size
            assert (got - expected[rank::world_size]).abs().max() <= 1e-6


def test_streamed_batches_are_the_same_with_workers(folder):
    s = load_source(str(folder), img_size=16, in_chans=3)
    settings = view_settings(16, 3, saturation=0.2, hue=0.1, grayscale_prob=0.2, solarize_prob=0.2)
    batches = PretrainBatches(s.train, 4, two_views(settings), seed=1)
    alone = [_finished(batches, b) for b in pretrain_loader(batches, 0, 3, num_workers=0, pin_memory=False)]
    workers = [_finished(batches, b) for b in pretrain_loader(batches, 0, 3, num_workers=2, pin_memory=False)]
    assert all(torch.equal(a, b) for x, y in zip(alone, workers, strict=True) for a, b in zip(x, y, strict=True))


def test_rgb_views_of_files_are_finished_on_the_device_stage(folder):
    s = load_source(str(folder), img_size=16, in_chans=3)
    settings = view_settings(16, 3, crop_min_scale=0.08, saturation=0.2, hue=0.1, grayscale_prob=0.2)
    batches = PretrainBatches(s.train, 4, two_views(settings), seed=0)
    batch = batches[1]
    v1, v2 = _finished(batches, batch)
    assert v1.shape == v2.shape == (4, 3, 16, 16) and v1.dtype == torch.float32 and batch.labels.shape == (4,)
    assert -1.0 <= v1.min() and v1.max() <= 1.0  # (x - 0.5) / 0.5 of pixels in [0, 1]


def test_views_without_photometric_ops_are_the_normalised_crops(animal):
    views = Views(View(Crop(28, (0.35, 1.0))))
    images = animal.train.load(range(8))
    crops, draws = views.crops(images, range(8))
    (finished,) = views.finish(crops, draws, torch.device("cpu"), (0.5,), (0.5,))
    assert torch.equal(finished, (crops[0].float() / 255 - 0.5) / 0.5)
