"""SA-Llama in the Hugging Face training stack: Trainer, accelerate, activation checkpointing."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from torch.utils.checkpoint import checkpoint
from transformers import PreTrainedModel

from stochastic_attention.models import SALlamaConfig, SALlamaForCausalLM

VOCAB, SEQ = 64, 24


def tiny(method: str, seed: int = 0, window: int = 4, **kw) -> SALlamaForCausalLM:
    """2 layers, width 32, windows far below the length so that SA's routing matters."""
    torch.manual_seed(seed)
    options = {"stochastic_local": dict(local=2), "bigbird": dict(random_keys=2)}.get(method, {})
    config = SALlamaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, attention_methods=method,
                           attention_options=dict(window=window, **options), eos_token_id=None,
                           **kw)
    return SALlamaForCausalLM(config)


def periodic_sequences(count: int, seed: int = 0) -> list[dict]:
    """Sequences that repeat a random 5-token motif: after the first period every next token
    is predictable from the context, so a model that trains drives the loss well down."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(count):
        motif = torch.randint(0, VOCAB, (5,), generator=g)
        ids = motif.repeat(SEQ // 5 + 1)[:SEQ]
        rows.append(dict(input_ids=ids, labels=ids.clone()))
    return rows


def gradients(model, ids: torch.Tensor, seed: int) -> tuple[float, dict]:
    model.train().zero_grad()
    torch.manual_seed(seed)  # the training permutations come from the global RNG
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()
                         if p.grad is not None}


@pytest.mark.parametrize("method", ["stochastic", "stochastic_local", "gated", "bigbird"])
def test_checkpointed_gradients_equal_plain_gradients(method):
    ids = torch.randint(0, VOCAB, (2, 23), generator=torch.Generator().manual_seed(1))
    model = tiny(method)
    loss, plain = gradients(model, ids, seed=5)
    _, other_draw = gradients(model, ids, seed=6)
    # the test can fail: another permutation (or random-key) draw changes the gradients
    assert any(not torch.allclose(plain[n], other_draw[n], atol=1e-6) for n in plain)

    calls = []
    model.model.layers[0].self_attn.register_forward_hook(lambda *a: calls.append(1))
    model.activation_checkpointing_enable()
    assert model.is_activation_checkpointing
    checkpointed_loss, checkpointed = gradients(model, ids, seed=5)
    assert len(calls) == 2  # forward, then the recomputation in backward
    assert checkpointed_loss == pytest.approx(loss, abs=1e-6)
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5,
                                   msg=lambda m, name=name: f"{name}: {m}")

    # Even when asked not to preserve the RNG state, SA-Llama's recomputation restores it.
    model.activation_checkpointing_disable()
    model.activation_checkpointing_enable(
        activation_checkpointing_kwargs=dict(use_reentrant=False, preserve_rng_state=False))
    _, forced = gradients(model, ids, seed=5)
    for name in plain:
        torch.testing.assert_close(forced[name], plain[name], atol=1e-6, rtol=1e-5)


def test_a_recompute_without_the_rng_state_would_give_other_gradients():
    """What the override prevents: transformers' own setting with preserve_rng_state=False
    redraws the permutation in backward, and the gradients no longer match."""
    ids = torch.randint(0, VOCAB, (2, 23), generator=torch.Generator().manual_seed(1))
    model = tiny("stochastic")
    _, plain = gradients(model, ids, seed=5)
    PreTrainedModel._set_gradient_checkpointing(
        model, enable=True, gradient_checkpointing_func=partial(
            checkpoint, use_reentrant=False, preserve_rng_state=False))
    _, redrawn = gradients(model, ids, seed=5)
    assert any(not torch.allclose(plain[n], redrawn[n], atol=1e-5) for n in plain)


def _losses(log_history: list[dict]) -> list[float]:
    return [row["loss"] for row in log_history if "loss" in row]


@pytest.mark.parametrize("method,checkpointing", [("stochastic", False), ("gated", True)])
def test_trainer_trains_a_tiny_sa_llama(tmp_path, method, checkpointing):
    from transformers import Trainer, TrainingArguments

    model = tiny(method, window=8)
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], max_steps=40,
                             per_device_train_batch_size=8, learning_rate=1e-2,
                             warmup_steps=0, logging_steps=1, save_strategy="no", seed=0,
                             activation_checkpointing=checkpointing, dataloader_num_workers=0,
                             disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=periodic_sequences(64))
    trainer.train()
    assert model.is_activation_checkpointing == checkpointing
    losses = _losses(trainer.state.log_history)
    assert len(losses) == 40
    assert sum(losses[-5:]) / 5 < 0.9 * sum(losses[:5]) / 5, losses
    trainer.save_model(str(tmp_path / "final"))
    reloaded = SALlamaForCausalLM.from_pretrained(tmp_path / "final")
    assert reloaded.config.attention_methods == [method, method]


def test_accelerate_loop_trains_a_tiny_sa_llama(tmp_path):
    from accelerate import Accelerator
    from torch.utils.data import DataLoader

    accelerator = Accelerator(cpu=True)
    model = tiny("stochastic", window=8)
    model.activation_checkpointing_enable()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    loader = DataLoader(periodic_sequences(64), batch_size=8, shuffle=True,
                        generator=torch.Generator().manual_seed(0))
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    model.train()
    losses = []
    for _ in range(4):  # 4 epochs of 8 steps
        for batch in loader:
            loss = model(**batch).loss
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.9 * sum(losses[:5]) / 5, losses
    accelerator.unwrap_model(model).save_pretrained(tmp_path / "final")
    assert (tmp_path / "final" / "config.json").exists()


def test_the_recipe_in_docs_pretraining_runs(tmp_path, monkeypatch):
    """docs/pretraining.md's Trainer + accelerate snippet, as written."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "docs" / "pretraining.md").read_text()
    section = text.split("## Training with the Hugging Face Trainer and accelerate", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr("tempfile.tempdir", None)
    exec(compile(code, "docs/pretraining.md", "exec"), {"__name__": "recipe"})
