import torch

from ldm.modules.ema import LitEma


def test_buffer_names_and_update_rule():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    ema = LitEma(model, decay=0.9)
    assert "0weight" in dict(ema.named_buffers())
    start = model[0].weight.detach().clone()
    with torch.no_grad():
        model[0].weight.add_(1.0)
    ema(model)
    # first update: decay = min(0.9, (1 + 1) / (10 + 1))
    d = 2 / 11
    torch.testing.assert_close(ema.get_buffer("0weight"), start * d + (start + 1.0) * (1 - d))


def test_store_copy_restore():
    model = torch.nn.Linear(2, 2)
    ema = LitEma(model)
    with torch.no_grad():
        ema.get_buffer("weight").fill_(7.0)
    original = model.weight.detach().clone()
    ema.store(model.parameters())
    ema.copy_to(model)
    assert torch.all(model.weight == 7.0)
    ema.restore(model.parameters())
    torch.testing.assert_close(model.weight, original)
