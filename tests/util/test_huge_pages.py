"""util/huge_pages.py: weights copied onto 2 MiB-aligned memory advised as huge pages keep their values, dtype,
shape, parameter type and sharing (a tied embedding and LM head stay one tensor)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from optcli.util import huge_pages


def test_a_huge_buffer_starts_on_a_2mib_boundary_and_holds_what_is_copied() -> None:
    t = torch.randn(3 << 19, dtype=torch.float32)  # 6 MiB
    copy = huge_pages.on_huge_pages(t)
    assert torch.equal(copy, t) and copy.dtype == t.dtype and copy.shape == t.shape and copy.is_contiguous()
    if huge_pages.available():
        assert copy.data_ptr() % huge_pages.HUGE_PAGE == 0
    small = huge_pages.huge_empty(100)
    assert small.numel() == 100 and small.dtype == torch.uint8


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(1024, 512)  # 2 MiB in fp32
        self.head = nn.Linear(512, 1024, bias=False)
        self.head.weight = self.embed.weight
        self.small = nn.Linear(4, 4)
        self.register_buffer("table", torch.arange(1 << 20, dtype=torch.int32))  # 4 MiB


@pytest.mark.skipif(not huge_pages.available(), reason="no transparent huge pages here")
def test_placing_a_model_moves_its_large_tensors_and_keeps_them_shared() -> None:
    torch.manual_seed(0)
    model = Tied().requires_grad_(False)
    before = {name: t.clone() for name, t in model.state_dict().items()}
    x = torch.randint(0, 1024, (3,))
    want = model.head(model.embed(x))
    small = model.small.weight
    moved = huge_pages.place_weights(model)
    assert moved == 1024 * 512 * 4 + (1 << 20) * 4  # the shared weight once, the buffer; not the small layer
    assert model.head.weight is model.embed.weight and isinstance(model.embed.weight, nn.Parameter)
    assert model.embed.weight.data_ptr() % huge_pages.HUGE_PAGE == 0
    assert model.table.data_ptr() % huge_pages.HUGE_PAGE == 0
    assert model.small.weight is small  # under 2 MiB: left where it was
    for name, t in model.state_dict().items():
        assert torch.equal(t, before[name]), name
    assert torch.equal(model.head(model.embed(x)), want)
