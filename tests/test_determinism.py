"""Same seed, same weights bit for bit; another seed, other weights; backends agree."""

import torch

from intrain.numeric import rng
from intrain.data import PIXEL_EXPONENT, load_dataset, pixels_to_int8
from intrain.kernels import CpuBackend, CpuSettings
from intrain.methods.niti import Niti, NitiOptions
from intrain.models import build_int_model
from intrain.numeric.qtensor import QTensor


def train_digits(seed, backend="cpu", model_name="mlp", steps=12, batch=32):
    data = load_dataset("digits").train
    model = build_int_model(model_name, data.image_shape, 10, seed=seed, backend=backend)
    trainer = Niti(model, NitiOptions(mu_schedule="0:4"), seed=seed)
    order = rng.permutation(len(data), seed, 0)
    for step in range(steps):
        index = order[step * batch:(step + 1) * batch]
        x = QTensor.of(pixels_to_int8(data.images[index]), PIXEL_EXPONENT)
        trainer.train_step(x, data.labels[index], step, 0)
    return model.state_dict()


def test_same_seed_gives_bit_identical_weights_and_other_seed_does_not():
    a, b, c = train_digits(0), train_digits(0), train_digits(1)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if k.endswith("weight"))


def test_every_backend_trains_identically():
    """cpu, reference and cuda (``torch._int_mm``, here on CPU tensors) end bit-identical."""
    a = train_digits(3, "cpu", steps=6)
    for backend in ("reference", "cuda"):
        b = train_digits(3, backend, steps=6)
        assert all(torch.equal(a[k], b[k]) for k in a), backend


def test_lenet5_backends_train_identically():
    """Convolutions and pooling too: LeNet-5 on random 28x28 images, three steps of batch 32."""
    gen = torch.Generator().manual_seed(5)
    images = torch.randint(0, 128, (96, 1, 28, 28), generator=gen, dtype=torch.int8)
    labels = torch.randint(0, 10, (96,), generator=gen)
    weights = []
    for backend in ("cpu", "cuda"):
        model = build_int_model("lenet5", (1, 28, 28), 10, seed=4, backend=backend)
        trainer = Niti(model, NitiOptions(mu_schedule="0:5"), seed=4)
        for step in range(3):
            batch = slice(32 * step, 32 * (step + 1))
            trainer.train_step(QTensor.of(images[batch], PIXEL_EXPONENT), labels[batch], step, 0)
        weights.append(model.state_dict())
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_vgg_backends_and_cpu_paths_train_identically():
    """VGG-small-7 at width 1/4 (32-128 channels: wide enough for the cpu backend's int8 GEMM
    path where the CPU has AMX): the cpu backend on its float path and on its int8 GEMM path, and
    the cuda backend (on CPU tensors), two steps of batch 4, end bit-identical."""
    gen = torch.Generator().manual_seed(6)
    images = torch.randint(0, 128, (8, 3, 32, 32), generator=gen, dtype=torch.int8)
    labels = torch.randint(0, 10, (8,), generator=gen)
    weights = []
    for backend in (CpuBackend(CpuSettings(use_int8_gemm=False)),
                    CpuBackend(CpuSettings(use_int8_gemm=True)), "cuda"):
        model = build_int_model("vgg-small-7", (3, 32, 32), 10, seed=2, backend=backend, width=0.25)
        trainer = Niti(model, NitiOptions(mu_schedule="0:5"), seed=2)
        for step in range(2):
            batch = slice(4 * step, 4 * (step + 1))
            trainer.train_step(QTensor.of(images[batch], PIXEL_EXPONENT), labels[batch], step, 0)
        weights.append(model.state_dict())
    for other in weights[1:]:
        assert all(torch.equal(weights[0][k], other[k]) for k in weights[0])
