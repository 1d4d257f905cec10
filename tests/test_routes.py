"""The supported training routes, each run with the real trainer as a user would write it (README, "Routes").

Hugging Face Trainer: compile the model in place before ``Trainer(...)``. The other two ways fail in
transformers 5.24 / accelerate 1.16, for reasons outside actc: ``TrainingArguments(torch_compile_backend=
"actc")`` is refused by accelerate's fixed list of backend names, and an ``OptimizedModule`` (what
``torch.compile(model)`` returns) loses the batch, because Trainer reads the signature of its
``forward(*args, **kwargs)`` to decide which dataset columns to keep.
"""
import logging
import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import actc

pytestmark = pytest.mark.slow


def _totals(records) -> list[str]:
    return [r.getMessage() for r in records if r.name == "actc" and "saved activations compressed" in r.getMessage()]


def _assert_compressed(records, budget: str) -> None:
    """Every graph actc compiled has the budget asked for, and the model's graph compressed something (a
    small graph after a break, like the loss, may have nothing worth compressing)."""
    totals = _totals(records)
    assert totals and all(re.search(rf", budget {budget}(, recompute budget [0-9.e-]+)?$", line) for line in totals), totals
    assert any(int(re.search(r"(\d+)/\d+ saved activations compressed", line).group(1)) > 0 for line in totals), totals


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=128, n_positions=64, n_embd=64, n_layer=1, n_head=4,
                        bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config)


def _hf_train(model, tmp_path) -> list[float]:
    from transformers import Trainer, TrainingArguments

    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 128, (12, 64), generator=g)]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4,
                             logging_steps=1, report_to=[], save_strategy="no", use_cpu=True,
                             disable_tqdm=True, seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def test_hf_trainer_with_actc_compile_and_options(tmp_path, caplog):
    model = actc.compile(_gpt2(), memory_budget="4bit")
    with caplog.at_level(logging.INFO, logger="actc"):
        losses = _hf_train(model, tmp_path)
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses))), losses
    _assert_compressed(caplog.records, "4bit")


def test_hf_trainer_takes_the_budget_from_the_environment(tmp_path, caplog, monkeypatch):
    """model.compile(backend="actc") passes no options: ACTC_MEMORY_BUDGET sets the budget."""
    monkeypatch.setenv("ACTC_MEMORY_BUDGET", "8bit")
    model = _gpt2()
    model.compile(backend="actc")
    with caplog.at_level(logging.INFO, logger="actc"):
        losses = _hf_train(model, tmp_path)
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses))), losses
    _assert_compressed(caplog.records, "8bit")


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(32, 256), nn.Linear(256, 4)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


def test_lightning_module_with_actc_compile(caplog):
    import lightning as L

    class Lit(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = actc.compile(_Net(), memory_budget="2bit", min_bytes=1024)  # in place: same state_dict keys

        def training_step(self, batch, _):
            x, y = batch
            loss = F.cross_entropy(self.net(x), y)
            self.log("loss", loss)
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    torch.manual_seed(0)
    x = torch.randn(96, 32)
    data = torch.utils.data.TensorDataset(x, (x[:, 0] > 0).long() + 2 * (x[:, 1] > 0).long())
    trainer = L.Trainer(max_steps=3, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    lit = Lit()
    with caplog.at_level(logging.INFO, logger="actc"):
        trainer.fit(lit, torch.utils.data.DataLoader(data, batch_size=32))
    assert trainer.global_step == 3 and torch.isfinite(trainer.callback_metrics["loss"])
    assert set(lit.net.state_dict()) == {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}
    _assert_compressed(caplog.records, "2bit")
