import logging
import math

import pytest
import torch
from torch import nn

from chronicals_fx.runtime import create_loraplus_optimizer, loraplus_param_groups, loraplus_summary

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
from tests.tiny_models import tiny_causal_lm  # noqa: E402

LR, RATIO, WD = 2e-4, 16.0, 0.05


def tiny_llama() -> nn.Module:
    return tiny_causal_lm("llama", hidden_size=32, intermediate_size=48, vocab_size=64)


def peft_model(**lora) -> nn.Module:
    config = peft.LoraConfig(
        r=4,
        target_modules=lora.pop("target_modules", "all-linear"),
        modules_to_save=["lm_head"],
        **lora,
    )
    return peft.get_peft_model(tiny_llama(), config)


def group_of(groups) -> dict[int, dict]:
    """id(param) -> its group, asserting that no parameter is in two groups."""
    owner = {}
    for group in groups:
        for p in group["params"]:
            assert id(p) not in owner, (
                f"parameter in groups {owner[id(p)]['name']} and {group['name']}"
            )
            owner[id(p)] = group
    return owner


def assert_partition(model, groups) -> dict[str, dict]:
    """Each trainable parameter in exactly one group, no frozen or empty one; name -> group."""
    owner = group_of(groups)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert set(owner) == trainable
    assert all(group["params"] for group in groups)
    names = [group["name"] for group in groups]
    assert len(names) == len(set(names))
    return {group["name"]: group for group in groups}


def names_in(model, group) -> set[str]:
    ids = {id(p) for p in group["params"]}
    return {name for name, p in model.named_parameters() if id(p) in ids}


def check_decay_rule(groups):
    for group in groups:
        for p in group["params"]:
            if p.ndim <= 1 or group["name"] == "dora_magnitude":
                assert group["weight_decay"] == 0.0, group["name"]
            else:
                assert group["weight_decay"] == WD, group["name"]


@pytest.mark.parametrize("variant", ["lora", "rslora"])
def test_peft_lora_groups(variant):
    model = peft_model(use_rslora=variant == "rslora")
    groups = loraplus_param_groups(model, LR, ratio=RATIO, weight_decay=WD)
    by_name = assert_partition(model, groups)
    assert [g["name"] for g in groups] == ["lora_A", "lora_B", "other"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names_in(model, by_name["lora_A"]) == {n for n in trainable if ".lora_A." in n}
    assert names_in(model, by_name["lora_B"]) == {n for n in trainable if ".lora_B." in n}
    assert names_in(model, by_name["other"]) == {
        "base_model.model.lm_head.modules_to_save.default.weight"
    }
    assert by_name["lora_A"]["lr"] == LR
    assert by_name["lora_B"]["lr"] == LR * RATIO
    assert by_name["other"]["lr"] == LR
    check_decay_rule(groups)


def test_dora_magnitude_at_base_lr_without_decay():
    model = peft_model(use_dora=True)
    groups = loraplus_param_groups(model, LR, ratio=RATIO, weight_decay=WD)
    by_name = assert_partition(model, groups)
    magnitudes = {
        n for n, p in model.named_parameters() if p.requires_grad and "lora_magnitude_vector" in n
    }
    assert magnitudes and names_in(model, by_name["dora_magnitude"]) == magnitudes
    assert by_name["dora_magnitude"]["lr"] == LR
    assert by_name["dora_magnitude"]["weight_decay"] == 0.0
    assert by_name["lora_B"]["lr"] == LR * RATIO
    check_decay_rule(groups)


@pytest.mark.parametrize("embedding_lr", [None, 3e-5])
def test_embedding_lora(embedding_lr):
    model = peft_model(target_modules=["embed_tokens", "q_proj", "v_proj"])
    groups = loraplus_param_groups(
        model, LR, ratio=RATIO, weight_decay=WD, embedding_lr=embedding_lr
    )
    by_name = assert_partition(model, groups)
    assert names_in(model, by_name["lora_embedding"]) == {
        "base_model.model.model.embed_tokens.lora_embedding_A.default",
        "base_model.model.model.embed_tokens.lora_embedding_B.default",
    }
    assert by_name["lora_embedding"]["lr"] == (LR if embedding_lr is None else embedding_lr)
    assert by_name["lora_embedding"]["weight_decay"] == WD
    assert all(".embed_tokens." not in n for n in names_in(model, by_name["lora_B"]))


def test_one_dimensional_parameters_not_boosted_and_not_decayed():
    # lora_bias gives lora_B a bias (B-like: lr * ratio); trainable norms are "other" at lr.
    model = peft_model(lora_bias=True)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.requires_grad_(True)
    groups = loraplus_param_groups(model, LR, ratio=RATIO, weight_decay=WD)
    by_name = assert_partition(model, groups)
    norms = {n for n, p in model.named_parameters() if n.endswith("norm.weight")}
    assert names_in(model, by_name["other_no_decay"]) == norms
    assert by_name["other_no_decay"]["lr"] == LR
    b_biases = names_in(model, by_name["lora_B_no_decay"])
    assert b_biases and all(n.endswith("lora_B.default.bias") for n in b_biases)
    assert by_name["lora_B_no_decay"]["lr"] == LR * RATIO
    check_decay_rule(groups)


class LinearChildLoRA(nn.Module):
    """Hand-written LoRA with nn.Linear factors under non-PEFT names."""

    def __init__(self, n_in, n_out, rank):
        super().__init__()
        self.base = nn.Linear(n_in, n_out)
        self.base.requires_grad_(False)
        self.down = nn.Linear(n_in, rank, bias=False)
        self.up = nn.Linear(rank, n_out, bias=False)

    def forward(self, x):
        return self.base(x) + self.up(self.down(x))


class ParameterLoRA(nn.Module):
    """Hand-written LoRA holding the base weight and factors as raw parameters."""

    def __init__(self, n_in, n_out, rank):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_out, n_in), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(n_out))  # trainable bias: "other", no decay
        self.p = nn.Parameter(torch.randn(rank, n_in))
        self.q = nn.Parameter(torch.zeros(n_out, rank))

    def forward(self, x):
        return x @ (self.weight + self.q @ self.p).T + self.bias


class EmbeddingLoRA(nn.Module):
    def __init__(self, vocab, dim, rank):
        super().__init__()
        self.table = nn.Embedding(vocab, dim)
        self.table.requires_grad_(False)
        self.a = nn.Parameter(torch.randn(rank, vocab))
        self.b = nn.Parameter(torch.zeros(dim, rank))


class HandWritten(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = EmbeddingLoRA(50, 16, 2)
        self.blocks = nn.ModuleList(
            [LinearChildLoRA(16, 24, 4), ParameterLoRA(24, 16, 3), LinearChildLoRA(16, 16, 2)]
        )
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, 8)  # trainable, full rank, beside nothing frozen: "other"
        self.frozen = nn.Linear(16, 16)
        self.frozen.requires_grad_(False)
        self.adapter = nn.Linear(16, 16, bias=False)  # trainable but not low rank: "other"


def test_structural_detection_in_hand_written_model():
    model = HandWritten()
    groups = loraplus_param_groups(model, LR, ratio=RATIO, weight_decay=WD)
    by_name = assert_partition(model, groups)
    assert names_in(model, by_name["lora_A"]) == {
        "blocks.0.down.weight",
        "blocks.1.p",
        "blocks.2.down.weight",
    }
    assert names_in(model, by_name["lora_B"]) == {
        "blocks.0.up.weight",
        "blocks.1.q",
        "blocks.2.up.weight",
    }
    assert names_in(model, by_name["lora_embedding"]) == {"embed.a", "embed.b"}
    assert names_in(model, by_name["other"]) == {"head.weight", "adapter.weight"}
    assert names_in(model, by_name["other_no_decay"]) == {
        "blocks.1.bias",
        "norm.weight",
        "norm.bias",
        "head.bias",
    }
    assert by_name["lora_B"]["lr"] == LR * RATIO and by_name["lora_A"]["lr"] == LR
    check_decay_rule(groups)


def test_extra_keys_copied_and_clashes_rejected():
    model = peft_model()
    groups = loraplus_param_groups(model, LR, betas=(0.8, 0.95))
    assert all(g["betas"] == (0.8, 0.95) for g in groups)
    with pytest.raises(ValueError, match="clash"):
        loraplus_param_groups(model, LR, name="x")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"lr": 0.0}, "lr"),
        ({"lr": -1e-4}, "lr"),
        ({"lr": math.nan}, "lr"),
        ({"lr": 1e-4, "ratio": 0.0}, "ratio"),
        ({"lr": 1e-4, "ratio": -2.0}, "ratio"),
        ({"lr": 1e-4, "embedding_lr": 0.0}, "embedding_lr"),
        ({"lr": 1e-4, "weight_decay": -0.1}, "weight_decay"),
    ],
)
def test_invalid_hyperparameters(kwargs, message):
    with pytest.raises(ValueError, match=message):
        loraplus_param_groups(peft_model(), **kwargs)


def test_no_trainable_parameters():
    model = tiny_llama().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        loraplus_param_groups(model, LR)
    with pytest.raises(ValueError, match="no trainable parameters"):
        create_loraplus_optimizer(model, lr=LR)


def test_optimizer_factory_passes_kwargs_and_logs(caplog, capsys):
    model = peft_model(use_dora=True)
    with caplog.at_level(logging.INFO, logger="chronicals_fx.runtime.loraplus"):
        optimizer = create_loraplus_optimizer(
            model, lr=LR, ratio=RATIO, weight_decay=WD, betas=(0.8, 0.9), eps=1e-7, fused=True
        )
    assert isinstance(optimizer, torch.optim.AdamW)
    names = [g["name"] for g in optimizer.param_groups]
    assert names == ["lora_A", "lora_B", "dora_magnitude", "other"]
    for group in optimizer.param_groups:
        assert group["betas"] == (0.8, 0.9) and group["eps"] == 1e-7 and group["fused"] is True
    assert optimizer.defaults["weight_decay"] == WD and optimizer.defaults["lr"] == LR
    assert "lora_B" in caplog.text and "dora_magnitude" in caplog.text
    assert capsys.readouterr().out == ""

    ids = torch.randint(0, 64, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    assert len(optimizer.state) == sum(len(g["params"]) for g in optimizer.param_groups)


def test_optimizer_factory_other_optimizer_class():
    model = peft_model()
    optimizer = create_loraplus_optimizer(
        model, torch.optim.SGD, lr=0.1, ratio=4.0, momentum=0.9, foreach=False
    )
    by_name = {g["name"]: g for g in optimizer.param_groups}
    assert by_name["lora_B"]["lr"] == pytest.approx(0.4)
    assert all(g["momentum"] == 0.9 and g["foreach"] is False for g in optimizer.param_groups)


def test_summary_table():
    model = peft_model()
    groups = loraplus_param_groups(model, LR, ratio=RATIO, weight_decay=WD)
    table = loraplus_summary(groups).splitlines()
    assert table[0].split() == ["group", "tensors", "elements", "lr", "weight_decay"]
    rows = {line.split()[0]: line.split()[1:] for line in table[2:]}
    for group in groups:
        tensors, elements, lr, wd = rows[group["name"]]
        assert int(tensors) == len(group["params"])
        assert int(elements.replace(",", "")) == sum(p.numel() for p in group["params"])
        assert float(lr) == pytest.approx(group["lr"], rel=1e-2)
        assert float(wd) == group["weight_decay"]
