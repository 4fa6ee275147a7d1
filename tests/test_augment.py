"""Training augmentation on real images: label-safe geometry, bounded photometry, repeatable."""

from __future__ import annotations

from dataclasses import replace

import torch
from PIL import Image
from torchvision.transforms.functional import pil_to_tensor

from trainer.augment import AugmentSpec, augment

NONE = AugmentSpec(rotate=False, flip=False, zoom=(1.0, 1.0), brightness=0, contrast=0, saturation=0)


def _batch(real_images) -> torch.Tensor:
    files = [f for fs in real_images.values() for f in fs[:2]]
    return torch.stack([pil_to_tensor(Image.open(f).convert("RGB")) for f in files])


def test_no_augmentation_is_the_identity(real_images) -> None:
    x = _batch(real_images)
    assert torch.allclose(augment(x, NONE), x.float(), atol=0.05)


def test_flips_are_exact_mirror_images(real_images) -> None:
    x = _batch(real_images)
    spec = AugmentSpec(rotate=False, flip=True, zoom=(1.0, 1.0), brightness=0, contrast=0, saturation=0)
    out = augment(x, spec, generator=torch.Generator().manual_seed(3))
    kinds = set()
    for o, i in zip(out, x.float()):
        views = {"same": i, "h": i.flip(-1), "v": i.flip(-2), "hv": i.flip(-1).flip(-2)}
        match = [k for k, v in views.items() if torch.allclose(o, v, atol=0.05)]
        assert len(match) == 1
        kinds.add(match[0])
    assert len(kinds) >= 3, "a batch of 8 should see several flip combinations"


def test_full_augmentation_is_bounded_and_repeatable(real_images) -> None:
    x = _batch(real_images)
    a = augment(x, AugmentSpec(), generator=torch.Generator().manual_seed(1))
    b = augment(x, AugmentSpec(), generator=torch.Generator().manual_seed(1))
    c = augment(x, AugmentSpec(), generator=torch.Generator().manual_seed(2))
    assert a.shape == x.shape and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert float(a.min()) >= 0 and float(a.max()) <= 255
    # Rotation with reflection padding keeps the field's overall brightness (no black corners).
    ratio = a.mean(dim=(1, 2, 3)) / x.float().mean(dim=(1, 2, 3))
    assert bool(((ratio > 0.7) & (ratio < 1.3)).all())


def test_stain_jitter_at_rest_is_the_identity_and_otherwise_moves_colour_not_shape(real_images) -> None:
    from trainer.augment import stain_jitter

    x = _batch(real_images).float()
    n = len(x)
    same = stain_jitter(x, torch.ones(n, 3), torch.zeros(n, 3))
    assert (same - x).abs().max() < 0.05
    # More haematoxylin, less eosin: the colours change, every cell stays where it was.
    out = stain_jitter(x, torch.tensor([[1.2, 0.8, 1.0]] * n), torch.full((n, 3), 0.03))
    assert (out - x).abs().mean() > 3
    for o, i in zip(out, x):
        grey_o, grey_i = o.mean(0).flatten(), i.mean(0).flatten()
        assert torch.corrcoef(torch.stack([grey_o, grey_i]))[0, 1] > 0.95
    assert float(out.min()) >= 0 and float(out.max()) <= 255


def test_stain_and_trivial_augment_are_repeatable_with_a_seed_and_vary_without(real_images) -> None:
    x = _batch(real_images)
    spec = AugmentSpec(stain=0.05, trivial=True)
    a = augment(x, spec, generator=torch.Generator().manual_seed(5))
    b = augment(x, spec, generator=torch.Generator().manual_seed(5))
    c = augment(x, spec, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == x.shape and float(a.min()) >= 0 and float(a.max()) <= 255
    # Trivial augment alone changes the images (one random operation each) and keeps them images.
    t = augment(x, AugmentSpec(rotate=False, flip=False, zoom=(1.0, 1.0), brightness=0, contrast=0, saturation=0,
                               trivial=True), generator=torch.Generator().manual_seed(7))
    changed = [(o - i).abs().mean() > 0.5 for o, i in zip(t, x.float())]
    assert 0 < sum(changed) and t.shape == x.shape


def test_colour_augmentation_moves_hue_white_balance_and_colour_but_never_the_cells(real_images) -> None:
    from trainer.augment import rotate_hue

    x = _batch(real_images).float()
    n = len(x)
    # A hue turned and turned back is the field again; turned once, the colours move a lot.
    turned = rotate_hue(x, torch.full((n,), 20.0))
    assert (turned - x).abs().mean() > 3
    assert (rotate_hue(turned, torch.full((n,), -20.0)) - x).abs().mean() < 2
    assert torch.equal(rotate_hue(x, torch.zeros(n)), x.clamp(0, 255))
    # Every image greyscale at full probability; at strength 0 the old training jitter exactly.
    grey = augment(x.to(torch.uint8), AugmentSpec(rotate=False, flip=False, zoom=(1.0, 1.0), brightness=0, contrast=0,
                                                  saturation=0, greyscale=1.0))
    assert torch.allclose(grey[:, 0], grey[:, 1]) and torch.allclose(grey[:, 1], grey[:, 2])
    assert AugmentSpec.for_training(0.05, 0.0, (1.0, 1.15), False) == AugmentSpec(stain=0.05)
    strong = AugmentSpec.for_training(0.1, 1.0, (0.8, 1.25), False)
    assert strong.hue >= 20 and strong.saturation >= 0.4 and strong.brightness >= 0.2 and strong.zoom == (0.8, 1.25)
    out = augment(x.to(torch.uint8), strong.colour_only, generator=torch.Generator().manual_seed(4))
    assert out.shape == x.shape and float(out.min()) >= 0 and float(out.max()) <= 255
    # Colour-only: the cells stay where they were (structure correlates), only colour moves.
    for o, i in zip(out, x):
        assert torch.corrcoef(torch.stack([o.mean(0).flatten(), i.mean(0).flatten()]))[0, 1] > 0.8


def test_jpeg_augmentation_is_the_compression_a_camera_applies(real_images) -> None:
    """`--jpeg`: the network learns on fields compressed as bench/shift.py's JPEG rows (PIL's
    libjpeg, 4:2:0) compress them, so JPEG 30 stops reading as another class (run 22)."""
    import io

    from trainer.augment import compress

    x = _batch(real_images).float()
    q = torch.full((len(x),), 30.0)
    ours = compress(x, q)
    for o, i in zip(ours, x):
        buf = io.BytesIO()
        Image.fromarray(i.permute(1, 2, 0).to(torch.uint8).numpy()).save(buf, "JPEG", quality=30)
        pil = pil_to_tensor(Image.open(io.BytesIO(buf.getvalue())).convert("RGB")).float()
        lost = (i - pil).abs().mean()
        assert lost > 0.5, "quality 30 loses detail"
        assert (o - pil).abs().mean() < 0.25 * lost, "the augmentation is PIL's JPEG, not another artefact"
    assert torch.equal(compress(x, torch.zeros(len(x))), x)  # quality 0: left as is
    # In the pipeline: at probability 1 every image is compressed, after the colour jitter.
    spec = replace(NONE, jpeg=1.0)
    out = augment(x.to(torch.uint8), spec, generator=torch.Generator().manual_seed(2))
    assert all((o - i).abs().mean() > 0.3 for o, i in zip(out, x))
    assert AugmentSpec.for_training(0.1, 0.5, (0.8, 1.25), False, jpeg=0.3).jpeg == 0.3
