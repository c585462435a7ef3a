"""HuggingFace transformers models passed directly to ``hatconvert.convert`` (tiny configs)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import hatconvert
from helpers import train_and_check
from hatconvert.errors import CheckpointError, InputError, TaskError
from hatconvert.options import ConversionOptions

transformers = pytest.importorskip("transformers")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import hf_models  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAMILIES = ["bert-seq", "distilbert-seq", "gpt2-seq", "vit-image", "wav2vec2-audio",
            "whisper-audio"]
CLASSES = [3, 5, 4]
transformers.logging.set_verbosity_error()


def logits(net, name, task, seed=99):
    return hf_models.first_tensor(net(**hf_models.inputs_for(name, seed=seed), task_id=task))


def train(net, name, tasks=3, steps=4, start=0):
    """Train tasks ``start`` to ``tasks - 1`` with one AdamW (weight decay); each task's eval
    logits at its end."""
    opt = torch.optim.AdamW(net.parameters(), lr=5e-3, weight_decay=0.05)
    ended = {}
    for t in range(start, tasks):
        net.train()
        net.begin_task(t)
        for step in range(steps):
            s = hatconvert.mask_scale(step, steps)
            out = net(**hf_models.inputs_for(name, seed=10 * t + step), task_id=t, mask_scale=s)
            flat = out.logits.reshape(-1, out.logits.shape[-1])
            labels = torch.arange(flat.shape[0]) % flat.shape[-1]
            loss = nn.functional.cross_entropy(flat, labels) + net.regularization(t, s)
            opt.zero_grad()
            loss.backward()
            opt.step()
        net.end_task()
        net.eval()
        with torch.no_grad():
            ended[t] = logits(net, name, t).clone()
    return ended


@pytest.mark.parametrize("name", FAMILIES)
def test_converts_directly_with_exact_fidelity_on_every_task(name):
    model = hf_models.build(name)
    inputs = hf_models.inputs_for(name)
    net = hatconvert.convert(model, 3, mask_init="dense").eval()
    with torch.no_grad():
        ref = model(**inputs)
        for t in range(3):
            out = net(**inputs, task_id=t)
            assert type(out) is type(ref)  # the ModelOutput class of the source
            torch.testing.assert_close(out.logits, ref.logits, rtol=0, atol=1e-6)
    assert net.layout.gated and net.report().count("gated") > 0
    assert "whose own forward runs" in str(net.report())


@pytest.mark.parametrize("name", FAMILIES)
def test_three_tasks_with_one_adamw_keep_earlier_tasks_bit_identical(name):
    untrained = hatconvert.convert(hf_models.build(name), 3, num_classes=CLASSES)
    net = hatconvert.convert(hf_models.build(name), 3, num_classes=CLASSES)
    with torch.no_grad():
        before = logits(untrained.eval(), name, 1)
    ended = train(net, name)
    with torch.no_grad():
        for t in range(3):
            now = logits(net, name, t)
            assert now.shape[-1] == CLASSES[t]  # each task's head has its class count
            assert torch.equal(now, ended[t]), f"task {t} changed"
        assert not torch.allclose(logits(net, name, 1), before)  # training did move task 1
    gated = next(iter(net.layout.gated))
    assert net.capacity() < 1.0, f"no capacity was used ({gated} ...)"


def test_conv1d_and_every_attention_and_mlp_linear_of_gpt2_are_gated():
    model = hf_models.build("gpt2-seq")
    net = hatconvert.convert(model, 2)
    conv1d = [p for p, m in model.named_modules()
              if type(m).__name__ == "Conv1D"]
    assert conv1d and set(conv1d) <= set(net.layout.gated)
    assert net.layout.heads == ["score"]


def test_the_head_is_the_last_layer_outside_the_backbone_and_a_backbone_has_none():
    assert hatconvert.convert(hf_models.build("roberta-seq"), 2).layout.heads == \
        ["classifier.out_proj"]  # classifier.dense is gated
    distil = hatconvert.convert(hf_models.build("distilbert-seq"), 2)
    assert distil.layout.heads == ["classifier"] and "pre_classifier" in distil.layout.gated
    backbone = hatconvert.convert(hf_models.build("bert-backbone"), 2)
    assert backbone.layout.heads == [] and "no head: BertModel" in str(backbone.report())
    with pytest.raises(hatconvert.ConversionError, match="no classifier layer"):
        hatconvert.convert(hf_models.build("bert-backbone"), 2, num_classes=3)


@pytest.mark.parametrize("name, heads", [
    ("deit-distilled", ["cls_classifier", "distillation_classifier"]),  # both give num_labels
    ("resnet-image", ["classifier.1"])])  # a Linear inside nn.Sequential(Flatten, Linear)
def test_every_classifier_outside_the_backbone_is_a_head_resized_per_task(name, heads):
    net = hatconvert.convert(hf_models.build(name), 3, num_classes=CLASSES)
    assert sorted(net.layout.heads) == heads
    ended = train(net, name)
    assert [ended[t].shape[-1] for t in range(3)] == CLASSES
    # multiple choice scores each choice with one unit, not num_labels: the last layer outside
    assert hatconvert.convert(hf_models.build("bert-choice"), 2).layout.heads == ["classifier"]


def test_large_embedding_tables_are_frozen_after_task_0_and_reported():
    model = hf_models.build("bert-seq")
    net = hatconvert.convert(model, 3)
    word = "bert.embeddings.word_embeddings"
    assert word in net.layout.frozen_embeddings
    assert "bert.embeddings.token_type_embeddings" in net.layout.task_leaves  # small: a copy
    report = str(net.report())
    assert f"{word} ({model.bert.embeddings.word_embeddings.weight.numel():,} parameters" \
        in report and "embeddings='loose'" in report
    assert net.report().tensors[f"{word}.weight"] == "frozen"
    first = net.model.bert.embeddings.word_embeddings.weight.detach().clone()
    after_task_0 = hatconvert.convert(model, 3)
    train(after_task_0, "bert-seq", tasks=1)
    kept = after_task_0.model.bert.embeddings.word_embeddings.weight.detach().clone()
    assert not torch.equal(kept, first)  # task 0 trains it
    train(after_task_0, "bert-seq", tasks=2, start=1)  # AdamW's weight decay touches it too
    assert torch.equal(after_task_0.model.bert.embeddings.word_embeddings.weight, kept)

    copied = hatconvert.convert(model, 3, embeddings="loose")
    assert "bert.embeddings" in copied.layout.task_leaves and not copied.layout.frozen_embeddings
    assert copied.report().converted_params > net.report().converted_params


def test_embedding_policy_applies_to_traced_models_too():
    class Tagger(nn.Module):
        def __init__(self):
            super().__init__()
            self.words, self.kinds = nn.Embedding(500, 16), nn.Embedding(2, 16)
            self.hidden, self.out = nn.Linear(16, 16), nn.Linear(16, 3)

        def forward(self, ids, kinds):
            return self.out(torch.relu(self.hidden(self.words(ids) + self.kinds(kinds))))
    net = hatconvert.convert(Tagger(), 2)
    assert list(net.layout.frozen_embeddings) == ["words"] and "words" in net.layout.frozen_leaves
    assert "kinds" in net.layout.task_leaves
    frozen = hatconvert.convert(Tagger(), 2, embeddings="freeze")
    assert set(frozen.layout.frozen_embeddings) == {"words", "kinds"}
    with pytest.raises(hatconvert.HATError, match="embeddings policy"):
        hatconvert.convert(Tagger(), 2, embeddings="copy")
    tied = Tagger()
    tied.out = nn.Linear(16, 500, bias=False)
    tied.out.weight = tied.words.weight  # a language model's tied output layer
    net = hatconvert.convert(tied, 2, head=False)
    assert "out" not in net.layout.gated and "out" in net.layout.frozen_leaves
    # files written before the option copied every table: they still rebuild that way
    assert ConversionOptions.from_config({"num_tasks": 2}).embeddings == "loose"


def test_inputs_are_given_by_name_and_a_missing_one_is_named():
    net = hatconvert.convert(hf_models.build("bert-seq"), 2).eval()
    batch = hf_models.inputs_for("bert-seq")
    with torch.no_grad():
        by_name = net(**batch, task_id=1).logits
        ids = batch.pop("input_ids")
        assert torch.equal(net(ids, 1, **batch).logits, by_name)
        embeds = net.model.bert.embeddings.word_embeddings(ids)  # the model's own alternative
        torch.testing.assert_close(net(inputs_embeds=embeds, task_id=1, **batch).logits, by_name)
    with pytest.raises(InputError, match="input_ids="):
        net(task_id=0)
    with pytest.raises(TaskError, match="no task_id"):
        net(ids)


@pytest.mark.parametrize("name", ["bert-choice", "bert-qa"])
def test_num_classes_is_refused_for_a_head_whose_width_the_task_fixes(name):
    model = (hf_models.build(name) if name in hf_models.CATALOGUE else
             transformers.BertForQuestionAnswering(transformers.BertConfig(**hf_models.TEXT)))
    with pytest.raises(hatconvert.ConversionError, match="width its task fixes"):
        hatconvert.convert(model, 3, num_classes=CLASSES)
    net = hatconvert.convert(model, 3)  # one copy of the head per task, its width kept
    assert len(net.layout.heads) == 1


def test_gradient_checkpointing_is_refused_by_name():
    model = hf_models.build("bert-seq")
    enable = getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)
    enable()
    with pytest.raises(hatconvert.ConversionError, match="checkpointing_disable"):
        hatconvert.convert(model, 2)


RELOAD = """
import sys, torch, hatconvert
from safetensors.torch import load_file, save_file
sys.path.insert(0, sys.argv[4])
import hf_models
net = hatconvert.load(sys.argv[1])
name = sys.argv[3]
with torch.no_grad():
    out = {f"t{t}": hf_models.first_tensor(net(**hf_models.inputs_for(name, seed=99),
                                               task_id=t)) for t in range(3)}
save_file({k: v.contiguous() for k, v in out.items()}, sys.argv[2])
"""


@pytest.mark.parametrize("name", ["bert-seq", "wav2vec2-audio"])
def test_save_and_load_in_a_fresh_process_rebuild_from_the_stored_config(tmp_path, name):
    from safetensors.torch import load_file
    net = hatconvert.convert(hf_models.build(name), 3, num_classes=CLASSES)
    ended = train(net, name)
    path, result = tmp_path / "net.safetensors", tmp_path / "out.safetensors"
    hatconvert.save(net, path)
    meta = hatconvert.checkpoint.describe(path)
    assert meta["source"]["kind"] == "transformers"
    assert meta["source"]["class"] == hf_models.class_of(name)
    script = tmp_path / "reload.py"
    script.write_text(RELOAD)
    proc = subprocess.run([sys.executable, str(script), str(path), str(result), name,
                           os.path.join(ROOT, "benchmarks")], capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, PYTHONPATH=ROOT))
    assert proc.returncode == 0, proc.stderr
    got = load_file(str(result))
    for t in range(3):
        assert torch.equal(got[f"t{t}"], ended[t])
    again = hatconvert.load(path, model=hf_models.build(name, seed=5))  # model= still works
    with torch.no_grad():
        assert torch.equal(logits(again, name, 1), ended[1])


@pytest.mark.parametrize("name", FAMILIES)
def test_export_loads_into_the_plain_class_from_its_config(name):
    net = hatconvert.convert(hf_models.build(name), 3, num_classes=CLASSES)
    ended = train(net, name, tasks=2)
    state = hatconvert.export(net, 1)
    config = hf_models.build(name).config
    config = type(config).from_dict({**config.to_dict(), "num_labels": CLASSES[1],
                                     "id2label": None, "label2id": None})
    auto = (transformers.AutoModelForAudioClassification if "audio" in name else
            transformers.AutoModelForImageClassification if "image" in name else
            transformers.AutoModelForSequenceClassification)
    plain = auto.from_config(config).eval()
    plain.load_state_dict(state, strict=True)
    with torch.no_grad():
        out = hf_models.first_tensor(plain(**hf_models.inputs_for(name, seed=99)))
    torch.testing.assert_close(out, ended[1], rtol=1e-5, atol=1e-5)


def test_a_checkpoint_of_a_class_transformers_lacks_is_refused_by_name():
    from hatconvert.huggingface import build_from_source
    with pytest.raises(CheckpointError, match="'NoSuchModelForThings'"):
        build_from_source("x.safetensors", {"kind": "transformers",
                                             "class": "NoSuchModelForThings", "config": {}})
    with pytest.raises(CheckpointError, match="cannot rebuild BertModel"):
        build_from_source("x.safetensors", {"kind": "transformers", "class": "BertModel",
                                             "config": {"hidden_size": 30,
                                                        "num_attention_heads": 4}})


@pytest.mark.parametrize("cls_name", ["GPT2LMHeadModel", "BertForMaskedLM"])
def test_an_output_layer_tied_to_the_word_embeddings_is_frozen_with_them(cls_name):
    config = (transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=2,
                                      n_positions=32) if cls_name.startswith("GPT2") else
              transformers.BertConfig(**hf_models.TEXT))
    model = getattr(transformers, cls_name)(config).eval()
    out_layer = next(p for p, m in model.named_modules() if m is model.get_output_embeddings())
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    net = hatconvert.convert(model, 2)
    assert out_layer not in net.layout.gated and net.layout.heads == []
    assert f"{out_layer} (tied to an embedding table)" in net.layout.frozen_embeddings
    tied = net.model.get_output_embeddings().weight
    assert tied is net.model.get_input_embeddings().weight  # still one tensor

    def call(n):  # no key-value cache in the outputs: only the logits are compared
        ids = hf_models.inputs_for("bert-backbone", batch=n, seed=n)["input_ids"]
        return (ids,), {"use_cache": False} if cls_name.startswith("GPT2") else {}
    train_and_check(net, call, [call(4)], tasks=2)  # task 0 stays bit-identical
    loose = hatconvert.convert(model, 2, embeddings="loose")  # a tied table is never copied
    assert out_layer not in loose.layout.gated
    assert loose.model.get_output_embeddings().weight is \
        loose.model.get_input_embeddings().weight
