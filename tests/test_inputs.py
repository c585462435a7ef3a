"""Models with several inputs, dict inputs, token ids, optional inputs and graph inputs.

Each converts, computes what the original did with dense masks, trains three tasks with one
AdamW (weight decay) kept across them with every earlier task bit-identical for every kind of
call, and round-trips through save/load.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st
import torch.nn.functional as F
from torch import nn

import hatconvert
from hatconvert.errors import InputError, TaskError

from helpers import flat, run, train_and_check


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = nn.Linear(8, 16), nn.Linear(4, 16), nn.Linear(16, 3)

    def forward(self, x, side):
        return self.head(F.relu(self.a(x) + self.b(side)))


class DictInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.head = nn.Linear(8, 16), nn.Linear(16, 3)

    def forward(self, batch):
        return self.head(F.relu(self.a(batch["x"])) * batch["weights"])


class Tokens(nn.Module):
    """Token ids, an optional attention mask, a constant flag."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.proj, self.head = nn.Linear(16, 16), nn.Linear(16, 3)

    def forward(self, ids, attention_mask=None, scale=1.0):
        h = F.relu(self.proj(self.embed(ids))) * scale
        if attention_mask is None:
            return self.head(h.mean(1))
        weights = attention_mask.unsqueeze(-1).to(h.dtype)
        return self.head((h * weights).sum(1) / weights.sum(1).clamp(min=1))


class EdgeMessages(nn.Module):
    """Message passing over ``edge_index`` (2, E): node features (N, F), no batch dim."""

    def __init__(self):
        super().__init__()
        self.msg, self.update, self.head = nn.Linear(8, 16), nn.Linear(24, 16), nn.Linear(16, 3)

    def forward(self, x, edge_index):
        src, dst = edge_index[0], edge_index[1]
        messages = F.relu(self.msg(x))[src]
        summed = x.new_zeros((x.shape[0], 16)).index_add(0, dst, messages)
        return self.head(F.relu(self.update(torch.cat([x, summed], dim=-1))))


class DenseGraph(nn.Module):
    """Node features (N, F) and an adjacency matrix (N, N): both have N rows, so an example
    cut to one row does not fit; the whole call has to be kept."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 3)

    def forward(self, x, adjacency):
        h = F.relu(adjacency @ self.a(x))
        return self.head(F.relu(adjacency @ self.b(h)))


class Seq2Seq(nn.Module):
    """torch's own encoder-decoder: source ids and ``decoder_input_ids``."""

    def __init__(self):
        super().__init__()
        self.src, self.tgt = nn.Embedding(30, 16), nn.Embedding(30, 16)
        self.transformer = nn.Transformer(16, 2, 1, 1, 32, dropout=0.0, batch_first=True)
        self.out = nn.Linear(16, 30)

    def forward(self, src_ids, decoder_input_ids):
        return self.out(self.transformer(self.src(src_ids), self.tgt(decoder_input_ids)))


class PaddedEncoder(nn.Module):
    """torch's TransformerEncoder with an optional key padding mask."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(30, 16)
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.encoder, self.head = nn.TransformerEncoder(layer, 2), nn.Linear(16, 3)

    def forward(self, ids, padding_mask=None):
        return self.head(self.encoder(self.embed(ids), src_key_padding_mask=padding_mask).mean(1))


def seq2seq():
    return Seq2Seq(), lambda n: ((torch.randint(0, 30, (n, 6)),),
                                 {"decoder_input_ids": torch.randint(0, 30, (n, 4))})


def two_inputs():
    return TwoInputs(), lambda n: ((torch.randn(n, 8),), {"side": torch.randn(n, 4)})


def dict_input():
    return DictInput(), lambda n: (({"x": torch.randn(n, 8), "weights": torch.rand(n, 1)},), {})


def edge_messages():
    def call(n):
        return (torch.randn(6, 8),), {"edge_index": torch.randint(0, 6, (2, 10))}
    return EdgeMessages(), call


def dense_graph():
    def call(n):
        adjacency = (torch.rand(6, 6) > 0.5).float()
        return (torch.randn(6, 8),), {"adjacency": adjacency}
    return DenseGraph(), call


def tokens_with_and_without_mask():
    def call(n):
        ids = torch.randint(0, 50, (n, 7))
        mask = (torch.rand(n, 7) > 0.3).long()
        return (ids,), ({"attention_mask": mask} if torch.rand(()) > 0.5 else {})
    return Tokens(), call


MODELS = {"two inputs": two_inputs, "dict input": dict_input, "edge index": edge_messages,
          "adjacency": dense_graph, "seq2seq": seq2seq}


@pytest.mark.parametrize("name", MODELS)
def test_multi_input_models_keep_fidelity_and_earlier_tasks(name, tmp_path):
    torch.manual_seed(0)
    model, make_call = MODELS[name]()
    model.eval()
    fixed = [make_call(5)]
    with torch.no_grad():
        expected = model(*fixed[0][0], **fixed[0][1])
    net = hatconvert.convert(model, 3, mask_init="dense").eval()
    with torch.no_grad():
        assert torch.allclose(run(net, fixed[0], 0), expected, atol=1e-6)
    net = hatconvert.convert(model, 3)
    ended = train_and_check(net, make_call, fixed)
    assert 0 < net.capacity() < 1
    path = tmp_path / "net.safetensors"
    hatconvert.save(net, path)
    loaded = hatconvert.load(path, model=type(model)())
    with torch.no_grad():
        for t in range(3):
            assert all(torch.equal(a, b) for a, b in zip(flat(run(loaded, fixed[0], t)), ended[t][0]))
    assert loaded.capacity() == net.capacity()  # the reloaded example calls propagate alike


def test_an_example_that_cannot_be_cut_to_one_sample_is_kept_whole():
    torch.manual_seed(0)
    model, make_call = dense_graph()
    net = hatconvert.convert(model, 2)
    train_and_check(net, make_call, [make_call(5)], tasks=2)
    example = next(iter(net._examples.values()))
    assert example.call[0].shape == (6, 8) and example.whole is None


def test_an_optional_tensor_input_works_given_and_not_given():
    torch.manual_seed(0)
    model, make_call = tokens_with_and_without_mask()
    model.eval()
    ids = torch.randint(0, 50, (4, 7))
    mask = torch.tensor([[1] * 7, [1] * 3 + [0] * 4, [1] * 5 + [0] * 2, [0] * 7])
    dense = hatconvert.convert(model, 3, mask_init="dense").eval()
    with torch.no_grad():
        assert torch.allclose(dense(ids, 0), model(ids), atol=1e-6)
        assert torch.allclose(dense(ids, 0, attention_mask=mask), model(ids, mask), atol=1e-6)
        assert not torch.allclose(model(ids), model(ids, mask))
    report = str(dense.report())
    assert "attention_mask=None (optional)" in report and "scale=1.0" in report

    net = hatconvert.convert(model, 3)
    calls = [((ids,), {}), ((ids,), {"attention_mask": mask})]
    train_and_check(net, make_call, calls)


def test_torch_transformer_encoder_with_and_without_a_padding_mask():
    torch.manual_seed(0)
    ids = torch.randint(0, 30, (4, 6))
    padding = torch.tensor([[False] * 6, [False] * 3 + [True] * 3, [False] * 5 + [True],
                            [False] * 6])
    calls = [((ids,), {}), ((ids,), {"padding_mask": padding})]
    model = PaddedEncoder().eval()
    dense = hatconvert.convert(model, 3, mask_init="dense").eval()
    with torch.no_grad():
        for call in calls:
            assert torch.allclose(run(dense, call, 1), model(*call[0], **call[1]), atol=1e-5)

    def make_call(n):
        ids = torch.randint(0, 30, (n, 6))
        return (ids,), ({"padding_mask": torch.rand(n, 6) > 0.7} if n % 2 else {})
    net = hatconvert.convert(model, 3)
    assert "encoder" in net.layout.converted_leaves
    train_and_check(net, make_call, calls)


def test_inputs_the_network_does_not_take_are_refused_by_name():
    net = hatconvert.convert(Tokens(), 2).eval()
    ids = torch.randint(0, 50, (2, 7))
    net(ids, 0, scale=1.0)  # the traced value is accepted
    with pytest.raises(InputError, match=r"input 'scale' of Tokens was fixed at 1\.0"):
        net(ids, 0, scale=2.0)
    with pytest.raises(InputError, match=r"no input named 'mask'.*attention_mask"):
        net(ids, 0, mask=torch.ones(2, 7))


def test_a_kind_of_call_first_seen_after_protection_is_refused():
    """Calls with the mask were never propagated while task 1 trained: task 0's outputs for
    them are not guaranteed, so the network refuses them instead of answering."""
    torch.manual_seed(0)
    net = hatconvert.convert(Tokens(), 3)
    ids = torch.randint(0, 50, (4, 7))
    train_and_check(net, lambda n: ((torch.randint(0, 50, (n, 7)),), {}), [((ids,), {})],
                    tasks=2)
    net.eval()
    with pytest.raises(TaskError, match="not been called with attention_mask given"):
        net(ids, 0, attention_mask=torch.ones(4, 7, dtype=torch.long))


def test_an_optional_input_that_does_not_trace_is_fixed_and_reported():
    class Flagged(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 3)

        def forward(self, x, return_hidden=None, unused=None):
            h = self.a(x)
            if return_hidden:
                return h, h
            return h

    net = hatconvert.convert(Flagged(), 2, head=False)
    report = str(net.report())
    assert "return_hidden=None (given, the forward does not trace" in report
    assert "unused=None (the eval-mode forward does not read it)" in report
    with pytest.raises(InputError, match="'return_hidden' of Flagged was fixed at None"):
        net(torch.randn(2, 4), 0, return_hidden=True)


class Routed(nn.Module):
    """Optional inputs that change which features the next layer reads: ``b`` reverses them,
    so a graph protected only for calls without ``b`` would leave the reversed reads free."""

    def __init__(self):
        super().__init__()
        self.first, self.second, self.head = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 2)

    def forward(self, x, a=None, b=None):
        h = F.relu(self.first(x))
        if a is not None:
            h = h * a
        if b is not None:
            h = torch.where(b > 0, h.flip(-1), h)
        return self.head(F.relu(self.second(h)))


KINDS = [(), ("a",), ("b",), ("a", "b")]


def routed_call(kind, n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    inputs = {"a": torch.rand(n, 8, generator=g), "b": torch.ones(n, 1)}
    return (torch.randn(n, 6, generator=g),), {k: inputs[k] for k in kind}


@settings(max_examples=25, deadline=None, derandomize=True)
@given(st.lists(st.lists(st.sampled_from(range(4)), min_size=1, max_size=3), min_size=2,
                max_size=3))
def test_every_kind_of_call_seen_before_protection_keeps_earlier_tasks(kinds_per_task):
    """Drawn kinds of call per task: every kind seen before trained tasks were first protected
    keeps them bit-identical; a kind seen only later is refused instead of answered."""
    torch.manual_seed(0)
    net = hatconvert.convert(Routed(), len(kinds_per_task), head=False)
    opt = torch.optim.AdamW(net.parameters(), lr=0.05, weight_decay=0.05)
    seen, ended = set(), {}
    for t, kinds in enumerate(kinds_per_task):
        net.train()
        net.begin_task(t)
        for step, k in enumerate(kinds):
            call = routed_call(KINDS[k], seed=step)
            if t and KINDS[k] not in seen:
                with pytest.raises(TaskError, match="not been called"):
                    run(net, call, t)
                continue
            seen.add(KINDS[k])
            loss = run(net, call, t).pow(2).mean() + net.regularization(t, 10.0)
            opt.zero_grad()
            loss.backward()
            opt.step()
        net.end_task()
        net.eval()
        with torch.no_grad():
            ended[t] = {k: run(net, routed_call(k, seed=9), t) for k in seen}
            for u in range(t):
                for k, before in ended[u].items():
                    assert torch.equal(run(net, routed_call(k, seed=9), u), before), (u, k)
